"""What binding sender names costs per notification (issue 14 item 9): the sender's framing (a 36-byte header put
before the payload) and the receiver's check (parse, one dict lookup, two 16-byte constant-time compares, the payload
sliced off), timed alone per payload size; and a whole local-backend round (``notify`` then ``notifications``) for
scale.

    python3 bench/notification_senders.py --json bench/results/notification_senders_cpu_2026-12-07.json
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kvxfer  # noqa: E402
from kvxfer.senders import SenderBook, SenderKeys  # noqa: E402


def _per_call_us(work, calls: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            work()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    keys = SenderKeys("sender-uid")
    book = SenderBook(4096, lambda name: None, lambda reason: None)
    header = keys.header("receiver-uid")
    rows = []
    for size in (16, 1024, 64 << 10):
        payload = bytes(size)
        framed = header + payload
        assert book.open("sender", framed) == payload
        rows.append(
            {
                "payload_bytes": size,
                "frame_us": _per_call_us(lambda: header + payload, args.calls, args.repeats),  # noqa: B023
                "check_us": _per_call_us(lambda: book.open("sender", framed), args.calls, args.repeats),  # noqa: B023
            }
        )
        print(json.dumps(rows[-1]))
    with kvxfer.Agent("receiver", backends=["local"]) as receiver, kvxfer.Agent("sender", backends=["local"]) as sender:
        peer = sender.connect(receiver.metadata())

        def round_trip() -> None:
            sender.notify(peer, b"req-42")
            receiver.notifications()

        round_us = _per_call_us(round_trip, args.calls // 4, args.repeats)
    print(json.dumps({"local_notify_round_us": round_us}))
    result = {
        "bench": "notification_senders",
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version()},
        "note": "shared 2-core machine with other jobs running: per-call medians of --repeats runs",
        "rows": rows,
        "local_notify_round_us": round_us,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            file.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
