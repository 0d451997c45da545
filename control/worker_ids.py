"""A uid (and a gid of the same number) for each jailed worker that no other process uses.

When ``serve`` runs as root, each worker (and its reaper) switches to its own uid, so no
other process on the host can signal it, ptrace it or read its ``/proc`` files: not another
VM's worker, not some unrelated process running as ``nobody``. The uid comes from a range
(``--worker-ids FIRST-LAST``, default ``DEFAULT_WORKER_IDS``) and is skipped if this
process holds it for another worker or any process on the host runs with it.

The default range, 0x7E000000-0x7E00FFFF, lies in the part of the 32-bit id space that
systemd's "UID and GID ranges" documentation leaves unassigned (above the container ranges,
below the signed-overflow half and the foreign range 0x7FFE0000), and that no distribution
hands to users.

Unprivileged, a worker runs in a user namespace whose only id maps to the caller's own uid:
processes of that same user can signal it, as they could ``serve`` itself (one principal).
"""

from __future__ import annotations

import os
import random

DEFAULT_WORKER_IDS = (0x7E00_0000, 0x7E00_FFFF)
MAX_ID = 0xFFFF_FFFE               # (uid_t)-1 means "unchanged" to setresuid

_held: set[int] = set()            # ids this process has given to workers still running


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


def acquire(id_range: tuple[int, int]) -> int:
    """An id from ``id_range`` that no worker of ours and no process on the host uses.

    Starts at a random place in the range, so two servers sharing a range rarely race for
    the same id. Raises ``OSError(EAGAIN)`` if every id is taken.
    """
    low, high = id_range
    used = ids_in_use() | _held
    size = high - low + 1
    start = random.randrange(size)
    for step in range(size):
        candidate = low + (start + step) % size
        if candidate not in used:
            _held.add(candidate)
            return candidate
    raise OSError(11, f"every worker id in {low}-{high} is in use")


def release(ident: int | None) -> None:
    if ident is not None:
        _held.discard(ident)
