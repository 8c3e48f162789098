"""Reference engines on GPUs, disaggregated: prefill process -> KV over CUDA IPC -> decode process.

Prefill on GPU 0 and decode on GPU 1 (GPU 0 when there is one), ``small`` preset in bfloat16, TP 1 each side.
For a ``--tokens`` prompt (fresh random tokens every round, so no prefix cache hit): prefill time (the prefill
call, which ends with the first token on the host), KV transfer time (decode side: reservation + pull until the
pipe reports done), transfer as % of TTFT (TTFT = prefill + transfer; the message hop through this script is
not counted), KV GB/s against a one-buffer device copy of the same bytes (the ceiling); with a streamed push,
the transfer tail left after the prefill compute; decode tokens/s at batch 1 and 32 with ``--tokens`` contexts.
Per decode step at each batch size (bench/engine_step.py, in the decode process): host wall time beside the GPU
time the torch profiler records, eager and with CUDA graphs, and tokens/s (``step_profile`` in the JSON).
Medians over ``--rounds``. Times are host clocks around calls that synchronize (sampling copies the token to the
host; the pipe waits on CUDA events), with torch.cuda.synchronize() before every start.

    python3 bench/engine_gpu.py --json out.json
    python3 bench/engine_gpu.py --cpu-smoke      # tiny preset on CPU over UCX: checks the script, not a benchmark
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

BLOCK = 16


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _serve(connection: Any, role: str, device: str, options: dict[str, Any]) -> None:
    """One side in its own process: build the engine and connector, then answer commands."""
    os.environ.update(options["environ"])
    import torch

    import kvxfer
    from kvxfer.engine import (
        CacheConfig,
        DecodeConnector,
        DecodeEngine,
        KVReady,
        KVWanted,
        Model,
        ModelConfig,
        PrefillConnector,
        PrefillEngine,
    )
    from kvxfer.engine.messages import request_from_wire

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    torch.set_num_threads(options["threads"])
    config = ModelConfig.preset(options["preset"], dtype=options["dtype"])
    model = Model.random(config, seed=0, device=device)
    agent = kvxfer.Agent(f"{role}-bench", backends=[options["backend"]])
    if role == "prefill":
        engine: Any = PrefillEngine(model, CacheConfig(num_blocks=options["prefill_blocks"], block_size=BLOCK))
        connector: Any = PrefillConnector(engine, agent, lease_ttl=30.0)
    else:
        engine = DecodeEngine(
            model,
            CacheConfig(num_blocks=options["decode_blocks"], block_size=BLOCK),
            max_batch_size=64,
            cuda_graphs=options["cuda_graphs"],
        )
        connector = DecodeConnector(engine, agent, timeout=60.0)
    connection.send(connector.info().encode())
    group = None
    while True:
        command, *args = connection.recv()
        try:
            if command == "quit":
                connector.close()
                agent.close()
                connection.send(None)
                return
            if command == "connect":
                group = connector.connect(args[0])
                answer: Any = None
            elif command == "prefill":
                _sync(device)
                began = time.perf_counter()
                ready = connector.prefill(request_from_wire(args[0]), group)
                _sync(device)
                answer = (ready.encode(), time.perf_counter() - began)
            elif command == "drain":  # free the blocks the decode side released (their notes arrive quickly)
                answer = connector.drain(30.0)
            elif command == "push":
                result = connector.push(KVWanted.decode(args[0]), stream_layers=True)
                answer = (result.ok, result.error, result.prefill_s, result.tail_s)
            elif command == "pull":
                _sync(device)
                began = time.perf_counter()
                connector.receive(KVReady.decode(args[0]))
                [admission] = connector.wait()
                _sync(device)
                answer = (admission.admitted, admission.error, admission.transfer_s, time.perf_counter() - began)
            elif command == "reserve_push":
                answer = connector.reserve_push(request_from_wire(args[0]), group).encode()
            elif command == "wait_push":
                [admission] = connector.wait()
                answer = (admission.admitted, admission.error, admission.transfer_s)
            elif command == "decode":
                tokens, seconds = engine.num_decode_tokens, engine.decode_s
                engine.run(timeout_s=300)
                answer = (engine.num_decode_tokens - tokens, engine.decode_s - seconds, connector.pipe(group).strategy)
            elif command == "profile":
                from engine_step import profile_decode

                answer = profile_decode(engine, *args)
            elif command == "ceiling":
                answer = _copy_ceiling(device, args[0], args[1])
            else:
                raise ValueError(f"unknown command {command!r}")
            connection.send(answer)
        except Exception as error:  # noqa: BLE001 the worker loop must not die: report to the driver, which stops the run
            connection.send(RuntimeError(f"{role}: {error!r}"))


def _copy_ceiling(device: str, source_device: str, nbytes: int) -> float:
    """Seconds (best of 5) to copy ``nbytes`` as one buffer from ``source_device`` into this process's device."""
    import torch

    source = torch.empty(nbytes, dtype=torch.uint8, device=source_device)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        if source_device.startswith("cuda"):
            torch.cuda.synchronize(source_device)
        began = time.perf_counter()
        target.copy_(source)
        _sync(device)
        best = min(best, time.perf_counter() - began)
    return best


class Side:
    def __init__(self, role: str, device: str, options: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, role, device, options), daemon=True)
        self.process.start()
        self.info = self._answer(300)

    def __call__(self, *command: Any, timeout: float = 300) -> Any:
        self.connection.send(command)
        return self._answer(timeout)

    def _answer(self, timeout: float) -> Any:
        if not self.connection.poll(timeout):
            raise TimeoutError(f"no answer within {timeout} s")
        answer = self.connection.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        try:
            self("quit", timeout=30)
        except (OSError, EOFError, RuntimeError):  # no answer, pipe gone, or its close failed: killed below
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def _request(name: str, tokens: int, max_tokens: int, vocab: int, seed: int) -> list[Any]:
    import random

    from kvxfer.engine import Request, SamplingParams
    from kvxfer.engine.messages import request_to_wire

    rng = random.Random(seed)
    prompt = [rng.randrange(vocab) for _ in range(tokens)]
    return request_to_wire(Request(name, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    smoke = args.cpu_smoke
    gpus = 0 if smoke else _gpu_count()
    p_device, d_device = ("cpu", "cpu") if smoke else ("cuda:0", f"cuda:{min(gpus, 2) - 1}")
    from kvxfer.engine import ModelConfig
    from kvxfer.spec import DTYPE_SIZES

    config = ModelConfig.preset(args.preset)
    batches = sorted(set(args.batch))
    from engine_step import TOKENS_PER_MODE

    per_request = -(-(args.tokens + max(args.decode_tokens, TOKENS_PER_MODE)) // BLOCK)
    options = {
        "preset": args.preset,
        "dtype": args.dtype,
        "backend": "ucx" if smoke else "cuda_ipc",
        "prefill_blocks": 2 * per_request + 8,
        "decode_blocks": (max(batches) + 2) * per_request + 8,
        "threads": 2 if smoke else 8,
        "cuda_graphs": True,  # compared against eager in the step profile; on the CPU: the padded path, no capture
        "environ": {"UCX_MEM_MMAP_HOOK_MODE": "none"} if smoke else {},
    }
    started = time.perf_counter()
    prefill, decode = Side("prefill", p_device, options), Side("decode", d_device, options)
    try:
        prefill("connect", [decode.info])
        decode("connect", [prefill.info])
        serial = iter(range(10**6))

        def disaggregated(tokens: int, max_tokens: int) -> tuple[float, float, float]:
            index = next(serial)
            ready, prefill_s = prefill("prefill", _request(f"q{index}", tokens, max_tokens, config.vocab_size, index))
            admitted, error, transfer_s, wall_s = decode("pull", ready)
            if not admitted:
                raise RuntimeError(f"request q{index} was not admitted: {error}")
            prefill("drain")
            return prefill_s, transfer_s, wall_s

        for _ in range(2):  # warm-up: CUDA contexts, cuBLAS, the copy kernels, IPC mappings
            disaggregated(args.tokens, 2)
            decode("decode")
        rounds = []
        for _ in range(args.rounds):
            rounds.append(disaggregated(args.tokens, 1))
            decode("decode")
        pushes = []
        for _ in range(args.rounds):
            index = next(serial)
            wanted = decode("reserve_push", _request(f"s{index}", args.tokens, 1, config.vocab_size, index))
            ok, error, push_prefill_s, tail_s = prefill("push", wanted)
            admitted, _, push_transfer_s = decode("wait_push")
            if not (ok and admitted):
                raise RuntimeError(f"streamed push failed: {error}")
            prefill("drain")
            decode("decode")
            pushes.append((push_prefill_s, tail_s, push_transfer_s))
        decode_rates, strategy = {}, ""
        for batch in batches:
            for _ in range(batch):
                disaggregated(args.tokens, args.decode_tokens)
            count, seconds, strategy = decode("decode")
            decode_rates[str(batch)] = count / seconds
        step_profile = {}
        if args.step_profile:
            for batch in batches:
                step_profile[str(batch)] = decode("profile", batch, args.tokens, config.vocab_size)
        kv_bytes = args.tokens * config.num_layers * 2 * config.num_kv_heads * config.head_dim * DTYPE_SIZES[args.dtype]
        ceiling_s = decode("ceiling", p_device, kv_bytes)
    finally:
        prefill.close()
        decode.close()
    prefill_s = statistics.median(r[0] for r in rounds)
    transfer_s = statistics.median(r[1] for r in rounds)
    push_prefill_s = statistics.median(p[0] for p in pushes)
    tail_s = statistics.median(p[1] for p in pushes)
    return {
        "device": _device_name(smoke),
        "gpus": gpus,
        "prefill_device": p_device,
        "decode_device": d_device,
        "preset": args.preset,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "block_size": BLOCK,
        "strategy": strategy,
        "kv_bytes": kv_bytes,
        "rounds": args.rounds,
        "prefill_ms": 1e3 * prefill_s,
        "transfer_ms": 1e3 * transfer_s,
        "ttft_ms": 1e3 * (prefill_s + transfer_s),
        "transfer_pct_of_ttft": 100 * transfer_s / (prefill_s + transfer_s),
        "transfer_gbps": kv_bytes / transfer_s / 1e9,
        "ceiling_gbps": kv_bytes / ceiling_s / 1e9,
        "transfer_vs_ceiling": ceiling_s / transfer_s,
        "receive_wall_ms": 1e3 * statistics.median(r[2] for r in rounds),
        "push_prefill_ms": 1e3 * push_prefill_s,
        "push_tail_ms": 1e3 * tail_s,
        "push_tail_pct_of_ttft": 100 * tail_s / (push_prefill_s + tail_s),
        "decode_tokens_per_s": decode_rates,
        "decode_tokens": args.decode_tokens,
        "step_profile": step_profile,
        "raw": {"pull": rounds, "push": pushes},
        "seconds": time.perf_counter() - started,
    }


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device_name(smoke: bool) -> str:
    if smoke:
        return "cpu (smoke run)"
    import torch

    return torch.cuda.get_device_name(0)


def table(result: dict[str, Any]) -> str:
    rates = result["decode_tokens_per_s"]
    rows = [
        (
            "device",
            f"{result['device']} x{max(result['gpus'], 1)} ({result['prefill_device']} -> "
            f"{result['decode_device']}, {result['strategy']})",
        ),
        (
            "model",
            f"{result['preset']} {result['dtype']}, {result['tokens']}-token prompt, "
            f"{result['kv_bytes'] / 2**20:.1f} MiB KV",
        ),
        ("prefill", f"{result['prefill_ms']:.2f} ms"),
        (
            "KV transfer (pull)",
            f"{result['transfer_ms']:.3f} ms  {result['transfer_gbps']:.1f} GB/s  "
            f"({result['transfer_vs_ceiling']:.2f} x one-buffer copy "
            f"{result['ceiling_gbps']:.1f} GB/s)",
        ),
        (
            "transfer / TTFT",
            f"{result['transfer_pct_of_ttft']:.2f} %  (target <= 3 %; TTFT {result['ttft_ms']:.2f} ms)",
        ),
        ("streamed push tail", f"{result['push_tail_ms']:.3f} ms = {result['push_tail_pct_of_ttft']:.2f} % of TTFT"),
    ] + [
        (f"decode batch {b}", f"{rate:.0f} tokens/s ({rate / int(b):.1f} per sequence)")
        for b, rate in sorted(rates.items(), key=lambda item: int(item[0]))
    ]
    from engine_step import rows as step_rows

    rows += step_rows(result["step_profile"])
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="decode batch sizes")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded per sequence")
    parser.add_argument(
        "--no-step-profile",
        dest="step_profile",
        action="store_false",
        help="skip the per-step wall vs GPU time (eager and CUDA graphs) at each --batch",
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU over UCX (checks the script)")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.preset, args.dtype, args.tokens, args.batch, args.decode_tokens, args.rounds = (
            "tiny",
            "float32",
            256,
            [1, 4],
            8,
            3,
        )
    result = run(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    print(table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
