"""The balloon device in-process, driven by the fake Linux driver over real memfd memory."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from device.balloon import (STATS_QUEUE, Balloon,
                            BalloonOptions, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
                            VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_PAGE_POISON,
                            VIRTIO_BALLOON_F_REPORTING,
                            VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_F_VERSION_1, queue_layout)
from device.config import ACTUAL_OFFSET, POISON_VAL_OFFSET
from device.errors import ConfigAccessError, FeatureError, InvalidTarget
from device.stats import VIRTIO_BALLOON_S_MEMFREE, VIRTIO_BALLOON_S_MEMTOT
from tests.conftest import make_inprocess
from device.memory import GuestMemory, MemoryRegion
from device.release import PageReleaser
from tests.driver import MIB, PAGE, BalloonDriver, linux_acks


def test_inflate_frees_host_memory(ram, inprocess):
    balloon, driver = inprocess
    ram.populate()
    before = ram.host_bytes()
    assert before == 64 * MIB
    driver.inflate(16 * MIB // PAGE)
    assert before - ram.host_bytes() == 16 * MIB
    assert balloon.config.actual == 16 * MIB // PAGE
    assert balloon.queues.counters.released_pages == 16 * MIB // PAGE


def test_madv_dontneed_frees_nothing_on_shared_memory(ram):
    """The control for the test above: the seed's MADV_DONTNEED would have freed nothing."""
    ram.populate()
    before = ram.host_bytes()
    ram.map.madvise(mmap.MADV_DONTNEED, 32 * MIB, 16 * MIB)
    assert ram.host_bytes() == before


def test_deflate_acknowledges_and_pages_come_back(ram, inprocess):
    balloon, driver = inprocess
    ram.populate()
    pfns = driver.inflate(1024)
    driver.deflate(1024)
    assert balloon.config.actual == 0
    assert balloon.queues.counters.deflated_pages == 1024
    # A deflated page is usable again: the guest writes it and the host backs it anew.
    low = min(pfns) * PAGE
    before = ram.host_bytes()
    ram.map[low:low + PAGE] = b"\x01" * PAGE
    assert ram.host_bytes() == before + PAGE


def test_inflate_batches_of_buffers(ram, inprocess):
    balloon, driver = inprocess
    ram.populate()
    driver.inflate(32 * MIB // PAGE, batch=32)
    assert ram.host_bytes() == 32 * MIB


def test_queue_layout_follows_negotiated_features():
    assert queue_layout(0) == ("inflate", "deflate")
    assert queue_layout(1 << VIRTIO_BALLOON_F_REPORTING) == ("inflate", "deflate", "reporting")
    both = 1 << VIRTIO_BALLOON_F_STATS_VQ | 1 << VIRTIO_BALLOON_F_REPORTING
    assert queue_layout(both) == ("inflate", "deflate", "stats", "reporting")


def test_every_feature_can_be_switched_off():
    none = BalloonOptions(must_tell_host=False, stats=False, deflate_on_oom=False,
                          free_page_reporting=False, version_1=False, event_idx=False,
                          indirect=False)
    assert none.features() == 0
    full = BalloonOptions(deflate_on_oom=True, free_page_reporting=True).features()
    for bit in (VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_STATS_VQ,
                VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING, VIRTIO_F_VERSION_1):
        assert full >> bit & 1


def test_unoffered_features_are_refused():
    balloon = Balloon(BalloonOptions(stats=False))
    with pytest.raises(FeatureError):
        balloon.ack_features(1 << VIRTIO_BALLOON_F_STATS_VQ)
    assert balloon.acked_features == 0


def test_target_raises_config_change_and_is_bounded(ram, inprocess):
    balloon, _ = inprocess
    changes = []
    balloon.on_config_change = lambda: changes.append(balloon.config.num_pages)
    balloon.set_target_pages(100)
    balloon.set_target_pages(100)
    assert changes == [100]
    assert balloon.read_config(0, 4) == struct.pack("<I", 100)
    with pytest.raises(InvalidTarget):
        balloon.set_target_pages(ram.size // PAGE + 1)
    with pytest.raises(InvalidTarget):
        balloon.set_target_pages(-1)
    with pytest.raises(InvalidTarget):
        balloon.adjust_pages(-101)
    with pytest.raises(InvalidTarget):
        balloon.set_target_bytes(-4096)
    assert balloon.config.num_pages == 100
    assert balloon.set_target_bytes(8192 + 100) == 2


def test_driver_may_write_only_actual(ram):
    balloon, driver = make_inprocess(ram, BalloonOptions(free_page_reporting=True, page_poison=False))
    balloon.write_config(ACTUAL_OFFSET, struct.pack("<I", 7))
    for offset, data in [(16, b"\0" * 4), (4, b""), (14, b"\0" * 4), (-4, b"\0" * 4)]:
        with pytest.raises(ConfigAccessError):          # outside config space: refused
            balloon.write_config(offset, data)
    assert balloon.config.actual == 7
    for offset, data in [(0, b"\xff" * 4), (8, b"\xff" * 4), (12, b"\xff" * 4)]:
        balloon.write_config(offset, data)              # read-only bytes: ignored
    assert (balloon.config.num_pages, balloon.config.actual, balloon.config.poison_val) == \
        (0, 7, 0)
    assert balloon.read_config(16, 4) == b""
    assert balloon.read_config(14, 4) == b"\0\0"
    balloon.reset()
    driver.close()


def test_stats_arrive_and_refresh_on_request(inprocess):
    balloon, driver = inprocess
    driver.send_stats({VIRTIO_BALLOON_S_MEMFREE: 1000, VIRTIO_BALLOON_S_MEMTOT: 5000, 99: 1})
    assert balloon.queues.stats.values == {"free_memory": 1000, "total_memory": 5000}
    assert balloon.queues.request_stats()
    driver.refresh_stats({VIRTIO_BALLOON_S_MEMFREE: 900, VIRTIO_BALLOON_S_MEMFREE + 1: 4})
    assert balloon.queues.stats.values == {"free_memory": 900, "total_memory": 4}
    assert balloon.queues.counters.stats_updates == 2


def test_stats_polling_interval_hands_the_buffer_back(ram):
    balloon, driver = make_inprocess(ram, BalloonOptions(stats_interval=5.0))
    driver.send_stats({VIRTIO_BALLOON_S_MEMFREE: 1})
    now = balloon.queues._last_stats_request
    balloon.queues.tick(now + 1.0)
    assert driver.queues[STATS_QUEUE].take_used() == []
    balloon.queues.tick(now + 5.0)
    assert len(driver.queues[STATS_QUEUE].take_used()) == 1
    driver.close()


def test_free_page_reporting_releases_reported_ranges(ram, inprocess):
    balloon, driver = inprocess
    ram.populate()
    driver.report([(16 * MIB, 4 * MIB), (24 * MIB, 4 * MIB)])
    assert ram.host_bytes() == 56 * MIB
    assert balloon.queues.counters.reported_bytes == 8 * MIB


def test_snapshot_restores_negotiation_and_config(inprocess):
    balloon, driver = inprocess
    balloon.set_target_pages(42)
    driver.set_actual(40)
    other = Balloon(balloon.options)
    other.restore(balloon.snapshot())
    assert other.acked_features == balloon.acked_features
    assert (other.config.num_pages, other.config.actual) == (42, 40)


def test_huge_pages_are_released_only_when_whole(ram):
    """A 2 MiB backing page is released once all 512 of its small pages are ballooned."""
    # The memfd stands in for hugetlbfs: the release granularity is what is tested here.
    balloon = Balloon()
    balloon.ack_features(balloon.device_features)
    driver = BalloonDriver(ram, balloon.queue_names(), balloon.acked_features,
                           balloon.write_config, balloon.process_queue)
    balloon.activate([MemoryRegion(0, ram.size, ram.fd, page_size=2 * MIB)], driver.specs())
    ram.populate()
    driver.inflate(256)                     # half of the topmost huge page
    assert ram.host_bytes() == 64 * MIB
    assert balloon.queues.counters.pending_pages == 256
    driver.inflate(256)                     # the other half: now it goes
    assert ram.host_bytes() == 62 * MIB
    driver.inflate(256)
    driver.deflate(128)                     # taken back before its huge page completed
    assert balloon.queues.counters.pending_pages == 128
    driver.inflate(128 + 256)
    assert ram.host_bytes() == 60 * MIB
    balloon.reset()
    driver.close()


def test_unaligned_range_across_a_huge_page_boundary_frees_only_whole_pages(ram):
    """PFNs 384..639 straddle the 2 MiB boundary at 512: neither huge page is complete,
    and after 0..255 the first still misses 256..383 — nothing may be released."""
    with GuestMemory([MemoryRegion(0, ram.size, ram.fd, page_size=2 * MIB)]) as memory:
        ram.populate()
        releaser = PageReleaser(memory)
        releaser.release_pfns([(384, 256)])
        releaser.release_pfns([(0, 256)])
        assert ram.host_bytes() == ram.size
        assert releaser.counters.pending_pages == 512
        releaser.release_pfns([(256, 128)])                # completes huge page 0
        assert ram.host_bytes() == ram.size - 2 * MIB
        assert releaser.counters.pending_pages == 128      # 512..639 wait for page 1


@pytest.fixture
def hugetlb_fd():
    """A real 16 MiB hugetlbfs memfd, filled with 0x01 (skipped where the machine has none)."""
    try:
        fd = os.memfd_create("huge", os.MFD_HUGETLB | os.MFD_CLOEXEC)
    except OSError as exc:
        pytest.skip(f"no hugetlbfs memfd here: {exc}")
    os.close(fd)
    nr = "/proc/sys/vm/nr_hugepages"
    old = open(nr).read().strip()
    try:
        with open(nr, "w") as f:
            f.write(str(int(old) + 16))
    except OSError as exc:
        pytest.skip(f"cannot reserve huge pages: {exc}")
    try:
        fd = os.memfd_create("huge", os.MFD_HUGETLB | os.MFD_CLOEXEC)
        os.ftruncate(fd, 16 * MIB)
        with mmap.mmap(fd, 16 * MIB) as m:
            m[:] = b"\x01" * (16 * MIB)
        yield fd
        os.close(fd)
    finally:
        with open(nr, "w") as f:
            f.write(old)


def test_real_hugetlbfs_memory_is_released(hugetlb_fd):
    """On a real hugetlbfs memfd, whole 2 MiB pages go back to the host."""
    region = MemoryRegion.from_fd(hugetlb_fd, 0, 16 * MIB)
    assert region.page_size == 2 * MIB
    with GuestMemory([region]) as memory:
        releaser = PageReleaser(memory)
        free_before = _huge_free()
        releaser.release_pfns([(0, 256)])        # half a huge page: nothing yet
        assert _huge_free() == free_before
        releaser.release_pfns([(256, 256 + 512)])  # completes page 0 and all of page 1
        assert _huge_free() == free_before + 2


def test_real_hugetlbfs_report_then_inflate_keeps_guest_data(hugetlb_fd):
    """Issue 10.2 on real hugetlbfs: a reported half huge page, reused by the guest, is not
    punched when the other half is inflated."""
    region = MemoryRegion.from_fd(hugetlb_fd, 0, 16 * MIB)
    with GuestMemory([region]) as memory, mmap.mmap(hugetlb_fd, 16 * MIB) as view:
        releaser = PageReleaser(memory)
        free_before = _huge_free()
        releaser.release_report(0, MIB)            # half of huge page 0: nothing freed
        view[0:PAGE] = b"\xcd" * PAGE              # the guest reuses it
        releaser.release_pfns([(256, 256)])        # the other half, inflated
        assert view[0:PAGE] == b"\xcd" * PAGE
        assert _huge_free() == free_before
        releaser.release_report(2 * MIB, 3 * MIB)  # huge page 1 whole, half of page 2
        assert _huge_free() == free_before + 1


def _huge_free() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    raise AssertionError("no HugePages_Free in /proc/meminfo")


def _huge_reporting_balloon(ram, page_size: int):
    balloon = Balloon(BalloonOptions(free_page_reporting=True))
    balloon.ack_features(linux_acks(balloon.device_features))
    driver = BalloonDriver(ram, balloon.queue_names(), balloon.acked_features,
                           balloon.write_config, balloon.process_queue)
    balloon.activate([MemoryRegion(0, ram.size, ram.fd, page_size=page_size)], driver.specs())
    return balloon, driver


def test_report_on_huge_pages_never_releases_a_page_the_guest_reuses(ram):
    """Regression (issue 10.2): a report of half a huge page used to be remembered; after
    the guest reused those pages, inflating the other half punched the whole huge page and
    zeroed what the guest had written."""
    balloon, driver = _huge_reporting_balloon(ram, 2 * MIB)
    ram.populate()
    top = ram.size - 2 * MIB                        # the driver inflates from the top down
    driver.report([(top, MIB)])                     # the lower half of the top huge page
    assert ram.host_bytes() == ram.size             # half a huge page frees nothing
    assert balloon.queues.counters.pending_pages == 0
    ram.map[top:top + PAGE] = b"\xab" * PAGE        # the guest reuses a reported page
    driver.inflate(256)                             # the upper half of the same huge page
    assert ram.map[top:top + PAGE] == b"\xab" * PAGE
    assert ram.host_bytes() == ram.size
    assert balloon.queues.counters.pending_pages == 256
    balloon.reset()
    driver.close()


def test_report_releases_only_whole_huge_pages_inside_it(ram):
    balloon, driver = _huge_reporting_balloon(ram, 2 * MIB)
    ram.populate()
    driver.report([(MIB, 4 * MIB)])                 # 1 MiB .. 5 MiB: only 2..4 MiB is whole
    assert ram.host_bytes() == ram.size - 2 * MIB
    assert balloon.queues.counters.pending_pages == 0
    driver.report([(0, MIB)])                       # the rest of huge page 0, reported later
    assert ram.host_bytes() == ram.size - 2 * MIB   # still holds what huge page 0 held
    balloon.reset()
    driver.close()


def test_huge_page_collection_is_a_bounded_bitmap(ram):
    """Scattered inflates on 1 GiB-declared pages cost a bitmap, not a set of PFNs."""
    with GuestMemory([MemoryRegion(0, ram.size, ram.fd, page_size=ram.size)]) as memory:
        releaser = PageReleaser(memory)
        releaser.release_pfns([(pfn, 1) for pfn in range(0, ram.size // PAGE - 1, 2)])
        assert releaser.counters.pending_pages == ram.size // PAGE // 2
        partial = releaser.partial_pages()
        assert list(partial) == [0] and partial[0].bit_length() <= ram.size // PAGE
        releaser.reclaim_pfns([(0, ram.size // PAGE)])
        assert releaser.counters.pending_pages == 0 and not releaser.partial_pages()


def test_config_write_of_the_whole_space_applies_only_actual(inprocess):
    """QEMU's generic device writes all of config space with its cached, possibly stale,
    num_pages: only ``actual`` is taken (issue 11.1)."""
    balloon, _ = inprocess
    balloon.set_target_pages(300)
    balloon.write_config(0, struct.pack("<II", 123, 256))          # stale num_pages 123
    assert (balloon.config.num_pages, balloon.config.actual) == (300, 256)
    balloon.write_config(0, struct.pack("<IIII", 1, 288, 9, 9))    # all 16 bytes
    assert (balloon.config.num_pages, balloon.config.actual) == (300, 288)
    assert balloon.config.free_page_hint_cmd_id == 0
    assert balloon.poison_val is None          # offered, so stored, but not negotiated: unused


# -- PAGE_POISON (issue 15) --------------------------------------------------------------------

def test_page_poison_is_offered_with_reporting_and_can_be_switched_off():
    with_reporting = BalloonOptions(free_page_reporting=True).features()
    assert with_reporting >> VIRTIO_BALLOON_F_PAGE_POISON & 1
    assert not BalloonOptions(free_page_reporting=True, page_poison=False).features() \
        >> VIRTIO_BALLOON_F_PAGE_POISON & 1
    assert not BalloonOptions().features() >> VIRTIO_BALLOON_F_PAGE_POISON & 1


def test_poison_val_is_writable_once_offered_and_used_once_negotiated(ram):
    """Writable when offered: QEMU tells a vhost-user back-end the features only at
    DRIVER_OK, after Linux's probe wrote poison_val. Used only when negotiated."""
    for options, poisons, stored, used in [
            (BalloonOptions(free_page_reporting=True, page_poison=False), False, 0, None),
            (BalloonOptions(free_page_reporting=True), False, 0xAAAAAAAA, None),
            (BalloonOptions(free_page_reporting=True), True, 0xAAAAAAAA, 0xAAAAAAAA)]:
        balloon = Balloon(options)
        balloon.write_config(POISON_VAL_OFFSET, struct.pack("<I", 0xAAAAAAAA))   # before features
        balloon.ack_features(linux_acks(balloon.device_features, poisons=poisons))
        assert balloon.config.poison_val == stored
        assert balloon.poison_val == used


def _poisoning(ram, options=BalloonOptions(free_page_reporting=True)):
    """An in-process balloon whose driver accepted PAGE_POISON (init_on_free or page_poison)."""
    balloon = Balloon(options)
    balloon.ack_features(linux_acks(balloon.device_features, poisons=True))
    driver = BalloonDriver(ram, balloon.queue_names(), balloon.acked_features,
                           write_config=balloon.write_config, service=balloon.process_queue)
    balloon.activate([ram.region()], driver.specs())
    return balloon, driver


@pytest.mark.parametrize("poisons, written, released", [
    (False, None, True),           # the driver turned PAGE_POISON down: the spec lets us
    (True, 0, True),               # init_on_free: zeroes are what it expects
    (True, 0xAAAAAAAA, False),     # page_poison=1: zeroes would be corruption
    (True, None, False),           # negotiated but not written yet: unknown, keep
])
def test_reported_pages_are_released_only_if_the_guest_expects_zeroes(ram, poisons, written, released):
    balloon, driver = _poisoning(ram) if poisons else make_inprocess(ram, BalloonOptions(free_page_reporting=True))
    if written is not None:
        balloon.write_config(POISON_VAL_OFFSET, struct.pack("<I", written))
    ram.populate()
    before = ram.host_bytes()
    driver.report([(16 * MIB, 4 * MIB), (24 * MIB, 4 * MIB)])        # the buffer comes back either way
    counters = balloon.queues.counters
    assert counters.reported_bytes == 8 * MIB
    if released:
        assert before - ram.host_bytes() == 8 * MIB and counters.report_skipped_bytes == 0
    else:
        assert ram.host_bytes() == before and counters.report_skipped_bytes == 8 * MIB
        assert bytes(ram.map[16 * MIB:16 * MIB + 8]) == b"\xa5" * 8       # contents untouched
    balloon.reset()
    driver.close()


def test_a_poison_value_written_while_active_applies_to_the_next_report(ram):
    balloon, driver = _poisoning(ram)
    ram.populate()
    before = ram.host_bytes()
    driver.report([(16 * MIB, 4 * MIB)])
    assert ram.host_bytes() == before                                   # unknown yet: kept
    balloon.write_config(POISON_VAL_OFFSET, struct.pack("<I", 0))
    driver.report([(16 * MIB, 4 * MIB)])
    assert before - ram.host_bytes() == 4 * MIB
    balloon.reset()
    driver.close()


def test_snapshot_carries_the_poison_value(ram):
    balloon, driver = _poisoning(ram)
    balloon.write_config(POISON_VAL_OFFSET, struct.pack("<I", 0xAAAAAAAA))
    other = Balloon(balloon.options)
    other.restore(balloon.snapshot())
    assert other.poison_val == 0xAAAAAAAA
    balloon.reset()
    assert balloon.poison_val is None                                    # a reset forgets it
    driver.close()


# -- the empty-kick budget (device.kicks) -----------------------------------------------------

def test_only_empty_wakeups_in_a_row_spend_the_kick_budget():
    from device.kicks import KickBudget
    budget = KickBudget(rate=10.0, burst=2.0)
    # A busy guest: each empty wake-up follows one that found buffers: never paused.
    for step in range(100):
        budget.found()
        assert budget.spend(step * 1e-3) == 0.0
    # A flood: the first empty one is free, two more take the burst, then 1/rate pauses.
    budget.found()
    assert [budget.spend(1.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.spend(1.0) == pytest.approx(0.1)
    # Refilled over time at ``rate``: the debt of one token, and one more, 0.25 s later.
    assert budget.spend(1.25) == 0.0
