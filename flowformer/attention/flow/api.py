"""Flow-Attention's entry point: input checks, padding, mixed precision, and the choice of path.

The maths follows the official core code (restated in results/paper/official_code.md §1.2-1.3 and, as a dense
formulation, in `flowformer/attention/reference.py`). Two deliberate departures, both invisible on unpadded inputs:
- Padding. A padded token is neither a source nor a sink: its features are zeroed before any flow sum, and every
  count that the official code takes from the sequence length (L, S, the causal positions 1..L) is taken from the
  number of *real* tokens instead. Real positions therefore get exactly the output of the unpadded sequence.
- Causal memory. The official causal path materialises a (B, H, L, d, dv) prefix sum; the chunked one here builds
  nothing larger than (B, H, L, max(d, chunk)).

Paths: non-causal attention runs "blocked" (`noncausal.py`, the CPU form) or "batched" (`batched.py`, the GPU
form); causal attention runs chunked (`causal.py`), with a hand-written backward (`causal_backward.py`) and, for
CPU inference, in cache-sized segments. Under `torch.compile` the hand-written passes run as custom ops (`ops.py`):
one node of the compiled graph each, with the same code inside.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowformer.attention.flow import causal as chunked
from flowformer.attention.flow import ops
from flowformer.attention.flow.batched import batched_flow
from flowformer.attention.flow.chunks import EXP_PREFIX_MAX_CLAMP, needs_grad
from flowformer.attention.flow.features import prepare, real_token_weights
from flowformer.attention.flow.options import FlowOptions
from flowformer.attention.precision import autocast_inputs


def flow_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
    competition: bool = True,
    allocation: bool = True,
    clamp: float | None = 1.0,
    eps: float = 1e-6,
    kernel: str = "sigmoid",
    competition_over: str = "keys",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Flow-Attention on already projected heads.

    Args:
        q: (B, H, L, d) queries (sinks). k: (B, H, S, d) keys (sources). v: (B, H, S, dv) values.
        causal: sink i sees sources j <= i (requires L == S).
        key_padding_mask: (B, S) bool, True = padding. query_padding_mask: (B, L) bool, True = padding.
            In causal self-attention a single given mask is used for both sides.
        competition / allocation: False gives the paper's "w/o Competition" / "w/o Allocation" ablations.
        clamp: the conserved outgoing flow is clamped to [-clamp, clamp]; None disables it
            (core code 1, RL 10, NLP 5, time series and LRA none).
        eps: the ε added to the flows, as in the official code.
        kernel: "sigmoid" (paper) or "relu" (official LRA code).
        competition_over: "keys" (paper) or "heads" (the official LRA code's softmax over the heads axis).
        chunk_size: chunk length of the causal path (memory ~ L·max(d, chunk) per head); default
            `DEFAULT_CHUNK_SIZE`. Every chunk size gives the same result up to rounding.
        backend: how the non-causal maths is executed; every backend computes the same function.
            "blocked": cache-sized blocks of rows with a hand-written backward, flows in fp32 (the CPU form).
            "batched": a few large GEMMs over the whole sequence under autograd, in the input dtype with the flows
                and sums in fp32 (the GPU form).
            "auto" (default): "batched" on a GPU and under torch.compile; otherwise on a CPU "blocked", except for
                fp32 inference (no autograd) at 1024-8192 keys, where "batched" measured faster.
            The causal path has one chunked form (flows in fp32) whatever the backend.
    Returns:
        (B, H, L, dv), in the dtype of q (under autocast, in the autocast dtype: like a matmul, the op casts its
        inputs to it). Outputs at padded query positions are exactly 0.
    """
    options = FlowOptions(
        competition=competition, allocation=allocation, clamp=clamp, eps=eps, kernel=kernel,
        competition_over=competition_over, chunk_size=chunk_size, backend=backend,
    )
    return apply_flow_attention(
        q, k, v, options, causal=causal, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask
    )


def apply_flow_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    options: FlowOptions,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
) -> Tensor:
    """`flow_attention` with its options as one `FlowOptions` object (what the `FlowAttention` module calls)."""
    _check_inputs(q, k, v, key_padding_mask, query_padding_mask)
    if causal:
        _check_causal(q, k, options)
        # Causal attention is self-attention: one mask describes both sides.
        if key_padding_mask is None:
            key_padding_mask = query_padding_mask
        if query_padding_mask is None:
            query_padding_mask = key_padding_mask
    masks = (query_padding_mask, key_padding_mask)
    q, k, v = autocast_inputs(q, k, v)
    with torch.autocast(q.device.type, enabled=False):
        if causal:
            out = _causal(q, k, v, masks, options)
        elif resolve_backend(options.backend, q, k, v) == "batched":
            x = prepare((q, k, v), masks, options.kernel, dtype=q.dtype)
            out = batched_flow(x, options)
        else:
            x = prepare((q, k, v), masks, options.kernel, dtype=compute_dtype(q), mapped=False)
            out = ops.blocked_flow(x.q, x.k, x.v, x.q_real, x.k_real, options)
        if query_padding_mask is not None:
            out = out * real_token_weights(query_padding_mask, out)
    return out.to(q.dtype)


def _causal(q: Tensor, k: Tensor, v: Tensor, masks: tuple, options: FlowOptions) -> Tensor:
    """The causal path: in cache-sized segments for CPU inference, else in one piece, with the hand-written
    backward wherever it applies."""
    segment = chunked.inference_segment(q, k, v, options.chunk)
    if segment is not None:
        x = prepare((q, k, v), masks, options.kernel, dtype=compute_dtype(q), mapped=False)
        return chunked.causal_flow_in_segments(x, options, segment).out
    x = prepare((q, k, v), masks, options.kernel, dtype=compute_dtype(q))
    clamp = options.clamp
    exp_softmax = not options.competition or (clamp is not None and clamp <= EXP_PREFIX_MAX_CLAMP)
    if needs_grad(x.q, x.k, x.v) and exp_softmax:
        return ops.causal_flow(x.q, x.k, x.v, x.q_real, x.k_real, options)
    # inference keeps nothing for a backward; the logcumsumexp form of the prefix softmax is left to autograd
    return chunked.causal_pass(x, options).out


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the blocked and causal paths: the flows are sums over the whole sequence, so they are
    accumulated in fp32 whatever the input precision."""
    return torch.promote_types(x.dtype, torch.float32)


# On a CPU at its default thread count, the forward without autograd runs fastest "batched" for key counts in this
# range (results/bench/efficiency.md): shorter, the two forms tie; longer, the blocked passes keep their blocks in
# cache and win, as they do forward+backward at every length.
AUTO_BATCHED_INFERENCE_KEYS_CPU = (1024, 8192)


def resolve_backend(backend: str, q: Tensor, k: Tensor, v: Tensor) -> str:
    """The non-causal form that `backend` runs for q, k, v (B, H, L|S, d).

    "auto" picks by device, length and whether autograd records the call. On a GPU the official formulation's shape,
    a few large kernels over the whole sequence, ran the forward faster than the blocked passes at every length
    measured, in fp32 and bf16 (results/bench/efficiency_cuda_*.md), and "batched" has that shape. Under
    `torch.compile`, "batched" everywhere: the compiler fuses its elementwise work, which the blocked passes cannot
    offer it (they are one opaque op), and on a CPU it trained faster than the blocked op at every length measured
    (`make bench ARGS=--variants=flow_blocked,flow_compiled`). Otherwise on a CPU, "blocked" for training, and "batched" for fp32 (or fp64)
    inference at `AUTO_BATCHED_INFERENCE_KEYS_CPU` keys.
    """
    if backend != "auto":
        return backend
    if k.is_cuda or torch.compiler.is_compiling():
        return "batched"
    shortest, longest = AUTO_BATCHED_INFERENCE_KEYS_CPU
    # half-precision inputs stay blocked on a CPU, which computes their flows in fp32 (and has slow half GEMMs)
    wide = compute_dtype(q) == q.dtype
    return "batched" if wide and not needs_grad(q, k, v) and shortest <= k.shape[-2] <= longest else "blocked"


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask, query_padding_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flow_attention expects q (B,H,L,d), k (B,H,S,d), v (B,H,S,dv); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, mask, shape in (
        ("key_padding_mask", key_padding_mask, (k.shape[0], k.shape[2])),
        ("query_padding_mask", query_padding_mask, (q.shape[0], q.shape[2])),
    ):
        if mask is None:
            continue
        if mask.dtype != torch.bool:
            raise TypeError(f"padding masks must be bool with True meaning padding, got dtype {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"{name} must be (B, {'S' if name[0] == 'k' else 'L'}) = {shape}, got {tuple(mask.shape)}")


def _check_causal(q: Tensor, k: Tensor, options: FlowOptions) -> None:
    if q.shape[-2] != k.shape[-2]:
        raise NotImplementedError(
            f"causal flow attention needs self-attention (L == S), got L={q.shape[-2]}, S={k.shape[-2]}; "
            "use causal=False for cross-attention"
        )
    options.check_causal()
