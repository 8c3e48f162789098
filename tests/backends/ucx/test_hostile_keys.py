"""Corrupted UCX worker addresses and remote keys never reach libucp (issue 14, item 2).

Before the fix a bit flip in the worker address aborted the process inside ``ucp_ep_create`` (a UCX assertion), a
bit flip in a packed rkey crashed it in ``ucp_ep_rkey_unpack``, and a truncated rkey was accepted. The UCX info now
carries a digest of the address and every packed rkey, checked before UCX parses either: each case must end in a
kvxfer error. The connecting side runs in a child process so that a regression shows as a dead child (signal),
not a dead test run; the target must keep serving too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvxfer.metadata import AgentMetadata

from .remote import RemoteAgent

pytestmark = [pytest.mark.ucx, pytest.mark.timeout(180)]

_CHILD = r"""
import json, sys
import kvxfer
from kvxfer.errors import KvxferError
cases = json.loads(sys.stdin.read())
outcomes = []
with kvxfer.Agent("prober", backends=["ucx"]) as agent:
    for case in cases:
        try:
            peer = agent.connect(bytes.fromhex(case))
        except KvxferError as error:
            outcomes.append(type(error).__name__)
        else:
            outcomes.append("connected")
print(json.dumps(outcomes))
"""


def _with_ucx(meta: AgentMetadata, blob: bytes | None = None, key: bytes | None = None) -> bytes:
    backends = dict(meta.backends)
    if blob is not None:
        backends["ucx"] = blob
    regions = meta.regions
    if key is not None:
        regions = tuple(dataclasses.replace(r, keys={**r.keys, "ucx": key}) if r.name == "buf" else r for r in regions)
    return dataclasses.replace(meta, backends=backends, regions=regions).encode()


def _run(cases: list[bytes]) -> list[str]:
    env = {**os.environ, "UCX_MEM_MMAP_HOOK_MODE": "none"}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps([c.hex() for c in cases]),
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    assert result.returncode == 0, f"the connecting process died ({result.returncode}): {result.stderr[-2000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_flipped_addresses_flipped_and_truncated_keys_are_refused() -> None:
    rng = np.random.default_rng(14)
    with RemoteAgent("target") as target:
        meta = AgentMetadata.decode(target.metadata)
        blob = meta.backends["ucx"]
        key = next(r.keys["ucx"] for r in meta.regions if r.name == "buf")
        cases: list[bytes] = [target.metadata]  # the control: the untouched metadata connects
        # bit flips in the digest and the worker address (bytes 40 on; before them: probe token and export table
        # address, which never reach libucp), and in the key
        for position in rng.choice(np.arange(40, len(blob)), size=min(60, len(blob) - 40), replace=False).tolist():
            flipped = bytearray(blob)
            flipped[position] ^= 1 << int(rng.integers(8))
            cases.append(_with_ucx(meta, blob=bytes(flipped)))
        for position in range(len(key)):
            flipped = bytearray(key)
            flipped[position] ^= 1 << int(rng.integers(8))
            cases.append(_with_ucx(meta, key=bytes(flipped)))
        for length in range(1, len(key)):
            cases.append(_with_ucx(meta, key=key[:length]))
        cases.append(_with_ucx(meta, key=key + b"\0"))
        outcomes = _run(cases)
        assert outcomes[0] == "connected", outcomes[0]
        refused = outcomes[1:]
        assert refused == ["HandshakeError"] * len(refused), sorted(set(refused))
        assert target.call("pid") == target.process.pid  # the target never noticed
