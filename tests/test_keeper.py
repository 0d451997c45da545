"""``vballoon serve --keeper``: ``serve`` dies, the keeper holds the guests' connections and
starts a new ``serve``, which adopts them. The front-end is the Python vhost-user front-end
with the fake driver's rings in real memfd guest memory; ``serve`` and its jailed workers are
real processes, killed with SIGKILL."""

from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control import vhost_user as vu
from control.client import ControlClient
from control.errors import ControlError
from control.handover import Link, Store, VmRecord, adoptions
from control.keeper import Keeper
from device.balloon import DEFLATE_QUEUE, INFLATE_QUEUE, BalloonOptions, queue_layout
from tests.driver import MIB, PAGE, PFNS_PER_BUFFER, BalloonDriver, GuestRam, wait_for
from tests.frontend import Frontend

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _status(ctl: str) -> dict | None:
    try:
        with ControlClient(ctl) as client:
            return client.request("status")
    except (OSError, ControlError):
        return None


def _dead(pid: int) -> bool:
    """Gone, or a zombie (the keeper, a child subreaper, reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class KeptServe:
    """``vballoon serve --keeper`` and a front-end with the fake driver attached to it."""

    def __init__(self, tmp_path: Path, ram: GuestRam, python: tuple[str, ...] = ("-m", "control.cli")) -> None:
        self.vhost, self.ctl = str(tmp_path / "v.sock"), str(tmp_path / "c.sock")
        self.log = open(tmp_path / "serve.log", "w+")
        self.keeper = subprocess.Popen(
            [sys.executable, *python, "serve", "--keeper", "--socket", self.vhost,
             "--control", self.ctl], cwd=ROOT, stderr=self.log)
        wait_for(lambda: _status(self.ctl) is not None, timeout=10, what="serve")
        self.frontend = Frontend(self.vhost)
        features = self.features = BalloonOptions().features()
        self.driver = BalloonDriver(ram, queue_layout(features), features,
                                    write_config=self.frontend.write_config)
        self.frontend.setup(ram, self.driver, features)
        wait_for(lambda: _status(self.ctl)["state"] == "active", what="activation")

    def serve_pid(self) -> int:
        (pid,) = _children(self.keeper.pid)
        return pid

    def crash(self) -> None:
        """SIGKILL serve (its zygote and workers die with it); wait for its successor."""
        old = self.serve_pid()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: _children(self.keeper.pid) not in ([], [old]), timeout=10,
                 what="a new serve")
        wait_for(lambda: (_status(self.ctl) or {}).get("state") == "active", timeout=15,
                 what="the adopted device active")

    def close(self) -> None:
        self.frontend.close()
        self.driver.close()
        if self.keeper.poll() is None:
            self.keeper.send_signal(signal.SIGTERM)
            try:
                self.keeper.wait(10)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
                self.keeper.wait()
        self.log.seek(0)
        print(self.log.read())
        self.log.close()


@pytest.fixture
def kept(tmp_path, ram):
    rig = KeptServe(tmp_path, ram)
    yield rig
    rig.close()


def test_a_serve_crash_keeps_the_connection_target_actual_and_balloon(kept, ram):
    ram.populate()
    full = ram.host_bytes()
    with ControlClient(kept.ctl) as client:
        client.request("set", size=16 * MIB)
    assert kept.frontend.num_pages() == 16 * MIB // PAGE         # the guest reads its target
    kept.driver.inflate(8 * MIB // PAGE)
    assert ram.host_bytes() <= full - 8 * MIB
    with ControlClient(kept.ctl) as client:
        client.request("autopilot", action="enable", vm="default", floor=8 * MIB, dry_run=True)
    before = _status(kept.ctl)
    kept.crash()
    after = _status(kept.ctl)
    with ControlClient(kept.ctl) as client:               # the autopilot as it was set
        pilot = client.request("autopilot", action="status", vm="default")["vms"][0]
    assert pilot["enabled"] and pilot["floor_bytes"] == 8 * MIB and pilot["dry_run"]
    assert (after["target_bytes"], after["actual_bytes"]) == (16 * MIB, 8 * MIB)
    assert after["worker_pid"] not in (None, before["worker_pid"])
    # The same connection: the guest reads its target and goes on inflating through it.
    assert kept.frontend.num_pages() == 16 * MIB // PAGE
    kept.driver.inflate(8 * MIB // PAGE)
    assert ram.host_bytes() <= full - 16 * MIB
    with ControlClient(kept.ctl) as client:
        assert client.request("wait", timeout=10)["outcome"] == "settled"
        client.request("set", size=0)
    # And takes every page back (deflate is served too).
    kept.driver.deflate(16 * MIB // PAGE)
    assert _status(kept.ctl)["actual_bytes"] == 0
    # SIGTERM to the keeper ends serve and the keeper; the front-end sees the end.
    kept.keeper.send_signal(signal.SIGTERM)
    assert kept.keeper.wait(10) == 0
    assert kept.frontend.sock.recv(1) == b""


def test_buffers_in_flight_when_serve_dies_are_completed_once_by_its_successor(kept, ram):
    """Four inflate buffers are made available and kicked; serve is killed at once. The new
    worker resumes at the used index in guest memory: every buffer comes back, and the pages
    of all four are released."""
    ram.populate()
    full = ram.host_bytes()
    queue = kept.driver.queues[INFLATE_QUEUE]
    pfns = kept.driver.take_pages(4 * PFNS_PER_BUFFER)
    for k in range(4):
        chunk = pfns[k * PFNS_PER_BUFFER:(k + 1) * PFNS_PER_BUFFER]
        addr = queue.scratch + k * PFNS_PER_BUFFER * 4
        struct.pack_into(f"<{len(chunk)}I", ram.map, addr, *chunk)
        queue.add([(addr, 4 * len(chunk))])
    old = kept.serve_pid()
    queue.kick()
    os.kill(old, signal.SIGKILL)
    used = kept.driver.wait_used(INFLATE_QUEUE, 4)
    assert len(used) == 4
    wait_for(lambda: ram.host_bytes() <= full - 4 * MIB, timeout=15, what="the pages released")
    kept.driver.balloon += pfns
    kept.driver.set_actual(len(kept.driver.balloon))
    wait_for(lambda: (_status(kept.ctl) or {}).get("actual_bytes") == 4 * MIB, timeout=15,
             what="actual kept")
    # Deflating them goes to the new worker too (deflate waits for its buffers to return).
    kept.driver.deflate(4 * PFNS_PER_BUFFER)
    assert kept.driver.queues[DEFLATE_QUEUE].used_idx() == 4


def test_a_stopped_ring_is_not_started_again_by_the_successor(kept, ram):
    """The driver stopped its rings (GET_VRING_BASE, as on unload) before serve died: the
    new serve must not start a worker on memory the driver may now reuse, and asked again,
    answers the bases the first one answered (not the stale ones the rings were set up with)."""
    kept.driver.inflate(PFNS_PER_BUFFER)
    bases = [kept.frontend.call(vu.GetVringBase(index)).num
             for index in range(len(kept.driver.queues))]
    assert bases[0] == 1
    wait_for(lambda: _status(kept.ctl)["state"] == "idle", what="the device stopped")
    _crash_and_expect_idle(kept)
    assert [kept.frontend.call(vu.GetVringBase(index)).num
            for index in range(len(kept.driver.queues))] == bases


def _crash_and_expect_idle(kept: KeptServe) -> None:
    """SIGKILL serve; its successor holds the connection with nothing started."""
    old = kept.serve_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: _children(kept.keeper.pid) not in ([], [old]), timeout=10,
             what="a new serve")
    wait_for(lambda: _status(kept.ctl) is not None, timeout=10, what="the new serve")
    time.sleep(0.5)
    status = _status(kept.ctl)
    assert status["connected"] and status["worker_pid"] is None and status["state"] == "idle"


@pytest.mark.parametrize("how", ["GetVringBase", "SetFeatures"])
def test_rings_stopped_after_an_adoption_are_not_started_by_the_next_successor(kept, how):
    """An adopted session's rings are stopped (GET_VRING_BASE; or a driver probing again,
    which UML shows only by a new SET_FEATURES), then serve dies again: the next successor
    starts nothing, since the driver may be reusing the rings' memory."""
    kept.crash()
    if how == "GetVringBase":
        for index in range(len(kept.driver.queues)):
            kept.frontend.call(vu.GetVringBase(index))
    else:
        assert kept.frontend.ack(vu.SetFeatures(
            kept.features | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES, need_reply=True))
    wait_for(lambda: _status(kept.ctl)["state"] == "idle", what="the device stopped")
    _crash_and_expect_idle(kept)


CRASH_MID_REQUEST = """
import os, signal, sys
from control import vhost_backend, vhost_user
handle = vhost_backend.VhostUserSession.handle
kind = getattr(vhost_user, sys.argv[2])
def crashing(self, event, conn):
    reply = handle(self, event, conn)
    if isinstance(event, kind) and os.path.exists(sys.argv[1]):
        os.unlink(sys.argv[1])                 # once: the successor answers normally
        os.kill(os.getpid(), signal.SIGKILL)   # the request read and handled, not answered
    return reply
vhost_backend.VhostUserSession.handle = crashing
from control.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("kind", ["GetConfig", "SetVringCall"])
def test_a_request_serve_dies_handling_is_answered_by_its_successor(tmp_path, ram, kind):
    """serve is killed after handling a request and before answering it (injected through
    the session, in serve's own process): a config read (handled while still queued in the
    socket) and a call fd swap (carries an fd: left with the keeper while in flight). The
    front-end, which waits for the reply as UML's vCPU would, gets it from the new serve:
    exactly one reply, and the connection goes on in step."""
    marker = tmp_path / "crash-once"
    rig = KeptServe(tmp_path, ram, ("-c", CRASH_MID_REQUEST, str(marker), kind))
    try:
        with ControlClient(rig.ctl) as client:
            client.request("set", size=4 * MIB)
        old = rig.serve_pid()
        marker.touch()
        if kind == "GetConfig":
            reply = rig.frontend.call(vu.GetConfig(0, 8, 0))           # serve dies on this one
            assert struct.unpack_from("<I", reply.data)[0] == 4 * MIB // PAGE
        else:
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            assert rig.frontend.ack(vu.SetVringCall(0, call, need_reply=True))
            queue = rig.driver.queues[INFLATE_QUEUE]
            os.close(queue.call_fd)
            queue.call_fd = call                 # the worker signals the new fd from now on
        assert not marker.exists() and rig.serve_pid() != old
        assert rig.frontend.num_pages() == 4 * MIB // PAGE            # in step: no extra reply
        wait_for(lambda: _status(rig.ctl)["state"] == "active", what="active again")
        rig.driver.inflate(PFNS_PER_BUFFER)                           # and served
        wait_for(lambda: _status(rig.ctl)["actual_bytes"] == MIB, what="actual")
    finally:
        rig.close()


def test_a_ring_base_asked_when_serve_dies_is_where_the_ring_stands(tmp_path, ram):
    """serve is killed while GET_VRING_BASE stops the worker (injected in serve's session):
    the successor starts the ring again, then answers the request still queued by stopping
    it, with the used index in guest memory (1 buffer), not the base the ring was set up
    with (0), which would make the next back-end replay a buffer the guest got back."""
    marker = tmp_path / "crash-once"
    rig = KeptServe(tmp_path, ram, ("-c", CRASH_MID_REQUEST, str(marker), "GetVringBase"))
    try:
        rig.driver.inflate(PFNS_PER_BUFFER)
        old = rig.serve_pid()
        marker.touch()
        assert rig.frontend.call(vu.GetVringBase(0)).num == 1
        assert not marker.exists() and rig.serve_pid() != old
        wait_for(lambda: _status(rig.ctl)["state"] == "idle", what="stopped")
    finally:
        rig.close()


def test_a_request_half_sent_when_serve_dies_is_answered_whole_by_its_successor(kept):
    """The front-end sends half a config read, serve dies, the rest follows: nothing of a
    partial request is taken out of the socket, so the successor reads it whole and
    answers it, and the connection stays in step."""
    with ControlClient(kept.ctl) as client:
        client.request("set", size=2 * MIB)
    request = vu.FrontendConnection().send(vu.GetConfig(0, 8, 0))[0]
    kept.frontend.sock.sendall(request[:6])
    time.sleep(0.05)                                  # serve looks at the half, and waits
    kept.crash()
    kept.frontend.sock.sendall(request[6:])
    reply = kept.frontend.sock.recv(64)
    assert len(reply) == 12 + 12 + 8 and struct.unpack_from("<I", reply, 24)[0] == 512
    kept.frontend.conn = vu.FrontendConnection()      # (the request went around it)
    assert kept.frontend.num_pages() == 512


def test_a_serve_that_keeps_dying_makes_the_keeper_give_up(tmp_path):
    """Five crashes within a minute: the keeper stops restarting and exits 1."""
    def child(link) -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return 0
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = Keeper(child).run()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1


def test_the_store_round_trip_keeps_fds_and_order(tmp_path):
    """serve's records reach the keeper; a successor gets them back in order, with the same
    files behind the fds, and ``adoptions`` sorts them into each VM's."""
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    keeper = Keeper(lambda link: 0)
    b.setblocking(False)
    keeper.sock = b
    store = Store(Link(a, mmap.mmap(-1, mmap.PAGESIZE)))
    record = VmRecord(store, "vm1")
    conn, peer = socket.socketpair()
    record.connected(conn)
    r, w = os.pipe()
    for event in (vu.SetOwner(), vu.SetVringCall(0, r), vu.SetVringNum(0, 64),
                  vu.SetVringCall(0, w)):                          # the second call fd replaces
        prepared = record.prepare(event)
        record.commit(prepared, True)
    record.config(100, 50, None)
    keeper._drain()
    keys = list(keeper.entries)
    assert keys == ["conn/vm1", "req/vm1/owner",
                    "req/vm1/SetVringNum/0", "req/vm1/SetVringCall/0", "cfg/vm1"]
    adopted, blobs = adoptions({k: (blob, [os.dup(fd) for fd in fds])
                                for k, (blob, fds) in keeper.entries.items()})
    assert set(adopted) == {"vm1"} and blobs == {"spec": {}, "pilot": {}}
    adoption = adopted["vm1"]
    assert (adoption.target, adoption.actual, adoption.poison) == (100, 50, None)
    assert len(adoption.requests) == 3
    call_fds = adoption.requests[2][1]
    assert os.fstat(call_fds[0]).st_ino == os.fstat(w).st_ino
    adoption.conn.send(b"x")
    assert peer.recv(1) == b"x"
    record.disconnected()
    keeper._drain()
    assert keeper.entries == {}
    for _, fds in adoption.requests:
        for fd in fds:
            os.close(fd)
    for fd in (r, w):
        os.close(fd)
    for s in (adoption.conn, conn, peer, a, b):
        s.close()


def test_a_keeper_that_stops_reading_is_given_up_and_never_adopts_stale_state(kept):
    """The keeper is stopped while the guest keeps changing ``actual``. Once the records
    fill its socket, serve holds its replies (the front-end must never be told more than a
    successor would know) for at most 1 s, then gives up on the keeper and answers. serve
    is killed while the keeper is still stopped: the keeper, continued, sees that serve gave
    up and forgets all it held, so the crash costs the connection (as without a keeper)
    rather than a successor adopting a session that went on without the keeper."""
    os.kill(kept.keeper.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        for value in range(1, 60000):                # each a config record for the keeper
            kept.frontend.write_config(4, struct.pack("<I", value))
            if time.monotonic() - start > 3:
                break
        took = time.monotonic() - start
        actual = _status(kept.ctl)["actual_bytes"]
        assert actual == value * PAGE and value > 1000
        assert took < 5                              # held at most ~1 s, never for good
        old = kept.serve_pid()
        os.kill(old, signal.SIGKILL)
    finally:
        os.kill(kept.keeper.pid, signal.SIGCONT)
    kept.frontend.sock.settimeout(10)
    assert kept.frontend.sock.recv(1) == b""         # the connection went with serve
    wait_for(lambda: (_status(kept.ctl) or {}).get("state") == "waiting", timeout=10,
             what="a fresh serve")


def test_a_front_end_gone_while_serve_is_dead_is_adopted_as_gone(kept):
    """serve dies and the front-end disconnects before the successor starts (the keeper is
    held stopped in between): the successor adopts a connection at its end, lets it go and
    waits for the next front-end, with no worker left behind."""
    worker = _status(kept.ctl)["worker_pid"]
    os.kill(kept.keeper.pid, signal.SIGSTOP)
    try:
        old = kept.serve_pid()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: _dead(worker), what="the old worker dead")
        kept.frontend.close()
        kept.driver.close()
    finally:
        os.kill(kept.keeper.pid, signal.SIGCONT)
    wait_for(lambda: (_status(kept.ctl) or {}).get("state") == "waiting", timeout=15,
             what="the successor waiting for a front-end")
    status = _status(kept.ctl)
    assert status["worker_pid"] is None and not status["connected"]
    kept.frontend = Frontend.__new__(Frontend)       # (closed above: nothing left to close)
    kept.frontend.close = lambda: None
    kept.driver.close = lambda: None


def test_a_front_end_that_hangs_up_mid_request_is_let_go(kept):
    """Half a request, then the front-end closes: serve notices the end (a peek never shows
    it) and lets the connection go, so the VM waits for a new front-end."""
    request = vu.FrontendConnection().send(vu.GetConfig(0, 8, 0))[0]
    kept.frontend.sock.sendall(request[:6])
    time.sleep(0.05)
    kept.frontend.sock.close()
    wait_for(lambda: _status(kept.ctl)["state"] == "waiting", timeout=5,
             what="the connection let go")


def test_a_set_features_refused_keeps_the_running_rings_kept(kept):
    """A SET_FEATURES with a bit never offered is refused and changes nothing: the rings
    run on, and a successor still starts them."""
    assert not kept.frontend.ack(vu.SetFeatures(1 << 62, need_reply=True))
    assert _status(kept.ctl)["state"] == "active"
    kept.crash()                                      # waits for the adopted device active
    kept.driver.inflate(PFNS_PER_BUFFER)              # and served
