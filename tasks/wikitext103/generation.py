"""Sampling a continuation from a `TransformerLM`, incrementally or by recomputing the whole sequence.

Modes:
- ``incremental``: the prompt once (`model.extend(prompt)`), then one position per new token with the layers'
  states: Flow-Attention's recurrent running sums (constant time and memory per token) or softmax attention's
  key/value cache (time and memory growing with the length);
- ``recompute``: the whole sequence through `model.forward` for every new token (any attention; the cost of one
  token grows with the length);
- ``auto``: incremental when every layer supports it, else recompute.
Both modes draw the same tokens for the same seed (tests/test_lm_generation.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flowformer.models.transformer_lm import DecodingState, TransformerLM

MODES = ("auto", "incremental", "recompute")


def resolve_mode(model: TransformerLM, mode: str) -> str:
    """`mode` with `auto` decided for `model`; an incremental request for an attention without one is an error."""
    if mode not in MODES:
        raise ValueError(f"generation mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "incremental" if model.supports_incremental() else "recompute"
    if mode == "incremental" and not model.supports_incremental():
        raise ValueError("this model's attention has no incremental form (only flow and softmax do); use mode=recompute")
    return mode


def next_tokens(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None, banned: Sequence[int] = ()) -> Tensor:  # fmt: skip
    """Draw one id per row of `logits` (B, V): greedy when temperature is 0, else softmax(logits / temperature)
    restricted to the `top_k` most likely ids (all when None). `banned` ids are never drawn. Returns (B,) int64."""
    logits = logits.float().clone()
    if banned:
        logits[:, list(banned)] = float("-inf")
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: TransformerLM, prompt: Tensor, max_new_tokens: int, *, mode: str = "auto",
             temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
             banned: Sequence[int] = ()) -> Tensor:  # fmt: skip
    """The prompt (B, L) int64 followed by `max_new_tokens` drawn tokens: (B, L + max_new_tokens).

    The model should be in eval mode (no dropout). `generator` seeds the draws (on the logits' device).
    """
    mode = resolve_mode(model, mode)
    tokens = prompt
    state: DecodingState | None = None
    new = prompt
    for _ in range(max_new_tokens):
        if mode == "incremental":
            hidden, state = model.extend(new, state)
        else:
            hidden = model(tokens)
        new = next_tokens(model.logits(hidden[:, -1]), temperature, top_k, generator, banned)[:, None]
        tokens = torch.cat([tokens, new], dim=1)
    return tokens


__all__ = ["MODES", "generate", "next_tokens", "resolve_mode"]
