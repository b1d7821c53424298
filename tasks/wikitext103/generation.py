"""Sampling a continuation from a `TransformerLM`, incrementally or by recomputing the whole sequence.

Modes:
- ``incremental``: the prompt once (`model.extend(prompt)`), then one position per new token with the layers'
  states: Flow-Attention's recurrent running sums (constant time and memory per token) or softmax attention's
  key/value cache (time and memory growing with the length);
- ``recompute``: the whole sequence through `model.forward` for every new token (any attention; the cost of one
  token grows with the length);
- ``auto``: incremental when every layer supports it, else recompute.
Both modes draw the same tokens for the same seed (tests/test_lm_generation.py).

Context (`max_context`, the positions the model was trained on: `data.tokens_per_sample`, 512 in the paper). Once
the sequence is longer, the next token is drawn from its last `max_context` tokens, at positions 0 .. max_context-1,
as nanoGPT crops its context to `block_size` (fairseq instead stops at the trained positions). Every mode does the
same, so the model never sees a position it was not trained at, and the modes keep drawing the same tokens: past
the limit, incremental decoding too runs the window through the model for every token, because a state cannot
forget its oldest token (Flow-Attention's running sums hold every token; a KV cache's keys carry their positions and,
above the first layer, what the dropped tokens contributed). A token past the limit thus costs a forward pass over
the window in every mode, and flow's constant cost per token holds up to the limit. `max_context=None`
never crops: the incremental states grow without bound (flow's sums keep every token; its normaliser counts past
the trained length) and the sinusoidal positions run past the trained ones, which the model never saw.

Sampling options: `temperature` > 0 divides the logits; exactly 0 means greedy (the most likely token); `top_k`
keeps the k most likely tokens (exactly k, also when the k-th logit is tied) or all when None. Anything else is an error.
"""

from __future__ import annotations

import math
import operator
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


def _integer(value: object) -> int | None:
    """`value` as an int when it is one (Python or NumPy, not bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_options(*, temperature: float = 1.0, top_k: int | None = None, max_new_tokens: int = 0,
                  max_context: int | None = None) -> None:  # fmt: skip
    """Raise ValueError naming the option when a sampling or length option is out of its range."""
    try:
        valid_temperature = math.isfinite(float(temperature)) and float(temperature) >= 0
    except (TypeError, ValueError):
        valid_temperature = False
    if not valid_temperature:
        raise ValueError(f"temperature must be > 0, or exactly 0 for greedy decoding (the most likely token); "
                         f"got {temperature!r}")
    if top_k is not None and (_integer(top_k) is None or top_k < 1):
        raise ValueError(f"top_k must be null (off: sample from every token) or an integer >= 1; got {top_k!r}")
    if _integer(max_new_tokens) is None or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    if max_context is not None and (_integer(max_context) is None or max_context < 1):
        raise ValueError(f"max_context must be an integer >= 1, or null; got {max_context!r}")


def next_tokens(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None, banned: Sequence[int] = ()) -> Tensor:  # fmt: skip
    """Draw one id per row of `logits` (B, V): greedy when temperature is 0, else softmax(logits / temperature)
    restricted to the `top_k` most likely ids (all when None). `banned` ids are never drawn. Returns (B,) int64."""
    check_options(temperature=temperature, top_k=top_k)
    logits = logits.float().clone()
    if banned:
        logits[:, list(banned)] = float("-inf")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, top_k, dim=-1)  # exactly k ids, also when the k-th value is tied
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: TransformerLM, prompt: Tensor, max_new_tokens: int, *, mode: str = "auto",
             temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
             banned: Sequence[int] = (), max_context: int | None = None) -> Tensor:  # fmt: skip
    """The prompt (B, L) int64 followed by `max_new_tokens` drawn tokens: (B, L + max_new_tokens).

    `max_context`: the most tokens the model sees, at positions from 0 (see the module docstring; pass the trained
    `tokens_per_sample`); None never crops. The model should be in eval mode (no dropout). `generator` seeds the
    draws (on the logits' device).
    """
    check_options(temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens, max_context=max_context)
    mode = resolve_mode(model, mode)
    limit = math.inf if max_context is None else max_context
    tokens = prompt
    state: DecodingState | None = None
    new = prompt
    for _ in range(max_new_tokens):
        if tokens.shape[1] > limit:  # the window slid: a state cannot forget its oldest token, so read it afresh
            hidden = model(tokens[:, -max_context:])
        elif mode == "incremental":
            hidden, state = model.extend(new, state)
        else:
            hidden = model(tokens)
        new = next_tokens(model.logits(hidden[:, -1]), temperature, top_k, generator, banned)[:, None]
        tokens = torch.cat([tokens, new], dim=1)
    return tokens


__all__ = ["MODES", "check_options", "generate", "next_tokens", "resolve_mode"]
