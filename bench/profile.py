"""Where the device spends its time: ``python -m bench.run --profile``.

The in-process device runs the same queue code as the worker (``BalloonQueues.process``),
synchronously in this thread, so pyinstrument sees every frame of it. When py-spy is
installed, the worker loop itself (``device.worker``, as a thread) is sampled from outside
as well, which shows the loop and the syscalls in their true proportions.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.guestmem import FakeGuest
from bench.throughput import BATCH, CONTIGUOUS, SCATTERED, pfns_for, start_rig
from device.balloon import INFLATE_QUEUE


def profile_inprocess(size: int, out: Path) -> str:
    """pyinstrument text profiles of in-process inflation, contiguous and scattered."""
    from pyinstrument import Profiler

    sections = []
    guest = FakeGuest(size, "bench-profile")
    ram = guest.ram
    try:
        for pattern in (CONTIGUOUS, SCATTERED):
            rig = start_rig(ram, "in-process")
            try:
                pfns = pfns_for(pattern, ram)
                guest.populate()
                profiler = Profiler(interval=0.0002)
                profiler.start()
                rig.driver.send_pfns(INFLATE_QUEUE, pfns, BATCH)
                profiler.stop()
            finally:
                rig.close()
            sections.append(f"==== in-process, {pattern} PFNs, {size >> 20} MiB ====\n"
                            + profiler.output_text(unicode=True, color=False, show_all=False))
    finally:
        guest.close()
    text = ("pyinstrument samples through a hook run on every Python call: pure-Python frames "
            "look about twice as expensive as they are next to syscalls; profile-worker-*.txt "
            "(py-spy, sampling from outside) have the true proportions.\n\n"
            + "\n".join(sections))
    out.write_text(text)
    return text


def profile_worker(size: int, rounds: int, batch: int, out: Path) -> str | None:
    """py-spy samples of the worker thread over ``rounds`` inflations; None without py-spy.

    The thread worker runs the jailed worker's code (``device.worker``). The jailed one
    cannot be sampled from outside: py-spy reads the interpreter's binary through
    ``/proc/<pid>/root``, which is the jail's empty root.
    """
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        return None
    raw = out.with_suffix(".collapsed")
    guest = FakeGuest(size, "bench-profile-worker")
    try:
        rig = start_rig(guest.ram, "thread")
        try:
            spy = subprocess.Popen([pyspy, "record", "--pid", str(os.getpid()), "--threads",
                                    "--rate", "1000", "--format", "raw", "--output", str(raw),
                                    "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)      # py-spy attaches asynchronously; nothing to poll for
                pfns = pfns_for(CONTIGUOUS, guest.ram)
                for _ in range(rounds):
                    guest.populate()
                    rig.driver.send_pfns(INFLATE_QUEUE, pfns, batch)
            finally:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(20)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
        finally:
            rig.close()
    finally:
        guest.close()
    if not raw.exists():
        return None
    idle = _idle_frame()
    busy = [line for line in raw.read_text().splitlines()
            if line.startswith("thread (") and ": vballoon-worker;" in line
            and not line.rpartition(" ")[0].endswith(idle)]
    text = (f"py-spy samples of the worker thread (the jailed worker's code, unjailed) over "
            f"{rounds} inflations of {size >> 20} MiB, {batch} buffer(s) per kick; samples "
            f"blocked in the loop's poll ({idle}) left out.\n\n"
            + summarize_collapsed("\n".join(busy)))
    out.write_text(text)
    return text


def _idle_frame() -> str:
    """py-spy's name for the worker loop's wait (it counts a thread in poll as active)."""
    import inspect

    from device import worker
    lines, first = inspect.getsourcelines(worker.Worker.run)
    for offset, line in enumerate(lines):
        if ".poll(" in line:
            return f"Worker.run (device/worker.py:{first + offset})"
    return "Worker.run (device/worker.py:?)"


def summarize_collapsed(collapsed: str, top: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "self %  function"]
    lines += [f"{100 * n / total:5.1f}  {f}" for f, n in own.most_common(top)]
    lines += ["", "incl %  function"]
    lines += [f"{100 * n / total:5.1f}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"
