"""Start-up: ``vballoon serve`` to a control socket that answers, and device activation.

Activation is ``ProxyBalloon.activate()`` over a fake guest: for the jailed mode that is
fork, jail, seccomp and the worker's "activate" reply, after which the queues are served.
"First buffer" adds one 256-PFN inflate buffer's round trip through the fresh worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.results import Report, fmt
from bench.serve import ServeError, ServeProcess
from bench.system import MIB, Budget, median, p95
from bench.throughput import ModeUnavailable, start_rig
from device.balloon import INFLATE_QUEUE
from tests.driver import GuestRam

REPO_ROOT = Path(__file__).resolve().parent.parent

ACTIVATION_MODES = ("in-process", "thread", "jailed")


def run_activation(report: Report, runs: int, placement: str, budget: Budget,
                   log: Callable[[str], None]) -> None:
    table = report.table("3. Start-up",
                         ["what", "mode", "median ms", "p95 ms", "max ms", "runs"])
    ram = GuestRam(64 * MIB, "bench-activation")
    times: dict[str, dict[str, list[float]]] = {m: {"activate": [], "first": [], "reset": []}
                                                for m in ACTIVATION_MODES}
    unavailable: dict[str, str] = {}
    pfns = list(range(ram.size // 4096 - 1, ram.size // 4096 - 257, -1))
    try:
        # One untimed activation per mode first: the first jailed worker of a process also
        # parses and compiles the seccomp policy (cached after; the cold case is timed on its
        # own below, in fresh processes).
        for mode in ACTIVATION_MODES:
            try:
                start_rig(ram, mode).close()
            except ModeUnavailable as exc:
                unavailable[mode] = str(exc)
        for i in range(runs):
            if i >= 5 and budget.left() < 0:
                table.notes.append(f"activation: stopped after {i} runs (time budget)")
                break
            for mode in ACTIVATION_MODES:
                if mode in unavailable:
                    continue
                start = time.perf_counter()
                try:
                    rig = start_rig(ram, mode)
                except ModeUnavailable as exc:
                    unavailable[mode] = str(exc)
                    continue
                activated = time.perf_counter()
                try:
                    rig.driver.send_pfns(INFLATE_QUEUE, pfns, 1)
                    first = time.perf_counter()
                finally:
                    stop = time.perf_counter()
                    rig.close()
                    stopped = time.perf_counter()
                t = times[mode]
                t["activate"].append((activated - start) * 1e3)
                t["first"].append((first - start) * 1e3)
                t["reset"].append((stopped - stop) * 1e3)
    finally:
        ram.close()
    labels = {"activate": "activate() returns (worker serving queues)",
              "first": "activate() + first inflate buffer returned",
              "reset": "reset() (graceful stop of the worker)"}
    for what, label in labels.items():
        for mode in ACTIVATION_MODES:
            if mode in unavailable:
                if what == "activate":
                    table.rows.append([label, mode, f"skipped: {unavailable[mode]}", "-", "-", "0"])
                    report.add("activation", None, "ms", mode=mode, placement=placement, runs=0,
                               note=f"skipped: {unavailable[mode]}")
                continue
            values = times[mode][what]
            if not values:
                continue
            table.rows.append([label, mode, fmt(median(values), 2), fmt(p95(values), 2),
                               fmt(max(values), 2), str(len(values))])
            name = {"activate": "activation", "first": "activation_to_first_buffer",
                    "reset": "reset"}[what]
            report.add(name, median(values), "ms", mode=mode, placement=placement,
                       runs=len(values), statistic="median")
            report.add(name + "_p95", p95(values), "ms", mode=mode, placement=placement,
                       runs=len(values), statistic="p95")
    cold = _cold_activation_ms(min(runs, 5)) if "jailed" not in unavailable else []
    if cold:
        table.rows.append(["first jailed activate() in a fresh process (cold)", "jailed",
                           fmt(median(cold), 2), fmt(p95(cold), 2), fmt(max(cold), 2),
                           str(len(cold))])
        report.add("activation_cold", median(cold), "ms", mode="jailed", placement=placement,
                   runs=len(cold), statistic="median")
    policy = _policy_parse_ms(runs)
    if policy:
        table.rows.append(["parse the seccomp policy file (first jailed worker only)",
                           "jailed", fmt(median(policy), 2), fmt(p95(policy), 2),
                           fmt(max(policy), 2), str(len(policy))])
        report.add("seccomp_policy_parse", median(policy), "ms", mode="jailed",
                   placement=placement, runs=len(policy), statistic="median")
    table.notes.append(f"Activation over a 64 MiB memfd guest with the fake driver, after one "
                       f"untimed warm-up per mode; pinned: {placement}. In-process: mmap and "
                       "queue set-up only, for reference.")
    if cold:
        bytecode = ("PYTHONDONTWRITEBYTECODE is set here, so those imports compile from source"
                    if os.environ.get("PYTHONDONTWRITEBYTECODE") else "bytecode caches allowed")
        table.notes.append("Cold: the first activation in a fresh process (`python -m "
                           "bench.startup --cold`), as a guest's first connection meets it in "
                           "`serve`: it imports the jail (control.jailed, sandbox) on first use "
                           f"and compiles the policy ({bytecode}).")
    jailed = times["jailed"]["activate"]
    if jailed:
        measured = f"warm: median {median(jailed):.1f} ms, p95 {p95(jailed):.1f} ms"
        met = median(jailed) < 20
        if cold:
            # A guest's first connection meets a cold `serve`: that is the one it waits for.
            measured += (f"; first in a fresh process: {median(cold):.1f} ms (lazy imports and "
                         "the policy compiled on first use)")
            met = met and median(cold) < 20
        report.goal("activation of a jailed worker < 20 ms", measured, met)
    else:
        thread = times["thread"]["activate"]
        report.goal("activation of a jailed worker < 20 ms",
                    "jailed mode not available" + (f" (thread worker: {median(thread):.1f} ms)"
                                                   if thread else ""), None)


def run_serve_startup(report: Report, runs: int, cpus: set[int], placement: str,
                      budget: Budget, log: Callable[[str], None]) -> None:
    """``vballoon serve`` from exec to a control socket that answers ``status``."""
    table = next(t for t in report.tables if t.title.startswith("3."))
    values: list[float] = []
    error = None
    with tempfile.TemporaryDirectory(prefix="vballoon-bench-") as tmp:
        for i in range(runs):
            if i >= 3 and budget.left() < 0:
                break
            serve = ServeProcess(Path(tmp), f"startup{i}", jail=True, cpus=cpus)
            try:
                serve.start()
                values.append(serve.wait_ready() * 1e3)
            except ServeError as exc:
                error = str(exc)
                break
            finally:
                serve.stop()
    label = "`vballoon serve` exec to control socket answering"
    if values:
        table.rows.append([label, "(any)", fmt(median(values), 1), fmt(p95(values), 1),
                           fmt(max(values), 1), str(len(values))])
        report.add("serve_start_to_ready", median(values), "ms", placement=placement,
                   runs=len(values), statistic="median")
        report.add("serve_start_to_ready_p95", p95(values), "ms", placement=placement,
                   runs=len(values), statistic="p95")
    else:
        table.rows.append([label, "(any)", f"failed: {error}", "-", "-", "0"])
        report.add("serve_start_to_ready", None, "ms", placement=placement, runs=0, note=error)
    table.notes.append("Serve start-up is mostly the Python interpreter and imports; the "
                       "worker is forked only when a guest activates the device.")


def _policy_parse_ms(runs: int) -> list[float]:
    """How long reading the worker's policy file takes (``control.jailed`` caches it)."""
    try:
        from control.workers import SECCOMP_POLICY
        from sandbox.policy import Policy
    except ImportError:
        return []
    values = []
    for _ in range(runs):
        start = time.perf_counter()
        Policy.from_file(SECCOMP_POLICY)
        values.append((time.perf_counter() - start) * 1e3)
    return values


def _cold_activation_ms(runs: int) -> list[float]:
    """The first jailed activation of a process, each in a fresh ``python -m bench.startup``."""
    values = []
    for _ in range(runs):
        try:
            out = subprocess.run([sys.executable, "-m", "bench.startup", "--cold"],
                                 cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            break
        if out.returncode != 0:
            break
        values.append(float(out.stdout.split()[-1]))
    return values


def _cold_main() -> None:
    ram = GuestRam(64 * MIB, "bench-cold")
    try:
        start = time.perf_counter()
        rig = start_rig(ram, "jailed")
        elapsed = (time.perf_counter() - start) * 1e3
        rig.close()
    finally:
        ram.close()
    print(f"{elapsed:.3f}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--cold"]:
        _cold_main()
