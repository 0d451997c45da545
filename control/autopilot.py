"""Autopilot: balloon targets decided from the guests' statistics and the host's memory.

Sans-I/O: an ``Autopilot`` is fed observations (``VmSample`` per VM, ``HostSample``) and
returns ``Decision``s (a new target and the reason, in words). The server feeds it and
applies what it decides; the property tests feed it a simulated guest.

The rules, in order (numbers are ``Tuning``'s defaults; sizes per VM are ``VmLimits``):

1. **Never starve.** A guest shows pressure when, since its previous statistics, its OOM
   kills, allocation stalls, direct reclaim, direct scans or swap-ins went up, its major
   faults rose faster than ``majflt_per_s``, its available memory is under its ``reserve``,
   or it falls fast enough (balloon growth aside) to be under it within ``horizon_s``. It
   is deflated at once (on the statistics that show it): by what it lacks (or will lack)
   below ``reserve`` plus half a reserve, and by at least half the balloon for a hard signal
   (OOM kill, stall, direct reclaim). It is not inflated again for ``calm_s`` seconds.
2. **Reclaim idle memory.** Memory a guest has had available beyond ``reserve + margin`` for
   ``idle_s`` seconds is taken back ``step`` at a time (at most one step per
   ``interval_s``, and the next only once the guest gave the last and newer statistics
   show it), never past its ``ceiling``, never leaving it less than its ``floor``.
3. **Host-aware.** When the host is short (MemAvailable under ``host_min_available``,
   memory PSI "some" avg10 above ``host_psi``, or the guests together holding more than the
   host budget), idle memory is reclaimed at once and in steps of ``host_step``, from the
   guests with the most of it first, and never from a guest under pressure. When the host
   has room, a guest near its reserve gets memory back (``step`` at a time).
4. **Stable.** Inflating stops ``margin`` above the reserve and giving back starts only at
   ``margin / 2`` above it, so a steady load settles between the two; inflate steps are rate
   limited; after a deflate, no inflate for ``calm_s``.

A guest without the statistics queue is never inflated by the autopilot; one whose
statistics are older than ``stale_s`` is held where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1 << 20
HARD_SIGNALS = ("oom_kill", "alloc_stall", "direct_reclaim")
RISING_SIGNALS = ("oom_kill", "alloc_stall", "direct_reclaim", "direct_scan", "swap_in")


@dataclass(frozen=True)
class Tuning:
    """The numbers the rules use (see the module docstring)."""

    margin: int = 32 * MIB
    step: int = 64 * MIB
    host_step: int = 256 * MIB
    idle_s: float = 10.0
    interval_s: float = 0.5
    calm_s: float = 30.0
    stale_s: float = 5.0
    majflt_per_s: float = 100.0
    horizon_s: float = 2.0          # a falling available memory is projected this far ahead
    host_min_available: int = 512 * MIB
    host_psi: float = 10.0          # % of time some task stalled on memory (avg10)
    host_budget: int | None = None  # bytes all guests together may hold


@dataclass(frozen=True)
class VmLimits:
    """A VM's bounds: the balloon never leaves it under ``floor`` bytes, never grows past
    ``ceiling`` (None: guest memory minus floor), and inflating stops ``reserve`` bytes of
    available memory short."""

    floor: int
    reserve: int
    ceiling: int | None = None
    dry_run: bool = False

    @staticmethod
    def default(guest_bytes: int) -> "VmLimits":
        return VmLimits(floor=max(64 * MIB, guest_bytes // 4),
                        reserve=max(32 * MIB, guest_bytes // 8))


@dataclass(frozen=True)
class VmSample:
    """What is known of one VM now."""

    name: str
    guest_bytes: int
    target_bytes: int
    actual_bytes: int
    has_stats_queue: bool
    stats: dict[str, int] | None      # the latest values, by Firecracker's names
    stats_updated: float | None       # monotonic time they arrived


@dataclass(frozen=True)
class HostSample:
    available_bytes: int
    psi_some_avg10: float = 0.0


@dataclass(frozen=True)
class Decision:
    name: str
    target_bytes: int
    reason: str


@dataclass
class _VmState:
    limits: VmLimits
    last_stats: dict[str, int] | None = None
    last_stats_at: float | None = None
    last_actual: int = 0
    projected: int | None = None      # available memory ``horizon_s`` ahead at today's trend
    idle_since: float | None = None
    calm_until: float = 0.0
    last_inflate: float = -1e9
    pressure: list[str] = field(default_factory=list)
    last_decision: str = "enabled: waiting for statistics"
    last_target: int | None = None


class Autopilot:
    """Decides targets for the VMs it is enabled on. Feed it with ``decide``."""

    def __init__(self, tuning: Tuning = Tuning()) -> None:
        self.tuning = tuning
        self.vms: dict[str, _VmState] = {}

    def enable(self, name: str, limits: VmLimits) -> None:
        """Put ``name`` under autopilot, or change its limits (its history is kept: a calm
        period after pressure is not cut short by enabling it again)."""
        state = self.vms.get(name)
        if state is None:
            self.vms[name] = _VmState(limits)
        else:
            state.limits = limits

    def disable(self, name: str) -> None:
        self.vms.pop(name, None)

    def status(self, name: str) -> dict | None:
        state = self.vms.get(name)
        if state is None:
            return None
        return {"floor_bytes": state.limits.floor, "reserve_bytes": state.limits.reserve,
                "ceiling_bytes": state.limits.ceiling, "dry_run": state.limits.dry_run,
                "last_decision": state.last_decision, "pressure": list(state.pressure),
                "decided_target_bytes": state.last_target}

    def decide(self, now: float, host: HostSample | None, samples: list[VmSample]) -> list[Decision]:
        """Decisions for ``samples`` (the enabled VMs among them). ``host`` None: only the
        guests' own needs are looked at (a deflate for one under pressure, nothing else):
        what fresh statistics of one VM are decided on at once, without the others."""
        enabled = [s for s in samples if s.name in self.vms]
        decisions: dict[str, Decision] = {}
        idle: dict[str, int] = {}
        short = self._host_short(host, enabled) if host is not None else None
        for sample in enabled:
            state = self.vms[sample.name]
            decision, spare = self._one(now, sample, state,
                                        host_has_room=host is not None and short is None)
            if decision is not None:
                decisions[sample.name] = decision
            elif spare > 0:
                idle[sample.name] = spare
        by_name = {sample.name: sample for sample in enabled}
        if host is not None and short:
            decisions.update(self._reclaim_for_host(short, idle, by_name))
        elif host is not None:
            decisions.update(self._reclaim_idle(now, idle, by_name))
        for decision in decisions.values():
            state = self.vms[decision.name]
            if decision.target_bytes > by_name[decision.name].target_bytes:
                state.last_inflate = now
            state.last_decision = decision.reason
            state.last_target = decision.target_bytes
        return list(decisions.values())

    def _reclaim_for_host(self, short: tuple[str, int], idle: dict[str, int],
                          samples: dict[str, VmSample]) -> dict[str, Decision]:
        """The host is short: idle memory at once, in big steps, the idlest guests first."""
        t = self.tuning
        decisions = {}
        need = max(short[1], t.host_step)
        for name in sorted(idle, key=lambda n: -idle[n]):
            if need <= 0:
                break
            sample = samples[name]
            take = min(idle[name], t.host_step, need)
            target = self._bounded(sample, self.vms[name], sample.target_bytes + take)
            if target > sample.target_bytes:
                need -= target - sample.target_bytes
                decisions[name] = Decision(name, target, f"host short ({short[0]}): taking "
                                           f"{(target - sample.target_bytes) >> 20} MiB of "
                                           f"{idle[name] >> 20} MiB idle")
        return decisions

    def _reclaim_idle(self, now: float, idle: dict[str, int],
                      samples: dict[str, VmSample]) -> dict[str, Decision]:
        """Memory idle for ``idle_s``, a step at a time, at most a step per ``interval_s``."""
        t = self.tuning
        decisions = {}
        for name, spare in idle.items():
            sample, state = samples[name], self.vms[name]
            if state.idle_since is None or now - state.idle_since < t.idle_s \
                    or now - state.last_inflate < t.interval_s:
                continue
            target = self._bounded(sample, state, sample.target_bytes + min(spare, t.step))
            if target > sample.target_bytes:
                decisions[name] = Decision(name, target, f"idle for {now - state.idle_since:.0f} s: "
                                           f"taking {(target - sample.target_bytes) >> 20} MiB "
                                           f"of {spare >> 20} MiB spare")
        return decisions

    # -- one VM ----------------------------------------------------------------------------------

    def _one(self, now: float, sample: VmSample, state: _VmState,
             host_has_room: bool) -> tuple[Decision | None, int]:
        """A deflate decision if the guest needs memory (or gets some back), else None with
        how many bytes it could give (0: none, or not now)."""
        t = self.tuning
        if not sample.has_stats_queue:
            state.last_decision = "no statistics queue: never inflated automatically"
            return None, 0
        if sample.stats is None or sample.stats_updated is None:
            state.last_decision = "waiting for the guest's statistics"
            return None, 0
        if now - sample.stats_updated > t.stale_s:
            state.last_decision = f"statistics {now - sample.stats_updated:.0f} s old: holding"
            state.idle_since = None
            return None, 0
        fresh = state.last_stats_at != sample.stats_updated
        if fresh:
            state.pressure = self._pressure(sample, state)
            state.last_stats, state.last_stats_at = dict(sample.stats), sample.stats_updated
            state.last_actual = sample.actual_bytes
        available = sample.stats.get("available_memory")
        if available is None:
            state.last_decision = "the guest does not report available memory: holding"
            return None, 0
        reserve = state.limits.reserve
        balloon = min(sample.target_bytes, sample.actual_bytes)
        if state.pressure and fresh:
            state.calm_until = now + t.calm_s
            state.idle_since = None
            give = max(reserve - available, 0) + reserve // 2
            if state.projected is not None:
                give = max(give, reserve - state.projected + reserve // 2)
            if any(s in HARD_SIGNALS for s in state.pressure):
                give = max(give, balloon // 2)
            target = max(0, balloon - give)
            if target < sample.target_bytes:
                return Decision(sample.name, target, "guest under pressure ("
                                + ", ".join(state.pressure) + "): giving back "
                                f"{(sample.target_bytes - target) >> 20} MiB"), 0
            state.last_decision = "guest under pressure (" + ", ".join(state.pressure) + \
                "): the balloon is empty"
            return None, 0
        if state.pressure:
            return None, 0                      # no new statistics since: wait for them
        # What an inflate already asked for but the guest has not given yet is not spare.
        spare = available - reserve - t.margin - max(0, sample.target_bytes - sample.actual_bytes)
        if spare <= 0:
            state.idle_since = None
            if host_has_room and available < reserve + t.margin // 2 and balloon > 0:
                # Near its reserve without pressure yet: give a step back (hysteresis band).
                target = max(0, balloon - t.step)
                return Decision(sample.name, target, f"near its reserve ({available >> 20} MiB "
                                f"available): giving back {(sample.target_bytes - target) >> 20} "
                                "MiB"), 0
            return None, 0
        if now < state.calm_until:
            state.last_decision = f"calm after pressure for {state.calm_until - now:.0f} s more"
            return None, 0
        if state.idle_since is None:
            state.idle_since = now
        if sample.actual_bytes < sample.target_bytes or sample.stats_updated <= state.last_inflate:
            return None, 0      # the last inflate is not done, or not yet seen in the stats
        return None, spare

    def _pressure(self, sample: VmSample, state: _VmState) -> list[str]:
        signals = []
        now_stats, before = sample.stats or {}, state.last_stats or {}
        for name in RISING_SIGNALS:
            if name in now_stats and name in before and now_stats[name] > before[name]:
                signals.append(name)
        if state.last_stats_at is not None and "major_faults" in now_stats and "major_faults" in before:
            elapsed = max(1e-3, (sample.stats_updated or 0) - state.last_stats_at)
            if (now_stats["major_faults"] - before["major_faults"]) / elapsed > self.tuning.majflt_per_s:
                signals.append("major_faults")
        available = now_stats.get("available_memory")
        if available is not None and available < state.limits.reserve:
            signals.append("available below reserve")
        # Falling fast (not because the balloon grew): act before it is gone.
        state.projected = None
        before_available = before.get("available_memory")
        if available is not None and before_available is not None and state.last_stats_at is not None:
            elapsed = max(1e-3, (sample.stats_updated or 0) - state.last_stats_at)
            grew = max(0, sample.actual_bytes - state.last_actual)
            rate = (before_available - available - grew) / elapsed
            projected = available - int(rate * self.tuning.horizon_s)
            if rate > 0 and projected < state.limits.reserve:
                state.projected = projected
                signals.append(f"available falling {rate / MIB:.0f} MiB/s")
        return signals

    def _bounded(self, sample: VmSample, state: _VmState, target: int) -> int:
        limits = state.limits
        ceiling = sample.guest_bytes - limits.floor
        if limits.ceiling is not None:
            ceiling = min(ceiling, limits.ceiling)
        return max(0, min(target, ceiling))

    def _host_short(self, host: HostSample, samples: list[VmSample]) -> tuple[str, int] | None:
        t = self.tuning
        if host.available_bytes < t.host_min_available:
            return ("MemAvailable " + f"{host.available_bytes >> 20} MiB",
                    t.host_min_available - host.available_bytes)
        if host.psi_some_avg10 > t.host_psi:
            return f"memory PSI {host.psi_some_avg10:.1f} %", t.host_step
        if t.host_budget is not None:
            held = sum(s.guest_bytes - s.target_bytes for s in samples)
            if held > t.host_budget:
                return f"guests hold {held >> 20} MiB of a {t.host_budget >> 20} MiB budget", \
                    held - t.host_budget
        return None


def read_host(meminfo: str = "/proc/meminfo", psi: str = "/proc/pressure/memory") -> HostSample:
    """The host's MemAvailable and memory PSI (0 where the kernel has no PSI)."""
    available = 0
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    pressure = 0.0
    try:
        with open(psi) as f:
            for line in f:
                if line.startswith("some"):
                    pressure = float(line.split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return HostSample(available, pressure)

