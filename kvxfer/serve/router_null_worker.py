"""A null worker: speaks the worker side of the control protocol and answers at once, without a model.

It measures the router alone (``bench/router_bench.py``: the router's added TTFT) and drives router tests that need
no engine. Output tokens echo the prompt cyclically (valid ids of any tokenizer); ``--token-delay`` spaces them out.
It keeps KV block counts like a real worker (blocks of ``--block-size`` tokens held per request, freed on finish or
abort) and reports them in ``load``.

    python -m kvxfer.serve.router_null_worker --router tcp://127.0.0.1:7100 --name decode-0 --role decode \
        --model tiny-random
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from .control import WorkerLink
from .protocol import (Abort, AnyMessage, Decode, Generate, Load, Message, Prefill, Prefilled, Register, Shutdown,
                       Tokens)

LOAD_INTERVAL_S = 0.25


class NullWorker:
    """The worker end of the protocol with instant (or ``token_delay_s``-paced) answers."""

    def __init__(self, router: str, name: str, role: str, model: str, block_size: int = 16, num_blocks: int = 4096,
                 token_delay_s: float = 0.0, max_batch: int = 64) -> None:
        self.name, self.role, self.model = name, role, model
        self.block_size, self.num_blocks, self.max_batch = block_size, num_blocks, max_batch
        self.token_delay_s = token_delay_s
        self.held: dict[str, int] = {}  # rid -> blocks
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.link: WorkerLink | None = None
        self.link = WorkerLink(router, name, self._on_message, self._register)

    def _send(self, message: Message) -> None:
        if self.link is not None:  # None only while the constructor runs (run() registers then)
            self.link.send(message)

    def _register(self) -> None:
        self._send(Register(self.name, self.role, self.model, self.block_size, self.num_blocks, 64,
                                (b"null-rank-info",), self.max_batch, "null"))

    def _blocks(self, rid: str, num_tokens: int) -> None:
        with self.lock:
            self.held[rid] = -(-num_tokens // self.block_size)

    def _free(self, rid: str) -> bool:
        with self.lock:
            return self.held.pop(rid, None) is not None

    def _on_message(self, message: AnyMessage) -> None:
        if isinstance(message, Generate | Decode):
            self._blocks(message.rid, len(message.prompt_token_ids) + message.sampling.max_tokens)
            if self.token_delay_s > 0:
                threading.Thread(target=self._generate, args=(message,), daemon=True).start()
            else:
                self._generate(message)
        elif isinstance(message, Prefill):
            self._blocks(message.rid, len(message.prompt_token_ids))
            if self.token_delay_s > 0:
                time.sleep(self.token_delay_s)  # the link thread: prefills run one at a time, like a real queue
            timing = {"queue_s": 0.0, "prefill_s": self.token_delay_s}
            self._send(Prefilled(message.rid, b"null-kv-ready", message.prompt_token_ids[-1], timing))
        elif isinstance(message, Abort):
            if self._free(message.rid) and self.role != "prefill":
                self._send(Tokens(message.rid, (), "abort"))
        elif isinstance(message, Shutdown):
            self.stop.set()

    def _generate(self, message: Generate | Decode) -> None:
        prompt, rid = message.prompt_token_ids, message.rid
        timing = {"queue_s": 0.0, "prefill_s": 0.0, "first_step_s": 0.0, "transfer_s": 0.0,
                  "kv_bytes": 64.0 * len(prompt) if isinstance(message, Decode) else 0.0}
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
                    used = sum(self.held.values())
                    running = len(self.held)
                self._send(Load(self.num_blocks - used, used, running, 0, 0, 0.0, 0.0, {}))
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
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens (and per prefill)")
    args = parser.parse_args(argv)
    worker = NullWorker(args.router, args.name, args.role, args.model, args.block_size, args.num_blocks,
                        args.token_delay, args.max_batch)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
