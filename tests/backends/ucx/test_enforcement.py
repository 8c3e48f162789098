"""A lying peer cannot make a target's memory move outside what it exported (issue 14, item 1).

The initiator (this process) connects with a forged copy of the target's metadata: the region claims twice its
size, or starts where the target's unregistered canary bytes are. Over every UCX path (cross-memory attach, UCX
puts over shared memory, tcp, staged messages) and with the target trusting same-uid peers (the default: the
export table binds the initiator) or not (KVXFER_UCX_ONE_SIDED=off: staged messages the target checks), the
transfer fails or is refused, the canary is untouched, a READ brings nothing of it back, and the target lives on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import kvxfer
from kvxfer.backends.ucx import UcxBackend
from kvxfer.backends.ucx.config import UcxConfig
from kvxfer.errors import KvxferError
from kvxfer.metadata import AgentMetadata

from .remote import CANARY, RemoteAgent, digest, random_fill, ucx_backend

pytestmark = [pytest.mark.ucx, pytest.mark.timeout(180)]

REGION = 1 << 20
CANARY_NBYTES = 1 << 20
PATHS = {
    "cma": UcxConfig(),
    "shm-direct": UcxConfig(cma="off", stage_below=0),
    "shm-staged": UcxConfig(cma="off"),
    "tcp": UcxConfig(cma="off", error_mode="peer", stage_below=0),
}
EXPECTED = {  # target mode -> path -> the data path the backend chooses for the forged plans
    "same-uid": {"cma": "cma", "shm-direct": "direct", "shm-staged": "staged", "tcp": "direct"},
    "off": {"cma": "staged", "shm-direct": "staged", "shm-staged": "staged", "tcp": "staged"},
}


@pytest.fixture(scope="module", params=["same-uid", "off"])
def target(request):
    with RemoteAgent("target", REGION, environ={"KVXFER_UCX_ONE_SIDED": request.param}, canary=CANARY_NBYTES) as remote:
        remote.mode = request.param
        yield remote


def _expected(mode: str, path: str, how: str) -> str:
    if how == "one-span" and mode == "same-uid" and path == "shm-staged":
        return "direct"  # one fragment is never staged when one-sided access is allowed
    return EXPECTED[mode][path]


def _forged(metadata: bytes, how: str) -> bytes:
    meta = AgentMetadata.decode(metadata)
    regions = []
    for region in meta.regions:
        if region.name == "buf":
            if how in ("size", "one-span"):
                region = dataclasses.replace(region, nbytes=2 * region.nbytes)
            else:
                region = dataclasses.replace(region, addr=region.addr + region.nbytes)
        regions.append(region)
    return dataclasses.replace(meta, regions=tuple(regions)).encode()


def _plans(agent, region, peer, how: str, path: str):
    """A plan whose remote spans run past the real region (size), or lie wholly outside it (addr)."""
    if how == "one-span":  # one large fragment across the end: the checked path sends it as one span
        fragment = 256 << 10
        return agent.plan(
            kvxfer.Descs.from_ranges(region, [0], fragment),
            peer,
            kvxfer.Descs.from_ranges(peer.region("buf"), [REGION - fragment // 2], fragment),
        ), fragment
    if path == "shm-staged":  # >= 128 small fragments, the last ones past the real end
        fragment, count = 4096, 256
        remote = np.arange(count, dtype=np.int64) * fragment + (REGION - 128 * fragment if how == "size" else 0)
    else:
        fragment, count = 64 << 10, 4
        remote = np.arange(count, dtype=np.int64) * fragment + (REGION - fragment if how == "size" else 0)
    local = np.arange(count, dtype=np.int64) * fragment
    remote = remote[::-1].copy()  # reversed: the pairs do not coalesce into one fragment
    return agent.plan(
        kvxfer.Descs.from_ranges(region, local, fragment),
        peer,
        kvxfer.Descs.from_ranges(peer.region("buf"), remote, fragment),
    ), fragment


@pytest.mark.parametrize("how", ["size", "addr", "one-span"])
@pytest.mark.parametrize("path", list(PATHS))
def test_a_forged_region_moves_nothing_outside_the_export(target: RemoteAgent, path: str, how: str) -> None:
    agent = kvxfer.Agent(
        f"liar-{path}-{how}", backends=[UcxBackend(PATHS[path])], timeouts=kvxfer.Timeouts(transfer=5.0, close=2.0)
    )
    with agent:
        local = np.zeros(4 << 20, dtype=np.uint8)
        random_fill(local, seed=5)
        region = agent.register(local, name="buf")
        peer = agent.connect(_forged(target.metadata, how))
        inside = target.call("digest", [0], REGION)
        plan, _fragment = _plans(agent, region, peer, how, path)
        assert ucx_backend(agent._backends[0]).data_path(plan) == _expected(target.mode, path, how)
        with pytest.raises(KvxferError):
            agent.write(plan).wait(10)
        assert target.call("canary"), "the target's unexported bytes changed"
        if how == "addr":  # every span is outside: nothing may land inside either
            assert target.call("digest", [0], REGION) == inside
        local[:] = 0
        with pytest.raises(KvxferError):
            agent.read(plan).wait(10)
        assert not (local == CANARY).any(), "the target's unexported bytes were read"
        assert target.call("pid") == target.process.pid  # alive and serving
        # an honest plan on the same link still works
        honest = agent.connect(target.metadata)
        random_fill(local, seed=6)
        offsets = np.arange(64, dtype=np.int64) * 4096
        plan = agent.plan(
            kvxfer.Descs.from_ranges(region, offsets, 4096),
            honest,
            kvxfer.Descs.from_ranges(honest.region("buf"), offsets[::-1].copy(), 4096),
        )
        agent.write(plan).wait(30)
        assert target.call("digest", offsets[::-1].copy(), 4096) == digest(local, offsets, 4096)
        assert target.call("canary")


def test_large_fragments_are_split_on_the_checked_path() -> None:
    """With one-sided access refused, large fragments cross as checked staged chunks, byte-exact both ways."""
    nbytes = 24 << 20
    with RemoteAgent("strict", nbytes, environ={"KVXFER_UCX_ONE_SIDED": "off"}, canary=4096) as remote:
        agent = kvxfer.Agent("mover", backends=[UcxBackend(UcxConfig(stage_chunk=1 << 20))])
        with agent:
            local = np.zeros(nbytes, dtype=np.uint8)
            random_fill(local, seed=9)
            region = agent.register(local, name="buf")
            peer = agent.connect(remote.metadata)
            size = 6 << 20  # six chunks each
            plan = agent.plan(
                kvxfer.Descs.from_ranges(region, [0, size, 2 * size], size),
                peer,
                kvxfer.Descs.from_ranges(peer.region("buf"), [3 * size, 0, size], size),
            )
            assert ucx_backend(agent._backends[0]).data_path(plan) == "staged"
            agent.write(plan).wait(30)
            assert remote.call("digest", [3 * size, 0, size], size) == digest(local, [0, size, 2 * size], size)
            remote.call("fill", 21)
            expected = remote.call("digest", [3 * size, 0, size], size)
            agent.read(plan).wait(30)
            assert digest(local, [0, size, 2 * size], size) == expected
            assert remote.call("canary")
