"""The operator API's replies as types: what ``status``, ``stats`` and ``wait`` answer.

These dataclasses are the one definition of the JSON fields (``vballoon status --json``,
the control socket's replies); the README's tables are checked against them
(``tests/test_api_schema.py``). Adding a field means adding it here and filling it where the
reply is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from device.stats import STAT_NAMES


@dataclass(frozen=True)
class Counters:
    """What the device did, summed over every worker it ran (they survive restarts).
    ``pending_pages`` is a level (small pages waiting for the rest of their huge page)."""

    inflate_buffers: int = 0
    deflate_buffers: int = 0
    inflated_pages: int = 0
    deflated_pages: int = 0
    released_pages: int = 0
    pending_pages: int = 0
    skipped_pages: int = 0
    reported_bytes: int = 0
    report_skipped_bytes: int = 0
    stats_updates: int = 0
    bad_buffers: int = 0
    suppressed_errors: int = 0
    kicks: int = 0
    empty_kicks: int = 0
    kick_pauses: int = 0
    frontend_pauses: int = 0
    worker_restarts: int = 0

    @classmethod
    def from_values(cls, values: dict[str, int]) -> "Counters":
        """From the workers' counter map; names it does not know are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{name: int(value) for name, value in values.items() if name in known})


@dataclass(frozen=True)
class Status:
    """``vballoon status``: one VM's balloon."""

    state: str                       # waiting, idle, starting, active, stopping,
                                     # restarting, unresponsive, failed
    connected: bool
    target_bytes: int
    actual_bytes: int
    worker_pid: int | None
    worker_restarts: int
    features: list[str]
    guest_memory_bytes: int | None
    last_worker_exit: str | None
    seccomp_denials: dict[str, int] | None
    counters: Counters = field(default_factory=Counters)
    poison_val: int | None = None    # the guest's page poison value (PAGE_POISON), once written
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VmSummary:
    """One VM in ``vballoon list``."""

    name: str
    socket: str
    state: str                       # as in Status; "waiting" when no front-end is connected
    target_bytes: int
    actual_bytes: int
    guest_memory_bytes: int | None
    worker_pid: int | None
    worker_restarts: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WaitOutcome:
    """``wait``: how it ended, with the status at that moment."""

    outcome: str                     # settled, stalled, timeout, disconnected
    status: Status

    def to_json(self) -> dict[str, Any]:
        return {"outcome": self.outcome, **self.status.to_json()}


STATS_FIELDS = tuple(STAT_NAMES.values())


@dataclass(frozen=True)
class Stats:
    """``vballoon stats``: the guest's latest statistics by Firecracker's names (None for
    what it never sent), with when they arrived."""

    values: dict[str, int | None]
    updated_at: float | None
    age_seconds: float | None
    refresh_requested: bool

    def to_json(self) -> dict[str, Any]:
        return {**{name: self.values.get(name) for name in STATS_FIELDS},
                "updated_at": self.updated_at, "age_seconds": self.age_seconds,
                "refresh_requested": self.refresh_requested}

    @staticmethod
    def json_fields() -> tuple[str, ...]:
        return STATS_FIELDS + ("updated_at", "age_seconds", "refresh_requested")
