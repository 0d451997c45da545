"""Facts about this machine and its processes, read from ``/proc``.

CPU time is read from ``/proc/<pid>/task/<tid>/schedstat`` (the first field is the time
the task ran, in nanoseconds), summed over the threads of a process and, for a worker, over
its descendants too (a jailed child may fork below itself). ``stat``'s
utime+stime would do but counts in 10 ms ticks, too coarse for a 64 MiB inflation. Tasks
that exit between two readings take their time with them; the benchmarks read around work
done by long-lived processes only.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

KIB = 1024
MIB = 1 << 20
GIB = 1 << 30
_TICKS = os.sysconf("SC_CLK_TCK")

# x86_64 syscall numbers of the waits the server's threads block in (see thread_blocked_in).
SYSCALLS_POLL = {7, 271}            # poll, ppoll: the worker's loop (select.poll)
SYSCALLS_SELECT = {23, 270}         # select, pselect6: the proxy's supervisor
SYSCALLS_EPOLL = {232, 281, 441}    # epoll_wait, epoll_pwait(2): the server's selector


# -- the machine ----------------------------------------------------------------------------

def machine() -> dict[str, object]:
    """nproc, kernel, python and CPU model: the ``machine`` condition of every result."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "allowed_cpus": len(os.sched_getaffinity(0)),
            "kernel": platform.release(), "python": platform.python_version(), "cpu": model}


def machine_line(info: dict[str, object]) -> str:
    return (f"{info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
            f"Python {info['python']}")


def cpu_pair() -> tuple[int, int]:
    """Two CPUs to place things on: (device CPU, other CPU); the same one on a 1-CPU box."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[-1], cpus[0]) if len(cpus) > 1 else (cpus[0], cpus[0])


@contextmanager
def pinned(cpus: Iterable[int]) -> Iterator[None]:
    """Run the calling thread on ``cpus`` inside the block.

    Affinity is per thread: threads started and processes forked inside the block inherit
    it, which is how a child (UML, a worker) is placed before it runs its first instruction.
    """
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


# -- CPU time -------------------------------------------------------------------------------

def task_cpu_ns(pid: int, tid: int) -> int:
    """Nanoseconds thread ``tid`` of ``pid`` has run; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _stat_cpu_ns(f"/proc/{pid}/task/{tid}/stat")


def _stat_times(path: str) -> tuple[int, int]:
    """(utime, stime) in ns from a ``stat`` file; (0, 0) if it is gone."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return 0, 0
    fields = data[data.rfind(b")") + 2:].split()
    return (int(fields[11]) * 1_000_000_000 // _TICKS, int(fields[12]) * 1_000_000_000 // _TICKS)


def _stat_cpu_ns(path: str) -> int:
    return sum(_stat_times(path))


def sys_ns(pid: int, tid: int | None = None) -> int:
    """Kernel-mode time (stime) of a process (all threads) or one thread, in ns.

    Tick-based (10 ms) and split by sampling: good for the share of a long run only.
    """
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    return _stat_times(path)[1]


def process_cpu_ns(pid: int, exclude_tids: Iterable[int] = ()) -> int:
    """Nanoseconds all live threads of ``pid`` have run, minus ``exclude_tids``."""
    skip = set(exclude_tids)
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return 0
    return sum(task_cpu_ns(pid, tid) for tid in tids if tid not in skip)


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (zombies included: they cost nothing)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def process_name(pid: int) -> str:
    """``/proc/<pid>/comm``, or "?" if the process is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def tree_cpu_ns(pids: Iterable[int]) -> int:
    return sum(process_cpu_ns(p) for p in pids)


def thread_blocked_in(pid: int, tid: int) -> int | None:
    """The syscall number thread ``tid`` is blocked in now (``/proc/.../syscall``), or None."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return None
    return int(first) if first.lstrip("-").isdigit() else None


def worker_thread(pid: int, timeout: float = 2.0) -> int | None:
    """The tid of the one thread of ``pid`` blocked in poll (the unjailed worker), or None.

    The server's threads wait in different calls: the selector in epoll_wait, the proxy's
    supervisor in select, the worker in poll. An idle server shows exactly one poller.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            return None
        pollers = [t for t in tids if thread_blocked_in(pid, t) in SYSCALLS_POLL]
        if len(pollers) == 1:
            return pollers[0]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


@dataclass(frozen=True)
class CpuReading:
    """Wall time and CPU nanoseconds per named party, read at one moment."""

    wall: float
    cpu: dict[str, int]

    def since(self, before: "CpuReading") -> dict[str, float]:
        """Seconds of CPU per party between ``before`` and this reading, plus "wall"."""
        out = {name: (ns - before.cpu.get(name, 0)) / 1e9 for name, ns in self.cpu.items()}
        out["wall"] = self.wall - before.wall
        return out


# -- memory ---------------------------------------------------------------------------------

@dataclass
class Footprint:
    """One process's memory in bytes: resident, proportional, unique, and the guest's part.

    ``uss`` is Private_Clean + Private_Dirty of every mapping. Pages of a MAP_SHARED mapping
    count as private when no other process has them mapped, so a guest-memory page touched
    only by the worker would land in its USS: ``uss_excluding_guest`` subtracts the guest
    memory mapping(s) found by inode, and ``guest_rss``/``guest_private`` say what they held.
    """

    pid: int
    rss: int = 0
    pss: int = 0
    uss: int = 0
    guest_rss: int = 0
    guest_private: int = 0
    guest_shared: int = 0
    guest_mappings: int = 0

    @property
    def uss_excluding_guest(self) -> int:
        return self.uss - self.guest_private


def footprint(pid: int, guest_inodes: Iterable[tuple[int, int]] = ()) -> Footprint:
    """Read ``/proc/<pid>/smaps`` of ``pid``; raises OSError if the process is gone.

    ``guest_inodes`` are the ``(st_dev, st_ino)`` pairs of the guest memory file(s); the
    mappings whose header names that device and inode are the guest's.
    """
    wanted = {(os.major(dev), os.minor(dev), ino) for dev, ino in guest_inodes}
    result = Footprint(pid)
    in_guest = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head, _, rest = line.partition(" ")
            if not head.endswith(":"):
                # A mapping header: "start-end perms offset major:minor inode path".
                parts = line.split()
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                in_guest = (major, minor, int(parts[4])) in wanted
                result.guest_mappings += in_guest
                continue
            key = head[:-1]
            if key not in ("Rss", "Pss", "Private_Clean", "Private_Dirty",
                           "Shared_Clean", "Shared_Dirty"):
                continue
            value = int(rest.split()[0]) * KIB
            if key == "Rss":
                result.rss += value
                if in_guest:
                    result.guest_rss += value
            elif key == "Pss":
                result.pss += value
            elif key.startswith("Private"):
                result.uss += value
                if in_guest:
                    result.guest_private += value
            elif in_guest:
                result.guest_shared += value
    return result


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` as bytes per field (what it sums, without the split)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, sep, rest = line.partition(":")
            fields = rest.split()
            if sep and len(fields) == 2 and fields[1] == "kB":
                out[key] = int(fields[0]) * KIB
    return out


# -- statistics -----------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def p95(values: list[float]) -> float | None:
    """The 95th percentile (nearest rank); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-95 * len(ordered) // 100))
    return ordered[rank - 1]


class Budget:
    """A time budget for the whole run: sections ask before starting optional work."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()
