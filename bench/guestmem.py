"""Fake guest memory that lives in another process, as a real guest's RAM lives in its VMM.

Where guest pages are mapped changes what releasing them costs: punching a hole must unmap
each page from every process that maps it, and a process punching pages mapped in its *own*
address space pays a TLB flush on each call that it does not pay for another process's
(measured here: 256 single-page holes per buffer from the process that maps them took 1.85x
as long as from a second process). With a real guest, UML maps its RAM and the device
punches it from ``vballoon serve`` or the jailed worker: the second case. So the fake
guest's RAM is written and kept mapped by a helper process (``python -m bench.guestmem
FD``), and this process only ever touches the ring area at the bottom. Every mode and the
kernel limit then punch pages mapped elsewhere, on equal terms.

Protocol on the helper's stdin/stdout, one line each way: ``LO HI`` -> ``ok`` once every
page of ``[LO, HI)`` has been written.
"""

from __future__ import annotations

import mmap
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.driver import RING_AREA, GuestRam

MIB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent
POPULATE_TIMEOUT = 120.0


class FakeGuest:
    """A ``GuestRam`` (this process: rings only) and the helper that holds its pages.

    Every page, the ring area included, is backed from the start: the rings are written
    before any driver sets them up, and pages a driver allocates later cannot blur what a
    run frees.
    """

    def __init__(self, size: int, name: str = "bench-guest-ram") -> None:
        self.ram = GuestRam(size, name)
        try:
            self.helper = subprocess.Popen(
                [sys.executable, "-m", "bench.guestmem", str(self.ram.fd)],
                pass_fds=[self.ram.fd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                cwd=REPO_ROOT, close_fds=True)
        except BaseException:
            self.ram.close()
            raise
        try:
            self.populate(0)
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return self.ram.size

    def populate(self, lo: int = RING_AREA, hi: int | None = None) -> None:
        """Back every page of ``[lo, hi)`` on the host (the helper writes them).

        Raises RuntimeError if the helper died or took longer than ``POPULATE_TIMEOUT``.
        """
        hi = self.ram.size if hi is None else hi
        self.helper.stdin.write(f"{lo} {hi}\n".encode())
        self.helper.stdin.flush()
        deadline = time.monotonic() + POPULATE_TIMEOUT
        fd = self.helper.stdout.fileno()
        while not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if time.monotonic() >= deadline:
                raise RuntimeError("the guest memory helper did not answer in time")
        if self.helper.stdout.readline().strip() != b"ok":
            raise RuntimeError(f"the guest memory helper failed ({self.helper.poll()})")

    def close(self) -> None:
        try:
            if self.helper.poll() is None:
                self.helper.stdin.close()
                try:
                    self.helper.wait(5)
                except subprocess.TimeoutExpired:
                    self.helper.kill()
                    self.helper.wait()
            self.helper.stdout.close()
        finally:
            self.ram.close()


def _serve(fd: int) -> None:
    size = os.fstat(fd).st_size
    ram = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    pattern = b"\xa5" * MIB
    for line in sys.stdin.buffer:
        lo, hi = (int(x) for x in line.split())
        for off in range(lo, hi, MIB):
            n = min(MIB, hi - off)
            ram[off:off + n] = pattern[:n]
        sys.stdout.buffer.write(b"ok\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
