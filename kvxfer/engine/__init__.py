"""Reference engines in torch: a Llama-style model, a paged KV cache, prefix caching, prefill and decode engines.

Importing this package imports torch (``import kvxfer`` does not).
"""

from ..errors import EngineTimeoutError, OutOfBlocksError
from .attention import AttentionBatch, causal_attention, paged_attention
from .block_manager import BlockManager, block_hashes
from .checkpoint import WeightStore, random_weights, read_config, save_hf
from .config import PRESETS, CacheConfig, ModelConfig
from .decode import DecodeEngine, Reservation
from .decode_connector import Admission, DecodeConnector
from .kv_cache import KVCache
from .messages import KVReady, KVWanted, RankInfo
from .model import Model, load_hf
from .parallel import TensorParallel, init_tensor_parallel
from .prefill import PrefillEngine, PrefillResult
from .prefill_connector import PrefillConnector, PushResult
from .request import FinishReason, Request, RequestOutput, SamplingParams, Sequence
from .runner import ModelRunner
from .sampling import sample

__all__ = [
    "PRESETS",
    "Admission",
    "AttentionBatch",
    "BlockManager",
    "CacheConfig",
    "DecodeConnector",
    "DecodeEngine",
    "EngineTimeoutError",
    "FinishReason",
    "KVCache",
    "KVReady",
    "KVWanted",
    "Model",
    "ModelConfig",
    "ModelRunner",
    "OutOfBlocksError",
    "PrefillConnector",
    "PrefillEngine",
    "PrefillResult",
    "PushResult",
    "RankInfo",
    "Request",
    "RequestOutput",
    "Reservation",
    "SamplingParams",
    "Sequence",
    "TensorParallel",
    "WeightStore",
    "block_hashes",
    "causal_attention",
    "init_tensor_parallel",
    "load_hf",
    "paged_attention",
    "random_weights",
    "read_config",
    "sample",
    "save_hf",
]
