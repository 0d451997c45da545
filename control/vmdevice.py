"""One VM's balloon device in the parent, driven by the event loop: it never waits.

The device model (``device.balloon.BalloonControl``: features, config space, target) is a
member, answered here without a round trip to the worker: the guest reads config and writes
``actual`` once per MiB it inflates. The worker, run by a ``Supervisor``, is the only process
that maps guest memory. ``activate``, ``stop`` and ``reset`` are transitions that complete
later through their ``done`` callbacks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from control.errors import RequestError, WorkerError
from control.logs import VmLog
from control.loop import EventLoop
from control.supervisor import (ACTIVE, FAILED, IDLE, Activation, Done, ProxyOptions,
                                Supervisor, read_ring_bases)
from device.command import PartialPage, RequestStats
from device.balloon import (PAGE_SIZE, VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING,
                            BalloonControl, BalloonOptions, QueueSpec, reports_may_release)
from device.errors import DeviceError, InvalidTarget
from device.memory import MemoryRegion, validate_regions
from device.stats import StatsSnapshot

log = logging.getLogger("vballoon.device")


@dataclass
class SettleResult:
    """How a wait for the balloon to reach its target ended."""

    outcome: str                      # "settled", "stalled" or "timeout"
    target_pages: int
    actual_pages: int


@dataclass
class SettleWatch:
    """Decides when a wait for ``actual == target`` is over, and how. Pure: fed readings."""

    deadline: float
    stall: float
    last_actual: int
    last_move: float

    def check(self, actual: int, target: int, now: float) -> str | None:
        """"settled", "stalled" (``actual`` still for ``stall`` s), "timeout", or None."""
        if actual != self.last_actual:
            self.last_actual, self.last_move = actual, now
        if actual == target:
            return "settled"
        if now - self.last_move >= self.stall:
            return "stalled"
        if now >= self.deadline:
            return "timeout"
        return None


class _Model(BalloonControl):
    """The device model, told whether the device is active by the supervisor."""

    def __init__(self, options: BalloonOptions, owner: "VmDevice") -> None:
        # A new target raises a config change, which the transport turns into an interrupt.
        super().__init__(options, on_config_change=lambda: owner.on_config_change())
        self.owner = owner

    def is_active(self) -> bool:
        return self.owner.state != IDLE

    def config_changed(self) -> None:
        self.owner.changed()

    def poison_changed(self) -> None:
        if self.poison_val is not None:
            self.owner.supervisor.set_poison(self.poison_val)


class VmDevice:
    """A balloon device whose queues a supervised jailed worker serves."""

    def __init__(self, loop: EventLoop, options: BalloonOptions = BalloonOptions(),
                 proxy: ProxyOptions = ProxyOptions(), name: str = "") -> None:
        self.loop = loop
        self.name = name
        self.log = VmLog(log, name)
        self.options = options
        self.proxy = proxy
        self.model = _Model(options, self)
        self.supervisor = Supervisor(loop, proxy, self._on_worker_event, name)
        self.stats = StatsSnapshot()
        self.on_config_change: Callable[[], None] = lambda: None
        self.listeners: list[Callable[[], None]] = []   # anything changed (waits, status)
        self._stats_asked = False
        self._config_reads = 0
        # Set by a vhost-user session: its guest reads config space through us, so a guest
        # that inflates without reading it reads it somewhere else (a VMM mistake).
        self.config_reads_expected = False
        self._hinted = False
        self.frontend_pauses = 0          # times a front-end's requests were read slower

    # -- the model -----------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def acked_features(self) -> int:
        return self.model.acked_features

    @property
    def device_features(self) -> int:
        return self.model.device_features

    @property
    def guest_pages(self) -> int | None:
        return self.model.guest_pages

    def queue_names(self) -> tuple[str, ...]:
        return self.model.queue_names()

    def ack_features(self, features: int) -> None:
        self.model.ack_features(features)

    def read_config(self, offset: int, length: int) -> bytes:
        self._config_reads += 1
        return self.model.read_config(offset, length)

    def write_config(self, offset: int, data: bytes) -> None:
        self.model.write_config(offset, data)

    # -- the worker ----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.supervisor.state

    @property
    def worker(self):
        return self.supervisor.worker

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def last_exit(self) -> str | None:
        return self.supervisor.last_exit

    def denials(self) -> dict[str, int] | None:
        return self.supervisor.denials()

    def warnings(self) -> list[str]:
        """What an operator should know about why memory may not come back (``status``)."""
        offered, acked = self.device_features, self.acked_features
        out = []
        if acked and offered >> VIRTIO_BALLOON_F_REPORTING & 1 and not acked >> VIRTIO_BALLOON_F_REPORTING & 1:
            if offered >> VIRTIO_BALLOON_F_PAGE_POISON & 1:
                out.append("free page reporting was offered but the guest did not accept it")
            else:
                out.append("free page reporting was offered but the guest did not accept it: a "
                           "guest that zeroes or poisons freed pages (init_on_free=1, "
                           "page_poison=1) turns it off unless PAGE_POISON is offered too "
                           "(drop --no-page-poison)")
        if acked >> VIRTIO_BALLOON_F_REPORTING & 1 and not reports_may_release(acked, self.model.poison_val):
            poison = self.model.poison_val
            said = ("has not written its poison value (QEMU: give the device "
                    "config_size=16)") if poison is None else f"fills freed pages with {poison:#x}"
            out.append(f"the guest {said}: its free page reports are returned without "
                       f"releasing memory (released pages would read back as zeroes)")
        return out

    def counters(self) -> dict[str, int]:
        return {**self.supervisor.counters(), "worker_restarts": self.supervisor.restarts,
                "frontend_pauses": self.frontend_pauses}

    def is_active(self) -> bool:
        return self.state != IDLE

    def activate(self, regions: list[MemoryRegion], queues: list[QueueSpec], done: Done,
                 partial_pages: tuple[PartialPage, ...] = ()) -> None:
        """Start serving ``queues``: ``done(None)`` once the worker serves, else
        ``done(error)`` with nothing left running (the negotiation is kept).
        ``partial_pages``: a previous worker's partial huge pages (``carried_partial``),
        only when the same driver carries on."""
        try:
            if self.state != IDLE:
                raise WorkerError("the device is already active")
            validate_regions(regions)
            if len(queues) != len(self.queue_names()):
                raise RequestError(f"{len(queues)} queues given, the features need "
                                   f"{len(self.queue_names())}")
        except (WorkerError, RequestError, DeviceError) as exc:
            done(exc)
            return
        self.model.guest_pages = sum(r.size for r in regions) // PAGE_SIZE
        activation = Activation(tuple(regions), tuple(queues), self.acked_features,
                                float(self.options.stats_interval), tuple(partial_pages),
                                self.model.poison_val)
        self.supervisor.start(activation, done)

    def stop(self, done: Done) -> None:
        """Stop the worker; ``done(state)`` (its ring bases and counters, or {})."""
        self.supervisor.stop(done)

    def reset(self, done: Done = lambda state: None) -> None:
        """Stop the worker and forget the negotiation and the guest's memory size."""
        def stopped(state: Any) -> None:
            self.model.acked_features = 0
            self.model.config.actual = 0
            self.model.poison_written = False
            self.model.guest_pages = None
            self.supervisor.activation = None
            self.changed()
            done(state)
        self.supervisor.stop(stopped)

    @staticmethod
    def carried_partial(state: dict) -> tuple[PartialPage, ...]:
        """The partial huge pages in a stopped worker's state, checked for shape (the next
        worker checks them against guest memory)."""
        pairs = state.get("partial_pages") if isinstance(state, dict) else None
        if not isinstance(pairs, list):
            return ()
        out = []
        for pair in pairs[:64]:
            if (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int
                    and 0 <= pair[0] < 2**64 and isinstance(pair[1], str)
                    and 0 < len(pair[1]) <= 4096):
                out.append(PartialPage(pair[0], pair[1]))
        return tuple(out)

    def terminate(self) -> None:
        self.supervisor.terminate()

    def recover(self) -> bool:
        """Restart a ``failed`` device (an operator's reset); False if it is not failed."""
        if self.state != FAILED or self.supervisor.activation is None:
            return False
        self.log.info("restarting a failed device on the operator's request")
        self.supervisor.start(self.supervisor.activation, self._on_recovered)
        return True

    def _on_recovered(self, error: Any) -> None:
        if error is not None:
            self.log.error("the failed device could not be restarted: %s", error)

    def read_ring_bases(self, done: Done) -> None:
        """Where each ring stands, read from guest memory by a fresh worker."""
        activation = self.supervisor.activation
        if activation is None:
            done(WorkerError("the device has no rings"))
            return
        read_ring_bases(self.loop, self.proxy, activation, done, self.supervisor.log)

    def swap_call_fd(self, index: int, fd: int, done: Done) -> None:
        """Hand queue ``index``'s new call fd to the serving worker (no restart)."""
        self.supervisor.swap_call_fd(index, fd, done)

    def check_alive(self) -> None:
        self.supervisor.check_alive()

    def request_stats(self) -> bool:
        """Ask the worker to hand the stats buffer back so the guest refreshes it; never
        waits. False if there is no worker to ask."""
        if self.state != ACTIVE:
            return False
        if not self._stats_asked:
            # Coalesced: one request in flight at a time, however often operators ask (a
            # flood must not fill the worker's command queue).
            self._stats_asked = True
            self.supervisor.request(RequestStats(), self._stats_answered)
        return True

    def _stats_answered(self, result: Any) -> None:
        self._stats_asked = False

    # -- the operator's size API ---------------------------------------------------------------

    def set_target_pages(self, pages: int) -> None:
        try:
            self.model.set_target_pages(pages)
        except InvalidTarget as exc:
            raise RequestError(str(exc)) from exc
        self._target_set()

    def set_target_bytes(self, size: int) -> int:
        try:
            pages = self.model.set_target_bytes(size)
        except InvalidTarget as exc:
            raise RequestError(str(exc)) from exc
        self._target_set()
        return pages

    def adjust_pages(self, delta: int) -> int:
        try:
            pages = self.model.adjust_pages(delta)
        except InvalidTarget as exc:
            raise RequestError(str(exc)) from exc
        self._target_set()
        return pages

    def _target_set(self) -> None:
        if self.state == FAILED:
            self.recover()              # a new target is the operator asking for service

    def settle_watch(self, timeout: float, stall: float) -> SettleWatch:
        now = time.monotonic()
        return SettleWatch(now + timeout, stall, self.config.actual, now)

    # -- events --------------------------------------------------------------------------------

    def changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    def _on_worker_event(self, kind: str, body: dict) -> None:
        if kind == "stats_event":
            self.stats = StatsSnapshot(body["values"], time.monotonic(), body["updated"])
        elif kind == "counters" and self.config_reads_expected and not self._hinted \
                and self._config_reads == 0 \
                and body["values"].get("inflated_pages", 0) > 0:
            # The guest inflates without ever having read the target: it reads config
            # space elsewhere (QEMU with config_size=0 answers num_pages 0xFFFFFFFF itself).
            self._hinted = True
            self.log.error("the guest inflates its balloon but never read config space from us: "
                      "with QEMU, give vhost-user-test-device-pci config_size=8 (the guest "
                      "now believes the target is everything and will run out of memory)")
        self.changed()
