"""Shared output of the benchmarks: a table on the terminal (rich when installed), a progress bar, JSON and CSV.

JSON documents share one envelope (``SCHEMA``): ``schema``, ``subcommand``, ``environment`` (host, date, command),
``tables`` (name -> list of row dicts), plus what a subcommand adds (``config``, ``notes``). Non-finite floats are
written as null so the files are strict JSON.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

logger = logging.getLogger("kvxfer")

SCHEMA = "kvxfer-bench/1"


def environment() -> dict[str, Any]:
    """Where and when a run happened, stored beside its numbers."""
    from .. import __version__

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kvxfer": __version__,
        "command": " ".join(sys.argv),
        "devices": _devices(),
    }


def _devices() -> list[str]:
    """Names of the visible CUDA devices (empty without cupy or a GPU)."""
    try:
        from ..devices import cuda_available, cupy_module

        if not cuda_available():
            return []
        cupy = cupy_module()
        names = []
        for index in range(cupy.cuda.runtime.getDeviceCount()):
            name = cupy.cuda.runtime.getDeviceProperties(index)["name"]
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
    except Exception as error:  # noqa: BLE001 describing the machine must never fail a run
        logger.debug("bench: no GPU names (%s)", error)
        return []


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "ok" if value else "FAIL"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
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
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
        for row in rows:
            print("  ".join(_cell(row.get(c, "")).rjust(w) for c, w in zip(columns, widths, strict=True)))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(_cell(row.get(c, "")) for c in columns))
    Console(width=max(120, sum(len(c) + 3 for c in columns))).print(table)


@contextlib.contextmanager
def progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A progress bar on stderr (rich) for ``total`` steps; yields ``advance(label)``. A no-op when disabled or
    when rich is missing."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        enabled = False
    if not enabled:
        yield lambda label: None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[label]}"),
        console=Console(stderr=True),
        transient=False,
    )
    task = bar.add_task(description, total=total, label="")
    with bar:
        yield lambda label: bar.update(task, advance=1, label=label)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str, document: dict[str, Any]) -> None:
    """Write ``document`` in the shared envelope (schema, environment) as indented, strict JSON."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(
            _finite({"schema": SCHEMA, "environment": environment(), **document}),
            file,
            indent=2,
            default=str,
            allow_nan=False,
        )


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as CSV with the union of their keys as header."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
