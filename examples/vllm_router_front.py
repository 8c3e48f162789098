"""vllm-router (Rust, PyPI ``vllm-router``) round-robin in front of two ``kvxfer serve`` instances (1P1D each).

A compatibility check of kvxfer's OpenAI API with a router no one here wrote. kvxfer's workers speak zmq to the
kvxfer router, so a Rust router sits in front of kvxfer routers (as OpenAI backends), not of the workers.

    python -m venv /tmp/vr && /tmp/vr/bin/pip install vllm-router
    VLLM_ROUTER=/tmp/vr/bin/vllm-router python examples/vllm_router_front.py [--model tiny-random]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from kvxfer.serve import demo


def start_serve(model: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """One `kvxfer serve` 1P1D instance (the demo's launcher) and its base URL."""
    process = demo.start_serve(model, log)
    ready = demo.wait_ready(process, log, timeout_s=600)
    if ready is None:
        raise RuntimeError(f"kvxfer serve did not start: {log.read_text(errors='replace')[-2000:]}")
    return process, ready[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--port", type=int, default=18777)
    args = parser.parse_args()
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as directory:
        try:
            urls = []
            for index in range(2):
                process, url = start_serve(args.model, Path(directory) / f"serve-{index}.log")
                processes.append(process)
                urls.append(url)
            processes.append(
                subprocess.Popen(
                    [
                        os.environ.get("VLLM_ROUTER", "vllm-router"),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(args.port),
                        "--policy",
                        "round_robin",
                        "--worker-urls",
                        *urls,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            front = f"http://127.0.0.1:{args.port}"
            give_up = time.monotonic() + 60
            while time.monotonic() < give_up:
                try:
                    if httpx.get(f"{front}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            client = openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0, timeout=120)
            model = httpx.get(f"{urls[0]}/v1/models").json()["data"][0]["id"]
            for index in range(4):
                reply = client.completions.create(
                    model=model, prompt=f"Request {index} through two routers:", max_tokens=8, temperature=0
                )
                print(f"completion {index}: {reply.choices[0].text!r} ({reply.choices[0].finish_reason})")
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=16, stream=True
            )
            print("chat (streamed):", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
            for url in urls:
                served = [
                    line
                    for line in httpx.get(f"{url}/metrics").text.splitlines()
                    if line.startswith("kvxfer_requests_total")
                ]
                print(f"{url}: {served}")
        finally:
            for process in reversed(processes):
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
