"""Giving guest pages back to the host, region by region, in whole backing pages.

On memfd/tmpfs a page is 4 KiB and every ballooned page is released at once. On hugetlbfs
a backing page is 2 MiB (or 1 GiB): punching a hole smaller than that "succeeds" and frees
nothing, so small pages are collected per huge page and the huge page is released only once
every small page in it is in the balloon. Deflating a page takes it out of that collection.

Pages outside guest memory are skipped and counted, never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from device.memory import SMALL_PAGE, GuestMemory

PFN_SHIFT = 12


@dataclass
class ReleaseCounters:
    released_pages: int = 0      # 4 KiB pages whose backing was freed
    pending_pages: int = 0       # 4 KiB pages waiting for the rest of their huge page
    skipped_pages: int = 0       # PFNs outside guest memory


@dataclass
class PageReleaser:
    """Releases PFN ranges from ``memory``; keeps partial huge pages until complete."""

    memory: GuestMemory
    counters: ReleaseCounters = field(default_factory=ReleaseCounters)
    # huge page guest address -> small PFNs of it currently in the balloon
    _partial: dict[int, set[int]] = field(default_factory=dict)

    def release_pfns(self, ranges: list[tuple[int, int]]) -> None:
        """Release every page in ``ranges`` (``(first_pfn, count)``, as ``compact_pfns`` gives)."""
        for first, count in ranges:
            self.release_bytes(first << PFN_SHIFT, count << PFN_SHIFT)

    def release_bytes(self, addr: int, length: int) -> None:
        """Release the whole pages in ``[addr, addr+length)``; partial pages are ignored."""
        start = -(-addr // SMALL_PAGE) * SMALL_PAGE
        end = (addr + length) // SMALL_PAGE * SMALL_PAGE
        if end <= start:
            return
        covered = 0
        for region in self.memory.regions:
            lo, hi = max(start, region.guest_addr), min(end, region.end)
            if lo >= hi:
                continue
            covered += hi - lo
            if region.page_size == SMALL_PAGE:
                self.memory.remove(lo, hi - lo)
                self.counters.released_pages += (hi - lo) // SMALL_PAGE
            else:
                self._release_huge(lo, hi, region.page_size)
        self.counters.skipped_pages += (end - start - covered) // SMALL_PAGE

    def _release_huge(self, lo: int, hi: int, huge: int) -> None:
        whole_lo = -(-lo // huge) * huge
        whole_hi = hi // huge * huge
        if whole_lo < whole_hi:
            self.memory.remove(whole_lo, whole_hi - whole_lo)
            self.counters.released_pages += (whole_hi - whole_lo) // SMALL_PAGE
            for base in range(whole_lo, whole_hi, huge):
                self._drop_partial(base)
            self._collect(lo, min(hi, whole_lo), huge)
            self._collect(max(lo, whole_hi), hi, huge)
        else:
            self._collect(lo, hi, huge)

    def _collect(self, lo: int, hi: int, huge: int) -> None:
        """Note ``[lo, hi)`` as ballooned; release each huge page it completes."""
        while lo < hi:
            # One huge page at a time: a range may straddle a huge-page boundary.
            end = min(hi, (lo // huge + 1) * huge)
            self._collect_one(lo, end, huge)
            lo = end

    def _collect_one(self, lo: int, hi: int, huge: int) -> None:
        base = lo // huge * huge
        pages = self._partial.setdefault(base, set())
        before = len(pages)
        pages.update(range(lo >> PFN_SHIFT, hi >> PFN_SHIFT))
        self.counters.pending_pages += len(pages) - before
        if len(pages) == huge // SMALL_PAGE:
            self._drop_partial(base)
            self.memory.remove(base, huge)
            self.counters.released_pages += huge // SMALL_PAGE

    def _drop_partial(self, base: int) -> None:
        pages = self._partial.pop(base, None)
        if pages:
            self.counters.pending_pages -= len(pages)

    def reclaim_pfns(self, ranges: list[tuple[int, int]]) -> None:
        """The guest took these pages back (deflate): forget them in partial huge pages."""
        if not self._partial:
            return
        for first, count in ranges:
            for pfn in range(first, first + count):
                addr = pfn << PFN_SHIFT
                for region in self.memory.regions:
                    if region.guest_addr <= addr < region.end:
                        self._forget(addr // region.page_size * region.page_size, pfn)
                        break

    def _forget(self, base: int, pfn: int) -> None:
        pages = self._partial.get(base)
        if pages is not None and pfn in pages:
            pages.discard(pfn)
            self.counters.pending_pages -= 1
            if not pages:
                del self._partial[base]
