"""One vhost-user front-end connection on the event loop: its socket, codec, session and
reply buffer. Nothing here blocks.

- Replies go to a buffer flushed when the socket is writable. A front-end that leaves more
  than ``FRONTEND_HIGH_WATER`` bytes unread is not read from (so it can ask for nothing
  more) until it is down to ``FRONTEND_LOW_WATER``; it is never disconnected for it, since
  a guest whose connection drops with pages in the balloon hangs for good.
- A request the session answers later (the worker has to stop or start first) is the only
  one in flight: no further request is read until its reply is queued, so replies stay in
  order and the codec holds at most one message.
- Fair to the other VMs on the loop: one turn handles at most ``MESSAGES_PER_TURN`` of
  the requests one read brought; the rest wait for the next turn (after every other ready
  connection had its own), and the socket is not read again until they are handled. A
  front-end flooding its socket delays another VM's reply by a few messages, not by a
  whole read's worth (a 4 KiB read holds up to ~340 requests).
- Bounded: a front-end may send ``REQUESTS_PER_SECOND`` requests a second (``REQUEST_BURST``
  at once); past that its socket is read no faster. An honest front-end sends ~2 per MiB
  its guest inflates: ~5 000 a second here for UML inflating at full speed, <10 000 at the
  kernel's limit. A flood (~180 000 a second otherwise) then costs ``serve`` about a fifth
  of a CPU, not all of the one thread that serves every VM. Counted in ``frontend_pauses``.
- Config-change notices on the backend-request channel are queued the same way (and
  coalesced by the session).
- Any unexpected error in this connection's handling ends this connection, with its
  traceback in the log, and nothing else.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable

from control import vhost_user as vu
from control.logs import VmLog
from control.loop import EventLoop
from control.handover import VmRecord
from control.vhost_backend import (MAX_QUEUES, PENDING, READY, STARTED, FrontendGone,
                                   VhostUserSession)
from control.vmdevice import VmDevice
from device.tokens import TokenBucket

log = logging.getLogger("vballoon.vhost")

FRONTEND_HIGH_WATER = 64 * 1024    # unread vhost-user replies: stop reading the front-end
FRONTEND_LOW_WATER = 16 * 1024     # ... and read again once this little is left
# Plain ints: combining the socket module's flag enums costs more than the call they go to.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)
_PEEK_FLAGS = _RECV_FLAGS | int(socket.MSG_PEEK)
# Requests that never carry fds: with a keeper, handled while still queued (see _peek_one).
_WITHOUT_FDS = frozenset(int(r) for r in (
    vu.FrontendRequest.GET_FEATURES, vu.FrontendRequest.SET_FEATURES,
    vu.FrontendRequest.SET_OWNER, vu.FrontendRequest.RESET_OWNER,
    vu.FrontendRequest.SET_VRING_NUM, vu.FrontendRequest.SET_VRING_ADDR,
    vu.FrontendRequest.SET_VRING_BASE, vu.FrontendRequest.GET_VRING_BASE,
    vu.FrontendRequest.GET_PROTOCOL_FEATURES, vu.FrontendRequest.SET_PROTOCOL_FEATURES,
    vu.FrontendRequest.GET_QUEUE_NUM, vu.FrontendRequest.SET_VRING_ENABLE,
    vu.FrontendRequest.GET_CONFIG, vu.FrontendRequest.SET_CONFIG,
    vu.FrontendRequest.RESET_DEVICE, vu.FrontendRequest.GET_MAX_MEM_SLOTS))
MESSAGES_PER_TURN = 8              # requests handled per turn before the other connections'
REQUESTS_PER_SECOND = 40_000.0     # a front-end's requests, sustained ...
REQUEST_BURST = 4_000.0            # ... and at once
BILL_EVERY = 32                    # requests counted against the budget together
PARTIAL_WAIT = (0.001, 0.1)        # first and longest pause before looking at a partial request again
KEEPER_DEADLINE = 1.0              # seconds a reply waits for its records to reach the keeper


class VhostUserPeer:
    """Serves ``device`` to the front-end on ``conn``; ``on_closed(why)`` when it ends."""

    def __init__(self, loop: EventLoop, conn: socket.socket, device: VmDevice,
                 on_closed: Callable[[str], None], record: VmRecord | None = None) -> None:
        self.loop = loop
        self.log = VmLog(log, device.name)
        self.conn = conn
        self.device = device
        self.codec = vu.BackendConnection(max_queues=MAX_QUEUES)
        self.session = VhostUserSession(device)
        self.session.on_reply = self._on_late_reply
        self.session.on_error = self._on_session_error
        self.session.retire_backend_req = self._retire_backend_req
        self.on_closed = on_closed
        self.out = bytearray()
        self.paused = False
        self.closed = False
        self._held = False                # requests left for a later turn: not reading
        self._budget = TokenBucket(REQUESTS_PER_SECOND, REQUEST_BURST)
        self._throttled_once = False
        self._unbilled = 0                # requests handled, not yet counted in _budget
        self.record = record              # what a successor needs, left with the keeper
        self._recording: tuple | None = None   # a kept request answered later
        self._settle: Callable[[], None] | None = None   # once the request is answered
        self._partial_wait = PARTIAL_WAIT[0]
        self._writing = False             # watching the socket for writability
        self._watched: tuple | None = None  # what _update last set up
        self._backend_req: socket.socket | None = None
        device.on_config_change = self._config_changed
        conn.setblocking(False)
        self._update()

    # -- reading ---------------------------------------------------------------------------------

    def _readable(self) -> None:
        if self.record is not None and self.codec.idle:
            self._peek_one()
            return
        self._receive()

    def _peek_one(self) -> None:
        """With a keeper, a request is never lost to a crash between reading and answering
        it: the successor answers it. A request without fds is handled while it is still
        queued in the socket and taken out once answered; one that may carry fds (setup
        only) is read, left with the keeper as the one in flight, and forgotten once
        answered. (The kernel may hand a later request's fds to a peek, so fds are only
        ever taken from a real read.) Serve dying after a reply is sent and before the
        request is taken out or forgotten makes the successor answer it twice: a window of
        one system call, against the whole handling otherwise."""
        try:
            data, ancillary, _, _ = self.conn.recvmsg(vu.RECV_SIZE, vu.ANCILLARY_SIZE,
                                                      _PEEK_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"receive failed: {exc}")
            return
        for fd in vu.fds_from_ancillary(ancillary) if ancillary else ():
            os.close(fd)                      # a later request's, or duplicates: see above
        if not data:
            self._receive()                   # the end of the stream
            return
        total = 12 + int.from_bytes(data[8:12], "little") if len(data) >= 12 else 0
        if (not total or len(data) < total) and total <= vu.RECV_SIZE \
                and not self._hung_up():
            self._await_rest()                # a request not all there yet
            return
        if not total or len(data) < total:
            self._receive()                   # too large (refused), or never completed
            return
        self._partial_wait = PARTIAL_WAIT[0]
        if int.from_bytes(data[:4], "little") in _WITHOUT_FDS:
            self._settle = lambda: self._consume_peeked(total)
            self._serve_buffered(data[:total], [], False)
            return
        self._receive(min(total, vu.RECV_SIZE), in_flight=True)

    def _hung_up(self) -> bool:
        """The front-end closed its end (a peek shows the bytes before the end, never the
        end itself)."""
        poller = select.poll()
        poller.register(self.conn, select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                   for _, events in poller.poll(0))

    def _await_rest(self) -> None:
        """Part of a request is queued: look again a little later (no read takes it out
        before it is whole, so it is never lost to a crash), backing off to at most
        ``PARTIAL_WAIT[1]`` s for a front-end that never sends the rest."""
        wait, self._partial_wait = self._partial_wait, min(self._partial_wait * 2,
                                                           PARTIAL_WAIT[1])
        self._held = True
        self._update()

        def again() -> None:
            self._held = False
            self._update()
        self.loop.call_later(wait, again)

    def _answer_when_kept(self, reply: bytes | None) -> None:
        """What a request changed is still queued for the keeper (its socket is full): the
        front-end hears the reply only once it is kept, so a successor never knows less
        than the front-end was told. Nothing more is read meanwhile."""
        self._held = True
        store = self.record.store
        # Bounded: a keeper that does not take them in KEEPER_DEADLINE s is given up (it
        # then forgets all it held), and the front-end is answered.
        deadline = self.loop.call_later(KEEPER_DEADLINE, lambda: store.give_up(
            f"the keeper did not take serve's records in {KEEPER_DEADLINE:g} s"))

        def kept() -> None:
            deadline.cancel()
            self.loop.call_soon(lambda: self._answer(reply))
        store.when_flushed(kept)

    def _answer(self, reply: bytes | None) -> None:
        if not self.closed:
            self._reply(reply)
            self._serve_buffered()

    def _reply(self, reply: bytes | None) -> None:
        """Send ``reply`` (if the request has one); then settle the request with the keeper
        (take it out of the socket, or forget it as in flight)."""
        if reply is not None:
            self._send(reply)
        if self._settle is not None:
            settle, self._settle = self._settle, None
            settle()

    def _consume_peeked(self, count: int) -> None:
        """Take the request just answered (``count`` bytes) out of the socket."""
        try:
            data, ancillary, _, _ = self.conn.recvmsg(count, vu.ANCILLARY_SIZE, _RECV_FLAGS)
        except OSError as exc:
            self.close(f"receive failed: {exc}")
            return
        for fd in vu.fds_from_ancillary(ancillary) if ancillary else ():
            os.close(fd)                      # (a request of a kind that carries none)
        if len(data) != count:
            self.close(f"the peeked request changed under us ({len(data)} of {count} bytes)")

    def _receive(self, size: int = vu.RECV_SIZE, in_flight: bool = False) -> None:
        """Read and handle what came. ``in_flight`` (with a keeper): ``size`` is one whole
        request's, left with the keeper until it is answered."""
        try:
            # recvmsg, not socket.recv_fds: on 3.11 recv_fds drops its flags, and the fds
            # must arrive close-on-exec so no child inherits them unless given on purpose.
            data, ancillary, flags, _ = self.conn.recvmsg(size, vu.ANCILLARY_SIZE, _RECV_FLAGS)
            fds = vu.fds_from_ancillary(ancillary) if ancillary else []
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"receive failed: {exc}")
            return
        if in_flight and len(data) == size:
            try:
                self.record.in_flight(data, fds)
                self._settle = self.record.answered
            except OSError as exc:               # out of fds: keep nothing for this VM
                self.record.give_up(f"cannot keep a request in flight ({exc.strerror})")
        self._serve_buffered(data, fds, bool(flags & _CTRUNC))

    def _serve_buffered(self, data: bytes | None = None, fds: list[int] = (),
                        fds_truncated: bool = False) -> None:
        """Take in what a read brought (``data``; b"" at EOF), or nothing when called for a
        later turn, and handle the requests buffered."""
        self._held = False
        try:
            if data:
                self.codec.receive_data(data, fds, fds_truncated=fds_truncated)
            elif data is not None:
                self.codec.receive_eof()
            self._process()
        except (vu.VhostUserError, FrontendGone) as exc:
            self.close(f"vhost-user protocol error: {exc}")
        except Exception:
            self._on_session_error(None)

    def _process(self) -> None:
        """Handle requests until the codec needs data, one is answered later, or this turn's
        share is spent (the rest then in a later turn of the loop)."""
        handled = 0
        while not self.closed and not self.session.busy:
            event = self.codec.next_event()
            if isinstance(event, vu.NeedData):
                break
            if isinstance(event, vu.ConnectionClosed):
                self.close("front-end disconnected")
                return
            handled += 1
            if self.record is not None:
                reply = self._handle_recorded(event)
            else:
                reply = self.session.handle(event, self.codec)
            if reply is PENDING:
                break
            if self.record is not None and not self.record.store.flushed:
                self._answer_when_kept(reply)
                break
            self._reply(reply)
            if self.codec.idle or handled == MESSAGES_PER_TURN:
                break             # the usual case: one message read, answered
        if handled and not self.closed:
            wait = 0.0
            self._unbilled += handled
            if self._unbilled >= BILL_EVERY:      # (the clock read once per BILL_EVERY)
                wait = self._budget.spend(time.monotonic(), self._unbilled)
                self._unbilled = 0
            if wait:
                self._hold(wait)
            elif not self.codec.idle and not self.session.busy:
                self._hold(0.0)   # more buffered: after the other connections' turns
        self._update()

    def _hold(self, wait: float) -> None:
        """Stop reading; handle what is buffered (and read again) ``wait`` seconds on."""
        if self._held:
            return
        self._held = True
        if not wait:
            self.loop.call_soon(self._serve_buffered)
            return
        self.device.frontend_pauses += 1
        if not self._throttled_once:
            self._throttled_once = True
            self.log.warning("the front-end sends more than %d requests a second: reading "
                             "them no faster", REQUESTS_PER_SECOND)
        self.loop.call_later(wait, self._serve_buffered)

    def _handle_recorded(self, event) -> bytes | None | object:
        try:
            if isinstance(event, vu.SetFeatures) and self.session.stops_for(event):
                self.record.forget_kicks()
            prepared = self.record.prepare(event) if isinstance(event, vu.Request) else None
        except OSError as exc:                   # out of fds: keep nothing for this VM
            self.record.give_up(f"cannot keep {type(event).__name__} ({exc.strerror})")
            prepared = None
        failures = self.session.failures
        try:
            reply = self.session.handle(event, self.codec)
        except BaseException:
            if prepared is not None:
                self.record.commit(prepared, False)
            raise
        if prepared is not None:
            if reply is PENDING:
                self._recording = (prepared, failures)
            else:
                self._commit(prepared, failures)
        return reply

    def _commit(self, prepared: tuple, failures: int) -> None:
        index = prepared[1]
        vrings = self.session.state.vrings
        base = vrings[index].base if isinstance(index, int) else None
        self.record.commit(prepared, self.session.failures == failures, base)
        # A setup request may have stopped rings (a driver probing again sends SET_FEATURES
        # alone): what is kept follows the session, never more than it serves.
        self.record.rings_stopped([(i, ring.base) for i, ring in enumerate(vrings)
                                   if ring.state not in (READY, STARTED)])

    def adopt(self, requests: list[tuple[bytes, list[int]]],
              in_flight: tuple[bytes, list[int]] | None,
              done: Callable[[BaseException | None], None]) -> None:
        """Carry on a dead serve's session: replay its setup ``requests`` (bytes and fds,
        in order; answered to nobody), then start the rings that were served. The request
        it had read and not answered (``in_flight``) is handled and answered next, then
        what the front-end sent meanwhile, in order."""
        replay = vu.BackendConnection(max_queues=MAX_QUEUES)
        self.session.adopting = True
        self._held = True                  # the socket is not read until the rings run
        self._update()
        replay_done: list = []                # requests whose fds the replay took
        try:
            for data, fds in requests:
                replay_done.append(None)
                replay.receive_data(data, fds)
                event = replay.next_event()
                if isinstance(event, vu.NeedData | vu.ConnectionClosed):
                    raise vu.VhostUserError("a kept request is incomplete")
                if self.session.handle(event, replay) is PENDING:
                    raise vu.VhostUserError(f"a kept {type(event).__name__} did not apply at once")
        except (vu.VhostUserError, FrontendGone) as exc:
            self.session.adopting = False
            replay.close()                     # (fds of a request it holds incomplete)
            replayed = sum(1 for _ in replay_done)
            for _, fds in requests[replayed:] + ([in_flight] if in_flight else []):
                for fd in fds:
                    os.close(fd)
            self.close(f"cannot adopt the connection: {exc}")
            done(exc)
            return

        def started(error: BaseException | None) -> None:
            done(error)
            if in_flight is None or self.closed:
                for fd in in_flight[1] if in_flight else ():
                    os.close(fd)
                self._serve_buffered()
                return
            if self.record is not None:
                self._settle = self.record.answered
            self._serve_buffered(*in_flight)
        self.session.finish_adoption(started)

    def _on_late_reply(self, reply: bytes | None) -> None:
        if self._recording is not None:
            prepared, failures = self._recording
            self._recording = None
            self._commit(prepared, failures)
        if self.closed:
            return
        if self.record is not None and not self.record.store.flushed:
            self._answer_when_kept(reply)
            self._update()
            return
        try:
            self._reply(reply)
            self._process()
        except (vu.VhostUserError, FrontendGone) as exc:
            self.close(f"vhost-user protocol error: {exc}")

    def _on_session_error(self, exc: BaseException | None) -> None:
        self.log.exception("unexpected error serving the front-end", exc_info=exc or True)
        self.close("internal error")

    # -- writing ---------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if not self.out and not self.closed:
            # The usual case, nothing queued: straight to the socket, no buffer in between.
            try:
                sent = self.conn.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.close(f"send failed: {exc}")
                return
            if sent == len(data):
                return
            data = data[sent:]
        self.out += data
        self._flush()

    def _flush(self) -> None:
        if self.closed:
            return
        try:
            sent = self.conn.send(self.out) if self.out else 0
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.close(f"send failed: {exc}")
            return
        del self.out[:sent]
        backlog = len(self.out)
        if not self.paused and backlog > FRONTEND_HIGH_WATER:
            self.log.warning("the front-end does not read its replies (%d bytes unread): "
                        "not reading its requests until it does", backlog)
            self.paused = True
        elif self.paused and backlog <= FRONTEND_LOW_WATER:
            self.log.info("the front-end reads its replies again")
            self.paused = False
        if backlog or self.paused or self._writing:
            self._update()        # the hot path (all sent, nothing was pending) skips this

    def _update(self) -> None:
        """Watch the sockets for what this connection can do now (nothing to do, the common
        case of one request answered at once, when none of that changed)."""
        if self.closed:
            return
        reading = not self.paused and not self.session.busy and not self._held
        sock = self.session.backend_req
        key = (reading, bool(self.out), sock, bool(self.session.backend_out))
        if key == self._watched:
            return
        self._watched = key
        self._writing = bool(self.out)
        self.loop.watch(self.conn, reader=self._readable if reading else None,
                        writer=self._flush if self._writing else None)
        if sock is not self._backend_req and self._backend_req is not None:
            self.loop.unwatch(self._backend_req)
            self._backend_req = None
        if sock is not None and sock.fileno() >= 0:
            self._backend_req = sock
            self.loop.watch(sock, reader=self._backend_req_readable,
                            writer=self._backend_req_writable if self.session.backend_out else None)

    def _retire_backend_req(self, sock: socket.socket) -> None:
        if sock is self._backend_req:
            self.loop.unwatch(sock)
            self._backend_req = None
            self._watched = None
        sock.close()

    def _backend_req_writable(self) -> None:
        self.session.flush_backend_req()
        self._update()

    def _backend_req_readable(self) -> None:
        # We never ask for replies on this channel; anything read is discarded, bounded.
        sock = self._backend_req
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.unwatch(sock)
            self._backend_req = None
            self._watched = None

    def _config_changed(self) -> None:
        """A new target: tell the front-end (the notice is queued, sent when possible)."""
        self.session.notify_config_change()
        self._update()

    # -- ending ----------------------------------------------------------------------------------

    def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.log.info("%s: resetting the device", why)
        if self._recording is not None:
            self.record.commit(self._recording[0], False)
            self._recording = None
        self.loop.unwatch(self.conn)
        if self._backend_req is not None:
            self.loop.unwatch(self._backend_req)
            self._backend_req = None
        self.session.close()
        self.codec.close()
        self.conn.close()
        self.out.clear()
        self.on_closed(why)
