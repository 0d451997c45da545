"""A real guest: User-Mode Linux inflating and deflating its balloon through ``vballoon serve``.

A ``GuestRig`` is ``vballoon serve`` (a subprocess, jailed or ``--no-jail``) and a UML guest
connected to it, each placed on a CPU before its first instruction. One measured run:

    fill the guest's memory (the pages the balloon will take must be backed on the host),
    free it, then: set SIZE, wait until actual == target   -> inflate time
                   set 0,    wait until actual == 0         -> deflate time

with the CPU time of the worker, of the server (the parent) and of the guest (UML's whole
process group) read around each half. Runs of the two modes are interleaved, one guest per
mode alive side by side, so both see the same machine.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.footprint import add_row
from bench.results import Report, fmt
from bench.serve import ServeError, ServeProcess
from bench.system import (MIB, Budget, CpuReading, descendants, footprint, median, pinned,
                          process_cpu_ns, process_name, sys_ns, task_cpu_ns, tree_cpu_ns,
                          worker_thread)
from control.client import ControlClient
from control.errors import ControlError
from guest.errors import GuestError
from guest.procfs import group_members
from guest.uml import DEFAULT_IMAGE_DIR, GuestConfig, UmlGuest

MODES = ("jailed", "no-jail")
FILL_MARGIN_MIB = 64
WAIT_TIMEOUT = 60.0
WAIT_STALL = 5.0


_LIVE: set[UmlGuest] = set()


def stop_all() -> None:
    """Stop every guest this module started and did not stop (the caller's safety net)."""
    for guest in list(_LIVE):
        try:
            guest.stop()
        except GuestError:
            pass
        _LIVE.discard(guest)


def guest_available() -> str | None:
    if not (DEFAULT_IMAGE_DIR / ".ready").exists():
        return "no guest image: run `make guest`"
    return None


class RigError(Exception):
    """A guest rig could not be set up or a run did not settle."""


@dataclass
class GuestRig:
    mode: str
    serve: ServeProcess
    guest: UmlGuest
    client: ControlClient | None = None
    worker_pids: list[int] = field(default_factory=list)
    worker_tid: int | None = None
    ram_path: str = ""

    def reading(self) -> CpuReading:
        """CPU ns of the worker, the server without the worker, and the guest; now."""
        serve = self.serve.pid
        if self.worker_tid is not None:
            worker = task_cpu_ns(serve, self.worker_tid)
            worker_sys = sys_ns(serve, self.worker_tid)
            parent = process_cpu_ns(serve, exclude_tids=[self.worker_tid])
        else:
            worker = tree_cpu_ns(self.worker_pids)
            worker_sys = sum(sys_ns(p) for p in self.worker_pids)
            parent = process_cpu_ns(serve)
        guest = tree_cpu_ns(group_members(self.guest.pid))
        return CpuReading(time.monotonic(), {"worker": worker, "parent": parent, "guest": guest,
                                             "worker_sys": worker_sys})

    def host_ram(self) -> int:
        return os.stat(self.ram_path).st_blocks * 512

    def set_and_wait(self, size: int) -> tuple[float, dict]:
        """Set the target and wait for the guest; (seconds, the wait reply)."""
        start = time.monotonic()
        self.client.request("set", size=size)
        reply = self.client.request("wait", timeout=WAIT_TIMEOUT, stall=WAIT_STALL)
        return time.monotonic() - start, reply

    def stop(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
            self.guest.stop()
            _LIVE.discard(self.guest)
        finally:
            self.serve.stop()


def start_rig(workdir: Path, mode: str, mem_mib: int, serve_cpus: set[int],
              guest_cpus: set[int]) -> GuestRig:
    """Start serve, then UML (the backend must listen first); raises RigError."""
    serve = ServeProcess(workdir, f"guest-{mode}", jail=mode == "jailed", cpus=serve_cpus)
    guest = UmlGuest(GuestConfig(mem_mib=mem_mib, vhost_socket=serve.socket_path))
    rig = GuestRig(mode, serve, guest)
    try:
        serve.start()
        serve.wait_ready()
        _LIVE.add(guest)
        with pinned(guest_cpus):
            guest.start()          # UML and every helper it forks inherit the placement
        guest.wait_ready()
        if guest.balloon_state not in ("loaded", "builtin"):
            raise RigError(f"the guest has no balloon driver ({guest.balloon_state})")
        status = serve.wait_active()
        rig.client = serve.client(timeout=10.0)
        if mode == "jailed":
            rig.worker_pids = descendants(status["worker_pid"])
        else:
            rig.worker_tid = worker_thread(serve.pid)
        rig.ram_path = guest.ram_files()[0].path
    except (ServeError, GuestError, ControlError, OSError, IndexError) as exc:
        rig.stop()
        raise RigError(f"{mode}: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        rig.stop()
        raise
    return rig


@dataclass
class GuestRun:
    size: int
    inflate: float
    deflate: float
    inflate_cpu: dict[str, float]
    deflate_cpu: dict[str, float]
    host_freed: int


def measure(rig: GuestRig, size: int, fill_cap_mib: int) -> GuestRun:
    """One inflate of ``size`` bytes and the deflate back to 0; raises RigError if the
    guest does not settle."""
    mib = min(size // MIB + FILL_MARGIN_MIB, fill_cap_mib)
    rig.guest.fill_memory(mib)
    rig.guest.free_memory()
    host0 = rig.host_ram()
    r0 = rig.reading()
    inflate, reply = rig.set_and_wait(size)
    r1 = rig.reading()
    if reply["outcome"] != "settled":
        raise RigError(f"{rig.mode}: inflating to {size // MIB} MiB: {reply['outcome']} at "
                       f"{reply['actual_bytes'] // MIB} MiB")
    host1 = rig.host_ram()
    deflate, reply = rig.set_and_wait(0)
    r2 = rig.reading()
    if reply["outcome"] != "settled":
        raise RigError(f"{rig.mode}: deflating from {size // MIB} MiB: {reply['outcome']}")
    return GuestRun(size, inflate, deflate, r1.since(r0), r2.since(r1), host0 - host1)


# -- the section ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    name: str
    serve_cpus: set[int]
    guest_cpus: set[int]


def run_real_guest(report: Report, sizes: list[int], runs: int, mem_mib: int,
                   placements: list[Placement], trace_size: int | None, budget: Budget,
                   log: Callable[[str], None]) -> None:
    table = report.table(
        f"2. Real guest (User-Mode Linux, {mem_mib} MiB): balloon inflate to SIZE and deflate "
        "to 0, config change until actual == target",
        ["CPU placement", "mode", "balloon", "inflate ms", "deflate ms", "vs no-jail",
         "worker CPU ms (in kernel)", "parent CPU ms", "guest CPU ms", "device CPU / guest CPU",
         "host freed", "runs"])
    why = guest_available()
    if why is not None:
        table.rows.append(["-", "-", "-", f"skipped: {why}"] + ["-"] * 8)
        report.add("guest_inflate_time", None, "ms", runs=0, note=why)
        return
    fill_cap = int(mem_mib * 0.8)
    with tempfile.TemporaryDirectory(prefix="vballoon-bench-") as tmp:
        for placement in placements:
            if budget.left() < 0 and placement is not placements[0]:
                table.notes.append(f"'{placement.name}' skipped: out of time budget")
                continue
            rigs: dict[str, GuestRig] = {}
            failed: dict[str, str] = {}
            results: dict[tuple[str, int], list[GuestRun]] = {}
            try:
                for mode in MODES:
                    try:
                        rigs[mode] = start_rig(Path(tmp), mode, mem_mib, placement.serve_cpus,
                                               placement.guest_cpus)
                    except RigError as exc:
                        failed[mode] = str(exc)
                        log(f"real guest: {mode} unavailable: {exc}")
                for rep in range(runs):
                    if rep and budget.left() < 0:
                        table.notes.append(f"'{placement.name}': stopped after {rep} runs "
                                           "(time budget)")
                        break
                    for size in sizes:
                        for mode, rig in rigs.items():
                            if mode in failed:
                                continue
                            try:
                                results.setdefault((mode, size), []).append(
                                    measure(rig, size, fill_cap))
                            except (RigError, GuestError, ControlError, TimeoutError) as exc:
                                failed[mode] = str(exc)
                                log(f"real guest: {mode} failed: {exc}")
                    log(f"real guest ({placement.name}): run {rep + 1}/{runs} "
                        f"({budget.elapsed():.0f} s)")
                if placement is placements[0]:
                    for mode, rig in rigs.items():
                        if mode not in failed:
                            _footprints(report, rig, placement.name)
                    if trace_size:
                        mode = "jailed" if "jailed" in rigs and "jailed" not in failed else \
                            next((m for m in rigs if m not in failed), None)
                        if mode is not None:
                            report.series["trace"] = trace(rigs[mode], trace_size, fill_cap)
                            report.series["trace"]["mode"] = mode
                            report.series["trace"]["placement"] = placement.name
            finally:
                for rig in rigs.values():
                    rig.stop()
            _report_rows(report, table, placement, results, failed, sizes)
    table.notes += [
        "Inflate/deflate: from `set` on the control socket to the `wait` reply saying "
        "actual == target (medians). Before each run the guest dirties SIZE + "
        f"{FILL_MARGIN_MIB} MiB (tmpfs file) and frees it, so the pages the balloon takes "
        "are backed on the host; 'host freed' is the drop of UML's RAM file (st_blocks).",
        "CPU from /proc/<pid>/task/*/schedstat: worker = the jailed worker's processes "
        "(or, --no-jail, the worker thread of `serve`), parent = `vballoon serve` without "
        "the worker thread, guest = UML's whole process group. The benchmark process runs "
        f"on CPU {','.join(map(str, sorted(os.sched_getaffinity(0))))} and sleeps in "
        "`wait` while timing.",
        "'vs no-jail': median of the per-run ratio jailed / no-jail (runs interleaved).",
        "'(in kernel)': the worker's stime share over all runs (tick-sampled, shown from 200 "
        "ms of worker CPU up): mostly freeing the pages, which any device pays (section 1's "
        "kernel limit). The guest's own balloon work is cheap, so 'device CPU / guest CPU' "
        "is dominated by the host freeing memory for it.",
    ]


def _report_rows(report: Report, table, placement: Placement,
                 results: dict[tuple[str, int], list[GuestRun]], failed: dict[str, str],
                 sizes: list[int]) -> None:
    for size in sizes:
        for mode in MODES:
            got = results.get((mode, size), [])
            conds = dict(mode=mode, pattern="as the guest sends them",
                         placement=placement.name, balloon_bytes=size)
            if not got:
                note = failed.get(mode, "no run")
                table.rows.append([placement.name, mode, f"{size // MIB} MiB",
                                   f"skipped: {note}"] + ["-"] * 8)
                report.add("guest_inflate_time", None, "ms", runs=0, note=note, **conds)
                continue
            infl = median([r.inflate for r in got])
            defl = median([r.deflate for r in got])
            cpu = {k: median([r.inflate_cpu[k] for r in got])
                   for k in ("worker", "parent", "guest", "worker_sys")}
            # stime is counted in 10 ms ticks: say nothing below 20 ticks' worth.
            worker_total = sum(r.inflate_cpu["worker"] for r in got)
            in_kernel = (sum(r.inflate_cpu["worker_sys"] for r in got) / worker_total
                         if worker_total >= 0.2 else None)
            device = cpu["worker"] + cpu["parent"]
            share = device / cpu["guest"] if cpu["guest"] else None
            freed = median([r.host_freed for r in got])
            ratio = None
            other = results.get(("no-jail", size), [])
            if mode == "jailed" and other:
                ratio = median([a.inflate / b.inflate for a, b in zip(got, other)])
            table.rows.append([
                placement.name, mode, f"{size // MIB} MiB", fmt(infl * 1e3, 1), fmt(defl * 1e3, 1),
                "-" if ratio is None else f"{(ratio - 1) * 100:+.0f}%",
                fmt(cpu["worker"] * 1e3, 1) + ("" if in_kernel is None
                                                else f" ({min(in_kernel, 1.0) * 100:.0f}%)"),
                fmt(cpu["parent"] * 1e3, 1),
                fmt(cpu["guest"] * 1e3, 1), "-" if share is None else f"{share * 100:.0f}%",
                f"{freed / MIB:.0f} MiB", str(len(got))])
            n = len(got)
            report.add("guest_inflate_time", infl * 1e3, "ms", runs=n, **conds)
            report.add("guest_deflate_time", defl * 1e3, "ms", runs=n, **conds)
            report.add("guest_inflate_worker_cpu", cpu["worker"] * 1e3, "ms", runs=n, **conds)
            report.add("guest_inflate_parent_cpu", cpu["parent"] * 1e3, "ms", runs=n, **conds)
            if in_kernel is not None:
                report.add("guest_inflate_worker_sys_share", min(in_kernel, 1.0) * 100, "%",
                           runs=n, **conds)
            report.add("guest_inflate_guest_cpu", cpu["guest"] * 1e3, "ms", runs=n, **conds)
            report.add("guest_inflate_host_freed", freed / MIB, "MiB", runs=n, **conds)
            if ratio is not None:
                report.add("guest_inflate_jailed_vs_nojail", (ratio - 1) * 100, "%", runs=n,
                           **conds)
            if share is not None:
                report.add("guest_inflate_device_cpu_share", share * 100, "%", runs=n, **conds)


def _footprints(report: Report, rig: GuestRig, placement: str) -> None:
    st = os.stat(rig.ram_path)
    inode = [(st.st_dev, st.st_ino)]
    try:
        add_row(report, "`vballoon serve` (parent" + (", worker thread inside)" if
                rig.mode == "no-jail" else ")"), rig.mode, footprint(rig.serve.pid, inode),
                placement, "real guest")
        for pid in rig.worker_pids:
            add_row(report, f"jailed {process_name(pid)} (pid {pid}, real guest)", rig.mode,
                    footprint(pid, inode), placement, "real guest")
    except OSError as exc:
        report.notes.append(f"footprint of the {rig.mode} server: {exc}")


# -- memory over time -------------------------------------------------------------------------

def trace(rig: GuestRig, size: int, fill_cap: int, interval: float = 0.02) -> dict:
    """Host RAM behind the guest and the balloon's actual, every ``interval`` s, during one
    inflate of ``size`` and the deflate back (the plot's second panel)."""
    rig.guest.fill_memory(min(size // MIB + FILL_MARGIN_MIB, fill_cap))
    rig.guest.free_memory()
    samples: list[tuple[float, int, int, int]] = []
    done = threading.Event()
    start = time.monotonic()

    def sample() -> None:
        with rig.serve.client(timeout=5.0) as client:
            while not done.is_set():
                status = client.request("status")
                samples.append((time.monotonic() - start, rig.host_ram(),
                                status["actual_bytes"], status["target_bytes"]))
                done.wait(interval)

    sampler = threading.Thread(target=sample, name="bench-trace", daemon=True)
    sampler.start()
    marks = {}
    try:
        time.sleep(0.1)
        marks["inflate"] = time.monotonic() - start
        rig.set_and_wait(size)
        marks["inflated"] = time.monotonic() - start
        time.sleep(0.2)
        marks["deflate"] = time.monotonic() - start
        rig.set_and_wait(0)
        marks["deflated"] = time.monotonic() - start
        time.sleep(0.1)
    finally:
        done.set()
        sampler.join(10)
    return {"samples": samples, "marks": marks, "size": size}
