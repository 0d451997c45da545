"""The proxy: a balloon served by a separate worker, driven exactly like the in-process one."""

from __future__ import annotations

import os
import select
import signal
import struct

import msgpack
import pytest

from control.errors import RequestError, WorkerError
from control.proxy import ACTIVE, FAILED, ProxyBalloon, ProxyOptions
from device.balloon import SECCOMP_POLICY, VIRTIO_BALLOON_F_REPORTING, BalloonOptions
from device.config import POISON_VAL_OFFSET
from device.stats import VIRTIO_BALLOON_S_MEMFREE
from tests.driver import MIB, PAGE, BalloonDriver, GuestRam, linux_acks, wait_for

MODES = [pytest.param(False, id="thread"), pytest.param(True, id="jailed")]


_made: list[ProxyBalloon] = []


@pytest.fixture(autouse=True)
def _close_proxies():
    yield
    while _made:
        _made.pop().close()


def make_proxy(ram, jail: bool, **proxy_options):
    proxy = ProxyBalloon(BalloonOptions(free_page_reporting=True),
                         ProxyOptions(jail=jail, **proxy_options))
    _made.append(proxy)
    proxy.ack_features(linux_acks(proxy.device_features))
    driver = BalloonDriver(ram, proxy.queue_names(), proxy.acked_features,
                           write_config=proxy.write_config)
    return proxy, driver


@pytest.fixture(params=MODES)
def proxied(request, ram):
    proxy, driver = make_proxy(ram, request.param)
    proxy.activate([ram.region()], driver.specs())
    yield proxy, driver
    proxy.reset()
    driver.close()


def test_inflate_and_deflate_through_the_worker_free_host_memory(ram, proxied):
    proxy, driver = proxied
    ram.populate()
    proxy.set_target_bytes(16 * MIB)
    driver.inflate(16 * MIB // PAGE, batch=8)
    assert ram.host_bytes() == ram.size - 16 * MIB
    assert proxy.wait_settled(timeout=1).outcome == "settled"
    driver.deflate(8 * MIB // PAGE)
    assert proxy.config.actual == 8 * MIB // PAGE
    counters = proxy.request("state")["counters"]
    assert counters["inflated_pages"] == 16 * MIB // PAGE
    assert counters["deflated_pages"] == 8 * MIB // PAGE


def test_stats_reach_the_parent(proxied):
    proxy, driver = proxied
    driver.send_stats({VIRTIO_BALLOON_S_MEMFREE: 1234})
    wait_for(lambda: proxy.stats.values == {"free_memory": 1234}, what="first stats")
    assert proxy.request_stats()
    driver.refresh_stats({VIRTIO_BALLOON_S_MEMFREE: 4321})
    wait_for(lambda: proxy.stats.values == {"free_memory": 4321}, what="refreshed stats")
    assert proxy.request("state")["counters"]["stats_updates"] == 2


def test_size_requests_are_validated(ram, proxied):
    proxy, _ = proxied
    proxy.set_target_bytes(MIB)
    for bad in (lambda: proxy.set_target_bytes(-1),
                lambda: proxy.set_target_bytes(ram.size + PAGE),
                lambda: proxy.adjust_pages(-(MIB // PAGE) - 1),
                lambda: proxy.adjust_pages(-2**31),
                lambda: proxy.set_target_pages(2**32)):
        with pytest.raises(RequestError):
            bad()
    assert proxy.config.num_pages == MIB // PAGE
    assert proxy.adjust_pages(10) == MIB // PAGE + 10


def test_wait_settled_reports_a_stalled_guest(proxied):
    proxy, _ = proxied
    proxy.set_target_pages(100)
    result = proxy.wait_settled(timeout=5, stall=0.3)
    assert (result.outcome, result.actual_pages) == ("stalled", 0)


def test_garbage_from_the_worker_side_changes_nothing(ram):
    """The parent validates what comes from the worker too: bad datagrams are dropped."""
    proxy, driver = make_proxy(ram, False)
    proxy.activate([ram.region()], driver.specs())
    worker_end = proxy.worker._fd                 # the thread worker's end of the socket
    for garbage in (b"\xc1", b"\x93\x01\x02\x03", encode_event_with_bad_stats(),
                    b"x" * 70000):
        os.write(worker_end, garbage)
    assert proxy.request("ping")["pid"] == os.getpid()
    assert proxy.stats.values == {}
    proxy.reset()
    driver.close()


def encode_event_with_bad_stats() -> bytes:
    return msgpack.packb({"v": 1, "type": "stats_event", "id": 0,
                          "values": {"free_memory": -5}, "updated": 0.0})


def test_kill_returns_state(proxied):
    proxy, driver = proxied
    driver.inflate(256)
    state = proxy.kill()
    assert state["ring_bases"]["inflate"] == 1
    assert proxy.worker is None


@pytest.mark.parametrize("mode", ["log", "kill"])
def test_real_worker_needs_nothing_outside_its_policy(ram, mode):
    """The real worker's whole workload: in log mode nothing is denied, in kill mode it
    survives (device/balloon.policy is as tight as this allows)."""
    proxy, driver = make_proxy(ram, True, seccomp_mode=mode)
    proxy.options = BalloonOptions(free_page_reporting=True, stats_interval=0.01)
    proxy.activate([ram.region()], driver.specs())
    worker = proxy.worker
    ram.populate()
    driver.send_stats({VIRTIO_BALLOON_S_MEMFREE: 1})
    driver.inflate(4096, batch=8)
    driver.deflate(2048, batch=4)
    driver.report([(16 * MIB, 4 * MIB)])
    driver.refresh_stats({VIRTIO_BALLOON_S_MEMFREE: 2})     # the interval handed it back
    wait_for(lambda: proxy.stats.values == {"free_memory": 2}, what="refreshed stats")
    queue = driver.queues["inflate"]                         # a new call fd, taken live
    new_call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    proxy.swap_call_fd(0, new_call)
    os.close(queue.call_fd)
    queue.call_fd = new_call
    wait_for(lambda: select.select([new_call], [], [], 0)[0], what="the new call fd signalled")
    driver.inflate(256)
    assert proxy.worker is worker and proxy.restarts == 0
    queue.add([(queue.scratch, 3)])                          # a bad buffer: logged, counted
    queue.kick()
    driver.wait_used("inflate", 1)
    assert proxy.request("state")["counters"]["bad_buffers"] == 1
    assert proxy.kill()["active"] is True
    assert worker.describe_exit() == "exited with code 0"
    assert worker.denials() == {}
    driver.close()


# -- supervision (jailed workers only: a thread cannot be killed alone) -------------------

@pytest.fixture
def jailed(ram):
    proxy, driver = make_proxy(ram, True)
    proxy.activate([ram.region()], driver.specs())
    yield proxy, driver
    proxy.reset()
    driver.close()


def test_kill_9_mid_inflation_loses_nothing(ram, jailed):
    """Half the inflation done, the other half in flight when the worker is SIGKILLed:
    the inflation completes, every buffer comes back exactly once, actual reaches the
    target, and the restart is counted."""
    proxy, driver = jailed
    ram.populate()
    pages = 32 * MIB // PAGE
    proxy.set_target_pages(pages)
    driver.inflate(pages // 2, batch=16)                  # the first half, acknowledged
    inflate = driver.queues["inflate"]
    pfns = driver.take_pages(pages // 2)
    heads = []
    for k in range(16):                                   # the second half, in flight
        addr = inflate.scratch + k * 1024
        struct.pack_into("<256I", ram.map, addr, *pfns[k * 256:(k + 1) * 256])
        heads.append(inflate.add([(addr, 1024)]))
    victim = proxy.worker.pid
    inflate.kick()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: proxy.restarts == 1 and proxy.state == ACTIVE, what="a replacement worker")
    inflate.kick()
    used = driver.wait_used("inflate", 16)
    assert sorted(head for head, _ in used) == sorted(heads)          # each exactly once
    assert inflate.take_used() == []
    driver.balloon += pfns
    driver.set_actual(pages)
    assert proxy.wait_settled(timeout=1).outcome == "settled"
    assert ram.host_bytes() == ram.size - 32 * MIB
    assert proxy.worker.pid != victim
    assert proxy.last_exit == "killed by signal SIGKILL"


def test_worker_that_cannot_start_is_reported_and_negotiation_kept(ram, tmp_path):
    # A policy without poll(): the worker is killed by seccomp as soon as it waits.
    policy = tmp_path / "no-poll.policy"
    policy.write_text("".join(line + "\n" for line in SECCOMP_POLICY.read_text().splitlines()
                              if not line.startswith("poll")))
    proxy, driver = make_proxy(ram, True, policy=policy)
    acked = proxy.acked_features
    with pytest.raises(WorkerError, match="killed by seccomp"):
        proxy.activate([ram.region()], driver.specs())
    assert proxy.worker is None and proxy.state == "idle"
    assert proxy.acked_features == acked                 # a retry needs no renegotiation
    driver.close()


def test_crash_loop_ends_failed_and_the_device_can_start_again(ram, tmp_path):
    """A worker that dies on every start: one that cannot release pages (madvise denied)
    dies at the first inflate buffer, and each replacement takes the same buffer again."""
    policy = tmp_path / "no-madvise.policy"
    policy.write_text("".join(line + "\n" for line in SECCOMP_POLICY.read_text().splitlines()
                              if not line.startswith("madvise")))
    proxy, driver = make_proxy(ram, True, policy=policy, max_restarts=3, restart_window=60)
    proxy.activate([ram.region()], driver.specs())
    ram.populate()
    queue = driver.queues["inflate"]
    pfns = driver.take_pages(256)
    struct.pack_into("<256I", ram.map, queue.scratch, *pfns)
    queue.add([(queue.scratch, 1024)])
    queue.kick()
    wait_for(lambda: proxy.state == FAILED, timeout=15, what="the failed state")
    assert proxy.restarts == 3
    assert proxy.last_exit == "killed by seccomp (SIGSYS)"
    assert proxy.worker is None
    # An operator (or the VMM's reset) can try again: the state is not stuck.
    proxy.kill()
    proxy.proxy = ProxyOptions(jail=True)
    proxy.activate([ram.region()], driver.specs())
    used = driver.wait_used("inflate", 1)                # the good worker serves it
    assert used[0][0] == 0
    assert ram.host_bytes() == ram.size - MIB
    proxy.reset()
    driver.close()


def test_worker_dying_repeatedly_after_start_ends_failed(ram, jailed):
    proxy, driver = jailed
    proxy.proxy = ProxyOptions(jail=True, max_restarts=2, restart_window=60)
    for _ in range(3):
        pid = wait_for(lambda: proxy.worker is not None and proxy.state == ACTIVE
                       and proxy.worker.pid, what="a worker")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: proxy.worker is None or proxy.worker.pid != pid or proxy.state == FAILED,
                 what="the supervisor to notice")
    wait_for(lambda: proxy.state == FAILED, what="the failed state")
    assert proxy.restarts == 2
    assert "SIGKILL" in proxy.last_exit


def test_worker_dies_with_its_parent(tmp_path):
    """SIGKILL the process that owns the proxy: its jailed worker is gone within a second."""
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_r)
            ram = GuestRam(8 * MIB)
            proxy, _ = make_proxy(ram, True)
            driver = BalloonDriver(ram, proxy.queue_names(), proxy.acked_features,
                                   write_config=proxy.write_config)
            proxy.activate([ram.region()], driver.specs())
            os.write(report_w, str(proxy.worker.pid).encode())
            select.select([], [], [], 30)
        finally:
            os._exit(0)
    os.close(report_w)
    ready = select.select([report_r], [], [], 10)[0]
    assert ready, "the intermediate parent did not start its worker"
    worker = int(os.read(report_r, 32))
    os.close(report_r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    wait_for(lambda: not _alive(worker), timeout=1.0, what="the worker to die with its parent")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("pauses", [1, 8])
def test_stopped_and_continued_worker_keeps_serving(ram, jailed, pauses):
    """Regression (issue 10.4): SIGSTOP/SIGCONT of a worker idle in poll() resumes through
    restart_syscall, which the policy used to deny (SIGSYS: the worker died at every
    pause, and six pauses made the device "failed")."""
    proxy, driver = jailed
    ram.populate()
    pid = proxy.worker.pid
    for _ in range(pauses):
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: _process_state(pid) == "T", what="the worker stopped")
        os.kill(pid, signal.SIGCONT)
        wait_for(lambda: _process_state(pid) != "T", what="the worker continued")
    driver.inflate(1024)
    assert ram.host_bytes() == ram.size - 1024 * PAGE
    assert proxy.worker.pid == pid and proxy.restarts == 0 and proxy.state == ACTIVE


def test_thread_worker_exit_fd_is_closed_only_once_its_thread_ended():
    """Issue 16 defect: the thread-mode worker's exit eventfd leaked when its thread
    outlived the grace period; now it is released only (and always) once the thread ended."""
    import socket as socket_module
    from control.workers import ThreadWorker
    parent, child = socket_module.socketpair(socket_module.AF_UNIX, socket_module.SOCK_SEQPACKET)
    worker = ThreadWorker(child)
    exit_fd = worker.exit_fd()
    worker.release()                                   # still running: nothing closed
    assert os.fstat(exit_fd) is not None
    parent.close()                                     # EOF: the worker ends
    wait_for(lambda: worker.reap() is not None, what="the worker thread ended")
    worker.release()
    assert worker.exit_fd() == -1
    with pytest.raises(OSError):
        os.fstat(exit_fd)
    child.close()


# -- PAGE_POISON reaches the jailed worker (issue 15) ------------------------------------------

def test_the_poison_value_reaches_the_serving_worker_and_every_replacement(ram):
    proxy = ProxyBalloon(BalloonOptions(free_page_reporting=True), ProxyOptions(jail=True))
    _made.append(proxy)
    proxy.ack_features(linux_acks(proxy.device_features, poisons=True))
    driver = BalloonDriver(ram, proxy.queue_names(), proxy.acked_features,
                           write_config=proxy.write_config)
    proxy.activate([ram.region()], driver.specs())
    ram.populate()
    before = ram.host_bytes()
    driver.report([(8 * MIB, 4 * MIB)])
    assert ram.host_bytes() == before                      # not written yet: kept
    # Written after activation (Linux writes it in probe, after the rings exist): 0 is
    # init_on_free, so reports are released from now on.
    proxy.write_config(POISON_VAL_OFFSET, struct.pack("<I", 0))
    driver.report([(16 * MIB, 4 * MIB)])
    assert before - ram.host_bytes() == 4 * MIB
    assert proxy.device.warnings() == []
    victim = proxy.worker.pid
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: proxy.restarts == 1 and proxy.state == ACTIVE, what="a replacement worker")
    driver.report([(24 * MIB, 4 * MIB)])
    assert before - ram.host_bytes() == 8 * MIB            # the replacement knows it too
    # A non-zero value (page_poison=1): reports are kept, and status says why.
    proxy.write_config(POISON_VAL_OFFSET, struct.pack("<I", 0xAAAAAAAA))
    driver.report([(32 * MIB, 4 * MIB)])
    assert before - ram.host_bytes() == 8 * MIB
    wait_for(lambda: proxy.request("state")["counters"]["report_skipped_bytes"] == 4 * MIB,
             what="the kept report counted")
    (warning,) = proxy.device.warnings()
    assert "0xaaaaaaaa" in warning
    driver.close()


def test_a_guest_that_drops_reporting_is_a_warning_in_status(ram):
    proxy = ProxyBalloon(BalloonOptions(free_page_reporting=True, page_poison=False),
                         ProxyOptions(jail=False))
    _made.append(proxy)
    # A guest booted with init_on_free=1, offered no PAGE_POISON: Linux clears REPORTING.
    proxy.ack_features(proxy.device_features & ~(1 << VIRTIO_BALLOON_F_REPORTING))
    (warning,) = proxy.device.warnings()
    assert "did not accept it" in warning and "--no-page-poison" in warning


# -- kicks that carry nothing -----------------------------------------------------------------

def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` (schedstat), in ns."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def test_a_kick_flood_costs_the_host_a_bounded_number_of_wakeups_and_delays_no_buffer(ram, proxied):
    """A guest kicking the inflate queue in a loop with nothing in it: the worker wakes for
    empty kicks at most 1000 times a second (plus a burst of 100), so the flood costs the
    host under 1 % of a CPU; a buffer made available in the middle of it is still served."""
    import threading
    import time
    from device.kicks import EMPTY_KICK_BURST, EMPTY_KICKS_PER_SECOND
    proxy, driver = proxied
    ram.populate()
    inflate = driver.queues["inflate"]
    worker_pid = proxy.worker.pid if proxy.proxy.jail else None
    stop, sent = threading.Event(), [0]

    def flood() -> None:
        while not stop.is_set():
            inflate.kick()
            sent[0] += 1
    before = proxy.request("state")["counters"]
    cpu0 = _cpu_ns(worker_pid) if worker_pid else 0
    thread = threading.Thread(target=flood, daemon=True)
    start = time.monotonic()
    thread.start()
    try:
        time.sleep(0.5)
        driver.inflate(256)                          # 1 MiB, kicked among the flood
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    elapsed = time.monotonic() - start
    cpu = (_cpu_ns(worker_pid) - cpu0) / 1e9 if worker_pid else None
    assert ram.host_bytes() == ram.size - MIB               # the buffer was served
    counters = wait_for(lambda: _moved(proxy, before), what="the counters")
    empty = counters["empty_kicks"] - before["empty_kicks"]
    assert sent[0] > 20 * empty > 0, (sent[0], empty)  # kicks merged and paused, not each a wake
    assert empty <= EMPTY_KICKS_PER_SECOND * (elapsed + 0.1) + EMPTY_KICK_BURST
    assert counters["kick_pauses"] > before["kick_pauses"]
    if cpu is not None:
        assert cpu < 0.1 * elapsed, f"the worker used {cpu:.3f} s of CPU in {elapsed:.2f} s"


def _moved(proxy, before: dict) -> dict | None:
    counters = proxy.request("state")["counters"]
    return counters if counters["kick_pauses"] > before["kick_pauses"] else None


def test_a_kick_fd_that_hangs_up_is_dropped_and_its_queue_served_on_other_kicks(ram, tmp_path):
    """A front-end may pass any fd as a kick fd; one whose writer closed is readable for
    ever (end of file). The worker stops watching it instead of spinning on it, and looks at
    that queue whenever another queue is kicked, so its buffers are not stranded."""
    import socket
    import time
    proxy, driver = make_proxy(ram, True)
    ours, theirs = socket.socketpair()
    specs = driver.specs()
    specs[0] = type(specs[0])(specs[0].config, theirs.fileno(), specs[0].call_fd)
    proxy.activate([ram.region()], specs)
    theirs.close()
    try:
        ours.close()                                   # the inflate queue's kicker is gone
        pid = proxy.worker.pid
        time.sleep(0.2)
        cpu0 = _cpu_ns(pid)
        time.sleep(0.5)
        assert _cpu_ns(pid) - cpu0 < 50_000_000        # idle, not spinning on end of file
        ram.populate()
        inflate = driver.queues["inflate"]
        pfns = driver.take_pages(256)
        struct.pack_into("<256I", ram.map, inflate.scratch, *pfns)
        inflate.add([(inflate.scratch, 1024)])           # its kick would go nowhere
        driver.send_stats({VIRTIO_BALLOON_S_MEMFREE: 1})  # another queue's kick
        wait_for(lambda: proxy.stats.values == {"free_memory": 1}, what="stats")
        assert len(driver.wait_used("inflate", 1)) == 1
        assert ram.host_bytes() == ram.size - MIB
        assert proxy.worker.pid == pid and proxy.state == ACTIVE
    finally:
        proxy.reset()
        driver.close()
