"""What vballoon itself costs, beyond what the kernel pays to free the pages (issue 14).

Three measurements, all with every process pinned to one CPU:

1. **Beyond the kernel, real guests.** A guest (UML, then QEMU) dirties and frees memory,
   the balloon is inflated, and the worker's and the parent's CPU are read around it. The
   pages actually freed are read back from the guest's RAM file (``SEEK_DATA``/``SEEK_HOLE``
   before and after); the kernel's cost for *those* pages is then measured alone: the same
   ranges, written by a helper process that keeps them mapped (as the VMM does) and punched
   from this process, at most 256 pages a call (one inflate buffer), with nothing else
   running. Device CPU beyond the kernel = worker + parent - that. Rounds alternate
   inflate and replay; medians.
2. **The config round trips' floor.** Per MiB, the guest's driver reads the target
   (GET_CONFIG) and writes ``actual`` (SET_CONFIG, acked: both front-ends ask for REPLY_ACK
   on every message once it is offered). ``serve``'s CPU per such pair is measured with a
   Python front-end, next to a minimal Python loop doing the same system calls (epoll,
   recvmsg, send) with a prebuilt reply: what any Python device pays for the protocol.
3. **The operator's view.** ``vballoon set 512M --wait`` timed from the command's start,
   with a fresh ``serve`` and UML guest (768 MiB, 640 MiB dirtied and freed) for every
   round, jailed and ``--no-jail`` interleaved; median of the per-round ratios.
"""

from __future__ import annotations

import os
import selectors
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import kernel
from bench.results import Report, fmt
from bench.serve import ServeError, ServeProcess, vballoon_command
from bench.system import MIB, Budget, descendants, pinned, process_cpu_ns, tree_cpu_ns

GOAL_BEYOND_MS_PER_GIB = 20.0
GOAL_OPERATOR_RATIO = 1.03


# -- 1. beyond the kernel ------------------------------------------------------------------

def _replay(ranges: list[tuple[int, int]], size: int, cpu: int) -> float:
    """CPU seconds the kernel alone takes to free ``ranges`` (byte ``[lo, hi)``) of a file of
    ``size`` bytes, written and kept mapped by another process, punched from this thread."""
    from bench.guestmem import FakeGuest
    guest = FakeGuest(size, "bench-replay")           # every page written by its helper
    try:
        calls = kernel.split_extents(ranges)
        with pinned({cpu}):
            start = time.thread_time()
            kernel.punch_ranges(guest.ram.fd, calls)
            return time.thread_time() - start
    finally:
        guest.close()


# -- where the CPU goes: perf, when it is installed -------------------------------------------

PROFILE_PARTS = ("python", "release", "scheduling", "other kernel", "other")


def _perf_available() -> bool:
    import shutil
    return shutil.which("perf") is not None


def _perf_record(pids: list[int], path: str) -> subprocess.Popen | None:
    try:
        proc = subprocess.Popen(["perf", "record", "-F", "5000", "-g", "-e", "cpu-clock",
                                 "-p", ",".join(map(str, pids)), "-o", path],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    time.sleep(0.5)                      # perf attaches
    return proc


def _perf_stop(proc: subprocess.Popen) -> None:
    import signal
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _perf_shares(path: str, pids: list[int]) -> dict[int, dict[str, float]] | None:
    """Per process, the shares (%) of its own samples: the Python interpreter and its
    modules, the kernel freeing pages (madvise/fallocate and below), scheduling (context
    switches and wake-ups inside them), the rest of the kernel, anything else."""
    def report(*args: str) -> list[tuple[int, float, str]]:
        done = subprocess.run(["perf", "report", "-i", path, "--stdio", "-g", "none", *args],
                              capture_output=True, text=True, timeout=120)
        rows = []
        for line in done.stdout.splitlines() if done.returncode == 0 else []:
            if line.startswith("#") or "%" not in line:
                continue
            # "  69.67%  [children%]  15244:vballoon-worker  [kernel.kallsyms]"
            words = line.split()
            pid_field = next((w for w in words if ":" in w and w.split(":")[0].isdigit()), None)
            if pid_field is None:
                continue
            rows.append((int(pid_field.split(":")[0]), float(words[0].rstrip("%")), line))
        return rows
    totals: dict[int, float] = {}
    python: dict[int, float] = {}
    kernel: dict[int, float] = {}
    for pid, share, line in report("--no-children", "--sort", "pid,dso"):
        totals[pid] = totals.get(pid, 0.0) + share
        if "python" in line:
            python[pid] = python.get(pid, 0.0) + share
        elif "[kernel" in line:
            kernel[pid] = kernel.get(pid, 0.0) + share
    release: dict[int, float] = {}
    scheduling: dict[int, float] = {}
    for pid, share, line in report("--children", "--sort", "pid,sym"):
        name = line.rstrip()
        if name.endswith(("__x64_sys_madvise", "__x64_sys_fallocate")):
            release[pid] = release.get(pid, 0.0) + share
        elif name.endswith("] __schedule"):
            scheduling[pid] = share
    out = {}
    for pid in pids:
        total = totals.get(pid)
        if not total:
            return None
        def part(values: dict[int, float]) -> float:
            return 100.0 * values.get(pid, 0.0) / total
        out[pid] = {"python": part(python), "release": part(release),
                    "scheduling": part(scheduling),
                    "other kernel": max(0.0, part(kernel) - part(release) - part(scheduling)),
                    "other": max(0.0, 100.0 - part(python) - part(kernel))}
    return out


class _Round:
    def __init__(self, worker: float, parent: float, kernel_s: float, freed: int) -> None:
        self.worker, self.parent, self.kernel, self.freed = worker, parent, kernel_s, freed

    def per_gib(self, seconds: float) -> float:
        return seconds * 1000 * (1 << 30) / self.freed

    @property
    def beyond(self) -> float:
        return self.per_gib(self.worker + self.parent - self.kernel)


@dataclass
class _Target:
    """A running guest with its serve: what a round needs of either front-end."""

    name: str
    guest: object                      # fill_memory(mib), free_memory()
    ram_path: str
    worker: int                        # the jailed worker's pid
    parent: int                        # serve's pid
    balloon: Callable[[int], object]   # set the balloon and wait until it got there

    def cpu(self) -> tuple[float, float]:
        """CPU seconds of the worker (and anything below it) and of serve, now."""
        return (tree_cpu_ns(descendants(self.worker)) / 1e9, process_cpu_ns(self.parent) / 1e9)


def _measure_rounds(target: _Target, rounds: int, cpu: int, size: int, budget: Budget,
                    log: Callable[[str], None]) -> list[_Round]:
    out: list[_Round] = []
    for n in range(rounds):
        if n >= 3 and budget.left() < 0:
            break
        target.guest.fill_memory(size // MIB + 64)
        target.guest.free_memory()
        file_size, before = kernel.file_extents(target.ram_path)
        worker0, parent0 = target.cpu()
        target.balloon(size)
        worker1, parent1 = target.cpu()
        freed = kernel.freed_extents(before, kernel.file_extents(target.ram_path)[1])
        target.balloon(0)
        row = _Round(worker1 - worker0, parent1 - parent0, _replay(freed, file_size, cpu),
                     sum(hi - lo for lo, hi in freed))
        log(f"device cost, {target.name} round {n + 1}: worker {row.per_gib(row.worker):.0f}, "
            f"parent {row.per_gib(row.parent):.0f}, kernel {row.per_gib(row.kernel):.0f}"
            f" ms/GiB -> beyond {row.beyond:.1f} ms/GiB")
        out.append(row)
    if _perf_available():
        target.guest.fill_memory(size // MIB + 64)
        target.guest.free_memory()
        profiles = _profile_round(lambda: target.balloon(size),
                                  {"worker": target.worker, "parent": target.parent})
        target.balloon(0)
        if profiles:
            _PROFILES[target.name] = profiles
    return out


def _uml_rounds(rounds: int, cpu: int, size: int, budget: Budget,
                log: Callable[[str], None]) -> list[_Round]:
    from bench.realguest import RigError, start_rig

    with tempfile.TemporaryDirectory(prefix="vballoon-cost-") as tmp:
        rig = start_rig(Path(tmp), "jailed", 1536, {cpu}, {cpu})

        def balloon(target_size: int) -> None:
            _, reply = rig.set_and_wait(target_size)
            if reply["outcome"] != "settled":
                raise RigError(f"balloon to {target_size // MIB} MiB: {reply['outcome']}")
        try:
            return _measure_rounds(_Target("UML", rig.guest, rig.ram_path, rig.worker_pids[0],
                                           rig.serve.pid, balloon), rounds, cpu, size, budget, log)
        finally:
            rig.stop()


_PROFILES: dict[str, dict[str, dict[str, float]]] = {}


def _profile_round(action: Callable[[], object],
                   pids: dict[str, int]) -> dict[str, dict[str, float]] | None:
    """perf samples of ``pids`` while ``action`` runs; their shares by where time went."""
    with tempfile.TemporaryDirectory(prefix="vballoon-perf-") as tmp:
        path = str(Path(tmp) / "perf.data")
        proc = _perf_record(list(pids.values()), path)
        if proc is None:
            return None
        try:
            action()
        finally:
            _perf_stop(proc)
        shares = _perf_shares(path, list(pids.values()))
    return None if shares is None else {name: shares[pid] for name, pid in pids.items()}


def _qemu_rounds(rounds: int, cpu: int, size: int, budget: Budget,
                 log: Callable[[str], None]) -> list[_Round]:
    from bench.qemu_side import start_side
    with tempfile.TemporaryDirectory(prefix="vballoon-cost-qemu-") as tmp:
        side = start_side("vballoon", Path(tmp), {cpu})
        try:
            with side.serve.client() as client:
                worker = client.request("status")["worker_pid"]
            return _measure_rounds(_Target("QEMU", side.guest, side.guest.ram_files()[0].path,
                                           worker, side.serve.pid, side.balloon),
                                   rounds, cpu, size, budget, log)
        finally:
            side.stop()


BEYOND_HEADERS = ["front-end", "inflated", "worker ms/GiB", "parent ms/GiB",
                  "kernel alone ms/GiB (same pages)", "beyond the kernel ms/GiB",
                  "goal", "runs"]


def run_beyond_kernel(report: Report, cpu: int, uml_rounds: int, qemu_rounds: int,
                      budget: Budget, log: Callable[[str], None]) -> None:
    from bench.qemu_side import qemu_available
    from bench.realguest import guest_available
    table = report.table("10. Device CPU beyond the kernel (real guests, one CPU)",
                         BEYOND_HEADERS)
    table.notes.append(
        f"Guest, serve and the jailed worker pinned to CPU {cpu}. The pages freed are read "
        "back from the guest's RAM file (SEEK_DATA/SEEK_HOLE before and after the inflate); "
        "'kernel alone' punches exactly those ranges (at most 256 pages a call, one inflate "
        "buffer) in a copy written and kept mapped by another process, from a process doing "
        "nothing else. Beyond = worker + parent - kernel alone, median of the rounds' values. "
        "The replay merges a run of pages across buffers, so it may make fewer calls than the "
        "device (Linux's runs are long: ~10 extents per GiB here): 'kernel alone' is a lower "
        "bound and 'beyond' an upper one. The worker's CPU is its own process (the zygote "
        "it was forked from and serve are not in it); the parent's is serve's.")
    for name, why, rounds_of, size in (
            ("UML", guest_available(), _uml_rounds, 1 << 30),
            ("QEMU", qemu_available(), _qemu_rounds, 512 * MIB)):
        count = uml_rounds if name == "UML" else qemu_rounds
        if why is not None:
            table.rows.append([name, "-", "-", "-", "-", "not run: " + why, "-", "0"])
            report.goal(f"device CPU beyond the kernel <= {GOAL_BEYOND_MS_PER_GIB:.0f} ms/GiB "
                        f"({name})", f"not measured: {why}", None)
            continue
        rows = rounds_of(count, cpu, size, budget, log)
        med = {key: statistics.median(getattr(r, key) if key == "beyond"
                                      else r.per_gib(getattr(r, key)) for r in rows)
               for key in ("worker", "parent", "kernel", "beyond")}
        table.rows.append([name, f"{size // MIB} MiB", fmt(med["worker"]), fmt(med["parent"]),
                           fmt(med["kernel"]), fmt(med["beyond"]),
                           f"<= {GOAL_BEYOND_MS_PER_GIB:.0f}", str(len(rows))])
        report.add("device_cpu_beyond_kernel", med["beyond"], "ms/GiB", mode="jailed",
                   placement=f"all on CPU {cpu}", runs=len(rows), frontend=name,
                   worker_ms_per_gib=med["worker"], parent_ms_per_gib=med["parent"],
                   kernel_ms_per_gib=med["kernel"])
        report.goal(f"device CPU beyond the kernel <= {GOAL_BEYOND_MS_PER_GIB:.0f} ms/GiB "
                    f"({name})", f"{med['beyond']:.0f} ms/GiB (worker {med['worker']:.0f} + "
                    f"parent {med['parent']:.0f} - kernel {med['kernel']:.0f})",
                    med["beyond"] <= GOAL_BEYOND_MS_PER_GIB)
        if name in _PROFILES:
            _profile_rows(report, name, _PROFILES[name], med)


PROFILE_HEADERS = ["front-end", "process", "ms/GiB (median)", *[f"{part} %" for part in
                                                                  PROFILE_PARTS],
                   "python ms/GiB", "scheduling ms/GiB"]


def _profile_rows(report: Report, name: str, profiles: dict[str, dict[str, float]],
                  med: dict[str, float]) -> None:
    table = next((t for t in report.tables if t.title.startswith("10b.")), None)
    if table is None:
        table = report.table("10b. Where the device's CPU goes (perf, one extra round)",
                             PROFILE_HEADERS)
        table.notes.append(
            "perf record -g -e cpu-clock at 5 kHz on the worker and on serve during one more "
            "inflate. 'release': madvise/fallocate and everything below them (the kernel "
            "freeing pages, which any device pays); 'scheduling': __schedule and below "
            "(context switches, each message and kick is one); 'python': the interpreter and "
            "its modules. Sampling slows what it watches: shares, not times; the ms/GiB "
            "columns apply them to the median of section 10.")
    for process, total in (("worker", med["worker"]), ("parent", med["parent"])):
        shares = profiles[process]
        table.rows.append([name, process, fmt(total),
                           *[fmt(shares[part]) for part in PROFILE_PARTS],
                           fmt(total * shares["python"] / 100),
                           fmt(total * shares["scheduling"] / 100)])
        report.add("device_cpu_profile", shares["python"], "% python", frontend=name,
                   process=process, **{k.replace(" ", "_"): v for k, v in shares.items()})


# -- 2. the config round trips' floor -------------------------------------------------------

_GET_CONFIG = struct.pack("<III", 24, 1, 16) + struct.pack("<III", 0, 4, 0) + bytes(4)
_SET_CONFIG = struct.pack("<III", 25, 1 | 8, 16) + struct.pack("<III", 4, 4, 0) + bytes(4)


def _pairs(sock: socket.socket, count: int) -> None:
    """``count`` times what UML sends per MiB inflated: read the target, write actual."""
    for _ in range(count):
        sock.sendall(_GET_CONFIG)
        sock.recv(4096)
        sock.sendall(_SET_CONFIG)
        sock.recv(4096)


BATCHES = 3          # each figure of section 11 is the median of this many batches


def _cpu_per_pair(sock: socket.socket, pid: int, pairs: int) -> list[float]:
    """µs of ``pid``'s CPU per pair, for each of BATCHES batches of ``pairs`` in all."""
    samples = []
    for _ in range(BATCHES):
        before = process_cpu_ns(pid)
        _pairs(sock, pairs // BATCHES)
        samples.append((process_cpu_ns(pid) - before) / 1000 / (pairs // BATCHES))
    _pairs(sock, pairs - BATCHES * (pairs // BATCHES))      # what the floor server counts
    return samples


def _floor_server(sock: socket.socket, count: int) -> None:
    """The least a Python event loop does per message: wait, receive (fds allowed), send a
    reply built in advance."""
    reply = struct.pack("<III", 24, 5, 16) + bytes(16)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    flags = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
    handled = 0
    while handled < count:
        for _ in selector.select():
            try:
                sock.recvmsg(4108, 64, flags)
            except BlockingIOError:
                continue
            sock.send(reply)
            handled += 1


ROUND_TRIP_HEADERS = ["per MiB inflated", "what answers", "CPU µs per MiB",
                      "the floor (minimal Python loop)", "beyond the floor", "runs"]


def _kick_floor_server(kick: int, call: int, count: int) -> None:
    """The least a Python worker does per buffer: wait for the kick, read it, signal."""
    import select
    poller = select.poll()
    poller.register(kick, select.POLLIN)
    one = (1).to_bytes(8, "little")
    for _ in range(count):
        poller.poll()
        os.read(kick, 8)
        os.write(call, one)


def _kick_round_trips(kick: int, call: int, count: int) -> None:
    import select
    one = (1).to_bytes(8, "little")
    for _ in range(count):
        os.write(kick, one)
        select.select([call], [], [])
        os.read(call, 8)


def _worker_per_buffer(cpu: int, buffers: int) -> tuple[float, float]:
    """(jailed worker CPU µs per 256-PFN buffer, one per kick, over pages that are not
    backed: the release itself is nearly free; the floor loop's µs per kick round trip)."""
    from bench.throughput import start_rig
    from device.balloon import INFLATE_QUEUE
    from tests.driver import GuestRam
    ram = GuestRam((buffers + 64) * MIB, "bench-worker-floor")
    try:
        with pinned({cpu}):
            rig = start_rig(ram, "jailed")
            try:
                pfns = rig.driver.take_pages(buffers * 256)
                rig.driver.send_pfns(INFLATE_QUEUE, pfns[:64 * 256], 1)      # warm up
                batch = (buffers - 64) // BATCHES
                samples = []
                for k in range(BATCHES):
                    part = pfns[(64 + k * batch) * 256:(64 + (k + 1) * batch) * 256]
                    before = rig.worker_cpu_ns()
                    rig.driver.send_pfns(INFLATE_QUEUE, part, 1)
                    samples.append((rig.worker_cpu_ns() - before) / 1000 / batch)
                worker = statistics.median(samples)
            finally:
                rig.close()
    finally:
        ram.close()
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with pinned({cpu}):
            child = os.fork()
            if child == 0:                                    # pragma: no cover (child)
                try:
                    _kick_floor_server(kick, call, buffers + 200)
                finally:
                    os._exit(0)
            _kick_round_trips(kick, call, 200)
            samples = []
            for _ in range(BATCHES):
                before = process_cpu_ns(child)
                _kick_round_trips(kick, call, buffers // BATCHES)
                samples.append((process_cpu_ns(child) - before) / 1000 / (buffers // BATCHES))
            _kick_round_trips(kick, call, buffers - BATCHES * (buffers // BATCHES))
            floor = statistics.median(samples)
            os.waitpid(child, 0)
    finally:
        os.close(kick)
        os.close(call)
    return worker, floor


def run_config_round_trips(report: Report, cpu: int, pairs: int,
                           log: Callable[[str], None]) -> None:
    from tests.driver import BalloonDriver, GuestRam
    from tests.frontend import Frontend
    from device.balloon import queue_layout
    table = report.table("11. Per MiB, the three round trips Linux's driver makes, against "
                         "the least a Python loop pays (one CPU)", ROUND_TRIP_HEADERS)
    table.notes.append(
        f"Everything on CPU {cpu}. Per 256 pages, the guest's driver reads the target "
        "(GET_CONFIG), kicks one inflate buffer and waits for it, and writes actual "
        "(SET_CONFIG, acked: both front-ends ask for REPLY_ACK on every message once offered). "
        "A Python front-end sends the config pair to `vballoon serve` (its CPU per pair); the "
        "fake driver sends buffers one per kick to a jailed worker over memory that is not "
        "backed (the kernel's release is nearly free there; its cost on backed pages is "
        "section 10's 'kernel alone'). Each floor is a minimal Python loop making the same "
        "system calls with nothing else (epoll_wait, recvmsg, send; poll, read, write): "
        "mostly the kernel's wake-ups and context switches, warm, which any Python device "
        "pays; with a guest running in between, caches are cold and every figure grows.")
    with tempfile.TemporaryDirectory(prefix="vballoon-config-") as tmp, pinned({cpu}):
        serve = ServeProcess(Path(tmp), "config", jail=True, cpus={cpu})
        ram = GuestRam(64 * MIB, "bench-config")
        try:
            serve.start()
            serve.wait_ready()
            frontend = Frontend(serve.socket_path)
            driver = BalloonDriver(ram, queue_layout(0), 0, lambda offset, data: None)
            frontend.setup(ram, driver, 0)
            serve.wait_active()
            _pairs(frontend.sock, 500)
            served = statistics.median(_cpu_per_pair(frontend.sock, serve.pid, pairs))
            frontend.close()
            driver.close()
        finally:
            serve.stop()
            ram.close()
        ours, theirs = socket.socketpair()
        child = os.fork()
        if child == 0:                                    # pragma: no cover (child)
            ours.close()
            try:
                _floor_server(theirs, 2 * (pairs + 500))
            finally:
                os._exit(0)
        theirs.close()
        _pairs(ours, 500)
        floor = statistics.median(_cpu_per_pair(ours, child, pairs))
        ours.close()
        os.waitpid(child, 0)
    worker, kick_floor = _worker_per_buffer(cpu, min(pairs // 10, 960))
    log(f"per MiB: serve {served:.1f} µs (floor {floor:.1f}), worker {worker:.1f} µs "
        f"(floor {kick_floor:.1f})")
    table.rows.append(["GET_CONFIG + acked SET_CONFIG", "`vballoon serve`", fmt(served),
                       fmt(floor), fmt(served - floor), str(pairs)])
    table.rows.append(["kick, one 256-PFN buffer, call (pages not backed)", "jailed worker",
                       fmt(worker), fmt(kick_floor), fmt(worker - kick_floor),
                       str(min(pairs // 10, 960) - 64)])
    table.rows.append(["all three", "vballoon", fmt(served + worker), fmt(floor + kick_floor),
                       fmt(served + worker - floor - kick_floor), "-"])
    report.add("config_round_trips_parent_cpu", served, "µs/MiB", placement=f"CPU {cpu}",
               runs=pairs, floor_us=floor)
    report.add("worker_cpu_per_buffer_unbacked", worker, "µs/MiB", placement=f"CPU {cpu}",
               floor_us=kick_floor)


# -- 3. the operator's view -----------------------------------------------------------------

OPERATOR_HEADERS = ["mode", "`vballoon set 512M --wait` ms (median)", "min", "max",
                    "jailed / no-jail (median of rounds)", "goal", "rounds"]


def _operator_round(jail: bool, cpu: int, tmp: Path, n: int) -> float:
    from guest.uml import GuestConfig, UmlGuest
    name = f"op-{'jail' if jail else 'nojail'}-{n}"
    directory = tmp / name
    directory.mkdir()
    serve = ServeProcess(directory, name, jail=jail, cpus={cpu})
    guest = UmlGuest(GuestConfig(mem_mib=768, vhost_socket=serve.socket_path))
    try:
        serve.start()
        serve.wait_ready()
        with pinned({cpu}):
            guest.start()
        guest.wait_ready()
        serve.wait_active(timeout=30)
        guest.fill_memory(640)
        guest.free_memory()
        command = [*vballoon_command(), "set", "512M", "--wait", "--control",
                   serve.control_path]
        with pinned({cpu}):
            start = time.perf_counter()
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=120)
            elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise ServeError(f"`vballoon set 512M --wait` failed: {done.stderr.decode()[-300:]}")
        return elapsed
    finally:
        guest.stop()
        serve.stop()


def run_operator_view(report: Report, cpu: int, rounds: int,
                      log: Callable[[str], None]) -> None:
    from bench.realguest import guest_available
    table = report.table("12. The jail as an operator sees it: `vballoon set 512M --wait` "
                         "(UML, one CPU)", OPERATOR_HEADERS)
    why = guest_available()
    if why is not None:
        table.rows.append(["-", "not run: " + why, "-", "-", "-", "-", "0"])
        report.goal("the jail costs nothing an operator sees (median ratio <= 1.03)",
                    f"not measured: {why}", None)
        return
    table.notes.append(
        f"Each round starts a fresh `vballoon serve` (jailed or --no-jail) and UML guest "
        f"(768 MiB, 640 MiB dirtied and freed), all pinned to CPU {cpu} with the command; "
        "timed from the command's start to its exit, settled. Modes alternate first.")
    times: dict[bool, list[float]] = {True: [], False: []}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vballoon-operator-") as tmp:
        for n in range(rounds):
            got = {}
            for jail in ((True, False) if n % 2 == 0 else (False, True)):
                got[jail] = _operator_round(jail, cpu, Path(tmp), n)
                times[jail].append(got[jail])
            ratios.append(got[True] / got[False])
            log(f"operator view round {n + 1}: jailed {got[True] * 1000:.0f} ms, no-jail "
                f"{got[False] * 1000:.0f} ms, ratio {ratios[-1]:.3f}")
    ratio = statistics.median(ratios)
    for jail in (True, False):
        ms = [t * 1000 for t in times[jail]]
        table.rows.append(["jailed" if jail else "no-jail", fmt(statistics.median(ms), 0),
                           fmt(min(ms), 0), fmt(max(ms), 0),
                           f"{ratio:.3f}" if jail else "-",
                           f"<= {GOAL_OPERATOR_RATIO}" if jail else "-", str(len(ms))])
    report.add("operator_set_wait_ratio", ratio, "ratio", placement=f"all on CPU {cpu}",
               runs=rounds, jailed_ms=statistics.median(times[True]) * 1000,
               nojail_ms=statistics.median(times[False]) * 1000)
    report.goal("the jail costs nothing an operator sees: `vballoon set 512M --wait` jailed / "
                f"no-jail median <= {GOAL_OPERATOR_RATIO}", f"{ratio:.3f} over {rounds} rounds",
                ratio <= GOAL_OPERATOR_RATIO)
