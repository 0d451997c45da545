"""Hostile guest input, one test each: the outcome is pinned, the worker never crashes and
nothing is written outside guest memory."""

from __future__ import annotations

import struct

import pytest

from device.balloon import DEFLATE_QUEUE, INFLATE_QUEUE, STATS_QUEUE, Balloon, QueueSpec
from device.errors import AddressOutOfRange, AvailIndexJump, MisalignedAddress
from device.memory import GuestMemory
from device.virtqueue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                              QueueConfig, SplitQueue)
from tests.driver import MIB, PAGE

pytestmark = pytest.mark.usefixtures("ram")


def errors_of(balloon):
    seen = []
    balloon.queues._on_error = lambda name, exc: seen.append((name, type(exc).__name__))
    return seen


def test_pfn_beyond_guest_memory_is_skipped_and_counted(ram, inprocess):
    balloon, driver = inprocess
    ram.populate()
    beyond = ram.size // PAGE
    driver.send_pfns(INFLATE_QUEUE, [beyond + 5, beyond, 0xFFFF_FFFF, 100])
    counters = balloon.queues.counters
    assert counters.skipped_pages == 3
    assert counters.released_pages == 1
    assert ram.host_bytes() == ram.size - PAGE


def test_write_only_inflate_descriptor_is_returned_unused(ram, inprocess):
    balloon, driver = inprocess
    ram.populate()
    seen = errors_of(balloon)
    queue = driver.queues[INFLATE_QUEUE]
    struct.pack_into("<I", ram.map, queue.scratch, 5000)
    queue.add([], [(queue.scratch, 4)])
    driver.kick(INFLATE_QUEUE)
    assert driver.wait_used(INFLATE_QUEUE, 1)[0][1] == 0
    assert seen == [("inflate", "BadBufferLayout")]
    assert balloon.queues.counters.bad_buffers == 1
    assert ram.host_bytes() == ram.size


def test_inflate_length_not_multiple_of_4_is_rejected_whole(ram, inprocess):
    balloon, driver = inprocess
    ram.populate()
    seen = errors_of(balloon)
    queue = driver.queues[INFLATE_QUEUE]
    struct.pack_into("<II", ram.map, queue.scratch, 5000, 5001)
    queue.add([(queue.scratch, 7)])
    driver.kick(INFLATE_QUEUE)
    driver.wait_used(INFLATE_QUEUE, 1)
    assert seen == [("inflate", "BadBufferLayout")]
    assert ram.host_bytes() == ram.size
    driver.inflate(256)                      # and the queue keeps serving
    assert ram.host_bytes() == ram.size - MIB


def test_descriptor_loop_is_cut_and_returned(ram, inprocess):
    balloon, driver = inprocess
    seen = errors_of(balloon)
    queue = driver.queues[INFLATE_QUEUE]
    queue.write_desc(0, queue.scratch, 4, VIRTQ_DESC_F_NEXT, 1)
    queue.write_desc(1, queue.scratch, 4, VIRTQ_DESC_F_NEXT, 0)
    queue.free.remove(0)
    queue.free.remove(1)
    queue.publish(0)
    driver.kick(INFLATE_QUEUE)
    assert driver.wait_used(INFLATE_QUEUE, 1) == [(0, 0)]
    assert seen == [("inflate", "BadChain")]
    assert balloon.queues.counters.bad_buffers == 1


def test_descriptor_index_beyond_queue_size_is_skipped(ram, inprocess):
    balloon, driver = inprocess
    seen = errors_of(balloon)
    queue = driver.queues[INFLATE_QUEUE]
    queue.publish(queue.size + 3)                     # head outside the table
    queue.write_desc(0, queue.scratch, 4, VIRTQ_DESC_F_NEXT, 999)  # next outside the table
    queue.free.remove(0)
    queue.publish(0)
    driver.kick(INFLATE_QUEUE)
    assert driver.wait_used(INFLATE_QUEUE, 1) == [(0, 0)]
    assert seen == [("inflate", "DescriptorIndexOutOfRange"), ("inflate", "BadChain")]
    assert balloon.queues.counters.bad_buffers == 2


def test_indirect_inside_indirect_is_refused(ram, inprocess):
    balloon, driver = inprocess
    seen = errors_of(balloon)
    queue = driver.queues[INFLATE_QUEUE]
    table = queue.scratch + 4096
    queue.write_desc(0, table + 64, 32, VIRTQ_DESC_F_INDIRECT, 0, table=table)
    queue.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    queue.free.remove(0)
    queue.publish(0)
    driver.kick(INFLATE_QUEUE)
    assert driver.wait_used(INFLATE_QUEUE, 1) == [(0, 0)]
    assert seen == [("inflate", "BadChain")]


def test_indirect_table_is_followed(ram, inprocess):
    balloon, driver = inprocess
    ram.populate()
    queue = driver.queues[INFLATE_QUEUE]
    table = queue.scratch + 4096
    struct.pack_into("<2I", ram.map, queue.scratch, 5000, 5001)
    struct.pack_into("<I", ram.map, queue.scratch + 8, 6000)
    queue.write_desc(0, queue.scratch, 8, VIRTQ_DESC_F_NEXT, 1, table=table)
    queue.write_desc(1, queue.scratch + 8, 4, 0, 0, table=table)
    queue.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    queue.free.remove(0)
    queue.publish(0)
    driver.kick(INFLATE_QUEUE)
    driver.wait_used(INFLATE_QUEUE, 1)
    assert ram.host_bytes() == ram.size - 3 * PAGE


def test_avail_index_jump_stops_only_that_queue(ram, inprocess):
    balloon, driver = inprocess
    ram.populate()
    seen = errors_of(balloon)
    queue = driver.queues[DEFLATE_QUEUE]
    queue.set_avail_idx(queue.size + 1)
    driver.kick(DEFLATE_QUEUE)
    assert seen == [("deflate", "AvailIndexJump")]
    assert isinstance(balloon.queues.queues[DEFLATE_QUEUE].broken, AvailIndexJump)
    driver.inflate(256)                               # the inflate queue keeps serving
    assert ram.host_bytes() == ram.size - MIB


def test_stats_buffer_of_odd_length_is_ignored_and_kept_cycling(ram, inprocess):
    balloon, driver = inprocess
    seen = errors_of(balloon)
    queue = driver.queues[STATS_QUEUE]
    queue.add([(queue.scratch, 15)])
    driver.kick(STATS_QUEUE)
    assert seen == [("stats", "BadBufferLayout")]
    assert balloon.queues.stats.values == {}
    assert balloon.queues.request_stats()             # the buffer still cycles
    driver.refresh_stats({4: 77})
    assert balloon.queues.stats.values == {"free_memory": 77}


@pytest.mark.parametrize("field,value,error", [
    ("desc_addr", 8, MisalignedAddress),
    ("avail_addr", 1, MisalignedAddress),
    ("used_addr", 2, MisalignedAddress),
    ("desc_addr", 64 * MIB, AddressOutOfRange),
    ("used_addr", 64 * MIB - 8, AddressOutOfRange),
])
def test_ring_addresses_outside_memory_or_misaligned_are_refused(ram, field, value, error):
    config = dict(size=128, desc_addr=0, avail_addr=4096, used_addr=8192)
    config[field] = value
    with GuestMemory([ram.region()]) as memory:
        with pytest.raises(error):
            SplitQueue(memory, QueueConfig(**config))
        balloon = Balloon()
        balloon.ack_features(0)
        spec = QueueSpec(QueueConfig(**config), -1, -1)
        with pytest.raises(error):
            balloon.activate([ram.region()], [spec, spec])
        assert balloon.queues is None and balloon.memory is None


def test_descriptor_outside_memory_is_returned_unread(ram, inprocess):
    balloon, driver = inprocess
    seen = errors_of(balloon)
    queue = driver.queues[INFLATE_QUEUE]
    queue.add([(ram.size - 2, 4)])
    driver.kick(INFLATE_QUEUE)
    assert driver.wait_used(INFLATE_QUEUE, 1)[0][1] == 0
    assert seen == [("inflate", "BadChain")]


def test_readable_after_writable_is_refused(ram, inprocess):
    balloon, driver = inprocess
    seen = errors_of(balloon)
    queue = driver.queues[INFLATE_QUEUE]
    queue.write_desc(0, queue.scratch, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    queue.write_desc(1, queue.scratch, 4, 0, 0)
    queue.free.remove(0)
    queue.free.remove(1)
    queue.publish(0)
    driver.kick(INFLATE_QUEUE)
    driver.wait_used(INFLATE_QUEUE, 1)
    assert seen == [("inflate", "BadChain")]


def test_huge_pfn_buffer_is_refused_not_unpacked(ram, inprocess):
    balloon, driver = inprocess
    seen = errors_of(balloon)
    queue = driver.queues[INFLATE_QUEUE]
    queue.add([(8 * MIB, 32 * MIB)])                  # 8 million "PFNs"
    driver.kick(INFLATE_QUEUE)
    assert driver.wait_used(INFLATE_QUEUE, 1)[0][1] == 0
    assert seen == [("inflate", "BadBufferLayout")]
    assert balloon.queues.counters.inflated_pages == 0


def test_indirect_table_longer_than_the_queue_is_refused(ram, inprocess):
    balloon, driver = inprocess
    seen = errors_of(balloon)
    queue = driver.queues[INFLATE_QUEUE]
    # A table of 4 million descriptors (64 MiB of "table"), each chaining to the next.
    queue.write_desc(0, 0, 64 * MIB, VIRTQ_DESC_F_INDIRECT, 0)
    queue.free.remove(0)
    queue.publish(0)
    driver.kick(INFLATE_QUEUE)
    assert driver.wait_used(INFLATE_QUEUE, 1) == [(0, 0)]
    assert seen == [("inflate", "BadChain")]
    assert balloon.queues.counters.bad_buffers == 1
