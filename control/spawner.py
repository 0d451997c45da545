"""Worker spawns off the serve loop: a jail's set-up (fork, namespaces, handshake: ~5-15 ms)
runs on one long-lived thread, so one VM's restarting worker never delays another VM's
replies (issue 12.3). The result comes back to the loop as a callback.

The thread lives as long as the process. Workers die with whoever forked them into their
jail (the zygote, or ``serve`` itself): their parent-death signal is armed once they are
that process's children (see ``sandbox._child``), not tied to this thread.

The fds a spawn hands to the worker are duplicated on the loop before the job is queued
(``Job.keep``) and closed by the job: the device may close its own copies meanwhile (a
front-end that disconnects), and a number reused by then must never reach a worker.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from control.loop import EventLoop


class Job:
    """One spawn: ``run()`` on the spawner thread, ``done(result)`` on the loop, where result
    is what ``run`` returned or the exception it raised."""

    def __init__(self, run: Callable[[], Any], loop: EventLoop, done: Callable[[Any], None],
                 owned_fds: list[int]) -> None:
        self.run = run
        self.loop = loop
        self.done = done
        self.owned_fds = owned_fds        # closed once ``run`` returned
        self.result: Any = None
        self.cancelled = False            # set before it runs: it is skipped


class Spawner:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """Fresh state: at start, and in a forked child (which has no spawner thread)."""
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="vballoon-spawner",
                                                daemon=True)
                self._thread.start()
        self._jobs.put(job)
        return job

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if not job.cancelled:
                    job.result = job.run()
            except BaseException as exc:        # noqa: BLE001 - handed to the loop as the result
                job.result = exc
            finally:
                for fd in job.owned_fds:
                    os.close(fd)
            job.loop.call_soon_threadsafe(lambda job=job: job.done(job.result))


SPAWNER = Spawner()
os.register_at_fork(after_in_child=SPAWNER._reset)
