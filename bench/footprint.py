"""Footprint: the worker's and the parent's unique memory.

USS (unique set size) is Private_Clean + Private_Dirty. ``smaps_rollup`` gives only the
sums, and there the guest memory mapping hides in plain sight: whether a page of a
MAP_SHARED mapping counts as Private_* or Shared_* depends only on how many processes have
it mapped right now, not on the mapping being shared. A guest page that the VMM (here: the
fake driver in this process; with a real guest: UML) also maps is Shared_*; one that only
the worker maps would count as the worker's private memory although it is guest RAM. So the
worker's USS is read per mapping from ``smaps`` and reported with and without the guest
memory mapping (found by the memfd's device and inode).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from bench.results import Report, fmt
from bench.system import MIB, Footprint, footprint, process_name, smaps_rollup
from bench.guestmem import FakeGuest
from bench.throughput import BATCH, CONTIGUOUS, ModeUnavailable, pfns_for, start_rig
from device.balloon import INFLATE_QUEUE

HEADERS = ["process", "mode", "USS MiB", "USS excl. guest memory MiB", "PSS MiB", "RSS MiB",
           "guest mapping RSS MiB (shared / private)", "smaps_rollup Private / Shared MiB"]


def footprint_table(report: Report):
    for table in report.tables:
        if table.title.startswith("4."):
            return table
    table = report.table("4. Footprint (after inflating)", HEADERS)
    table.notes.append(
        "USS = Private_Clean + Private_Dirty (smaps). Guest memory is a MAP_SHARED file "
        "mapping; its pages count as Shared_* only while another process (the VMM: UML, or "
        "the helper holding the fake guest's RAM) maps them too, and smaps_rollup cannot "
        "tell them apart, so the guest mapping is subtracted per mapping (found by device "
        "and inode). The worker's pages still shared copy-on-write with `serve` since the "
        "fork are Shared_* too: not in its USS, split in its PSS.")
    return table


def add_row(report: Report, label: str, mode: str, fp: Footprint, placement: str,
            context: str) -> None:
    rollup = {}
    try:
        rollup = smaps_rollup(fp.pid)
    except OSError:
        pass
    private = rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    shared = rollup.get("Shared_Clean", 0) + rollup.get("Shared_Dirty", 0)
    footprint_table(report).rows.append([
        label, mode, fmt(fp.uss / MIB, 2), fmt(fp.uss_excluding_guest / MIB, 2),
        fmt(fp.pss / MIB, 2), fmt(fp.rss / MIB, 2),
        f"{fmt(fp.guest_shared / MIB, 2)} / {fmt(fp.guest_private / MIB, 2)}"
        + ("" if fp.guest_mappings else " (not mapped)"),
        f"{fmt(private / MIB, 2)} / {fmt(shared / MIB, 2)}"])
    conds = dict(mode=mode, placement=placement, runs=1, process=label, context=context)
    report.add("uss", fp.uss / MIB, "MiB", **conds)
    report.add("uss_excluding_guest_memory", fp.uss_excluding_guest / MIB, "MiB", **conds)
    report.add("pss", fp.pss / MIB, "MiB", **conds)
    report.add("rss", fp.rss / MIB, "MiB", **conds)
    report.add("guest_mapping_rss", fp.guest_rss / MIB, "MiB", **conds)


def run_device_footprint(report: Report, size: int, placement: str,
                         log: Callable[[str], None]) -> None:
    """The jailed worker after inflating all of a populated fake guest."""
    guest = FakeGuest(size, "bench-footprint")
    ram = guest.ram
    try:
        try:
            rig = start_rig(ram, "jailed")
        except ModeUnavailable as exc:
            footprint_table(report).rows.append(
                ["jailed worker (fake driver)", "jailed", f"skipped: {exc}"] + ["-"] * 5)
            report.add("uss_excluding_guest_memory", None, "MiB", mode="jailed", runs=0,
                       placement=placement, process="worker", context="fake driver",
                       note=f"skipped: {exc}")
            return
        try:
            pfns = pfns_for(CONTIGUOUS, ram)
            rig.driver.send_pfns(INFLATE_QUEUE, pfns, BATCH)
            st = os.fstat(ram.fd)
            for pid in rig.worker_pids:
                fp = footprint(pid, [(st.st_dev, st.st_ino)])
                add_row(report, f"jailed {process_name(pid)} (fake driver, {size // MIB} MiB "
                        "inflated)", "jailed", fp, placement, "fake driver")
        finally:
            rig.close()
    finally:
        guest.close()

