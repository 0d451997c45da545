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
from control.wire import FrameDecoder, FrameError, encode_frame
from device.balloon import SECCOMP_POLICY, BalloonOptions

log = logging.getLogger("vballoon.serve")

MAX_CLIENTS = 64
MAX_CLIENT_BACKLOG = 1 << 20       # bytes of replies a client may leave unread
TICK = 0.1                         # seconds between checks of pending waits


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
        if options.proxy.jail:
            # Fail at start-up, not at the guest's first connection, if the policy is bad;
            # and have it parsed (and the jail imported) before the guest waits on it.
            load_policy(options.proxy.policy or SECCOMP_POLICY)
        self._wake_r, self._wake_w = socket.socketpair()
        self.vhost_listener = self._listen(options.socket_path, backlog=1)
        self.selector.register(self.vhost_listener, selectors.EVENT_READ, self._accept_frontend)
        self.control_listener = None
        if options.control_path:
            try:
                self.control_listener = self._listen(options.control_path, backlog=16)
            except (RequestError, OSError):
                self.vhost_listener.close()
                os.unlink(options.socket_path)
                raise
            self.selector.register(self.control_listener, selectors.EVENT_READ, self._accept_client)

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
                self._dispatch(self.selector.select(TICK if self.waiters else None))
                self._check_waiters()
        finally:
            restore()
            self.shutdown()

    def _dispatch(self, events: list) -> None:
        for key, _ in events:
            # A handler earlier in this batch may have closed this fd (and the number may
            # even be reused): only call handlers still registered under the same key.
            if self.selector.get_map().get(key.fd) is key:
                key.data(key.fileobj)

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
        self._wake_w.send(b"\0")

    def _on_wake(self, sock: socket.socket) -> None:
        try:
            sock.recv(512)
        except BlockingIOError:
            pass

    def shutdown(self) -> None:
        self._drop_frontend("shutting down")
        for client in list(self.clients.values()):
            self._drop_client(client)
        for sock, path in ((self.vhost_listener, self.options.socket_path),
                           (self.control_listener, self.options.control_path)):
            if sock is not None:
                self.selector.unregister(sock)
                sock.close()
                if path and os.path.exists(path):
                    os.unlink(path)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the vhost-user front-end --------------------------------------------------------------

    def _accept_frontend(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:
            log.warning("a second front-end connected while one is served: refused")
            conn.close()
            return
        conn.setblocking(True)
        self.conn = conn
        self.connections += 1
        self.codec = vu.BackendConnection(max_queues=MAX_QUEUES)
        self.device = ProxyBalloon(self.options.balloon, self.options.proxy)
        self.session = VhostUserSession(self.device)
        self.selector.register(conn, selectors.EVENT_READ, self._on_frontend)
        log.info("front-end connected")

    def _on_frontend(self, conn: socket.socket) -> None:
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
                    conn.sendall(reply)
                self._watch_backend_req()
        except (vu.VhostUserError, FrontendGone) as exc:
            self._drop_frontend(f"vhost-user protocol error: {exc}")
        except OSError as exc:
            self._drop_frontend(f"send failed: {exc}")

    def _watch_backend_req(self) -> None:
        sock = self.session.backend_req if self.session else None
        if sock is not None and sock is not self._backend_req:
            if self._backend_req is not None:
                self.selector.unregister(self._backend_req)
            self.selector.register(sock, selectors.EVENT_READ, self._on_backend_req)
            self._backend_req = sock

    def _on_backend_req(self, sock: socket.socket) -> None:
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
        for waiter in self.waiters:
            self._reply(waiter.client, {"id": waiter.ident, "ok": False,
                                        "error": "the guest disconnected"})
        self.waiters.clear()
        self.conn = self.codec = self.session = self.device = None

    # -- operator clients --------------------------------------------------------------------

    def _accept_client(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        if len(self.clients) >= MAX_CLIENTS:
            try:
                sock.send(encode_frame({"id": None, "ok": False,
                                        "error": f"more than {MAX_CLIENTS} control clients"}))
            except OSError:
                pass                        # it is being refused either way
            sock.close()
            return
        sock.setblocking(False)
        client = Client(sock)
        self.clients[sock.fileno()] = client
        self.selector.register(sock, selectors.EVENT_READ, self._on_client)

    def _on_client(self, sock: socket.socket) -> None:
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
            self._serve(client, message)

    def _serve(self, client: Client, message: dict) -> None:
        ident = message.get("id")
        if not (ident is None or type(ident) is int):
            ident = None
        try:
            result = commands.handle(self.device, message)
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

    def _check_waiters(self) -> None:
        now = time.monotonic()
        for waiter in list(self.waiters):
            if self.device is None:
                outcome = "disconnected"
            else:
                config = self.device.config
                outcome = waiter.watch.check(config.actual, config.num_pages, now)
            if outcome is not None:
                self.waiters.remove(waiter)
                body = commands.status(self.device)
                self._reply(waiter.client, {"id": waiter.ident, "ok": True,
                                            "outcome": outcome, **body})

    def _reply(self, client: Client, message: dict) -> None:
        if client.sock.fileno() < 0:
            return
        client.outgoing += encode_frame(message)
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

    def _on_client_io(self, sock: socket.socket) -> None:
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
