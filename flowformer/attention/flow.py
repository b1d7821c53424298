"""Flow-Attention (Wu et al., ICML 2022), non-causal and causal, with padding masks and the paper's ablations.

The maths follows the official core code (`Flow_Attention.py`, see shared/reference/official-settings.md §1.2-1.3);
the equations are restated in `reference.py`, which computes the same thing densely for the tests.

Two deliberate departures from the official code, both invisible on unpadded inputs:
- Padding. A padded token is neither a source nor a sink: its features are zeroed before any flow sum, and every
  count that the official code takes from the sequence length (L, S, the causal positions 1..L) is taken from the
  number of *real* tokens instead. Real positions therefore get exactly the output of the unpadded sequence.
- Causal memory. The official causal path materialises a (B, H, L, d, dv) prefix sum of k_j v_jᵀ. Here nothing
  larger than (B, H, L, max(d, chunk)) is built, so memory is linear in L.

How it is made fast (the numbers are in results/bench/efficiency.md):
- Every ε-shifted dot product <x + ε, a + ε> is folded into x·(a + ε) + ε·Σ(a + ε): a matrix-vector product
  plus a per-head constant, instead of two shifted copies and a broadcast multiply-sum.
- Non-causal: two of those products share one pass over q (the incoming flow and the conserved sink are both
  q·(something)), and everything else is a matrix-vector product or the two (d, dv) matmuls of linear attention.
- Causal: torch.cumsum along the sequence axis runs at ~1 ns per element on CPU, slower than a matmul. So no
  per-token prefix sum of a (L, d) tensor is ever taken. Every causal flow is a dot product with a prefix sum,
  q_i·Σ_{j<=i} k_j = Σ_{j<=i} q_i·k_j, which is computed from the chunk's (C, C) score matrix (already needed for
  the aggregation) plus one chunk-level state; chunk-level states are prefix-summed with small triangular
  matmuls (`_exclusive_chunk_prefix`). Only (B, H, L) scalars get a real cumsum.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = ("sigmoid", "relu")
COMPETITION_AXES = ("keys", "heads")
BACKENDS = ("eager", "compile", "triton", "auto")
# Tuned with `python -m experiments.bench --chunk-sweep` (results/bench/chunk_sweep.json): 64 is fastest or within
# noise of the fastest at every L from 1024 to 16384, forward and forward+backward, on the 2-core CPU machine.
DEFAULT_CHUNK_SIZE = 64
# Chunk-level states are prefix-summed in groups of this many chunks (see `_exclusive_chunk_prefix`).
_PREFIX_GROUP = 16
# A finite "minus infinity" for masked logits: -inf would turn fully padded rows into NaN (and NaN gradients
# through torch.where), while exp(-1e30 - x) underflows to an exact 0 in fp32.
_MASKED_LOGIT = -1e30


def feature_map(x: Tensor, kernel: str) -> Tensor:
    """The non-negative projection φ applied to queries and keys.

    `sigmoid` is the paper's kernel. `relu` is the official LRA (JAX) kernel, relu(x) + 1e-6.
    """
    if kernel == "sigmoid":
        return torch.sigmoid(x)
    if kernel == "relu":
        return F.relu(x) + 1e-6
    raise ValueError(f"unknown flow-attention kernel {kernel!r}; expected one of {KERNELS}")


def _real_token_weights(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """(B, N) bool padding mask (True = pad) -> (B, 1, N, 1) float weights, 1 on real tokens."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise TypeError(f"padding masks must be bool with True meaning padding, got dtype {mask.dtype}")
    return (~mask).to(like.dtype)[:, None, :, None]


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask, query_padding_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flow_attention expects q (B,H,L,d), k (B,H,S,d), v (B,H,S,dv); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must be (B, S) = {(k.shape[0], k.shape[2])}, got {tuple(key_padding_mask.shape)}")
    if query_padding_mask is not None and tuple(query_padding_mask.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"query_padding_mask must be (B, L) = {(q.shape[0], q.shape[2])}, got {tuple(query_padding_mask.shape)}"
        )


def _check_options(kernel: str, competition_over: str, backend: str, chunk_size: int | None) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown flow-attention kernel {kernel!r}; expected one of {KERNELS}")
    if competition_over not in COMPETITION_AXES:
        raise ValueError(f"competition_over must be one of {COMPETITION_AXES}, got {competition_over!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown flow-attention backend {backend!r}; available: {', '.join(BACKENDS)}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer or None (default {DEFAULT_CHUNK_SIZE}), got {chunk_size}")


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
    backend: str = "eager",
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
        kernel: "sigmoid" (paper) or "relu" (official LRA code).
        competition_over: "keys" (paper) or "heads" (the official LRA code's softmax over the heads axis).
        chunk_size: chunk length of the causal path (memory ~ L·max(d, chunk) per head); default
            `DEFAULT_CHUNK_SIZE`. Every chunk size gives the same result up to rounding.
        backend: how the maths is executed; every backend computes the same function.
            "eager": plain PyTorch ops (default; CPU or GPU).
            "compile": the same code under `torch.compile(dynamic=True)`; it compiles once per option set and
                input rank (seconds), then fuses the element-wise work. Falls back to eager, with a warning, when
                compilation fails (e.g. no C++ compiler).
            "triton": the causal aggregation Σ_{j<=i} (q_i·k_j) w_j runs in a fused Triton kernel
                (`triton_causal.py`, forward and backward); needs a CUDA tensor, or TRITON_INTERPRET=1 on CPU
                (slow, for tests). The per-token flows and the non-causal path stay eager.
            "auto": "triton" for causal CUDA inputs when Triton is importable, otherwise "eager".
    Returns:
        (B, H, L, dv), in the dtype of q. Outputs at padded query positions are exactly 0.
    """
    _check_inputs(q, k, v, key_padding_mask, query_padding_mask)
    _check_options(kernel, competition_over, backend, chunk_size)
    if causal:
        _check_causal(q, k, competition_over)
        # Causal attention is self-attention: one mask describes both sides.
        if key_padding_mask is None:
            key_padding_mask = query_padding_mask
        if query_padding_mask is None:
            query_padding_mask = key_padding_mask
    backend = resolve_backend(backend, q, causal)

    out_dtype = q.dtype
    q, k, v, q_real, k_real = _prepare(q, k, v, query_padding_mask, key_padding_mask, kernel)
    options = dict(competition=competition, allocation=allocation, clamp=clamp, eps=eps)
    if causal:
        chunk = int(chunk_size or DEFAULT_CHUNK_SIZE)
        if backend == "triton":
            from flowformer.attention.triton_causal import causal_linear_attention_triton

            out, _ = _causal_flow(q, k, v, q_real, k_real, chunk_size=chunk, aggregate=causal_linear_attention_triton, **options)
        else:
            core = _compiled("causal", _causal_flow) if backend == "compile" else _causal_flow
            out, _ = core(q, k, v, q_real, k_real, chunk_size=chunk, **options)
    else:
        core = _compiled("noncausal", _noncausal_flow) if backend == "compile" else _noncausal_flow
        out = core(q, k, v, q_real, k_real, competition_over=competition_over, **options)
    if q_real is not None:
        out = out * q_real
    return out.to(out_dtype)


def _check_causal(q: Tensor, k: Tensor, competition_over: str) -> None:
    if q.shape[-2] != k.shape[-2]:
        raise NotImplementedError(
            f"causal flow attention needs self-attention (L == S), got L={q.shape[-2]}, S={k.shape[-2]}; "
            "use causal=False for cross-attention"
        )
    if competition_over == "heads":
        raise NotImplementedError(
            "flow attention with competition over heads (flow_lra_official, the official LRA variant) has no causal "
            "form; use model/attention=flow (competition_over='keys') for causal models"
        )


def resolve_backend(backend: str, q: Tensor, causal: bool) -> str:
    """The backend that `flow_attention` will actually run for `backend` on inputs like `q`."""
    if backend == "auto":
        return "triton" if (causal and q.is_cuda and triton_available()) else "eager"
    if backend == "triton" and causal:
        from flowformer.attention.triton_causal import check_triton_usable

        check_triton_usable(q)
    return backend


def triton_available() -> bool:
    """True when the `triton` package can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _prepare(q, k, v, query_padding_mask, key_padding_mask, kernel):
    """Upcast to the compute dtype, apply the feature map and zero padded tokens.

    Returns q, k (feature-mapped), v and the (B, 1, N, 1) real-token weights (None without a mask).
    """
    # Flows are sums over the whole sequence: accumulate them in fp32 whatever the input precision.
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    q_real = _real_token_weights(query_padding_mask, q)
    k_real = _real_token_weights(key_padding_mask, k)
    q = feature_map(q, kernel)
    k = feature_map(k, kernel)
    if q_real is not None:
        q = q * q_real
    if k_real is not None:
        k = k * k_real
        v = v * k_real
    return q, k, v, q_real, k_real


_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    """`fn` under torch.compile (dynamic shapes, so one graph serves every length), or `fn` when that fails."""
    if name not in _COMPILED:
        compiled = torch.compile(fn, dynamic=True)

        def run(*args, **kwargs):
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # a missing compiler or an unsupported op must not stop training
                warnings.warn(
                    f"flow_attention(backend='compile') could not compile ({type(error).__name__}: {error}); "
                    "falling back to backend='eager' for the rest of this process",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _COMPILED[name] = fn
                return fn(*args, **kwargs)

        _COMPILED[name] = run
    return _COMPILED[name]


# ------------------------------------------------------------------------------------------------------------------
# Non-causal
# ------------------------------------------------------------------------------------------------------------------


def _noncausal_flow(q, k, v, q_real, k_real, *, competition, allocation, clamp, eps, competition_over):
    """q, k: (B, H, L|S, d) feature-mapped and masked; v: (B, H, S, dv). Returns (B, H, L, dv)."""
    n_sinks = q.new_tensor(q.shape[-2]) if q_real is None else q_real.sum(-2, keepdim=True)
    n_sources = k.new_tensor(k.shape[-2]) if k_real is None else k_real.sum(-2, keepdim=True)
    n_sinks, n_sources = n_sinks.clamp_min(1), n_sources.clamp_min(1)  # (B,1,1,1) or scalar

    # Every flow is a row vector (B, H, 1, N), computed as (1, d) @ (d, N): a matrix-vector product with the long
    # axis as the output, which BLAS runs at memory speed (a (N, d) @ (d, 1) product is ~10x slower on CPU).
    # <x + ε, a> = x·a + ε·Σa, with a = (Σ k) + ε etc.
    k_total = k.sum(-2, keepdim=True) + eps  # Σ_j k_j + ε, (B,H,1,d)
    q_total = q.sum(-2, keepdim=True) + eps  # Σ_i q_i + ε
    # (1) incoming flow I_i of each sink, outgoing flow O_j of each source
    incoming = k_total @ q.transpose(-2, -1) + eps * k_total.sum(-1, keepdim=True)  # (B,H,1,L)
    sink_scale = 1.0 / incoming
    # (2)+(3) conserved sink Î_i = <q_i+ε, Σ_j k_j/O_j + ε> and the allocation of sinks
    if allocation:
        outgoing = q_total @ k.transpose(-2, -1) + eps * q_total.sum(-1, keepdim=True)  # (B,H,1,S)
        k_weighted = (1.0 / outgoing) @ k + eps  # (B,H,1,d)
        conserved_sink = k_weighted @ q.transpose(-2, -1) + eps * k_weighted.sum(-1, keepdim=True)
        gate_over_incoming = torch.sigmoid(conserved_sink * (n_sinks / n_sources)) * sink_scale
    else:
        gate_over_incoming = sink_scale
    # (2)+(3) conserved source Ô_j = <k_j+ε, Σ_i q_i/I_i + ε> and the competition of sources
    if competition:
        q_weighted = sink_scale @ q + eps  # (B,H,1,d)
        conserved_source = q_weighted @ k.transpose(-2, -1) + eps * q_weighted.sum(-1, keepdim=True)  # (B,H,1,S)
        if clamp is not None:
            conserved_source = conserved_source.clamp(-clamp, clamp)
        if competition_over == "heads":
            weights = torch.softmax(conserved_source, dim=1)
        else:
            if k_real is not None:
                conserved_source = conserved_source.masked_fill(k_real.transpose(-2, -1) == 0, _MASKED_LOGIT)
            weights = torch.softmax(conserved_source, dim=-1)
        v = v * (weights * n_sources).transpose(-2, -1)
    # (4) aggregation in linear order: (q kᵀ) v computed as q (kᵀ v)
    kv = k.transpose(-2, -1) @ v  # (B,H,d,dv)
    return (q @ kv) * gate_over_incoming.transpose(-2, -1)


# ------------------------------------------------------------------------------------------------------------------
# Causal
# ------------------------------------------------------------------------------------------------------------------

# Keys of the running sums that carry a causal pass over to the next one (see recurrent.py, `FlowState`).
STATE_KEYS = ("sinks", "sources", "q_sum", "k_sum", "sq_sum", "ok_sum", "lse", "kv")


def _causal_flow(
    q,
    k,
    v,
    q_real,
    k_real,
    *,
    competition,
    allocation,
    clamp,
    eps,
    chunk_size,
    initial: dict[str, Tensor] | None = None,
    return_state: bool = False,
    aggregate: Callable | None = None,
):
    """Causal flow attention, chunked. q, k: (B, H, L, d) feature-mapped and masked; v: (B, H, L, dv).

    `initial` (keys `STATE_KEYS`, see `recurrent.FlowState`) continues a sequence whose prefix was already
    processed. `aggregate(q, k, w) -> Σ_{j<=i} (q_i·k_j) w_j` replaces the built-in chunked aggregation (the Triton
    backend). Returns (out (B, H, L, dv), final state dict or None).
    """
    batch, heads, length, dim = q.shape
    chunk = max(1, min(int(chunk_size), length))
    n_chunks = math.ceil(length / chunk)
    padded = n_chunks * chunk
    tail = padded - length
    if tail:
        # Zero tokens at the tail: they add nothing to any prefix; their rows are cropped at the end.
        pad = (0, 0, 0, tail)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)

    def chunked(x: Tensor) -> Tensor:  # (B, H, padded, X) -> (B, H, N, C, X)
        return x.view(batch, heads, n_chunks, chunk, x.shape[-1])

    def flat(x: Tensor) -> Tensor:  # (B, H, N, C) -> (B, H, padded)
        return x.reshape(batch, heads, padded)

    def rows(x: Tensor) -> Tensor:  # (B, H, padded) -> (B, H, N, 1, C) row vectors, one per chunk
        return x.view(batch, heads, n_chunks, 1, chunk)

    def dot_rows(prev: Tensor, x: Tensor) -> Tensor:  # prev (B,H,N,d) · x (B,H,N,C,d) -> (B,H,padded)
        # (1, d) @ (d, C): the row-vector form runs at memory speed, unlike (C, d) @ (d, 1)
        return flat(prev.unsqueeze(-2) @ x.transpose(-2, -1))

    # Real sinks / sources up to each position (the official code's `normal` = 1..L), shape (B|1, 1|H, padded).
    sinks_so_far = _running_count(q_real, length, tail, q)
    sources_so_far = _running_count(k_real, length, tail, q)
    if initial is not None:
        sinks_so_far = sinks_so_far + initial["sinks"][:, None, None]
        sources_so_far = sources_so_far + initial["sources"][:, None, None]
    sinks_so_far, sources_so_far = sinks_so_far.clamp_min(1), sources_so_far.clamp_min(1)

    def start(key: str) -> Tensor | None:  # the carried-over (B, H, d) sum, as a chunk-level offset
        return None if initial is None else initial[key]

    qc, kc = chunked(q), chunked(k)
    scores = qc @ kc.transpose(-2, -1)  # (B,H,N,C,C): scores[t, u] = q_t·k_u within a chunk
    # sink t sees the sources u <= t; source u counts the sinks t <= u
    below, above = scores.tril(), scores.triu()
    del scores
    q_rows, k_rows = q.sum(-1), k.sum(-1)  # Σ_d q_i, Σ_d k_j: (B,H,padded)
    shift = dim * eps * eps

    # (1) I_i = <q_i+ε, K_i+ε> = q_i·K_i + ε Σ_d q_i + ε Σ_d K_i + dε², with K_i = Σ_{j<=i} k_j, and
    # q_i·K_i = Σ_{j<=i in the chunk} q_i·k_j + q_i·(Σ of earlier chunks). O_j likewise over sinks i <= j.
    k_before = _chunk_offsets(kc.sum(-2), start("k_sum"))  # (B,H,N,d)
    q_before = _chunk_offsets(qc.sum(-2), start("q_sum"))
    incoming = flat(below.sum(-1)) + dot_rows(k_before, qc) + eps * (q_rows + _scalar_prefix(k_rows, start("k_sum"))) + shift
    outgoing = flat(above.sum(-2)) + dot_rows(q_before, kc) + eps * (k_rows + _scalar_prefix(q_rows, start("q_sum"))) + shift
    sink_scale = sources_so_far / incoming  # s_i
    source_scale = sinks_so_far / outgoing  # o_j
    if tail:
        # tail rows must add exactly nothing to the running sums below (0 * inf would be NaN when eps = 0)
        sink_scale, source_scale = _zero_tail(sink_scale, tail), _zero_tail(source_scale, tail)

    state: dict[str, Tensor] = {}
    # (2)+(3) conserved source Ô_j = <k_j+ε, Σ_{i<=j} s_i q_i + ε> / m_j, clamp, prefix softmax
    if competition:
        sq_chunks = (rows(sink_scale) @ qc).squeeze(-2)  # Σ_{i in chunk} s_i q_i, (B,H,N,d)
        sq_before = _chunk_offsets(sq_chunks, start("sq_sum"))
        conserved_source = (
            flat(rows(sink_scale) @ above)  # Σ_{i<=j in the chunk} s_i q_i·k_j
            + dot_rows(sq_before, kc)
            + eps * (k_rows + _scalar_prefix(sink_scale * q_rows, start("sq_sum")))
            + shift
        ) / sinks_so_far
        if clamp is not None:
            conserved_source = conserved_source.clamp(-clamp, clamp)
        logits = conserved_source
        if k_real is not None:
            logits = logits.masked_fill(F.pad(k_real.squeeze(-1), (0, tail), value=1.0) == 0, _MASKED_LOGIT)
        # logcumsumexp keeps the prefix softmax stable without a clamp and exactly causal
        lse = torch.logcumsumexp(logits, dim=-1)
        if initial is not None:
            lse = torch.logaddexp(lse, initial["lse"][..., None])
        weights = torch.exp(logits - lse) * sources_so_far
        v = v * weights[..., None]
        if return_state:
            state["sq_sum"] = sq_chunks.sum(2) + (0 if initial is None else initial["sq_sum"])
            state["lse"] = lse[..., length - 1]

    # (2)+(3) conserved sink Î_i = <q_i+ε, Σ_{j<=i} o_j k_j + ε> / n_i and the allocation of sinks
    if allocation:
        ok_chunks = (rows(source_scale) @ kc).squeeze(-2)  # Σ_{j in chunk} o_j k_j, (B,H,N,d)
        ok_before = _chunk_offsets(ok_chunks, start("ok_sum"))
        conserved_sink = (
            flat(rows(source_scale) @ below.transpose(-2, -1))  # Σ_{j<=i in the chunk} o_j q_i·k_j
            + dot_rows(ok_before, qc)
            + eps * (q_rows + _scalar_prefix(source_scale * k_rows, start("ok_sum")))
            + shift
        ) / sources_so_far
        gate_over_incoming = torch.sigmoid(conserved_sink) / incoming
        if return_state:
            state["ok_sum"] = ok_chunks.sum(2) + (0 if initial is None else initial["ok_sum"])
    else:
        gate_over_incoming = 1.0 / incoming

    # (4) aggregation Σ_{j<=i} (q_i·k_j) c_j v_j
    if aggregate is None:
        vc = chunked(v)
        states = kc.transpose(-2, -1) @ vc  # (B,H,N,d,dv): one kᵀ(cv) state per chunk
        kv_start = None if initial is None else initial["kv"].flatten(-2)
        before = _chunk_offsets(states.flatten(-2), kv_start).view_as(states)
        out = (below @ vc + qc @ before).view(batch, heads, padded, -1)
        if return_state:
            state["kv"] = states.sum(2) + (0 if initial is None else initial["kv"])
    else:
        if initial is not None:
            raise NotImplementedError("a custom aggregation cannot continue from an initial state; use the eager backend")
        out = aggregate(q, k, v)
        if return_state:
            state["kv"] = k.transpose(-2, -1) @ v
    out = out * gate_over_incoming[..., None]
    if tail:
        out = out[:, :, :length]

    if not return_state:
        return out, None
    state["sinks"] = _count_total(q_real, length, batch, q) + (0 if initial is None else initial["sinks"])
    state["sources"] = _count_total(k_real, length, batch, q) + (0 if initial is None else initial["sources"])
    state["q_sum"] = q.sum(-2) + (0 if initial is None else initial["q_sum"])
    state["k_sum"] = k.sum(-2) + (0 if initial is None else initial["k_sum"])
    state["sq_sum"] = state.get("sq_sum", _carry(initial, "sq_sum", q, (batch, heads, dim)))
    state["ok_sum"] = state.get("ok_sum", _carry(initial, "ok_sum", q, (batch, heads, dim)))
    state["lse"] = state.get("lse", _carry(initial, "lse", q, (batch, heads), fill=_MASKED_LOGIT))
    return out, state


def _running_count(real: Tensor | None, length: int, tail: int, like: Tensor) -> Tensor:
    """Number of real tokens up to each position: (1, 1, padded) without a mask, (B, 1, padded) with one.

    The tail is padded with ones: those rows are cropped, the value only has to be a harmless non-zero count.
    """
    if real is None:
        counts = torch.arange(1, length + 1, device=like.device, dtype=like.dtype)[None, None]
    else:
        counts = real.squeeze(-1).cumsum(-1)
    return F.pad(counts, (0, tail), value=1.0) if tail else counts


def _count_total(real: Tensor | None, length: int, batch: int, like: Tensor) -> Tensor:
    """(B,) number of real tokens."""
    if real is None:
        return torch.full((batch,), float(length), device=like.device, dtype=like.dtype)
    return real.sum((1, 2, 3))


def _carry(initial, key, like, shape, fill=0.0):
    """A running sum this pass did not need (its option is off): carried over unchanged, or its empty value."""
    if initial is not None:
        return initial[key]
    return torch.full(shape, fill, device=like.device, dtype=like.dtype)


def _zero_tail(x: Tensor, tail: int) -> Tensor:
    return torch.cat([x[..., :-tail], x.new_zeros(x.shape[:-1] + (tail,))], dim=-1)


def _scalar_prefix(x: Tensor, start: Tensor | None) -> Tensor:
    """Inclusive prefix sum of (B, H, L) scalars, plus Σ_d of the carried (B, H, d) sum."""
    out = x.cumsum(-1)
    return out if start is None else out + start.sum(-1, keepdim=True)


def _chunk_offsets(per_chunk: Tensor, start: Tensor | None) -> Tensor:
    """(B, H, N, M) per-chunk sums -> the sum over all *earlier* chunks (plus the carried `start` (B, H, M))."""
    out = _exclusive_chunk_prefix(per_chunk)
    return out if start is None else out + start[:, :, None]


def _strict_lower(n: int, like: Tensor) -> Tensor:
    return torch.ones(n, n, device=like.device, dtype=like.dtype).tril(-1)


def _exclusive_chunk_prefix(x: Tensor) -> Tensor:
    """y[..., n, :] = Σ_{m<n} x[..., m, :] for x (..., N, M).

    Computed with (G, G) strictly-lower-triangular matmuls on groups of G = `_PREFIX_GROUP` chunks and a recursive
    prefix over the group totals: O(N·M·G) flops. torch.cumsum over a non-last axis is far slower on CPU (it
    was ~30% of the causal forward before this), and a single (N, N) matmul would be quadratic in N. Entries
    for chunk n never read chunks > n except as exact zeros, so earlier outputs stay bit-identical when later
    tokens change.
    """
    n = x.shape[-2]
    if n <= _PREFIX_GROUP:
        return _strict_lower(n, x) @ x
    groups = math.ceil(n / _PREFIX_GROUP)
    if groups * _PREFIX_GROUP != n:
        x = F.pad(x, (0, 0, 0, groups * _PREFIX_GROUP - n))
    grouped = x.reshape(x.shape[:-2] + (groups, _PREFIX_GROUP, x.shape[-1]))
    within = _strict_lower(_PREFIX_GROUP, x) @ grouped
    before = _exclusive_chunk_prefix(grouped.sum(-2))
    out = (within + before.unsqueeze(-2)).reshape(x.shape)
    return out[..., :n, :]


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """out_i = Σ_{j<=i} (q_i · k_j) v_j, chunked so that memory is linear in L.

    Within a chunk: a masked (C, C) score matrix. Across chunks: each chunk's kᵀv state (d, dv) and an exclusive
    prefix sum of those states. Never builds the (L, d, dv) prefix tensor.

    Args: q, k: (B, H, L, d); v: (B, H, L, dv). Returns (B, H, L, dv).
    """
    batch, heads, length, dim = q.shape
    dim_v = v.shape[-1]
    chunk = max(1, min(int(chunk_size), length))
    n_chunks = math.ceil(length / chunk)
    padded = n_chunks * chunk
    if padded != length:
        # Zero keys/values at the tail contribute nothing; their query rows are cropped below.
        pad = (0, 0, 0, padded - length)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    qc = q.reshape(batch, heads, n_chunks, chunk, dim)
    kc = k.reshape(batch, heads, n_chunks, chunk, dim)
    vc = v.reshape(batch, heads, n_chunks, chunk, dim_v)

    intra = (qc @ kc.transpose(-2, -1)).tril() @ vc
    states = kc.transpose(-2, -1) @ vc  # (B,H,N,d,dv): one state per chunk
    # exclusive prefix: chunk n sees the states of chunks < n
    before = _exclusive_chunk_prefix(states.flatten(-2)).view_as(states)
    inter = qc @ before
    return (intra + inter).reshape(batch, heads, padded, dim_v)[:, :, :length]
