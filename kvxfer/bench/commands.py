"""The `sweep`, `target`, `kernels` and `ceiling` subcommands of `kvxfer-bench` (parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from ..errors import BackendUnavailableError, ConfigError
from .cases import parse_bytes, parse_ints, parse_memory, parse_sizes
from .report import print_table, progress, write_csv, write_json

#: The sweep's terminal table (every ROW_KEYS column goes to --json / --csv).
SWEEP_TABLE = (
    "system",
    "backend",
    "initiator",
    "target",
    "op",
    "block_size",
    "batch_size",
    "threads",
    "gbps",
    "avg_lat_us",
    "p99_us",
    "prep_avg_us",
    "post_avg_us",
    "completion_avg_us",
    "completion_p99_us",
    "ceiling_gbps",
    "ratio",
    "verified",
)
CEILING_TABLE = ("ceiling", "path", "op", "nbytes", "gbps", "median_us", "p99_us", "timer")


def _default_target_gpu(memory: list[tuple[str, str]]) -> int:
    if not any("cuda" in pair for pair in memory):
        return 0
    from ..devices import device_count

    return 1 if device_count() > 1 else 0


def sweep_config(args: argparse.Namespace) -> Any:
    """A SweepConfig from parsed arguments (validated)."""
    from ..backends import FACTORIES
    from .sweep import SweepConfig

    backends = tuple(b.strip() for b in args.backend.split(",") if b.strip())
    unknown = [b for b in backends if b not in FACTORIES]
    if unknown or not backends:
        raise ConfigError(f"--backend must name backends of {sorted(FACTORIES)}, got {args.backend!r}")
    memory = parse_memory(args.memory)
    if args.repeats < 1 or args.warmup < 0 or args.verify < 0:
        raise ConfigError(
            f"--repeats must be >= 1, --warmup and --verify >= 0; got {args.repeats}, {args.warmup}, {args.verify}"
        )
    return SweepConfig(
        backends=backends,
        memory=tuple(memory),
        ops=tuple(op.strip().upper() for op in args.op.split(",")),
        sizes=tuple(parse_sizes(args.sizes)),
        batches=tuple(parse_ints(args.batch, "--batch")),
        threads=tuple(parse_ints(args.threads, "--threads")),
        warmup=args.warmup,
        repeats=args.repeats,
        verify=args.verify,
        peer=args.peer,
        token=args.token,
        initiator_gpu=args.initiator_gpu,
        target_gpu=_default_target_gpu(memory) if args.target_gpu is None else args.target_gpu,
        ceiling=args.ceiling,
        ceiling_nbytes=parse_bytes(args.ceiling_bytes) if args.ceiling_bytes else None,
        timeout=args.timeout,
        compare=tuple(args.compare or ()),
        max_request=parse_bytes(args.max_request),
    )


def sweep(args: argparse.Namespace) -> int:
    """Run the sweep; print the table, notes and ceilings; write --json / --csv / --plot. Exit 1 when a byte check
    or a case failed (the other rows are still written)."""
    from . import sweep as engine

    config = sweep_config(args)
    steps = len(config.cases())
    if "nixl" in config.compare:
        steps += len({dataclasses.replace(c, backend="nixl") for c in config.cases()})
    with progress(steps, "sweep", enabled=not args.no_progress) as advance:
        result = engine.run(config, lambda case, row: advance(f"{row['system']} {case.op} {case.fragment} B"))
    kvxfer_rows = [r for r in result.rows if r["system"] == "kvxfer"]
    columns = list(SWEEP_TABLE) + (["nixl_gbps", "vs_nixl"] if "nixl" in config.compare else [])
    print_table(
        "kvxfer-bench sweep (GB/s = 1e9 B/s from the median request; times in us)",
        result.rows if any(r["system"] == "nixl" for r in result.rows) else kvxfer_rows,
        columns,
    )
    print_table("ceilings measured in this run", result.ceilings, CEILING_TABLE)
    for note in result.notes:
        print(f"note: {note}")
    document = {
        "subcommand": "sweep",
        "config": dataclasses.asdict(config),
        "notes": result.notes,
        "tables": {"sweep": result.rows, "ceilings": result.ceilings},
    }
    _write(args, document)
    if args.plot:
        from .plot import plot_sweep

        plot_sweep(result.rows, args.plot, _plot_title())
        print(f"plot written to {args.plot}")
    failed = [r for r in result.rows if r["verified"] is False]
    if failed:
        print(f"byte check FAILED for {len(failed)} row(s): the transfer did not deliver the bytes", file=sys.stderr)
    crashed = [note for note in result.notes if note.startswith("FAILED")]
    if crashed:
        print(f"{len(crashed)} case(s) FAILED (see the notes above)", file=sys.stderr)
    return 1 if failed or crashed else 0


def _plot_title(where: dict[str, Any] | None = None) -> str:
    from .report import environment

    where = where or environment()
    machine = ", ".join(sorted(set(where["devices"]))) or f"{where['cpus']} CPUs"
    return f"kvxfer-bench sweep on {where['host']} ({machine}), {where['date'][:10]}"


def target(args: argparse.Namespace) -> int:
    """Serve as the passive side of a sweep until told to exit (or Ctrl-C)."""
    from .target import Target

    kinds = [kind.strip() for kind in args.memory.split(",") if kind.strip()]
    server = Target(
        args.backend,
        kinds,
        parse_bytes(args.nbytes),
        device=args.device,
        listen=args.listen,
        token=args.token,
        parent_pid=args.parent_pid,
    )
    try:
        print(server.describe() + "; Ctrl-C to stop", flush=True)
        server.serve(once=args.once)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def kernels(args: argparse.Namespace) -> int:
    """kvxfer.bench.kernels (owned by the kernels work) with ``args.extra``; a message and exit 0 without a GPU."""
    from ..devices import cupy_module

    try:
        cupy_module()
    except BackendUnavailableError as error:
        print(f"kvxfer-bench kernels skipped: needs a CUDA GPU: {error}")
        if "--json" in args.extra[:-1]:
            path = args.extra[args.extra.index("--json") + 1]
            write_json(path, {"subcommand": "kernels", "skipped": str(error), "rows": []})
        return 0
    from . import kernels as bench_kernels

    return int(bench_kernels.main(args.extra))


def ceiling(args: argparse.Namespace) -> int:
    """The raw ceilings of this machine."""
    from . import ceiling as ceilings

    sizes = () if args.no_perftest else tuple(parse_sizes(args.perftest_sizes))
    host, device = parse_bytes(args.host_bytes), parse_bytes(args.device_bytes)
    rows, skipped = ceilings.measure_all(host, device, args.repeats, sizes)
    if args.no_perftest:
        skipped.append("ucx_perftest: --no-perftest")
    print_table("raw ceilings of this machine (GB/s = 1e9 B/s of payload)", rows, CEILING_TABLE)
    for reason in skipped:
        print(f"skipped: {reason}")
    _write(args, {"subcommand": "ceiling", "notes": skipped, "tables": {"ceilings": rows}})
    return 0


def plot(args: argparse.Namespace) -> int:
    """Redraw the plot of a sweep recorded with --json."""
    import json

    from .plot import plot_sweep

    try:
        with open(args.results, encoding="utf-8") as file:
            document = json.load(file)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read sweep results {args.results!r}: {error}") from None
    if document.get("subcommand") != "sweep":
        raise ConfigError(f"{args.results!r} holds {document.get('subcommand')!r} results, expected 'sweep'")
    plot_sweep(document["tables"]["sweep"], args.out, _plot_title(document["environment"]))
    print(f"plot written to {args.out}")
    return 0


def _write(args: argparse.Namespace, document: dict[str, Any]) -> None:
    if args.json:
        write_json(args.json, document)
    if args.csv:
        write_csv(args.csv, [dict(table=name, **row) for name, rows in document["tables"].items() for row in rows])
