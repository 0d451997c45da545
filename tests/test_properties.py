"""Property tests for the pure pieces and the guest-facing decoders.

The invariant for decoders of guest input: decode it or raise the package's own error,
never anything else, and never touch memory outside the guest.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.config import CONFIG_SIZE, BalloonConfig
from device.errors import ConfigAccessError, DeviceError
from device.memory import GuestMemory
from device.pfn import compact_pfn_bytes, compact_pfns
from device.stats import STAT_NAMES, parse_stats
from device.virtqueue import DESC, QueueConfig, SplitQueue
from tests.driver import GuestRam

pfn_lists = st.lists(st.integers(0, 2**32 - 1), max_size=300) | st.builds(
    lambda start, n, step: [start + i * step for i in range(n)],
    st.integers(300, 2**31), st.integers(0, 300), st.sampled_from([-1, 1]))


@given(pfn_lists)
def test_compact_pfns_loses_nothing_and_adds_nothing(pfns):
    ranges = compact_pfns(pfns)
    covered = [pfn for start, count in ranges for pfn in range(start, start + count)]
    assert covered == sorted(set(pfns))
    for (a, n), (b, _) in zip(ranges, ranges[1:]):
        assert a + n < b                     # sorted, disjoint, not even adjacent
    assert all(count > 0 for _, count in ranges)


runs_and_near_runs = st.builds(
    lambda start, n, step, poke: [start + i * step for i in range(n)][:poke[0]]
    + [poke[1]] + [start + i * step for i in range(n)][poke[0] + 1:],
    st.integers(0, 2**32 - 301), st.integers(1, 300), st.sampled_from([-1, 1]),
    st.tuples(st.integers(0, 300), st.integers(0, 2**32 - 1)))


@given(pfn_lists | runs_and_near_runs)
def test_compact_pfn_bytes_is_compact_pfns_of_the_le32_values(pfns):
    """The arithmetic shortcut for whole runs never accepts anything else: runs with
    one PFN changed (or none), anywhere in u32 space, and arbitrary lists."""
    pfns = [p for p in pfns if 0 <= p < 2**32]
    data = b"".join(p.to_bytes(4, "little") for p in pfns)
    assert compact_pfn_bytes(data) == compact_pfns(pfns)


def test_buffers_of_ever_new_sizes_cost_no_more_than_reading_them():
    """A guest chooses each buffer's length (up to 16384 PFNs): the constants for a new
    length must be built in time linear in it. Built the obvious way (a sum of shifted
    ints) they cost ~0.15 s each at that size, so these 400 lengths would keep the worker
    away from its parent for a minute; built from bytes, they take well under a second."""
    import time
    from device.pfn import _run_constants
    _run_constants.cache_clear()
    start = time.process_time()
    for n in range(16384 - 400, 16385):
        assert compact_pfn_bytes((7).to_bytes(4, "little") * n) == [(7, 1)]
    assert time.process_time() - start < 20.0


@given(st.integers(-8, CONFIG_SIZE + 8), st.integers(-1, CONFIG_SIZE + 8))
def test_config_read_at_every_offset_and_length(offset, length):
    config = BalloonConfig(1, 2, 3, 4)
    try:
        data = config.read(offset, length)
    except ConfigAccessError:
        assert offset < 0 or length < 0
        return
    assert data == config.pack()[offset:offset + length]
    assert len(data) <= max(0, min(length, CONFIG_SIZE - offset))


@given(st.integers(-8, CONFIG_SIZE + 8), st.binary(max_size=CONFIG_SIZE + 8), st.booleans())
def test_config_write_is_all_or_nothing(offset, data, poison):
    config = BalloonConfig(1, 2, 3, 4)
    before = config.pack()
    try:
        config.write(offset, data, poison_writable=poison)
    except ConfigAccessError:
        assert config.pack() == before
        return
    assert 0 <= offset and data and offset + len(data) <= CONFIG_SIZE   # refused otherwise
    after = config.pack()
    # Each byte is the one written if it belongs to a writable field, else unchanged.
    writable = set(range(4, 8)) | (set(range(12, 16)) if poison else set())
    for i in range(CONFIG_SIZE):
        written = offset <= i < offset + len(data) and i in writable
        assert after[i] == (data[i - offset] if written else before[i])


@given(st.binary(max_size=400))
def test_stats_decode_or_raise_own_error(data):
    try:
        values = parse_stats(data)
    except DeviceError:
        assert len(data) % 10
        return
    assert set(values) <= set(STAT_NAMES.values())


RAM = GuestRam(1 << 20, "prop-ram")
QSIZE = 16


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1) | st.integers(0, 1 << 20),
                          st.integers(0, 2**32 - 1) | st.integers(0, 4096),
                          st.integers(0, 7), st.integers(0, 2 * QSIZE)),
                min_size=QSIZE, max_size=QSIZE),
       st.lists(st.integers(0, 2 * QSIZE), min_size=1, max_size=QSIZE),
       st.integers(0, 2 * QSIZE))
def test_descriptor_walking_never_escapes(table, heads, avail_idx):
    """Random descriptor tables: chains come out inside memory or our own error is raised."""
    desc_addr, avail_addr, used_addr = 0, 4096, 8192
    for i, (addr, length, flags, nxt) in enumerate(table):
        DESC.pack_into(RAM.map, desc_addr + 16 * i, addr, length, flags, nxt)
    struct.pack_into(f"<HH{len(heads)}H", RAM.map, avail_addr, 0, avail_idx, *heads)
    guard = bytes(RAM.map[12288:])
    with GuestMemory([RAM.region()]) as memory:
        queue = SplitQueue(memory, QueueConfig(QSIZE, desc_addr, avail_addr, used_addr))
        for _ in range(2 * QSIZE):
            try:
                chain = queue.pop()
            except DeviceError:
                if queue.broken is not None:
                    break
                continue
            if chain is None:
                break
            for d in chain.readable + chain.writable:
                assert 0 <= d.addr and d.addr + d.length <= RAM.size
            queue.add_used(chain.head, 0)
    assert bytes(RAM.map[12288:]) == guard      # nothing written beyond the used ring
