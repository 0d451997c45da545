"""The kernel's own limit: punching the same PFNs out of guest memory with no device at all.

One ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` per merged range, through ctypes, from this
process. The PFNs are merged the way the device sees them, one 256-PFN buffer at a time
(``device.pfn.compact_pfns``): merging across buffers would turn a scattered permutation
of all of memory into one range, a limit no device that answers buffer by buffer can reach.
"""

from __future__ import annotations

import ctypes
import os
import time

from device.pfn import compact_pfns

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
PAGE = 4096
PFNS_PER_BUFFER = 256

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def punch(fd: int, offset: int, length: int) -> None:
    """Free ``[offset, offset+length)`` of ``fd``; raises OSError."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE) at {offset:#x}+{length:#x}: {os.strerror(err)}")


def buffer_ranges(pfns: list[int], per_buffer: int = PFNS_PER_BUFFER) -> list[tuple[int, int]]:
    """The merged ranges of ``pfns`` as the device gets them: per 256-PFN buffer."""
    ranges = []
    for i in range(0, len(pfns), per_buffer):
        ranges.extend(compact_pfns(pfns[i:i + per_buffer]))
    return ranges


def punch_ranges(fd: int, ranges: list[tuple[int, int]]) -> float:
    """Punch every ``(first_pfn, count)`` range (guest address == file offset); seconds."""
    start = time.perf_counter()
    for first, count in ranges:
        punch(fd, first * PAGE, count * PAGE)
    return time.perf_counter() - start


# -- the pages a real guest's balloon freed ----------------------------------------------------

def file_extents(path: str) -> tuple[int, list[tuple[int, int]]]:
    """``(size, [(lo, hi), ...])``: the byte ranges of ``path`` backed by memory now."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        extents, pos = [], 0
        while pos < size:
            try:
                lo = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:            # ENXIO: nothing but holes from here
                break
            hi = os.lseek(fd, lo, os.SEEK_HOLE)
            extents.append((lo, hi))
            pos = hi
        return size, extents
    finally:
        os.close(fd)


def freed_extents(before: list[tuple[int, int]],
                  after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The byte ranges backed in ``before`` and not in ``after`` (both sorted, disjoint)."""
    freed, j = [], 0
    for lo, hi in before:
        pos = lo
        while j < len(after) and after[j][1] <= pos:
            j += 1
        k = j
        while pos < hi:
            if k >= len(after) or after[k][0] >= hi:
                freed.append((pos, hi))
                break
            a, b = after[k]
            if a > pos:
                freed.append((pos, a))
            pos = max(pos, b)
            k += 1
    return freed


def split_extents(extents: list[tuple[int, int]],
                  per_call: int = PFNS_PER_BUFFER) -> list[tuple[int, int]]:
    """Byte ranges as ``(first_pfn, count)`` calls of at most ``per_call`` pages (what one
    inflate buffer can free)."""
    calls = []
    for lo, hi in extents:
        pfn, end = lo // PAGE, hi // PAGE
        while pfn < end:
            count = min(per_call, end - pfn)
            calls.append((pfn, count))
            pfn += count
    return calls
