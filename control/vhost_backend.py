"""One vhost-user session: the front-end's requests turned into calls on a balloon device.

The codec (``control.vhost_user``) has already checked every message's shape and fds; this
layer checks meaning (indices against the negotiated queues, addresses against the memory
table) and keeps the per-connection state. Per ring::

    new --SET_VRING_NUM/ADDR/BASE/CALL--> configured --SET_VRING_KICK--> ready
    ready (every negotiated ring ready, memory table set) --> started (the worker serves)
    started --GET_VRING_BASE / SET_VRING_ENABLE(0) / SET_FEATURES (a re-probe) /
              RESET_DEVICE / RESET_OWNER--> stopped --SET_VRING_KICK--> ready
    started --SET_MEM_TABLE / SET_VRING_KICK--> (stopped, resume) --> started again
    started --SET_VRING_CALL--> started (the live worker takes the new call fd)
    any --connection closed--> closed (the device is reset, then every fd closed)

``Vring.state`` holds these names; the device is active exactly when its negotiated rings
are ``started``. Rings beyond the negotiated queues are configured but never started.

What differs between front-ends is named in ``FrontendProfile``s rather than guessed in the
handlers. Config space is served here, in the parent: the guest reads it and writes
``actual`` once per MiB it inflates, and nothing on that path needs the worker.

A request that needs the worker to stop or start does not wait for it: its handler is a
generator that yields an operation (a callable taking a ``resume`` callback) and is resumed
when the operation completes. Meanwhile the session is ``busy`` and the server does not
hand it the next request, so requests are still answered in order.
"""

from __future__ import annotations

import logging
import os
import socket
import types
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from control import vhost_user as vu
from control.errors import ControlError, WorkerError
from control.logs import VmLog
from control.vmdevice import VmDevice
from device.balloon import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, QueueSpec,
                            feature_names)
from device.errors import DeviceError
from device.memory import MemoryRegion, user_to_guest, validate_regions
from device.virtqueue import QueueConfig

log = logging.getLogger("vballoon.vhost")

OFFERED_PROTOCOL_FEATURES = (1 << vu.VHOST_USER_PROTOCOL_F_REPLY_ACK
                             | 1 << vu.VHOST_USER_PROTOCOL_F_BACKEND_REQ
                             | 1 << vu.VHOST_USER_PROTOCOL_F_CONFIG
                             | 1 << vu.VHOST_USER_PROTOCOL_F_RESET_DEVICE)
MAX_QUEUES = 5
U64_REPLIES = frozenset({vu.FrontendRequest.GET_FEATURES, vu.FrontendRequest.GET_PROTOCOL_FEATURES,
                         vu.FrontendRequest.GET_QUEUE_NUM, vu.FrontendRequest.GET_MAX_MEM_SLOTS})
PENDING = object()     # ``handle``'s answer when the reply comes later, through ``on_reply``

Operation = Callable[[Callable[[Any], None]], None]
Handler = Generator[Operation, Any, "bytes | None"]


class FrontendGone(ControlError):
    """The front-end broke the protocol beyond a refusal: close its connection."""


@dataclass(frozen=True)
class FrontendProfile:
    """How a front-end behaves where the protocol leaves room (tested in tests/)."""

    name: str
    # UML sends no message when its driver goes away; the next probe's SET_FEATURES while
    # the rings run is the only sign that the driver re-probes and will reuse ring memory.
    set_features_while_active_means_reprobe: bool = True


UML = FrontendProfile("uml")
DEFAULT_PROFILE = UML


NEW, CONFIGURED, READY, STARTED, STOPPED = "new", "configured", "ready", "started", "stopped"


@dataclass
class Vring:
    num: int = 0
    base: int = 0
    addr: vu.SetVringAddr | None = None
    kick_fd: int = -1
    call_fd: int = -1
    state: str = NEW         # see the module docstring
    resume: bool = False     # restart at the used index in memory, not at ``base``

    def configured(self) -> None:
        if self.state == NEW:
            self.state = CONFIGURED

    def close(self) -> None:
        for name in ("kick_fd", "call_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


@dataclass
class SessionState:
    features: int = 0
    protocol_features: int = 0
    regions: tuple[MemoryRegion, ...] = ()
    vrings: list[Vring] = field(default_factory=lambda: [Vring() for _ in range(MAX_QUEUES)])
    active: bool = False     # the negotiated rings are started (kept equal to their states)


class VhostUserSession:
    """Handles one front-end connection for ``device`` (a fresh device per connection).

    ``on_reply(bytes | None)`` hears the replies of requests answered later (``PENDING``).
    """

    def __init__(self, device: VmDevice, profile: FrontendProfile = DEFAULT_PROFILE) -> None:
        self.log = VmLog(log, device.name)
        self._debug = log.isEnabledFor(logging.DEBUG)   # (two config messages per MiB)
        self.device = device
        self.profile = profile
        self.state = SessionState()
        self.backend_req: socket.socket | None = None
        self.backend_out = bytearray()     # backend requests the front-end has not read
        self.backend_sender = vu.BackendRequestSender()
        self.busy = False
        self.closed = False
        self.failures = 0               # requests refused so far (a recorder tells by it)
        self.adopting = False           # replaying a dead serve's requests: no activation yet
        self._partial: tuple = ()       # a stopped worker's partial huge pages, to hand on
        self._extra_logged: set[int] = set()
        self._hints: set[str] = set()
        self.on_reply: Callable[[bytes | None], None] = lambda reply: None
        self.on_error: Callable[[BaseException], None] = lambda exc: None
        # Closes a replaced backend-request socket; the server stops watching it first, so
        # its fd number can never be reused under a stale registration.
        self.retire_backend_req: Callable[[socket.socket], None] = lambda sock: sock.close()
        device.on_config_change = self.notify_config_change
        device.config_reads_expected = True

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, event: vu.Request | vu.RejectedRequest,
               conn: vu.BackendConnection) -> bytes | None | object:
        """Apply one event; return the reply to send (None if the front-end expects none),
        or ``PENDING`` if it comes later through ``on_reply``.

        A request that fails is refused (a failure ack, or the failure form of its reply)
        and changes nothing. Raises ``FrontendGone`` only when the front-end asked for
        something whose reply we cannot even express (it never was offered): the caller
        closes the connection.
        """
        if isinstance(event, vu.RejectedRequest):
            self.log.warning("refused vhost-user request %s: %s", event.request, event.error)
            return self._fail(event, conn)
        if self._debug:
            self.log.debug("vhost-user %s", event)
        try:
            result = self._dispatch(event, conn)
        except (ControlError, DeviceError, OSError) as exc:
            self.log.warning("vhost-user %s failed: %s", type(event).__name__, exc)
            return self._fail(event, conn)
        if isinstance(result, types.GeneratorType):
            return self._step(result, event, conn, None)
        return self._done(result, event, conn)

    def _done(self, reply: bytes | None, event: vu.Request, conn: vu.BackendConnection) -> bytes | None:
        if reply is None and event.reply_expected:
            return conn.reply_ack(event.REQUEST, True)
        return reply

    def _step(self, handler: Handler, event: vu.Request, conn: vu.BackendConnection,
              value: Any) -> bytes | None | object:
        """Run ``handler`` until it finishes (its reply) or waits (``PENDING``; the reply
        then goes to ``on_reply``)."""
        inline: list = []                    # the reply, when it came at once
        waits: list = []                     # non-empty once the handler waited

        def finished(result: Any, error: BaseException | None) -> None:
            if error is not None:
                self.log.warning("vhost-user %s failed: %s", type(event).__name__, error)
                reply = self._fail(event, conn)
            else:
                reply = self._done(result, event, conn)
            if waits:
                self.on_reply(reply)
            else:
                inline.append(reply)
        if self._drive(handler, value, finished):
            waits.append(True)
            return PENDING
        return inline[0]

    def _drive(self, handler: Handler, value: Any,
               finished: Callable[[Any, BaseException | None], None]) -> bool:
        """Run ``handler`` (each operation it yields is called with a ``resume`` callback)
        until it returns or fails, then ``finished(result, error)``. True if it waits for
        an operation (``busy`` until it is done; nothing is told if the session closes
        meanwhile)."""
        while True:
            try:
                if isinstance(value, BaseException):
                    operation = handler.throw(value)
                else:
                    operation = handler.send(value)
            except StopIteration as stop:
                finished(stop.value, None)
                return False
            except (ControlError, DeviceError, OSError) as exc:
                finished(None, exc)
                return False
            outcome: list = []
            waiting = [False]

            def resume(result: Any = None, _outcome=outcome, _waiting=waiting) -> None:
                if not _waiting[0]:
                    _outcome.append(result)          # completed at once: carry on inline
                    return
                self.busy = False
                if self.closed:
                    handler.close()                  # the connection is gone: nobody to tell
                    return
                try:
                    self._drive(handler, result, finished)
                except Exception as exc:     # this session's failure domain: see server
                    self.on_error(exc)
            operation(resume)
            if not outcome:
                waiting[0] = True
                self.busy = True
                return True
            value = outcome[0]

    def _dispatch(self, event: vu.Request, conn: vu.BackendConnection) -> Any:
        match event:
            # The guest's balloon driver reads the target and writes ``actual`` once per
            # 256 pages it moves: these two come first.
            case vu.GetConfig():
                if event.size < 8 and "config-size" not in self._hints:
                    self._hint_config_size(event.size)
                data = self.device.read_config(event.offset, event.size)
                return conn.reply_config(event.offset, event.size, event.flags,
                                         data.ljust(event.size, b"\0"))
            case vu.SetConfig():
                self.device.write_config(event.offset, event.data)
                return None
            case vu.SetOwner():
                return None
            case vu.GetFeatures():
                return conn.reply_u64(event.REQUEST, self.device.device_features
                                      | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)
            case vu.SetFeatures():
                return self._set_features(event)
            case vu.GetProtocolFeatures():
                return conn.reply_u64(event.REQUEST, OFFERED_PROTOCOL_FEATURES)
            case vu.SetProtocolFeatures():
                unknown = event.features & ~OFFERED_PROTOCOL_FEATURES
                if unknown:
                    raise ControlError(f"protocol features {unknown:#x} were not offered")
                self.state.protocol_features = event.features
                return None
            case vu.GetQueueNum():
                return conn.reply_u64(event.REQUEST, MAX_QUEUES)
            case vu.SetBackendReqFd():
                return self._set_backend_req_fd(event)
            case vu.SetMemTable():
                return self._set_mem_table(event)
            case vu.SetVringNum():
                vring = self._vring(event.index)
                vring.num = event.num
                vring.configured()
                return None
            case vu.SetVringBase():
                vring = self._vring(event.index)
                vring.base = event.num
                vring.configured()
                return None
            case vu.SetVringAddr():
                vring = self._vring(event.index)
                vring.addr = event
                vring.configured()
                return None
            case vu.SetVringCall():
                return self._replace_fd(event, "call_fd")
            case vu.SetVringKick():
                return self._set_vring_kick(event)
            case vu.SetVringErr():
                if event.fd is not None:
                    os.close(event.fd)      # we never report ring errors through it
                return None
            case vu.SetVringEnable():
                return self._set_vring_enable(event)
            case vu.GetVringBase():
                return self._get_vring_base(event, conn)
            case vu.ResetDevice() | vu.ResetOwner():
                return self.reset()
        for fd in event.carried_fds:      # e.g. ADD_MEM_REG: never offered, fd refused
            os.close(fd)
        raise ControlError(f"vhost-user {type(event).__name__} is not supported")

    def _fail(self, event: vu.Request | vu.RejectedRequest, conn: vu.BackendConnection) -> bytes | None:
        self.failures += 1
        if not event.reply_expected:
            return None
        request = event.request if isinstance(event, vu.RejectedRequest) else event.REQUEST
        if request == vu.FrontendRequest.GET_CONFIG:
            return conn.reply_config_failure()
        if request not in vu.REQUESTS_WITH_REPLY:
            return conn.reply_ack(request, False)
        if isinstance(event, vu.GetVringBase):
            return conn.reply_vring_state(event.index, self.state.vrings[event.index].base)
        if isinstance(event, vu.Request) and request in U64_REPLIES:
            return conn.reply_u64(request, 0)
        raise FrontendGone(f"request {request} has a reply we cannot give (never offered)")

    # -- negotiation ---------------------------------------------------------------------------

    def stops_for(self, event: vu.SetFeatures) -> bool:
        """Will this SET_FEATURES stop the running rings (a re-probe, see the profile)?
        False if it is refused: it then changes nothing."""
        return (self.state.active and self.profile.set_features_while_active_means_reprobe
                and not self._unoffered(event))

    def _unoffered(self, event: vu.SetFeatures) -> int:
        """The virtio feature bits ``event`` acks that were never offered."""
        virtio = event.features & ~(1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)
        return virtio & ~self.device.device_features

    def _set_features(self, event: vu.SetFeatures) -> Handler:
        unknown = self._unoffered(event)
        if unknown:
            # Checked before anything stops: a refused request changes nothing.
            raise ControlError(f"features {unknown:#x} were not offered")
        if self.stops_for(event):
            yield from self._stop()
        virtio = event.features & ~(1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)
        self.device.ack_features(virtio)
        self.state.features = event.features
        self.log.info("guest negotiated %s", ", ".join(feature_names(virtio)) or "no features")
        return None

    def _set_backend_req_fd(self, event: vu.SetBackendReqFd) -> None:
        try:
            sock = socket.socket(fileno=event.fd)
        except OSError:
            os.close(event.fd)                 # not a socket: refused, and not kept
            raise
        if self.backend_req is not None:
            self.retire_backend_req(self.backend_req)
        self.backend_out.clear()
        self.backend_req = sock
        self.backend_req.setblocking(False)

    # -- memory and rings ----------------------------------------------------------------------

    def _set_mem_table(self, event: vu.SetMemTable) -> Handler:
        regions = []
        try:
            for region, fd in zip(event.regions, event.fds):
                regions.append(MemoryRegion.from_fd(
                    fd, region.guest_phys_addr, region.memory_size, region.mmap_offset,
                    region.userspace_addr))
            regions.sort(key=lambda r: r.guest_addr)
            validate_regions(regions)
            if self.state.active:
                # The running rings must still lie in the new table, or the change is
                # refused while the old table keeps serving.
                self._ring_configs(regions)
        except (DeviceError, OSError):
            for fd in event.fds:
                os.close(fd)
            raise
        was_active = self.state.active
        if was_active:
            try:
                yield from self._stop(resume=True)
            except BaseException:            # GeneratorExit too: the connection closed
                for fd in sorted({r.fd for r in regions}):
                    os.close(fd)
                raise
        self._close_regions()
        self.state.regions = tuple(regions)
        if was_active:
            yield from self._restart()
        return None

    def _vring(self, index: int) -> Vring:
        """Ring ``index``. Rings beyond the negotiated layout are accepted and never served:
        a VMM configured for more queues than the features call for (QEMU's ``num_vqs``)
        sets them all up, and refusing one would keep the device from ever starting."""
        if self._extra(index) and index not in self._extra_logged:
            self._extra_logged.add(index)
            self.log.warning("the front-end set up ring %d, beyond the %d queues the negotiated "
                        "features use (%s): accepted and ignored (is num_vqs too large?)",
                        index, len(self.device.queue_names()),
                        ", ".join(self.device.queue_names()))
        return self.state.vrings[index]

    def _extra(self, index: int) -> bool:
        return bool(self.state.features) and index >= len(self.device.queue_names())

    def _set_vring_kick(self, event: vu.SetVringKick) -> Handler:
        yield from self._replace_fd(event, "kick_fd")
        vring = self.state.vrings[event.index]
        if vring.state != STARTED:
            vring.state = READY
        yield from self._maybe_activate()
        return None

    def _replace_fd(self, event: vu.SetVringKick | vu.SetVringCall, name: str) -> Handler:
        try:
            vring = self._vring(event.index)
            if event.fd is None:
                raise ControlError("polling mode (NOFD) is not supported")
        except ControlError:
            if event.fd is not None:
                os.close(event.fd)
            raise
        was_active = self.state.active and not self._extra(event.index)
        if was_active and name == "call_fd":
            # QEMU swaps call fds right after the device starts (and for interrupt
            # masking): the serving worker takes the new one as it is.
            try:
                yield lambda done: self.device.swap_call_fd(event.index, event.fd, done)
            except WorkerError as exc:
                self.log.info("handing the new call fd to the worker failed (%s): restarting it",
                         exc)
            except BaseException:            # GeneratorExit too: the connection closed
                os.close(event.fd)
                raise
            else:
                os.close(vring.call_fd)
                vring.call_fd = event.fd
                return None
        if was_active:
            # A kick fd swap (or a call fd the worker could not take): the worker holds
            # the old ones, so it is replaced, resuming where it stood.
            try:
                yield from self._stop(resume=True)
            except BaseException:
                os.close(event.fd)
                raise
        old = getattr(vring, name)
        if old >= 0:
            os.close(old)
        setattr(vring, name, event.fd)
        vring.configured()
        if was_active:
            yield from self._restart()
        return None

    def _set_vring_enable(self, event: vu.SetVringEnable) -> Handler:
        self._vring(event.index)
        if not event.enable and self.state.active and not self._extra(event.index):
            # The driver is tearing its rings down and will reuse their memory: the
            # worker must not touch them again.
            yield from self._stop()
        return None

    def _get_vring_base(self, event: vu.GetVringBase, conn: vu.BackendConnection) -> Handler:
        vring = self._vring(event.index)
        if self.state.active and not self._extra(event.index):
            yield from self._stop()
        return conn.reply_vring_state(event.index, vring.base)

    # -- config change -------------------------------------------------------------------------

    def notify_config_change(self) -> None:
        """Tell the front-end config space changed (BACKEND_CONFIG_CHANGE_MSG)."""
        if self.backend_req is None:
            self.log.warning("config changed but the front-end gave no backend-request channel")
            return
        message = self.backend_sender.config_change_msg(need_reply=False)
        if len(self.backend_out) >= len(message):
            return      # one not yet started is queued: the front-end reads config anew
        self.backend_out += message
        self.flush_backend_req()

    def flush_backend_req(self) -> None:
        """Send what is queued on the backend-request channel without blocking; the rest
        waits for the server's loop to see the socket writable."""
        if self.backend_req is None or not self.backend_out:
            return
        try:
            sent = self.backend_req.send(self.backend_out)
        except BlockingIOError:
            return
        except OSError as exc:
            self.log.warning("cannot send the config change to the front-end: %s", exc)
            self.backend_out.clear()
            return
        del self.backend_out[:sent]

    # -- activation ------------------------------------------------------------------------------

    def _ring_configs(self, regions) -> list[QueueConfig]:
        """The negotiated rings' configs under ``regions``; raises ``AddressOutOfRange``."""
        features = self.device.acked_features
        return [QueueConfig(ring.num, user_to_guest(regions, ring.addr.desc),
                            user_to_guest(regions, ring.addr.avail),
                            user_to_guest(regions, ring.addr.used),
                            event_idx=bool(features >> VIRTIO_F_EVENT_IDX & 1),
                            indirect=bool(features >> VIRTIO_F_INDIRECT_DESC & 1))
                for ring in self.state.vrings[:len(self.device.queue_names())]]

    def _hint(self, key: str, text: str) -> None:
        """Log, once per connection, a likely VMM configuration mistake and its fix."""
        if key not in self._hints:
            self._hints.add(key)
            self.log.warning("%s", text)

    def _hint_config_size(self, size: int) -> None:
        self._hint("config-size", f"the front-end reads {size} bytes of config space, "
                   f"the guest needs 8 (num_pages, actual): with QEMU, give "
                   f"vhost-user-test-device-pci config_size=8")

    def finish_adoption(self, done: Callable[[BaseException | None], None]) -> None:
        """The replayed requests are in: start serving the rings that were served, each
        resuming at the used index in guest memory (the bases replayed are stale). ``done``
        hears None, or why the worker could not start."""
        self.adopting = False
        for ring in self.state.vrings:
            ring.resume = True
        self._drive(self._maybe_activate(), None, lambda result, error: done(error))

    def _maybe_activate(self) -> Handler:
        if self.adopting:
            return
        names = self.device.queue_names()
        rings = self.state.vrings[:len(names)]
        if not self.state.regions and rings and all(r.state == READY for r in rings):
            self._hint("no-memory", "the rings are set up but no memory table arrived: with "
                       "QEMU, guest RAM must be shared (-object "
                       "memory-backend-memfd,...,share=on and -machine memory-backend=...)")
        if self.state.active or not self.state.regions \
                or any(r.state != READY or r.call_fd < 0 or r.addr is None for r in rings):
            return
        specs = [QueueSpec(config, ring.kick_fd, ring.call_fd, None if ring.resume else ring.base)
                 for config, ring in zip(self._ring_configs(self.state.regions), rings)]
        regions = list(self.state.regions)
        partial, self._partial = self._partial, ()
        # A failure to start comes back as an exception thrown here: the request is refused.
        yield lambda done: self.device.activate(regions, specs, done, partial)
        for ring in rings:
            ring.resume = False
            ring.state = STARTED
        self.state.active = True
        self.log.info("device active: %d queues, %d MiB of guest memory, worker pid %s",
                 len(specs), sum(r.size for r in self.state.regions) >> 20,
                 getattr(self.device.worker, "pid", "?"))

    def _stop(self, resume: bool = False) -> Handler:
        """Stop the worker and remember where each ring stands (the next base).

        Never fails: a worker that cannot be stopped gracefully is killed, and a fresh
        worker then reads the used indices from guest memory (the last SET_VRING_BASE is
        stale: a VMM handing it to the next back-end would have buffers replayed that the
        guest already got back).
        """
        state = yield self.device.stop
        # The same driver carries on only across an fd swap or a new memory table: then
        # the huge pages it half gave go to the next worker. Otherwise it may be gone and
        # its pages reused: forget them (remembering would release pages in use).
        self._partial = self.device.carried_partial(state) if resume else ()
        bases = state.get("ring_bases", {}) if isinstance(state, dict) else {}
        names = self.device.queue_names()
        if any(name not in bases for name in names):
            try:
                bases = yield self.device.read_ring_bases
            except WorkerError as exc:
                self.log.error("cannot read where the rings stand: %s", exc)
        for name, ring in zip(names, self.state.vrings):
            if name in bases:
                ring.base = bases[name]
            ring.resume = resume or name not in bases
        for ring in self.state.vrings:
            if ring.state in (STARTED, READY):
                ring.state = STOPPED if ring.state == STARTED else CONFIGURED
        self.state.active = False

    def _restart(self) -> Handler:
        """Serve again after a change made while active (new fds, new memory table)."""
        for ring in self.state.vrings:
            if ring.kick_fd >= 0:
                ring.state = READY
        yield from self._maybe_activate()

    def reset(self) -> Handler:
        """Back to a freshly connected state; every fd this session holds is closed once
        the worker has stopped (a worker thread may still be using them until then)."""
        yield self.device.reset
        self._close_all()
        return None

    def close(self) -> None:
        """The connection is gone: reset the device, then close every fd (later, if the
        worker takes time to stop)."""
        self.closed = True
        self.device.on_config_change = lambda: None
        if self.backend_req is not None:
            self.backend_req.close()
            self.backend_req = None
        self.backend_out.clear()
        self.device.reset(lambda state: self._close_all())

    def _close_all(self) -> None:
        for ring in self.state.vrings:
            ring.close()
        self._close_regions()
        self.state = SessionState()

    def _close_regions(self) -> None:
        for fd in sorted({r.fd for r in self.state.regions}):
            os.close(fd)
        self.state.regions = ()
