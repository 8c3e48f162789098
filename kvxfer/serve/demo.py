"""`kvxfer demo`: start `kvxfer serve` (1 prefill + 1 decode worker) on SmolLM2, ask it one question through the openai
client, print the answer, the TTFT breakdown and the KV bytes the decode worker pulled from the prefill worker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY = re.compile(r"ready on (http://[0-9.]+:\d+) model=(\S+)")
START_TIMEOUT_S = 900.0  # the first run fetches and converts SmolLM2 once


def start_serve(model: str, log: Path) -> subprocess.Popen[bytes]:
    """`kvxfer serve --model MODEL --prefill 1 --decode 1 --port 0` in a subprocess, its output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvxfer.cli",
                "serve",
                "--model",
                model,
                "--prefill",
                "1",
                "--decode",
                "1",
                "--port",
                "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_ready(
    server: subprocess.Popen[bytes], log: Path, timeout_s: float = START_TIMEOUT_S
) -> tuple[str, str] | None:
    """(base URL, served model id) once ``server`` printed its ready line; None if it exited or ``timeout_s`` passed."""
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up and server.poll() is None:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return match.group(1), match.group(2)
        time.sleep(0.2)
    return None


def main(model: str = "smollm2", question: str = "What is the capital of France?", max_tokens: int = 48) -> int:
    """Run the demo; exit status 0 when an answer came back with KV moved prefill -> decode."""
    import openai

    with tempfile.TemporaryDirectory(prefix="kvxfer-demo-") as directory:
        log = Path(directory) / "serve.log"
        print(
            f"kvxfer demo: starting `kvxfer serve --model {model} --prefill 1 --decode 1` "
            "(the first run converts the model once) ...",
            flush=True,
        )
        server = start_serve(model, log)
        try:
            ready = wait_ready(server, log)
            if ready is None:
                print(
                    f"kvxfer demo: the server did not start:\n{log.read_text(errors='replace')[-3000:]}",
                    file=sys.stderr,
                )
                return 1
            url, served = ready
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300.0)
            reply = client.chat.completions.create(
                model=served,
                messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"kvxfer": {"timing": True, "prefill": "remote"}},
            )
            answer = (reply.choices[0].message.content or "").strip()
            timing = (reply.model_extra or {}).get("kvxfer", {})
            print(f"  server:   {url} ({served}; router + prefill-0 + decode-0, CPU unless GPUs are present)")
            print(f"  question: {question}")
            print(f"  answer:   {answer}")
            print(
                f"  TTFT:     {timing.get('ttft_s', 0) * 1e3:.1f} ms = queue {timing.get('queue_s', 0) * 1e3:.1f}"
                f" + prefill {timing.get('prefill_s', 0) * 1e3:.1f} ({timing.get('prefill_worker')}) + KV transfer"
                f" {timing.get('transfer_s', 0) * 1e3:.1f} + first step {timing.get('first_step_s', 0) * 1e3:.1f}"
                f" ms (+ router {timing.get('router_s', 0) * 1e3:.2f} ms)"
            )
            print(
                f"  KV moved: {timing.get('kv_bytes', 0):,} bytes {timing.get('prefill_worker')} -> "
                f"{timing.get('decode_worker')}; {reply.usage.prompt_tokens if reply.usage else '?'} prompt "
                f"tokens, {reply.usage.completion_tokens if reply.usage else '?'} generated"
            )
            return 0 if answer and timing.get("kv_bytes", 0) > 0 else 1
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
