"""examples/two_node_pd: the two-node P->D demo as a user runs it (network namespaces where permitted, else
loopback), and its cleanup when it is stopped half-way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "two_node_pd" / "two_node_pd.py"
pytestmark = [
    pytest.mark.skipif(
        shutil.which("etcd") is None, reason="etcd binary not found (Debian: apt-get install etcd-server)"
    ),
    pytest.mark.skipif(sys.platform != "linux", reason="the demo uses Linux network namespaces"),
    pytest.mark.slow,
    pytest.mark.timeout(300),
]


def namespaces_of(pid: int) -> list[str]:
    if shutil.which("ip") is None:
        return []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(f"kvx2n-{pid}-")]


def descendants(pid: int) -> list[int]:
    """Processes whose parent chain reaches ``pid``."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def test_demo_moves_kv_between_the_nodes_and_cleans_up(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    process = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--requests",
            "2",
            "--prompt-tokens",
            "600",
            "--max-tokens",
            "4",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(report_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = process.communicate(timeout=280)
    assert process.returncode == 0, out[-4000:]
    report = json.loads(report_path.read_text())
    assert report["mode"] in ("netns", "loopback") and f"OK ({report['mode']})" in out
    if os.geteuid() == 0 and report["mode"] == "loopback":
        pytest.fail(f"root, yet the demo fell back to loopback: {report['topology']}")
    assert report["requests"] == 2 and all(t["disaggregated"] for t in report["timings"])
    assert {t["prefill_worker"] for t in report["timings"]} == {"prefill-a"}
    assert {t["decode_worker"] for t in report["timings"]} == {"decode-b"}
    assert report["kv_bytes"] > 0 and report["kv_metric_bytes"] == report["kv_bytes"]
    assert report["link_bytes"] >= report["kv_bytes"]  # the KV went through the link we measured
    assert "TTFT" in out and "answer:" in out
    assert namespaces_of(process.pid) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="checks namespace cleanup, which needs root")
def test_demo_stopped_half_way_removes_namespaces_and_processes(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--requests", "50", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    give_up = time.monotonic() + 120
    children: list[int] = []
    while len(children) < 4 and time.monotonic() < give_up:  # etcd, router and both workers started
        time.sleep(0.2)
        children = descendants(process.pid)
    assert namespaces_of(process.pid) and len(children) >= 4, children
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode != 0
    assert namespaces_of(process.pid) == []
    time.sleep(1.0)
    alive = [
        pid
        for pid in children
        if os.path.exists(f"/proc/{pid}") and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    ]
    assert alive == [], alive
