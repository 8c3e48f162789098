"""OutputText: stop strings on the detokenized text, held-back prefixes, and ``min_tokens`` (stops before it are
ignored, as vLLM does)."""

from __future__ import annotations

import pytest

from kvxfer.models.tiny import byte_tokenizer
from kvxfer.serve.router_text import OutputText


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return byte_tokenizer()


def _feed(out: OutputText, ids: list[int], step: int) -> str:
    sent = ""
    for start in range(0, len(ids), step):
        text, stopped = out.push(ids[start : start + step])
        sent += text
        if stopped:
            return sent
    return sent + out.flush()


@pytest.mark.parametrize("step", [1, 3, 100])
def test_stop_string_cuts_and_counts_tokens_up_to_the_stop(tokenizer, step: int) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode("hello world, hello moon", add_special_tokens=False)
    out = OutputText(tokenizer, ["wor"])
    assert _feed(out, ids, step) == "hello " and out.stopped
    assert out.num_tokens == len(tokenizer.encode("hello wor", add_special_tokens=False))


@pytest.mark.parametrize("step", [1, 4, 100])
def test_min_tokens_ignores_stops_completed_before_it(tokenizer, step: int) -> None:  # type: ignore[no-untyped-def]
    text = "hello world, hello moon"
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = OutputText(tokenizer, ["hel"], min_tokens=5)  # the first "hel" ends at token 3: ignored
    assert _feed(out, ids, step) == "hello world, " and out.stopped
    never = OutputText(tokenizer, ["hel"], min_tokens=len(ids))  # no "hel" ends at the last token
    assert _feed(never, ids, step) == text and not never.stopped


def test_the_earliest_completed_stop_wins(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode("xabcdy", add_special_tokens=False)
    out = OutputText(tokenizer, ["abcd", "bc"])
    assert _feed(out, ids, 1) == "xa"  # "bc" is complete before "abcd"
