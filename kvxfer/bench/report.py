"""Shared output of the benchmarks: a table on the terminal (rich when installed), JSON and CSV files."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import sys
from typing import Any, Sequence


def environment() -> dict[str, Any]:
    """Where and when a run happened, stored beside its numbers."""
    from .. import __version__

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "kvxfer": __version__, "command": " ".join(sys.argv)}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Print ``rows`` (dicts) as a table with ``columns`` (default: the first row's keys)."""
    if not rows:
        print(f"{title}: no rows")
        return
    columns = list(columns or rows[0].keys())
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(_cell(r.get(c, ""))) for r in rows)) for c in columns]
        print(title)
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for row in rows:
            print("  ".join(_cell(row.get(c, "")).rjust(w) for c, w in zip(columns, widths)))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(_cell(row.get(c, "")) for c in columns))
    Console(width=max(120, sum(len(c) + 3 for c in columns))).print(table)


def write_json(path: str, document: dict[str, Any]) -> None:
    """Write ``document`` (plus the environment) as indented JSON."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"environment": environment(), **document}, file, indent=2, default=str)


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as CSV with the union of their keys as header."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
