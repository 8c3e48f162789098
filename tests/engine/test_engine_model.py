"""The model matches Hugging Face LlamaForCausalLM; checkpoints round-trip through HF-style directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvxfer.engine import (
    AttentionBatch,
    CacheConfig,
    Model,
    ModelConfig,
    ModelRunner,
    PrefillEngine,
    Request,
    TensorParallel,
    WeightStore,
    load_hf,
    random_weights,
    read_config,
    save_hf,
)
from kvxfer.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

TOKENS = list(range(5, 230, 3))  # 75 tokens

CONFIGS = {
    "plain": ModelConfig.preset("tiny"),
    "tied-llama3-rope": ModelConfig.preset(
        "tiny",
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=(8.0, 1.0, 4.0, 32),
        num_kv_heads=1,
        head_dim=32,
    ),
}


def _hf_logits(directory: Path, tokens: list[int]) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


def _paged_logits(model: Model, tokens: list[int]) -> torch.Tensor:
    """Logits of every prompt position, with attention through a paged NHD cache in scattered blocks."""
    runner = ModelRunner(model, CacheConfig(num_blocks=16, block_size=8, layout="NHD"))
    blocks = list(range(15, 15 - (-(-len(tokens) // 8)), -1))
    batch = AttentionBatch.build([blocks], [len(tokens)], [len(tokens)], 8, torch.device("cpu"))
    with torch.inference_mode():
        return model.logits(model(torch.tensor(tokens), torch.arange(len(tokens)), runner.cache, batch))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path: Path, name: str) -> None:
    config = CONFIGS[name]
    save_hf(tmp_path, config, random_weights(config, seed=4))
    expected = _hf_logits(tmp_path, TOKENS)
    model = load_hf(tmp_path)
    assert model.config.tie_word_embeddings == config.tie_word_embeddings
    assert model.config.rope_scaling == config.rope_scaling
    scale = expected.abs().max().item()
    torch.testing.assert_close(model.dense_logits(TOKENS), expected, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(_paged_logits(model, TOKENS), expected, rtol=1e-4, atol=1e-5 * scale)
    first = PrefillEngine(model, CacheConfig(num_blocks=16, block_size=16)).prefill(Request("r", TOKENS))
    assert first.first_token == int(expected[-1].argmax())


def test_loads_a_checkpoint_written_by_transformers(tmp_path: Path) -> None:
    hf_config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=[7, 9],
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    assert model.config.eos_token_ids == (7, 9) and model.config.head_dim == 8 and model.config.rms_norm_eps == 1e-6
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6]
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(model.dense_logits(tokens), expected, rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_keeps_every_weight(tmp_path: Path) -> None:
    config = ModelConfig.preset("tiny", eos_token_ids=(3,))
    model = Model.random(config, seed=2)
    save_hf(tmp_path, config, model.hf_weights())
    assert json.loads((tmp_path / "config.json").read_text())["num_key_value_heads"] == 2
    assert read_config(tmp_path).replace(name=config.name) == config
    loaded = load_hf(tmp_path)
    expected = dict(model.named_parameters())
    for name, parameter in loaded.named_parameters():
        assert torch.equal(parameter, expected[name]), name


def test_tensor_parallel_ranks_read_their_shards(tmp_path: Path) -> None:
    config = ModelConfig.preset("tiny")
    weights = random_weights(config, seed=5)
    save_hf(tmp_path, config, weights)
    store = WeightStore(directory=tmp_path)
    dim = config.head_dim
    for rank in range(2):
        shard = Model.from_weights(config, store, TensorParallel(rank=rank, size=2))
        attn, mlp = shard.layers[1].self_attn, shard.layers[1].mlp
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
        q = weights["model.layers.1.self_attn.q_proj.weight"]
        k = weights["model.layers.1.self_attn.k_proj.weight"]
        o = weights["model.layers.1.self_attn.o_proj.weight"]
        down = weights["model.layers.1.mlp.down_proj.weight"]
        assert torch.equal(attn.q_proj.weight, q[rank * 2 * dim : (rank + 1) * 2 * dim])
        assert torch.equal(attn.k_proj.weight, k[rank * dim : (rank + 1) * dim])
        assert torch.equal(attn.o_proj.weight, o[:, rank * 2 * dim : (rank + 1) * 2 * dim])
        assert torch.equal(mlp.down_proj.weight, down[:, rank * 64 : (rank + 1) * 64])
    replicated = Model.from_weights(config, store, TensorParallel(rank=3, size=4))
    k = weights["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(replicated.layers[0].self_attn.k_proj.weight, k[dim : 2 * dim])  # ranks 2, 3 share head 1


def test_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    config = ModelConfig.preset("tiny")
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_hf(tmp_path)
    weights = random_weights(config)
    del weights["model.norm.weight"]
    with pytest.raises(ConfigError, match=r"model\.norm\.weight"):
        save_hf(tmp_path, config, weights)
    weights["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ConfigError, match=r"shape \(64,\)"):
        save_hf(tmp_path, config, weights)
    with pytest.raises(ConfigError, match="attention_bias=True"):
        ModelConfig.from_hf({**config.to_hf(), "attention_bias": True})
    with pytest.raises(ConfigError, match="rope_type"):
        ModelConfig.from_hf({**config.to_hf(), "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    assert ModelConfig.from_hf(config.to_hf(), name=config.name) == config
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig.preset("tiny", num_kv_heads=3)
    with pytest.raises(ConfigError, match="tensor parallel size 3"):
        Model.random(config, tp=TensorParallel(rank=0, size=3))


def test_presets_have_the_promised_sizes() -> None:
    tiny, small = ModelConfig.preset("tiny"), ModelConfig.preset("small")
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_heads, tiny.num_kv_heads) == (3, 64, 4, 2)
    assert 90e6 < small.num_parameters() < 130e6
    model = Model.random(tiny)
    assert sum(p.numel() for p in model.parameters()) == tiny.num_parameters()
