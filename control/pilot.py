"""The autopilot in ``serve``: feeds ``control.autopilot`` (the rules, sans-I/O) with the
VMs' statistics and the host's memory, and applies what it decides.

While any VM is under autopilot, a timer runs every ``interval_s``: it asks each such guest
for fresh statistics (the stats buffer handed back) and decides; statistics arriving are
decided on at once, so a guest under pressure is deflated within the round trip that shows
it. With no VM under autopilot, nothing runs (no wake-ups).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from control.errors import RequestError
from control.autopilot import Autopilot, Decision, HostSample, Tuning, VmLimits, VmSample, read_host
from control.loop import EventLoop, Timer
from control.vm import Vm
from device.balloon import PAGE_SIZE, VIRTIO_BALLOON_F_STATS_VQ

log = logging.getLogger("vballoon.autopilot")


class Pilot:
    def __init__(self, loop: EventLoop, tuning: Tuning, vms: Callable[[], dict[str, Vm]],
                 read_host: Callable[[], HostSample] = read_host) -> None:
        self.loop = loop
        self.core = Autopilot(tuning)
        self.vms = vms
        self.read_host = read_host
        self._timer: Timer | None = None
        self._seen: dict[str, float | None] = {}       # stats time last decided on, per VM
        self.last_host: HostSample | None = None

    def enable(self, vm: Vm, floor: int | None, reserve: int | None, ceiling: int | None,
               dry_run: bool) -> dict:
        device = vm.device
        guest = device.guest_pages * PAGE_SIZE if device is not None and device.guest_pages else None
        if guest is None:
            raise RequestError(f"VM {vm.name!r} has no active guest yet: enable the autopilot "
                               "once it is connected")
        default = VmLimits.default(guest)
        limits = VmLimits(floor=default.floor if floor is None else floor,
                          reserve=default.reserve if reserve is None else reserve,
                          ceiling=ceiling, dry_run=dry_run)
        self.core.enable(vm.name, limits)        # keeps the VM's history if it was on
        self._seen.pop(vm.name, None)
        log.info("vm %s: autopilot on (floor %d MiB, reserve %d MiB%s%s)", vm.name,
                 limits.floor >> 20, limits.reserve >> 20,
                 f", ceiling {ceiling >> 20} MiB" if ceiling is not None else "",
                 ", dry run" if dry_run else "")
        self._decide()
        self._arm()
        return self.status(vm.name)

    def disable(self, name: str, why: str = "disabled") -> bool:
        if name not in self.core.vms:
            return False
        self.core.disable(name)
        self._seen.pop(name, None)
        log.info("vm %s: autopilot off (%s)", name, why)
        if not self.core.vms and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return True

    def status(self, name: str) -> dict:
        core = self.core.status(name)
        vm = self.vms().get(name)
        device = vm.device if vm is not None else None
        stats = device.stats.values if device is not None else {}
        return {"name": name, "enabled": core is not None,
                "target_bytes": device.config.num_pages * PAGE_SIZE if device else 0,
                "actual_bytes": device.config.actual * PAGE_SIZE if device else 0,
                **(core or {"floor_bytes": None, "reserve_bytes": None, "ceiling_bytes": None,
                            "dry_run": False, "last_decision": None, "pressure": [],
                            "decided_target_bytes": None}),
                "signals": {k: stats.get(k) for k in ("available_memory", "free_memory",
                                                      "disk_caches", "alloc_stall",
                                                      "direct_reclaim", "major_faults",
                                                      "swap_in", "oom_kill")}}

    # -- the loop side --------------------------------------------------------------------------

    def on_change(self, vm: Vm) -> None:
        """Anything changed on ``vm``: if it brought new statistics, decide on that VM's own
        needs at once (a deflate under pressure); the rest waits for the tick, which looks
        at every VM and the host together."""
        if vm.name in self.core.vms and vm.device is not None:
            if vm.device.stats.updated_monotonic != self._seen.get(vm.name):
                self._decide([vm.name], with_host=False)

    def tick(self) -> None:
        """The timer's callback (only: calling it besides would start a second loop)."""
        self._timer = None
        try:
            for name in list(self.core.vms):
                vm = self.vms().get(name)
                if vm is not None and vm.device is not None and vm.device.state == "active":
                    vm.device.request_stats()
            self._decide()
        finally:
            self._arm()

    def _arm(self) -> None:
        if self.core.vms and (self._timer is None or not self._timer.pending):
            self._timer = self.loop.call_later(self.core.tuning.interval_s, self.tick)

    def _decide(self, names: list[str] | None = None, with_host: bool = True) -> None:
        vms = self.vms()
        for name in [n for n in self.core.vms if n not in vms]:
            self.disable(name, "the VM was removed")
        samples = []
        for name in names if names is not None else list(self.core.vms):
            if name not in vms:
                continue
            device = vms[name].device
            if device is None or device.guest_pages is None or device.state != "active":
                continue
            samples.append(VmSample(
                name, device.guest_pages * PAGE_SIZE, device.config.num_pages * PAGE_SIZE,
                device.config.actual * PAGE_SIZE,
                bool(device.acked_features >> VIRTIO_BALLOON_F_STATS_VQ & 1),
                dict(device.stats.values) if device.stats.updated_monotonic else None,
                device.stats.updated_monotonic))
            self._seen[name] = device.stats.updated_monotonic
        if not samples:
            return
        host = None
        if with_host:
            try:
                host = self.read_host()
            except OSError as exc:
                log.warning("cannot read the host's memory (%s): deciding as if it had room", exc)
                host = HostSample(1 << 62)
            self.last_host = host
        for decision in self.core.decide(time.monotonic(), host, samples):
            self._apply(vms[decision.name], decision)

    def _apply(self, vm: Vm, decision: Decision) -> None:
        limits = self.core.vms[vm.name].limits
        if limits.dry_run:
            log.info("vm %s: autopilot (dry run) would set %d MiB: %s", vm.name,
                     decision.target_bytes >> 20, decision.reason)
            return
        log.info("vm %s: autopilot sets %d MiB: %s", vm.name, decision.target_bytes >> 20,
                 decision.reason)
        vm.device.set_target_bytes(decision.target_bytes)
