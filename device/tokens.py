"""A token bucket (sans-I/O: the caller gives the time).

Tokens refill at ``rate`` a second up to ``burst``; each event spends one. While tokens are
left, ``spend`` says 0.0; once they run out it says how long the caller should stop taking
events for one token to be back. Used for what a hostile peer can make us do for nothing:
empty kicks (the worker) and a front-end's flood of requests (``serve``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = field(init=False)     # starts full: ``burst``
    stamp: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def spend(self, now: float, count: int = 1) -> float:
        """Count ``count`` events at ``now``; 0.0 while within budget, else the seconds to
        wait for the tokens to be back."""
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= count
        if self.tokens >= 0.0:
            return 0.0
        return -self.tokens / self.rate
