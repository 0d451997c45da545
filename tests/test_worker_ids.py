"""Each jailed worker runs as a uid/gid of its own that no other process on the host uses
(issue 10.4): no other VM's worker, and no unrelated process running as ``nobody``, can
signal it."""

from __future__ import annotations

import logging
import os
import signal
import tempfile

import pytest

from control import worker_ids
from sandbox import idmap

from control.errors import WorkerError
from control.proxy import ProxyBalloon, ProxyOptions
from control.worker_ids import DEFAULT_WORKER_IDS, ids_in_use, parse_range
from device.balloon import BalloonOptions
from tests.driver import BalloonDriver, GuestRam, MIB

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ids are switched to as root")


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _ids(pid: int) -> tuple[set[int], set[int]]:
    uids = gids = set()
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uids = {int(v) for v in line.split()[1:]}
            elif line.startswith("Gid:"):
                gids = {int(v) for v in line.split()[1:]}
    return uids, gids


@pytest.fixture
def devices():
    made = []

    def make(**options):
        ram = GuestRam(16 * MIB)
        proxy = ProxyBalloon(BalloonOptions(), ProxyOptions(**options))
        proxy.ack_features(proxy.device_features)
        driver = BalloonDriver(ram, proxy.queue_names(), proxy.acked_features,
                               write_config=proxy.write_config)
        made.append((proxy, driver, ram))
        return proxy, driver, ram
    yield make
    for proxy, driver, ram in made:
        proxy.close()
        driver.close()
        ram.close()


def _activate(make, **options):
    proxy, driver, ram = make(**options)
    proxy.activate([ram.region()], driver.specs())
    return proxy


def test_each_worker_runs_as_an_id_no_other_process_uses(devices):
    first, second = _activate(devices), _activate(devices)
    low, high = DEFAULT_WORKER_IDS
    seen = []
    for proxy in (first, second):
        uids, gids = _ids(proxy.worker.pid)
        assert len(uids) == 1 and uids == gids            # real, effective, saved, fs alike
        (uid,) = uids
        assert low <= uid <= high and uid != 65534
        seen.append(uid)
    assert seen[0] != seen[1]
    # Nothing else on the host runs with them.
    holders = [pid for pid in os.listdir("/proc") if pid.isdigit()
               and int(pid) not in (first.worker.pid, second.worker.pid)
               and seen[0] in _safe_ids(int(pid))]
    assert holders == []


def _safe_ids(pid: int) -> set[int]:
    try:
        uids, gids = _ids(pid)
    except OSError:
        return set()
    return uids | gids


def _run_as(uid: int):
    """A process running as ``uid`` until its pipe closes; returns (pid, write end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    return pid, w


def test_an_id_some_process_uses_is_skipped_and_a_full_range_is_a_clear_error(devices):
    low = DEFAULT_WORKER_IDS[0] + 4242
    squatter, lifeline = _run_as(low)
    try:
        from tests.driver import wait_for
        wait_for(lambda: low in ids_in_use(), what="the squatter's uid")
        proxy = _activate(devices, worker_ids=(low, low + 1))
        assert _ids(proxy.worker.pid)[0] == {low + 1}
        with pytest.raises(WorkerError, match="in use"):
            _activate(devices, worker_ids=(low, low + 1))
    finally:
        os.close(lifeline)
        os.waitpid(squatter, 0)


def test_a_process_running_as_nobody_cannot_signal_the_worker(devices):
    """Before, every worker ran as 65534: any process of nobody's could kill or stop it."""
    proxy = _activate(devices)
    target = proxy.worker.pid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                os.kill(target, signal.SIGSTOP)
                code = 1
            except PermissionError:
                code = 2
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    result = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert result == b"\x02"                              # EPERM
    assert proxy.state == "active"


def test_worker_heap_is_limited(devices):
    proxy = _activate(devices)
    with open(f"/proc/{proxy.worker.pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max data size"))
    soft = line.split()[3]
    assert soft != "unlimited" and int(soft) > 128 << 20


@pytest.mark.parametrize("text", ["", "5", "10-5", "0-100", "x-y", "1000-4294967295"])
def test_bad_id_ranges_are_refused(text):
    with pytest.raises(ValueError):
        parse_range(text)


def test_id_range_parses():
    assert parse_range("0x7E000000-0x7E00FFFF") == DEFAULT_WORKER_IDS


# ---------------------------------------------------------------------------
# Unprivileged: subordinate ids (/etc/subuid, /etc/subgid) mapped by newuidmap.
# ---------------------------------------------------------------------------

MS_BIND = 0x1000
SUB_FIRST, SUB_COUNT = DEFAULT_WORKER_IDS[0] + 0x8000, 64


def _as_nobody_with_subordinate_ids(lines: str, body) -> None:
    """Run ``body`` as uid 65534 in a forked helper whose private mount namespace shows
    ``lines`` as /etc/subuid and /etc/subgid (the host's files are not touched)."""
    import prctl

    from sandbox import syscalls
    from tests.jail_helpers import run_in_fork

    def helper():
        syscalls.unshare(syscalls.CLONE_NEWNS)
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE, None)
        for name in ("subuid", "subgid"):
            fd, path = tempfile.mkstemp(prefix=f"vb-{name}-")
            os.write(fd, lines.encode())
            os.close(fd)
            os.chmod(path, 0o644)
            syscalls.mount(path, f"/etc/{name}", None, MS_BIND, None)
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        prctl.set_dumpable(True)                # as any unprivileged user's process is
        worker_ids._warned.clear()
        body()
    run_in_fork(helper)


def _groups(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line for line in f if line.startswith("Groups:")).split(":", 1)[1].strip()


@pytest.mark.skipif(not idmap.helpers_available(), reason="newuidmap/newgidmap missing (Debian uidmap)")
def test_unprivileged_workers_run_as_subordinate_ids_of_their_own(devices):
    """Before, an unprivileged serve's workers all ran as serve's own uid (here 65534)."""
    def body():
        first, second = _activate(devices), _activate(devices)
        seen = []
        for proxy in (first, second):
            uids, gids = _ids(proxy.worker.pid)
            assert len(uids) == 1 and uids == gids
            (uid,) = uids
            assert SUB_FIRST <= uid < SUB_FIRST + SUB_COUNT, uid
            assert _groups(proxy.worker.pid) == ""        # none of the caller's groups
            seen.append(uid)
        assert seen[0] != seen[1]
        # The parent (which owns the namespace) can still kill and replace it.
        old = first.worker.pid
        os.kill(old, signal.SIGKILL)
        from tests.driver import wait_for
        wait_for(lambda: first.worker is not None and first.worker.pid != old and first.state == "active",
                 what="a replacement worker")
        assert SUB_FIRST <= min(_ids(first.worker.pid)[0]) < SUB_FIRST + SUB_COUNT
    _as_nobody_with_subordinate_ids(f"nobody:{SUB_FIRST}:{SUB_COUNT}\n", body)


@pytest.mark.skipif(not idmap.helpers_available(), reason="newuidmap/newgidmap missing (Debian uidmap)")
def test_worker_ids_narrows_the_subordinate_ids_and_no_subordinate_ids_falls_back_with_a_warning(devices):
    def body():
        from control.worker_ids import ids_in_use
        from tests.driver import wait_for
        # A worker of an earlier test may still be exiting under this id.
        wait_for(lambda: SUB_FIRST + 5 not in ids_in_use(), what="the id to be free")
        proxy = _activate(devices, worker_ids=(SUB_FIRST + 5, SUB_FIRST + 5))
        assert _ids(proxy.worker.pid)[0] == {SUB_FIRST + 5}
        # A range outside the delegation: the worker maps our own uid, and the log says why.
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("vballoon.worker_ids").addHandler(handler)
        proxy = _activate(devices, worker_ids=(SUB_FIRST - 10, SUB_FIRST - 1))
        assert _ids(proxy.worker.pid)[0] == {65534}
        assert any("no ids in both /etc/subuid and /etc/subgid" in r.getMessage() for r in records)
    _as_nobody_with_subordinate_ids(f"65534:{SUB_FIRST}:{SUB_COUNT}\n", body)   # by number


def test_subordinate_ranges_are_read_by_name_or_number_and_intersected(tmp_path):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("nobody:100000:65536\n# comment\nother:1:5\n65534:300000:10\nnobody:bad:1\n"
                      "nobody:400000:0\n")
    subgid.write_text("nobody:120000:65536\n65534:300005:100\n")
    assert worker_ids.subordinate_ranges(65534, str(subuid), str(subgid)) == [
        (120000, 165535), (300005, 300009)]
    assert worker_ids.subordinate_ranges(65534, str(tmp_path / "missing"), str(subgid)) == []


def test_acquire_spans_several_ranges_and_skips_held_ids():
    got = {worker_ids.acquire([(DEFAULT_WORKER_IDS[0] + 100, DEFAULT_WORKER_IDS[0] + 101),
                               (DEFAULT_WORKER_IDS[0] + 200, DEFAULT_WORKER_IDS[0] + 200)])
           for _ in range(3)}
    try:
        assert got == {DEFAULT_WORKER_IDS[0] + 100, DEFAULT_WORKER_IDS[0] + 101, DEFAULT_WORKER_IDS[0] + 200}
        with pytest.raises(OSError, match="in use"):
            worker_ids.acquire([(DEFAULT_WORKER_IDS[0] + 100, DEFAULT_WORKER_IDS[0] + 101)])
    finally:
        for ident in got:
            worker_ids.release(ident)
