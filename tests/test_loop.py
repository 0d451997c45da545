"""The event loop: timers only while pending, re-watching is free, and a callback's bug
stays that callback's."""

from __future__ import annotations

import select
import socket
import threading

import pytest

from control.loop import EventLoop


@pytest.fixture
def loop():
    loop = EventLoop()
    yield loop
    loop.close()


def test_an_idle_loop_has_no_timeout(loop):
    assert loop.next_timeout() is None
    timer = loop.call_later(5, lambda: None)
    assert 0 < loop.next_timeout() <= 5
    timer.cancel()
    assert loop.next_timeout() is None


def test_a_failing_callback_does_not_stop_the_others(loop, caplog):
    ran = []
    loop.call_later(0, lambda: 1 / 0)
    loop.call_later(0, lambda: ran.append("timer"))
    a, b = socket.socketpair()
    loop.watch(a, reader=lambda: (_ for _ in ()).throw(RuntimeError("reader bug")))
    b.send(b"x")
    with caplog.at_level("ERROR", logger="vballoon.loop"):
        loop.run_once(0.5)
    assert ran == ["timer"]
    assert sum("unexpected error" in r.getMessage() for r in caplog.records) == 2
    loop.unwatch(a)
    a.close()
    b.close()


def test_watching_again_with_the_same_callbacks_changes_nothing(loop):
    a, b = socket.socketpair()
    reader = lambda: None  # noqa: E731
    loop.watch(a, reader=reader)
    registration = loop.registration(a)
    loop.watch(a, reader=reader)
    assert loop.registration(a) is registration        # not re-registered
    loop.watch(a, reader=reader, writer=reader)
    assert loop.registration(a).events == select.EPOLLIN | select.EPOLLOUT
    loop.unwatch(a)
    assert not loop.watching(a)
    a.close()
    b.close()


def test_call_sync_runs_in_the_loop_thread_and_returns_or_raises(loop):
    running = [True]
    thread = threading.Thread(target=loop.run_forever, args=(lambda: running[0],), daemon=True)
    loop.thread = thread
    thread.start()
    assert loop.call_sync(threading.current_thread) is thread
    with pytest.raises(ZeroDivisionError):
        loop.call_sync(lambda: 1 / 0)

    def stop():
        running[0] = False
    loop.call_soon_threadsafe(stop)
    thread.join(5)
    assert not thread.is_alive()


def test_a_timeout_already_past_does_not_wait(loop):
    """epoll reads a negative timeout as "for ever": a deadline already past polls once."""
    import time
    start = time.monotonic()
    loop.run_once(-0.5)
    assert time.monotonic() - start < 1.0
