"""Section 9: the autopilot against the alternatives, on the same scripted workload (issue 13.4).

N UML guests of 256 MiB behind one ``serve --vm ...``. Each guest's memory is dirtied first
(so the host backs all of it, as a long-running guest's would), then each runs the same
script: idle, an allocation spike of 160 MiB (16 MiB every 0.25 s) at a staggered time,
held, then freed. The script is replayed under five policies:

- **no balloon**;
- **free page reporting only** (``--free-page-reporting``, no target);
- **static balloon**: every guest held at 96 MiB of balloon from the start;
- **host headroom** (what Proxmox does): every second, if the guests together hold more
  than the host budget, every balloon grows by a step (down to the guest's floor), and if
  they hold under 90 % of it, every balloon shrinks by a step, whatever the guests need;
- **autopilot** (``vballoon autopilot enable`` on each with the default floor and reserve,
  ``serve --host-budget``, with free page reporting and deflate-on-oom on, as it would be
  deployed).

Measured per policy, from the host and from the guests' own statistics: host memory
reclaimed over time (GiB·s: Σ over guests of guest memory minus what the host backs,
integrated) against the ideal (Σ of the guests' available memory in the no-balloon run),
guest pressure (allocation stalls + direct reclaim, OOM kills), the time from each spike to
its guest's balloon shrinking, and target direction changes. One plot per policy.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.many_vms import stop_all
from bench.results import Report, fmt
from bench.serve import ServeProcess
from bench.system import GIB, MIB, pinned
from guest.uml import GuestConfig, UmlGuest

GUEST_MIB = 256
FLOOR = 64 * MIB               # the host-headroom rule's minimum, as the autopilot's default floor
STATIC = 96 * MIB
SPIKE_MIB = 160
STEP = 32 * MIB
POLICIES = ("no balloon", "free page reporting", "static balloon", "host headroom", "autopilot")
HEADERS = ["policy", "reclaimed GiB·s", "of ideal", "stalls + direct reclaim", "OOM kills",
           "spike to deflate s (median)", "direction changes"]


def run_eval(report: Report, guests: int, seconds: float, cpus: set[int], out: Path,
             log: Callable[[str], None]) -> None:
    table = report.table(f"9. Autopilot vs the alternatives ({guests} UML guests of "
                         f"{GUEST_MIB} MiB, {seconds:g} s script)", HEADERS)
    budget = int(guests * GUEST_MIB * MIB * 0.7)
    table.notes.append(
        f"Host budget {budget // MIB} MiB for {guests * GUEST_MIB} MiB of guests (forces "
        f"overcommit). Each guest: idle, then {SPIKE_MIB} MiB allocated at "
        f"{_spike_at(0, seconds):.0f} s + i x {_spike_gap(seconds):.0f} s, held "
        f"{_hold(seconds):.0f} s, freed. Reclaimed = guest memory minus the host memory "
        "backing it (the RAM file's blocks), summed over guests and integrated; ideal = the "
        "guests' available memory in the no-balloon run, integrated. Pressure from the "
        "guests' own counters (deltas over the run). Plots: autopilot-<policy>.png.")
    runs = {}
    for policy in POLICIES:
        try:
            runs[policy] = _run(policy, guests, seconds, budget, cpus, log)
        except Exception as exc:          # noqa: BLE001 - a failed policy is a row saying so
            log(f"autopilot eval, {policy}: {exc}")
            table.rows.append([policy, f"failed: {exc}"] + ["-"] * (len(HEADERS) - 2))
    ideal = runs.get("no balloon", {}).get("available_gibs")
    for policy, run in runs.items():
        share = run["reclaimed_gibs"] / ideal if ideal else None
        table.rows.append([policy, fmt(run["reclaimed_gibs"], 2),
                           "-" if share is None else f"{share:.0%}", str(run["pressure"]),
                           str(run["oom"]) + (f" ({run['hung']} guest(s) hung or died)"
                                              if run["hung"] else ""),
                           fmt(run["spike_to_deflate"], 2),
                           str(run["direction_changes"])])
        cond = dict(policy=policy, guests=guests, seconds=seconds, runs=1)
        report.add("autopilot_eval_reclaimed", run["reclaimed_gibs"], "GiB*s", **cond)
        report.add("autopilot_eval_reclaimed_share", share, "ratio", **cond)
        report.add("autopilot_eval_pressure", run["pressure"], "events", **cond)
        report.add("autopilot_eval_oom", run["oom"], "kills", **cond)
        _plot(run, policy, out / f"autopilot-{policy.replace(' ', '-')}.png")
    _goals(report, runs, ideal)


def _spike_at(i: int, seconds: float) -> float:
    return seconds * 0.25 + i * _spike_gap(seconds)


def _spike_gap(seconds: float) -> float:
    return seconds * 0.12


def _hold(seconds: float) -> float:
    return seconds * 0.1


def _run(policy: str, count: int, seconds: float, budget: int, cpus: set[int],
         log: Callable[[str], None]) -> dict:
    names = tuple(f"g{i}" for i in range(count))
    extra = ("--stats-interval", "0.5")
    if policy == "free page reporting":
        extra += ("--free-page-reporting",)
    if policy == "autopilot":
        # As it would be deployed: reporting returns what a guest frees at once, the
        # autopilot bounds what it holds (and keeps the host inside its budget), and
        # deflate-on-oom lets a guest take pages back itself as a last resort.
        extra += ("--host-budget", str(budget), "--free-page-reporting", "--deflate-on-oom")
    with tempfile.TemporaryDirectory(prefix="vb-pilot-") as tmp:
        serve = ServeProcess(Path(tmp), "pilot", jail=True, cpus=cpus, vms=names, extra_args=extra)
        guests: list[UmlGuest] = []
        try:
            serve.start()
            serve.wait_ready()
            with pinned(cpus):
                for name in names:
                    guest = UmlGuest(GuestConfig(mem_mib=GUEST_MIB, vhost_socket=serve.vm_socket(name)))
                    guests.append(guest)
                    guest.start()
            for guest in guests:
                guest.wait_ready()
                guest.fill_memory(GUEST_MIB * 3 // 4)       # the host backs it all, as it
                guest.free_memory()                         # would a long-running guest's
            with serve.client(timeout=30) as client:
                _until(lambda: all(vm["state"] == "active" for vm in client.request("list")["vms"]))
                start_counters = {n: _counters(client, n) for n in names}
                if policy == "static balloon":
                    client.request("set", targets={n: STATIC for n in names})
                if policy == "autopilot":
                    for name in names:
                        client.request("autopilot", action="enable", vm=name)
                for i, guest in enumerate(guests):
                    guest.run(_script(i, seconds))
                trace = _observe(client, guests, names, seconds, policy, budget)
                end_counters = {n: _counters(client, n) for n in names}
            logged = [_oom_logged(g) for g in guests]
        finally:
            stop_all(guests, serve)
    log(f"autopilot eval, {policy}: reclaimed {trace['reclaimed_gibs']:.2f} GiB*s")
    # A guest that died reports nothing at the end: no negative deltas.
    pressure = sum(max(0, end_counters[n][k] - start_counters[n][k]) for n in names
                   for k in ("alloc_stall", "direct_reclaim"))
    counted = sum(max(0, end_counters[n]["oom_kill"] - start_counters[n]["oom_kill"])
                  for n in names)
    hung = max(sum(1 for n in logged if n is None), trace["dead"])
    oom = max(counted, sum(n or 0 for n in logged)) + hung
    spikes = [_spike_at(i, seconds) for i in range(count)]
    return {**trace, "pressure": pressure, "oom": oom, "hung": hung,
            "spike_to_deflate": _spike_to_deflate(trace, names, spikes),
            "direction_changes": sum(_flips(trace["targets"][n]) for n in names)}


def _oom_logged(guest: UmlGuest) -> int | None:
    """OOM kills in the guest's kernel log; None if the guest no longer answers (counted as
    one: a guest out of memory with its shell gone)."""
    try:
        return int(guest.run("dmesg | grep -c 'Out of memory' || true", timeout=20).strip() or 0)
    except Exception:                       # noqa: BLE001 - a hung guest is the result here
        return None


def _script(i: int, seconds: float) -> str:
    chunks = SPIKE_MIB // 16
    return (f"(sleep {_spike_at(i, seconds):.1f}; for k in $(seq {chunks}); do "
            f"dd if=/dev/zero of=/tmp/spike.$k bs=1M count=16; sleep 0.25; done; "
            f"sleep {_hold(seconds):.1f}; rm -f /tmp/spike.*) >/dev/null 2>&1 &")


def _counters(client, name: str) -> dict[str, int]:
    stats = client.request("stats", vm=name)
    return {k: stats.get(k) or 0 for k in ("alloc_stall", "direct_reclaim", "oom_kill")}


def _until(test, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            raise TimeoutError("not in time")
        time.sleep(0.05)


def _observe(client, guests, names, seconds: float, policy: str, budget: int) -> dict:
    """Sample every 0.5 s (and run the host-headroom rule every second)."""
    start = time.monotonic()
    times, reclaimed, available = [], {n: [] for n in names}, {n: [] for n in names}
    targets = {n: [] for n in names}
    pressure = {n: [] for n in names}       # stalls + direct reclaim + OOM kills so far
    dead: set[str] = set()
    last_rule = 0.0
    guest_bytes = GUEST_MIB * MIB
    while (now := time.monotonic() - start) < seconds:
        vms = {vm["name"]: vm for vm in client.request("list")["vms"]}
        times.append(now)
        for name, guest in zip(names, guests):
            try:
                backed = guest.host_ram_bytes()
            except Exception:                 # noqa: BLE001 - the guest died: that is a result
                dead.add(name)
                backed = guest_bytes          # a dead guest saves nothing worth counting
            reclaimed[name].append(max(0, guest_bytes - backed))
            stats = client.request("stats", vm=name)
            available[name].append(stats.get("available_memory") or 0)
            pressure[name].append(sum(stats.get(k) or 0 for k in
                                      ("alloc_stall", "direct_reclaim", "oom_kill")))
            targets[name].append(vms[name]["target_bytes"])
        if policy == "host headroom" and now - last_rule >= 1.0:
            last_rule = now
            held = sum(guest_bytes - vms[n]["target_bytes"] for n in names)
            delta = STEP if held > budget else (-STEP if held < 0.9 * budget else 0)
            live = [n for n in names if vms[n]["state"] == "active"]   # a dead guest is gone
            if delta and live:
                client.request("set", targets={
                    n: max(0, min(guest_bytes - FLOOR, vms[n]["target_bytes"] + delta))
                    for n in live})
        time.sleep(max(0.0, 0.5 - (time.monotonic() - start - now)))
    dt = [b - a for a, b in zip(times, times[1:])] + [0.5]
    gibs = sum(sum(r[k] for r in reclaimed.values()) * dt[k] for k in range(len(times))) / GIB
    avail = sum(sum(a[k] for a in available.values()) * dt[k] for k in range(len(times))) / GIB
    return {"times": times, "reclaimed": reclaimed, "available": available, "targets": targets,
            "pressure_series": pressure, "reclaimed_gibs": gibs, "available_gibs": avail,
            "dead": len(dead)}


def _spike_to_deflate(trace: dict, names, spikes: list[float]) -> float | None:
    delays = []
    for name, at in zip(names, spikes):
        series = list(zip(trace["times"], trace["targets"][name]))
        before = next((t for time_, t in series if time_ >= at), None)
        if before is None or before == 0:
            continue
        shrunk = next((time_ for time_, t in series if time_ >= at and t < before), None)
        if shrunk is not None:
            delays.append(shrunk - at)
    return statistics.median(delays) if delays else None


def _flips(series: list[int]) -> int:
    changes = [b - a for a, b in zip(series, series[1:]) if b != a]
    return sum(1 for a, b in zip(changes, changes[1:]) if (a > 0) != (b > 0))


def _plot(run: dict, policy: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in run["targets"]:
        line, = ax.plot(run["times"], [v / MIB for v in run["reclaimed"][name]],
                        label=f"{name}: host memory reclaimed")
        ax.plot(run["times"], [v / MIB for v in run["targets"][name]], linestyle="--",
                color=line.get_color(), label=f"{name}: balloon target")
        ax.plot(run["times"], [v / MIB for v in run["available"][name]], linestyle=":",
                color=line.get_color(), alpha=0.6, label=f"{name}: guest available")
        series = run["pressure_series"][name]
        events = [k for k in range(1, len(series)) if series[k] > series[k - 1]]
        if events:
            ax.scatter([run["times"][k] for k in events],
                       [run["available"][name][k] / MIB for k in events], marker="x",
                       color="red", zorder=3, label=f"{name}: pressure (stall/reclaim/OOM)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(f"{policy}: pressure events {run['pressure']}, OOM kills {run['oom']}")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _goals(report: Report, runs: dict, ideal: float | None) -> None:
    pilot, none, headroom = runs.get("autopilot"), runs.get("no balloon"), runs.get("host headroom")
    if not pilot or not ideal:
        report.goal("autopilot reclaims >= 80 % of the ideal, zero OOM kills", "not measured", None)
        return
    share = pilot["reclaimed_gibs"] / ideal
    report.goal("autopilot reclaims >= 80 % of the ideal with zero OOM kills",
                f"{share:.0%}, {pilot['oom']} OOM kills", share >= 0.8 and pilot["oom"] == 0)
    if none:
        base = none["pressure"]
        report.goal("autopilot pressure no worse than 5 % above no balloon",
                    f"{pilot['pressure']} vs {base} events",
                    pilot["pressure"] <= base * 1.05 + 1)
    if headroom:
        report.goal("autopilot beats the host-headroom rule on memory and on pressure",
                    f"{pilot['reclaimed_gibs']:.2f} vs {headroom['reclaimed_gibs']:.2f} GiB·s, "
                    f"{pilot['pressure']} vs {headroom['pressure']} pressure events, "
                    f"{pilot['oom']} vs {headroom['oom']} OOM kills",
                    pilot["reclaimed_gibs"] > headroom["reclaimed_gibs"]
                    and pilot["pressure"] + pilot["oom"] <= headroom["pressure"] + headroom["oom"])
