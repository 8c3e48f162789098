"""Fixtures for the serving tests: real `kvxfer router` / `kvxfer serve` processes, null or real workers, HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

READY = re.compile(r"ready on (http://[0-9.]+:\d+) model=(\S+) control=(\S+)")
START_TIMEOUT_S = 120.0


class Server:
    """A running `kvxfer router` or `kvxfer serve` process and the extra worker processes tests start for it."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, url: str, model: str, control: str) -> None:
        self.process, self.log, self.url, self.model, self.control = process, log, url, model, control
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.http = httpx.Client(base_url=url, timeout=60.0)

    def start_null_worker(
        self,
        name: str,
        role: str,
        token_delay: float = 0.0,
        max_batch: int = 64,
        num_blocks: int = 4096,
        prefill_delay: float = 0.0,
    ) -> subprocess.Popen[bytes]:
        """A `router_null_worker` process (instant or paced answers, no model) connected to this router."""
        log = open(self.log.with_name(f"{self.log.stem}-{name}.log"), "wb")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvxfer.serve.router_null_worker",
                "--router",
                self.control,
                "--name",
                name,
                "--role",
                role,
                "--model",
                self.model,
                "--token-delay",
                str(token_delay),
                "--max-batch",
                str(max_batch),
                "--num-blocks",
                str(num_blocks),
                "--prefill-delay",
                str(prefill_delay),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.workers[name] = process
        return process

    def wait_workers(self, names: set[str], timeout_s: float = 60.0) -> None:
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if names <= {w["name"] for w in self.workers_info()}:
                return
            time.sleep(0.05)
        raise AssertionError(f"workers {names} did not register; log:\n{self.log.read_text()[-3000:]}")

    def workers_info(self) -> list[dict]:
        return self.http.get("/kvxfer/workers").json()["workers"]

    def worker(self, name: str) -> dict:
        return next(w for w in self.workers_info() if w["name"] == name)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
        total = 0.0
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, value = line.rsplit(" ", 1)
            sample = head.split("{", 1)
            if sample[0] != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', sample[1])) if len(sample) > 1 else {}
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(value)
        return total

    def post(self, path: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.http.post(
            path, content=json.dumps(body), headers={"content-type": "application/json", **(headers or {})}
        )

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Stop the server (and its workers); its exit status."""
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for process in self.workers.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)
        return self.process.returncode


def launch(args: list[str], log: Path, timeout_s: float = START_TIMEOUT_S) -> Server:
    """Start ``kvxfer ARGS`` (router or serve, ``--port 0``) and wait for its ready line."""
    out = open(log, "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "kvxfer.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env
    )
    out.close()
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return Server(process, log, match.group(1), match.group(2), match.group(3))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    process.wait(10)
    raise AssertionError(f"kvxfer {args[0]} did not become ready; log:\n{log.read_text(errors='replace')[-4000:]}")


def write_policy(path: Path, **values: object) -> Path:
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def null_cluster(server_dir: Path) -> Iterator[Server]:
    """A router over null workers: 1 prefill, 2 decode; remote prefill above 32 uncached tokens."""
    policy = write_policy(server_dir / "policy.json", max_local_prefill_length=32, ttft_slo_s=60.0)
    server = launch(
        ["router", "--model", "tiny-random", "--port", "0", "--policy", str(policy)], server_dir / "router.log"
    )
    try:
        for name, role in (("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode")):
            server.start_null_worker(name, role)
        server.wait_workers({"prefill-0", "decode-0", "decode-1"})
        yield server
    finally:
        server.stop()
