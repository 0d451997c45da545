"""What a run found: machine-readable results, markdown tables and the goals.

Every number goes in twice: once as a ``Result`` (``results.json``: name, value, unit and
the conditions it was measured under) and once in a row of a section's table. A mode that
could not run is a result with value None and a note saying why, and a row that says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.system import machine_line


@dataclass
class Result:
    name: str
    value: float | None
    unit: str
    conditions: dict[str, object]
    note: str | None = None


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Goal:
    text: str
    measured: str
    met: bool | None      # None: could not be measured in this run


class Report:
    """Collects results, tables and goals; renders markdown and JSON."""

    def __init__(self, machine: dict[str, object], quick: bool) -> None:
        self.machine = machine
        self.quick = quick
        self.results: list[Result] = []
        self.tables: list[Table] = []
        self.goals: list[Goal] = []
        self.notes: list[str] = []
        self.series: dict[str, object] = {}     # data for the plot

    def add(self, name: str, value: float | None, unit: str, *, mode: str | None = None,
            pattern: str | None = None, placement: str | None = None, runs: int | None = None,
            note: str | None = None, **extra: object) -> Result:
        conditions = {"mode": mode, "pfn_pattern": pattern, "cpu_placement": placement,
                      "runs": runs, **extra, "machine": self.machine}
        result = Result(name, None if value is None else round(float(value), 6), unit,
                        conditions, note)
        self.results.append(result)
        return result

    def table(self, title: str, headers: list[str]) -> Table:
        table = Table(title, headers)
        self.tables.append(table)
        return table

    def goal(self, text: str, measured: str, met: bool | None) -> None:
        self.goals.append(Goal(text, measured, met))

    # -- rendering -----------------------------------------------------------------------------

    def markdown(self) -> str:
        lines = [f"Machine: {machine_line(self.machine)}"
                 + (" — quick smoke run (--quick): few runs, small sizes" if self.quick else ""),
                 ""]
        if self.goals:
            lines += ["### Goals", "", "| goal | measured | met |", "|---|---|---|"]
            for goal in self.goals:
                met = {True: "yes", False: "**no**", None: "n/a"}[goal.met]
                lines.append(f"| {cell(goal.text)} | {cell(goal.measured, 600)} | {met} |")
            lines.append("")
        # Sections are numbered in the order; they run in the order that is cheapest.
        for table in sorted(self.tables, key=lambda t: t.title):
            lines += [f"### {table.title}", "", "| " + " | ".join(table.headers) + " |",
                      "|" + "---|" * len(table.headers)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
            if table.notes:
                lines.append("")
                lines += [f"- {note}" for note in table.notes]
            lines.append("")
        if self.notes:
            lines += ["### Notes", ""] + [f"- {note}" for note in self.notes] + [""]
        return "\n".join(lines)

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps([asdict(r) for r in self.results], indent=1) + "\n")

    def write_markdown(self, path: Path, command: str) -> None:
        text = ["# vballoon benchmark results", "",
                f"Produced by `{command}` (see `bench/`); raw numbers with their conditions "
                "in `bench/results.json`, plots in `bench/plot.png`. Absolute times on shared "
                "machines are noise: compare numbers within one run.", "",
                self.markdown(), "![throughput and guest memory over time](plot.png)", ""]
        path.write_text("\n".join(text))


def cell(text: str, limit: int = 160) -> str:
    """A table cell: one line, no column separators, bounded (error messages can be long)."""
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table cell; "-" for None."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}"
