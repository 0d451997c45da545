"""``vballoon serve`` end to end with a Python vhost-user front-end and the fake driver."""

from __future__ import annotations

import os
import select
import signal
import struct

import pytest

from control import vhost_user as vu
from control.client import ControlClient
from control.proxy import ProxyOptions
from tests.driver import MIB, PAGE, wait_for
from tests.frontend import served_device


@pytest.fixture(params=[False, True], ids=["thread", "jailed"])
def served(request, tmp_path, ram):
    with served_device(tmp_path, ram, proxy=ProxyOptions(jail=request.param)) as rig:
        yield rig


def test_operator_target_reaches_the_guest_and_memory_is_freed(ram, served):
    server, frontend, driver, options = served
    ram.populate()
    with ControlClient(options.control_path) as client:
        status = client.request("set", size=8 * MIB)
        assert status["target_bytes"] == 8 * MIB
        wait_for(lambda: frontend.pending_config_changes() == 1, what="config change")
        target = frontend.num_pages()
        assert target == 8 * MIB // PAGE
        driver.inflate(target)
        assert ram.host_bytes() == ram.size - 8 * MIB
        reply = client.request("wait", timeout=5.0)
        assert reply["outcome"] == "settled"
        assert reply["actual_bytes"] == 8 * MIB
        status = client.request("status")
        assert status["state"] == "active"
        assert "STATS_VQ" in status["features"]


def test_control_socket_is_owner_only(served):
    _, _, _, options = served
    assert os.stat(options.control_path).st_mode & 0o777 == 0o600


def test_bad_config_write_is_refused_and_changes_nothing(served):
    _, frontend, _, _ = served
    assert frontend.ack(vu.SetConfig(0, b"\1\0\0\0", need_reply=True))   # read-only: ignored
    assert frontend.num_pages() == 0
    assert not frontend.ack(vu.SetConfig(14, b"\1\0\0\0", need_reply=True))  # past the end
    assert frontend.num_pages() == 0


def test_qemu_style_whole_config_writes_set_actual(served):
    """QEMU forwards each write of ``actual`` as SET_CONFIG of the whole space at offset 0,
    with its cached num_pages (issue 11.1): accepted, only ``actual`` applied."""
    server, frontend, _, options = served
    with ControlClient(options.control_path) as client:
        client.request("set", size=8 * MIB)
        assert frontend.ack(vu.SetConfig(0, struct.pack("<II", 0, 1024), need_reply=True))
        status = client.request("status")
    assert status["target_bytes"] == 8 * MIB and status["actual_bytes"] == 1024 * PAGE


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_failed_requests_with_reply_bodies_keep_the_connection(served):
    server, frontend, driver, options = served
    # Ring 4 exists in the codec's range but not among the negotiated queues.
    reply = frontend.call(vu.GetVringBase(4))
    assert reply.index == 4
    assert frontend.call(vu.GetMaxMemSlots()).value == 0
    assert frontend.num_pages() == 0                     # still connected and serving
    assert server.server.conn is not None


def test_fds_of_refused_requests_are_closed(served, tmp_path):
    server, frontend, driver, options = served
    before = _open_fds()
    for _ in range(5):
        r, w = os.pipe()
        assert not frontend.ack(vu.SetBackendReqFd(r, need_reply=True))   # not a socket
        os.close(r)
        os.close(w)
        memfd = os.memfd_create("extra")
        assert not frontend.ack(vu.AddMemReg(vu.MemRegion(1 << 40, 4096, 1 << 40, 0), memfd,
                                             need_reply=True))
        os.close(memfd)
    # The server runs in this process: none of the 10 received fds may still be open.
    wait_for(lambda: _open_fds() <= before, what="the refused fds to be closed")


def _worker_pid(server) -> int:
    return server.server.device.worker.pid


def test_refused_features_leave_an_active_device_running(served):
    """Regression (issue 10.7): SET_FEATURES with a bit never offered was refused but
    stopped the worker first, leaving the device idle with no worker."""
    server, frontend, driver, _ = served
    pid = _worker_pid(server)
    assert not frontend.ack(vu.SetFeatures(1 << 63 | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES,
                                           need_reply=True))
    assert server.server.device.state == "active" and _worker_pid(server) == pid
    driver.inflate(256)                                   # still served by the same worker


def test_memory_table_without_the_rings_is_refused_and_changes_nothing(served, ram):
    server, frontend, driver, _ = served
    pid = _worker_pid(server)
    other = os.memfd_create("elsewhere")
    os.ftruncate(other, ram.size)
    region = vu.MemRegion(0, ram.size, 0x1000_0000_0000, 0)     # rings are not in here
    assert not frontend.ack(vu.SetMemTable((region,), (other,), need_reply=True))
    os.close(other)
    assert server.server.device.state == "active" and _worker_pid(server) == pid
    driver.inflate(256)


@pytest.mark.parametrize("kind", ["pipe", "socket", "directory"])
def test_memory_fd_that_is_not_a_file_is_refused_on_arrival(served, tmp_path, kind):
    """Issue 10.10: a pipe, socket or directory is refused with the memory table, not
    accepted and only refused when the worker maps it."""
    server, frontend, driver, _ = served
    pid = _worker_pid(server)
    if kind == "pipe":
        fd, spare = os.pipe()
    elif kind == "socket":
        a, b = __import__("socket").socketpair()
        fd, spare = a.detach(), b.detach()
    else:
        fd, spare = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), None
    region = vu.MemRegion(0, 1 << 20, 0x7F00_0000_0000, 0)
    assert not frontend.ack(vu.SetMemTable((region,), (fd,), need_reply=True))
    for open_fd in (fd, spare):
        if open_fd is not None:
            os.close(open_fd)
    assert server.server.device.state == "active" and _worker_pid(server) == pid


@pytest.mark.parametrize("disruption", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "stop"])
def test_get_vring_base_answers_the_used_index_whatever_the_worker_does(tmp_path, ram, disruption):
    """Regression (issue 10.1): with the worker dead, restarting or stopped, GET_VRING_BASE
    answered the last SET_VRING_BASE (0 here), not the used index in guest memory. A VMM
    that hands it to the next back-end has the inflate buffers replayed: pages the guest
    got back and wrote are punched again and read back as zeros."""
    with served_device(tmp_path, ram, proxy=ProxyOptions(jail=True)) as (server, frontend,
                                                                          driver, _):
        ram.populate()
        pfns = driver.inflate(1024)                       # four buffers, all used
        inflate = driver.queues["inflate"]
        used = {name: queue.used_idx() for name, queue in driver.queues.items()}
        assert used["inflate"] == 4
        victim = _worker_pid(server)
        os.kill(victim, disruption)
        bases = {name: frontend.call(vu.GetVringBase(index)).num
                 for index, name in enumerate(driver.queues)}
        assert bases == used
        if disruption == signal.SIGSTOP:
            wait_for(lambda: not os.path.exists(f"/proc/{victim}"), what="the stopped worker gone")
        # The guest owns those pages again (a migration's destination would) and writes them.
        for pfn in pfns:
            ram.map[pfn * PAGE:pfn * PAGE + 8] = b"guest!!\n"
        # The next back-end starts where GET_VRING_BASE said.
        for index, (name, queue) in enumerate(driver.queues.items()):
            assert frontend.ack(vu.SetVringBase(index, bases[name], need_reply=True))
            assert frontend.ack(vu.SetVringKick(index, queue.kick_fd, need_reply=True))
        wait_for(lambda: server.server.device.state == "active", what="the next back-end")
        driver.inflate(256)                               # it serves what is new, only that
        assert all(ram.map[pfn * PAGE:pfn * PAGE + 8] == b"guest!!\n" for pfn in pfns)
        counters = server.worker_request("state")["counters"]
        assert counters["inflate_buffers"] == 1 and counters["inflated_pages"] == 256
        assert inflate.used_idx() == 5


def test_worker_that_stops_answering_is_reported_and_replaced(tmp_path, ram):
    """Issue 10.6: a stopped (or wedged) worker is found out by a liveness check that any
    operator request starts, reported ``unresponsive`` and replaced, resuming its rings."""
    proxy = ProxyOptions(jail=True, request_timeout=0.5)
    with served_device(tmp_path, ram, proxy=proxy) as (server, _, driver, options):
        ram.populate()
        victim = _worker_pid(server)
        os.kill(victim, signal.SIGSTOP)
        with ControlClient(options.control_path) as client:
            seen = set()

            def replaced() -> bool:
                status = client.request("status")
                seen.add(status["state"])
                return status["worker_pid"] not in (None, victim) and status["state"] == "active"
            wait_for(replaced, what="the unresponsive worker replaced")
            status = client.request("status")
        assert "unresponsive" in status["last_worker_exit"] and status["worker_restarts"] == 1
        wait_for(lambda: not os.path.exists(f"/proc/{victim}"), what="the stopped worker gone")
        driver.inflate(512)                               # the replacement serves the guest
        assert ram.host_bytes() == ram.size - 512 * PAGE


def test_a_guest_cannot_make_one_worker_pass_long(tmp_path, ram):
    """Issue 10.6: 128 buffers of 8192 scattered PFNs each (one hole punch per PFN, ~4 s of
    work) used to be one pass: the worker heard nothing from its parent until the end."""
    import struct as _struct
    import time as _time
    with served_device(tmp_path, ram, proxy=ProxyOptions(jail=True)) as (server, _, driver, _o):
        inflate = driver.queues["inflate"]
        pfns = list(range(2048, 2048 + 2 * 8192, 2))     # every other page: 8192 ranges
        array = inflate.scratch
        _struct.pack_into(f"<{len(pfns)}I", ram.map, array, *pfns)
        for _ in range(inflate.size):
            inflate.add([(array, 4 * len(pfns))])
        inflate.kick()
        start = _time.monotonic()
        state = server.worker_request("state")
        assert _time.monotonic() - start < 1.0
        assert state["counters"]["inflate_buffers"] < inflate.size
        driver.wait_used("inflate", inflate.size)


def _crash_until_failed(server, options) -> None:
    """SIGKILL each worker as it comes up until the device gives up (max_restarts=1)."""
    for _ in range(2):
        pid = wait_for(lambda: server.server.device.state == "active"
                       and _worker_pid(server), what="a worker")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: server.server.device.state != "active"
                 or _worker_pid(server) != pid, what="the death noticed")
    wait_for(lambda: server.server.device.state == "failed", what="the failed state")


@pytest.mark.parametrize("how", ["set", "reset"])
def test_operator_restarts_a_failed_device(tmp_path, ram, how):
    """Issue 10.10: only the VMM could bring a failed device back; now a new target (or
    ``vballoon reset``) restarts its worker, resuming the rings."""
    proxy = ProxyOptions(jail=True, max_restarts=1, restart_window=60)
    with served_device(tmp_path, ram, proxy=proxy) as (server, _, driver, options):
        ram.populate()
        _crash_until_failed(server, options)
        with ControlClient(options.control_path) as client:
            if how == "set":
                client.request("set", size=MIB)
            else:
                assert client.request("reset")["state"] in ("starting", "active")
            wait_for(lambda: client.request("status")["state"] == "active", what="recovery")
        driver.inflate(256)
        assert ram.host_bytes() == ram.size - 256 * PAGE


def test_reset_of_a_device_that_has_not_failed_is_refused(served):
    _, _, _, options = served
    with ControlClient(options.control_path) as client:
        with pytest.raises(Exception, match="not failed"):
            client.request("reset")
        assert client.request("status")["state"] == "active"


def test_reset_owner_forgets_the_guest_memory_size(served):
    """Issue 16 defect: after RESET_OWNER, ``set`` was checked against the old memory."""
    server, frontend, _, options = served
    assert frontend.ack(vu.ResetOwner(need_reply=True))
    with ControlClient(options.control_path) as client:
        status = client.request("status")
        assert status["guest_memory_bytes"] is None and status["state"] == "idle"
        with pytest.raises(Exception, match="no guest"):
            client.request("set", size=MIB)


def test_config_access_errors_are_the_guests():
    from device.errors import ConfigAccessError, GuestError
    assert issubclass(ConfigAccessError, GuestError)


def test_counters_in_status_survive_worker_restarts(tmp_path, ram):
    """Issue 16.5: operator-visible counters, summed over every worker the device ran."""
    with served_device(tmp_path, ram, proxy=ProxyOptions(jail=True)) as (server, _, driver,
                                                                          options):
        ram.populate()
        driver.inflate(512)
        with ControlClient(options.control_path) as client:
            wait_for(lambda: client.request("status")["counters"]["inflated_pages"] == 512,
                     what="the first worker's counters")
            victim = _worker_pid(server)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: client.request("status")["state"] == "active"
                     and _worker_pid(server) != victim, what="a replacement")
            driver.inflate(256)
            wait_for(lambda: client.request("status")["counters"]["inflated_pages"] == 768,
                     what="counters summed over both workers")
            counters = client.request("status")["counters"]
        assert counters["inflate_buffers"] == 3 and counters["worker_restarts"] == 1
        assert counters["released_pages"] == 768 and counters["kicks"] >= 3


def _huge_free() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@pytest.fixture
def huge_ram():
    """16 MiB of real hugetlbfs guest memory (skipped where the machine has none)."""
    from tests.driver import GuestRam
    nr = "/proc/sys/vm/nr_hugepages"
    old = open(nr).read().strip()
    try:
        try:
            with open(nr, "w") as f:
                f.write(str(int(old) + 8))
            wait_for(lambda: _huge_free() >= 8, timeout=5, what="8 free huge pages")
            ram = GuestRam(16 * MIB, "huge-guest", huge=True)
        except (OSError, TimeoutError) as exc:
            pytest.skip(f"no hugetlbfs here: {exc}")
        yield ram
        ram.close()
    finally:
        with open(nr, "w") as f:
            f.write(old)


def _swap_kick_fd(frontend, driver) -> None:
    """A kick fd swap: the worker is replaced (gracefully), resuming its rings."""
    assert frontend.ack(vu.SetVringKick(0, driver.queues["inflate"].kick_fd, need_reply=True))


def test_partial_huge_pages_survive_an_fd_swap(tmp_path, huge_ram):
    """Issue 16 defect: the worker restarted for a kick fd swap forgot which small pages of a
    huge page were already in the balloon, so that huge page was never released."""
    with served_device(tmp_path, huge_ram, proxy=ProxyOptions(jail=True)) as (server, frontend,
                                                                               driver, _):
        huge_ram.populate()
        driver.inflate(256)                               # half of the top huge page
        free = _huge_free()
        pid = _worker_pid(server)
        _swap_kick_fd(frontend, driver)                   # a graceful worker replacement
        wait_for(lambda: server.server.device.state == "active" and _worker_pid(server) != pid,
                 what="the replacement")
        driver.inflate(256)                               # the other half
        assert _huge_free() == free + 1                   # now the huge page goes back


def test_partial_huge_pages_are_forgotten_when_the_driver_may_be_gone(tmp_path, huge_ram):
    """After GET_VRING_BASE the driver may be gone and its pages reused: nothing of the
    old collection may complete a huge page the guest is using."""
    with served_device(tmp_path, huge_ram, proxy=ProxyOptions(jail=True)) as (server, frontend,
                                                                               driver, _):
        huge_ram.populate()
        pfns = driver.inflate(256)                        # half of the top huge page
        bases = {name: frontend.call(vu.GetVringBase(index)).num
                 for index, name in enumerate(driver.queues)}
        for pfn in pfns:                                  # the guest uses them again
            huge_ram.map[pfn * PAGE:pfn * PAGE + 4] = b"mine"
        for index, (name, queue) in enumerate(driver.queues.items()):
            assert frontend.ack(vu.SetVringBase(index, bases[name], need_reply=True))
            assert frontend.ack(vu.SetVringKick(index, queue.kick_fd, need_reply=True))
        wait_for(lambda: server.server.device.state == "active", what="serving again")
        free = _huge_free()
        driver.inflate(256)                               # the other half
        assert _huge_free() == free
        assert all(huge_ram.map[pfn * PAGE:pfn * PAGE + 4] == b"mine" for pfn in pfns)


@pytest.mark.parametrize("jail", [False, True], ids=["thread", "jailed"])
def test_serve_stopped_right_after_a_disconnect_closes_every_guest_fd(tmp_path, jail):
    """A front-end that disconnects leaves its worker stopping; ``serve`` stopped before
    that finished used to keep the guest's memory fd open for good (its memory with it)."""
    from tests.driver import GuestRam

    def guest_fds() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if "leak-probe" in target:
                found.append(target)
        return found

    ram = GuestRam(16 * MIB, "leak-probe")
    try:
        before = guest_fds()                                # the fd and its mapping's dup
        with served_device(tmp_path, ram, proxy=ProxyOptions(jail=jail)) as (_, _, driver, _):
            driver.inflate(256)
            assert len(guest_fds()) > len(before)
        assert guest_fds() == before
    finally:
        ram.close()
    assert guest_fds() == []


def test_rings_beyond_the_negotiated_queues_are_accepted_and_ignored(served):
    """QEMU with num_vqs larger than the negotiated queues sets up the extra ring too;
    refusing it kept the device from ever starting (issue 11.2)."""
    server, frontend, driver, _ = served
    pid = _worker_pid(server)
    extra = len(driver.queues)                              # ring 3: no such queue
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        user = 0x7F00_0000_0000
        for request in (vu.SetVringCall(extra, call, need_reply=True),
                        vu.SetVringNum(extra, 64, need_reply=True),
                        vu.SetVringBase(extra, 0, need_reply=True),
                        vu.SetVringAddr(extra, 0, user + 0x10000, user + 0x11000, user + 0x12000,
                                        0, need_reply=True),
                        vu.SetVringKick(extra, kick, need_reply=True),
                        vu.SetVringEnable(extra, True, need_reply=True)):
            assert frontend.ack(request), request
        assert frontend.call(vu.GetVringBase(extra)).num == 0
        assert frontend.ack(vu.SetVringEnable(extra, False, need_reply=True))
    finally:
        os.close(kick)
        os.close(call)
    assert server.server.device.state == "active" and _worker_pid(server) == pid
    driver.inflate(256)                                     # still served, untouched


def test_call_fd_swaps_are_taken_by_the_live_worker(served):
    """QEMU swaps every call fd right after the device starts (issue 11.3): each swap used
    to restart the worker; now the serving worker takes the new fd, and signals it."""
    server, frontend, driver, options = served
    pid = _worker_pid(server)
    for _ in range(3):
        for index, queue in enumerate(driver.queues.values()):
            new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            assert frontend.ack(vu.SetVringCall(index, new, need_reply=True))
            os.close(queue.call_fd)
            queue.call_fd = new
    # The worker signals the new fd (once at the swap, for an interrupt the old may have
    # swallowed); the driver then waits on it for its buffers (wait_used drains it).
    wait_for(lambda: select.select([driver.queues["inflate"].call_fd], [], [], 0)[0],
             what="the new call fd signalled")
    driver.inflate(256)
    with ControlClient(options.control_path) as client:
        status = client.request("status")
    assert status["worker_restarts"] == 0 and status["worker_pid"] == pid
    assert server.server.device.restarts == 0


def test_stats_refresh_waits_for_values_newer_than_the_request(served):
    """Issue 11.4: ``stats --refresh`` used to return the previous sample."""
    from device.stats import VIRTIO_BALLOON_S_MEMFREE
    import threading
    _, _, driver, options = served
    driver.send_stats({VIRTIO_BALLOON_S_MEMFREE: 111})
    with ControlClient(options.control_path) as client:
        wait_for(lambda: client.request("stats")["free_memory"] == 111, what="first stats")
        # The guest answers the hand-back with new values (what Linux does at once).
        guest = threading.Thread(target=driver.refresh_stats,
                                 args=({VIRTIO_BALLOON_S_MEMFREE: 222},), daemon=True)
        guest.start()
        fresh = client.request("stats", refresh=True, timeout=5)
        guest.join(5)
        assert fresh["free_memory"] == 222 and fresh["refresh_requested"] is True
        # A guest that does not refresh: a clear error after the timeout.
        with pytest.raises(Exception, match="did not refresh its statistics within 0.3 s"):
            client.request("stats", refresh=True, timeout=0.3)


def test_a_config_read_too_small_logs_the_fix(served, caplog):
    """Issue 11.7: a mistake vballoon can see from its side is logged with its fix."""
    _, frontend, _, _ = served
    with caplog.at_level("WARNING", logger="vballoon.vhost"):
        frontend.call(vu.GetConfig(0, 4, 0))
        frontend.call(vu.GetConfig(0, 4, 0))
    hints = [r.getMessage() for r in caplog.records if "config_size=8" in r.getMessage()]
    assert len(hints) == 1                                   # once per connection


def test_rings_without_a_memory_table_log_the_fix(tmp_path, ram, caplog):
    """QEMU with RAM that is not shared sets up the rings but never sends a memory table."""
    from tests.frontend import Frontend, ServerThread
    from control.server import ServeOptions
    from device.balloon import BalloonOptions, queue_layout
    from tests.driver import BalloonDriver
    options = ServeOptions(str(tmp_path / "v.sock"), str(tmp_path / "c.sock"))
    server = ServerThread(options)
    frontend = Frontend(options.socket_path)
    features = BalloonOptions().features()
    driver = BalloonDriver(ram, queue_layout(features), features, write_config=frontend.write_config)
    try:
        with caplog.at_level("WARNING", logger="vballoon.vhost"):
            assert frontend.ack(vu.SetFeatures(features | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES,
                                               need_reply=True))
            for index, queue in enumerate(driver.queues.values()):
                user = 0x7F00_0000_0000
                for request in (vu.SetVringCall(index, queue.call_fd, need_reply=True),
                                vu.SetVringNum(index, queue.size, need_reply=True),
                                vu.SetVringAddr(index, 0, user + queue.desc, user + queue.used,
                                                user + queue.avail, 0, need_reply=True),
                                vu.SetVringKick(index, queue.kick_fd, need_reply=True)):
                    assert frontend.ack(request)
        assert any("share=on" in r.getMessage() for r in caplog.records)
        assert server.server.device.state == "idle"
    finally:
        frontend.close()
        server.stop()
        driver.close()


def test_ring_states_follow_the_session(served):
    """Issue 16.3: each ring's state is explicit: started while served, stopped by
    GET_VRING_BASE, started again by a new kick; a call fd swap leaves it started."""
    server, frontend, driver, _ = served
    session = server.server.session
    names = list(driver.queues)

    def states() -> list[str]:
        return [ring.state for ring in session.state.vrings[:len(names)]]
    assert states() == ["started"] * len(names) and session.state.active
    assert session.state.vrings[len(names)].state == "new"      # never configured
    frontend.call(vu.GetVringBase(0))
    assert states() == ["stopped"] * len(names) and not session.state.active
    for index, queue in enumerate(driver.queues.values()):
        assert frontend.ack(vu.SetVringKick(index, queue.kick_fd, need_reply=True))
        if index < len(names) - 1:
            assert states()[index] == "ready" and not session.state.active
    assert states() == ["started"] * len(names) and session.state.active
    new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    assert frontend.ack(vu.SetVringCall(0, new, need_reply=True))
    os.close(driver.queues["inflate"].call_fd)
    driver.queues["inflate"].call_fd = new
    assert states() == ["started"] * len(names)
    driver.inflate(256)


@pytest.mark.parametrize("reprobe", [True, False], ids=["uml", "no-guess"])
def test_set_features_while_active_is_a_named_profile_guess(tmp_path, ram, reprobe):
    """UML re-probes with SET_FEATURES while the rings run (it sends nothing when its driver
    goes): the UML profile stops the worker then; a profile without that guess does not."""
    from control import vhost_backend
    profile = vhost_backend.FrontendProfile("test", set_features_while_active_means_reprobe=reprobe)
    original = vhost_backend.DEFAULT_PROFILE
    vhost_backend.VhostUserSession.__init__.__defaults__ = (profile,)
    try:
        with served_device(tmp_path, ram) as (server, frontend, driver, _):
            features = server.server.device.acked_features
            acked = frontend.ack(vu.SetFeatures(features | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES,
                                                need_reply=True))
            # UML profile: a re-probe, the worker stops and the features are taken. Without
            # the guess: features cannot change under a running device, refused, still served.
            assert acked is reprobe
            assert server.server.session.state.active is (not reprobe)
    finally:
        vhost_backend.VhostUserSession.__init__.__defaults__ = (original,)


def test_worker_dying_while_a_call_fd_swap_waits_keeps_the_connection(tmp_path, ram):
    """Review finding: the failed swap fell back to a stop while the supervisor still said
    "active" with no worker; the error closed the guest's connection (fatal to a guest with
    pages in the balloon) and broke shutdown."""
    import socket as socket_module
    with served_device(tmp_path, ram, proxy=ProxyOptions(jail=True)) as (server, frontend,
                                                                          driver, _):
        pid = _worker_pid(server)
        os.kill(pid, signal.SIGSTOP)
        new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        data, fds = frontend.conn.send(vu.SetVringCall(0, new, need_reply=True))
        socket_module.send_fds(frontend.sock, [data], list(fds))
        wait_for(lambda: server.server.session.busy, what="the swap waiting on the worker")
        os.kill(pid, signal.SIGKILL)
        reply = frontend.conn.next_event()
        while reply is vu.NEED_DATA:
            chunk = frontend.sock.recv(65536)
            assert chunk, "serve closed the guest's connection"
            frontend.conn.receive_data(chunk)
            reply = frontend.conn.next_event()
        assert reply.ok                                   # taken by the replacement
        os.close(driver.queues["inflate"].call_fd)
        driver.queues["inflate"].call_fd = new
        wait_for(lambda: server.server.device.state == "active" and _worker_pid(server) != pid,
                 what="the replacement")
        assert server.server.frontend is not None
        driver.inflate(256)


def test_connection_closed_while_a_memory_table_waits_leaks_no_fd(tmp_path, ram):
    """Review finding: a handler suspended in SET_MEM_TABLE kept the new guest memory fd
    open for good when the connection closed under it."""
    from tests.driver import GuestRam

    def fds(tag: str) -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += tag in os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        return count
    import socket as socket_module
    new = GuestRam(64 * MIB, "table-probe")
    try:
        with served_device(tmp_path, ram, proxy=ProxyOptions(jail=True)) as (server, frontend,
                                                                              _, _):
            new.map[:] = ram.map[:]                       # the same rings, a new table
            before = fds("table-probe")
            pid = _worker_pid(server)
            os.kill(pid, signal.SIGSTOP)
            region = vu.MemRegion(0, new.size, 0x7F00_0000_0000, 0)
            data, fdl = frontend.conn.send(vu.SetMemTable((region,), (new.fd,), need_reply=True))
            socket_module.send_fds(frontend.sock, [data], list(fdl))
            wait_for(lambda: server.server.session.busy, what="the table waiting on the worker")
            server.server.loop.call_soon_threadsafe(
                lambda: server.server.frontend.close("closed while busy"))
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: fds("table-probe") == before, what="the received memfd closed")
    finally:
        new.close()


def test_out_of_fds_when_replacing_a_worker_is_a_failed_start_not_a_stuck_one(
        tmp_path, ram, monkeypatch):
    """Review finding: socketpair() failing (EMFILE) as the supervisor replaced a dead worker
    left it "starting" for good, and every later stop waited forever."""
    import errno
    import socket as socket_module
    real = socket_module.socketpair
    failures = [0]

    def flaky(*args, **kwargs):
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real(*args, **kwargs)
    with served_device(tmp_path, ram, proxy=ProxyOptions(jail=True)) as (server, frontend,
                                                                          driver, _):
        monkeypatch.setattr("control.supervisor.socket.socketpair", flaky)
        pid = _worker_pid(server)
        failures[0] = 1
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: server.server.device.state == "active" and _worker_pid(server) != pid,
                 what="a replacement after the failed one")
        assert "Too many open files" in server.server.device.last_exit
        frontend.call(vu.GetVringBase(0))                 # a stop completes
        assert server.server.device.state == "idle" and not server.server.session.busy


def test_a_replaced_backend_channel_is_unwatched_before_it_is_closed(served):
    """Review finding: the session closed the old backend-request socket while the loop
    still watched it (until the end of the batch); its fd number, reused at once by a
    worker's socket, met a stale registration."""
    import socket as socket_module
    server, frontend, _, options = served
    mine, theirs = socket_module.socketpair()
    loop = server.server.loop

    def replace_and_look() -> list:
        session = server.server.session
        session.handle(vu.SetBackendReqFd(os.dup(theirs.fileno())), server.server.frontend.codec)
        # Right after the request, before anything else runs in the loop:
        return [r.fileobj for r in loop.registrations()
                if hasattr(r.fileobj, "fileno") and r.fileobj.fileno() == -1]
    try:
        assert loop.call_sync(replace_and_look) == []      # nothing closed is still watched
        with ControlClient(options.control_path) as client:
            client.request("set", size=MIB)
        mine.settimeout(5)
        assert mine.recv(64)                               # the notice on the new channel
    finally:
        mine.close()
        theirs.close()
