"""Leases across real processes (UCX): a killed decode and a stopped decode. The prefill frees the blocks when the
lease runs out; a decode that comes back refuses the stale blocks and cancels its reservation."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from kvxfer.engine import KVReady, Request, SamplingParams
from kvxfer.engine.messages import request_to_wire

from .connector_cluster import Side

pytestmark = [pytest.mark.ucx, pytest.mark.timeout(120)]

TTL = 0.5
OPTIONS = {
    "backend": "ucx",
    "prefill_tp": 1,
    "decode_tp": 1,
    "lease_ttl": TTL,
    "prefill_cache": dict(num_blocks=16, block_size=16),
    "decode_cache": dict(num_blocks=16, block_size=8),
}
REQUEST = Request("victim", list(range(100, 140)), SamplingParams(max_tokens=4))


def _sides(tmp: Path, name: str) -> tuple[Side, Side, bytes]:
    """Prefill and decode in a process each, connected, with one request prefilled (its KVReady returned)."""
    prefill, decode = Side("prefill", 1, tmp), Side("decode", 1, tmp)
    options = {**OPTIONS, "name": name}
    [p_info], [d_info] = prefill.call("setup", options), decode.call("setup", options)
    prefill.call("connect", [d_info])
    decode.call("connect", [p_info])
    [[ready]] = prefill.call("prefill", [request_to_wire(REQUEST)])
    return prefill, decode, ready


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine (several processes, torch)
def test_killed_decode_lets_the_lease_expire(tmp_path: Path) -> None:
    prefill, decode, ready = _sides(tmp_path, "killed")
    try:
        decode.kill(0, signal.SIGKILL)
        [drain] = prefill.call("drain", 10.0)
        assert drain["drained"] and drain["free"] == drain["total"]
        assert drain["expired"] == 1 and drain["released"] == 0
        assert KVReady.decode(ready).lease_ttl == TTL
    finally:
        prefill.close()
        decode.close()


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine (several processes, torch)
def test_stopped_decode_refuses_stale_blocks(tmp_path: Path) -> None:
    prefill, decode, ready = _sides(tmp_path, "stopped")
    try:
        decode.kill(0, signal.SIGSTOP)  # stalled before it pulled: no heartbeat reaches the prefill
        [drain] = prefill.call("drain", 10.0)
        assert drain["drained"] and drain["expired"] == 1 and drain["free"] == drain["total"]
        prefill.call("prefill", [request_to_wire(Request("next", list(range(50, 90))))])  # reuses the blocks
        decode.kill(0, signal.SIGCONT)
        time.sleep(0.3)  # let the resumed process take in the expiry notes sent while it was stopped
        [report] = decode.call("receive_late", ready)
        [(request_id, admitted, error, *_)] = report["admissions"]
        assert request_id == "victim" and not admitted and "lease expired" in error
        assert report["free"] == report["total"] and not report["pending"] and report["tokens"] == {}
    finally:
        prefill.close()
        decode.close()
