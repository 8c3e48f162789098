"""Side-channel service while a crowd of stalled clients holds connections (issue 14 item 8).

An agent serves its metadata on 127.0.0.1 (``--cap`` connections at once, 5 s per request). First ``--requests``
legitimate ``fetch_metadata`` calls alone (the baseline, one every ``--pace`` s), then the same while another
process holds ``--clients`` connections that each drip one byte of a request every ``--interval`` seconds and
reconnect when shed (the slow-loris attack of the issue: 2,000 clients, a byte every 4 s). Reports latency
percentiles, failures, how many connections the server shed, its threads and open connections, and the load
average (the machine may be shared).

    python3 bench/sidechannel_crowd.py --json bench/results/sidechannel_crowd_cpu_2026-12-07.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kvxfer  # noqa: E402
from kvxfer.limits import Limits  # noqa: E402
from kvxfer.sidechannel import fetch_metadata  # noqa: E402


def _latencies(address: str, count: int, pace: float) -> dict[str, Any]:
    seconds, failures = [], 0
    for _ in range(count):
        time.sleep(pace)
        start = time.perf_counter()
        try:
            fetch_metadata(address, None, 10.0)
        except kvxfer.KvxferError:
            failures += 1
            continue
        seconds.append(time.perf_counter() - start)
    values = np.array(seconds) * 1e3
    return {
        "requests": count,
        "failures": failures,
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "max_ms": float(values.max()),
        "mean_ms": float(values.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=4.0)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--cap", type=int, default=Limits().side_channel_connections)
    parser.add_argument(
        "--pace",
        type=float,
        default=0.01,
        help="seconds between legitimate requests (so the "
        "measurement spans several of the crowd's ticks and its reconnects)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    limits = Limits(side_channel_connections=args.cap)
    with kvxfer.Agent("bench", backends=["local"], listen="127.0.0.1:0", limits=limits) as agent:
        agent.register(np.zeros(1 << 20, np.uint8), name="kv")
        address = agent.listen_address
        baseline = _latencies(address, args.requests, args.pace)
        host, port = address.rsplit(":", 1)
        threads_before = threading.active_count()
        crowd = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.security.slow_clients",
                host,
                port,
                str(args.clients),
                str(args.interval),
                "3600",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        try:
            connected = int(crowd.stdout.readline().split()[1])
            time.sleep(args.interval * 1.5)  # let the drip and the shedding reach a steady state
            server = agent.side_channel
            assert server is not None  # the agent listens
            shed_before = server.shed
            under_attack = _latencies(address, args.requests, args.pace)
            state = {
                "crowd_connected": connected,
                "open_connections": server.open_connections,
                "shed_during_measurement": server.shed - shed_before,
                "server_threads_added": threading.active_count() - threads_before,
                "crowd_alive": crowd.poll() is None,
            }
        finally:
            crowd.kill()
            crowd.communicate()
    result = {
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version()},
            "load_average": os.getloadavg(),
        },
        "settings": {
            "clients": args.clients,
            "interval_s": args.interval,
            "cap": args.cap,
            "pace_s": args.pace,
            "request_seconds": limits.side_channel_request_seconds,
        },
        "baseline": baseline,
        "under_attack": under_attack,
        **state,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
