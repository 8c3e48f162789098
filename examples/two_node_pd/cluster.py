"""The processes of the two-node demo: etcd and a prefill worker on node A, the router and a decode worker on
node B, started through ``kvxfer`` commands exactly as an operator would on two hosts, and an HTTP client that
runs inside node B (threads that entered B's network namespace).

Every process gets its own log file under ``workdir`` and dies with this one (PR_SET_PDEATHSIG); :meth:`close`
stops them all (SIGTERM, then SIGKILL) and is safe to call twice.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from topology import Node, Topology

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
READY = re.compile(r"ready on (http://\S+) model=(\S+) control=(\S+)")


def _die_with_parent() -> None:  # in the child, between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _enter_netns(netns: str | None) -> None:
    """Move the calling thread (only it) into ``netns``: sockets it creates from now on live there."""
    if netns is None:
        return
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if ctypes.CDLL("libc.so.6", use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({netns}) failed")
    finally:
        os.close(fd)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Cluster:
    """etcd + prefill worker on ``topology.a``, router + decode worker on ``topology.b``.

    ``discovery``: the workers find the router through etcd (``--discovery``) and the router drops workers whose
    lease lapsed; False: static ``--router`` addresses (etcd is still started, unused). ``relayed``: workers that
    reach etcd through a :mod:`tcp_relay` process (``relay-<name>``; SIGSTOP it to cut only that worker off etcd)."""

    def __init__(
        self,
        topology: Topology,
        workdir: Path,
        model: str = "tiny-random",
        discovery: bool = True,
        lease_ttl_s: float = 3.0,
        cluster: str = "demo",
        worker_args: tuple[str, ...] = (),
        relayed: tuple[str, ...] = (),
    ) -> None:
        self.topology, self.workdir, self.model = topology, workdir, model
        self.discovery, self.lease_ttl_s, self.worker_args = discovery, lease_ttl_s, worker_args
        self.relayed, self.cluster = relayed, cluster
        a, b = topology.a, topology.b
        isolated = topology.mode == "netns"  # each namespace has its own ports
        self.etcd_port = 2379 if isolated else free_port()
        self.etcd_peer_port = 2380 if isolated else free_port()
        self.http_port = 8000 if isolated else free_port(b.address)
        self.control = f"tcp://{b.address}:{7100 if isolated else free_port(b.address)}"
        self.discovery_url = f"etcd://{a.address}:{self.etcd_port}/{cluster}"
        self.url = f"http://{b.address}:{self.http_port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.client = concurrent.futures.ThreadPoolExecutor(
            8, thread_name_prefix="node-b-client", initializer=_enter_netns, initargs=(b.netns,)
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        # the agents' side channels listen on the nodes' addresses: they require a shared secret there
        self.token_file = self.workdir / "agent.token"
        self.token_file.write_text(os.urandom(16).hex() + "\n")
        self.token_file.chmod(0o600)

    # -- processes ------------------------------------------------------------------------------------------------

    def environment(self, node: Node) -> dict[str, str]:
        """What a process of ``node`` needs: UCX over TCP on the node's device only, and a host id per node so
        kvxfer does not take same-host shortcuts (cross-memory attach) between two "hosts" of one machine."""
        env = dict(os.environ)
        env.update(
            {
                "UCX_TLS": "tcp",
                "UCX_NET_DEVICES": node.device,
                "KVXFER_HOST_ID": f"two-node-{node.label}",
                "KVXFER_UCX_CMA": "off",
                "UCX_MEM_MMAP_HOOK_MODE": "none",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def spawn(self, name: str, node: Node, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``node``, its output in ``<workdir>/<name>.log``."""
        log = open(self.workdir / f"{name}.log", "ab")
        process = subprocess.Popen(
            node.command(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(node),
            preexec_fn=_die_with_parent,
        )
        log.close()
        self.processes[name] = process
        return process

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def start_etcd(self) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd not found (Debian: apt-get install etcd-server)")
        a = self.topology.a
        client = f"http://{a.address}:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self.spawn(
            "etcd",
            a,
            [
                etcd,
                "--name",
                "node-a",
                "--data-dir",
                str(self.workdir / "etcd-data"),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"node-a={peer}",
            ],
        )
        self.wait(lambda: self.in_b(_etcd_up, client), 30.0, "etcd did not answer", "etcd")

    def start_router(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "kvxfer.cli",
            "router",
            "--model",
            self.model,
            "--host",
            self.topology.b.address,
            "--port",
            str(self.http_port),
            "--control",
            self.control,
            "--log-level",
            "warning",
            "--policy",
            str(Path(__file__).resolve().parent / "policy.yaml"),
        ]
        if self.discovery:
            argv += ["--discovery", self.discovery_url]
        self.spawn("router", self.topology.b, argv)
        self.wait(lambda: READY.search(self.log("router")) is not None, 120.0, "the router did not start", "router")

    def start_worker(self, name: str, role: str, node: Node) -> None:
        argv = [
            sys.executable,
            "-m",
            "kvxfer.cli",
            "worker",
            "--role",
            role,
            "--model",
            self.model,
            "--name",
            name,
            "--host",
            node.address,
            "--backends",
            "ucx",
            "--router-timeout",
            "600",
            "--token-file",
            str(self.token_file),
            *self.worker_args,
        ]
        if self.discovery:
            url = self.discovery_url
            if name in self.relayed:
                port = free_port()
                relay = Path(__file__).resolve().parent / "tcp_relay.py"
                self.spawn(
                    f"relay-{name}",
                    node,
                    [sys.executable, str(relay), f"127.0.0.1:{port}", f"{self.topology.a.address}:{self.etcd_port}"],
                )
                self.wait(
                    lambda: "relay" in self.log(f"relay-{name}"), 30.0, "the relay did not start", f"relay-{name}"
                )
                url = f"etcd://127.0.0.1:{port}/{self.cluster}"
            argv += ["--discovery", url, "--discovery-ttl", str(self.lease_ttl_s)]
        else:
            argv += ["--router", self.control]
        self.spawn(name, node, argv)

    def start(self, timeout_s: float = 180.0) -> None:
        """etcd, router, prefill-a and decode-b; returns when both workers registered."""
        self.start_etcd()
        self.start_router()
        self.start_worker("prefill-a", "prefill", self.topology.a)
        self.start_worker("decode-b", "decode", self.topology.b)
        self.wait_workers({"prefill-a", "decode-b"}, timeout_s)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        """Stop one process (``sig``, then SIGKILL after ``timeout_s``); its exit status."""
        process = self.processes.pop(name, None)
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def close(self) -> None:
        """Stop every process (workers first, then the router, then etcd). Idempotent."""
        for name in sorted(
            self.processes, key=lambda n: ("etcd", "router").index(n) + 1 if n in ("etcd", "router") else 0
        ):  # workers (and relays) first
            self.stop(name, timeout_s=10.0)
        self.client.shutdown(wait=False, cancel_futures=True)

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str, log: str) -> None:
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            process = self.processes.get(log)
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{log} exited with status {process.returncode}:\n{self.log(log)}")
            try:
                if condition():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout_s:.0f} s; {log} log:\n{self.log(log)}")

    # -- the client, inside node B ----------------------------------------------------------------------------

    def in_b(self, function: Callable[..., T], *args: Any, timeout_s: float = 600.0) -> T:
        """Run ``function(*args)`` on a thread inside node B's network namespace."""
        return self.client.submit(function, *args).result(timeout_s)

    def workers(self) -> list[dict[str, Any]]:
        return self.in_b(_get_json, f"{self.url}/kvxfer/workers")["workers"]

    def wait_workers(self, names: set[str], timeout_s: float, absent: bool = False) -> float:
        """Wait until every one of ``names`` is registered (``absent``: none is); the seconds it took."""
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            present = {w["name"] for w in self.workers()}
            if (not names & present) if absent else names <= present:
                return time.monotonic() - began
            time.sleep(0.05)
        logs = "\n".join(f"--- {n}:\n{self.log(n, 1500)}" for n in sorted(self.processes))
        raise RuntimeError(
            f"workers {sorted(names)} still {'present' if absent else 'missing'} after {timeout_s:.0f} s\n{logs}"
        )

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the router's ``/metrics`` samples called ``name`` whose labels include ``labels``."""
        text = self.in_b(_get_text, f"{self.url}/metrics")
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name)
            and line[len(name) : len(name) + 1] in (" ", "{")
            and all(label in line for label in wanted)
        )

    def chat(
        self, prompt: str, max_tokens: int = 16, prefill: str = "remote", timeout_s: float = 60.0, max_retries: int = 2
    ) -> dict[str, Any]:
        """One chat completion with the openai client from node B; the answer text and the TTFT breakdown."""
        return self.in_b(
            _chat,
            self.url,
            self.model,
            prompt,
            max_tokens,
            prefill,
            timeout_s,
            max_retries,
            timeout_s=timeout_s * (max_retries + 1) + 30,
        )


def _etcd_up(client: str) -> bool:
    import httpx

    try:
        return httpx.post(f"{client}/v3/kv/range", json={"key": "AA=="}, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _get_json(url: str) -> Any:
    import httpx

    return httpx.get(url, timeout=10.0).json()


def _get_text(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=10.0).text


def _chat(
    url: str, model: str, prompt: str, max_tokens: int, prefill: str, timeout_s: float, max_retries: int
) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=timeout_s, max_retries=max_retries)
    try:
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            extra_body={"kvxfer": {"timing": True, "prefill": prefill}},
        )
    finally:
        client.close()
    return {
        "text": answer.choices[0].message.content,
        "finish": answer.choices[0].finish_reason,
        "timing": (answer.model_extra or {}).get("kvxfer", {}),
    }
