"""``vballoon serve``: the vhost-user front door and the operator's control socket.

One thread, one ``EventLoop``, in the parent (never jailed, never touching guest memory).
Nothing in the loop waits: sockets are non-blocking with bounded output buffers, and the
worker's supervisor is a state machine the same loop drives. It holds the vhost-user
connection for as long as the front-end keeps it: a dying worker is replaced behind it, so
the guest never sees the connection drop (a guest whose connection drops with pages in the
balloon hangs for good).

    vhost-user socket --accept--> one front-end at a time (``VhostUserPeer``), a fresh
                                  device for each
    control socket    --accept--> any number of operator clients (length-prefixed msgpack)
    SIGTERM / SIGINT  ----------> kill the worker, close everything, remove socket files

Failure domains: an unexpected error while serving one front-end ends that connection;
while serving one control client, that client. Never ``serve``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from control import commands
from control.errors import RequestError
from control.jailed import load_policy
from control.loop import EventLoop, Timer
from control.supervisor import ProxyOptions
from control.vhost_backend import VhostUserSession
from control.vhost_peer import VhostUserPeer
from control.vmdevice import SettleWatch, VmDevice
from control.wire import FrameDecoder, FrameError, encode_reply
from device.balloon import SECCOMP_POLICY, BalloonOptions

log = logging.getLogger("vballoon.serve")

MAX_CLIENTS = 64
MAX_CLIENT_BACKLOG = 1 << 20       # bytes of replies a client may leave unread
MAX_WAITS_PER_CLIENT = 16          # pending ``wait`` requests one client may hold
MAX_WAITS = 256                    # ... and all clients together
ACCEPT_BACKOFF = (0.05, 1.0)       # first and longest pause after accept() ran out of fds
TICK = 0.1                         # seconds between checks of pending waits (only then)
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
    """A ``wait`` (``watch`` set) or a ``stats`` refresh (``asked_at``) to answer later."""

    client: Client
    ident: object
    watch: SettleWatch | None = None
    asked_at: float = 0.0
    deadline: float = 0.0


class Server:
    """Serves one vhost-user front-end at a time and any number of control clients."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.loop = EventLoop()
        self.running = True
        self.frontend: VhostUserPeer | None = None
        self.connections = 0            # front-ends served so far
        self.clients: dict[int, Client] = {}
        self.waiters: list[Waiter] = []
        self._tick: Timer | None = None
        # Devices whose front-end went away while their worker still stops: ended for good
        # at shutdown if they have not finished (their fds close when they do).
        self._stopping: set[VmDevice] = set()
        self._accept_backoff: dict[int, float] = {}
        if options.proxy.jail:
            # Fail at start-up, not at the guest's first connection, if the policy is bad;
            # and have it parsed (and the jail imported) before the guest waits on it.
            load_policy(options.proxy.policy or SECCOMP_POLICY)
        self.vhost_listener = self._listen(options.socket_path, backlog=1)
        self.control_listener = None
        if options.control_path:
            try:
                self.control_listener = self._listen(options.control_path, backlog=16)
            except (RequestError, OSError):
                self.vhost_listener.close()
                os.unlink(options.socket_path)
                raise
        for listener in (self.vhost_listener, self.control_listener):
            if listener is not None:
                self._watch_listener(listener)

    # The one VM's objects, as tests and tools look at them.
    @property
    def device(self) -> VmDevice | None:
        return self.frontend.device if self.frontend is not None else None

    @property
    def session(self) -> VhostUserSession | None:
        return self.frontend.session if self.frontend is not None else None

    @property
    def conn(self) -> socket.socket | None:
        return self.frontend.conn if self.frontend is not None else None

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
        restore = self._install_signals() if install_signals else (lambda: None)
        log.info("vhost-user socket %s, control socket %s: ready",
                 self.options.socket_path, self.options.control_path)
        try:
            self.loop.run_forever(lambda: self.running)
        finally:
            restore()
            self.shutdown()

    def _install_signals(self):
        old_wakeup = signal.set_wakeup_fd(self.loop.wakeup_fd())
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
        self.loop.wake()

    def shutdown(self) -> None:
        frontend = self.frontend
        if frontend is not None:
            # Nobody needs the worker's state any more: no graceful stop to wait for.
            frontend.device.terminate()
            frontend.close("shutting down")         # no-op if terminating already closed it
        for device in list(self._stopping):
            device.terminate()
        self._stopping.clear()
        for client in list(self.clients.values()):
            self._drop_client(client)
        for sock, path in ((self.vhost_listener, self.options.socket_path),
                           (self.control_listener, self.options.control_path)):
            if sock is not None:
                self.loop.unwatch(sock)
                sock.close()
                if path and os.path.exists(path):
                    os.unlink(path)
        self.loop.close()

    # -- listeners ---------------------------------------------------------------------------

    def _watch_listener(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0 and self.running:
            self.loop.watch(listener, reader=lambda: self._on_listener(listener))

    def _on_listener(self, listener: socket.socket) -> None:
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
            self.loop.unwatch(listener)
            self.loop.call_later(delay, lambda: self._watch_listener(listener))
            return
        self._accept_backoff.pop(listener.fileno(), None)
        if listener is self.vhost_listener:
            self._accept_frontend(sock)
        else:
            self._accept_client(sock)

    # -- the vhost-user front-end --------------------------------------------------------------

    def _accept_frontend(self, conn: socket.socket) -> None:
        if self.frontend is not None:
            log.warning("a second front-end connected while one is served: refused")
            conn.close()
            return
        self.connections += 1
        device = VmDevice(self.loop, self.options.balloon, self.options.proxy)
        device.listeners.append(self._check_waiters)
        self.frontend = VhostUserPeer(self.loop, conn, device, self._frontend_closed)
        log.info("front-end connected")

    def _frontend_closed(self, why: str) -> None:
        device = self.frontend.device
        self.frontend = None
        if device.state != "idle":
            self._stopping.add(device)
            device.listeners.append(lambda: self._stopped(device))
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            self._reply(waiter.client, {"id": waiter.ident, "ok": False,
                                        "error": "the guest disconnected"})

    def _stopped(self, device: VmDevice) -> None:
        if device.state == "idle":
            self._stopping.discard(device)

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
        self._watch_client(client)

    def _watch_client(self, client: Client) -> None:
        self.loop.watch(client.sock, reader=lambda: self._on_client(client),
                        writer=(lambda: self._flush(client)) if client.outgoing else None)

    def _on_client(self, client: Client) -> None:
        try:
            data = client.sock.recv(65536)
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
        device = self.device
        try:
            if message.get("cmd") == "wait" or message.get("cmd") == "stats" \
                    and message.get("refresh") is True:
                self._check_wait_limits(client)
            result = commands.handle(device, message)
        except RequestError as exc:
            self._reply(client, {"id": ident, "ok": False, "error": str(exc)})
            return
        if isinstance(result, commands.RefreshRequest):
            now = time.monotonic()
            self.waiters.append(Waiter(client, ident, asked_at=now,
                                       deadline=now + result.timeout))
            self._check_waiters()
            return
        if isinstance(result, commands.WaitRequest):
            self.waiters.append(Waiter(client, ident, device.settle_watch(result.timeout,
                                                                          result.stall)))
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
        """Answer the waits that are over; a tick runs only while some are pending."""
        if self.waiters:
            now = time.monotonic()
            done, self.waiters = self.waiters, []
            body = None
            for waiter in done:
                if waiter.client.sock.fileno() < 0:
                    continue                    # its client went away while we replied
                if waiter.watch is None:
                    if not self._check_refresh(waiter, now):
                        self.waiters.append(waiter)
                    continue
                device = self.device
                if device is None:
                    outcome = "disconnected"
                else:
                    outcome = waiter.watch.check(device.config.actual, device.config.num_pages,
                                                 now)
                if outcome is None:
                    self.waiters.append(waiter)
                    continue
                body = body or commands.status(device)
                self._reply(waiter.client, {"id": waiter.ident, "ok": True,
                                            "outcome": outcome, **body})
        if self.waiters and (self._tick is None or not self._tick.pending):
            self._tick = self.loop.call_later(TICK, self._check_waiters)

    def _check_refresh(self, waiter: Waiter, now: float) -> bool:
        """Answer a stats refresh if the guest sent newer values or time is up."""
        device = self.device
        updated = device.stats.updated_monotonic if device is not None else None
        if device is not None and updated is not None and updated > waiter.asked_at:
            self._reply(waiter.client, {"id": waiter.ident, "ok": True,
                                        **commands.stats(device, refresh=False),
                                        "refresh_requested": True})
            return True
        if device is None or now >= waiter.deadline:
            why = ("the guest disconnected" if device is None else
                   f"the guest did not refresh its statistics within "
                   f"{waiter.deadline - waiter.asked_at:g} s")
            self._reply(waiter.client, {"id": waiter.ident, "ok": False, "error": why})
            return True
        return False

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
        self._watch_client(client)

    def _drop_client(self, client: Client) -> None:
        fd = client.sock.fileno()
        if fd < 0:
            return
        self.clients.pop(fd, None)
        self.loop.unwatch(client.sock)
        client.sock.close()
        self.waiters = [w for w in self.waiters if w.client is not client]


def serve(options: ServeOptions) -> None:
    Server(options).run()
