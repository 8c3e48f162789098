"""PolicyConfig: every threshold of the serving policy in one frozen object, loadable from YAML or JSON.

A file is either flat (``max_local_prefill_length: 512``) or grouped in the sections below, in the shape of the
Dynamo-style example configs (``disaggregation: {max_local_prefill_length: 512}``); both may be mixed. Unknown keys,
wrong types and out-of-range values raise :class:`~kvxfer.errors.ConfigError` naming the key, what was expected and
what was given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import ConfigError

SECTIONS: dict[str, tuple[str, ...]] = {
    "disaggregation": ("max_local_prefill_length", "max_prefill_queue_size"),
    "routing": (
        "block_size",
        "cache_weight",
        "load_weight",
        "transfer_weight",
        "default_link_bytes_per_s",
        "default_link_latency_s",
    ),
    "admission": (
        "enable_early_rejection",
        "ttft_slo_s",
        "low_priority_reject_factor",
        "normal_priority_reject_factor",
        "retry_after_min_s",
        "retry_after_max_s",
        "default_prefill_tokens_per_s",
    ),
}
# Fields that must be > 0 (the others must be >= 0).
_POSITIVE = frozenset(
    {
        "block_size",
        "default_link_bytes_per_s",
        "ttft_slo_s",
        "low_priority_reject_factor",
        "normal_priority_reject_factor",
        "retry_after_max_s",
        "default_prefill_tokens_per_s",
    }
)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Thresholds and weights of the routing policy (see ``kvxfer.serve.policy``).

    Disaggregation: a request is prefilled on a prefill worker only when the prompt tokens not cached on the chosen
    decode worker exceed ``max_local_prefill_length`` and fewer than ``max_prefill_queue_size`` requests wait in the
    router's prefill queue (0 turns disaggregation off).

    Decode choice: cost = ``cache_weight`` x (uncached fraction of the prompt's blocks) + ``load_weight`` x (active
    blocks / the worker's blocks) + ``transfer_weight`` x (expected KV transfer time / ``ttft_slo_s``). Links without
    a measured rate are priced at ``default_link_bytes_per_s`` and ``default_link_latency_s``.

    Admission: the predicted TTFT is compared with ``ttft_slo_s`` x ``low_priority_reject_factor`` (low priority) or
    x ``normal_priority_reject_factor`` (normal); high priority is always admitted. Rejections carry a Retry-After in
    [``retry_after_min_s``, ``retry_after_max_s``]. ``default_prefill_tokens_per_s`` stands in for a worker that has
    not measured its prefill rate yet. ``block_size`` is the block size (tokens) the router hashes prompts with.
    """

    max_local_prefill_length: int = 256
    max_prefill_queue_size: int = 64
    block_size: int = 16
    cache_weight: float = 1.0
    load_weight: float = 1.0
    transfer_weight: float = 1.0
    default_link_bytes_per_s: float = 1e9
    default_link_latency_s: float = 0.0005
    enable_early_rejection: bool = True
    ttft_slo_s: float = 1.0
    low_priority_reject_factor: float = 1.0
    normal_priority_reject_factor: float = 3.0
    retry_after_min_s: float = 1.0
    retry_after_max_s: float = 60.0
    default_prefill_tokens_per_s: float = 2000.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            _check_field(field.name, str(field.type), value)
            if field.type == "float" and isinstance(value, int):
                object.__setattr__(self, field.name, float(value))  # ints from YAML/JSON: one type per field
        if self.retry_after_min_s > self.retry_after_max_s:
            raise ConfigError(
                f"PolicyConfig.retry_after_min_s: expected <= retry_after_max_s "
                f"({self.retry_after_max_s}), got {self.retry_after_min_s}"
            )
        if self.normal_priority_reject_factor < self.low_priority_reject_factor:
            raise ConfigError(
                f"PolicyConfig.normal_priority_reject_factor: expected >= low_priority_reject_factor "
                f"({self.low_priority_reject_factor}), got {self.normal_priority_reject_factor}"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> PolicyConfig:
        """Build from a flat or sectioned mapping (see the module docstring); missing keys keep their defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"PolicyConfig: expected a mapping, got {type(data).__name__}")
        flat: dict[str, object] = {}
        for key, value in data.items():
            if key in SECTIONS:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"PolicyConfig.{key}: expected a mapping (section), got {value!r}")
                for sub_key, sub_value in value.items():
                    if sub_key not in SECTIONS[key]:
                        raise ConfigError(
                            f"PolicyConfig.{key}.{sub_key}: unknown key; expected one of {', '.join(SECTIONS[key])}"
                        )
                    _put(flat, sub_key, sub_value)
            elif key in _NAMES:
                _put(flat, str(key), value)
            else:
                raise ConfigError(
                    f"PolicyConfig.{key}: unknown key; expected one of {', '.join(sorted(_NAMES | SECTIONS.keys()))}"
                )
        return cls(**flat)  # type: ignore[arg-type]  # values were type-checked in __post_init__

    @classmethod
    def from_file(cls, path: str | Path) -> PolicyConfig:
        """Load ``path``: ``.json`` as JSON, ``.yaml`` / ``.yml`` as YAML (needs pyyaml); an empty file is defaults."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"PolicyConfig: cannot read {path}: {error}") from error
        suffix = path.suffix.lower()
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ConfigError(f"PolicyConfig: {path} is not valid JSON: {error}") from error
        elif suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise ConfigError(f"PolicyConfig: {path} is not valid YAML: {error}") from error
        else:
            raise ConfigError(f"PolicyConfig: file suffix of {path}: expected .json, .yaml or .yml, got {suffix!r}")
        return cls.from_mapping({} if data is None else data)

    def to_mapping(self) -> dict[str, object]:
        """The flat mapping of every field (``from_mapping(cfg.to_mapping()) == cfg``)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


_NAMES = frozenset(field.name for field in fields(PolicyConfig))


def _put(flat: dict[str, object], key: str, value: object) -> None:
    if key in flat:
        raise ConfigError(f"PolicyConfig.{key}: given twice (flat and in a section)")
    flat[key] = value


def _check_field(name: str, kind: str, value: object) -> None:
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"PolicyConfig.{name}: expected a bool, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not isinstance(value, int)):
        raise ConfigError(f"PolicyConfig.{name}: expected {'an int' if kind == 'int' else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"PolicyConfig.{name}: expected a finite number, got {value!r}")
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"PolicyConfig.{name}: expected > 0, got {value!r}")
    if value < 0:
        raise ConfigError(f"PolicyConfig.{name}: expected >= 0, got {value!r}")
