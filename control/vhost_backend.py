"""One vhost-user session: the front-end's requests turned into calls on a balloon device.

The codec (``control.vhost_user``) has already checked every message's shape and fds; this
layer checks meaning (indices against the negotiated queues, addresses against the memory
table) and keeps the per-connection state::

    connected --SET_FEATURES/SET_MEM_TABLE/SET_VRING_*--> configuring
    configuring --SET_VRING_KICK of the last queue--> active (the jailed worker runs)
    active --GET_VRING_BASE / RESET_DEVICE / RESET_OWNER--> stopped --(kicks again)--> active
    any --connection closed--> closed (the device is reset, every fd closed)

Config space is served here, in the parent: the guest reads it and writes ``actual`` once
per MiB it inflates, and nothing on that path needs the worker.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

from control import vhost_user as vu
from control.errors import ControlError, WorkerError
from control.proxy import ProxyBalloon
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


class FrontendGone(ControlError):
    """The front-end broke the protocol beyond a refusal: close its connection."""


@dataclass
class Vring:
    num: int = 0
    base: int = 0
    addr: vu.SetVringAddr | None = None
    kick_fd: int = -1
    call_fd: int = -1
    kicked: bool = False     # a kick fd arrived since the rings last stopped: set up anew
    resume: bool = False     # restart at the used index in memory, not at ``base``

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
    active: bool = False


class VhostUserSession:
    """Handles one front-end connection for ``device`` (a fresh device per connection)."""

    def __init__(self, device: ProxyBalloon) -> None:
        self.device = device
        self.state = SessionState()
        self.backend_req: socket.socket | None = None
        self.backend_out = bytearray()     # backend requests the front-end has not read
        self.backend_sender = vu.BackendRequestSender()
        device.on_config_change = self.notify_config_change

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, event: vu.Request | vu.RejectedRequest, conn: vu.BackendConnection) -> bytes | None:
        """Apply one event; return the reply to send (None if the front-end expects none).

        A request that fails is refused (a failure ack, or the failure form of its reply)
        and changes nothing. Raises ``FrontendGone`` only when the front-end asked for
        something whose reply we cannot even express (it never was offered): the caller
        closes the connection.
        """
        if isinstance(event, vu.RejectedRequest):
            log.warning("refused vhost-user request %s: %s", event.request, event.error)
            return self._fail(event, conn)
        handler = getattr(self, f"_on_{type(event).__name__}", None)
        log.debug("vhost-user %s", event)
        if handler is None:
            for fd in event.carried_fds:      # e.g. ADD_MEM_REG: never offered, fd refused
                os.close(fd)
            log.warning("vhost-user %s is not supported", type(event).__name__)
            return self._fail(event, conn)
        try:
            reply = handler(event, conn)
        except (ControlError, DeviceError, OSError) as exc:
            log.warning("vhost-user %s failed: %s", type(event).__name__, exc)
            return self._fail(event, conn)
        if reply is None and event.reply_expected:
            return conn.reply_ack(event.REQUEST, True)
        return reply

    def _fail(self, event: vu.Request | vu.RejectedRequest, conn: vu.BackendConnection) -> bytes | None:
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

    def _on_SetOwner(self, event, conn) -> None:
        return None

    def _on_GetFeatures(self, event, conn) -> bytes:
        return conn.reply_u64(event.REQUEST, self.device.device_features
                              | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)

    def _on_SetFeatures(self, event, conn) -> None:
        virtio = event.features & ~(1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)
        unknown = virtio & ~self.device.device_features
        if unknown:
            # Checked before anything stops: a refused request changes nothing.
            raise ControlError(f"features {unknown:#x} were not offered")
        if self.state.active:
            # A driver probing again (UML sends no reset when its driver goes away).
            self._stop()
        self.device.ack_features(virtio)
        self.state.features = event.features
        log.info("guest negotiated %s", ", ".join(feature_names(virtio)) or "no features")

    def _on_GetProtocolFeatures(self, event, conn) -> bytes:
        return conn.reply_u64(event.REQUEST, OFFERED_PROTOCOL_FEATURES)

    def _on_SetProtocolFeatures(self, event, conn) -> None:
        unknown = event.features & ~OFFERED_PROTOCOL_FEATURES
        if unknown:
            raise ControlError(f"protocol features {unknown:#x} were not offered")
        self.state.protocol_features = event.features

    def _on_GetQueueNum(self, event, conn) -> bytes:
        return conn.reply_u64(event.REQUEST, MAX_QUEUES)

    def _on_SetBackendReqFd(self, event, conn) -> None:
        try:
            sock = socket.socket(fileno=event.fd)
        except OSError:
            os.close(event.fd)                 # not a socket: refused, and not kept
            raise
        if self.backend_req is not None:
            self.backend_req.close()
        self.backend_out.clear()
        self.backend_req = sock
        self.backend_req.setblocking(False)

    # -- memory and rings ----------------------------------------------------------------------

    def _on_SetMemTable(self, event, conn) -> None:
        regions = []
        try:
            for region, fd in zip(event.regions, event.fds):
                regions.append(MemoryRegion.from_fd(
                    fd, region.guest_phys_addr, region.memory_size, region.mmap_offset,
                    region.userspace_addr))
            regions.sort(key=lambda r: r.guest_addr)
            validate_regions(regions)
        except (DeviceError, OSError):
            for fd in event.fds:
                os.close(fd)
            raise
        was_active = self.state.active
        if was_active:
            try:
                # The running rings must still lie in the new table, or the change is
                # refused while the old table keeps serving.
                self._ring_configs(regions)
            except DeviceError:
                for fd in sorted({r.fd for r in regions}):
                    os.close(fd)
                raise
            self._stop(resume=True)
        self._close_regions()
        self.state.regions = tuple(regions)
        if was_active:
            self._restart()

    def _vring(self, index: int) -> Vring:
        if index >= len(self.device.queue_names()) and self.state.features:
            raise ControlError(f"vring {index} is not one of the negotiated queues")
        return self.state.vrings[index]

    def _on_SetVringNum(self, event, conn) -> None:
        self._vring(event.index).num = event.num

    def _on_SetVringBase(self, event, conn) -> None:
        self._vring(event.index).base = event.num

    def _on_SetVringAddr(self, event, conn) -> None:
        self._vring(event.index).addr = event

    def _on_SetVringCall(self, event, conn) -> None:
        self._replace_fd(event, "call_fd")

    def _on_SetVringErr(self, event, conn) -> None:
        if event.fd is not None:
            os.close(event.fd)      # we never report ring errors through it

    def _on_SetVringKick(self, event, conn) -> None:
        self._replace_fd(event, "kick_fd")
        self.state.vrings[event.index].kicked = True
        self._maybe_activate()

    def _replace_fd(self, event, name: str) -> None:
        try:
            vring = self._vring(event.index)
        except ControlError:
            if event.fd is not None:
                os.close(event.fd)
            raise
        if event.fd is None:
            raise ControlError("polling mode (NOFD) is not supported")
        was_active = self.state.active
        if was_active:
            # A VMM may swap fds while running (QEMU does for interrupt masking): the
            # worker holds the old ones, so it is replaced, resuming where it stood.
            self._stop(resume=True)
        old = getattr(vring, name)
        if old >= 0:
            os.close(old)
        setattr(vring, name, event.fd)
        if was_active:
            self._restart()

    def _on_SetVringEnable(self, event, conn) -> None:
        self._vring(event.index)
        if not event.enable and self.state.active:
            # The driver is tearing its rings down and will reuse their memory: the
            # worker must not touch them again.
            self._stop()

    def _on_GetVringBase(self, event, conn) -> bytes:
        vring = self._vring(event.index)
        if self.state.active:
            self._stop()
        return conn.reply_vring_state(event.index, vring.base)

    def _on_ResetDevice(self, event, conn) -> None:
        self.reset()

    def _on_ResetOwner(self, event, conn) -> None:
        self.reset()

    # -- config space ------------------------------------------------------------------------

    def _on_GetConfig(self, event, conn) -> bytes:
        data = self.device.read_config(event.offset, event.size)
        return conn.reply_config(event.offset, event.size, event.flags,
                                 data.ljust(event.size, b"\0"))

    def _on_SetConfig(self, event, conn) -> None:
        self.device.write_config(event.offset, event.data)

    def notify_config_change(self) -> None:
        """Tell the front-end config space changed (BACKEND_CONFIG_CHANGE_MSG)."""
        if self.backend_req is None:
            log.warning("config changed but the front-end gave no backend-request channel")
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
            log.warning("cannot send the config change to the front-end: %s", exc)
            self.backend_out.clear()
            return
        del self.backend_out[:sent]

    # -- activation ------------------------------------------------------------------------------

    def _maybe_activate(self) -> None:
        names = self.device.queue_names()
        rings = self.state.vrings[:len(names)]
        if self.state.active or not self.state.regions \
                or any(not r.kicked or r.call_fd < 0 or r.addr is None for r in rings):
            return
        specs = [QueueSpec(config, ring.kick_fd, ring.call_fd, None if ring.resume else ring.base)
                 for config, ring in zip(self._ring_configs(self.state.regions), rings)]
        self.device.activate(list(self.state.regions), specs)
        for ring in rings:
            ring.resume = False
        self.state.active = True
        log.info("device active: %d queues, %d MiB of guest memory, worker pid %s",
                 len(specs), sum(r.size for r in self.state.regions) >> 20,
                 getattr(self.device.worker, "pid", "?"))

    def _ring_configs(self, regions) -> list[QueueConfig]:
        """The negotiated rings' configs under ``regions``; raises ``AddressOutOfRange``."""
        features = self.device.acked_features
        return [QueueConfig(ring.num, user_to_guest(regions, ring.addr.desc),
                            user_to_guest(regions, ring.addr.avail),
                            user_to_guest(regions, ring.addr.used),
                            event_idx=bool(features >> VIRTIO_F_EVENT_IDX & 1),
                            indirect=bool(features >> VIRTIO_F_INDIRECT_DESC & 1))
                for ring in self.state.vrings[:len(self.device.queue_names())]]

    def _stop(self, resume: bool = False) -> None:
        """Stop the worker and remember where each ring stands (the next base).

        Never raises: a worker that cannot be stopped gracefully is killed, and its rings
        are then marked to resume from the used index in guest memory.
        """
        try:
            state = self.device.kill()
        except WorkerError as exc:
            log.warning("stopping the worker: %s", exc)
            state = {}
        bases = state.get("ring_bases", {})
        names = self.device.queue_names()
        if any(name not in bases for name in names):
            # The worker could not say (dead, restarting, stopped, past its grace): the
            # last SET_VRING_BASE is stale, and a VMM handing it to the next back-end would
            # have buffers replayed that the guest already got back. A fresh worker reads
            # the used indices from guest memory.
            try:
                bases = self.device.read_ring_bases()
            except WorkerError as exc:
                log.error("cannot read where the rings stand: %s", exc)
        for name, ring in zip(names, self.state.vrings):
            if name in bases:
                ring.base = bases[name]
            ring.resume = resume or name not in bases
        for ring in self.state.vrings:
            ring.kicked = False
        self.state.active = False

    def _restart(self) -> None:
        """Serve again after a change made while active (new fds, new memory table)."""
        for ring in self.state.vrings:
            ring.kicked = ring.kick_fd >= 0
        self._maybe_activate()

    def reset(self) -> None:
        """Back to a freshly connected state; every fd this session holds is closed."""
        try:
            self.device.reset()
        except WorkerError as exc:
            log.warning("resetting the device: %s", exc)
        for ring in self.state.vrings:
            ring.close()
        self._close_regions()
        self.state = SessionState()

    def close(self) -> None:
        self.reset()
        if self.backend_req is not None:
            self.backend_req.close()
            self.backend_req = None
        self.backend_out.clear()

    def _close_regions(self) -> None:
        for fd in sorted({r.fd for r in self.state.regions}):
            os.close(fd)
        self.state.regions = ()
