"""The router's added TTFT: `kvxfer router` over a null worker vs the same HTTP stack answering directly.

Three processes: `kvxfer router --model tiny-random` with one null worker (`kvxfer.serve.router_null_worker`: the
worker side of the protocol, answering at once), and a baseline server (FastAPI + uvicorn, like the router) whose
streaming completion endpoint sends the first SSE chunk at once. A client streams ``--requests`` completions through
each (``--concurrency`` at a time) and times the first content chunk. The router's added TTFT is the difference;
the router also reports its own part (arrival -> first token, and arrival -> dispatch) in the TTFT breakdown.

    .venv/bin/python bench/router_bench.py --requests 1000 --out bench/results/router_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

PROMPT = "Measure the router, not the model. " * 4
READY = re.compile(r"ready on (http://[0-9.]+:\d+) model=\S+ control=(\S+)")


def baseline_server(port: int) -> None:
    """A FastAPI app on uvicorn with one streaming endpoint answering its first chunk at once (run in a child)."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        json.loads(await request.body())

        async def chunks():  # type: ignore[no-untyped-def]
            body = {
                "id": "cmpl-0",
                "object": "text_completion",
                "created": 0,
                "model": "baseline",
                "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}],
            }
            yield b"data: " + json.dumps(body).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    from kvxfer.serve.launcher import bind  # the router's listening socket, options included (TCP_NODELAY)

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[bind("127.0.0.1", port)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def measure(
    router_url: str, baseline_url: str, requests: int, concurrency: int
) -> tuple[list[float], list[float], list[dict]]:
    """Client TTFT (seconds) through the router and through the baseline, interleaved request by request (so load
    from other processes on the machine hits both alike), and the router's own breakdowns."""
    body = {"model": "tiny-random", "prompt": PROMPT, "max_tokens": 1, "stream": True, "kvxfer": {"timing": True}}
    routed: list[float] = []
    direct: list[float] = []
    breakdowns: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (
        httpx.AsyncClient(base_url=router_url, timeout=30.0, limits=limits) as router,
        httpx.AsyncClient(base_url=baseline_url, timeout=30.0, limits=limits) as baseline,
    ):

        async def one(client: httpx.AsyncClient, into: list[float]) -> None:
            start = time.perf_counter()
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                first = None
                async for line in reply.aiter_lines():
                    if line.startswith("data: {") and first is None:
                        first = time.perf_counter() - start
                    if line.startswith("data: {") and '"kvxfer"' in line:
                        breakdowns.append(json.loads(line[6:])["kvxfer"])
                if first is None:
                    raise RuntimeError(f"no content chunk from {client.base_url}: HTTP {reply.status_code}")
                into.append(first)

        for _ in range(min(50, requests)):  # warm up connections and code paths
            await one(baseline, direct)
            await one(router, routed)
        routed.clear()
        direct.clear()
        breakdowns.clear()
        pending = list(range(requests))

        async def worker() -> None:
            while pending:
                pending.pop()
                await one(baseline, direct)
                await one(router, routed)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return routed, direct, breakdowns


def stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values) * 1e3
    return {
        "p50_ms": float(np.percentile(array, 50)),
        "p99_ms": float(np.percentile(array, 99)),
        "mean_ms": float(array.mean()),
        "n": len(values),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", default="bench/results/router_overhead.json")
    parser.add_argument("--baseline-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server is not None:
        baseline_server(args.baseline_server)
        return 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = Path("/tmp") / f"router_bench_{os.getpid()}.log"
    children: list[subprocess.Popen[bytes]] = []
    try:
        with open(log, "wb") as out:
            router = subprocess.Popen(
                [sys.executable, "-m", "kvxfer.cli", "router", "--model", "tiny-random", "--port", "0"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        children.append(router)
        give_up = time.monotonic() + 120
        while not (match := READY.search(log.read_text())) and time.monotonic() < give_up:
            time.sleep(0.1)
        if match is None:
            raise RuntimeError(f"router did not start: {log.read_text()[-2000:]}")
        router_url, control = match.group(1), match.group(2)
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kvxfer.serve.router_null_worker",
                    "--router",
                    control,
                    "--name",
                    "null-0",
                    "--role",
                    "agg",
                    "--max-batch",
                    "1024",
                ]
            )
        )
        port = free_port()
        children.append(subprocess.Popen([sys.executable, __file__, "--baseline-server", str(port)]))
        baseline_url = f"http://127.0.0.1:{port}"
        wait_http(baseline_url)
        while httpx.get(f"{router_url}/health").status_code != 200:
            time.sleep(0.1)
        runs = []
        for concurrency in args.concurrency:
            routed, base, breakdowns = asyncio.run(measure(router_url, baseline_url, args.requests, concurrency))
            run = {
                "concurrency": concurrency,
                "baseline_ttft": stats(base),
                "router_ttft": stats(routed),
                "router_internal_ttft": stats([b["ttft_s"] for b in breakdowns]),
                "router_dispatch": stats([b["router_s"] for b in breakdowns]),
            }
            run["added_ttft_p50_ms"] = run["router_ttft"]["p50_ms"] - run["baseline_ttft"]["p50_ms"]
            run["added_ttft_p99_ms"] = run["router_ttft"]["p99_ms"] - run["baseline_ttft"]["p99_ms"]
            runs.append(run)
            print(
                f"concurrency {concurrency}: client TTFT p50 {run['router_ttft']['p50_ms']:.3f} ms via the router "
                f"vs {run['baseline_ttft']['p50_ms']:.3f} ms direct -> added p50 {run['added_ttft_p50_ms']:.3f} ms, "
                f"p99 {run['added_ttft_p99_ms']:.3f} ms; inside the router: arrival->first token p50 "
                f"{run['router_internal_ttft']['p50_ms']:.3f} ms, arrival->dispatch p50 "
                f"{run['router_dispatch']['p50_ms']:.3f} ms"
            )
        result = {
            "bench": "router_overhead",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "command": " ".join([sys.executable, *sys.argv]),
            "requests": args.requests,
            "target_added_ttft_p50_ms": 1.0,
            "runs": runs,
            "load_average": os.getloadavg(),
            "method": "client-side time to the first SSE content chunk, streaming completions with max_tokens=1; "
            "router = kvxfer router + one null worker (zmq, answers at once); baseline = FastAPI + "
            "uvicorn (same listening socket options) answering the first chunk at once; requests "
            "alternate baseline/router; added = router - baseline percentiles",
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        for child in reversed(children):
            child.terminate()
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
        log.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
