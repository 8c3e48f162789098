"""Two nodes on one machine (network namespaces + veth, examples/two_node_pd): KV over the veth, and faults.

    sudo .venv/bin/python bench/two_node.py [--sections perftest,kvxfer,serve,faults] [--out bench/results/...json]

- ``perftest``: ``ucx_perftest`` (the libucx wheel's) ``ucp_get`` across the veth, UCX_TLS=tcp on the veth only:
  the link's ceiling for one-sided reads, in the same run.
- ``kvxfer``: a kvxfer Agent on node A exports a KV pool, one on node B pulls it through ``agent.read`` (what a decode
  worker does) in fragments of KV-block size, over the same UCX/TCP/veth; GB/s beside the ceiling.
- ``serve``: the demo cluster (etcd + prefill on A, router + decode on B) answering long-prompt requests: TTFT
  breakdown and KV transfer rate per request as the decode worker measured it.
- ``faults``: link down while a request's KV crosses -> time until the router drops the cut-off prefill worker
  (lease TTL + 1 s target), requests sent meanwhile (served by node B's decode worker), link up -> time until the
  prefill worker is back; etcd restarted -> time the workers were not served; requests lost (client-visible, after
  the openai client's retries) across all of it.
GB/s = 1e9 B/s. Numbers on this 2-core machine are noisy (other jobs share it): compare within one run only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "two_node_pd"))

from cluster import Cluster
from topology import Node, Topology
from two_node_pd import discovery_supported, prompt_of

ROOT = Path(__file__).resolve().parents[1]

FRAGMENTS = (16 << 10, 256 << 10, 4 << 20)
TOTAL = 128 << 20


def ucx_env(node: Node) -> dict[str, str]:
    return dict(
        os.environ,
        UCX_TLS="tcp",
        UCX_NET_DEVICES=node.device,
        KVXFER_HOST_ID=f"bench-{node.label}",
        KVXFER_UCX_CMA="off",
        UCX_MEM_MMAP_HOOK_MODE="none",
    )


def perftest(topology: Topology, size: int, test: str) -> dict[str, Any]:
    """``ucx_perftest -t test`` from node B to node A over the link (``ucp_get`` with 32 outstanding reads, as a
    pull keeps many in flight; ``ucp_put_bw``); GB/s."""
    from kvxfer.bench.ceiling import perftest_binary

    found = perftest_binary()
    if found is None:
        return {"test": test, "nbytes": size, "error": "ucx_perftest not found"}
    binary, env = found
    port = 13337
    server_env = dict(env, **{k: v for k, v in ucx_env(topology.a).items() if k.startswith("UCX_")})
    client_env = dict(env, **{k: v for k, v in ucx_env(topology.b).items() if k.startswith("UCX_")})
    server = subprocess.Popen(
        topology.a.command([binary, "-p", str(port)]),
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    iterations = max(20, TOTAL // size)
    extra = ["-O", "32"] if test == "ucp_get" else []
    try:
        time.sleep(0.5)
        client = subprocess.run(
            topology.b.command(
                [
                    binary,
                    topology.a.address,
                    "-p",
                    str(port),
                    "-t",
                    test,
                    *extra,
                    "-s",
                    str(size),
                    "-n",
                    str(iterations),
                    "-w",
                    "10",
                ]
            ),
            check=False,
            env=client_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.kill()
        server.wait()
    final = re.search(r"Final:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", client.stdout)
    if not final:
        return {"test": test, "nbytes": size, "error": (client.stdout + client.stderr)[-500:]}
    # perftest's MB/s columns are MiB/s; the 6th is the overall average over all iterations
    return {
        "test": f"{test} {' '.join(extra)}".strip(),
        "nbytes": size,
        "iterations": iterations,
        "gbps": float(final.group(6)) * (1 << 20) / 1e9,
    }


def tcp_stream(topology: Topology, nbytes: int = 256 << 20) -> dict[str, Any]:
    """One TCP stream of ``nbytes`` from node A to node B (Python sockets, 4 MiB writes): the link's plain rate."""
    port = 13339
    code = (
        "import socket,sys,time;s=socket.create_server(({host!r},{port}));c,_=s.accept();b=bytes(4<<20);"
        "n={n};sent=0\nwhile sent<n: sent+=c.send(b[:min(len(b),n-sent)])\nc.close()"
    )
    server = subprocess.Popen(
        topology.a.command([sys.executable, "-c", code.format(host=topology.a.address, port=port, n=nbytes)])
    )
    reader = (
        "import socket,time,sys\nfor i in range(50):\n try:\n  c=socket.create_connection(({host!r},{port}))"
        "\n  break\n except OSError: time.sleep(0.1)\nt=time.perf_counter();n=0\nwhile True:\n d=c.recv(4<<20)"
        "\n if not d: break\n n+=len(d)\nprint(n, time.perf_counter()-t)"
    )
    try:
        out = subprocess.run(
            topology.b.command([sys.executable, "-c", reader.format(host=topology.a.address, port=port)]),
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout.split()
    finally:
        server.kill()
        server.wait()
    received, seconds = int(out[0]), float(out[1])
    return {"nbytes": received, "seconds": seconds, "gbps": received / seconds / 1e9}


# -- kvxfer agent-level pull across the link ---------------------------------------------------------------------


def side_server(listen: str, nbytes: int, token: str) -> None:
    """Node A: export a pool; print the side channel address (which requires ``token``); serve until stdin
    closes."""
    import numpy as np

    import kvxfer

    with kvxfer.Agent("bench-a", backends=["ucx"], listen=listen, token=token) as agent:
        pool = np.frombuffer(np.random.default_rng(1).bytes(nbytes), dtype=np.uint8).copy()
        agent.register(pool, name="kv")
        print(agent.listen_address, flush=True)
        sys.stdin.read()


def side_client(address: str, nbytes: int, repeats: int, token: str) -> None:
    """Node B: pull the whole pool in fragments of each size (random order), ``repeats`` times; JSON lines."""
    import numpy as np

    import kvxfer

    with kvxfer.Agent("bench-b", backends=["ucx"], timeouts=kvxfer.Timeouts(transfer=300.0)) as agent:
        local = np.zeros(nbytes, dtype=np.uint8)
        region = agent.register(local, name="kv")
        peer = agent.connect_to(address, token=token)
        remote = peer.region("kv")
        for fragment in FRAGMENTS:
            count = nbytes // fragment
            rng = np.random.default_rng(fragment)
            offsets = rng.permutation(count).astype(np.int64) * fragment
            plan = agent.plan(
                kvxfer.Descs.from_ranges(region, offsets, fragment),
                peer,
                kvxfer.Descs.from_ranges(remote, offsets, fragment),
            )
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                agent.read(plan).wait(300.0)
                times.append(time.perf_counter() - began)
            transports = ",".join(f"{t}/{d}" for t, d in peer.backends[0].transports(peer))
            times.sort()
            print(
                json.dumps(
                    {
                        "fragment": fragment,
                        "nbytes": count * fragment,
                        "median_s": times[len(times) // 2],
                        "gbps": count * fragment / times[len(times) // 2] / 1e9,
                        "repeats": repeats,
                        "transports": transports,
                        "path": plan.backend.data_path(plan),
                    }
                ),
                flush=True,
            )


def kvxfer_pull(topology: Topology, nbytes: int, repeats: int) -> list[dict[str, Any]]:
    me = [sys.executable, str(Path(__file__).resolve())]
    token = os.urandom(16).hex()  # the side channel listens on a node address: it requires a secret
    server = subprocess.Popen(
        topology.a.command([*me, "--side", "server", "--listen", f"{topology.a.address}:0", "--nbytes", str(nbytes)]),
        env=dict(ucx_env(topology.a), BENCH_TOKEN=token),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        address = server.stdout.readline().strip()
        client = subprocess.run(
            topology.b.command(
                [*me, "--side", "client", "--address", address, "--nbytes", str(nbytes), "--repeats", str(repeats)]
            ),
            check=False,
            env=dict(ucx_env(topology.b), BENCH_TOKEN=token),
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        server.kill()
        server.wait()
    rows = [json.loads(line) for line in client.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"kvxfer pull gave nothing: {client.stderr[-2000:]}")
    return rows


# -- the serving cluster -------------------------------------------------------------------------------------------


def serve_requests(cluster: Cluster, count: int, prompt_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for index in range(count):
        timing = cluster.chat(prompt_of(prompt_tokens, 1000 + index), max_tokens=4)["timing"]
        transfer = float(timing.get("transfer_s", 0.0))
        rows.append({**timing, "kv_gbps": float(timing.get("kv_bytes", 0)) / transfer / 1e9 if transfer else None})
    return rows


def faults(cluster: Cluster, topology: Topology, prompt_tokens: int) -> dict[str, Any]:
    """prefill-a cut off etcd (its relay stopped); the link cut while a request's KV crosses it, then restored;
    etcd restarted. Times to removal / return, and requests lost as the client sees them (after the openai
    client's 2 retries) and as the router counts them (each failed attempt)."""
    outcomes: list[dict[str, Any]] = []

    def send(tag: str, tokens: int = 600, prefill: str = "auto") -> None:
        began = time.monotonic()
        try:
            answer = cluster.chat(
                prompt_of(tokens, len(outcomes) + 2000), max_tokens=4, prefill=prefill, timeout_s=30.0, max_retries=2
            )
            outcomes.append(
                {
                    "tag": tag,
                    "ok": True,
                    "s": time.monotonic() - began,
                    "prefill_worker": answer["timing"].get("prefill_worker"),
                }
            )
        except Exception as error:  # noqa: BLE001 - a lost request is the measurement, kept with its reason
            outcomes.append({"tag": tag, "ok": False, "s": time.monotonic() - began, "error": repr(error)[:300]})

    result: dict[str, Any] = {}
    errors_before = cluster.metric("kvxfer_requests_total", outcome="error")
    # 1. prefill-a loses etcd (not the router): removal by its lease alone
    relay = cluster.processes["relay-prefill-a"]
    relay.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    cluster.wait_workers({"prefill-a"}, 60.0, absent=True)
    result["etcd_cut_to_removal_s"] = time.monotonic() - stopped
    result["removed_by"] = (
        "lease"
        if any(
            "router: worker prefill-a" in line and "discovery" in line
            for line in cluster.log("router", 50000).splitlines()
        )
        else "heartbeat"
    )
    send("etcd_cut_0")
    relay.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    cluster.wait_workers({"prefill-a"}, 60.0)
    result["etcd_back_to_rejoin_s"] = time.monotonic() - resumed
    send("etcd_back_0", prefill="remote")
    # 2. the link goes down while a long request's KV crosses it (A's egress shaped to 16 Mbit/s so it lasts)
    topology.shape(16)
    base = topology.counters()["tx_bytes"]
    inflight = threading.Thread(target=send, args=("in_flight_at_cut", prompt_tokens))
    inflight.start()
    give_up = time.monotonic() + 60
    while topology.counters()["tx_bytes"] - base < 300_000 and time.monotonic() < give_up:
        time.sleep(0.005)
    topology.set_link(False)
    cut = time.monotonic()
    cluster.wait_workers({"prefill-a"}, 60.0, absent=True)
    result["link_down_to_removal_s"] = time.monotonic() - cut
    for index in range(3):
        send(f"link_down_{index}")
    inflight.join(150)
    topology.set_link(True)
    topology.shape(None)
    up = time.monotonic()
    cluster.wait_workers({"prefill-a", "decode-b"}, 120.0)
    result["link_up_to_back_s"] = time.monotonic() - up
    for index in range(2):
        send(f"link_up_{index}", prefill="remote")
    # 3. etcd restarted (same data dir) while serving
    losses = cluster.metric("kvxfer_worker_losses_total")
    cluster.stop("etcd", timeout_s=5.0)
    for index in range(2):
        send(f"etcd_down_{index}", prefill="remote")
    cluster.start_etcd()
    time.sleep(cluster.lease_ttl_s + 1.0)
    for index in range(2):
        send(f"etcd_restarted_{index}", prefill="remote")
    result["workers_dropped_by_etcd_restart"] = cluster.metric("kvxfer_worker_losses_total") - losses
    result["requests"] = outcomes
    result["lost_client_visible"] = sum(1 for o in outcomes if not o["ok"])
    result["failed_attempts_router"] = cluster.metric("kvxfer_requests_total", outcome="error") - errors_before
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("server", "client"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--listen", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nbytes", type=int, default=TOTAL)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", default="perftest,kvxfer,serve,faults")
    parser.add_argument("--mode", choices=("auto", "netns", "loopback"), default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=1900)
    parser.add_argument("--lease-ttl", type=float, default=3.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.side == "server":
        side_server(args.listen, args.nbytes, os.environ["BENCH_TOKEN"])
        return 0
    if args.side == "client":
        side_client(args.address, args.nbytes, args.repeats, os.environ["BENCH_TOKEN"])
        return 0
    sections = set(args.sections.split(","))
    date = datetime.datetime.now(datetime.timezone.utc)
    report: dict[str, Any] = {
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()})",
        "date": date.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "gbps": "1e9 B/s",
    }
    with Topology.create(args.mode) as topology:
        report["topology"] = topology.describe()
        print(report["topology"], flush=True)
        if "perftest" in sections:
            report["tcp_stream"] = tcp_stream(topology)
            report["perftest"] = [
                perftest(topology, size, test) for test in ("ucp_get", "ucp_put_bw") for size in FRAGMENTS
            ]
            print("tcp", report["tcp_stream"], "\nperftest", report["perftest"], flush=True)
        if "kvxfer" in sections:
            report["kvxfer_read"] = kvxfer_pull(topology, args.nbytes, args.repeats)
            print("kvxfer", report["kvxfer_read"], flush=True)
            ceiling = {
                row["nbytes"]: row.get("gbps")
                for row in report.get("perftest", [])
                if row["test"].startswith("ucp_get")
            }
            for row in report["kvxfer_read"]:
                if ceiling.get(row["fragment"]):
                    row["ratio_to_perftest_get"] = row["gbps"] / ceiling[row["fragment"]]
        if sections & {"serve", "faults"}:
            missing = discovery_supported()
            report["discovery"] = "static --router" if missing else "etcd"
            workdir = Path(tempfile.mkdtemp(prefix="kvxfer-bench-two-node-"))
            cluster = Cluster(
                topology,
                workdir,
                discovery=not missing,
                lease_ttl_s=args.lease_ttl,
                worker_args=("--transfer-timeout", "5"),
                relayed=("prefill-a",),
            )
            try:
                cluster.start()
                if "serve" in sections:
                    report["serve"] = serve_requests(cluster, 3, args.prompt_tokens)
                    print("serve", report["serve"], flush=True)
                if "faults" in sections and topology.mode == "netns" and not missing:
                    report["lease_ttl_s"] = args.lease_ttl
                    report["faults"] = faults(cluster, topology, args.prompt_tokens)
                    print("faults", json.dumps(report["faults"], indent=1), flush=True)
            finally:
                cluster.close()
            report["logs"] = str(workdir)
    out = Path(args.out or ROOT / "bench" / "results" / f"two_node_cpu_{date:%Y-%m-%d}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
