"""Giving guest pages back to the host, region by region, in whole backing pages.

On memfd/tmpfs a page is 4 KiB and every ballooned page is released at once. On hugetlbfs
a backing page is 2 MiB (or 1 GiB): punching a hole smaller than that "succeeds" and frees
nothing. Two paths, with different promises:

- **Inflate** (``release_pfns``): the pages stay the host's until the guest deflates them,
  so small pages are collected per huge page (a bitmap each) and the huge page is released
  once every small page in it is in the balloon. Deflating (``reclaim_pfns``) takes pages
  out of the collection.
- **Free page reports** (``release_report``): a reported page is the guest's again the
  moment the buffer is returned (there is no deflate for a report), so a report releases
  only the whole huge pages lying inside that one report and leaves no trace behind.
  Remembering reported pieces would let a later inflate or report punch a huge page the
  guest is using.

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
    """Releases PFN ranges from ``memory``; keeps partial huge pages of inflates until whole."""

    memory: GuestMemory
    counters: ReleaseCounters = field(default_factory=ReleaseCounters)
    # huge page guest address -> bitmap of its small pages in the balloon (bit i: page i).
    # An int per huge page: 64 bytes for 2 MiB, 32 KiB for 1 GiB, whatever the guest sends.
    _partial: dict[int, int] = field(default_factory=dict)

    def release_pfns(self, ranges: list[tuple[int, int]]) -> None:
        """Inflate: release every page in ``ranges`` (``(first_pfn, count)``, as
        ``compact_pfns`` gives); small pages of huge pages wait for the rest."""
        for first, count in ranges:
            self._release(first << PFN_SHIFT, count << PFN_SHIFT, collect=True)

    def release_bytes(self, addr: int, length: int) -> None:
        """Inflate by bytes: the whole small pages in ``[addr, addr+length)``."""
        self._release(addr, length, collect=True)

    def release_report(self, addr: int, length: int) -> None:
        """A free page report: release the whole backing pages inside ``[addr, addr+length)``
        and remember nothing (the guest owns them again once the report is returned)."""
        self._release(addr, length, collect=False)

    def _release(self, addr: int, length: int, collect: bool) -> None:
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
                self._release_huge(lo, hi, region.page_size, collect)
        self.counters.skipped_pages += (end - start - covered) // SMALL_PAGE

    def _release_huge(self, lo: int, hi: int, huge: int, collect: bool) -> None:
        whole_lo = -(-lo // huge) * huge
        whole_hi = hi // huge * huge
        if whole_lo < whole_hi:
            self.memory.remove(whole_lo, whole_hi - whole_lo)
            self.counters.released_pages += (whole_hi - whole_lo) // SMALL_PAGE
            for base in range(whole_lo, whole_hi, huge):
                self._drop_partial(base)
            if collect:
                self._collect(lo, whole_lo, huge)
                self._collect(whole_hi, hi, huge)
        elif collect:
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
        before = self._partial.get(base, 0)
        first, count = (lo - base) // SMALL_PAGE, (hi - lo) // SMALL_PAGE
        bits = before | ((1 << count) - 1) << first
        self.counters.pending_pages += bits.bit_count() - before.bit_count()
        if bits.bit_count() == huge // SMALL_PAGE:
            self._partial[base] = bits
            self._drop_partial(base)
            self.memory.remove(base, huge)
            self.counters.released_pages += huge // SMALL_PAGE
        else:
            self._partial[base] = bits

    def _drop_partial(self, base: int) -> None:
        bits = self._partial.pop(base, 0)
        self.counters.pending_pages -= bits.bit_count()

    def reclaim_pfns(self, ranges: list[tuple[int, int]]) -> None:
        """The guest took these pages back (deflate): forget them in partial huge pages."""
        if not self._partial:
            return
        for first, count in ranges:
            lo, hi = first << PFN_SHIFT, (first + count) << PFN_SHIFT
            for region in self.memory.regions:
                a, b = max(lo, region.guest_addr), min(hi, region.end)
                if a < b and region.page_size != SMALL_PAGE:
                    self._forget(a, b, region.page_size)

    def _forget(self, lo: int, hi: int, huge: int) -> None:
        while lo < hi:
            base = lo // huge * huge
            end = min(hi, base + huge)
            bits = self._partial.get(base)
            if bits is not None:
                first, count = (lo - base) // SMALL_PAGE, (end - lo) // SMALL_PAGE
                left = bits & ~(((1 << count) - 1) << first)
                self.counters.pending_pages -= bits.bit_count() - left.bit_count()
                if left:
                    self._partial[base] = left
                else:
                    del self._partial[base]
            lo = end

    def partial_pages(self) -> dict[int, int]:
        """The collection, to carry across a worker restart (huge page address -> bitmap)."""
        return dict(self._partial)

    def export_partial(self, budget: int) -> list[tuple[int, str]]:
        """The collection as ``(huge page address, hex bitmap)`` pairs, at most ``budget``
        characters of bitmap in all. What does not fit is left out: those small pages then
        stay with the guest's backing (safe: never released, only not given back)."""
        out, used = [], 0
        for base, bits in sorted(self._partial.items()):
            text = format(bits, "x")
            if used + len(text) > budget:
                break
            out.append((base, text))
            used += len(text)
        return out

    def import_partial(self, pairs: list[tuple[int, str]]) -> int:
        """Take over a collection from ``export_partial`` (a previous worker's); entries
        that do not describe a huge page of guest memory are dropped. Returns how many
        were taken."""
        taken = 0
        for base, text in pairs:
            region = next((r for r in self.memory.regions
                           if r.page_size != SMALL_PAGE and r.guest_addr <= base < r.end), None)
            if region is None or base % region.page_size or base + region.page_size > region.end:
                continue
            try:
                bits = int(text, 16)
            except ValueError:
                continue
            if bits <= 0 or bits.bit_length() > region.page_size // SMALL_PAGE:
                continue
            self._drop_partial(base)
            self._partial[base] = bits
            self.counters.pending_pages += bits.bit_count()
            taken += 1
        return taken
