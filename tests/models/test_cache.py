"""The model cache: default location, atomic publication, two converters racing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvxfer.errors import ConfigError
from kvxfer.models.cache import (
    FORMAT_VERSION,
    MARKER,
    default_cache_dir,
    publish,
    read_marker,
)


def _writer(payload: str) -> Any:
    def build(directory: Path) -> dict[str, Any]:
        (directory / "data.txt").write_text(payload)
        return {"payload": payload}

    return build


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVXFER_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("KVXFER_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "kvxfer" / "models"


def test_publish_builds_once(tmp_path: Path) -> None:
    final = tmp_path / "model"
    assert publish(final, _writer("first")) == final
    assert publish(final, _writer("second")) == final  # a current marker: not rebuilt
    assert (final / "data.txt").read_text() == "first"
    assert read_marker(final) == {"format": FORMAT_VERSION, "payload": "first"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_publish_loses_a_race_gracefully(tmp_path: Path) -> None:
    final = tmp_path / "model"

    def slow_build(directory: Path) -> dict[str, Any]:
        publish(final, _writer("winner"))  # another process publishes while this one is still converting
        (directory / "data.txt").write_text("loser")
        return {"payload": "loser"}

    assert publish(final, slow_build) == final
    assert (final / "data.txt").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_publish_replaces_an_outdated_directory(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / MARKER).write_text(json.dumps({"format": FORMAT_VERSION - 1}))
    (final / "data.txt").write_text("old")
    publish(final, _writer("new"))
    assert (final / "data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def failing(directory: Path) -> dict[str, Any]:
        (directory / "partial").write_text("x")
        raise ConfigError("conversion failed")

    with pytest.raises(ConfigError, match="conversion failed"):
        publish(tmp_path / "model", failing)
    assert list(tmp_path.iterdir()) == []


def test_two_processes_building_at_once(tmp_path: Path) -> None:
    code = "import sys; from kvxfer.models import load_model; print(load_model('tiny-random', sys.argv[1]).directory)"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs == [str((tmp_path / "tiny-random").resolve())] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-random"]
    assert read_marker(tmp_path / "tiny-random") is not None


def test_stale_temp_dirs_of_dead_processes_are_swept(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True, timeout=60
    )
    dead = int(finished.stdout)
    stale, recent, living = (
        tmp_path / f".tmp-model-{dead}-aaaa",
        tmp_path / f".tmp-other-{dead}-bbbb",
        tmp_path / f".old-model-{os.getpid()}-cccc",
    )
    for entry in (stale, recent, living):
        entry.mkdir()
        (entry / "model.safetensors").write_text("partial")
    hours_ago = time.time() - 2 * 3600
    for entry in (stale, living):
        os.utime(entry, (hours_ago, hours_ago))
    publish(tmp_path / "model", _writer("fresh"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", recent.name, living.name])
