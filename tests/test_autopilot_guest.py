"""The autopilot with a real guest (issue 13): a UML guest under autopilot idles (its
balloon grows), allocates most of its memory (its balloon shrinks in time: the allocation
succeeds and nothing is OOM-killed), then frees it (its balloon grows again)."""

from __future__ import annotations

import time

from control.autopilot import Tuning
from device.balloon import BalloonOptions
from tests.driver import MIB, wait_for
from tests.guest_rig import needs_guest, start_rig, stop_rig

pytestmark = needs_guest

FAST = Tuning(idle_s=1.0, interval_s=0.25, calm_s=3.0, step=32 * MIB, margin=16 * MIB)


def test_idle_grows_a_spike_shrinks_in_time_and_freeing_grows_again(tmp_path):
    rig = start_rig(tmp_path, BalloonOptions(), autopilot=FAST)      # 256 MiB guest
    try:
        control = rig.control
        reply = control.request("autopilot", action="enable", floor=96 * MIB, reserve=32 * MIB)
        assert reply["enabled"] and reply["floor_bytes"] == 96 * MIB
        # Idle: the balloon takes what the guest does not use, in steps, up to its bounds.
        wait_for(lambda: control.request("status")["actual_bytes"] >= 96 * MIB, timeout=10,
                 what="the idle guest's balloon to grow")
        peak = control.request("status")["actual_bytes"]
        assert peak <= 256 * MIB - 96 * MIB                            # never under the floor
        # A spike: the guest allocates most of its memory, 16 MiB at a time.
        for _ in range(9):
            rig.guest.fill_memory(16)
            time.sleep(0.1)
        low = control.request("status")["actual_bytes"]
        assert low < peak, "the balloon did not give memory back under the spike"
        log = rig.guest.run("dmesg")
        assert "Out of memory" not in log and "oom-kill" not in log, log[-1500:]
        status = control.request("autopilot", action="status")["vms"][0]
        assert "pressure" in status["last_decision"] or "reserve" in status["last_decision"] \
            or status["last_decision"].startswith("calm"), status
        # Freed again: after the calm period the balloon grows again.
        rig.guest.free_memory()
        wait_for(lambda: control.request("status")["actual_bytes"] >= low + 64 * MIB, timeout=12,
                 what="the balloon to grow again once the guest freed its memory")
        # A manual target takes the VM off autopilot, and says so.
        reply = control.request("set", size=0)
        assert "autopilot" in reply and "off" in reply["autopilot"]
        assert control.request("autopilot", action="status")["vms"][0]["enabled"] is False
    finally:
        stop_rig(rig)
