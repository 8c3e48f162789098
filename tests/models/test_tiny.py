"""tiny-random: deterministic across loads and processes, a working byte tokenizer, an engine model that runs."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvxfer.errors import ConfigError
from kvxfer.models import ModelBundle, load_model


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_two_cache_dirs_hold_identical_weights(tmp_path: Path) -> None:
    first = load_model("tiny-random", cache_dir=tmp_path / "a")
    second = load_model("tiny-random", cache_dir=tmp_path / "b")
    assert first.directory != second.directory
    assert _digest(first.directory) == _digest(second.directory)
    ids = first.tokenizer.encode("determinism")
    assert torch.equal(first.build().dense_logits(ids), second.build().dense_logits(ids))


def test_another_process_builds_the_same_weights(tmp_path: Path) -> None:
    here = load_model("tiny-random", cache_dir=tmp_path / "here")
    code = (
        "import sys, hashlib; from kvxfer.models import load_model; "
        "d = load_model('tiny-random', cache_dir=sys.argv[1]).directory; "
        "print(hashlib.sha256((d / 'model.safetensors').read_bytes()).hexdigest())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "there")], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == _digest(here.directory)


def test_cached_load_reuses_the_directory(tmp_path: Path) -> None:
    first = load_model("tiny-random", cache_dir=tmp_path)
    stamp = (first.directory / "model.safetensors").stat().st_mtime_ns
    second = load_model("tiny-random", cache_dir=tmp_path)
    assert second.directory == first.directory
    assert (second.directory / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-random"]  # no temp dirs left behind


def test_bundle_fields_and_model(tmp_path: Path) -> None:
    bundle = load_model("tiny-random", cache_dir=tmp_path)
    assert isinstance(bundle, ModelBundle)
    assert bundle.name == bundle.config.name == "tiny-random"
    assert bundle.tokenizer.vocab_size == bundle.config.vocab_size == 259
    assert bundle.tokenizer.eos_token_ids == (258, 256) == bundle.config.eos_token_ids
    model = bundle.build(dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and model.embed_tokens.weight.dtype == torch.bfloat16
    logits = model.dense_logits(bundle.tokenizer.encode("hi"))
    assert logits.shape == (2, 259) and torch.isfinite(logits).all()


def test_unknown_model_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tiny-random"):
        load_model("no-such-model", cache_dir=tmp_path)


def test_local_directory_loads_under_its_own_name(tmp_path: Path) -> None:
    tiny = load_model("tiny-random", cache_dir=tmp_path / "cache")
    local = tmp_path / "my-model"
    shutil.copytree(tiny.directory, local)
    bundle = load_model(str(local))
    assert bundle.name == bundle.config.name == "my-model" and bundle.directory == local.resolve()
    ids = bundle.tokenizer.encode("same weights")
    assert torch.equal(bundle.build().dense_logits(ids), tiny.build().dense_logits(ids))


def test_random_weights_need_only_config_and_tokenizer(tmp_path: Path) -> None:
    tiny = load_model("tiny-random", cache_dir=tmp_path / "cache")
    shape_only = tmp_path / "shape-only"
    shutil.copytree(tiny.directory, shape_only, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ConfigError, match="random_weights=True"):
        load_model(shape_only)
    first = load_model(shape_only, random_weights=True, seed=3)
    assert first.random_weights and first.config == tiny.config.replace(name="shape-only")
    ids = first.tokenizer.encode("seeded")
    logits = first.build().dense_logits(ids)
    assert torch.equal(logits, load_model(shape_only, random_weights=True, seed=3).build().dense_logits(ids))
    assert not torch.equal(logits, load_model(shape_only, random_weights=True, seed=4).build().dense_logits(ids))
    assert not torch.equal(logits, tiny.build().dense_logits(ids))
    assert first.build(dtype="bfloat16").embed_tokens.weight.dtype == torch.bfloat16


def test_build_loads_this_ranks_shard(tmp_path: Path) -> None:
    from kvxfer.engine import TensorParallel

    bundle = load_model("tiny-random", cache_dir=tmp_path)
    full = bundle.build()
    shard = bundle.build(tp=TensorParallel(rank=1, size=2))  # 4 heads, 2 KV heads of 16 dims: rank 1 holds half
    attention, reference = shard.layers[0].self_attn, full.layers[0].self_attn
    assert torch.equal(attention.q_proj.weight, reference.q_proj.weight[32:])
    assert torch.equal(attention.k_proj.weight, reference.k_proj.weight[16:])
    assert torch.equal(attention.o_proj.weight, reference.o_proj.weight[:, 32:])
    assert torch.equal(shard.embed_tokens.weight, full.embed_tokens.weight)
    random_shard = load_model(bundle.directory, random_weights=True).build(tp=TensorParallel(rank=1, size=2))
    random_full = load_model(bundle.directory, random_weights=True).build()
    assert torch.equal(random_shard.layers[0].mlp.down_proj.weight, random_full.layers[0].mlp.down_proj.weight[:, 64:])


def test_a_path_is_a_directory_even_with_a_builtin_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="local model directory"):
        load_model(Path("tiny-random"), cache_dir=tmp_path / "cache")
    assert load_model("tiny-random", cache_dir=tmp_path / "cache").name == "tiny-random"
