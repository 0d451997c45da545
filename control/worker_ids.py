"""A uid (and a gid of the same number) for each jailed worker that no other process uses.

When ``serve`` runs as root, each worker switches to its own uid, so no
other process on the host can signal it, ptrace it or read its ``/proc`` files: not another
VM's worker, not some unrelated process running as ``nobody``. The uid comes from a range
(``--worker-ids FIRST-LAST``, default ``DEFAULT_WORKER_IDS``) and is skipped if this
process holds it for another worker or any process on the host runs with it.

The default range, 0x7E000000-0x7E00FFFF, lies in the part of the 32-bit id space that
systemd's "UID and GID ranges" documentation leaves unassigned (above the container ranges,
below the signed-overflow half and the foreign range 0x7FFE0000), and that no distribution
hands to users.

Unprivileged, a worker runs in a user namespace whose root maps to one of the caller's
*subordinate* ids (``/etc/subuid`` and ``/etc/subgid``, written by ``newuidmap`` from
Debian's ``uidmap``), again one no process uses; ``--worker-ids`` then narrows the
subordinate ranges. The caller owns that namespace, so processes of the caller's own user can
still signal the worker, as they could ``serve`` itself (one principal); nothing else can, and
a worker that escaped its namespaces would hold none of the caller's files. Without
subordinate ids the namespace maps the caller's own uid (the only id it may map unaided),
and ``serve`` says so once in its log.
"""

from __future__ import annotations

import logging
import os
import pwd
import random

from sandbox import idmap

log = logging.getLogger("vballoon.worker_ids")

DEFAULT_WORKER_IDS = (0x7E00_0000, 0x7E00_FFFF)
MAX_ID = 0xFFFF_FFFE               # (uid_t)-1 means "unchanged" to setresuid

_held: set[int] = set()            # ids this process has given to workers still running
_warned: set[str] = set()          # reasons already logged (each once per process)


def parse_range(text: str) -> tuple[int, int]:
    """``FIRST-LAST`` -> (first, last); raises ``ValueError`` with a readable message."""
    first, sep, last = text.partition("-")
    try:
        low, high = int(first, 0), int(last, 0)
    except ValueError:
        raise ValueError(f"bad id range {text!r}: use FIRST-LAST, e.g. "
                         f"{DEFAULT_WORKER_IDS[0]}-{DEFAULT_WORKER_IDS[1]}") from None
    if not sep or not 1000 <= low <= high <= MAX_ID:
        raise ValueError(f"bad id range {text!r}: FIRST-LAST with 1000 <= FIRST <= LAST "
                         f"<= {MAX_ID}")
    return low, high


def ids_in_use() -> set[int]:
    """Every uid and gid a process on the host runs with now (real, effective, saved, fs)."""
    used: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith((b"Uid:", b"Gid:")):
                        used.update(int(v) for v in line.split()[1:])
        except OSError:
            continue                 # it ended while we looked
    return used


def acquire(ranges: list[tuple[int, int]]) -> int:
    """An id from ``ranges`` that no worker of ours and no process on the host uses.

    Starts at a random place, so two servers sharing a range rarely race for the same id.
    Raises ``OSError(EAGAIN)`` if every id is taken.
    """
    used = ids_in_use() | _held
    total = sum(high - low + 1 for low, high in ranges)
    start = random.randrange(total) if total else 0
    for step in range(total):
        candidate = _nth(ranges, (start + step) % total)
        if candidate not in used:
            _held.add(candidate)
            return candidate
    shown = ", ".join(f"{low}-{high}" for low, high in ranges) or "no range"
    raise OSError(11, f"every worker id in {shown} is in use")


def _nth(ranges: list[tuple[int, int]], index: int) -> int:
    for low, high in ranges:
        if index <= high - low:
            return low + index
        index -= high - low + 1
    raise IndexError(index)


def unprivileged_ranges(requested: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The ids an unprivileged ``serve`` may give its workers: its subordinate ids (within
    ``requested`` if given). Empty, with a warning logged once, when there are none or the
    helpers that map them are missing."""
    if not idmap.helpers_available():
        _warn_once("helpers", "newuidmap/newgidmap are not installed (Debian package uidmap): "
                   "each worker's user namespace maps your own uid, so your other processes "
                   "share its host uid")
        return []
    uid = os.geteuid()
    ranges = subordinate_ranges(uid)
    if requested is not None:
        ranges = _intersect(ranges, [requested])
    if not ranges:
        where = f" inside --worker-ids {requested[0]}-{requested[1]}" if requested else ""
        _warn_once("ranges", f"uid {uid} has no ids in both /etc/subuid and /etc/subgid{where}: "
                   "each worker's user namespace maps your own uid; add a range (e.g. "
                   "usermod --add-subuids/--add-subgids) to give each worker its own")
    return ranges


def _warn_once(key: str, text: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", text)


def subordinate_ranges(uid: int, subuid: str = "/etc/subuid",
                       subgid: str = "/etc/subgid") -> list[tuple[int, int]]:
    """The ids both subordinate to ``uid`` (by name or number) in ``subuid`` and in
    ``subgid``, as sorted disjoint (first, last) ranges; a worker's uid and gid are one
    number, so it must be delegated as both."""
    names = {str(uid)}
    try:
        names.add(pwd.getpwuid(uid).pw_name)
    except KeyError:
        pass                         # a uid without a passwd entry: numeric lines only
    return _intersect(_read_subordinate(subuid, names), _read_subordinate(subgid, names))


def _read_subordinate(path: str, names: set[str]) -> list[tuple[int, int]]:
    ranges = []
    try:
        with open(path) as f:
            for line in f:
                owner, _, rest = line.strip().partition(":")
                first, _, count = rest.partition(":")
                if owner in names and first.isdigit() and count.isdigit() and int(count) > 0:
                    ranges.append((int(first), int(first) + int(count) - 1))
    except OSError:
        return []
    return ranges


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = [(max(l1, l2), min(h1, h2)) for l1, h1 in a for l2, h2 in b if max(l1, l2) <= min(h1, h2)]
    merged: list[tuple[int, int]] = []
    for low, high in sorted(out):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return [(max(low, 1), min(high, MAX_ID)) for low, high in merged if high >= 1 and low <= MAX_ID]


def release(ident: int | None) -> None:
    if ident is not None:
        _held.discard(ident)
