"""`kvxfer serve` end to end on CPU with tiny-random: real router, real prefill / decode / agg worker processes, the
openai client. One server is shared by the module (1 prefill + 1 decode worker; remote prefill above 64 uncached
prompt tokens). "Aggregated" is the decode worker prefilling the prompt itself (``kvxfer.prefill: local``)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import Server, launch, write_policy

pytestmark = pytest.mark.timeout(300)
LONG = "The quick brown fox jumps over the lazy dog; " * 4  # ~180 byte-level tokens: remote prefill
SHORT = "Hi!"


@pytest.fixture(scope="module")
def tiny_serve(server_dir: Path) -> Iterator[Server]:
    policy = write_policy(server_dir / "e2e.json", max_local_prefill_length=64, ttft_slo_s=60.0)
    server = launch(
        [
            "serve",
            "--model",
            "tiny-random",
            "--prefill",
            "1",
            "--decode",
            "1",
            "--port",
            "0",
            "--policy",
            str(policy),
            "--num-blocks",
            "256",
        ],
        server_dir / "serve.log",
    )
    try:
        yield server
    finally:
        assert server.stop() == 0


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60.0)


def generate(server: Server, prompt: str, mode: str, max_tokens: int = 12) -> dict:
    reply = server.post(
        "/v1/completions",
        {
            "model": "tiny-random",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "kvxfer": {"timing": True, "token_ids": True, "prefill": mode},
        },
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_streaming_and_non_streaming_chat_agree(tiny_serve: Server) -> None:
    messages = [{"role": "user", "content": "Tell me about KV caches."}]
    answer = client(tiny_serve).chat.completions.create(
        model="tiny-random", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    stream = client(tiny_serve).chat.completions.create(
        model="tiny-random",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert answer.choices[0].message.content == streamed
    assert answer.usage is not None and answer.usage.completion_tokens == 10


def test_disaggregated_output_equals_aggregated_token_for_token(tiny_serve: Server) -> None:
    remote = generate(tiny_serve, LONG, "remote")  # nothing cached anywhere yet
    again = generate(tiny_serve, LONG, "remote")  # the decode worker has the prefix cached now
    local = generate(tiny_serve, LONG, "local")
    assert local["kvxfer"]["disaggregated"] is False
    assert remote["kvxfer"]["disaggregated"] is True and remote["kvxfer"]["kv_bytes"] > 0
    assert remote["kvxfer"]["cached_tokens"] == 0 < again["kvxfer"]["cached_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["kvxfer"]["cached_tokens"]
    assert again["kvxfer"]["kv_bytes"] < remote["kvxfer"]["kv_bytes"]  # only the uncached tail moved
    assert len(local["kvxfer"]["token_ids"]) == 12
    assert local["kvxfer"]["token_ids"] == remote["kvxfer"]["token_ids"] == again["kvxfer"]["token_ids"]
    other = generate(tiny_serve, LONG + "and a different tail", "remote")
    assert (
        other["kvxfer"]["token_ids"]
        == generate(tiny_serve, LONG + "and a different tail", "local")["kvxfer"]["token_ids"]
    )


def test_min_tokens_holds_back_a_stop_token_on_both_paths(tiny_serve: Server) -> None:
    first = generate(tiny_serve, LONG, "local", max_tokens=1)["kvxfer"]["token_ids"][0]
    for mode in ("local", "remote"):
        body = {"model": "tiny-random", "prompt": LONG, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        body["stop_token_ids"] = [first]
        plain = tiny_serve.post("/v1/completions", {**body, "kvxfer": {"token_ids": True, "prefill": mode}}).json()
        assert plain["kvxfer"]["token_ids"] == [first] and plain["choices"][0]["finish_reason"] == "stop"
        held = tiny_serve.post(
            "/v1/completions", {**body, "min_tokens": 3, "kvxfer": {"token_ids": True, "prefill": mode}}
        ).json()
        ids = held["kvxfer"]["token_ids"]
        assert len(ids) >= 3 and first not in ids[:3], (mode, ids)


def test_conditional_disaggregation_both_branches(tiny_serve: Server) -> None:
    remote_before = tiny_serve.metric("kvxfer_disaggregation_decisions_total", prefill="remote")
    short = generate(tiny_serve, SHORT, "auto")["kvxfer"]
    long = generate(tiny_serve, "A fresh long prompt, never seen before by any worker. " * 4, "auto")["kvxfer"]
    assert short["disaggregated"] is False and short["prefill_worker"] == "decode-0"
    assert long["disaggregated"] is True and (long["prefill_worker"], long["decode_worker"]) == (
        "prefill-0",
        "decode-0",
    )
    assert tiny_serve.metric("kvxfer_disaggregation_decisions_total", prefill="remote") == remote_before + 1
    assert tiny_serve.metric("kvxfer_ttft_part_seconds_count", part="transfer") >= 1


def free_blocks(server: Server) -> dict[str, int]:
    return {w["name"]: w["free_blocks"] for w in server.workers_info()}


def test_client_disconnect_mid_stream_frees_kv_on_both_sides(tiny_serve: Server) -> None:
    time.sleep(0.6)  # a fresh load report from every worker
    before = free_blocks(tiny_serve)
    body = {
        "model": "tiny-random",
        "prompt": "Disconnect me please. " * 10,
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
        "kvxfer": {"prefill": "remote"},
    }
    with (
        httpx.Client(base_url=tiny_serve.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()  # kept open: closing the iterator would close the connection
        for _ in range(3):
            assert next(line for line in lines if line.startswith("data:"))
        time.sleep(0.6)
        assert free_blocks(tiny_serve)["decode-0"] < before["decode-0"]  # the request holds blocks now
    give_up = time.monotonic() + 20
    while free_blocks(tiny_serve) != before and time.monotonic() < give_up:
        time.sleep(0.2)
    assert free_blocks(tiny_serve) == before
    assert tiny_serve.metric("kvxfer_aborts_total", cause="disconnect") >= 1


@pytest.mark.slow
def test_agg_worker_output_and_sigint_drain(server_dir: Path, tiny_serve: Server) -> None:
    server = launch(
        ["serve", "--model", "tiny-random", "--prefill", "1", "--agg", "1", "--decode", "0", "--port", "0"],
        server_dir / "sigint.log",
    )
    try:
        reply = server.post(
            "/v1/completions",
            {
                "model": "tiny-random",
                "prompt": LONG,
                "max_tokens": 12,
                "temperature": 0,
                "ignore_eos": True,
                "kvxfer": {"token_ids": True},
            },
        )
        assert reply.status_code == 200
        agg_ids = reply.json()["kvxfer"]["token_ids"]  # an agg worker always prefills locally
        assert agg_ids == generate(tiny_serve, LONG, "remote")["kvxfer"]["token_ids"]
        pid = server.process.pid
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert len(children) == 2
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(60) == 0
        assert "draining" in server.log.read_text()
        for child in children:  # gone (or a zombie about to be reaped by init), not running on
            stat = Path(f"/proc/{child}/stat")
            assert not stat.exists() or stat.read_text().split(")")[1].split()[0] in ("Z", "X")
    finally:
        server.stop()


@pytest.mark.slow
def test_kvxfer_demo_answers_and_reports_the_kv_moved(capsys: pytest.CaptureFixture[str]) -> None:
    from kvxfer import cli

    assert cli.main(["demo", "--model", "tiny-random", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "TTFT:" in out and "KV transfer" in out
    assert "prefill-0 -> decode-0" in out and "KV moved: 0 bytes" not in out


def child_pids(pid: int, name: str) -> list[int]:
    """Processes started by ``pid`` whose command line carries ``--name NAME``."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"--name" in argv and argv[argv.index(b"--name") + 1] == name.encode():
            found.append(int(child))
    return found


@pytest.mark.slow
def test_sigkill_of_a_real_prefill_worker_under_load_leaves_no_request_hanging(server_dir: Path) -> None:
    import concurrent.futures
    import os

    server = launch(
        ["serve", "--model", "tiny-random", "--prefill", "2", "--decode", "1", "--port", "0", "--num-blocks", "512"],
        server_dir / "kill-real.log",
    )
    try:
        (victim,) = child_pids(server.process.pid, "prefill-0")

        def ask(index: int) -> httpx.Response:
            return server.post(
                "/v1/completions",
                {
                    "model": "tiny-random",
                    "prompt": f"{index} " + LONG * 2,
                    "max_tokens": 8,
                    "ignore_eos": True,
                    "kvxfer": {"prefill": "remote", "timing": True},
                },
            )

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(ask, i) for i in range(24)]
            # kill it while it prefills (a fixed sleep raced with faster engines: all could be done by then)
            give_up = time.monotonic() + 30
            while server.worker("prefill-0")["in_flight_prefills"] == 0:
                assert time.monotonic() < give_up, "prefill-0 never had a prefill in flight"
                time.sleep(0.005)
            os.kill(victim, signal.SIGKILL)
            replies = [f.result(timeout=120) for f in futures]
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 500, 503}, statuses
        assert statuses.count(200) >= 12, statuses
        for reply in replies:
            if reply.status_code != 200:
                assert reply.json()["error"]["code"] and reply.json()["error"]["message"]
        give_up = time.monotonic() + 10  # the router drops it after 2 s without heartbeats
        while {w["name"] for w in server.workers_info()} != {"prefill-1", "decode-0"}:
            assert time.monotonic() < give_up, server.workers_info()
            time.sleep(0.05)
        assert server.http.get("/kvxfer/workers").json()["in_flight"] == 0
        assert server.metric("kvxfer_prefill_requeues_total") >= 1  # prefill-0's requests went to prefill-1
        after = generate(server, LONG, "remote")  # the survivors still serve
        assert after["kvxfer"]["prefill_worker"] == "prefill-1"
    finally:
        server.stop()
