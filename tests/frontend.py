"""A Python vhost-user front-end for tests: the sequence User-Mode Linux sends, over a real
unix socket with real fds, and the fake driver's rings in real memfd guest memory."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from control import vhost_user as vu
from control.proxy import ProxyOptions
from control.server import Server, ServeOptions
from device.command import SIMPLE_REQUESTS
from device.balloon import BalloonOptions, queue_layout
from tests.driver import BalloonDriver, GuestRam


class Frontend:
    """Speaks vhost-user to ``path`` as a VMM does; ``need_reply`` on every set, as UML."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.conn = vu.FrontendConnection()
        self.backend_req, self._backend_req_peer = socket.socketpair()
        self.receiver = vu.BackendRequestReceiver()
        self.config_changes = 0

    def call(self, request: vu.Request):
        data, fds = self.conn.send(request)
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.sendall(data)
        if not request.reply_expected:
            return None
        while True:
            event = self.conn.next_event()
            if event is not vu.NEED_DATA:
                return event
            chunk = self.sock.recv(65536)
            if not chunk:
                self.conn.receive_eof()
            else:
                self.conn.receive_data(chunk)

    def ack(self, request: vu.Request) -> bool:
        return self.call(request).ok

    def setup(self, ram: GuestRam, driver: BalloonDriver, features: int) -> None:
        """The UML sequence: owner, features, protocol features, backend channel, memory,
        then per queue CALL, NUM, BASE, ADDR, KICK, ENABLE."""
        assert self.ack(vu.SetOwner(need_reply=True))
        offered = self.call(vu.GetFeatures()).value
        assert offered & features == features
        protocol = self.call(vu.GetProtocolFeatures()).value
        assert self.ack(vu.SetProtocolFeatures(protocol, need_reply=True))
        assert self.ack(vu.SetBackendReqFd(self._backend_req_peer.fileno(), need_reply=True))
        assert self.ack(vu.SetFeatures(features | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES,
                                       need_reply=True))
        region = vu.MemRegion(0, ram.size, 0x7F00_0000_0000, 0)
        assert self.ack(vu.SetMemTable((region,), (ram.fd,), need_reply=True))
        for index, queue in enumerate(driver.queues.values()):
            user = 0x7F00_0000_0000
            assert self.ack(vu.SetVringCall(index, queue.call_fd, need_reply=True))
            assert self.ack(vu.SetVringNum(index, queue.size, need_reply=True))
            assert self.ack(vu.SetVringBase(index, 0, need_reply=True))
            assert self.ack(vu.SetVringAddr(index, 0, user + queue.desc, user + queue.used,
                                            user + queue.avail, 0, need_reply=True))
            assert self.ack(vu.SetVringKick(index, queue.kick_fd, need_reply=True))
            assert self.ack(vu.SetVringEnable(index, True, need_reply=True))

    def get_config(self) -> bytes:
        return self.call(vu.GetConfig(0, 16, 0)).data

    def num_pages(self) -> int:
        return struct.unpack_from("<I", self.get_config())[0]

    def write_config(self, offset: int, data: bytes) -> None:
        assert self.ack(vu.SetConfig(offset, data, need_reply=True))

    def pending_config_changes(self) -> int:
        """Config-change messages received on the backend channel so far."""
        self.backend_req.setblocking(False)
        try:
            while True:
                data = self.backend_req.recv(4096)
                if not data:
                    break
                self.receiver.receive_data(data)
                while isinstance(self.receiver.next_event(), vu.ConfigChangeMsg):
                    self.config_changes += 1
        except BlockingIOError:
            pass
        return self.config_changes

    def close(self) -> None:
        self.sock.close()
        self.backend_req.close()
        self._backend_req_peer.close()


class ServerThread:
    """``vballoon serve`` in a thread of the test process (the worker is still forked)."""

    def __init__(self, options: ServeOptions) -> None:
        self.server = Server(options)
        self.thread = threading.Thread(target=self.server.run, args=(False,), daemon=True)
        self.thread.start()

    def worker_request(self, kind: str, timeout: float = 10.0) -> dict:
        """Ask the served device's worker (from the test's thread, through the loop)."""
        done, box = threading.Event(), []

        def ask() -> None:
            self.server.device.supervisor.request(SIMPLE_REQUESTS[kind](),
                                                  lambda r: (box.append(r), done.set()))
        self.server.loop.call_soon_threadsafe(ask)
        assert done.wait(timeout), f"no answer to {kind!r}"
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def served_device(tmp_path: Path, ram: GuestRam, balloon: BalloonOptions = BalloonOptions(),
                  proxy: ProxyOptions = ProxyOptions()
                  ) -> Iterator[tuple[ServerThread, Frontend, BalloonDriver, ServeOptions]]:
    """``serve`` in a thread, a Python front-end that negotiated every offered feature and
    set up the fake driver's rings, so the device is active: no guest kernel needed."""
    options = ServeOptions(str(tmp_path / "vhost.sock"), str(tmp_path / "control.sock"),
                           balloon, proxy)
    server = ServerThread(options)
    frontend = Frontend(options.socket_path)
    features = balloon.features()
    driver = BalloonDriver(ram, queue_layout(features), features,
                           write_config=frontend.write_config)
    try:
        frontend.setup(ram, driver, features)
        yield server, frontend, driver, options
    finally:
        frontend.close()
        server.stop()
        driver.close()
