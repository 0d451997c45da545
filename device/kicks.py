"""How often a guest's empty kicks may wake the worker (sans-I/O: the caller gives the time).

A kick with no buffer behind it costs the guest one eventfd write and the host a wake-up and
a look at the rings (about 8 µs, ``make bench`` section 6): a guest kicking in a loop could
keep a host CPU busy for nothing, far more than inflating for real would. So wake-ups that
find no buffer spend tokens from a bucket refilled at ``rate`` a second (holding at most
``burst``); once it is empty the worker stops watching the kick fds until one token is back
(``1 / rate`` s). A kick that waits is not lost, only late: the eventfd keeps its count, and
the next look at the ring finds whatever the guest made available meanwhile. A guest that
kicks with buffers never spends a token, so its latency is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

EMPTY_KICKS_PER_SECOND = 1000.0   # at ~8 µs each: under 1 % of a CPU at most
EMPTY_KICK_BURST = 100.0


@dataclass
class KickBudget:
    rate: float = EMPTY_KICKS_PER_SECOND
    burst: float = EMPTY_KICK_BURST
    tokens: float = EMPTY_KICK_BURST
    stamp: float | None = None

    def spend(self, now: float) -> float:
        """Count one empty wake-up at ``now``; return 0.0 while within budget, else how
        many seconds the caller should stop watching kicks."""
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        if self.tokens >= 0.0:
            return 0.0
        return -self.tokens / self.rate
