"""``vballoon serve`` under fault: peers that stop reading, flood, send garbage, or find the
host out of fds. Each test reproduces a way the serve loop could be wedged or ended."""

from __future__ import annotations

import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import time

import msgpack

from control import vhost_user as vu
from control.client import ControlClient
from control.server import MAX_WAITS_PER_CLIENT
from control.wire import FrameDecoder, encode_frame
from tests.driver import wait_for
from tests.frontend import served_device
from tests.test_cli import idle_server, raw_client, read_reply  # noqa: F401 (fixture)


def _status_in(path: str, limit: float) -> dict:
    """Ask for status; the answer must come within ``limit`` seconds."""
    start = time.monotonic()
    with ControlClient(path) as client:
        status = client.request("status")
    assert time.monotonic() - start < limit, "serve answered too late"
    return status


def test_frontend_that_stops_reading_replies_does_not_wedge_serve(tmp_path, ram):
    """Regression (issue 10.3): replies went out with a blocking sendall; a front-end that
    sent requests and never read the replies blocked the loop, the control socket died
    and SIGTERM was ignored."""
    with served_device(tmp_path, ram) as (server, frontend, _, options):
        frontend.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = frontend.conn.send(vu.GetConfig(0, 256, 0))[0]
        frontend.sock.setblocking(False)
        sent = 0
        try:
            for _ in range(20000):          # ~5 MiB of replies asked for, none read
                frontend.sock.send(request)
                sent += 1
        except BlockingIOError:
            pass                            # serve stopped reading us: that is the point
        assert sent > 50
        for _ in range(5):
            assert _status_in(options.control_path, 0.5)["state"] == "active"
        start = time.monotonic()
        server.server.stop()
        server.thread.join(2)
        assert not server.thread.is_alive() and time.monotonic() - start < 2


def test_sigterm_stops_serve_within_2s_with_a_stopped_worker_and_a_deaf_frontend(tmp_path, ram):
    from tests.frontend import Frontend
    from tests.driver import BalloonDriver
    from device.balloon import BalloonOptions, queue_layout
    vhost, ctl = tmp_path / "vhost.sock", tmp_path / "ctl.sock"
    server = subprocess.Popen([sys.executable, "-m", "control.cli", "serve", "--socket",
                               str(vhost), "--control", str(ctl)], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ctl.exists() and vhost.exists(), what="the sockets")
        frontend = Frontend(str(vhost))
        features = BalloonOptions().features()
        driver = BalloonDriver(ram, queue_layout(features), features,
                               write_config=frontend.write_config)
        frontend.setup(ram, driver, features)
        wait_for(lambda: _status(ctl)["state"] == "active", what="activation")
        pid = _status(ctl)["worker_pid"]
        os.kill(pid, signal.SIGSTOP)
        frontend.sock.setblocking(False)
        request = frontend.conn.send(vu.GetConfig(0, 256, 0))[0]
        try:
            for _ in range(20000):
                frontend.sock.send(request)
        except BlockingIOError:
            pass
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(5) == 0
        assert time.monotonic() - start < 2
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the worker gone")
        frontend.close()
        driver.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stderr.close()


def _status(path) -> dict:
    with ControlClient(str(path)) as client:
        return client.request("status")


def test_reply_echoing_a_long_field_does_not_end_serve(idle_server):  # noqa: F811
    """Regression (issue 10.5): an error echoing a ~64 KiB command name made a reply over
    the frame limit; the framing error ended serve."""
    sock = raw_client(idle_server)
    sock.sendall(encode_frame({"id": 1, "cmd": "x" * 60000}))
    reply = read_reply(sock)
    assert reply["ok"] is False and reply["id"] == 1 and len(reply["error"]) < 2000
    sock.close()
    assert _status_in(idle_server, 1.0)["state"] == "waiting"


def _connect(path: str) -> socket.socket:
    """A raw client; a full listen backlog (EAGAIN on a unix socket) is waited out."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return raw_client(path)
        except BlockingIOError:
            assert time.monotonic() < deadline, "serve stopped accepting connections"
            time.sleep(0.01)


def _mutations(rng: random.Random):
    valid = [{"id": 1, "cmd": "status"}, {"id": 2, "cmd": "set", "size": 4096},
             {"id": 3, "cmd": "wait", "timeout": 0.1}, {"id": 4, "cmd": "stats", "refresh": True},
             {"id": 5, "cmd": "adjust", "pages": 1}]
    for _ in range(400):
        kind = rng.randrange(6)
        if kind == 0:
            yield os.urandom(rng.randrange(1, 200))                      # noise
        elif kind == 1:
            payload = os.urandom(rng.randrange(1, 100))
            yield struct.pack(">I", len(payload)) + payload               # framed noise
        elif kind == 2:
            frame = bytearray(encode_frame(rng.choice(valid)))
            for _ in range(rng.randrange(1, 4)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)     # bit rot
            yield bytes(frame)
        elif kind == 3:
            message = dict(rng.choice(valid))
            key = rng.choice(["cmd", "id", "size", "x" * rng.randrange(1, 30000)])
            message[key] = rng.choice(["y" * rng.randrange(0, 50000), -1, 2**63, 1.5, None,
                                       [1] * 500, {"a": 1}, b"\0" * 100, True])
            data = msgpack.packb(message, use_bin_type=True)
            yield struct.pack(">I", len(data)) + data                     # wrong values
        elif kind == 4:
            yield encode_frame(rng.choice(valid))[:rng.randrange(1, 8)]   # cut short
        else:
            yield encode_frame(rng.choice(valid))


def test_fuzzed_control_frames_never_end_serve(idle_server):  # noqa: F811
    rng = random.Random(1234)
    sock = _connect(idle_server)
    for data in _mutations(rng):
        try:
            sock.sendall(data)
            sock.setblocking(False)
            try:
                while sock.recv(65536):
                    pass
            except BlockingIOError:
                pass
            sock.setblocking(True)
        except OSError:                     # serve dropped this client: a fresh one
            sock.close()
            sock = _connect(idle_server)
        if rng.random() < 0.1:              # a new connection now and then, mid-frame or not
            sock.close()
            sock = _connect(idle_server)
    sock.close()
    assert _status_in(idle_server, 1.0)["state"] == "waiting"


def test_waits_are_bounded_per_client(tmp_path, ram):
    """Regression (issue 10.9): thousands of pending waits cost quadratic time per tick."""
    with served_device(tmp_path, ram) as (server, _, _, options):
        with ControlClient(options.control_path) as client:
            client.request("set", size=1 << 20)      # the guest will not move: waits pend
        sock = raw_client(options.control_path)
        for ident in range(MAX_WAITS_PER_CLIENT + 5):
            sock.sendall(encode_frame({"id": ident, "cmd": "wait", "timeout": 30}))
        decoder, refused = FrameDecoder(), []
        deadline = time.monotonic() + 5
        while len(refused) < 5 and time.monotonic() < deadline:
            refused += [r for r in decoder.feed(sock.recv(65536)) if not r["ok"]]
        assert len(refused) == 5 and all("waits" in r["error"] for r in refused)
        assert sorted(r["id"] for r in refused) == list(range(MAX_WAITS_PER_CLIENT,
                                                              MAX_WAITS_PER_CLIENT + 5))
        assert _status_in(options.control_path, 0.5)["state"] == "active"
        sock.close()


def test_running_out_of_fds_keeps_serving_and_recovers(idle_server):  # noqa: F811
    """Regression (issue 10.8): EMFILE from accept() ended serve."""
    existing = ControlClient(idle_server).__enter__()
    assert existing.request("status")["state"] == "waiting"     # accepted before the fds go
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting.settimeout(5)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hog = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
        try:
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        waiting.connect(idle_server)         # queued; serve's accept() meets EMFILE
        for _ in range(3):                   # the connection serve already has still works
            assert existing.request("status")["state"] == "waiting"
    finally:
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    waiting.sendall(encode_frame({"id": 7, "cmd": "status"}))
    assert read_reply(waiting)["id"] == 7    # accepted once fds are back
    waiting.close()
    existing.__exit__(None, None, None)


def test_a_flood_of_stats_refreshes_is_coalesced(tmp_path, ram):
    """Thousands of ``stats --refresh`` must not fill the worker's command queue (which
    would make it look unresponsive and get it replaced)."""
    from control.proxy import ProxyOptions
    with served_device(tmp_path, ram, proxy=ProxyOptions(jail=True)) as (server, _, _, options):
        pid = server.server.device.worker.pid
        sock = raw_client(options.control_path)
        os.kill(pid, signal.SIGSTOP)                 # nothing it is asked gets answered
        try:
            for ident in range(2000):
                sock.sendall(encode_frame({"id": ident, "cmd": "stats", "refresh": True,
                                           "timeout": 0}))
            decoder, replies = FrameDecoder(), []
            while len(replies) < 2000:
                replies += decoder.feed(sock.recv(65536))
            # Each is answered (here: not refreshed in 0 s), none waits on the worker.
            assert {r["ok"] for r in replies} == {False}
            assert all("did not refresh" in r["error"] for r in replies)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert _status_in(options.control_path, 0.5)["worker_pid"] == pid
        assert server.server.device.state == "active" and server.server.device.restarts == 0
        sock.close()
