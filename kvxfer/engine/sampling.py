"""Token sampling: greedy, or temperature / top-p with a generator seeded by (request seed, token index).

Seeding by token index makes sampling reproducible wherever a token is drawn: on the prefill or the decode engine,
on any TP rank, after a preemption.
"""

from __future__ import annotations

import hashlib

import torch

from .request import SamplingParams


def request_seed(request_id: str, sampling: SamplingParams) -> int:
    """The request's seed: ``sampling.seed``, or one derived from the request id."""
    if sampling.seed is not None:
        return sampling.seed
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little") >> 1


def suppress_stops(
    logits: torch.Tensor, params: list[SamplingParams], steps: list[int], eos_token_ids: tuple[int, ...]
) -> torch.Tensor:
    """Rows still under their ``min_tokens`` (``steps[i]`` = output tokens so far) cannot draw EOS or a stop token."""
    rows = [row for row, (param, step) in enumerate(zip(params, steps, strict=True)) if step < param.min_tokens]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for row in rows:
        banned = [t for t in (*params[row].stop_token_ids, *eos_token_ids) if 0 <= t < vocab]
        if banned:
            logits[row, banned] = float("-inf")
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> list[int]:
    """One token per row. logits: float[b, vocab] on any device; ``steps[i]`` is the index of the token drawn.

    Greedy rows take the argmax (ties: the lowest id). Other rows sample on the CPU in float32 from
    softmax(logits / temperature), restricted to the smallest set of top tokens whose probability reaches top_p.
    """
    tokens = logits.argmax(dim=-1).tolist()
    for row, (param, seed, step) in enumerate(zip(params, seeds, steps, strict=True)):
        if param.temperature == 0:
            continue
        probs = (logits[row].float().cpu() / param.temperature).softmax(dim=-1)
        if param.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep a token while the mass before it is below top_p, so the top token always stays.
            drop = sorted_probs.cumsum(0) - sorted_probs >= param.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
        tokens[row] = int(torch.multinomial(probs, 1, generator=generator))
    return tokens
