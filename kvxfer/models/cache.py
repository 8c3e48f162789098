"""The model cache directory: where converted models live, published atomically (temp dir + rename).

Layout: ``<cache>/<model name>/`` is a complete Hugging Face style directory (``config.json``,
``model.safetensors``, ``tokenizer.json``, ...) plus ``kvxfer-model.json`` (format version and where it came from);
``<cache>/wheels/`` keeps downloaded wheels. ``<cache>`` is ``$KVXFER_CACHE_DIR/models``, by default
``~/.cache/kvxfer/models``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..environment import read
from ..errors import ConfigError

log = logging.getLogger("kvxfer.models")

#: Bumped whenever a converted directory's contents change; older directories are rebuilt.
FORMAT_VERSION = 2
MARKER = "kvxfer-model.json"
#: Temp entries of dead processes older than this are removed by the next conversion.
STALE_AFTER_S = 3600.0


def default_cache_dir() -> Path:
    """``$KVXFER_CACHE_DIR/models``, else ``~/.cache/kvxfer/models``."""
    root = read("KVXFER_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "kvxfer") / "models"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` or the default, created if missing."""
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"model cache directory {path}: expected a writable directory, got {error}") from error
    return path


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of a published directory of the current format, or None (missing, unreadable, older)."""
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT_VERSION else None


def publish(final: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Return ``final`` if it holds a current marker; otherwise run ``build(temp_dir)`` (it fills the directory
    and returns marker fields), then rename the temp dir to ``final``. Two processes building at once both
    finish; the first rename wins and the other's copy is discarded, so readers never see a partial directory."""
    if read_marker(final) is not None:
        return final
    sweep_stale(final.parent)
    temp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir(parents=True)
    try:
        fields = build(temp)
        (temp / MARKER).write_text(json.dumps({"format": FORMAT_VERSION, **fields}, indent=2), encoding="utf-8")
        _replace(temp, final)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    if read_marker(final) is None:
        raise ConfigError(f"model cache {final}: expected a complete directory after conversion, found no {MARKER}")
    return final


def sweep_stale(parent: Path) -> None:
    """Remove ``.tmp-*`` / ``.old-*`` entries of ``parent`` left by killed processes: their pid (in the name) is
    gone and they are older than :data:`STALE_AFTER_S` (a process of another pid namespace may share the cache)."""
    now = time.time()
    for entry in parent.glob(".*-*-*-*"):
        parts = entry.name.rsplit("-", 2)
        if not entry.name.startswith((".tmp-", ".old-")) or len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            if now - entry.stat().st_mtime < STALE_AFTER_S or _alive(int(parts[1])):
                continue
        except OSError:
            continue
        log.info("model cache: removing %s, left by a process that is gone", entry)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(temp: Path, final: Path) -> None:
    try:
        os.rename(temp, final)
        return
    except OSError:
        if read_marker(final) is not None:  # another process published first: use theirs
            log.info("model cache %s: another process published it first", final)
            return
    # An outdated or broken directory: move it aside, then publish (a concurrent reader keeps its open files).
    old = final.parent / f".old-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(final, old)
    except OSError:
        pass  # someone else moved it away already
    try:
        os.rename(temp, final)
    except OSError as error:
        if read_marker(final) is None:
            raise ConfigError(f"model cache {final}: could not publish the converted model: {error}") from error
    shutil.rmtree(old, ignore_errors=True)
