"""The GGUF converter on a small synthetic Llama GGUF written with gguf.GGUFWriter the way llama.cpp's
convert_hf_to_gguf.py writes one (q/k rows permuted, tied or untied head, byte-level BPE tokenizer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvxfer.engine import ModelConfig, random_weights
from kvxfer.errors import ConfigError
from kvxfer.models import load_model
from kvxfer.models.gguf_llama import LAYER_TENSORS, convert_gguf, reverse_permute
from kvxfer.models.tiny import byte_to_unicode

gguf = pytest.importorskip("gguf")

CONFIG = ModelConfig(
    vocab_size=264,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_theta=50000.0,
    rms_norm_eps=1e-6,
    max_position=512,
    tie_word_embeddings=True,
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (the forward transformation)."""
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tokens() -> list[str]:
    byte_tokens = [byte_to_unicode()[b] for b in range(256)]
    merged = ["he", "ll", "hell", "Ġw"]
    return SPECIALS + byte_tokens + merged + [f"<unused{i}>" for i in range(CONFIG.vocab_size - 263)]


def write_gguf(path: Path, weights: dict[str, torch.Tensor], rope_scaling: str | None = None) -> None:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(CONFIG.num_layers)
    writer.add_context_length(CONFIG.max_position)
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_heads)
    writer.add_head_count_kv(CONFIG.num_kv_heads)
    writer.add_rope_freq_base(CONFIG.rope_theta)
    writer.add_layer_norm_rms_eps(CONFIG.rms_norm_eps)
    writer.add_rope_dimension_count(CONFIG.head_dim)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
    tokens = _tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    inverse = {hf: g for g, hf in LAYER_TENSORS.items()}
    for name, tensor in weights.items():
        array = tensor.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{inverse[rest]}"
            if rest == "self_attn.q_proj.weight":
                array = llama_cpp_permute(array, CONFIG.num_heads)
            elif rest == "self_attn.k_proj.weight":
                array = llama_cpp_permute(array, CONFIG.num_kv_heads)
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reverse_permute_undoes_llama_cpp() -> None:
    weights = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
    assert np.array_equal(reverse_permute(llama_cpp_permute(weights, 8), 8), weights)
    assert not np.array_equal(llama_cpp_permute(weights, 8), weights)


@pytest.mark.parametrize("tied", [True, False])
def test_conversion_restores_the_hf_weights(tmp_path: Path, tied: bool) -> None:
    config = CONFIG.replace(tie_word_embeddings=tied)
    weights = random_weights(config, seed=5)
    write_gguf(tmp_path / "model.gguf", weights)
    directory = tmp_path / "converted"
    directory.mkdir()
    converted = convert_gguf(tmp_path / "model.gguf", directory, name="converted")
    assert converted == config.replace(eos_token_ids=(2,), name="converted")
    bundle = load_model(str(directory))
    model = bundle.build()
    for name, parameter in model.hf_weights().items():
        assert torch.equal(parameter, weights[name]), name
    tokenizer = bundle.tokenizer
    assert tokenizer.eos_token_ids == (2,) and tokenizer.vocab_size == 264
    assert tokenizer.encode("hello world") == [261, 3 + ord("o"), 262, *[3 + ord(c) for c in "orld"]]
    assert tokenizer.encode("<|im_start|>12") == [1, 3 + ord("1"), 3 + ord("2")]  # digits split one by one
    assert tokenizer.decode(tokenizer.encode("hello wörld")) == "hello wörld"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


def test_unsupported_files_are_refused(tmp_path: Path) -> None:
    write_gguf(tmp_path / "scaled.gguf", random_weights(CONFIG, seed=1), rope_scaling="yarn")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="RoPE scaling"):
        convert_gguf(tmp_path / "scaled.gguf", tmp_path / "out", name="x")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="GGUF"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out", name="x")
