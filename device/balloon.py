"""The virtio-balloon device: features, config space, target, and the queues' behaviour.

Lifecycle of a ``Balloon`` (the same for the in-process device and the jailed proxy)::

    created --ack_features--> negotiated --activate--> active --reset--> created
       ^                                                  |
       +------------------------- reset -------------------+

- Features may be acknowledged only before activation, and only bits that were offered.
- ``set_target_pages`` works in any state; the new target is what the guest reads as
  ``num_pages`` and it raises a config-change notification through ``on_config_change``.
- ``activate`` maps guest memory and builds the queues named by the negotiated features,
  numbered as the Linux driver numbers them: inflate, deflate, then stats and reporting
  only when negotiated, consecutively.

The queue-side behaviour is ``BalloonQueues``: it needs guest memory, so in the jailed
setup it runs only in the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from device.config import POISON_VAL_OFFSET, BalloonConfig, U32_MAX
from device.errors import (BadBufferLayout, FeatureError, GuestError, InvalidQueueConfig,
                           InvalidTarget)
from device.memory import SMALL_PAGE, GuestMemory, MemoryRegion
from device.notify import signal_fd
from device.pfn import compact_pfn_bytes
from device.release import PageReleaser
from device.stats import MAX_STATS_BUFFER, StatsSnapshot, parse_stats
from device.virtqueue import BadChain, DescriptorChain, QueueConfig, SplitQueue

log = logging.getLogger("vballoon.device")

VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_REPORTING = 5
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

VIRTIO_ID_BALLOON = 5
PAGE_SIZE = SMALL_PAGE          # the balloon's page unit (VIRTIO_BALLOON_PFN_SHIFT = 12)
PFN_SIZE = 4                    # each PFN is an le32
QUEUE_SIZE = 128                # what the device advertises as the maximum queue size
MAX_REPORT_DESCRIPTORS = 64
# Linux sends 256 PFNs (1 KiB) per buffer. A much larger one is refused rather than
# unpacked: a guest could otherwise make the worker build a list of millions of ints.
MAX_PFN_BUFFER = 64 * 1024
# PFN ranges released per ``process`` call before it returns to let the worker hear its
# parent: a guest sending scattered PFNs (one range each) can otherwise make one pass over
# a full queue take seconds (128 buffers x 16384 ranges). At least one buffer is handled.
MAX_RANGES_PER_PASS = 8192

INFLATE_QUEUE = "inflate"
DEFLATE_QUEUE = "deflate"
STATS_QUEUE = "stats"
FREE_PAGE_QUEUE = "free_page"
REPORTING_QUEUE = "reporting"

SECCOMP_POLICY = Path(__file__).with_name("balloon.policy")

FEATURE_NAMES = {
    VIRTIO_BALLOON_F_MUST_TELL_HOST: "MUST_TELL_HOST",
    VIRTIO_BALLOON_F_STATS_VQ: "STATS_VQ",
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM: "DEFLATE_ON_OOM",
    VIRTIO_BALLOON_F_FREE_PAGE_HINT: "FREE_PAGE_HINT",
    VIRTIO_BALLOON_F_PAGE_POISON: "PAGE_POISON",
    VIRTIO_BALLOON_F_REPORTING: "PAGE_REPORTING",
    VIRTIO_F_INDIRECT_DESC: "INDIRECT_DESC",
    VIRTIO_F_EVENT_IDX: "EVENT_IDX",
    VIRTIO_F_VERSION_1: "VERSION_1",
}


@dataclass(frozen=True)
class BalloonOptions:
    """What the device offers. Every feature can be switched off."""

    must_tell_host: bool = True
    stats: bool = True
    deflate_on_oom: bool = False
    free_page_reporting: bool = False
    page_poison: bool = True      # offered with free page reporting (see reports_may_release)
    version_1: bool = True
    event_idx: bool = True
    indirect: bool = True
    stats_interval: float = 0.0   # seconds between stats refreshes; 0: only on request

    def features(self) -> int:
        bits = [(self.must_tell_host, VIRTIO_BALLOON_F_MUST_TELL_HOST),
                (self.stats, VIRTIO_BALLOON_F_STATS_VQ),
                (self.deflate_on_oom, VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
                (self.free_page_reporting, VIRTIO_BALLOON_F_REPORTING),
                (self.free_page_reporting and self.page_poison, VIRTIO_BALLOON_F_PAGE_POISON),
                (self.version_1, VIRTIO_F_VERSION_1),
                (self.event_idx, VIRTIO_F_EVENT_IDX),
                (self.indirect, VIRTIO_F_INDIRECT_DESC)]
        return sum(1 << bit for on, bit in bits if on)


def reports_may_release(features: int, poison_val: int | None) -> bool:
    """Whether pages in a free page report may be released (read back as zeroes after).

    VIRTIO 1.2, "Device Operation / Free Page Reporting", device requirements: without
    VIRTIO_BALLOON_F_PAGE_POISON the device MAY modify a reported page; with it, it MUST NOT
    change a reported page to anything but ``poison_val`` ("Device Operation / Page
    Poison": the driver fills freed pages with ``poison_val`` and writes it to config space
    before DRIVER_OK). Released memory reads as zeroes, so with PAGE_POISON only
    ``poison_val == 0`` (Linux's init_on_free) allows it; a value not written yet
    (``None``) is treated as unknown, so nothing is released.
    """
    if not features >> VIRTIO_BALLOON_F_PAGE_POISON & 1:
        return True
    return poison_val == 0


def feature_names(features: int) -> list[str]:
    return [name for bit, name in sorted(FEATURE_NAMES.items()) if features >> bit & 1]


def queue_layout(features: int) -> tuple[str, ...]:
    """Queue names by index for the negotiated ``features``, as the Linux driver numbers them."""
    names = [INFLATE_QUEUE, DEFLATE_QUEUE]
    if features >> VIRTIO_BALLOON_F_STATS_VQ & 1:
        names.append(STATS_QUEUE)
    if features >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1:
        names.append(FREE_PAGE_QUEUE)
    if features >> VIRTIO_BALLOON_F_REPORTING & 1:
        names.append(REPORTING_QUEUE)
    return tuple(names)


@dataclass(frozen=True)
class QueueSpec:
    """Everything needed to run one queue: where it is, its fds, where to resume.

    ``next_avail`` None means "resume from the used index in guest memory" (a replacement
    worker); an int is the vhost-user base (a fresh start).
    """

    config: QueueConfig
    kick_fd: int
    call_fd: int
    next_avail: int | None = 0


@dataclass
class BalloonCounters:
    inflate_buffers: int = 0
    deflate_buffers: int = 0
    inflated_pages: int = 0
    deflated_pages: int = 0
    reported_bytes: int = 0
    stats_updates: int = 0
    bad_buffers: int = 0
    released_pages: int = 0
    pending_pages: int = 0
    skipped_pages: int = 0
    report_skipped_bytes: int = 0


class BalloonQueues:
    """The queue-side behaviour of the balloon over mapped guest memory.

    Guest input never raises out of ``process``: a malformed buffer is returned to the
    driver with length 0 (so the driver never waits for it forever), counted and logged;
    a queue whose avail index jumps is stopped, the others keep working.
    ``on_error(queue_name, exc)`` hears about each of these.
    """

    def __init__(self, memory: GuestMemory, queues: dict[str, SplitQueue],
                 call_fds: dict[str, int], stats_interval: float = 0.0,
                 on_error: Callable[[str, GuestError], None] | None = None,
                 on_stats: Callable[[StatsSnapshot], None] | None = None,
                 features: int = 0, poison_val: int | None = None,
                 logger: logging.Logger = log) -> None:
        self.memory = memory
        self.log = logger                 # the jailed worker's own (see device.worker)
        self.features = features
        self.poison_val = poison_val      # what the driver wrote (PAGE_POISON); None: not yet
        self.queues = queues
        self.call_fds = call_fds
        self.releaser = PageReleaser(memory)
        self.counters = BalloonCounters()
        self.stats = StatsSnapshot()
        self.stats_interval = stats_interval
        self._stats_head: int | None = None
        self._kept_reports_said = False
        self._pass_ranges = 0
        self._last_stats_request = time.monotonic()
        self._on_error = on_error or (lambda name, exc: None)
        self._on_stats = on_stats or (lambda snapshot: None)
        self._handlers = {INFLATE_QUEUE: self._inflate, DEFLATE_QUEUE: self._deflate,
                          STATS_QUEUE: self._stats, REPORTING_QUEUE: self._report}

    def process(self, name: str) -> int:
        """Handle pending buffers on queue ``name``; return how many were handled.

        Bounded to one queue's worth per call so a guest that keeps refilling cannot pin
        the worker here; ``has_pending`` tells the caller to call again without a kick.
        """
        queue = self.queues[name]
        handler = self._handlers.get(name)
        handled = 0
        self._pass_ranges = 0
        if queue.broken is not None or handler is None:
            return 0
        try:
            while handled < queue.size and self._pass_ranges < MAX_RANGES_PER_PASS:
                chain = self._pop(name, queue)
                if chain is None:
                    # Re-arm, then look once more: a buffer made available between the
                    # last pop and re-arming would otherwise wait for a kick never sent.
                    queue.enable_notification()
                    if not queue.pending():
                        break
                    continue
                handled += 1
                if chain is not False:
                    handler(queue, chain)
        except GuestError as exc:  # AvailIndexJump: this queue is stopped for good
            self._on_error(name, exc)
        self._notify(name, queue)
        return handled

    def has_pending(self, name: str) -> bool:
        """True if queue ``name`` still has buffers to handle (and is not stopped)."""
        queue = self.queues[name]
        if queue.broken is not None or name not in self._handlers:
            return False
        try:
            return queue.pending() > 0
        except GuestError as exc:
            self._on_error(name, exc)
            return False

    def _pop(self, name: str, queue: SplitQueue) -> DescriptorChain | None | bool:
        try:
            return queue.pop()
        except BadChain as exc:
            self._reject(name, queue, exc.head, exc)
            return False
        except GuestError as exc:
            if queue.broken is not None:
                raise
            self.counters.bad_buffers += 1
            self._on_error(name, exc)
            return False

    def _reject(self, name: str, queue: SplitQueue, head: int, exc: GuestError) -> None:
        self.counters.bad_buffers += 1
        self._on_error(name, exc)
        queue.add_used(head, 0)

    def _notify(self, name: str, queue: SplitQueue) -> None:
        if queue.needs_notification():
            signal_fd(self.call_fds[name])

    def _pfn_ranges(self, chain: DescriptorChain) -> list[tuple[int, int]]:
        if chain.writable or not chain.readable:
            raise BadBufferLayout("a PFN buffer must be device-readable only")
        if chain.readable_length > MAX_PFN_BUFFER:
            raise BadBufferLayout(f"PFN buffer of {chain.readable_length} bytes exceeds "
                                  f"{MAX_PFN_BUFFER}")
        ranges: list[tuple[int, int]] = []
        for desc in chain.readable:
            if desc.length % PFN_SIZE:
                raise BadBufferLayout(f"PFN buffer of {desc.length} bytes is not whole le32s")
            ranges.extend(compact_pfn_bytes(self.memory.read(desc.addr, desc.length)))
        self._pass_ranges += len(ranges)
        return ranges

    def _inflate(self, queue: SplitQueue, chain: DescriptorChain) -> None:
        ranges = self._take_pfns(INFLATE_QUEUE, queue, chain)
        if ranges is not None:
            self.releaser.release_pfns(ranges)
            self.counters.inflate_buffers += 1
            self.counters.inflated_pages += sum(count for _, count in ranges)
            self._done_with_pfns(queue, chain)

    def _deflate(self, queue: SplitQueue, chain: DescriptorChain) -> None:
        # Nothing to do for the host: a deflated page is faulted back in when the guest
        # touches it. Returning the buffer is the acknowledgement MUST_TELL_HOST waits for.
        ranges = self._take_pfns(DEFLATE_QUEUE, queue, chain)
        if ranges is not None:
            self.releaser.reclaim_pfns(ranges)
            self.counters.deflate_buffers += 1
            self.counters.deflated_pages += sum(count for _, count in ranges)
            self._done_with_pfns(queue, chain)

    def _take_pfns(self, name: str, queue: SplitQueue,
                   chain: DescriptorChain) -> list[tuple[int, int]] | None:
        """The chain's PFNs as ranges, or None after rejecting a malformed buffer."""
        try:
            return self._pfn_ranges(chain)
        except GuestError as exc:
            self._reject(name, queue, chain.head, exc)
            return None

    def _done_with_pfns(self, queue: SplitQueue, chain: DescriptorChain) -> None:
        self._sync_release_counters()
        queue.add_used(chain.head, 0)

    def _stats(self, queue: SplitQueue, chain: DescriptorChain) -> None:
        if self._stats_head is not None:
            # The driver has only one stats buffer; a second one is returned at once.
            queue.add_used(self._stats_head, 0)
        self._stats_head = chain.head
        try:
            if chain.writable:
                raise BadBufferLayout("the stats buffer must be device-readable")
            if chain.readable_length > MAX_STATS_BUFFER:   # checked before reading it
                raise BadBufferLayout(f"stats buffer of {chain.readable_length} bytes")
            data = b"".join(self.memory.read(d.addr, d.length) for d in chain.readable)
            values = parse_stats(data)
        except GuestError as exc:
            self.counters.bad_buffers += 1
            self._on_error(STATS_QUEUE, exc)
            return
        self.stats = StatsSnapshot(values, time.monotonic(), time.time())
        self.counters.stats_updates += 1
        self._on_stats(self.stats)

    def _report(self, queue: SplitQueue, chain: DescriptorChain) -> None:
        if chain.readable or not chain.writable or len(chain.writable) > MAX_REPORT_DESCRIPTORS:
            self._reject(REPORTING_QUEUE, queue, chain.head,
                         BadBufferLayout("a report must be 1-64 device-writable descriptors"))
            return
        release = reports_may_release(self.features, self.poison_val)
        for desc in chain.writable:
            if release:
                self.releaser.release_report(desc.addr, desc.length)
            else:
                self.counters.report_skipped_bytes += desc.length
            self.counters.reported_bytes += desc.length
        if not release and not self._kept_reports_said:
            self._kept_reports_said = True
            self.log.warning("the guest fills freed pages with poison value %s: its free page "
                        "reports are returned without releasing memory (it would read zeroes)",
                        "unknown (not written yet)" if self.poison_val is None
                        else f"{self.poison_val:#x}")
        self._sync_release_counters()
        queue.add_used(chain.head, 0)

    def _sync_release_counters(self) -> None:
        released = self.releaser.counters
        self.counters.released_pages = released.released_pages
        self.counters.pending_pages = released.pending_pages
        self.counters.skipped_pages = released.skipped_pages

    def request_stats(self) -> bool:
        """Hand the held stats buffer back so the guest refreshes it; False if none is held."""
        queue = self.queues.get(STATS_QUEUE)
        self._last_stats_request = time.monotonic()
        if queue is None or self._stats_head is None or queue.broken is not None:
            return False
        queue.add_used(self._stats_head, 0)
        self._stats_head = None
        self._notify(STATS_QUEUE, queue)
        return True

    def stats_timeout(self, now: float) -> float | None:
        """Seconds until the next periodic stats request is due, or None without polling."""
        if self.stats_interval <= 0 or STATS_QUEUE not in self.queues:
            return None
        return max(0.0, self._last_stats_request + self.stats_interval - now)

    def tick(self, now: float) -> None:
        """Do periodic work that is due (the stats polling interval)."""
        due = self.stats_timeout(now)
        if due is not None and due <= 0:
            self.request_stats()

    def ring_bases(self) -> dict[str, int]:
        """Where each queue restarts, what vhost-user's GET_VRING_BASE reports.

        The used index, not the next avail one: a buffer taken but not returned (the
        held stats buffer) must be taken again by whoever serves the ring next.
        """
        return {name: q.next_used for name, q in self.queues.items()}


def build_queues(memory: GuestMemory, features: int, specs: list[QueueSpec]) -> dict[str, SplitQueue]:
    """Create the split queues named by ``features`` from ``specs`` (one per queue, in order).

    Raises ``InvalidQueueConfig`` for a wrong number of queues, and the guest errors of
    ``SplitQueue`` for rings that are misaligned or outside memory.
    """
    names = queue_layout(features)
    if len(specs) != len(names):
        raise InvalidQueueConfig(f"{len(specs)} queues given, the features need {len(names)}")
    queues = {}
    for name, spec in zip(names, specs):
        if spec.next_avail is None:
            queues[name] = SplitQueue.resume(memory, spec.config)
        else:
            # The used ring continues from what is in memory (zero for a new ring).
            used = memory.read_u16(spec.config.used_addr + 2)
            queues[name] = SplitQueue(memory, spec.config, spec.next_avail, used)
    return queues


class BalloonControl:
    """The part of the device that needs no guest memory: features, config space, target.

    Shared by the in-process ``Balloon`` and the jailed ``control.proxy.ProxyBalloon``, so
    both negotiate and answer config accesses identically. ``on_config_change`` is called
    when the device changes config space (a new target); a transport turns it into a
    config interrupt. Raises ``FeatureError`` for features not offered or acked while
    active, ``InvalidTarget`` for a target out of range, and ``ConfigAccessError`` for a
    driver config write it may not make.
    """

    def __init__(self, options: BalloonOptions = BalloonOptions(),
                 on_config_change: Callable[[], None] | None = None) -> None:
        self.options = options
        self.device_features = options.features()
        self.acked_features = 0
        self.config = BalloonConfig()
        self.on_config_change = on_config_change or (lambda: None)
        self.guest_pages: int | None = None
        self.poison_written = False        # the driver wrote poison_val (PAGE_POISON)

    def is_active(self) -> bool:
        raise NotImplementedError

    @property
    def poison_val(self) -> int | None:
        """The driver's poison value once it wrote one with PAGE_POISON negotiated, else None."""
        if not self.poison_written or not self.acked_features >> VIRTIO_BALLOON_F_PAGE_POISON & 1:
            return None
        return self.config.poison_val

    def poison_changed(self) -> None:
        """Hook: the driver wrote ``poison_val`` (the worker must know before reports)."""

    def config_changed(self) -> None:
        """Hook: ``actual`` or ``num_pages`` changed (the proxy wakes its waiters)."""

    def ack_features(self, features: int) -> None:
        if self.is_active():
            raise FeatureError("features cannot change while the device is active")
        unknown = features & ~self.device_features
        if unknown:
            raise FeatureError(f"features {unknown:#x} were not offered")
        self.acked_features = features

    def queue_names(self) -> tuple[str, ...]:
        return queue_layout(self.acked_features)

    def read_config(self, offset: int, length: int) -> bytes:
        return self.config.read(offset, length)

    def write_config(self, offset: int, data: bytes) -> None:
        # Writable once offered, used only once negotiated (``poison_val``): QEMU passes the
        # features to a vhost-user back-end only at DRIVER_OK, after Linux's probe wrote it.
        poison_writable = bool(self.device_features >> VIRTIO_BALLOON_F_PAGE_POISON & 1)
        before = self.poison_val
        self.config.write(offset, data, poison_writable=poison_writable)
        if poison_writable and offset < POISON_VAL_OFFSET + 4 and offset + len(data) > POISON_VAL_OFFSET:
            self.poison_written = True
            if self.poison_val != before:
                self.poison_changed()
        self.config_changed()

    def set_target_pages(self, pages: int) -> None:
        """Ask the guest to hold ``pages`` 4 KiB pages in the balloon."""
        limit = min(self.guest_pages if self.guest_pages is not None else U32_MAX, U32_MAX)
        if type(pages) is not int or not 0 <= pages <= limit:
            raise InvalidTarget(f"a target of {pages} pages is outside 0..{limit}")
        changed = pages != self.config.num_pages
        self.config.num_pages = pages
        self.config_changed()
        if changed:
            self.on_config_change()

    def set_target_bytes(self, size: int) -> int:
        """Target ``size`` bytes (rounded down to pages); returns the target in pages."""
        if type(size) is not int or size < 0:
            raise InvalidTarget(f"a balloon size must be a non-negative number of bytes, "
                                f"not {size!r}")
        self.set_target_pages(size // PAGE_SIZE)
        return size // PAGE_SIZE

    def adjust_pages(self, delta: int) -> int:
        """Move the target by ``delta`` pages (the seed's command), checked; returns it."""
        if type(delta) is not int:
            raise InvalidTarget(f"an adjustment must be a whole number of pages, not {delta!r}")
        target = self.config.num_pages + delta
        if target < 0:
            raise InvalidTarget(f"adjusting {self.config.num_pages} pages by {delta} goes "
                                f"below zero")
        self.set_target_pages(target)
        return target

    def snapshot(self) -> dict:
        """The state that survives a worker restart or a migration (plain data)."""
        return {"acked_features": self.acked_features, "config": asdict(self.config),
                "poison_written": self.poison_written}

    def restore(self, state: dict) -> None:
        """Load a ``snapshot()``; only before activation. Raises ``FeatureError``."""
        self.ack_features(int(state["acked_features"]))
        self.config = BalloonConfig(**{k: int(v) for k, v in state["config"].items()})
        self.poison_written = bool(state.get("poison_written", False))


class Balloon(BalloonControl):
    """The whole balloon device, in this process (see the module docstring's lifecycle)."""

    def __init__(self, options: BalloonOptions = BalloonOptions(),
                 on_config_change: Callable[[], None] | None = None) -> None:
        super().__init__(options, on_config_change)
        self.memory: GuestMemory | None = None
        self.queues: BalloonQueues | None = None
        self._kick_fds: dict[int, str] = {}

    def is_active(self) -> bool:
        return self.queues is not None

    # -- activation ----------------------------------------------------------------------------

    def activate(self, regions: list[MemoryRegion], queues: list[QueueSpec]) -> None:
        """Map guest memory and start serving ``queues`` (one per name in ``queue_names()``).

        On error nothing stays active: the mapping is undone and the exception raised.
        """
        memory = GuestMemory(regions)
        try:
            built = build_queues(memory, self.acked_features, queues)
        except BaseException:
            memory.close()
            raise
        self.memory = memory
        self.guest_pages = memory.size // PAGE_SIZE
        self.queues = BalloonQueues(memory, built,
                                    {name: spec.call_fd for name, spec in zip(built, queues)},
                                    self.options.stats_interval, on_error=self._log_guest_error,
                                    features=self.acked_features, poison_val=self.poison_val)
        self._kick_fds = {spec.kick_fd: name for name, spec in zip(built, queues)}

    def kick_fds(self) -> dict[int, str]:
        """The kick fds to watch, with the queue each belongs to (empty unless active)."""
        return dict(self._kick_fds)

    def process_queue(self, name: str) -> int:
        if self.queues is None:
            return 0
        return self.queues.process(name)

    def reset(self) -> None:
        """Back to "created": queues dropped, memory unmapped, negotiation forgotten."""
        if self.memory is not None:
            self.memory.close()
        self.memory = None
        self.queues = None
        self._kick_fds = {}
        self.acked_features = 0
        self.config.actual = 0
        self.poison_written = False

    def poison_changed(self) -> None:
        if self.queues is not None:
            self.queues.poison_val = self.poison_val

    @staticmethod
    def _log_guest_error(name: str, exc: GuestError) -> None:
        log.warning("%s queue: %s", name, exc)

    # -- state -----------------------------------------------------------------------------

    def snapshot(self) -> dict:
        state = super().snapshot()
        if self.queues is not None:
            state["counters"] = asdict(self.queues.counters)
            state["stats"] = asdict(self.queues.stats)
        return state
