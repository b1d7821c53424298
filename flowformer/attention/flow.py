"""Flow-Attention (Wu et al., ICML 2022), non-causal and causal, with padding masks and the paper's ablations.

The maths follows the official core code (`Flow_Attention.py`, see shared/reference/official-settings.md §1.2-1.3);
the equations are restated in `reference.py`, which computes the same thing densely for the tests.

Two deliberate departures from the official code, both invisible on unpadded inputs:
- Padding. A padded token is neither a source nor a sink: its features are zeroed before any flow sum, and every
  count that the official code takes from the sequence length (L, S, the causal positions 1..L) is taken from the
  number of *real* tokens instead. Real positions therefore get exactly the output of the unpadded sequence.
- Causal memory. The official causal path materialises a (B, H, L, d, dv) prefix sum of k_j v_jᵀ. Here only the
  final aggregation needs that state, and it is computed chunk by chunk (`causal_linear_attention`), so memory is
  linear in L. Every per-token flow quantity needs only prefix sums of (B, H, L, d) tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = ("sigmoid", "relu")
COMPETITION_AXES = ("keys", "heads")
DEFAULT_CHUNK_SIZE = 64
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
        chunk_size: chunk length of the causal aggregation (memory ~ L·chunk + L·d·dv/chunk per head).
        backend: "eager" (pure PyTorch).
    Returns:
        (B, H, L, dv), in the dtype of q. Outputs at padded query positions are exactly 0.
    """
    _check_inputs(q, k, v, key_padding_mask, query_padding_mask)
    if kernel not in KERNELS:
        raise ValueError(f"unknown flow-attention kernel {kernel!r}; expected one of {KERNELS}")
    if competition_over not in COMPETITION_AXES:
        raise ValueError(f"competition_over must be one of {COMPETITION_AXES}, got {competition_over!r}")
    if backend != "eager":
        raise ValueError(f"unknown flow-attention backend {backend!r}; available: 'eager'")
    if causal:
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
        # Causal attention is self-attention: one mask describes both sides.
        if key_padding_mask is None:
            key_padding_mask = query_padding_mask
        if query_padding_mask is None:
            query_padding_mask = key_padding_mask

    out_dtype = q.dtype
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

    options = dict(competition=competition, allocation=allocation, clamp=clamp, eps=eps)
    if causal:
        out = _causal_flow(q, k, v, q_real, k_real, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE, **options)
    else:
        out = _noncausal_flow(q, k, v, q_real, k_real, competition_over=competition_over, **options)
    if q_real is not None:
        out = out * q_real
    return out.to(out_dtype)


def _dot_with(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot product over the last axis: (..., N, d) · (..., N or 1, d) -> (..., N)."""
    return (x * y).sum(-1)


def _noncausal_flow(q, k, v, q_real, k_real, *, competition, allocation, clamp, eps, competition_over):
    n_sinks = q.new_tensor(q.shape[-2]) if q_real is None else q_real.sum(-2, keepdim=True).squeeze(-1)
    n_sources = k.new_tensor(k.shape[-2]) if k_real is None else k_real.sum(-2, keepdim=True).squeeze(-1)
    n_sinks, n_sources = n_sinks.clamp_min(1), n_sources.clamp_min(1)  # (B,1,1) or scalar

    # (1) incoming flow of each sink and outgoing flow of each source
    incoming = _dot_with(q + eps, k.sum(-2, keepdim=True) + eps)  # I_i, (B,H,L)
    outgoing = _dot_with(k + eps, q.sum(-2, keepdim=True) + eps)  # O_j, (B,H,S)
    # (2) conservation refinement
    conserved_sink = _dot_with(q + eps, (k / outgoing[..., None]).sum(-2, keepdim=True) + eps)
    conserved_source = _dot_with(k + eps, (q / incoming[..., None]).sum(-2, keepdim=True) + eps)
    if clamp is not None:
        conserved_source = conserved_source.clamp(-clamp, clamp)
    # (3) allocation of sinks, competition of sources
    allocation_gate = torch.sigmoid(conserved_sink * (n_sinks / n_sources)) if allocation else 1.0
    if not competition:
        weighted_v = v
    else:
        if competition_over == "heads":
            weights = torch.softmax(conserved_source, dim=1)
        else:
            logits = conserved_source
            if k_real is not None:
                logits = logits.masked_fill(k_real.squeeze(-1) == 0, _MASKED_LOGIT)
            weights = torch.softmax(logits, dim=-1)
        weighted_v = v * (weights * n_sources)[..., None]
    # (4) aggregation in linear order: (q kᵀ) v computed as q (kᵀ v)
    kv = k.transpose(-2, -1) @ weighted_v  # (B,H,d,dv)
    return (q @ kv) * (allocation_gate / incoming)[..., None]


def _causal_flow(q, k, v, q_real, k_real, *, competition, allocation, clamp, eps, chunk_size):
    length = q.shape[-2]
    # Counts of real sinks / sources up to each position (the official code's `normal` = 1..L).
    positions = torch.arange(1, length + 1, device=q.device, dtype=q.dtype)
    sinks_so_far = positions if q_real is None else q_real.squeeze(-1).cumsum(-1).clamp_min(1)
    sources_so_far = positions if k_real is None else k_real.squeeze(-1).cumsum(-1).clamp_min(1)

    # (1) causal incoming / outgoing flow, normalised by the prefix counts
    incoming = _dot_with(q + eps, k.cumsum(-2) + eps)  # I_i over sources j <= i
    outgoing = _dot_with(k + eps, q.cumsum(-2) + eps)  # O_j over sinks i <= j
    sink_scale = sources_so_far / incoming
    source_scale = sinks_so_far / outgoing
    # (2) conservation refinement
    conserved_sink = _dot_with(q + eps, (k * source_scale[..., None]).cumsum(-2) + eps) / sources_so_far
    conserved_source = _dot_with(k + eps, (q * sink_scale[..., None]).cumsum(-2) + eps) / sinks_so_far
    if clamp is not None:
        conserved_source = conserved_source.clamp(-clamp, clamp)
    # (3) allocation, and competition among the sources seen so far (a prefix softmax).
    allocation_gate = torch.sigmoid(conserved_sink) if allocation else 1.0
    if competition:
        logits = conserved_source
        if k_real is not None:
            logits = logits.masked_fill(k_real.squeeze(-1) == 0, _MASKED_LOGIT)
        # logcumsumexp keeps the prefix softmax stable without a clamp and exactly causal
        weights = torch.exp(logits - torch.logcumsumexp(logits, dim=-1))
        v = v * (weights * sources_so_far)[..., None]
    # (4) causal aggregation
    out = causal_linear_attention(q, k, v, chunk_size=chunk_size)
    return out * (allocation_gate / incoming)[..., None]


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

    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    scores = (qc @ kc.transpose(-2, -1)).masked_fill(future, 0.0)
    intra = scores @ vc

    states = kc.transpose(-2, -1) @ vc  # (B,H,N,d,dv): one state per chunk
    # exclusive prefix: chunk n sees the states of chunks < n (shift, not subtract, so it stays exactly causal)
    before = torch.cat([torch.zeros_like(states[:, :, :1]), states[:, :, :-1].cumsum(2)], dim=2)
    inter = qc @ before
    return (intra + inter).reshape(batch, heads, padded, dim_v)[:, :, :length]
