"""Section 13: ``serve --keeper`` (issue 12.5): what surviving a ``serve`` crash costs.

A real UML guest (768 MiB, 640 MiB dirtied and freed before each round) under a fresh
``vballoon serve`` with and without ``--keeper``, interleaved: the CPU of the whole process
tree (keeper, serve, zygote, worker) per GiB the guest inflates, then, with the keeper,
SIGKILL to ``serve`` with 64 MiB in the balloon and the time until the new ``serve`` answers
``status`` with the device active and ``actual`` intact; the keeper's PSS.
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.results import Report, fmt
from bench.serve import ServeProcess
from bench.system import descendants, smaps_rollup, tree_cpu_ns
from control.client import ControlClient
from control.errors import ControlError

MIB = 1 << 20
HEADERS = ["serve", "tree CPU per GiB inflated (ms), median", "min", "max",
           "SIGKILL -> serving again (ms), median", "max", "keeper PSS (MiB)", "rounds"]


def _status(serve: ServeProcess) -> dict | None:
    try:
        with serve.client(timeout=2.0) as client:
            return client.request("status")
    except (ControlError, OSError, TimeoutError):
        return None


def _settle(client: ControlClient, size: int) -> None:
    client.request("set", size=size)
    outcome = client.request("wait", timeout=60.0, stall=15.0)["outcome"]
    if outcome != "settled":
        raise RuntimeError(f"set {size >> 20} MiB: {outcome}")


def _run(keep: bool, cpus: set[int], workdir: Path, n: int, rounds: int,
         crashes: int) -> tuple[list[float], list[float], float | None]:
    from guest.uml import GuestConfig, UmlGuest
    serve = ServeProcess(workdir, f"keeper{n}{int(keep)}", jail=True, cpus=cpus,
                         extra_args=("--keeper",) if keep else ())
    serve.start()
    guest = None
    try:
        serve.wait_ready()
        guest = UmlGuest(GuestConfig(mem_mib=768, vhost_socket=serve.socket_path))
        guest.start()
        guest.wait_ready()
        serve.wait_active(timeout=10)
        cpu: list[float] = []
        restarts: list[float] = []
        for _ in range(rounds):
            guest.fill_memory(640)
            guest.free_memory()
            with serve.client(timeout=70) as client:
                before = tree_cpu_ns([serve.pid, *descendants(serve.pid)])
                _settle(client, 512 * MIB)
                after = tree_cpu_ns([serve.pid, *descendants(serve.pid)])
                _settle(client, 0)
            cpu.append((after - before) / 1e6 * 2)           # 512 MiB -> per GiB
        pss = None
        if keep:
            pss = smaps_rollup(serve.pid).get("Pss", 0) / MIB
            for _ in range(crashes):
                with serve.client(timeout=70) as client:
                    _settle(client, 64 * MIB)
                (child,) = [p for p in descendants(serve.pid)
                            if _parent(p) == serve.pid]
                start = time.monotonic()
                os.kill(child, signal.SIGKILL)
                while True:
                    status = _status(serve)
                    if status and status["state"] == "active" \
                            and status["actual_bytes"] == 64 * MIB and status["worker_pid"]:
                        break
                    if time.monotonic() - start > 30:
                        raise RuntimeError("the new serve did not serve again in 30 s")
                    time.sleep(0.002)
                restarts.append(time.monotonic() - start)
                with serve.client(timeout=70) as client:
                    _settle(client, 0)
        return cpu, restarts, pss
    finally:
        if guest is not None:
            guest.stop()
        serve.stop()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def run_keeper(report: Report, cpus: set[int], rounds: int, crashes: int,
               log: Callable[[str], None]) -> None:
    from bench.realguest import guest_available
    table = report.table("13. `serve --keeper`: what surviving a `serve` crash costs (UML)",
                         HEADERS)
    why = guest_available()
    if why is not None:
        table.rows.append(["-", "not run: " + why] + ["-"] * 6)
        return
    table.notes.append(
        f"A fresh serve and UML guest (768 MiB) per mode, modes alternating, on CPUs "
        f"{sorted(cpus)}; {rounds} rounds of 640 MiB dirtied and freed, then 512 MiB "
        "inflated (`set --wait`): CPU of every process of the tree (keeper, serve, zygote, "
        f"worker). Then {crashes} times: SIGKILL to serve with 64 MiB ballooned, timed until "
        "the new serve answers `status` with the device active and `actual` intact.")
    cpu: dict[bool, list[float]] = {True: [], False: []}
    restarts: list[float] = []
    pss: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vballoon-keeper-") as tmp:
        for n, keep in enumerate((False, True, False, True)):
            got, times, size = _run(keep, cpus, Path(tmp), n, rounds, crashes)
            cpu[keep] += got
            restarts += times
            if size is not None:
                pss.append(size)
            log(f"keeper={keep}: {[round(c) for c in got]} ms/GiB"
                + (f", restart {[round(t * 1000) for t in times]} ms" if keep else ""))
    for keep in (False, True):
        values = cpu[keep]
        ms = [t * 1000 for t in restarts]
        table.rows.append(["--keeper" if keep else "plain", fmt(statistics.median(values), 0),
                           fmt(min(values), 0), fmt(max(values), 0),
                           fmt(statistics.median(ms), 0) if keep else "-",
                           fmt(max(ms), 0) if keep else "-",
                           fmt(statistics.median(pss), 1) if keep else "-", str(len(values))])
    report.add("keeper_cpu_ratio", statistics.median(cpu[True]) / statistics.median(cpu[False]),
               "ratio", runs=len(cpu[True]))
    report.add("keeper_restart", statistics.median(restarts) * 1000, "ms", runs=len(restarts))
