"""Chat with `kvxfer serve` through the official openai client, streaming; prints the TTFT breakdown after each answer.

    kvxfer serve --model smollm2 --prefill 1 --decode 1 --port 8000 &
    python examples/chat.py --url http://127.0.0.1:8000/v1 "What is the capital of France?"

Without a question on the command line it reads questions from stdin (an empty line or EOF ends). The breakdown
(queue, prefill, KV transfer, first decode step, KV bytes moved) comes from the router in the final chunk when the
request asks for it with ``"kvxfer": {"timing": true}``.
"""

from __future__ import annotations

import argparse
import sys

import openai


def ask(client: openai.OpenAI, model: str, history: list[dict[str, str]], max_tokens: int) -> str:
    """Stream one answer to stdout; returns its text."""
    stream = client.chat.completions.create(
        model=model,
        messages=history,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"kvxfer": {"timing": True}},
    )
    text, timing = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
        timing = (chunk.model_extra or {}).get("kvxfer", timing)
    print()
    if timing:
        print(
            f"  [TTFT {timing['ttft_s'] * 1e3:.1f} ms = queue {timing['queue_s'] * 1e3:.1f} + prefill "
            f"{timing['prefill_s'] * 1e3:.1f} ({timing['prefill_worker']}) + KV transfer "
            f"{timing['transfer_s'] * 1e3:.1f} ms ({timing['kv_bytes'] / 1024:.1f} KiB) + first step "
            f"{timing['first_step_s'] * 1e3:.1f} ms; decode on {timing['decode_worker']}]"
        )
    return "".join(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="*", help="one question (else: read questions from stdin)")
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key="unused")
    model = client.models.list().data[0].id
    history: list[dict[str, str]] = []
    questions = [" ".join(args.question)] if args.question else iter(lambda: sys.stdin.readline().strip(), "")
    for question in questions:
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": ask(client, model, history, args.max_tokens)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
