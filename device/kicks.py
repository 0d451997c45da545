"""How often a guest's empty kicks may wake the worker (sans-I/O: the caller gives the time).

A kick with no buffer behind it costs the guest one eventfd write and the host a wake-up and
a look at the rings (about 14 µs, ``make bench`` section 6): a guest kicking in a loop could
keep a host CPU busy for nothing, far more than inflating for real would. So wake-ups that
find no buffer spend tokens from a bucket refilled at ``rate`` a second (holding at most
``burst``); once it is empty the worker stops watching the kick fds until one token is back
(``1 / rate`` s). A kick that waits is not lost, only late: the eventfd keeps its count, and
the next look at the ring finds whatever the guest made available meanwhile.

Only an empty wake-up that follows another empty one spends a token. A busy guest makes some
empty ones honestly (the worker took its buffer in the pass before, while the kick was on
its way), but never two in a row without a buffer between them; a guest that kicks with
buffers is never slowed down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from device.tokens import TokenBucket

EMPTY_KICKS_PER_SECOND = 1000.0   # a flood then costs the worker ~2.5 % of a CPU (bench 6b)
EMPTY_KICK_BURST = 100.0


@dataclass
class KickBudget:
    rate: float = EMPTY_KICKS_PER_SECOND
    burst: float = EMPTY_KICK_BURST
    bucket: TokenBucket = field(init=False)
    last_empty: bool = False

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(self.rate, self.burst)

    def found(self) -> None:
        """A wake-up found buffers: the next empty one is free."""
        self.last_empty = False

    def spend(self, now: float) -> float:
        """Count one empty wake-up at ``now``; return 0.0 while within budget, else how
        many seconds the caller should stop watching kicks."""
        if not self.last_empty:
            self.last_empty = True
            return 0.0
        return self.bucket.spend(now)
