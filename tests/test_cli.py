"""The operator's side: every CLI verb against a real guest, every bad input, and control
socket clients that misbehave."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys

import pytest

from control.cli import main, parse_size
from control.client import ControlClient
from control.proxy import ProxyOptions
from control.server import ServeOptions
from control.wire import MAX_FRAME, FrameDecoder, FrameError, encode_frame
from device.balloon import SECCOMP_POLICY, BalloonOptions
from tests.driver import MIB, wait_for
from tests.frontend import ServerThread, served_device
from tests.guest_rig import start_rig, stop_rig

FIRECRACKER_STATS = ["swap_in", "swap_out", "major_faults", "minor_faults", "free_memory",
                     "total_memory", "available_memory", "disk_caches", "hugetlb_allocations",
                     "hugetlb_failures", "oom_kill", "alloc_stall", "async_scan", "direct_scan",
                     "async_reclaim", "direct_reclaim"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:           # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def rig(tmp_path):
    rig = start_rig(tmp_path, BalloonOptions(stats_interval=0.2))
    yield rig
    stop_rig(rig)


@pytest.fixture
def idle_server(tmp_path):
    """A server no guest has connected to: the control socket alone."""
    options = ServeOptions(str(tmp_path / "vhost.sock"), str(tmp_path / "ctl.sock"),
                           BalloonOptions(), ProxyOptions())
    server = ServerThread(options)
    yield options.control_path
    server.stop()


# -- every verb against a real guest ---------------------------------------------------------

@pytest.mark.guest
def test_every_verb_against_a_real_guest(rig, capsys):
    ctl = rig.options.control_path
    code, out, _ = cli(capsys, "set", "64M", "--wait", "--control", ctl)
    assert code == 0 and "balloon 64.0 MiB of 64.0 MiB target" in out

    code, out, _ = cli(capsys, "status", "--json", "--control", ctl)
    status = json.loads(out)
    assert code == 0
    assert {"target_bytes", "actual_bytes", "state", "worker_pid", "worker_restarts",
            "features"} <= set(status)
    assert (status["target_bytes"], status["actual_bytes"], status["state"]) == \
        (64 * MIB, 64 * MIB, "active")
    assert status["worker_pid"] == rig.device().worker.pid

    code, out, _ = cli(capsys, "status", "--control", ctl)
    assert code == 0 and "64.0 MiB" in out and "active" in out

    wait_for(lambda: rig.control.request("stats")["updated_at"], what="stats")
    code, out, _ = cli(capsys, "stats", "--json", "--control", ctl)
    stats = json.loads(out)
    assert set(FIRECRACKER_STATS) <= set(stats) and stats["updated_at"] > 0
    assert stats["total_memory"] > 100 * MIB
    code, out, _ = cli(capsys, "stats", "--control", ctl)
    assert code == 0 and "free_memory" in out and "updated" in out
    before = stats["updated_at"]
    code, out, _ = cli(capsys, "stats", "--refresh", "--json", "--control", ctl)
    fresh = json.loads(out)                         # newer than the request: waited for
    assert code == 0 and fresh["updated_at"] > before and fresh["refresh_requested"] is True

    code, out, _ = cli(capsys, "adjust", "-256", "--control", ctl)
    assert code == 0 and rig.control.request("status")["target_bytes"] == 63 * MIB
    code, out, _ = cli(capsys, "set", "0", "--wait", "--control", ctl)
    assert code == 0 and rig.control.request("status")["actual_bytes"] == 0


@pytest.mark.guest
def test_set_wait_says_when_the_guest_stops_making_progress(rig, capsys):
    # With its balloon driver unloaded the guest never answers a new target.
    rig.guest.run("rmmod virtio_balloon")
    code, _, err = cli(capsys, "set", "64M", "--wait", "--stall", "1", "--timeout", "60",
                       "--control", rig.options.control_path)
    assert code == 1 and "no progress for 1 s" in err
    code, _, err = cli(capsys, "set", "32M", "--wait", "--stall", "30", "--timeout", "1",
                       "--control", rig.options.control_path)
    assert code == 1 and "not settled after 1 s" in err


@pytest.mark.guest
@pytest.mark.parametrize("args,message", [
    (["set", "12X"], "bad size"),
    (["set", "--", "-5M"], "bad size"),
    (["set", "10G"], "size must be"),            # beyond guest memory
    (["adjust", "-999999"], "below zero"),
])
def test_bad_input_is_refused_and_changes_nothing(rig, capsys, args, message):
    before = rig.control.request("status")
    code, out, err = cli(capsys, args[0], "--control", rig.options.control_path, *args[1:])
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert rig.control.request("status") == before


def test_usage_errors_exit_2(capsys):
    assert cli(capsys, "inflate", "1G")[0] == 2
    assert cli(capsys, "set", "-5M")[0] == 2            # looks like an option
    assert cli(capsys, "set")[0] == 2
    assert cli(capsys, "adjust", "many")[0] == 2


def test_no_server_listening(tmp_path, capsys):
    code, _, err = cli(capsys, "status", "--control", str(tmp_path / "nothing.sock"))
    assert code == 1 and "no vballoon server is listening" in err


def test_set_without_a_guest_is_refused(idle_server, capsys):
    code, _, err = cli(capsys, "set", "1G", "--control", idle_server)
    assert code == 1 and "no guest is connected" in err
    code, out, _ = cli(capsys, "status", "--json", "--control", idle_server)
    assert code == 0 and json.loads(out)["state"] == "waiting"


@pytest.mark.parametrize("text,size", [("512M", 512 * MIB), ("1G", 1 << 30), ("1GiB", 1 << 30),
                                        ("0", 0), ("4096", 4096), ("1.5g", 3 << 29),
                                        ("2MB", 2 * MIB)])
def test_sizes_with_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "1X", "M", "1.5.1G", "1iB", "0x10"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


# -- control socket clients that misbehave -------------------------------------------------

def raw_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def read_reply(sock: socket.socket) -> dict:
    decoder = FrameDecoder()
    while True:
        data = sock.recv(65536)
        assert data, "the server closed the connection without a reply"
        replies = decoder.feed(data)
        if replies:
            return replies[0]


def test_two_clients_at_once(idle_server):
    with ControlClient(idle_server) as a, ControlClient(idle_server) as b:
        for _ in range(20):
            assert a.request("status")["state"] == "waiting"
            assert b.request("stats")["updated_at"] is None


def test_half_a_message_and_hang_disturbs_nobody(idle_server):
    hanging = raw_client(idle_server)
    frame = encode_frame({"id": 1, "cmd": "status"})
    hanging.sendall(frame[:7])                          # and never the rest
    with ControlClient(idle_server) as other:
        assert other.request("status")["state"] == "waiting"
    hanging.sendall(frame[7:])                          # late, but still answered
    assert read_reply(hanging)["ok"] is True
    hanging.close()


def test_disconnect_mid_message(idle_server):
    sock = raw_client(idle_server)
    sock.sendall(struct.pack(">I", 100) + b"\x81")
    sock.close()
    with ControlClient(idle_server) as other:
        assert other.request("status")["connected"] is False


def test_huge_length_prefix_is_refused(idle_server):
    sock = raw_client(idle_server)
    sock.sendall(struct.pack(">I", 0xFFFF_FFF0) + b"x" * 100)
    reply = read_reply(sock)
    assert reply["ok"] is False and "exceeds" in reply["error"]
    assert sock.recv(100) == b""                        # and the connection is closed
    sock.close()
    with ControlClient(idle_server) as other:
        assert other.request("status")["state"] == "waiting"


@pytest.mark.parametrize("payload", [
    b"\xdf\xff\xff\xff\xff",                            # a map claiming 2**32-1 entries
    b"\xdd\xff\xff\xff\xff",                            # an array claiming 2**32-1 items
    b"\xdb\xff\xff\xff\xf0",                            # a string claiming 4 GiB
    b"\xc1",                                            # not msgpack at all
    b"\x93\x01\x02\x03",                                # msgpack, but not a map
])
def test_huge_or_bad_msgpack_is_refused(idle_server, payload):
    sock = raw_client(idle_server)
    sock.sendall(struct.pack(">I", len(payload)) + payload)
    reply = read_reply(sock)
    assert reply["ok"] is False
    sock.close()
    with ControlClient(idle_server) as other:
        assert other.request("status")["state"] == "waiting"


@pytest.fixture
def active_server(tmp_path, ram):
    """A server with a device activated by a Python front-end (no guest kernel needed)."""
    with served_device(tmp_path, ram) as (server, _, _, options):
        wait_for(lambda: server.server.device.state == "active", what="activation")
        yield options.control_path


@pytest.mark.parametrize("message,error", [
    ({"id": 1, "cmd": "explode"}, "unknown command"),
    ({"id": 1, "cmd": "set", "size": "1G"}, "size must be"),
    ({"id": 1, "cmd": "set", "size": -1}, "size must be"),
    ({"id": 1, "cmd": "set", "size": 1 << 40}, "size must be"),
    ({"id": 1, "cmd": "set", "size": 1, "extra": True}, "unknown arguments"),
    ({"id": 1, "cmd": "adjust", "pages": 1.5}, "whole number"),
    ({"id": 1, "cmd": "adjust", "pages": -1}, "below zero"),
    ({"id": 1, "cmd": "wait", "timeout": -1}, "'timeout' must be"),
    ({"id": 1, "cmd": "wait", "stall": "soon"}, "'stall' must be"),
    ({"id": 1, "cmd": "stats", "refresh": "yes"}, "'refresh' must be"),
])
def test_bad_requests_get_an_error_reply_and_change_nothing(active_server, message, error):
    with ControlClient(active_server) as client:
        before = client.request("status")
    sock = raw_client(active_server)
    sock.sendall(encode_frame(message))
    reply = read_reply(sock)
    assert reply["ok"] is False and reply["id"] == 1 and error in reply["error"]
    sock.close()
    with ControlClient(active_server) as client:
        assert client.request("status") == before


def test_oversized_request_cannot_be_sent():
    with pytest.raises(FrameError):
        encode_frame({"cmd": "x" * (MAX_FRAME + 1)})


# -- vballoon serve itself -------------------------------------------------------------------

def test_serve_listens_owner_only_and_stops_cleanly_on_sigterm(tmp_path):
    vhost, ctl = tmp_path / "v.sock", tmp_path / "c.sock"
    server = subprocess.Popen([sys.executable, "-m", "control.cli", "serve", "--socket",
                               str(vhost), "--control", str(ctl)], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ctl.exists() and vhost.exists(), what="the sockets")
        assert os.stat(ctl).st_mode & 0o777 == 0o600
        with ControlClient(str(ctl)) as client:
            assert client.request("status")["state"] == "waiting"
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
        assert not ctl.exists() and not vhost.exists()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stderr.close()


def test_serve_refuses_a_socket_path_a_live_server_holds(idle_server, tmp_path, capsys):
    code, _, err = cli(capsys, "serve", "--socket", str(tmp_path / "other.sock"),
                       "--control", idle_server)
    assert code == 1 and "in use by a running server" in err
    assert not (tmp_path / "other.sock").exists()
    with ControlClient(idle_server) as client:                 # the live one is untouched
        assert client.request("status")["state"] == "waiting"


def test_seccomp_log_mode_reports_denials_in_status(tmp_path, ram):
    policy = tmp_path / "no-madvise.policy"
    policy.write_text("".join(line + "\n" for line in
                              SECCOMP_POLICY.read_text().splitlines()
                              if not line.startswith("madvise")))
    with served_device(tmp_path, ram, proxy=ProxyOptions(seccomp_mode="log", policy=policy)) \
            as (_, _, driver, options):
        ram.populate()
        driver.inflate(256)                       # madvise(MADV_REMOVE): allowed, reported
        assert ram.host_bytes() == ram.size - MIB
        with ControlClient(options.control_path) as client:
            denials = wait_for(lambda: client.request("status")["seccomp_denials"],
                               what="the denial to be reported")
        assert denials == {"madvise": 1}


def test_stats_refresh_from_a_guest_that_does_not_answer_exits_1(tmp_path, ram, capsys):
    with served_device(tmp_path, ram) as (server, _, _, options):
        code, _, err = cli(capsys, "stats", "--refresh", "--timeout", "0.2",
                           "--control", options.control_path)
    assert code == 1 and "did not refresh its statistics within 0.2 s" in err
