"""Worker processes against a fake router (a RouterLink in the test process): register and heartbeats, an
aggregated worker's stream equals the engine's own greedy output, abort, deadlines, bad frames, shutdown, and a
lost router. FakeRouter is shared with test_worker_pd.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvxfer.serve import protocol as p
from kvxfer.serve.control import RouterLink

MODEL = "tiny-random"
WAIT_S = 60.0


class FakeRouter:
    """Records every message per worker; spawns worker subprocesses that connect to it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cond = threading.Condition()
        self.messages: dict[str, list[p.Message]] = {}
        self.link = RouterLink("tcp://127.0.0.1:0", self._on_message)
        self.processes: dict[str, subprocess.Popen] = {}

    def _on_message(self, identity: bytes, message: Any) -> None:
        with self._cond:
            self.messages.setdefault(identity.decode(), []).append(message)
            self._cond.notify_all()

    def spawn(self, role: str, name: str, *extra: str, router: str | None = None) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "kvxfer.serve.worker",
            "--role",
            role,
            "--model",
            MODEL,
            "--router",
            self.link.address if router is None else router,
            "--name",
            name,
            "--num-blocks",
            "64",
            "--log-level",
            "INFO",
            "--threads",
            "1",
            *extra,
        ]
        with open(self.directory / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONFAULTHANDLER": "1"}
            )
        self.processes[name] = process
        return process

    def restart(self) -> None:
        """A new router socket on the same address (the old one closed): what a restarted router looks like."""
        address = self.link.address
        self.link.close()
        with self._cond:
            self.messages.clear()
        self.link = RouterLink(address, self._on_message)

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")[-4000:]

    def wait_for(
        self, name: str, condition: Callable[[p.Message], bool], timeout: float = WAIT_S, start: int = 0
    ) -> p.Message:
        """The first message from ``name`` at index >= ``start`` that satisfies ``condition``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages.get(name, [])[start:]:
                    if condition(message):
                        return message
                left = deadline - time.monotonic()
                process = self.processes.get(name)
                if left <= 0 or (process is not None and process.poll() is not None and not self._cond.wait(0.2)):
                    raise AssertionError(f"no matching message from {name} within {timeout} s; log:\n{self.log(name)}")
                self._cond.wait(min(left, 0.1))

    def count(self, name: str) -> int:
        with self._cond:
            return len(self.messages.get(name, []))

    def register(self, name: str) -> p.Register:
        message = self.wait_for(name, lambda m: isinstance(m, p.Register))
        assert isinstance(message, p.Register)
        return message

    def load(self, name: str, condition: Callable[[p.Load], bool] = lambda m: True, start: int = 0) -> p.Load:
        message = self.wait_for(name, lambda m: isinstance(m, p.Load) and condition(m), start=start)
        assert isinstance(message, p.Load)
        return message

    def send(self, name: str, message: p.Message) -> None:
        assert self.link.send(name.encode(), message)

    def stream(self, name: str, rid: str, timeout: float = WAIT_S) -> tuple[list[int], str, dict, list]:
        """(tokens, finish or "error:<code>", timing of the first tokens, all Tokens messages) of one request."""
        tokens: list[int] = []
        timing: dict = {}
        seen: list = []
        deadline = time.monotonic() + timeout
        index = 0
        while True:
            message = self.wait_for(
                name,
                lambda m: getattr(m, "rid", None) == rid and isinstance(m, (p.Tokens, p.Error)),
                timeout=deadline - time.monotonic(),
                start=index,
            )
            index = self.messages[name].index(message, index) + 1
            if isinstance(message, p.Error):
                return tokens, f"error:{message.code}", timing, seen
            assert isinstance(message, p.Tokens)
            seen.append(message)
            tokens.extend(message.token_ids)
            timing = timing or dict(message.timing or {})
            if message.finish is not None:
                return tokens, message.finish, timing, seen

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(10)
        self.link.close()


@pytest.fixture
def router(tmp_path: Path) -> Any:
    fake = FakeRouter(tmp_path)
    yield fake
    fake.close()


def generate(rid: str, prompt: list[int], max_tokens: int = 8, deadline_s: float = 60.0, **sampling: Any) -> p.Generate:
    return p.Generate(
        rid, tuple(prompt), p.Sampling(max_tokens=max_tokens, ignore_eos=True, **sampling), time.time() + deadline_s
    )


def reference(prompts: dict[str, list[int]], max_tokens: int = 8, **sampling: Any) -> dict[str, list[int]]:
    """The engine's own output for the same model, in this process."""
    from kvxfer.engine import CacheConfig, DecodeEngine, Request, SamplingParams
    from kvxfer.models import load_model

    engine = DecodeEngine(load_model(MODEL).build(), CacheConfig(num_blocks=64))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)
    outputs = engine.generate([Request(rid, tuple(prompt), params) for rid, prompt in prompts.items()])
    return {output.request_id: list(output.output_token_ids) for output in outputs}


PROMPTS = {"r0": list(range(10, 50)), "r1": [5, 6, 7], "r2": list(range(10, 40)) + [99] * 7}


def test_agg_register_load_and_streams_equal_the_engine(router: FakeRouter) -> None:
    router.spawn("agg", "a0")
    register = router.register("a0")
    assert (register.role, register.name, register.block_size, register.num_blocks) == ("agg", "a0", 16, 64)
    assert register.rank_info == () and register.kv_bytes_per_token == 3 * 2 * 2 * 16 * 4  # layers K/V heads dim f32
    initial = router.load("a0")
    assert initial.free_blocks == 64 and initial.active_blocks == 0
    for rid, prompt in PROMPTS.items():
        router.send("a0", generate(rid, prompt))
    expected = reference(PROMPTS)
    for rid in PROMPTS:
        tokens, finish, timing, _ = router.stream("a0", rid)
        assert (tokens, finish) == (expected[rid], "length")
        assert set(timing) >= {"queue_s", "prefill_s", "transfer_s", "kv_bytes", "first_step_s"}
        assert timing["prefill_s"] > 0 and timing["transfer_s"] == 0
    # sampled, seeded: the same as the engine with the same request id and seed
    router.send("a0", generate("s0", PROMPTS["r0"], temperature=0.8, top_p=0.9, seed=7))
    tokens, _, _, _ = router.stream("a0", "s0")
    assert tokens == reference({"s0": PROMPTS["r0"]}, temperature=0.8, top_p=0.9, seed=7)["s0"]
    # a stop token id ends the stream with finish "stop"
    stop = expected["r1"][2]
    router.send("a0", generate("st", PROMPTS["r1"], stop_token_ids=(stop,)))
    tokens, finish, _, _ = router.stream("a0", "st")
    assert (tokens, finish) == (expected["r1"][: expected["r1"].index(stop) + 1], "stop")
    mark = router.count("a0")
    assert router.load("a0", lambda m: m.running == 0, start=mark).free_blocks == 64  # every block back


def test_agg_coalesces_tokens_per_step(router: FakeRouter) -> None:
    router.spawn("agg", "a0")
    router.register("a0")
    rids = [f"c{i}" for i in range(6)]
    for rid in rids:
        router.send("a0", generate(rid, [1 + int(rid[1:]), 2, 3], max_tokens=12))
    for rid in rids:
        tokens, finish, _, _ = router.stream("a0", rid)
        assert len(tokens) == 12 and finish == "length"
    # several requests progressed per step: the worker sent TokensBatch frames, far fewer than one per token
    other = sum(1 for m in router.messages["a0"] if not isinstance(m, p.Tokens))  # register, load: one frame each
    token_frames = router.link.num_received - other
    assert token_frames <= 6 * 12 / 2


def test_abort_deadline_bad_requests_and_bad_frames(router: FakeRouter) -> None:
    router.spawn("agg", "a0")
    router.register("a0")
    free = router.load("a0").free_blocks
    router.link._queue([b"a0", b"\x00garbage"])
    router.link._queue([b"a0", p.Abort("x").encode()[:-3]])
    router.send("a0", generate("long", list(range(1, 40)), max_tokens=2000))
    first = router.wait_for("a0", lambda m: isinstance(m, p.Tokens) and m.rid == "long")
    assert isinstance(first, p.Tokens) and first.timing is not None
    router.send("a0", p.Abort("long"))
    tokens, finish, _, _ = router.stream("a0", "long")
    assert finish == "abort" and 0 < len(tokens) < 2000
    router.send("a0", generate("late", list(range(1, 40)), max_tokens=2000, deadline_s=1.0))
    assert router.stream("a0", "late")[1] == "error:deadline"
    router.send("a0", generate("big", list(range(1, 300)) * 5))  # longer than 64 blocks of 16
    assert router.stream("a0", "big")[1] == "error:bad_request"
    router.send("a0", p.Decode("d", (1, 2), p.Sampling(), b"x", 1, time.time() + 30))  # agg takes no decode
    assert router.stream("a0", "d")[1] == "error:bad_request"
    router.send("a0", generate("ok", PROMPTS["r1"]))
    assert router.stream("a0", "ok")[0] == reference({"ok": PROMPTS["r1"]})["ok"]
    mark = router.count("a0")
    assert router.load("a0", lambda m: m.running == 0 and m.waiting == 0, start=mark).free_blocks == free


def test_shutdown_drains_and_exits_zero(router: FakeRouter) -> None:
    process = router.spawn("agg", "a0")
    router.register("a0")
    router.send("a0", generate("g", PROMPTS["r0"], max_tokens=20))
    router.wait_for("a0", lambda m: isinstance(m, p.Tokens))
    router.send("a0", p.Shutdown(30.0))
    router.send("a0", generate("refused", PROMPTS["r1"]))
    tokens, finish, _, _ = router.stream("a0", "g")
    assert (len(tokens), finish) == (20, "length")  # the running request finished
    assert router.stream("a0", "refused")[1] == "error:draining"
    assert process.wait(30) == 0


def test_sigterm_drain_aborts_what_does_not_finish(router: FakeRouter) -> None:
    process = router.spawn("agg", "a0", "--drain-s", "0.5")
    router.register("a0")
    router.send("a0", generate("g", PROMPTS["r0"], max_tokens=100_000))
    router.wait_for("a0", lambda m: isinstance(m, p.Tokens))
    process.send_signal(signal.SIGTERM)
    assert router.stream("a0", "g")[1] == "abort"
    assert process.wait(30) == 0


@pytest.mark.slow
def test_exits_non_zero_without_a_router(router: FakeRouter) -> None:
    seen: list = []
    with RouterLink("tcp://127.0.0.1:0", lambda identity, message: seen.append(message)) as other:
        process = router.spawn("agg", "lonely", "--router-timeout", "1", router=other.address)
        deadline = time.monotonic() + WAIT_S
        while not any(isinstance(m, p.Register) for m in seen):
            assert time.monotonic() < deadline and process.poll() is None, router.log("lonely")
            time.sleep(0.05)
    assert process.wait(60) == 3  # the router went away: exit 3 after --router-timeout
    process = router.spawn("agg", "bad", "--tp", "0")
    assert process.wait(60) == 2 and "--tp" in router.log("bad")
    process = router.spawn("agg", "nowhere", router="")  # neither --router nor --discovery
    assert process.wait(60) == 2 and "--discovery" in router.log("nowhere")


def test_a_restarted_router_gets_a_new_register(router: FakeRouter) -> None:
    process = router.spawn("agg", "a0", "--router-timeout", "30")
    first = router.register("a0")
    router.restart()
    assert router.register("a0") == first  # the worker registered again on the new connection
    router.send("a0", generate("after", PROMPTS["r1"]))
    assert router.stream("a0", "after")[0] == reference({"after": PROMPTS["r1"]})["after"]
    assert process.poll() is None
