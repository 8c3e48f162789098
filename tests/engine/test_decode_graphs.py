"""The padded, shape-static decode step (DecodeGraphs) equals the unpadded eager step: logits and greedy tokens for
ragged batches on the CPU; CUDA graph replay equals eager on a GPU (batch 1, 3 padded to 4, 32; growth across
block boundaries during replay)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

from kvxfer.engine import CacheConfig, DecodeEngine, Model, ModelConfig, Request, SamplingParams
from kvxfer.engine.graphs import DecodeGraphs, width_buckets
from kvxfer.engine.request import Sequence
from kvxfer.engine.runner import ModelRunner
from kvxfer.errors import ConfigError

pytestmark = pytest.mark.timeout(120)


def _requests(prompts: list[list[int]], max_tokens: int) -> list[Request]:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [Request(f"r{i}", p, sampling) for i, p in enumerate(prompts)]


def test_width_buckets_cover_every_width_with_bounded_padding() -> None:
    widths = width_buckets(1000)
    assert widths[:17] == [*range(1, 17), 18] and widths[-1] == 1000 and widths == sorted(set(widths))
    for need in range(1, 1001):
        width = next(w for w in widths if w >= need)
        assert width - need <= need // 8 + 1
    assert len(widths) <= 16 + 8 * 6
    assert width_buckets(1) == [1] and width_buckets(3) == [1, 2, 3]
    with pytest.raises(ConfigError):
        width_buckets(0)


def _prefilled(model: Model, prompts: list[list[int]], cuda_graphs: bool, block_size: int) -> ModelRunner:
    """A runner whose sequences (stored on it as ``seqs``) computed their prompts (one token sampled each)."""
    runner = ModelRunner(model, CacheConfig(num_blocks=256, block_size=block_size), cuda_graphs=cuda_graphs)
    seqs = [Sequence(request) for request in _requests(prompts, 64)]
    for seq in seqs:
        runner.allocate(seq)
    runner.step([(seq, seq.num_tokens) for seq in seqs])
    runner.seqs = seqs  # type: ignore[attr-defined]
    return runner


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_padded_decode_logits_equal_unpadded(tiny_model: Model, make_prompts: Callable, block_size: int) -> None:
    """A ragged batch of 3 (padded to 4) and of 5 (padded to 8): same logits and cache writes, step after step."""
    for count in (3, 5):
        prompts = make_prompts(count, seed=count, low=2, high=30)
        padded = _prefilled(tiny_model, prompts, True, block_size)
        eager = _prefilled(tiny_model, prompts, False, block_size)
        assert padded.graphs is not None and eager.graphs is None and not padded.graphs.capture
        for _ in range(6):  # sequences cross block boundaries (block size 1 and 4 every step or so)
            logits = []
            for runner in (padded, eager):
                logits.append(_next_logits(runner))
                runner.step([(seq, 1) for seq in runner.seqs])  # type: ignore[attr-defined]
            torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
            assert [s.token_ids for s in padded.seqs] == [s.token_ids for s in eager.seqs]  # type: ignore[attr-defined]
        torch.testing.assert_close(padded.cache.tensor, eager.cache.tensor, rtol=1e-5, atol=1e-5)


def _next_logits(runner: ModelRunner) -> torch.Tensor:
    """Give every sequence of ``runner`` (its ``seqs``) a slot for one more token and return that decode step's
    logits on the CPU: through its graphs when it has them, else the unpadded eager step."""
    seqs = runner.seqs  # type: ignore[attr-defined]
    for seq in seqs:
        runner.blocks.append(seq.block_ids, seq.num_tokens)
    tokens = [seq.token_ids[-1] for seq in seqs]
    tables = [list(seq.block_ids) for seq in seqs]
    lengths = [seq.num_tokens for seq in seqs]
    if runner.graphs is not None:  # the graph's output buffer is reused by the next replay: copy it
        return runner.graphs.logits(tokens, tables, lengths).cpu().clone()
    return _eager_logits(runner, tokens, tables, lengths).cpu()


def _eager_logits(runner: ModelRunner, tokens: list[int], tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
    """The unpadded eager decode step's logits (AttentionBatch.build, as ModelRunner.step without graphs)."""
    from kvxfer.engine import AttentionBatch

    device = runner.model.device
    batch = AttentionBatch.build(tables, [1] * len(tokens), lengths, runner.block_size, device)
    with torch.inference_mode():
        ids = torch.tensor(tokens, device=device)
        positions = torch.tensor([n - 1 for n in lengths], device=device)
        return runner.model.logits(runner.model(ids, positions, runner.cache, batch))


def test_padding_writes_no_other_slot(tiny_model: Model) -> None:
    """Padding rows write only the first row's slot: every other slot of the cache is untouched."""
    runner = ModelRunner(tiny_model, CacheConfig(num_blocks=16, block_size=4), cuda_graphs=True)
    graphs = runner.graphs
    assert graphs is not None
    before = runner.cache.tensor.clone()
    logits = graphs.logits([5, 6, 7], [[3], [9, 2], [11]], [2, 6, 1])  # batch 3 -> bucket 4
    assert logits.shape == (3, tiny_model.config.vocab_size)
    assert runner.spec.layout == "HND"  # [layers, blocks, 2, heads, tokens, dim] -> changed[block, token]
    changed = (runner.cache.tensor != before).any(dim=5).any(dim=3).any(dim=2).any(dim=0)
    touched = {(int(b), int(t)) for b, t in changed.nonzero().tolist()}
    assert touched == {(3, 1), (2, 1), (11, 0)}


def test_batches_beyond_the_buckets_run_eagerly(tiny_model: Model) -> None:
    graphs = DecodeGraphs(tiny_model, ModelRunner(tiny_model, CacheConfig()).cache, 8, batch_sizes=(1, 2))
    assert graphs.bucket(2, 8) == (2, 8) and graphs.bucket(1, 3) == (1, 3)
    assert graphs.bucket(3, 1) is None and graphs.bucket(1, 9) is None
    with pytest.raises(ConfigError):
        graphs.logits([1, 2, 3], [[0], [1], [2]], [1, 1, 1])


@pytest.mark.parametrize("batch_sizes", [(1, 2), (1, 2, 4, 8)], ids=["eager-beyond-buckets", "padded"])
def test_engine_greedy_outputs_equal_with_and_without_padded_path(
    tiny_model: Model, make_prompts: Callable, batch_sizes: tuple[int, ...]
) -> None:
    """Continuous batching (requests finish at different steps, batch sizes shrink) gives identical tokens."""
    prompts = make_prompts(7, seed=4)
    outputs = []
    for cuda_graphs in (True, False):
        engine = DecodeEngine(tiny_model, CacheConfig(num_blocks=128, block_size=4), cuda_graphs=cuda_graphs)
        if cuda_graphs:
            runner = engine.runner
            runner.graphs = DecodeGraphs(tiny_model, runner.cache, 128, batch_sizes=batch_sizes)
        requests = [Request(f"r{i}", p, SamplingParams(max_tokens=3 + 2 * i)) for i, p in enumerate(prompts)]
        outputs.append([o.output_token_ids for o in engine.generate(requests)])
        assert engine.num_free_blocks == engine.spec.num_blocks
    assert outputs[0] == outputs[1]


def test_environment_variable_disables_graphs(tiny_model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default (None) never captures on the CPU, even with KVXFER_CUDA_GRAPHS=1; KVXFER_CUDA_GRAPHS=0 or
    cuda_graphs=False disables the path."""
    assert ModelRunner(tiny_model, CacheConfig()).graphs is None
    monkeypatch.setenv("KVXFER_CUDA_GRAPHS", "1")
    assert ModelRunner(tiny_model, CacheConfig()).graphs is None
    monkeypatch.setenv("KVXFER_CUDA_GRAPHS", "0")
    assert ModelRunner(tiny_model, CacheConfig()).graphs is None
    assert ModelRunner(tiny_model, CacheConfig(), cuda_graphs=False).graphs is None


# ---- GPU: captured graphs ------------------------------------------------------------------------------------------
# Graph and eager steps differ in shapes (padded batch and table width), so their float32 sums may differ in the
# last bits: greedy tokens are compared exactly except after a near tie of the reference logits (top two within
# TIE), where the sequences may part ways legitimately.

TIE = 1e-3


@pytest.fixture(scope="module")
def gpu_model() -> Model:
    config = ModelConfig.preset("tiny", dtype="float32")
    return Model.random(config, seed=1, device="cuda")


def _assert_same_greedy(model: Model, prompt: list[int], got: tuple[int, ...], want: tuple[int, ...]) -> None:
    """Equal token for token, or parted at a near tie of the dense reference's logits."""
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        if a == b:
            continue
        logits = model.dense_logits([*prompt, *want[:index]])[-1]
        assert abs(float(logits[a] - logits[b])) < TIE, f"token {index}: {a} != {b} without a near tie"
        return


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3, 32])
def test_graph_replay_equals_eager(gpu_model: Model, make_prompts: Callable, batch: int) -> None:
    """Greedy tokens through captured graphs equal eager ones (batch 3 runs padded to 4); sequences grow across
    4-token blocks and table width buckets while replaying."""
    prompts = make_prompts(batch, seed=batch, low=2, high=20)
    outputs, engines = [], []
    for cuda_graphs in (True, False):
        engine = DecodeEngine(
            gpu_model, CacheConfig(num_blocks=1024, block_size=4), max_batch_size=64, cuda_graphs=cuda_graphs
        )
        outputs.append([o.output_token_ids for o in engine.generate(_requests(prompts, 24))])
        engines.append(engine)
        assert engine.num_free_blocks == engine.spec.num_blocks
    graphs = engines[0].runner.graphs
    assert graphs is not None and graphs.capture and graphs.num_captures >= 2
    assert engines[1].runner.graphs is None
    for prompt, got, want in zip(prompts, outputs[0], outputs[1], strict=True):
        _assert_same_greedy(gpu_model, prompt, got, want)


@pytest.mark.gpu
def test_graph_logits_equal_eager_across_block_boundaries(gpu_model: Model, make_prompts: Callable) -> None:
    """Step by step, fed the same tokens: replayed logits equal the eager step's (float32) while each sequence
    crosses block boundaries, and the caches end equal."""
    prompts = make_prompts(3, seed=11, low=2, high=9)
    graphed = _prefilled(gpu_model, prompts, True, 4)
    eager = _prefilled(gpu_model, prompts, False, 4)
    assert graphed.graphs is not None and graphed.graphs.capture
    for seq_a, seq_b in zip(graphed.seqs, eager.seqs, strict=True):  # type: ignore[attr-defined]
        seq_a.token_ids[-1] = seq_b.token_ids[-1]  # start from the same first token
    for _ in range(12):
        logits = [_next_logits(runner) for runner in (graphed, eager)]
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
        chosen = logits[1].argmax(dim=-1).tolist()  # the eager step's greedy tokens feed both
        for runner in (graphed, eager):
            for seq, token in zip(runner.seqs, chosen, strict=True):  # type: ignore[attr-defined]
                seq.num_computed = seq.num_tokens
                seq.token_ids.append(token)
    assert graphed.graphs.num_captures >= 2  # tables grew past a width bucket
    for seq_a, seq_b in zip(graphed.seqs, eager.seqs, strict=True):  # type: ignore[attr-defined]
        for layer in range(gpu_model.config.num_layers):
            pairs = zip(
                graphed.cache.read(layer, seq_a.block_ids, seq_a.num_computed),
                eager.cache.read(layer, seq_b.block_ids, seq_b.num_computed),
                strict=True,
            )
            for x, y in pairs:
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_graphs_on_a_gpu_by_environment_only(gpu_model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ModelRunner(gpu_model, CacheConfig(num_blocks=16)).graphs is None  # off by default (not yet run on a GPU)
    monkeypatch.setenv("KVXFER_CUDA_GRAPHS", "1")
    graphs = ModelRunner(gpu_model, CacheConfig(num_blocks=16)).graphs
    assert graphs is not None and graphs.capture
    monkeypatch.setenv("KVXFER_CUDA_GRAPHS", "0")
    assert ModelRunner(gpu_model, CacheConfig(num_blocks=16)).graphs is None
