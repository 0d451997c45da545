"""What a kick costs the worker when it brings nothing: a guest (or anyone holding the kick
fd) writing the inflate queue's eventfd in a loop with an empty ring.

Kicks are paced (one every ``interval``) so that nearly each one wakes the worker; the
worker counts the kicks it woke for (``counters.kicks``), and its CPU time over the run
divided by that count is the cost per kick. Pinned with the device like every device-side
section.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from bench.guestmem import FakeGuest
from bench.results import Report, fmt
from bench.throughput import ModeUnavailable, start_rig
from device.balloon import INFLATE_QUEUE

HEADERS = ["mode", "kicks sent", "worker woke", "worker CPU ms", "µs per kick"]


def run_kick_flood(report: Report, seconds: float, placement: str,
                   log: Callable[[str], None]) -> None:
    table = report.table("6. Empty-kick flood (worker CPU per kick, empty ring)", HEADERS)
    table.notes.append("Kicks are eventfd writes on the inflate queue with nothing in its "
                       "ring, paced ~50 µs apart; a kick written while the worker is still "
                       "busy with the last one merges into it (eventfd counts), so the cost "
                       "is per wake-up the worker actually handled.")
    for mode in ("jailed", "thread"):
        guest = FakeGuest(64 << 20)
        try:
            try:
                rig = start_rig(guest.ram, mode)
            except ModeUnavailable as exc:
                log(f"kick flood, {mode}: unavailable ({exc})")
                table.rows.append([mode, "-", "-", "-", "unavailable"])
                continue
            try:
                kick_fd = rig.driver.queues[INFLATE_QUEUE].kick_fd
                one = (1).to_bytes(8, "little")
                before = rig.worker_cpu_ns()
                kicks_before = rig.device.counters().get("kicks", 0)
                sent, end = 0, time.monotonic() + seconds
                while time.monotonic() < end:
                    os.write(kick_fd, one)
                    sent += 1
                    pause = time.monotonic() + 50e-6
                    while time.monotonic() < pause:
                        pass
                time.sleep(0.3)                       # the worker reports its counters
                woke = rig.device.counters().get("kicks", 0) - kicks_before
                cpu = (rig.worker_cpu_ns() or 0) - (before or 0)
            finally:
                rig.close()
        finally:
            guest.close()
        per_kick = cpu / 1000 / woke if woke else None
        log(f"kick flood, {mode}: {sent} sent, {woke} woke the worker, "
            f"{cpu / 1e6:.1f} ms worker CPU, {per_kick and round(per_kick, 1)} µs per kick")
        table.rows.append([mode, str(sent), str(woke), fmt(cpu / 1e6, 1), fmt(per_kick, 1)])
        report.add("empty_kick_worker_cpu", per_kick, "µs/kick", mode=mode, placement=placement,
                   runs=1, kicks_sent=sent, kicks_handled=woke)
