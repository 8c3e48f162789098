"""What the local backend's target-side check costs (issue 14 item 3): same-process READs with the check that every
descriptor lies inside a region the target really registered, and with that check switched off, in one run.

Two agents of this process, one registered region each; ``--fragments`` descriptors of ``--fragment-bytes`` bytes
(non-adjacent, so nothing coalesces) per READ; the median of ``--repeats`` transfers per setting, the two settings
interleaved so machine load hits both alike; and the check alone (``check_alone_us``: the table lookup a post adds,
timed over 100 calls), which is the number to trust on a loaded machine.

    python3 bench/local_enforcement.py --json bench/results/local_enforcement_cpu_2026-12-07.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kvxfer  # noqa: E402
from kvxfer.plan import RegionTable  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fragments", type=int, nargs="+", default=[1, 64, 1024, 16384])
    parser.add_argument("--fragment-bytes", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    checked = RegionTable.check
    rows = []
    with kvxfer.Agent("target", backends=["local"]) as target, kvxfer.Agent("initiator", backends=["local"]) as me:
        for fragment in args.fragment_bytes:
            for count in args.fragments:
                nbytes = 2 * fragment * count
                source = target.register(np.ones(nbytes, np.uint8), name=f"s{fragment}-{count}")
                sink = me.register(np.zeros(nbytes, np.uint8), name=f"d{fragment}-{count}")
                peer = me.connect(target.metadata())
                offsets = np.arange(count, dtype=np.int64) * 2 * fragment
                plan = me.plan(
                    kvxfer.Descs.from_ranges(sink, offsets, fragment),
                    peer,
                    kvxfer.Descs.from_ranges(peer.region(source.name), offsets, fragment),
                )
                times: dict[str, list[float]] = {"checked": [], "unchecked": []}
                for _ in range(args.repeats):
                    for setting in ("checked", "unchecked"):
                        # "unchecked": the target's table check only (the initiator's own plan checks stay)
                        RegionTable.check = checked if setting == "checked" else _only_kinds
                        start = time.perf_counter()
                        me.read(plan).wait(60)
                        times[setting].append(time.perf_counter() - start)
                RegionTable.check = checked
                table = RegionTable([source.index], [source.addr], [source.nbytes])
                start = time.perf_counter()
                for _ in range(100):
                    table.check(plan.remote, "remote_descs", "target")
                check_us = (time.perf_counter() - start) / 100 * 1e6
                medians = {k: statistics.median(v) for k, v in times.items()}
                rows.append(
                    {
                        "fragment_bytes": fragment,
                        "fragments": count,
                        "nbytes": fragment * count,
                        "checked_us": medians["checked"] * 1e6,
                        "unchecked_us": medians["unchecked"] * 1e6,
                        "checked_GBps": fragment * count / medians["checked"] / 1e9,
                        "unchecked_GBps": fragment * count / medians["unchecked"] / 1e9,
                        "overhead_pct": (medians["checked"] / medians["unchecked"] - 1) * 100,
                        "check_alone_us": check_us,
                    }
                )
                print(json.dumps(rows[-1]))
                me.disconnect(peer)
                me.deregister(sink)
                target.deregister(source)
    result = {
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version()},
            "load_average": os.getloadavg(),
        },
        "repeats": args.repeats,
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            file.write(json.dumps(result, indent=2) + "\n")


def _only_kinds(self: RegionTable, descs: kvxfer.Descs, argument: str, owner: str) -> set:
    return set()


if __name__ == "__main__":
    main()
