"""Device throughput with the fake driver, per worker mode and PFN pattern, and its scaling.

A ``Rig`` is one activated device over a ``GuestRam`` and the fake Linux driver
(``tests.driver``) that feeds it 256-PFN inflate buffers, ``batch`` of them per kick:

- ``in-process``: ``device.balloon.Balloon`` serviced synchronously in the driver's thread
  (no worker, no notification: the device's own cost);
- ``thread``: ``ProxyBalloon`` with ``ProxyOptions(jail=False)``, the worker a thread;
- ``jailed``: ``ProxyBalloon`` with ``ProxyOptions(jail=True)``, the worker a jailed child.

Each measured run re-populates guest memory first (every page backed on the host and
mapped by a helper process, as a guest's RAM is by its VMM: see ``bench.guestmem``), then
times ``send_pfns`` from the first buffer to the last buffer returned, and checks the host
really freed every page.
"""

from __future__ import annotations

import importlib.util
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import kernel
from bench.guestmem import FakeGuest
from bench.results import Report, fmt
from bench.system import (GIB, MIB, Budget, descendants, median, task_cpu_ns, tree_cpu_ns)
from control.errors import ControlError
from control.proxy import ProxyBalloon, ProxyOptions
from device.balloon import INFLATE_QUEUE, Balloon, BalloonOptions
from device.errors import DeviceError
from tests.driver import PAGE, RING_AREA, BalloonDriver, GuestRam

MODES = ("in-process", "thread", "jailed")
CONTIGUOUS, SCATTERED = "contiguous", "scattered"
SEED = 20240607
BATCH = 32                  # buffers per kick: the fake driver's scratch area holds 48


class ModeUnavailable(Exception):
    """A worker mode that cannot start here (e.g. the jail is not built yet)."""


def jail_available() -> str | None:
    """None if the jailed mode can be tried, else why not (checked without importing it)."""
    for module in ("control.jailed", "sandbox.jail"):
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet"
    return None


@dataclass
class Rig:
    """One activated device and its driver over ``ram``."""

    mode: str
    ram: GuestRam
    driver: BalloonDriver
    device: Balloon | ProxyBalloon
    worker_pids: list[int] = field(default_factory=list)   # jailed: the child and below
    worker_tid: int | None = None                          # thread: the worker thread

    def worker_cpu_ns(self) -> int | None:
        if self.worker_pids:
            return tree_cpu_ns(self.worker_pids)
        if self.worker_tid is not None:
            return task_cpu_ns(os.getpid(), self.worker_tid)
        return None

    def close(self) -> None:
        try:
            self.device.reset()
            if isinstance(self.device, ProxyBalloon):
                self.device.close()         # its loop thread too
        finally:
            self.driver.close()


def start_rig(ram: GuestRam, mode: str, options: BalloonOptions = BalloonOptions()) -> Rig:
    """Activate a device of ``mode`` over ``ram``; raises ModeUnavailable if it cannot start."""
    if mode == "in-process":
        balloon = Balloon(options)
        balloon.ack_features(balloon.device_features)
        driver = BalloonDriver(ram, balloon.queue_names(), balloon.acked_features,
                               write_config=balloon.write_config, service=balloon.process_queue)
        try:
            balloon.activate([ram.region()], driver.specs())
        except BaseException:
            driver.close()
            raise
        return Rig(mode, ram, driver, balloon)
    if mode == "jailed":
        why = jail_available()
        if why is not None:
            raise ModeUnavailable(why)
    proxy = ProxyBalloon(options, ProxyOptions(jail=mode == "jailed"))
    proxy.ack_features(proxy.device_features)
    driver = BalloonDriver(ram, proxy.queue_names(), proxy.acked_features,
                           write_config=proxy.write_config)
    try:
        proxy.activate([ram.region()], driver.specs())
    except (ControlError, DeviceError, OSError, ImportError) as exc:
        driver.close()
        raise ModeUnavailable(f"{type(exc).__name__}: {exc}") from exc
    rig = Rig(mode, ram, driver, proxy)
    if mode == "jailed":
        rig.worker_pids = descendants(proxy.worker.pid)
    else:
        workers = [t for t in threading.enumerate() if t.name == "vballoon-worker" and t.is_alive()]
        rig.worker_tid = workers[-1].native_id if workers else None
    return rig


# -- guest memory -------------------------------------------------------------------------------

def span(pfns: list[int]) -> tuple[int, int]:
    """The byte range ``[lo, hi)`` that holds every page of ``pfns``."""
    return min(pfns) * PAGE, (max(pfns) + 1) * PAGE


def all_pfns(ram: GuestRam) -> list[int]:
    """Every page the balloon may take, descending (what Linux sends)."""
    return list(range(ram.size // PAGE - 1, RING_AREA // PAGE - 1, -1))


def pfns_for(pattern: str, ram: GuestRam, count: int | None = None) -> list[int]:
    """``count`` PFNs (default all) in ``pattern``: descending-contiguous from the top of
    memory, or a seeded random permutation of all of memory's pages."""
    pfns = all_pfns(ram)
    if pattern == SCATTERED:
        random.Random(SEED).shuffle(pfns)
    return pfns if count is None else pfns[:count]


# -- one run --------------------------------------------------------------------------------------

@dataclass
class Run:
    wall: float
    released: int             # bytes the host freed
    expected: int
    worker_cpu: float | None  # seconds
    driver_cpu: float         # seconds (in-process: driver and device)

    @property
    def gib_s(self) -> float:
        return self.expected / GIB / self.wall


def measure_device(rig: Rig, guest: FakeGuest, pfns: list[int], batch: int) -> Run:
    """Populate, then time the inflation of ``pfns``; raises AssertionError if the host
    did not free them all."""
    guest.populate(*span(pfns))
    before = rig.ram.host_bytes()
    worker0 = rig.worker_cpu_ns()
    driver0 = time.thread_time_ns()
    start = time.perf_counter()
    rig.driver.send_pfns(INFLATE_QUEUE, pfns, batch)
    wall = time.perf_counter() - start
    driver = (time.thread_time_ns() - driver0) / 1e9
    worker1 = rig.worker_cpu_ns()
    released = before - rig.ram.host_bytes()
    expected = len(set(pfns)) * PAGE
    if released != expected:
        raise AssertionError(f"{rig.mode}: the host freed {released} bytes of {expected}")
    worker = None if worker0 is None else (worker1 - worker0) / 1e9
    return Run(wall, released, expected, worker, driver)


def measure_kernel(guest: FakeGuest, ranges: list[tuple[int, int]], expected: int) -> Run:
    guest.populate()
    return measure_kernel_range(guest, ranges, expected)


def measure_kernel_range(guest: FakeGuest, ranges: list[tuple[int, int]], expected: int) -> Run:
    """Punch ``ranges`` (populated by the caller); raises AssertionError unless the host
    freed ``expected`` bytes."""
    ram = guest.ram
    before = ram.host_bytes()
    cpu0 = time.thread_time_ns()
    wall = kernel.punch_ranges(ram.fd, ranges)
    cpu = (time.thread_time_ns() - cpu0) / 1e9
    released = before - ram.host_bytes()
    if released != expected:
        raise AssertionError(f"kernel: the host freed {released} bytes of {expected}")
    return Run(wall, released, expected, None, cpu)


# -- section 1: modes x patterns ------------------------------------------------------------------

CONFIGS = ((CONTIGUOUS, BATCH), (SCATTERED, BATCH), (CONTIGUOUS, 1))


def run_throughput(report: Report, size: int, reps: int, placement: str,
                   budget: Budget, log: Callable[[str], None]) -> None:
    """Section 1: every mode and pattern, next to the kernel limit, ``reps`` times each."""
    guest = FakeGuest(size)
    ram = guest.ram
    runs: dict[tuple[str, str, int], list[Run]] = {}
    unavailable: dict[str, str] = {}
    try:
        patterns = {p: pfns_for(p, ram) for p in (CONTIGUOUS, SCATTERED)}
        ranges = {p: kernel.buffer_ranges(pfns) for p, pfns in patterns.items()}
        whole = kernel.buffer_ranges(patterns[CONTIGUOUS], per_buffer=len(patterns[CONTIGUOUS]))
        for rep in range(reps):
            if rep and budget.left() < 0:
                log(f"throughput: out of time budget after {rep} repetitions")
                break
            for pattern, batch in CONFIGS:
                pfns = patterns[pattern]
                expected = len(pfns) * PAGE
                if batch == BATCH:
                    runs.setdefault(("kernel", pattern, batch), []).append(
                        measure_kernel(guest, ranges[pattern], expected))
                if pattern == CONTIGUOUS and batch == BATCH:
                    runs.setdefault(("kernel-1-range", pattern, batch), []).append(
                        measure_kernel(guest, whole, expected))
                for mode in MODES:
                    if mode in unavailable:
                        continue
                    try:
                        rig = start_rig(ram, mode)
                    except ModeUnavailable as exc:
                        unavailable[mode] = str(exc)
                        log(f"throughput: {mode} skipped: {exc}")
                        continue
                    try:
                        runs.setdefault((mode, pattern, batch), []).append(
                            measure_device(rig, guest, pfns, batch))
                    finally:
                        rig.close()
            log(f"throughput: repetition {rep + 1}/{reps} done ({budget.elapsed():.0f} s)")
    finally:
        guest.close()
    _report_throughput(report, size, runs, unavailable, placement)


def _report_throughput(report: Report, size: int, runs: dict, unavailable: dict[str, str],
                       placement: str) -> None:
    table = report.table(
        f"1. Device throughput: {size // MIB} MiB populated guest memory, inflated whole in "
        f"256-PFN buffers",
        ["mode", "PFNs", "buffers/kick", "GiB/s (median)", "% of kernel limit",
         "worker CPU ms/GiB", "driver CPU ms/GiB", "runs"])
    plot: list[dict] = []
    for (mode, pattern, batch) in [("kernel", p, b) for p, b in CONFIGS if b == BATCH] + \
            [("kernel-1-range", CONTIGUOUS, BATCH)] + \
            [(m, p, b) for p, b in CONFIGS for m in MODES]:
        label = {"kernel": "kernel limit (fallocate per merged range, per buffer)",
                 "kernel-1-range": "kernel, one fallocate for all of it"}.get(mode, mode)
        conds = dict(mode=mode, pattern=pattern, placement=placement, batch=batch,
                     guest_bytes=size)
        if mode in unavailable:
            note = f"skipped: {unavailable[mode]}"
            table.rows.append([label, pattern, str(batch), note, "-", "-", "-", "0"])
            report.add("inflate_throughput", None, "GiB/s", runs=0, note=note, **conds)
            continue
        got = runs.get((mode, pattern, batch), [])
        if not got:
            continue
        limit = runs.get(("kernel", pattern, BATCH), [])
        gib_s = median([r.gib_s for r in got])
        ratios = [r.gib_s / k.gib_s for r, k in zip(got, limit)] if mode.startswith(("in", "th", "ja")) else []
        ratio = median(ratios)
        gib = got[0].expected / GIB
        worker = median([r.worker_cpu / gib for r in got if r.worker_cpu is not None])
        driver = median([r.driver_cpu / gib for r in got])
        if mode == "in-process":
            driver_cell = f"{fmt(driver * 1e3, 0)} (device and driver)"
        else:
            driver_cell = fmt(driver * 1e3, 0)
        table.rows.append([label, pattern, str(batch), fmt(gib_s, 2),
                           "-" if ratio is None else f"{ratio * 100:.0f}%",
                           fmt(None if worker is None else worker * 1e3, 0), driver_cell,
                           str(len(got))])
        report.add("inflate_throughput", gib_s, "GiB/s", runs=len(got), **conds)
        if ratio is not None:
            report.add("inflate_throughput_vs_kernel", ratio * 100, "%", runs=len(got), **conds)
        if worker is not None:
            report.add("worker_cpu_per_gib", worker * 1e3, "ms/GiB", runs=len(got), **conds)
        plot.append({"mode": mode, "pattern": pattern, "batch": batch, "gib_s": gib_s})
    table.notes += [
        f"Driver (this process) and device pinned: {placement}. The fake guest's RAM is "
        "written and kept mapped by a helper process, as a real guest's is by its VMM "
        "(bench/guestmem.py: punching pages mapped in the caller's own address space costs "
        "up to ~1.9x more, which would favour the jailed worker unfairly); it is re-populated "
        "before each run, and every run checks the host freed every page (memfd st_blocks).",
        "Kernel limit: ctypes fallocate(PUNCH_HOLE|KEEP_SIZE), one call per range of each "
        "256-PFN buffer merged by device.pfn.compact_pfns, no virtqueue; '% of kernel "
        "limit' is the median of per-repetition ratios (runs interleaved).",
        "Worker CPU from /proc/<pid>/task/*/schedstat (jailed: the child and any process "
        "below it; thread: the worker thread). In-process has no worker: the device runs in the driver's thread.",
    ]
    report.series["throughput"] = plot
    report.series["unavailable"] = dict(unavailable)
    jailed = report_ratio(report, "jailed")
    if jailed is not None:
        report.goal("jailed >= 50% of the kernel limit (contiguous PFNs)",
                    f"{jailed:.0f}%", jailed >= 50)
        report.goal("jailed throughput >= 92% of the kernel limit (256-PFN buffers, issue 14)",
                    f"{jailed:.0f}%", jailed >= 92)
    else:
        thread = report_ratio(report, "thread")
        report.goal("jailed >= 50% of the kernel limit (contiguous PFNs)",
                    "jailed mode not available"
                    + (f" (thread worker: {thread:.0f}%)" if thread is not None else ""), None)


def report_ratio(report: Report, mode: str) -> float | None:
    for r in report.results:
        c = r.conditions
        if (r.name == "inflate_throughput_vs_kernel" and c["mode"] == mode
                and c["pfn_pattern"] == CONTIGUOUS and c.get("batch") == BATCH):
            return r.value
    return None


# -- section 5: scaling ------------------------------------------------------------------------

def run_scaling(report: Report, sizes: list[int], fixed: int, full_limit: int, reps: int,
                placement: str, budget: Budget, log: Callable[[str], None]) -> None:
    """Section 5: a fixed ``fixed`` bytes out of each guest size, and all of it up to
    ``full_limit``; the mode is jailed if it can start, else the thread worker."""
    mode = "jailed" if jail_available() is None else "thread"
    table = report.table(
        "5. Scaling with guest size (contiguous PFNs, 32 buffers/kick)",
        ["guest memory", "inflated", "mode", "GiB/s (median)", "worker CPU ms",
         "worker CPU µs/MiB", "kernel limit µs/MiB (same pages)",
         "device overhead µs/MiB (worker - kernel)", "runs"])
    points = []
    for size in sizes:
        if budget.left() < 0:
            table.notes.append(f"stopped before {size // MIB} MiB: out of time budget")
            break
        guest = FakeGuest(size, "bench-scaling")
        ram = guest.ram
        try:
            try:
                rig = start_rig(ram, mode)
            except ModeUnavailable as exc:
                if mode == "jailed":
                    log(f"scaling: jailed failed ({exc}); using the thread worker")
                    mode = "thread"
                    rig = start_rig(ram, mode)
                else:
                    raise
            try:
                usable = (size - RING_AREA) // PAGE
                todo = [("fixed", min(fixed // PAGE, usable))]
                if size <= full_limit and usable > todo[0][1]:
                    todo.append(("all", usable))
                for label, count in todo:
                    points.append(_scaling_point(report, table, rig, guest, mode, placement,
                                                 label, pfns_for(CONTIGUOUS, ram, count), reps))
            finally:
                rig.close()
        finally:
            guest.close()
        log(f"scaling: {size // MIB} MiB done ({budget.elapsed():.0f} s)")
    report.series["scaling"] = points
    _scaling_goal(report, points)
    table.notes.append(f"Pinned: {placement}. One device per guest size; every run "
                       "re-populates the pages it releases first. The kernel limit is measured "
                       "on the same pages, interleaved: the kernel itself pays more per MiB "
                       "when punching a larger range (measured, cause not investigated), so the "
                       "device's own share is the difference.")


def _scaling_point(report: Report, table, rig: Rig, guest: FakeGuest, mode: str,
                   placement: str, label: str, pfns: list[int], reps: int) -> dict:
    ranges = kernel.buffer_ranges(pfns)
    released = len(pfns) * PAGE
    got, limit = [], []
    for _ in range(reps):
        got.append(measure_device(rig, guest, pfns, BATCH))
        guest.populate(*span(pfns))
        limit.append(measure_kernel_range(guest, ranges, released))
    mib = released / MIB
    gib_s = median([r.gib_s for r in got])
    cpu = median([r.worker_cpu for r in got if r.worker_cpu is not None])
    kernel_per_mib = median([k.driver_cpu for k in limit]) * 1e6 / mib   # CPU, like the worker's
    per_mib = None if cpu is None else cpu * 1e6 / mib
    overhead = None if per_mib is None else per_mib - kernel_per_mib
    table.rows.append([f"{guest.size // MIB} MiB", f"{released // MIB} MiB", mode,
                       fmt(gib_s, 2), fmt(None if cpu is None else cpu * 1e3, 1),
                       fmt(per_mib, 1), fmt(kernel_per_mib, 1), fmt(overhead, 1),
                       str(len(got))])
    conds = dict(mode=mode, pattern=CONTIGUOUS, placement=placement, batch=BATCH,
                 guest_bytes=guest.size, released_bytes=released)
    n = len(got)
    report.add("scaling_throughput", gib_s, "GiB/s", runs=n, **conds)
    report.add("scaling_kernel_limit_per_mib", kernel_per_mib, "us/MiB", runs=n, **conds)
    if cpu is not None:
        report.add("scaling_worker_cpu", cpu * 1e3, "ms", runs=n, **conds)
        report.add("scaling_worker_cpu_per_mib", per_mib, "us/MiB", runs=n, **conds)
        report.add("scaling_device_overhead_per_mib", overhead, "us/MiB", runs=n, **conds)
    return {"guest": guest.size, "released": released, "gib_s": gib_s, "cpu": cpu,
            "label": label, "per_mib": per_mib, "overhead": overhead}


def _scaling_goal(report: Report, points: list[dict]) -> None:
    rows = [p for p in points if p["per_mib"] is not None]
    fixed = [p for p in rows if p["label"] == "fixed"]
    if len(fixed) < 2:
        return
    small, large = fixed[0], fixed[-1]
    growth = large["per_mib"] / small["per_mib"]
    overheads = [p["overhead"] for p in rows]
    spread = max(overheads) - min(overheads)
    report.goal("cost grows with pages released, not with guest size",
                f"worker CPU per MiB for the same {small['released'] // MIB} MiB x{growth:.2f} "
                f"from a {small['guest'] // MIB} MiB to a {large['guest'] // MIB} MiB guest; "
                f"device overhead beyond the kernel {min(overheads):.0f}-{max(overheads):.0f} "
                f"µs/MiB over all {len(rows)} rows (fixed and whole-guest inflations)",
                growth < 1.25 and spread < 15)
