"""A null worker: speaks the worker side of the control protocol and answers at once, without a model.

It measures the router alone (``bench/router_bench.py``: the router's added TTFT) and drives router tests that need
no engine. Output tokens echo the prompt cyclically (valid ids of any tokenizer); ``--token-delay`` spaces them out and
``--prefill-delay`` makes prefills take time, one at a time (their queue shows in ``load``).
It keeps KV block counts like a real worker (blocks of ``--block-size`` tokens held per request, freed on finish or
abort) and reports them in ``load``.

    python -m kvxfer.serve.router_null_worker --router tcp://127.0.0.1:7100 --name decode-0 --role decode \
        --model tiny-random
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time

from .control import WorkerLink
from .protocol import Abort, AnyMessage, Decode, Generate, Load, Message, Prefill, Prefilled, Register, Shutdown, Tokens

LOAD_INTERVAL_S = 0.25


class NullWorker:
    """The worker end of the protocol with instant answers, or paced ones: prefills (``Prefill``, and the prefill
    part of ``Generate``) run one at a time taking ``prefill_delay_s`` each; tokens come ``token_delay_s`` apart."""

    def __init__(
        self,
        router: str,
        name: str,
        role: str,
        model: str,
        block_size: int = 16,
        num_blocks: int = 4096,
        token_delay_s: float = 0.0,
        max_batch: int = 64,
        prefill_delay_s: float = 0.0,
    ) -> None:
        self.name, self.role, self.model = name, role, model
        self.block_size, self.num_blocks, self.max_batch = block_size, num_blocks, max_batch
        self.token_delay_s, self.prefill_delay_s = token_delay_s, prefill_delay_s
        self.held: dict[str, int] = {}  # rid -> blocks
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.prefills: queue.Queue[Generate | Decode | Prefill] = queue.Queue(maxsize=100_000)
        self.queued_tokens = 0
        self.link: WorkerLink | None = None
        self.link = WorkerLink(router, name, self._on_message, self._register)
        threading.Thread(target=self._prefill_loop, name="null-prefill", daemon=True).start()

    def _send(self, message: Message) -> None:
        if self.link is not None:  # None only while the constructor runs (run() registers then)
            self.link.send(message)

    def _register(self) -> None:
        self._send(
            Register(
                self.name,
                self.role,
                self.model,
                self.block_size,
                self.num_blocks,
                64,
                (b"null-rank-info",),
                self.max_batch,
                "null",
            )
        )

    def _blocks(self, rid: str, num_tokens: int) -> None:
        with self.lock:
            self.held[rid] = -(-num_tokens // self.block_size)

    def _free(self, rid: str) -> bool:
        with self.lock:
            return self.held.pop(rid, None) is not None

    def _on_message(self, message: AnyMessage) -> None:
        if isinstance(message, (Generate, Decode, Prefill)):
            extra = 0 if isinstance(message, Prefill) else message.sampling.max_tokens
            self._blocks(message.rid, len(message.prompt_token_ids) + extra)
            if isinstance(message, Decode) or self.prefill_delay_s <= 0:
                self._prefilled(message)
            else:
                with self.lock:
                    self.queued_tokens += len(message.prompt_token_ids)
                self.prefills.put_nowait(message)
        elif isinstance(message, Abort):
            if self._free(message.rid) and self.role != "prefill":
                self._send(Tokens(message.rid, (), "abort"))
        elif isinstance(message, Shutdown):
            self.stop.set()

    def _prefill_loop(self) -> None:
        while not self.stop.is_set():
            try:
                message = self.prefills.get(timeout=0.1)
            except queue.Empty:
                continue
            if message.rid in self.held:
                time.sleep(self.prefill_delay_s)
            with self.lock:
                self.queued_tokens -= len(message.prompt_token_ids)
            self._prefilled(message)

    def _prefilled(self, message: Generate | Decode | Prefill) -> None:
        if isinstance(message, Prefill):
            timing = {"queue_s": 0.0, "prefill_s": self.prefill_delay_s}
            if self._free(message.rid):  # not aborted meanwhile; the lease ends at once (nothing to pull)
                self._send(Prefilled(message.rid, b"null-kv-ready", message.prompt_token_ids[-1], timing))
        elif self.token_delay_s > 0:
            threading.Thread(target=self._generate, args=(message,), daemon=True).start()
        else:
            self._generate(message)

    def _generate(self, message: Generate | Decode) -> None:
        prompt, rid = message.prompt_token_ids, message.rid
        timing = {
            "queue_s": 0.0,
            "prefill_s": 0.0,
            "first_step_s": 0.0,
            "transfer_s": 0.0,
            "kv_bytes": 64.0 * len(prompt) if isinstance(message, Decode) else 0.0,
        }
        count = message.sampling.max_tokens
        for index in range(count):
            if rid not in self.held:
                return  # aborted
            token = message.first_token if isinstance(message, Decode) and index == 0 else prompt[index % len(prompt)]
            finish = "length" if index == count - 1 else None
            self._send(Tokens(rid, (token,), finish, timing if index == 0 else None))
            if self.token_delay_s > 0 and finish is None:
                time.sleep(self.token_delay_s)
        self._free(rid)

    def run(self) -> int:
        """Send ``load`` every 0.25 s until ``shutdown``."""
        self._register()
        try:
            while not self.stop.wait(LOAD_INTERVAL_S):
                with self.lock:
                    used, running, queued = sum(self.held.values()), len(self.held), self.queued_tokens
                self._send(Load(self.num_blocks - used, used, running, self.prefills.qsize(), queued, 0.0, 0.0, {}))
        finally:
            if self.link is not None:
                self.link.close()
        return 0


def main(argv: list[str] | None = None) -> int:
    """Run one null worker (arguments: see ``--help``)."""
    parser = argparse.ArgumentParser(prog="router_null_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--router", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--role", choices=("prefill", "decode", "agg"), default="agg")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--prefill-delay", type=float, default=0.0, help="seconds per prefill (one at a time)")
    args = parser.parse_args(argv)
    worker = NullWorker(
        args.router,
        args.name,
        args.role,
        args.model,
        args.block_size,
        args.num_blocks,
        args.token_delay,
        args.max_batch,
        args.prefill_delay,
    )
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
