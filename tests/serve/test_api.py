"""The OpenAI-compatible API of `kvxfer router` over null workers: real processes, real HTTP, the openai client.

Null workers echo the prompt's tokens, so the expected output text is known exactly.
"""

from __future__ import annotations

import openai
import pytest

from .conftest import Server

pytestmark = pytest.mark.timeout(180)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30.0)


def test_models_and_health(null_cluster: Server) -> None:
    models = client(null_cluster).models.list()
    assert [m.id for m in models.data] == ["tiny-random"]
    health = null_cluster.http.get("/health")
    assert health.status_code == 200 and health.json()["workers"] == {"prefill": 1, "decode": 2, "agg": 0}


def test_completion_non_streaming_echoes_with_usage_and_timing(null_cluster: Server) -> None:
    answer = client(null_cluster).completions.create(
        model="tiny-random", prompt="abcdef", max_tokens=4, extra_body={"kvxfer": {"timing": True}}
    )
    assert answer.choices[0].text == "abcd" and answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (6, 4)
    timing = answer.model_extra["kvxfer"]
    assert timing["disaggregated"] is False and timing["ttft_s"] > 0
    assert timing["decode_worker"] in ("decode-0", "decode-1")


def test_chat_streaming_with_usage_and_timing_in_the_final_chunk(null_cluster: Server) -> None:
    stream = client(null_cluster).chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"kvxfer": {"timing": True}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert "ttft_s" in finals[0].model_extra["kvxfer"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert len(text) > 0  # the echoed chat template (byte-level tokens: one character each)


def test_stop_string_cuts_the_text_and_is_not_sent(null_cluster: Server) -> None:
    openai_client = client(null_cluster)
    answer = openai_client.completions.create(model="tiny-random", prompt="hello world", max_tokens=11, stop=["wor"])
    assert answer.choices[0].text == "hello " and answer.choices[0].finish_reason == "stop"
    streamed = openai_client.completions.create(
        model="tiny-random", prompt="hello world", max_tokens=11, stop="o w", stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == "hell"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_min_tokens_ignores_stop_strings_before_it(null_cluster: Server) -> None:
    openai_client = client(null_cluster)
    early = openai_client.completions.create(model="tiny-random", prompt="hello world", max_tokens=11, stop=["hel"])
    assert early.choices[0].text == "" and early.choices[0].finish_reason == "stop"
    held = openai_client.completions.create(
        model="tiny-random", prompt="hello world", max_tokens=11, stop=["hel"], extra_body={"min_tokens": 4}
    )
    assert held.choices[0].text == "hello world" and held.choices[0].finish_reason == "length"


def test_priority_header_and_body_are_accepted(null_cluster: Server) -> None:
    body = {"model": "tiny-random", "prompt": "xy", "max_tokens": 2}
    assert null_cluster.post("/v1/completions", {**body, "priority": "high"}).status_code == 200
    assert null_cluster.post("/v1/completions", body, headers={"x-priority": "low"}).status_code == 200


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({"model": "tiny-random", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
        (
            {"model": "tiny-random", "prompt": "x", "max_tokens": 10_000_000},
            400,
            "max_tokens",
            "context_length_exceeded",
        ),
        ({"model": "tiny-random", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ({"model": "tiny-random", "prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens", "invalid_value"),
        ({"model": "tiny-random", "prompt": "x", "min_tokens": 17}, 400, "min_tokens", "invalid_value"),
        ({"model": "tiny-random", "prompt": "x", "min_tokens": -1}, 400, "min_tokens", "invalid_value"),
        ({"model": "gpt-17", "prompt": "x"}, 404, "model", "model_not_found"),
        ({"model": "tiny-random", "prompt": ""}, 400, "prompt", "invalid_value"),
        ({"model": "tiny-random", "prompt": "x", "n": 2}, 400, "n", "unsupported_value"),
        ({"model": "tiny-random", "prompt": "x", "temperature": 7}, 400, "temperature", "invalid_value"),
        ({"model": "tiny-random", "prompt": "x", "stop": [1, 2]}, 400, "stop", "invalid_type"),
        ({"model": "tiny-random", "prompt": "x", "priority": "urgent"}, 400, "priority", "invalid_value"),
        ({"model": "tiny-random", "prompt": "x", "kvxfer": {"oops": 1}}, 400, "kvxfer", "invalid_value"),
        ({"prompt": "x"}, 400, "model", "missing"),
    ],
)
def test_bad_completion_bodies_get_openai_error_objects(
    null_cluster: Server, body: dict, status: int, param: str, code: str
) -> None:
    reply = null_cluster.post("/v1/completions", body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] and error["message"]


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
    ],
)
def test_bad_chat_bodies_get_openai_error_objects(null_cluster: Server, messages: object, param: str) -> None:
    reply = null_cluster.post("/v1/chat/completions", {"model": "tiny-random", "messages": messages})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_invalid_json_and_non_object_bodies(null_cluster: Server) -> None:
    for raw in (b"{bad", b"[1, 2]", b"\xff\xfe"):
        reply = null_cluster.http.post("/v1/completions", content=raw)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"


def test_the_openai_client_raises_on_errors(null_cluster: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        client(null_cluster).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client(null_cluster).completions.create(model="tiny-random", prompt="x", max_tokens=1 << 24)


def test_unknown_path_is_an_error_object(null_cluster: Server) -> None:
    reply = null_cluster.http.get("/v1/nothing")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"


def test_an_oversized_body_is_refused_with_413(null_cluster: Server) -> None:
    reply = null_cluster.http.post("/v1/completions", content=b"x" * (9 << 20))
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"
