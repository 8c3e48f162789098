"""Small builders shared by tests (not fixtures: plain functions, explicit at the call site)."""

from __future__ import annotations

import time

import numpy as np
from numpy.lib.stride_tricks import as_strided

import kvxfer
from kvxfer import KVCacheSpec, KVPipe, TransferState
from kvxfer.backends.mock import MockBackend


def random_bytes(nbytes: int, seed: int | None = None) -> np.ndarray:
    """uint8[nbytes] of random data (never zeros: zeros hide unwritten bytes)."""
    data = np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8).copy()
    data[data == 0] = 1
    return data


def agent_pair(nbytes: int = 1 << 16, backend: str | MockBackend = "local", **kwargs):
    """Two agents in this process, each with one registered region "buf": (src agent, dst agent, src array,
    dst array, peer of src as seen by dst). The source holds random bytes, the destination zeros."""
    source_agent = kvxfer.Agent("src", backends=[backend if isinstance(backend, str) else MockBackend()], **kwargs)
    destination_agent = kvxfer.Agent("dst", backends=[backend], **kwargs)
    source, destination = random_bytes(nbytes), np.zeros(nbytes, dtype=np.uint8)
    source_agent.register(source, name="buf")
    destination_agent.register(destination, name="buf")
    peer = destination_agent.connect(source_agent.metadata())
    return source_agent, destination_agent, source, destination, peer


# ---- KV pipe agents: one prefill and one decode agent, mock backends ----------------------------------------------

PIPE_SPEC = KVCacheSpec(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=4, head_dim=8, dtype="float32")


def pipe_agents(fault=None):
    """Prefill and decode agents (mock backends) connected both ways, prefill cache random."""
    prefill = kvxfer.Agent("p", backends=[MockBackend()])
    decode = kvxfer.Agent("d", backends=[MockBackend(on_post=lambda *a: fault)])
    source = np.random.default_rng(0).standard_normal(PIPE_SPEC.tensor_shape).astype(np.float32)
    target = np.zeros(PIPE_SPEC.tensor_shape, np.float32)
    prefill_region = prefill.register(source, name="kv")
    decode.register(target, name="kv")
    peer = decode.connect(prefill.metadata())
    prefill.connect(decode.metadata())
    return prefill, decode, source, target, peer, prefill_region


# ---- KV pipe clusters: prefill and decode ranks as agents of this process ------------------------------------------
#
# The expected decode caches are built independently of the kernels: each token's K/V is written through a NumPy
# strided view of the spec (the same view the spec tests check), from one full-head "sequence" array.

LAYERS, DIM, BLOCKS = 2, 4, 12


def logical(cache: np.ndarray, spec: KVCacheSpec) -> np.ndarray:
    """[layer, block, part, head, token, dim] view of a cache buffer."""
    flat = cache.reshape(-1)
    return as_strided(flat[spec.offset :], spec.shape, tuple(s * flat.itemsize for s in spec.element_strides))


def make_spec(tp_rank, tp_size, heads, block_size, layout, parts=2):
    local = max(heads // tp_size, 1)
    return KVCacheSpec(
        num_layers=LAYERS,
        num_blocks=BLOCKS,
        block_size=block_size,
        num_kv_heads=local,
        head_dim=DIM,
        dtype="float32",
        layout=layout,
        tp_rank=tp_rank,
        tp_size=tp_size,
        total_kv_heads=heads,
        num_kv_parts=parts,
        model="m",
    )


def write_sequence(cache, spec, block_ids, sequence):
    """sequence: [layer, part, token, global head, dim] -> the cache's blocks, its own heads only."""
    view, (g0, g1) = logical(cache, spec), spec.head_range()
    for t in range(sequence.shape[2]):
        block, slot = block_ids[t // spec.block_size], t % spec.block_size
        view[:, block, :, :, slot, :] = sequence[:, :, t, g0:g1, :]


class Cluster:
    """Prefill ranks and decode ranks as agents of this process, prefill caches filled from one sequence."""

    def __init__(
        self, p_tp, d_tp, heads, p_block, d_block, p_layout, d_layout, tokens, parts=2, seed=0, backend="local"
    ):
        rng = np.random.default_rng(seed)
        self.sequence = rng.standard_normal((LAYERS, parts, tokens, heads, DIM)).astype(np.float32)
        self.tokens = tokens
        self.p_specs = [make_spec(r, p_tp, heads, p_block, p_layout, parts) for r in range(p_tp)]
        self.d_specs = [make_spec(r, d_tp, heads, d_block, d_layout, parts) for r in range(d_tp)]
        self.p_ids = rng.permutation(BLOCKS)[: -(-tokens // p_block)]
        self.d_ids = rng.permutation(BLOCKS)[: -(-tokens // d_block)]
        self.prefill = [kvxfer.Agent(f"p{r}", backends=[backend]) for r in range(p_tp)]
        self.decode = [kvxfer.Agent(f"d{r}", backends=[backend]) for r in range(d_tp)]
        self.p_caches, self.d_caches = [], []
        for agent, spec in zip(self.prefill, self.p_specs, strict=True):
            cache = np.zeros(spec.tensor_shape, np.float32)
            write_sequence(cache, spec, self.p_ids, self.sequence)
            agent.register(cache, name="kv")
            self.p_caches.append(cache)
        for agent, spec in zip(self.decode, self.d_specs, strict=True):
            cache = np.full(spec.tensor_shape, -7.0, np.float32)  # poison: every byte we expect must be written
            agent.register(cache, name="kv")
            self.d_caches.append(cache)
        self.peers = [[agent.connect(p.metadata()) for p in self.prefill] for agent in self.decode]

    def pipe(self, rank, **kwargs):
        return KVPipe(self.decode[rank], self.d_specs[rank], self.peers[rank], self.p_specs, **kwargs)

    def expected(self, rank):
        cache = np.full(self.d_specs[rank].tensor_shape, -7.0, np.float32)
        write_sequence(cache, self.d_specs[rank], self.d_ids, self.sequence)
        return cache

    def close(self):
        for agent in self.prefill + self.decode:
            agent.close()


def run_pull(cluster, strategy="auto", notify=b"done"):
    for rank in range(len(cluster.decode)):
        pipe = cluster.pipe(rank, strategy=strategy)
        handle = pipe.pull(cluster.d_ids, cluster.p_ids, notify=notify, num_tokens=cluster.tokens)
        handle.wait(timeout=30)
        assert handle.state is TransferState.DONE
        np.testing.assert_array_equal(cluster.d_caches[rank], cluster.expected(rank))
        pipe.close()


def announcers(cluster):
    """A pipe on every prefill rank towards decode rank 0, to announce ready layers with."""
    return [
        KVPipe(agent, spec, agent.connect(cluster.decode[0].metadata()), cluster.d_specs[0])
        for agent, spec in zip(cluster.prefill, cluster.p_specs, strict=True)
    ]


def wait_until(check, seconds=5.0):
    give_up = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < give_up, "timed out waiting"
        time.sleep(0.005)


def settle(handle, seconds=0.2):
    """Poll ``handle`` for a while; it must still be pending afterwards."""
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        assert handle.poll() is TransferState.PENDING
        time.sleep(0.01)
