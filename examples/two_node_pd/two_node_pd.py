#!/usr/bin/env python3
"""Disaggregated prefill -> decode across two "hosts": two network namespaces joined by a veth pair.

    sudo .venv/bin/python examples/two_node_pd/two_node_pd.py [--requests 3] [--prompt-tokens 1500] [--json out.json]

Node A (10.77.0.1): etcd and a prefill worker. Node B (10.77.0.2): the router and a decode worker. The workers
find the router through etcd (``--discovery etcd://10.77.0.1:2379/demo``) and move KV over UCX on TCP across the
veth only (``UCX_TLS=tcp``, ``UCX_NET_DEVICES=<veth>``). The client (the openai package) runs inside node B. For
each request it prints the answer and the TTFT breakdown; at the end, the KV bytes the decode worker pulled (the
router's ``kvxfer_kv_transfer_bytes_total``) beside the bytes that crossed the veth (``ip -s link``: KV plus
control and etcd traffic).

Where network namespaces are not permitted (not root, or a container without CAP_SYS_ADMIN) the same runs over
two loopback addresses and says so (``--mode loopback`` forces it). Namespaces and processes are removed on exit,
whatever the exit (errors, SIGINT, SIGTERM; after a SIGKILL the next run sweeps the namespaces left behind).
Exit status 0 when every request was answered with KV that crossed between the nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import Cluster
from topology import Topology

PROMPT = (
    "Disaggregated serving splits the prompt's prefill from the decode of new tokens so that each runs on "
    "hardware sized for it; the KV cache computed by prefill has to travel to the decode worker. "
)


def prompt_of(num_tokens: int, index: int) -> str:
    """A prompt of about ``num_tokens`` tokens (tiny-random's tokenizer is byte-level) unique per ``index``."""
    text = f"[request {index}] " + PROMPT * (num_tokens // len(PROMPT) + 1)
    return text[:num_tokens]


def discovery_supported() -> str:
    """'' when this kvxfer's router and worker take ``--discovery``; else which one does not."""
    from kvxfer import cli
    from kvxfer.serve.worker import add_worker_arguments

    worker = argparse.ArgumentParser()
    add_worker_arguments(worker)
    missing = []
    if "--discovery" not in worker.format_help():
        missing.append("kvxfer worker")
    if cli.parser().parse_known_args(["router", "--model", "m", "--discovery", "etcd://h:1"])[1]:
        missing.append("kvxfer router")
    return " and ".join(missing)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the topology, start everything, send the requests; the report (also printed)."""
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvxfer-two-node-"))
    missing = "" if args.static else discovery_supported()
    if missing:
        print(
            f"two_node_pd: no --discovery option in {missing} here: workers get a static --router instead", flush=True
        )
        args.static = True
    with Topology.create(args.mode) as topology:
        print(f"two_node_pd: {topology.mode}: {topology.describe()}", flush=True)
        cluster = Cluster(topology, workdir, model=args.model, discovery=not args.static, lease_ttl_s=args.lease_ttl)
        try:
            began = time.monotonic()
            cluster.start()
            print(
                f"two_node_pd: etcd + prefill-a on node A, router + decode-b on node B: ready in "
                f"{time.monotonic() - began:.1f} s (discovery: "
                f"{cluster.discovery_url if cluster.discovery else 'static --router'}; logs in {workdir})",
                flush=True,
            )
            before = topology.counters()
            metric_before = cluster.metric("kvxfer_kv_transfer_bytes_total")
            answers = []
            for index in range(args.requests):
                answer = cluster.chat(prompt_of(args.prompt_tokens, index), max_tokens=args.max_tokens)
                timing = answer["timing"]
                answers.append(answer)
                print(f"\n[{index}] answer: {answer['text']!r} ({answer['finish']})")
                print(
                    f"    prefill on {timing.get('prefill_worker')}, decode on {timing.get('decode_worker')}; "
                    f"TTFT {timing.get('ttft_s', 0) * 1e3:.1f} ms = queue {timing.get('queue_s', 0) * 1e3:.1f} "
                    f"+ prefill {timing.get('prefill_s', 0) * 1e3:.1f} + transfer "
                    f"{timing.get('transfer_s', 0) * 1e3:.1f} + first step {timing.get('first_step_s', 0) * 1e3:.1f} "
                    f"ms (router {timing.get('router_s', 0) * 1e3:.2f} ms); KV {timing.get('kv_bytes', 0):,} B",
                    flush=True,
                )
            after = topology.counters()
            kv_metric = cluster.metric("kvxfer_kv_transfer_bytes_total") - metric_before
        finally:
            cluster.close()
    crossed = (after["tx_bytes"] - before["tx_bytes"]) + (after["rx_bytes"] - before["rx_bytes"])
    kv_reported = sum(int(a["timing"].get("kv_bytes", 0)) for a in answers)
    transfer_s = sum(float(a["timing"].get("transfer_s", 0.0)) for a in answers)
    link = topology.a.device if topology.mode == "netns" else "lo (all of this machine's loopback traffic)"
    print(
        f"\nKV pulled by decode-b: {kv_reported:,} B in {len(answers)} requests (router metric "
        f"kvxfer_kv_transfer_bytes_total +{kv_metric:,.0f}); {link}: {crossed:,} B crossed "
        f"(tx {after['tx_bytes'] - before['tx_bytes']:,}, rx {after['rx_bytes'] - before['rx_bytes']:,}: KV + "
        f"control + etcd)",
        flush=True,
    )
    ok = (
        len(answers) == args.requests
        and all(a["timing"].get("disaggregated") for a in answers)
        and kv_reported > 0
        and crossed >= kv_reported
    )
    report = {
        "mode": topology.mode,
        "topology": topology.describe(),
        "discovery": not args.static,
        "requests": len(answers),
        "answers": [a["text"] for a in answers],
        "timings": [a["timing"] for a in answers],
        "kv_bytes": kv_reported,
        "kv_metric_bytes": kv_metric,
        "kv_transfer_s": transfer_s,
        "link_bytes": crossed,
        "link_counters_before": before,
        "link_counters_after": after,
        "ok": ok,
        "logs": str(workdir),
    }
    print(f"two_node_pd: {'OK' if ok else 'FAILED'} ({topology.mode})", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("auto", "netns", "loopback"), default="auto")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--lease-ttl", type=float, default=3.0, help="etcd lease TTL of every record (s)")
    parser.add_argument("--static", action="store_true", help="no etcd discovery: workers get --router")
    parser.add_argument("--workdir", default=None, help="logs and etcd data (default: a new temp dir)")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    os.environ.setdefault("KVXFER_LOG_LEVEL", "WARNING")
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
