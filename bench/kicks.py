"""What a kick costs the worker when it brings nothing: a guest (or anyone holding the kick
fd) writing the inflate queue's eventfd in a loop with an empty ring.

Paced: one kick every 2 ms, below the empty-kick budget, so that each one wakes the worker; the worker
counts the wake-ups that found nothing (``counters.empty_kicks``), and its CPU time over the
run divided by that count is the cost of one. Unpaced: kicks as fast as one CPU writes
them, from the CPU the worker is not on, the worker's CPU per second of flood set beside its
CPU per second inflating for real (one 256-PFN buffer per kick, as Linux sends them): the
empty-kick budget (``device.kicks``) must keep the flood far below that.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from bench.guestmem import FakeGuest
from bench.results import Report, fmt
from bench.system import pinned
from bench.throughput import ModeUnavailable, start_rig
from device.balloon import INFLATE_QUEUE

HEADERS = ["mode", "kicks sent", "worker woke", "worker CPU ms", "µs per kick"]
PACE = 2e-3        # 500 kicks a second: below the empty-kick budget, each one a wake-up
FLOOD_HEADERS = ["mode", "what the guest does", "kicks sent", "empty wake-ups", "pauses",
                 "worker CPU ms per s"]


@contextlib.contextmanager
def _rig(mode: str, size: int) -> Iterator[tuple[FakeGuest, object]]:
    """A fake guest of ``size`` bytes and a device of ``mode`` over it, both closed after.
    Raises ModeUnavailable."""
    guest = FakeGuest(size)
    try:
        rig = start_rig(guest.ram, mode)
        try:
            yield guest, rig
        finally:
            rig.close()
    finally:
        guest.close()


def run_kick_flood(report: Report, seconds: float, placement: str,
                   log: Callable[[str], None], other_cpu: int | None = None) -> None:
    _paced(report, seconds, placement, log)
    if other_cpu is not None:
        _unpaced(report, seconds, other_cpu, log)


def _paced(report: Report, seconds: float, placement: str,
           log: Callable[[str], None]) -> None:
    table = report.table("6. Empty-kick flood (worker CPU per kick, empty ring)", HEADERS)
    table.notes.append("Kicks are eventfd writes on the inflate queue with nothing in its "
                       "ring, paced 2 ms apart (under the budget of 1000 empty wake-ups a "
                       "second, so each is a wake-up; the pause between them leaves caches "
                       "as cold as a guest would); CPU per empty wake-up the worker counted.")
    for mode in ("jailed", "thread"):
        try:
            with _rig(mode, 64 << 20) as (_, rig):
                kick_fd = rig.driver.queues[INFLATE_QUEUE].kick_fd
                one = (1).to_bytes(8, "little")
                before = rig.worker_cpu_ns()
                kicks_before = rig.device.counters().get("empty_kicks", 0)
                sent, end = 0, time.monotonic() + seconds
                while time.monotonic() < end:
                    os.write(kick_fd, one)
                    sent += 1
                    pause = time.monotonic() + PACE
                    while time.monotonic() < pause:
                        pass
                time.sleep(0.3)                       # the worker reports its counters
                woke = rig.device.counters().get("empty_kicks", 0) - kicks_before
                cpu = (rig.worker_cpu_ns() or 0) - (before or 0)
        except ModeUnavailable as exc:
            log(f"kick flood, {mode}: unavailable ({exc})")
            table.rows.append([mode, "-", "-", "-", "unavailable"])
            continue
        per_kick = cpu / 1000 / woke if woke else None
        log(f"kick flood, {mode}: {sent} sent, {woke} woke the worker, "
            f"{cpu / 1e6:.1f} ms worker CPU, {per_kick and round(per_kick, 1)} µs per kick")
        table.rows.append([mode, str(sent), str(woke), fmt(cpu / 1e6, 1), fmt(per_kick, 1)])
        report.add("empty_kick_worker_cpu", per_kick, "µs/kick", mode=mode, placement=placement,
                   runs=1, kicks_sent=sent, kicks_handled=woke)


def _unpaced(report: Report, seconds: float, other_cpu: int,
             log: Callable[[str], None]) -> None:
    table = report.table("6b. Empty-kick flood, unpaced, beside inflating for real",
                         FLOOD_HEADERS)
    table.notes.append(f"The flood and the fake driver run on CPU {other_cpu}, the worker on "
                       "the device CPU. Inflating: 448 MiB of populated memory, one 256-PFN "
                       "buffer per kick. Goal: a flood costs the host less than inflating.")
    one = (1).to_bytes(8, "little")
    for mode in ("jailed", "thread"):
        try:
            with _rig(mode, 512 << 20) as (guest, rig):
                queue = rig.driver.queues[INFLATE_QUEUE]
                counters0 = rig.device.counters()
                cpu0 = rig.worker_cpu_ns() or 0
                sent = 0
                with pinned({other_cpu}):
                    start = time.monotonic()
                    end = start + seconds
                    while time.monotonic() < end:
                        for _ in range(100):
                            os.write(queue.kick_fd, one)
                        sent += 100
                    flood_s = time.monotonic() - start
                flood_cpu = ((rig.worker_cpu_ns() or 0) - cpu0) / 1e6 / flood_s
                time.sleep(0.3)                       # the worker reports its counters
                counters1 = rig.device.counters()
                guest.populate()
                pfns = rig.driver.take_pages(448 * 256)
                cpu1 = rig.worker_cpu_ns() or 0
                with pinned({other_cpu}):
                    start = time.monotonic()
                    rig.driver.send_pfns(INFLATE_QUEUE, pfns, 1)
                    inflate_s = time.monotonic() - start
                inflate_cpu = ((rig.worker_cpu_ns() or 0) - cpu1) / 1e6 / inflate_s
        except ModeUnavailable as exc:
            table.rows.append([mode, "-", "-", "-", "-", f"unavailable ({exc})"])
            continue
        empty = counters1.get("empty_kicks", 0) - counters0.get("empty_kicks", 0)
        pauses = counters1.get("kick_pauses", 0) - counters0.get("kick_pauses", 0)
        log(f"unpaced kick flood, {mode}: {sent} sent, {empty} empty wake-ups, {pauses} "
            f"pauses, {flood_cpu:.1f} ms/s; inflating {inflate_cpu:.1f} ms/s")
        table.rows.append([mode, "kicks with an empty ring, unpaced", str(sent), str(empty),
                           str(pauses), fmt(flood_cpu, 1)])
        table.rows.append([mode, "inflates for real", "-", "-", "-", fmt(inflate_cpu, 1)])
        report.add("kick_flood_worker_cpu", flood_cpu, "ms/s", mode=mode, runs=1,
                   kicks_sent=sent, empty_wakeups=empty, pauses=pauses,
                   inflating_ms_per_s=inflate_cpu)
        if mode == "jailed":
            report.goal("a kick flood costs the host less than inflating for real",
                        f"{flood_cpu:.1f} vs {inflate_cpu:.0f} ms of worker CPU per second",
                        flood_cpu < inflate_cpu)
