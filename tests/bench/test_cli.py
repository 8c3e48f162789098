"""`kvxfer-bench` end to end on a CPU with tiny sizes: sweep (local in one process, ucx between two), target by
hand, ceiling, kernels, --compare nixl, and the JSON schema other tools read."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from kvxfer.bench import cli
from kvxfer.bench.sweep import ROW_KEYS

pytestmark = pytest.mark.timeout(120)

#: The sweep row schema, spelled out: changing it breaks readers of recorded results (append keys at the end).
SWEEP_ROW = (
    "system",
    "backend",
    "peer",
    "initiator",
    "target",
    "op",
    "block_size",
    "batch_size",
    "threads",
    "request_bytes",
    "gbps",
    "avg_lat_us",
    "median_us",
    "p99_us",
    "prep_avg_us",
    "prep_p99_us",
    "post_avg_us",
    "post_p99_us",
    "completion_avg_us",
    "completion_p99_us",
    "path",
    "ceiling",
    "ceiling_gbps",
    "ratio",
    "verified",
    "nixl_gbps",
    "vs_nixl",
)
CEILING_ROW = ("ceiling", "path", "op", "nbytes", "gbps", "median_us", "p99_us", "timer")
TINY = [
    "--sizes",
    "4K,16K",
    "--batch",
    "2",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--ceiling-bytes",
    "1M",
    "--no-progress",
]


def _sweep(tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "sweep.json"
    code = cli.main(["sweep", *TINY, "--json", str(out), *extra])
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_row_keys_are_the_documented_schema() -> None:
    assert ROW_KEYS == SWEEP_ROW


def test_local_sweep_writes_json_csv_and_plot(tmp_path, capsys) -> None:
    plot, table = tmp_path / "sweep.png", tmp_path / "sweep.csv"
    code, document = _sweep(
        tmp_path, "--backend", "local", "--threads", "1,2", "--plot", str(plot), "--csv", str(table)
    )
    assert code == 0
    assert set(document) == {"schema", "environment", "subcommand", "config", "notes", "tables"}
    assert document["schema"] == "kvxfer-bench/1" and document["subcommand"] == "sweep"
    assert {"date", "host", "command", "devices"} <= set(document["environment"])
    rows, limits = document["tables"]["sweep"], document["tables"]["ceilings"]
    assert len(rows) == 2 * 2 * 2  # ops x sizes x threads
    for row in rows:
        assert tuple(row) == SWEEP_ROW
        assert row["system"] == "kvxfer" and row["backend"] == "local" and row["verified"] is True
        assert row["request_bytes"] == row["block_size"] * row["batch_size"] * row["threads"]
        assert row["gbps"] > 0 and row["ceiling_gbps"] > 0
        assert row["ratio"] == pytest.approx(row["gbps"] / row["ceiling_gbps"])
        assert row["p99_us"] >= row["median_us"] > 0 and row["prep_avg_us"] > 0 and row["post_avg_us"] > 0
    assert [tuple(c) for c in limits] == [CEILING_ROW] and limits[0]["ceiling"] == "memcpy"
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with table.open() as file:
        header = next(csv.reader(file))
    assert header[0] == "table" and header[1 : len(SWEEP_ROW) + 1] == list(SWEEP_ROW)
    assert "block_size" in capsys.readouterr().out


def test_byte_check_fails_when_the_backend_moves_nothing(tmp_path, monkeypatch, capsys) -> None:
    from kvxfer.backends import local

    monkeypatch.setattr(local, "_host_copy", lambda sources, destinations, sizes: None)
    code, document = _sweep(tmp_path, "--backend", "local", "--op", "READ", "--sizes", "4K")
    assert code == 1
    assert [row["verified"] for row in document["tables"]["sweep"]] == [False]
    assert "byte check FAILED" in capsys.readouterr().err


def test_bad_arguments_exit_2_with_the_reason(capsys) -> None:
    assert cli.main(["sweep", "--memory", "gpu:host", "--no-progress"]) == 2
    assert "memory must be initiator:target pairs" in capsys.readouterr().err
    assert cli.main(["sweep", "--backend", "carrier-pigeon", "--no-progress"]) == 2


def test_compare_nixl_is_skipped_cleanly_without_nixl(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "nixl", None)  # what an environment without NIXL looks like to find_spec
    code, document = _sweep(tmp_path, "--backend", "local", "--op", "WRITE", "--compare", "nixl")
    assert code == 0
    assert any("--compare nixl skipped: NIXL is not installed" in note for note in document["notes"])
    assert all(row["system"] == "kvxfer" and row["nixl_gbps"] is None for row in document["tables"]["sweep"])
    assert "--compare nixl skipped" in capsys.readouterr().out


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("nixl") is None, reason="NIXL is not installed")
def test_compare_nixl_runs_the_same_work_when_installed(tmp_path) -> None:
    code, document = _sweep(tmp_path, "--backend", "local", "--op", "WRITE", "--compare", "nixl")
    assert code == 0, document.get("notes")
    rows = document["tables"]["sweep"]
    ours, theirs = [r for r in rows if r["system"] == "kvxfer"], [r for r in rows if r["system"] == "nixl"]
    assert [r["block_size"] for r in theirs] == [r["block_size"] for r in ours] == [4096, 16384]
    assert all(r["verified"] is True and r["gbps"] > 0 and tuple(r) == SWEEP_ROW for r in theirs)
    for mine, nixl in zip(ours, theirs, strict=True):
        assert mine["nixl_gbps"] == nixl["gbps"] and mine["vs_nixl"] == pytest.approx(mine["gbps"] / nixl["gbps"])


@pytest.mark.ucx
def test_ucx_sweep_between_two_processes(tmp_path) -> None:
    code, document = _sweep(tmp_path, "--backend", "ucx", "--threads", "2")
    assert code == 0
    rows = document["tables"]["sweep"]
    assert len(rows) == 4 and all(r["backend"] == "ucx" and r["verified"] is True for r in rows)
    assert all(r["peer"] == "loopback" and r["path"] in ("cma", "staged", "direct") for r in rows)


@pytest.mark.ucx
def test_ucx_sweep_against_a_target_started_by_hand(tmp_path) -> None:
    target = subprocess.Popen(
        [sys.executable, "-m", "kvxfer.bench.cli", "target", "--nbytes", "1M", "--once"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        line = target.stdout.readline()
        assert " listening on " in line, line
        address = line.split(" listening on ")[1].split(";")[0]
        code, document = _sweep(tmp_path, "--backend", "ucx", "--peer", address, "--op", "READ")
        assert code == 0
        assert [r["peer"] for r in document["tables"]["sweep"]] == [address, address]
        assert all(r["verified"] is True for r in document["tables"]["sweep"])
        assert target.wait(timeout=30) == 0  # --once: the target leaves after the initiator's goodbye
        gone = cli.main(["sweep", *TINY, "--backend", "ucx", "--peer", address])
        assert gone == 2  # the target has left: a clear error, not a hang
    finally:
        if target.poll() is None:
            target.kill()
        target.wait(timeout=30)
        target.stdout.close()


def test_ceiling_reports_memcpy_and_says_what_it_skipped(tmp_path, capsys) -> None:
    out = tmp_path / "ceiling.json"
    assert cli.main(["ceiling", "--host-bytes", "1M", "--repeats", "3", "--no-perftest", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    rows = document["tables"]["ceilings"]
    assert rows[0]["ceiling"] == "memcpy" and rows[0]["gbps"] > 0 and tuple(rows[0]) == CEILING_ROW
    assert "ucx_perftest: --no-perftest" in document["notes"]
    assert "skipped: ucx_perftest" in capsys.readouterr().out


@pytest.mark.ucx
def test_ceiling_runs_ucx_perftest_when_present(tmp_path) -> None:
    from kvxfer.bench.ceiling import perftest_binary

    if perftest_binary() is None:
        pytest.skip("ucx_perftest is not shipped here")
    out = tmp_path / "ceiling.json"
    assert (
        cli.main(["ceiling", "--host-bytes", "1M", "--repeats", "2", "--perftest-sizes", "64K", "--json", str(out)])
        == 0
    )
    perftest = [r for r in json.loads(out.read_text())["tables"]["ceilings"] if r["timer"] == "ucx_perftest"]
    assert sorted(r["op"] for r in perftest) == ["READ", "WRITE"] and all(r["gbps"] > 0 for r in perftest)


def test_kernels_without_a_gpu_is_skipped_with_a_message(tmp_path, capsys) -> None:
    from kvxfer.devices import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present: the kernels benchmark itself runs (kvxfer.bench.kernels owns it)")
    out = tmp_path / "kernels.json"
    assert cli.main(["kernels", "--quick", "--json", str(out)]) == 0
    assert "kvxfer-bench kernels skipped: needs a CUDA GPU" in capsys.readouterr().out
    document = json.loads(out.read_text())
    assert document["subcommand"] == "kernels" and document["rows"] == [] and "cupy" in document["skipped"]
    with pytest.raises(SystemExit):
        cli.main(["ceiling", "--quick"])  # pass-through arguments are for kernels only


def test_default_ceiling_is_a_contiguous_copy_of_each_rows_bytes(tmp_path) -> None:
    out = tmp_path / "sweep.json"
    arguments = [
        "sweep",
        "--backend",
        "local",
        "--op",
        "READ",
        "--sizes",
        "4K,64K",
        "--batch",
        "3",
        "--repeats",
        "2",
        "--no-progress",
        "--json",
        str(out),
    ]
    assert cli.main(arguments) == 0
    document = json.loads(out.read_text())
    copies = {c["nbytes"]: c["gbps"] for c in document["tables"]["ceilings"]}
    assert sorted(copies) == [3 * 4096, 3 * 65536]
    for row in document["tables"]["sweep"]:
        assert row["ceiling"] == "memcpy host->host" and row["ceiling_gbps"] == copies[row["request_bytes"]]


@pytest.mark.ucx
def test_perftest_ceiling_for_ucx_rows(tmp_path) -> None:
    from kvxfer.bench.ceiling import perftest_binary

    if perftest_binary() is None:
        pytest.skip("ucx_perftest is not shipped here")
    code, document = _sweep(tmp_path, "--backend", "ucx", "--op", "WRITE", "--sizes", "64K", "--ceiling", "perftest")
    assert code == 0
    [row] = document["tables"]["sweep"]
    assert row["ceiling"] == "ucx_perftest ucp_put_bw host->host" and row["ceiling_gbps"] > 0


def test_gpu_check_command_lines_still_parse() -> None:
    """scripts/gpu-check.sh runs these exact argument lists."""
    ipc = cli.parser().parse_args(["ipc", "--json", "x.json"])
    assert ipc.command == "ipc" and ipc.json == "x.json" and ipc.source == 0 and ipc.target == 1
    kv = cli.parser().parse_args(
        [
            "kv",
            "--model",
            "llama-3.1-8b",
            "--tokens",
            "4096",
            "--block-size",
            "16",
            "--p-tp",
            "1",
            "--d-tp",
            "2",
            "--json",
            "kv.json",
        ]
    )
    assert (kv.model, kv.tokens, kv.block_size, kv.p_tp, kv.d_tp, kv.json) == (
        "llama-3.1-8b",
        4096,
        16,
        1,
        2,
        "kv.json",
    )


def test_plot_subcommand_redraws_a_recorded_sweep(tmp_path) -> None:
    code, _ = _sweep(tmp_path, "--backend", "local", "--op", "READ")
    assert code == 0
    image = tmp_path / "again.png"
    assert cli.main(["plot", str(tmp_path / "sweep.json"), str(image)]) == 0
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 1000
    assert cli.main(["plot", str(tmp_path / "missing.json"), str(image)]) == 2


def test_a_case_that_fails_is_noted_and_the_other_rows_are_kept(tmp_path, monkeypatch, capsys) -> None:
    from kvxfer.bench import sweep
    from kvxfer.errors import TransferError

    original = sweep._Initiator.measure

    def measure(self, case):
        if case.fragment == 16384:
            raise TransferError("simulated failure of one case", None, "local")
        return original(self, case)

    monkeypatch.setattr(sweep._Initiator, "measure", measure)
    code, document = _sweep(tmp_path, "--backend", "local", "--op", "READ")
    assert code == 1
    assert [row["block_size"] for row in document["tables"]["sweep"]] == [4096]
    assert any(note.startswith("FAILED") and "simulated failure" in note for note in document["notes"])
    assert "1 case(s) FAILED" in capsys.readouterr().err


@pytest.mark.ucx
def test_target_killed_mid_sweep_fails_the_rest_without_a_hang(tmp_path) -> None:
    from kvxfer.bench import sweep

    target = subprocess.Popen(
        [sys.executable, "-m", "kvxfer.bench.cli", "target", "--nbytes", "1M"], stdout=subprocess.PIPE, text=True
    )
    try:
        address = target.stdout.readline().split(" listening on ")[1].split(";")[0]
        config = sweep.SweepConfig(
            backends=("ucx",),
            ops=("WRITE",),
            sizes=(4096, 8192, 16384),
            batches=(2,),
            repeats=2,
            warmup=0,
            peer=address,
            timeout=10.0,
            ceiling_nbytes=1 << 20,
        )
        began = time.monotonic()
        result = sweep.run(config, on_row=lambda case, row: target.kill())
        assert time.monotonic() - began < 60
        assert [row["block_size"] for row in result.rows] == [4096]
        assert any(note.startswith("FAILED") for note in result.notes)
    finally:
        target.kill()
        target.wait(timeout=30)
        target.stdout.close()


@pytest.mark.ucx
@pytest.mark.timeout(60)
def test_a_lost_target_ends_the_wait_for_its_answer() -> None:
    """A target that dies between a request and its answer: the wait ends once the agent has lost it, with an error
    that says so, not after the (here 600 s) answer timeout."""
    from kvxfer import Agent
    from kvxfer.bench.target import TargetLink
    from kvxfer.errors import PeerError

    target = subprocess.Popen(
        [sys.executable, "-m", "kvxfer.bench.cli", "target", "--nbytes", "1M"], stdout=subprocess.PIPE, text=True
    )
    try:
        address = target.stdout.readline().split(" listening on ")[1].split(";")[0]
        with Agent("initiator", backends=["ucx"]) as agent:
            link = TargetLink(agent, address, timeout=600.0)
            assert link.digest("host", [0], 64)  # a live target answers
            target.send_signal(signal.SIGSTOP)  # the request goes out; the answer never comes
            killer = threading.Timer(1.0, target.kill)
            killer.start()
            try:
                with pytest.raises(PeerError, match="was lost"):
                    link.digest("host", [0], 64)
            finally:
                killer.join()
    finally:
        target.kill()
        target.wait(timeout=30)
        target.stdout.close()


@pytest.mark.parametrize("command", [["ipc"], ["kv"], ["kv", "--backend", "ucx"]])
def test_gpu_subcommands_without_cupy_are_skipped_with_a_message(command, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # what a machine without cupy looks like to `import cupy`
    out = tmp_path / "skipped.json"
    assert cli.main([*command, "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"kvxfer-bench {command[0]} skipped: needs a CUDA GPU: cupy is not installed" in printed.out
    assert "Traceback" not in printed.err
    document = json.loads(out.read_text())
    assert document["subcommand"] == command[0] and document["tables"] == {} and "cupy" in document["skipped"]


def test_kv_on_host_memory_is_not_skipped_without_cupy(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert (
        cli.main(
            ["kv", "--backend", "local", "--model", "custom", "--dims", "2,2,16", "--tokens", "64", "--repeats", "2"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "skipped" not in printed and "KV request through KVPipe (local)" in printed


def test_kv_prefill_process_that_dies_is_an_error_not_a_hang(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KVXFER_UCX_LIB", "/nonexistent/libucp.so")  # the spawned prefill cannot create its agent
    began = time.monotonic()
    assert (
        cli.main(
            ["kv", "--backend", "ucx-host", "--model", "custom", "--dims", "2,2,16", "--tokens", "64", "--repeats", "1"]
        )
        == 2
    )
    assert time.monotonic() - began < 60
    assert "kvxfer-bench kv: error: prefill-0 exited (code 1) before answering" in capsys.readouterr().err


def test_local_subcommand_reports_plan_post_and_bandwidth_rows(tmp_path) -> None:
    out = tmp_path / "x.json"
    assert cli.main(["local", "--repeats", "1", "--total-mib", "1", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["subcommand"] == "local"
    steps, bandwidth = document["tables"]["plan / select / post"], document["tables"]["local backend vs numpy copy"]
    assert [row["step"] for row in steps] == [
        "descs (both sides)",
        "plan",
        "select",
        "post, back to back",
        "post, after an idle wait",
    ]
    assert all(row["descriptors"] > 0 and row["p99_ms"] >= row["median_ms"] > 0 for row in steps)
    assert [row["fragment_bytes"] for row in bandwidth] == [4096 << i for i in range(9)]  # 4 KiB ... 1 MiB
    for row in bandwidth:
        assert row["fragments"] * row["fragment_bytes"] == 1 << 20
        assert (
            row["GB/s"] > 0 and row["numpy_GB/s"] > 0 and row["ratio"] == pytest.approx(row["GB/s"] / row["numpy_GB/s"])
        )
