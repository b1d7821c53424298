"""Non-causal Flow-Attention as a few large GEMMs over the whole sequence, under autograd (the "batched" backend).

This is the GPU form: the official formulation's shape (no cache blocking, no per-block kernel launches), plus our
padding and ε folding, and in the input dtype. Big tensors (φ(q), φ(k), v and the products) stay in the input dtype,
so bf16/fp16 inputs run bf16/fp16 GEMMs, which accumulate in fp32. The sums over the sequence (Σ φ(k), Σ φ(q)) are
taken in fp32, where rounding would otherwise grow with the length; the per-token flows (B, H, 1, N) come out of
the GEMMs rounded to the input dtype, once, and are carried in fp32 from there (reciprocals, softmax, gates).

Every flow is normalised by its token count, which keeps each value near 1 in every dtype: fp16 cannot hold
s = 1/I ≈ 4/(S·d) at long lengths (it underflows), nor the unnormalised kv = Σ_j φ(k_j) c_j v_jᵀ (it overflows).
With Ī = I / S, s̄ = 1/Ī = S·s, and p_j = c_j / S (the competition softmax itself, or 1/S without competition):
    out_i = α_i s_i φ(q_i)·Σ_j φ(k_j) c_j v_jᵀ = α_i s̄_i φ(q_i)·Σ_j φ(k_j) p_j v_jᵀ,
the same function as the other backends (`tests/test_flow_backends.py` holds it equal to the dense reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowformer.attention.flow.chunks import MASKED_LOGIT
from flowformer.attention.flow.features import FlowInputs
from flowformer.attention.flow.options import FlowOptions


def _flows(rows: Tensor, x: Tensor) -> Tensor:
    """x·row for each fp32 row (B, H, r, d) against x (B, H, N, d): one (r, d) @ (d, N) product in the dtype of x,
    returned in fp32 as (B, H, r, N)."""
    return (rows.to(x.dtype) @ x.transpose(-2, -1)).to(rows.dtype)


def _weighted_sum(weights: Tensor, x: Tensor) -> Tensor:
    """Σ_n weights_n x_n for an fp32 row (B, H, 1, N) against x (B, H, N, d), returned in fp32 as (B, H, 1, d)."""
    return (weights.to(x.dtype) @ x).to(weights.dtype)


def batched_flow(x: FlowInputs, options: FlowOptions) -> Tensor:
    """Non-causal Flow-Attention on feature-mapped inputs `x` (`FlowInputs` with mapped=True), differentiable by
    autograd. Returns (B, H, L, dv) in the dtype of x.q; padded query rows are left to the caller."""
    q, k, v, eps = x.q, x.k, x.v, options.eps
    acc = torch.promote_types(q.dtype, torch.float32)
    n_sinks, n_sources = x.n_sinks().to(acc), x.n_sources().to(acc)

    def shifted(rows: Tensor, mapped: Tensor) -> Tensor:  # <mapped_n + ε, row> for rows that hold their own + ε
        return _flows(rows, mapped) + eps * rows.sum(-1, keepdim=True)

    # (1) Ī_i = <q_i+ε, Σ_j k_j + ε> / S, and s̄_i = 1 / Ī_i
    k_mean = (k.sum(-2, keepdim=True, dtype=acc) + eps) / n_sources
    sink_scale = 1.0 / shifted(k_mean, q)  # (B,H,1,L)
    # (1) Ō_j = <k_j+ε, Σ_i q_i + ε> / L and (2) Ô_j = <k_j+ε, Σ_i s_i q_i + ε>, in one product over k
    q_mean = (q.sum(-2, keepdim=True, dtype=acc) + eps) / n_sinks
    q_weighted = _weighted_sum(sink_scale, q) / n_sources + eps
    source_flows = shifted(torch.cat([q_mean, q_weighted], dim=-2), k)  # (B,H,2,S)

    # (2)+(3) Î_i = <q_i+ε, Σ_j o_j k_j + ε> and the allocation α_i = σ(Î_i L/S)
    row_scale = sink_scale
    if options.allocation:
        source_scale = 1.0 / source_flows[..., :1, :]  # ō_j = L / O_j
        k_weighted = _weighted_sum(source_scale, k) / n_sinks + eps
        row_scale = torch.sigmoid(shifted(k_weighted, q) * (n_sinks / n_sources)) * sink_scale

    # (3) the competition, as p_j = c_j / S: a softmax over the keys (or over the heads)
    if options.competition:
        logits = source_flows[..., 1:, :]
        if options.clamp is not None:
            logits = logits.clamp(-options.clamp, options.clamp)
        if options.competition_over == "heads":
            share = torch.softmax(logits, dim=1)
        else:
            if x.k_real is not None:
                logits = logits.masked_fill(x.k_real.transpose(-2, -1) == 0, MASKED_LOGIT)
            share = torch.softmax(logits, dim=-1)
        values = v * share.transpose(-2, -1).to(v.dtype)
    else:
        values = v * (1.0 / n_sources).to(v.dtype)

    # (4) out_i = α_i s̄_i φ(q_i)·Σ_j φ(k_j) p_j v_jᵀ
    return (q @ (k.transpose(-2, -1) @ values)) * row_scale.transpose(-2, -1).to(q.dtype)
