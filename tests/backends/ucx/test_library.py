"""Where libucp comes from: the libucx wheel by default, ``KVXFER_UCX_LIB`` when set (each checked in a fresh
process, since the library is loaded once per process); and what a missing UCX does to the `ucx` tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvxfer.backends.ucx.binding import load_library
from kvxfer.backends.ucx.config import UcxConfig
from kvxfer.errors import BackendUnavailableError

REPO = Path(__file__).resolve().parents[3]

# Loads libucp as the environment says, reports what it loaded, then moves 1 MiB to itself through UCX puts
# (cross-memory off, nothing staged), so the loaded library is the one doing the work.
_REPORT = r"""
import json, sys
import numpy as np
import kvxfer
from kvxfer.backends.ucx import UcxBackend, ucx_available
from kvxfer.backends.ucx.binding import load_library

problem = ucx_available()
library = load_library()
agent = kvxfer.Agent("self", backends=[UcxBackend()])
with agent:
    source = np.frombuffer(np.random.default_rng(5).bytes(1 << 20), dtype=np.uint8).copy()
    target = np.zeros(1 << 20, dtype=np.uint8)
    region = agent.register(source, name="src")
    agent.register(target, name="dst")
    peer = agent.connect(agent.metadata())
    offsets = np.arange(16, dtype=np.int64) * 65536
    plan = agent.plan(kvxfer.Descs.from_ranges(region, offsets, 65536), peer,
                      kvxfer.Descs.from_ranges(peer.region("dst"), offsets[::-1].copy(), 65536))
    data_path = plan.backend.data_path(plan)
    agent.write(plan).wait(30)
    moved = bool((target.reshape(16, -1)[::-1] == source.reshape(16, -1)).all())
print(json.dumps({"problem": problem, "path": library.path, "source": library.source,
                  "version": list(library.version), "status_text": library.status_text(-1),
                  "wheel_imported": "libucx" in sys.modules, "data_path": data_path, "moved": moved}))
"""


def _environ(**overrides: str) -> dict[str, str]:
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("KVXFER_UCX_") and name != "KVXFER_REQUIRE_UCX"
    }
    environ["UCX_MEM_MMAP_HOOK_MODE"] = "none"
    environ.update(overrides)
    return environ


def _wheel_libucp() -> str:
    """The libucx wheel's libucp, as the loader finds it."""
    from kvxfer.backends.ucx.binding.library import _wheel_library

    return _wheel_library()


@pytest.mark.ucx
def test_kvxfer_ucx_lib_loads_the_named_library(tmp_path: Path) -> None:
    wheel = _wheel_libucp()
    # A symlink in another directory: the loader resolves it, so the wheel's libucp still finds libuct/libucs
    # beside itself through $ORIGIN (the dynamic loader would take $ORIGIN from the link's directory).
    named = tmp_path / "links" / "libucp.so"
    named.parent.mkdir()
    named.symlink_to(wheel)
    result = subprocess.run(
        [sys.executable, "-c", _REPORT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_environ(KVXFER_UCX_LIB=str(named), KVXFER_UCX_CMA="off", KVXFER_UCX_STAGE_BELOW="0"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["problem"] is None
    assert report["source"] == "KVXFER_UCX_LIB"
    assert report["path"] == os.path.realpath(wheel)
    assert not report["wheel_imported"], "KVXFER_UCX_LIB was set but the libucx wheel was loaded anyway"
    assert tuple(report["version"]) == load_library().version
    assert report["status_text"]  # the loaded library's status table answers
    assert report["data_path"] == "direct" and report["moved"], report


SYSTEM_LIBUCP = "/usr/lib/x86_64-linux-gnu/libucp.so.0"


@pytest.mark.ucx
@pytest.mark.skipif(not os.path.exists(SYSTEM_LIBUCP), reason="no system UCX (Debian: apt install libucx0)")
def test_a_system_ucx_is_used_or_refused_by_version(tmp_path: Path) -> None:
    """A distribution's UCX (built with verbs, for RDMA): too old (Debian bookworm's 1.13) -> refused as
    unavailable with the reason; new enough -> loaded and moving data."""
    result = subprocess.run(
        [sys.executable, "-c", _REPORT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_environ(KVXFER_UCX_LIB=SYSTEM_LIBUCP, KVXFER_UCX_CMA="off", KVXFER_UCX_STAGE_BELOW="0"),
    )
    if "too old" in result.stderr:
        assert "need >= 1.14" in result.stderr and os.path.realpath(SYSTEM_LIBUCP) in result.stderr
        return
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["source"] == "KVXFER_UCX_LIB" and report["path"] == os.path.realpath(SYSTEM_LIBUCP)
    assert not report["wheel_imported"] and report["moved"], report


@pytest.mark.ucx
def test_a_second_ucx_build_in_one_process_is_refused() -> None:
    loaded = load_library()
    assert load_library(UcxConfig()) is loaded  # naming none: the loaded one
    other = (
        SYSTEM_LIBUCP if os.path.exists(SYSTEM_LIBUCP) and os.path.realpath(SYSTEM_LIBUCP) != loaded.path else __file__
    )
    with pytest.raises(BackendUnavailableError, match="one process cannot use two UCX builds"):
        load_library(UcxConfig(library_path=other))


@pytest.mark.ucx
def test_without_kvxfer_ucx_lib_the_wheel_is_loaded(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _REPORT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_environ(KVXFER_UCX_CMA="off", KVXFER_UCX_STAGE_BELOW="0"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["source"] == "wheel"
    assert report["wheel_imported"]
    assert report["path"] == os.path.realpath(_wheel_libucp())
    assert report["moved"]


_BOGUS = r"""
import json
import kvxfer
from kvxfer.backends.ucx import UcxBackend, ucx_available
from kvxfer.errors import BackendUnavailableError

problem = ucx_available()
try:
    kvxfer.Agent("bogus", backends=[UcxBackend()]).close()
except BackendUnavailableError as error:
    raised = str(error)
else:
    raised = None
print(json.dumps({"problem": problem, "raised": raised}))
"""


@pytest.mark.parametrize("kind", ["missing", "not-a-library", "directory"])
def test_bogus_kvxfer_ucx_lib_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("cffi")  # without cffi the error (rightly) names cffi instead
    if kind == "missing":
        bogus = tmp_path / "no-such-libucp.so"
    elif kind == "not-a-library":
        bogus = tmp_path / "libucp.so"
        bogus.write_bytes(b"this is not an ELF file\n" * 8)
    else:
        bogus = tmp_path / "libdir"
        bogus.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _BOGUS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_environ(KVXFER_UCX_LIB=str(bogus)),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for message in (report["problem"], report["raised"]):
        assert message is not None, report
        assert "KVXFER_UCX_LIB" in message and str(bogus) in message, message
    # In-process through the loader API too (failures are not cached: the process's own library is unaffected).
    with pytest.raises(BackendUnavailableError, match="KVXFER_UCX_LIB"):
        load_library(UcxConfig(library_path=str(bogus)))


_PROBE_TEST = "tests/backends/ucx/test_binding.py::test_library_loads_and_reports_itself"


def _pytest_without_ucx(tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess:
    """Run one `ucx` test in a child pytest where UCX cannot load (KVXFER_UCX_LIB names a missing file)."""
    environ = _environ(KVXFER_UCX_LIB=str(tmp_path / "missing-libucp.so"), **overrides)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", _PROBE_TEST],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env=environ,
    )


def test_missing_ucx_skips_by_default(tmp_path: Path) -> None:
    result = _pytest_without_ucx(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "UCX unavailable" in result.stdout, result.stdout


def test_missing_ucx_errors_when_required(tmp_path: Path) -> None:
    """KVXFER_REQUIRE_UCX=1 (set by .ci/run): a missing UCX is an error of each `ucx` test, never a skip."""
    result = _pytest_without_ucx(tmp_path, KVXFER_REQUIRE_UCX="1")
    assert result.returncode != 0, result.stdout
    assert "1 error" in result.stdout and "skipped" not in result.stdout, result.stdout
    assert "KVXFER_REQUIRE_UCX=1" in result.stdout and "missing-libucp.so" in result.stdout, result.stdout


def test_ci_requires_ucx() -> None:
    script = (REPO / ".ci" / "run").read_text()
    assert "export KVXFER_REQUIRE_UCX=1" in script
    assert script.index("export KVXFER_REQUIRE_UCX=1") < script.index('eval "$command"')
