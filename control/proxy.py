"""A balloon whose queues a jailed worker serves, with a blocking API for embedding.

``ProxyBalloon`` has the interface of ``device.balloon.Balloon`` (features, config space,
target, activate, reset, snapshot), so a VMM cannot tell them apart. It is a thin shell: the
device is a ``control.vmdevice.VmDevice`` driven by an ``EventLoop`` that runs in a thread of
its own, and every call is carried out in that thread (``EventLoop.call_sync``), so nothing
is shared between threads. Blocking calls (``activate``, ``kill``, ``reset``, ``request``,
``wait_settled``) wait here, in the caller's thread, never in the loop.

``vballoon serve`` does not use this shell: its one loop drives every ``VmDevice`` directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from control.errors import WorkerError
from control.loop import EventLoop
from control.supervisor import (ACTIVE, FAILED, IDLE, RESTARTING, UNRESPONSIVE,  # noqa: F401
                                ProxyOptions)
from control.vmdevice import SettleResult, SettleWatch, VmDevice  # noqa: F401 (re-exported)
from device.balloon import BalloonOptions, QueueSpec
from device.command import SIMPLE_REQUESTS
from device.memory import MemoryRegion

__all__ = ["ProxyBalloon", "ProxyOptions", "SettleResult", "SettleWatch",
           "ACTIVE", "FAILED", "IDLE", "RESTARTING", "UNRESPONSIVE"]


class ProxyBalloon:
    """The balloon device, its queues served by a jailed child (see the module docstring).

    Size requests raise ``RequestError``; worker failures ``WorkerError``. ``close()`` ends
    the worker and the loop thread.
    """

    def __init__(self, options: BalloonOptions = BalloonOptions(),
                 proxy: ProxyOptions = ProxyOptions(),
                 on_config_change: Callable[[], None] | None = None) -> None:
        self._proxy = proxy
        self.loop = EventLoop()
        self.device = VmDevice(self.loop, options, proxy)
        if on_config_change is not None:
            self.device.on_config_change = on_config_change
        self._changed = threading.Condition()
        self.device.listeners.append(self._notify)
        self._running = True
        # PDEATHSIG follows the forking thread: the loop thread forks the workers, and it
        # lives as long as this object.
        self._thread = threading.Thread(target=self.loop.run_forever, args=(lambda: self._running,),
                                        name="vballoon-loop", daemon=True)
        self.loop.thread = self._thread
        self._thread.start()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _call(self, function: Callable[[], Any]) -> Any:
        return self.loop.call_sync(function, timeout=self.proxy.request_timeout * 4)

    def _wait(self, operation: Callable[[Callable[[Any], None]], None], timeout: float) -> Any:
        """Start ``operation(done)`` in the loop and wait (here) for what ``done`` gets."""
        finished = threading.Event()
        box: list = []

        def done(result: Any) -> None:
            box.append(result)
            finished.set()
        self.loop.call_soon_threadsafe(lambda: operation(done))
        if not finished.wait(timeout):
            raise WorkerError("the device did not answer in time")
        return box[0]

    # -- the Balloon interface -------------------------------------------------------------

    @property
    def proxy(self) -> ProxyOptions:
        return self._proxy

    @proxy.setter
    def proxy(self, value: ProxyOptions) -> None:
        """New worker options, for the workers started from now on."""
        self._proxy = value
        self.device.proxy = value
        self.device.supervisor.options = value

    @property
    def options(self) -> BalloonOptions:
        return self.device.options

    @options.setter
    def options(self, value: BalloonOptions) -> None:
        self.device.options = value         # what the next activation uses

    @property
    def config(self):
        return self.device.config

    @property
    def acked_features(self) -> int:
        return self.device.acked_features

    @property
    def device_features(self) -> int:
        return self.device.device_features

    @property
    def guest_pages(self) -> int | None:
        return self.device.guest_pages

    @property
    def state(self) -> str:
        return self.device.state

    @property
    def worker(self):
        return self.device.worker

    @property
    def restarts(self) -> int:
        return self.device.restarts

    @property
    def last_exit(self) -> str | None:
        return self.device.last_exit

    @property
    def stats(self):
        return self.device.stats

    def is_active(self) -> bool:
        return self.device.is_active()

    def queue_names(self) -> tuple[str, ...]:
        return self.device.queue_names()

    def ack_features(self, features: int) -> None:
        self._call(lambda: self.device.ack_features(features))

    def read_config(self, offset: int, length: int) -> bytes:
        return self._call(lambda: self.device.read_config(offset, length))

    def write_config(self, offset: int, data: bytes) -> None:
        self._call(lambda: self.device.write_config(offset, data))

    def set_target_pages(self, pages: int) -> None:
        self._call(lambda: self.device.set_target_pages(pages))

    def set_target_bytes(self, size: int) -> int:
        return self._call(lambda: self.device.set_target_bytes(size))

    def adjust_pages(self, delta: int) -> int:
        return self._call(lambda: self.device.adjust_pages(delta))

    def activate(self, regions: list[MemoryRegion], queues: list[QueueSpec]) -> None:
        """Fork the jailed worker and start serving; raises ``WorkerError`` (or
        ``RequestError`` for a bad request) if it cannot. On failure nothing keeps running."""
        error = self._wait(lambda done: self.device.activate(regions, queues, done),
                           self.proxy.request_timeout * 2 + 10)
        if error is not None:
            raise error

    def kill(self) -> dict:
        """Graceful stop: the worker replies with its state and exits; SIGKILL if it won't."""
        return self._wait(self.device.stop, self.proxy.kill_grace * 3 + 10)

    def reset(self) -> dict:
        """Stop the worker and go back to idle, negotiation forgotten; returns its state."""
        return self._wait(self.device.reset, self.proxy.kill_grace * 3 + 10)

    def swap_call_fd(self, index: int, fd: int) -> None:
        """The VMM has a new call fd for queue ``index``: the serving worker signals it from
        now on (no restart); ``fd`` stays the caller's. Raises ``WorkerError``."""
        result = self._wait(lambda done: self.device.swap_call_fd(index, fd, done),
                            self.proxy.request_timeout + 5)
        if result is not None:
            raise result

    def snapshot(self) -> dict:
        return {**self._call(self.device.model.snapshot), "stats": asdict(self.device.stats),
                "restarts": self.device.restarts}

    def denials(self) -> dict[str, int] | None:
        return self._call(self.device.denials)

    def counters(self) -> dict[str, int]:
        return self._call(self.device.counters)

    def kick_fds(self) -> dict[int, str]:
        return {}     # the worker watches them

    def close(self) -> None:
        """End the worker at once and stop the loop thread."""
        if not self._running:
            return
        self._call(self.device.terminate)

        def stop() -> None:
            self._running = False
        self.loop.call_soon_threadsafe(stop)
        self._thread.join(10)
        self.loop.close()

    # -- talking to the worker -----------------------------------------------------------------

    def request(self, kind: str, timeout: float | None = None) -> dict:
        """Ask the worker (``"state"``, ``"stats"``, ``"ping"``, ``"kill"``) and wait for
        its reply; raises ``WorkerError``."""
        limit = self.proxy.request_timeout if timeout is None else timeout
        message = SIMPLE_REQUESTS[kind]()
        result = self._wait(lambda done: self.device.supervisor.request(message, done, timeout),
                            limit + 5)
        if isinstance(result, Exception):
            raise result if isinstance(result, WorkerError) else WorkerError(str(result))
        return result

    def request_stats(self, wait: bool = True) -> bool:
        """Ask the worker to hand the stats buffer back so the guest refreshes it; with
        ``wait`` False the request is sent and not waited for ("asked", not "done")."""
        if not wait:
            return self._call(self.device.request_stats)
        return bool(self.request("stats").get("requested"))

    def wait_settled(self, timeout: float, stall: float = 5.0,
                     progress: Callable[[int, int], None] | None = None) -> SettleResult:
        """Wait until ``actual == target``, or ``actual`` has not moved for ``stall`` seconds
        (the guest stopped making progress), or ``timeout``; says which."""
        watch = self.device.settle_watch(timeout, stall)
        with self._changed:
            while True:
                target, actual = self.config.num_pages, self.config.actual
                if progress:
                    progress(actual, target)
                now = time.monotonic()
                outcome = watch.check(actual, target, now)
                if outcome is not None:
                    return SettleResult(outcome, target, actual)
                self._changed.wait(min(watch.deadline - now, watch.last_move + stall - now, 0.2))
