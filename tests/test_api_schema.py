"""The README's JSON tables are the typed API's fields, no more and no fewer."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from control.api import Counters, Stats, Status, VmSummary

README = Path(__file__).resolve().parent.parent / "README.md"


def _table_after(heading: str) -> list[str]:
    """The backquoted names in the first column of the first table after ``heading``."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    names, in_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            match = re.match(r"\|\s*`([a-z_]+)`\s*\|", line)
            if match:
                names.append(match.group(1))
        elif in_table:
            break
    return names


def test_status_table_matches_the_status_type():
    assert _table_after("### JSON fields (a contract)") == [f.name for f in fields(Status)]


def test_counters_table_matches_the_counters_type():
    assert _table_after("#### `counters`") == [f.name for f in fields(Counters)]


def test_list_table_matches_the_vm_summary_type():
    assert _table_after("#### `vballoon list --json`") == [f.name for f in fields(VmSummary)]


def test_stats_table_matches_the_stats_type():
    assert _table_after("#### `vballoon stats --json`") == list(Stats.json_fields())
