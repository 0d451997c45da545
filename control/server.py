"""``vballoon serve``: the vhost-user front door and the operator's control socket.

One thread, one ``selectors`` loop, in the parent (never jailed, never touching guest
memory). It holds the vhost-user connection for as long as the front-end keeps it: a dying
worker is replaced by the proxy's supervisor behind it, so the guest never sees the
connection drop (a guest whose connection drops with pages in the balloon hangs for good).

    vhost-user socket --accept--> one front-end at a time, a fresh device for each
    control socket    --accept--> any number of operator clients (length-prefixed msgpack)
    SIGTERM / SIGINT  ----------> stop the worker, close everything, remove socket files
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field

from control import commands
from control import vhost_user as vu
from control.errors import RequestError
from control.jailed import load_policy
from control.proxy import ProxyBalloon, ProxyOptions, SettleWatch
from control.vhost_backend import MAX_QUEUES, FrontendGone, VhostUserSession
from control.wire import FrameDecoder, FrameError, encode_reply
from device.balloon import SECCOMP_POLICY, BalloonOptions

log = logging.getLogger("vballoon.serve")

MAX_CLIENTS = 64
MAX_CLIENT_BACKLOG = 1 << 20       # bytes of replies a client may leave unread
MAX_WAITS_PER_CLIENT = 16          # pending ``wait`` requests one client may hold
MAX_WAITS = 256                    # ... and all clients together
FRONTEND_HIGH_WATER = 64 * 1024    # unread vhost-user replies: stop reading the front-end
FRONTEND_LOW_WATER = 16 * 1024     # ... and read again once this little is left
ACCEPT_BACKOFF = (0.05, 1.0)       # first and longest pause after accept() ran out of fds
TICK = 0.1                         # seconds between checks of pending waits
# accept() failures that say "not now" (out of fds or memory), not "this listener is broken".
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class ServeOptions:
    socket_path: str
    control_path: str | None = None
    balloon: BalloonOptions = BalloonOptions()
    proxy: ProxyOptions = ProxyOptions()


@dataclass
class Client:
    sock: socket.socket
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    outgoing: bytearray = field(default_factory=bytearray)


@dataclass
class Waiter:
    client: Client
    ident: object
    watch: SettleWatch


class Server:
    """Serves one vhost-user front-end at a time and any number of control clients."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.selector = selectors.DefaultSelector()
        self.running = True
        self.device: ProxyBalloon | None = None
        self.session: VhostUserSession | None = None
        self.conn: socket.socket | None = None
        self.connections = 0            # front-ends served so far
        self._backend_req: socket.socket | None = None
        self.codec: vu.BackendConnection | None = None
        self.clients: dict[int, Client] = {}
        self.waiters: list[Waiter] = []
        self._frontend_out = bytearray()    # vhost-user replies the front-end has not read
        self._frontend_paused = False
        self._timers: list[tuple[float, int, object]] = []
        self._timer_seq = itertools.count()
        self._accept_backoff: dict[int, float] = {}
        if options.proxy.jail:
            # Fail at start-up, not at the guest's first connection, if the policy is bad;
            # and have it parsed (and the jail imported) before the guest waits on it.
            load_policy(options.proxy.policy or SECCOMP_POLICY)
        self._wake_r, self._wake_w = socket.socketpair()
        self.vhost_listener = self._listen(options.socket_path, backlog=1)
        self.selector.register(self.vhost_listener, selectors.EVENT_READ, self._on_listener)
        self.control_listener = None
        if options.control_path:
            try:
                self.control_listener = self._listen(options.control_path, backlog=16)
            except (RequestError, OSError):
                self.vhost_listener.close()
                os.unlink(options.socket_path)
                raise
            self.selector.register(self.control_listener, selectors.EVENT_READ, self._on_listener)

    @staticmethod
    def _listen(path: str, backlog: int) -> socket.socket:
        """Listen on ``path``, replacing a stale socket file but never a live server's."""
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)             # nothing answers: left over from a dead server
            else:
                raise RequestError(f"{path} is in use by a running server")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)          # owner-only from the moment it exists
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(backlog)
        sock.setblocking(False)
        return sock

    # -- the loop ----------------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT or ``stop()``; then shut everything down.

        ``install_signals=False`` runs the loop in a thread other than the main one (where
        Python cannot install signal handlers), as the tests do.
        """
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        restore = self._install_signals() if install_signals else (lambda: None)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        log.info("vhost-user socket %s, control socket %s: ready",
                 self.options.socket_path, self.options.control_path)
        try:
            while self.running:
                self._dispatch(self.selector.select(self._timeout()))
                self._run_timers()
                self._check_waiters()
                self._watch_backend_req()
        finally:
            restore()
            self.shutdown()

    def _dispatch(self, events: list) -> None:
        for key, mask in events:
            # A handler earlier in this batch may have closed this fd (and the number may
            # even be reused): only call handlers still registered under the same key.
            if self.selector.get_map().get(key.fd) is key:
                key.data(key.fileobj, mask)

    # -- timers: they exist only while something is pending ------------------------------

    def call_later(self, delay: float, callback) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), callback))

    def _timeout(self) -> float | None:
        timeout = TICK if self.waiters else None
        if self._timers:
            due = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        return timeout

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            callback()

    def _install_signals(self):
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno())
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return restore

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        self.running = False

    def stop(self) -> None:
        """Ask the loop to end (from another thread)."""
        self.running = False
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass                    # already stopped (the socket is closed) or being woken

    def _on_wake(self, sock: socket.socket, mask: int = selectors.EVENT_READ) -> None:
        try:
            sock.recv(512)
        except BlockingIOError:
            pass

    def shutdown(self) -> None:
        if self.device is not None:
            # Nobody needs the worker's state any more: no graceful stop to wait for.
            self.device.terminate()
        self._drop_frontend("shutting down")
        for client in list(self.clients.values()):
            self._drop_client(client)
        for sock, path in ((self.vhost_listener, self.options.socket_path),
                           (self.control_listener, self.options.control_path)):
            if sock is not None:
                if sock in self._registered():
                    self.selector.unregister(sock)
                sock.close()
                if path and os.path.exists(path):
                    os.unlink(path)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the vhost-user front-end --------------------------------------------------------------

    def _on_listener(self, listener: socket.socket, mask: int = selectors.EVENT_READ) -> None:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY:
                raise
            # Out of fds (or memory): keep serving the connections we have, stop watching
            # this listener (it would be ready again at once) and try again later.
            first, longest = ACCEPT_BACKOFF
            delay = min(longest, self._accept_backoff.get(listener.fileno(), first / 2) * 2)
            self._accept_backoff[listener.fileno()] = delay
            log.warning("cannot accept a connection on %s: %s; retrying in %.2f s",
                        listener.getsockname(), exc.strerror, delay)
            self.selector.unregister(listener)
            self.call_later(delay, lambda: self._resume_listener(listener))
            return
        self._accept_backoff.pop(listener.fileno(), None)
        if listener is self.vhost_listener:
            self._accept_frontend(sock)
        else:
            self._accept_client(sock)

    def _registered(self) -> set:
        return {key.fileobj for key in self.selector.get_map().values()}

    def _resume_listener(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0 and self.running:
            self.selector.register(listener, selectors.EVENT_READ, self._on_listener)

    def _accept_frontend(self, conn: socket.socket) -> None:
        if self.conn is not None:
            log.warning("a second front-end connected while one is served: refused")
            conn.close()
            return
        conn.setblocking(False)
        self.conn = conn
        self._frontend_out.clear()
        self._frontend_paused = False
        self.connections += 1
        self.codec = vu.BackendConnection(max_queues=MAX_QUEUES)
        self.device = ProxyBalloon(self.options.balloon, self.options.proxy)
        self.session = VhostUserSession(self.device)
        self.selector.register(conn, selectors.EVENT_READ, self._on_frontend)
        log.info("front-end connected")

    def _on_frontend(self, conn: socket.socket, mask: int = selectors.EVENT_READ) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_frontend()
        if mask & selectors.EVENT_READ and self.conn is conn and not self._frontend_paused:
            self._read_frontend(conn)

    def _read_frontend(self, conn: socket.socket) -> None:
        try:
            # recvmsg, not socket.recv_fds: on 3.11 recv_fds drops its flags, and the fds
            # must arrive close-on-exec so no child inherits them unless given on purpose.
            data, ancillary, flags, _ = conn.recvmsg(
                vu.RECV_SIZE, vu.ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
            fds = vu.fds_from_ancillary(ancillary)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop_frontend(f"receive failed: {exc}")
            return
        try:
            if data:
                self.codec.receive_data(data, fds, fds_truncated=bool(flags & socket.MSG_CTRUNC))
            else:
                self.codec.receive_eof()
            for event in self.codec.events():
                if isinstance(event, vu.ConnectionClosed):
                    self._drop_frontend("front-end disconnected")
                    return
                reply = self.session.handle(event, self.codec)
                if reply is not None:
                    self._send_frontend(reply)
                    if self.conn is None:
                        return
                self._watch_backend_req()
        except (vu.VhostUserError, FrontendGone) as exc:
            self._drop_frontend(f"vhost-user protocol error: {exc}")
        except Exception:
            # One failure domain per front-end: a bug met by this VM's session ends its
            # connection (logged with the traceback), never ``serve``.
            log.exception("unexpected error serving the front-end")
            self._drop_frontend("internal error")

    def _send_frontend(self, data: bytes) -> None:
        """Queue a reply; never blocks. A front-end that stops reading is stopped being
        read from (it can then ask for nothing more) until it catches up."""
        self._frontend_out += data
        self._flush_frontend()

    def _flush_frontend(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            sent = conn.send(self._frontend_out) if self._frontend_out else 0
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._drop_frontend(f"send failed: {exc}")
            return
        del self._frontend_out[:sent]
        backlog = len(self._frontend_out)
        if not self._frontend_paused and backlog > FRONTEND_HIGH_WATER:
            log.warning("the front-end does not read its replies (%d bytes unread): "
                        "not reading its requests until it does", backlog)
            self._frontend_paused = True
        elif self._frontend_paused and backlog <= FRONTEND_LOW_WATER:
            log.info("the front-end reads its replies again")
            self._frontend_paused = False
        events = (0 if self._frontend_paused else selectors.EVENT_READ) \
            | (selectors.EVENT_WRITE if backlog else 0)
        self.selector.modify(conn, events, self._on_frontend)

    def _watch_backend_req(self) -> None:
        sock = self.session.backend_req if self.session else None
        if sock is not self._backend_req and self._backend_req is not None:
            self.selector.unregister(self._backend_req)
            self._backend_req = None
        if sock is None or sock.fileno() < 0:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.session.backend_out else 0)
        if self._backend_req is None:
            self.selector.register(sock, events, self._on_backend_req)
            self._backend_req = sock
        elif self.selector.get_key(sock).events != events:
            self.selector.modify(sock, events, self._on_backend_req)

    def _on_backend_req(self, sock: socket.socket, mask: int = selectors.EVENT_READ) -> None:
        if mask & selectors.EVENT_WRITE and self.session is not None:
            self.session.flush_backend_req()
        if not mask & selectors.EVENT_READ:
            return
        # We never ask for replies on this channel; anything read is discarded, bounded.
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(sock)
            self._backend_req = None

    def _drop_frontend(self, why: str) -> None:
        if self.conn is None:
            return
        log.info("%s: resetting the device", why)
        self.selector.unregister(self.conn)
        if self._backend_req is not None:
            self.selector.unregister(self._backend_req)
            self._backend_req = None
        self.session.close()
        self.codec.close()
        self.conn.close()
        self._frontend_out.clear()
        for waiter in self.waiters:
            self._reply(waiter.client, {"id": waiter.ident, "ok": False,
                                        "error": "the guest disconnected"})
        self.waiters.clear()
        self.conn = self.codec = self.session = self.device = None

    # -- operator clients --------------------------------------------------------------------

    def _accept_client(self, sock: socket.socket) -> None:
        if len(self.clients) >= MAX_CLIENTS:
            try:
                sock.send(encode_reply({"id": None, "ok": False,
                                        "error": f"more than {MAX_CLIENTS} control clients"}))
            except OSError:
                pass                        # it is being refused either way
            sock.close()
            return
        sock.setblocking(False)
        client = Client(sock)
        self.clients[sock.fileno()] = client
        self.selector.register(sock, selectors.EVENT_READ, self._on_client)

    def _on_client(self, sock: socket.socket, mask: int = selectors.EVENT_READ) -> None:
        client = self.clients[sock.fileno()]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client(client)
            return
        try:
            messages = client.decoder.feed(data)
        except FrameError as exc:
            self._reply(client, {"id": None, "ok": False, "error": str(exc)})
            self._drop_client(client)
            return
        for message in messages:
            if client.sock.fileno() < 0:
                return
            try:
                self._serve(client, message)
            except Exception:
                # One failure domain per client: a bug met by one request ends that
                # client (logged with the traceback), never ``serve``.
                log.exception("unexpected error serving a control request")
                self._reply(client, {"id": None, "ok": False, "error": "internal error"})
                self._drop_client(client)
                return

    def _serve(self, client: Client, message: dict) -> None:
        ident = message.get("id")
        if not (ident is None or type(ident) is int):
            ident = None
        try:
            result = commands.handle(self.device, message)
            if isinstance(result, commands.WaitRequest):
                self._check_wait_limits(client)
        except RequestError as exc:
            self._reply(client, {"id": ident, "ok": False, "error": str(exc)})
            return
        if isinstance(result, commands.WaitRequest):
            now = time.monotonic()
            watch = SettleWatch(now + result.timeout, result.stall, self.device.config.actual, now)
            self.waiters.append(Waiter(client, ident, watch))
            self._check_waiters()
            return
        self._reply(client, {"id": ident, "ok": True, **result})

    def _check_wait_limits(self, client: Client) -> None:
        if len(self.waiters) >= MAX_WAITS:
            raise RequestError(f"{MAX_WAITS} waits are pending on this server: try again "
                               f"when some have ended")
        if sum(1 for w in self.waiters if w.client is client) >= MAX_WAITS_PER_CLIENT:
            raise RequestError(f"this client already has {MAX_WAITS_PER_CLIENT} waits "
                               f"pending")

    def _check_waiters(self) -> None:
        if not self.waiters:
            return
        now = time.monotonic()
        done, self.waiters = self.waiters, []
        body = None
        for waiter in done:
            if waiter.client.sock.fileno() < 0:
                continue                    # its client went away while we replied
            if self.device is None:
                outcome = "disconnected"
            else:
                config = self.device.config
                outcome = waiter.watch.check(config.actual, config.num_pages, now)
            if outcome is None:
                self.waiters.append(waiter)
                continue
            body = body or commands.status(self.device)
            self._reply(waiter.client, {"id": waiter.ident, "ok": True,
                                        "outcome": outcome, **body})

    def _reply(self, client: Client, message: dict) -> None:
        if client.sock.fileno() < 0:
            return
        client.outgoing += encode_reply(message)
        if len(client.outgoing) > MAX_CLIENT_BACKLOG:
            log.warning("control client does not read its replies: dropped")
            self._drop_client(client)
            return
        self._flush(client)

    def _flush(self, client: Client) -> None:
        try:
            sent = client.sock.send(client.outgoing)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop_client(client)
            return
        del client.outgoing[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outgoing else 0)
        self.selector.modify(client.sock, events, self._on_client_io)

    def _on_client_io(self, sock: socket.socket, mask: int = selectors.EVENT_READ) -> None:
        client = self.clients.get(sock.fileno())
        if client is None:
            return
        if client.outgoing:
            self._flush(client)
        if sock.fileno() >= 0 and sock.fileno() in self.clients:
            self._on_client(sock)

    def _drop_client(self, client: Client) -> None:
        fd = client.sock.fileno()
        if fd < 0:
            return
        self.clients.pop(fd, None)
        self.selector.unregister(client.sock)
        client.sock.close()
        self.waiters = [w for w in self.waiters if w.client is not client]


def serve(options: ServeOptions) -> None:
    Server(options).run()
