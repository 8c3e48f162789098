"""`kvxfer-bench serve` against a real HTTP server that streams OpenAI-style chunks, and its metric arithmetic."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kvxfer.bench import serve
from kvxfer.bench.cli import main as bench_main
from kvxfer.errors import ConfigError

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


def _app(step_s: float, fail_every: int) -> object:
    from fastapi.responses import JSONResponse, StreamingResponse

    app = fastapi.FastAPI()
    seen = {"count": 0, "bodies": []}
    app.state.seen = seen

    @app.post("/v1/completions")
    async def completions(body: dict) -> object:  # type: ignore[type-arg]
        import asyncio

        seen["count"] += 1
        seen["bodies"].append(body)
        if fail_every and seen["count"] % fail_every == 0:
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)
        n = int(body["max_tokens"])

        async def chunks() -> Iterator[str]:  # type: ignore[misc]
            for i in range(n):
                await asyncio.sleep(step_s)
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i}"}]}) + "\n\n"
            final = {
                "choices": [],
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n},
                "kvxfer": {"timing": {"queue_s": 0.001, "prefill_s": 0.002, "transfer_s": 0.0005}},
            }
            yield "data: " + json.dumps(final) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict]]:
    step_s, fail_every = getattr(request, "param", (0.002, 0))
    app = _app(step_s, fail_every)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app.state.seen  # type: ignore[attr-defined]
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.mark.timeout(60)
def test_load_points_count_every_request_and_token(server: tuple[str, dict]) -> None:
    url, seen = server
    specs = [serve.LoadSpec(concurrency=c, num_requests=6, isl=12, osl=5) for c in (1, 3)]
    rows = serve.run(url, "m", specs, warmup=1, slo_ttft_s=10.0, slo_itl_s=10.0)
    assert [row["concurrency"] for row in rows] == [1, 3]
    for row in rows:
        assert row["completed"] == 6 and row["errors"] == 0
        assert row["output_tokens"] == 30
        assert row["ttft_ms_p50"] > 0 and row["itl_ms_p50"] > 0
        assert row["latency_ms_p50"] >= row["ttft_ms_p50"]
        assert row["goodput_requests_per_s"] == pytest.approx(row["requests_per_s"])
        assert row["server_transfer_ms_p50"] == pytest.approx(0.5)
    timed = [b for b in seen["bodies"] if "kvxfer" in b]  # the warm-up requests ask no timing
    assert len(timed) == 12 and all(len(b["prompt"]) == 12 and b["stream"] and b["ignore_eos"] for b in timed)
    assert len({tuple(b["prompt"]) for b in timed}) == 6  # distinct prompts per load point (same seed each point)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", [(0.001, 3)], indirect=True)
def test_failed_requests_are_counted_not_fatal(server: tuple[str, dict]) -> None:
    url, _ = server
    rows = serve.run(url, "m", [serve.LoadSpec(concurrency=2, num_requests=9, isl=4, osl=3)], warmup=0)
    assert rows[0]["errors"] == 3 and rows[0]["completed"] == 6
    assert "503" in rows[0]["first_error"]


@pytest.mark.timeout(60)
def test_cli_writes_json(server: tuple[str, dict], tmp_path) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    out = tmp_path / "serve.json"
    code = bench_main(
        [
            "serve",
            "--url",
            url,
            "--model",
            "m",
            "--concurrency",
            "2",
            "--requests",
            "4",
            "--isl",
            "8",
            "--osl",
            "3",
            "--warmup",
            "0",
            "--slo-ttft-ms",
            "0.000001",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    document = json.loads(out.read_text())
    (rows,) = document["tables"].values()
    assert rows[0]["completed"] == 4
    assert rows[0]["goodput_requests_per_s"] == 0.0  # nobody meets a 1 ns TTFT limit
    assert document["environment"]["command"]


def test_summarize_follows_aiperf_definitions() -> None:
    records = [
        serve.RequestRecord(start=0.0, first_token=0.1, end=1.1, output_tokens=11),
        serve.RequestRecord(start=0.5, first_token=0.9, end=1.9, output_tokens=6),
        serve.RequestRecord(start=1.0, error="boom"),
    ]
    summary = serve.summarize(records, slo_ttft_s=0.2)
    assert summary["completed"] == 2 and summary["errors"] == 1
    assert summary["duration_s"] == pytest.approx(1.9)
    assert summary["output_tokens_per_s"] == pytest.approx(17 / 1.9)
    assert summary["itl_ms_avg"] == pytest.approx((100.0 + 200.0) / 2)  # (1.0/10, 1.0/5) s
    assert summary["goodput_requests_per_s"] == pytest.approx(1 / 1.9)  # only the first meets TTFT <= 0.2 s


def test_bad_load_specs_are_refused() -> None:
    with pytest.raises(ConfigError):
        serve.LoadSpec(concurrency=0, num_requests=1, isl=1, osl=1)
    with pytest.raises(ConfigError):
        serve.LoadSpec(concurrency=1, num_requests=1, isl=1, osl=1, timeout_s=float("nan"))
    assert bench_main(["serve", "--model", "m", "--concurrency", "x"]) == 2
