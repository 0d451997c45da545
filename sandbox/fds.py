"""Which fds the jailed child holds, at which numbers, and how it gets there.

`plan_fds` runs in the parent and is pure: it decides the child's fd table.
`arrange_fds` and `close_all_except` run in the forked child and make it so.

Layout of the worker's fd table (N = RLIMIT_NOFILE of the worker)::

    0, 1, 2         kept fds mapped there, else /dev/null
    targets         the keep fds, at their own numbers or renumbered
    < N             free slots for what the worker opens itself (epoll, mmap dups)
    N               the set-up channel to the parent, closed before the callable runs
    N+1             the "lifeline": a pidfd of the set-up process, closed before the
                    callable runs

The channel sits at N, a number no fd can take once RLIMIT_NOFILE is N, so the
seccomp rule that lets the worker close it and send on it dies with it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from sandbox import syscalls

STDIO = (0, 1, 2)


@dataclass(frozen=True)
class FdPlan:
    """The decided fd layout of the child (see the module docstring)."""

    moves: tuple[tuple[int, int], ...]
    """(fd in the parent, fd in the child) pairs, sorted by the child's number."""
    nofile: int
    """RLIMIT_NOFILE of the worker; also the channel's number."""
    listener: int
    """Lowest fd number free below `nofile` in the worker: where the seccomp
    listener lands in log mode; -1 when there is none."""

    @property
    def targets(self) -> tuple[int, ...]:
        return tuple(dst for _, dst in self.moves)

    @property
    def channel(self) -> int:
        return self.nofile

    @property
    def lifeline(self) -> int:
        return self.nofile + 1

    @property
    def worker_fds(self) -> frozenset[int]:
        """Exactly the fds the callable starts with."""
        return frozenset(self.targets) | frozenset(STDIO)


def normalise_keep(keep_fds: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated keep fds. Raises ValueError on a negative or non-int fd."""
    fds = tuple(sorted(set(keep_fds)))
    for fd in fds:
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise ValueError(f"keep fds must be non-negative ints, got {fd!r}")
    return fds


def target_map(keep: Sequence[int], renumber: None | int | Mapping[int, int]) -> dict[int, int]:
    """parent fd -> child fd for sorted `keep`.

    renumber None keeps numbers, an int n numbers them n, n+1, ... in order, a
    mapping must name every keep fd exactly. Raises ValueError on a bad mapping.
    """
    if renumber is None:
        return {fd: fd for fd in keep}
    if isinstance(renumber, int) and not isinstance(renumber, bool):
        if renumber < 0:
            raise ValueError("renumber start must be >= 0")
        return {fd: renumber + index for index, fd in enumerate(keep)}
    mapping = dict(renumber)
    if set(mapping) != set(keep):
        raise ValueError(f"renumber mapping keys {sorted(mapping)} must equal the keep fds {list(keep)}")
    targets = list(mapping.values())
    if len(set(targets)) != len(targets) or any(not isinstance(t, int) or t < 0 for t in targets):
        raise ValueError("renumber mapping targets must be distinct non-negative ints")
    return mapping


def plan_fds(keep: Sequence[int], renumber: None | int | Mapping[int, int], headroom: int) -> FdPlan:
    """Decide the child's fd table. `headroom` is how many fds above the highest
    target the worker may open. Raises ValueError on bad input."""
    if headroom < 0:
        raise ValueError("nofile headroom must be >= 0")
    mapping = target_map(normalise_keep(keep), renumber)
    moves = tuple(sorted(mapping.items(), key=lambda pair: pair[1]))
    highest = max([*mapping.values(), *STDIO])
    nofile = highest + 1 + headroom
    used = set(mapping.values()) | set(STDIO)
    listener = next((fd for fd in range(nofile) if fd not in used), -1)
    return FdPlan(moves, nofile, listener)


def close_all_except(keep: Iterable[int]) -> None:
    """Close every fd of this process except `keep`, including fds Python or the
    parent opened without our knowledge. Uses close_range on the gaps."""
    start = 0
    for fd in sorted(set(keep)):
        if fd > start:
            syscalls.close_range(start, fd - 1)
        start = fd + 1
    syscalls.close_range(start, syscalls.UINT_MAX)


def ensure_fd_room(highest: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE so fd numbers up to `highest` can be
    allocated. Raises OSError(EMFILE) if the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if highest < soft:
        return
    if hard != resource.RLIM_INFINITY and highest >= hard:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), f"fd {highest} needs RLIMIT_NOFILE above its hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))


def arrange_fds(moves: Sequence[tuple[int, int]]) -> None:
    """In the child: make each (src, dst) of `moves` hold what src held, point
    0/1/2 at /dev/null unless a dst, and close every other fd.

    Sources and destinations may overlap in any way (a swap of 3 and 4 works):
    every source is first duplicated above all numbers involved. Raises
    OSError(EBADF) naming the fd when a source is not open.
    """
    destinations = {dst for _, dst in moves}
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    base = max([devnull, *STDIO, *(src for src, _ in moves), *destinations]) + 1
    ensure_fd_room(base + len(moves) + 1)
    parked: list[tuple[int, int]] = []
    for src, dst in moves:
        try:
            parked.append((fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, base), dst))
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, f"keep fd {src}") from None
    parked_null = fcntl.fcntl(devnull, fcntl.F_DUPFD_CLOEXEC, base)
    close_all_except([tmp for tmp, _ in parked] + [parked_null])
    for tmp, dst in parked:
        os.dup2(tmp, dst)
    for fd in STDIO:
        if fd not in destinations:
            os.dup2(parked_null, fd)
    close_all_except(destinations | set(STDIO))
