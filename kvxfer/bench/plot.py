"""`--plot out.png`: GB/s against fragment size, log-log; one line per system / backend / peer / memory / op /
batch / threads, and the ceilings of the run as dashed gray lines (one per ceiling kind and batch / threads)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..errors import BackendUnavailableError


def _series(row: dict[str, Any]) -> str:
    system = row["backend"] if row["system"] == "kvxfer" else row["system"]
    peer = "" if row["peer"] in (None, "loopback") else f" @{row['peer']}"
    extra = f" b{row['batch_size']}" + (f" t{row['threads']}" if row["threads"] != 1 else "")
    return f"{system}{peer} {row['initiator']}->{row['target']} {row['op']}{extra}"


def _size_label(nbytes: float) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g}{unit}"
    return f"{nbytes:g}"


def plot_sweep(rows: Sequence[dict[str, Any]], path: str, title: str = "kvxfer-bench sweep") -> None:
    """Write the plot of sweep ``rows`` (ROW_KEYS dicts) to ``path`` (PNG, or any format matplotlib knows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError as error:
        raise BackendUnavailableError(f"--plot needs matplotlib ({error}); pip install 'kvxfer[bench]'") from None
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    limits: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        lines[_series(row)].append((row["block_size"], row["gbps"]))
        if row.get("ceiling_gbps"):
            work = f"{row['ceiling']} b{row['batch_size']}" + (f" t{row['threads']}" if row["threads"] != 1 else "")
            limits[work].append((row["block_size"], row["ceiling_gbps"]))
    figure, axes = plt.subplots(figsize=(10, 6))
    for label, points in sorted(lines.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    for label, points in sorted(limits.items()):
        sizes, values = zip(*sorted(set(points)), strict=True)
        if len(set(values)) == 1:
            sizes = (min(sizes), max(sizes))
            values = (values[0], values[0])
        axes.plot(sizes, values, linestyle="--", color="gray", linewidth=1)
        axes.annotate(f"ceiling: {label}", (sizes[-1], values[-1]), fontsize=7, color="gray", ha="right", va="bottom")
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _size_label(value)))
    axes.set_yscale("log")
    axes.set_xlabel("fragment size (bytes)")
    axes.set_ylabel("GB/s (1e9 B/s)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
