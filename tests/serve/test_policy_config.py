"""PolicyConfig: defaults, YAML and JSON files (flat and sectioned), and every kind of bad config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvxfer.errors import ConfigError
from kvxfer.serve.policy import PolicyConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"


def test_defaults_match_the_plan() -> None:
    cfg = PolicyConfig()
    assert cfg.max_local_prefill_length == 256
    assert cfg.enable_early_rejection is True
    assert cfg.low_priority_reject_factor <= cfg.normal_priority_reject_factor


def test_yaml_file_sectioned(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "disaggregation:\n  max_local_prefill_length: 512\n  max_prefill_queue_size: 8\n"
        "routing:\n  cache_weight: 2.5\n"
        "admission:\n  ttft_slo_s: 2\n  enable_early_rejection: false\n"
    )
    cfg = PolicyConfig.from_file(path)
    assert (cfg.max_local_prefill_length, cfg.max_prefill_queue_size, cfg.cache_weight) == (512, 8, 2.5)
    assert cfg.ttft_slo_s == 2.0 and isinstance(cfg.ttft_slo_s, float)
    assert cfg.enable_early_rejection is False
    assert cfg.load_weight == PolicyConfig().load_weight  # untouched keys keep defaults


def test_json_file_flat(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"max_local_prefill_length": 0, "block_size": 32, "retry_after_max_s": 5}))
    cfg = PolicyConfig.from_file(path)
    assert (cfg.max_local_prefill_length, cfg.block_size, cfg.retry_after_max_s) == (0, 32, 5.0)


def test_round_trip_and_empty_file(tmp_path: Path) -> None:
    cfg = PolicyConfig(cache_weight=3.0, max_prefill_queue_size=0)
    assert PolicyConfig.from_mapping(cfg.to_mapping()) == cfg
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert PolicyConfig.from_file(empty) == PolicyConfig()


def test_example_file_loads() -> None:
    cfg = PolicyConfig.from_file(EXAMPLE)
    assert cfg.max_local_prefill_length == 256


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"max_local_prefill_lenght": 10}, "max_local_prefill_lenght: unknown key"),
        ({"routing": {"max_local_prefill_length": 10}}, "routing.max_local_prefill_length: unknown key"),
        ({"routing": 3}, "routing: expected a mapping"),
        ({"max_local_prefill_length": 1.5}, "max_local_prefill_length: expected an int, got 1.5"),
        ({"max_local_prefill_length": "256"}, "expected an int, got '256'"),
        ({"max_prefill_queue_size": True}, "max_prefill_queue_size: expected an int, got True"),
        ({"cache_weight": "heavy"}, "cache_weight: expected a number, got 'heavy'"),
        ({"cache_weight": -0.5}, "cache_weight: expected >= 0, got -0.5"),
        ({"max_local_prefill_length": -1}, "max_local_prefill_length: expected >= 0, got -1"),
        ({"ttft_slo_s": 0}, "ttft_slo_s: expected > 0, got 0"),
        ({"block_size": 0}, "block_size: expected > 0, got 0"),
        ({"ttft_slo_s": float("inf")}, "ttft_slo_s: expected a finite number"),
        ({"enable_early_rejection": "yes"}, "enable_early_rejection: expected a bool, got 'yes'"),
        ({"retry_after_min_s": 10, "retry_after_max_s": 5}, "retry_after_min_s: expected <= retry_after_max_s"),
        ({"low_priority_reject_factor": 4.0}, "normal_priority_reject_factor: expected >= low_priority_reject_factor"),
        ({"cache_weight": 1.0, "routing": {"cache_weight": 2.0}}, "cache_weight: given twice"),
    ],
)
def test_bad_config_names_key_expected_actual(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        PolicyConfig.from_mapping(data)
    assert needle in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        PolicyConfig.from_file(tmp_path / "missing.yaml")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PolicyConfig.from_file(bad_json)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        PolicyConfig.from_file(bad_yaml)
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping, got list"):
        PolicyConfig.from_file(top_list)
    toml = tmp_path / "policy.toml"
    toml.write_text("a = 1\n")
    with pytest.raises(ConfigError, match=r"expected \.json, \.yaml or \.yml"):
        PolicyConfig.from_file(toml)


def test_frozen() -> None:
    cfg = PolicyConfig()
    with pytest.raises(AttributeError):
        cfg.cache_weight = 2.0  # type: ignore[misc]
