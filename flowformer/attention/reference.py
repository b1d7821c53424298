"""Plain formulations of Flow-Attention, for tests and benchmarks: the dense reference and the official code's.

`flow_attention_reference` restates the equations of results/paper/official_code.md §1.2-1.3 with explicit
visibility matrices instead of sums and cumulative sums, and builds the flow-capacity matrix
A_ij = <φ(q_i), φ(k_j)> between sinks and sources:

    P_ij = 1 if source j is visible to sink i   (j <= i when causal), real tokens only
    Q_ji = 1 if sink i counts for source j      (i <= j when causal: the official causal outgoing flow only
                                                 looks at sinks up to the source, never at later ones)
    I_i = <q_i+ε, Σ_j P_ij k_j + ε>               O_j = <k_j+ε, Σ_i Q_ji q_i + ε>
    non-causal:  s_i = 1/I_i,   o_j = 1/O_j,   Î_i = <q_i+ε, Σ_j o_j k_j + ε>,   Ô_j = <k_j+ε, Σ_i s_i q_i + ε>
    causal:      s_i = n_i/I_i, o_j = m_j/O_j, Î_i = <…>/n_i,                    Ô_j = <…>/m_j
                 with n_i = #visible sources of sink i and m_j = #sinks counted for source j
    α_i = σ(Î_i · L/S) (non-causal) or σ(Î_i) (causal);  c_j = S·softmax(Ô)_j, or n_j·exp(Ô_j)/Σ_{j'<=j} exp(Ô_j')
    R_i = α_i / I_i · Σ_j A_ij P_ij c_j v_j

`official_noncausal_flow` and `official_causal_flow` compute the core variant as the official code does: einsum
over ε-shifted copies and, for the causal case, the materialised (B, H, L, d, dv) cumulative sum of φ(k_j) v_jᵀ.
They take unpadded inputs only, and are what the benchmark measures our paths against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowformer.attention.flow import FlowOptions, feature_map


def flow_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
    **flow_options: Any,
) -> Tensor:
    """Dense Flow-Attention. Same arguments and output as `flow_attention` (q (B,H,L,d) -> (B,H,L,dv)); chunk size
    and backend are accepted and ignored."""
    options = FlowOptions.resolve(None, flow_options)
    eps, clamp, kernel = options.eps, options.clamp, options.kernel
    batch, _, length, _ = q.shape
    n_src = k.shape[-2]
    if causal:
        key_padding_mask = query_padding_mask if key_padding_mask is None else key_padding_mask
        query_padding_mask = key_padding_mask if query_padding_mask is None else query_padding_mask
    sink_real = (torch.ones(batch, length, dtype=q.dtype) if query_padding_mask is None
                 else (~query_padding_mask).to(q.dtype))
    source_real = (torch.ones(batch, n_src, dtype=q.dtype) if key_padding_mask is None
                   else (~key_padding_mask).to(q.dtype))
    sink_real, source_real = sink_real.to(q.device), source_real.to(q.device)

    phi_q = feature_map(q, kernel) * sink_real[:, None, :, None]
    phi_k = feature_map(k, kernel) * source_real[:, None, :, None]

    ones = torch.ones(length, n_src, dtype=q.dtype, device=q.device)
    visible_order = torch.tril(ones) if causal else ones  # (L, S): source j visible to sink i iff j <= i
    counted_order = torch.tril(ones.T) if causal else ones.T  # (S, L): sink i counted for source j iff i <= j
    visible = visible_order[None, None] * source_real[:, None, None, :] * sink_real[:, None, :, None]  # P
    counted = counted_order[None, None] * sink_real[:, None, None, :] * source_real[:, None, :, None]  # Q

    incoming = ((phi_q + eps) * (visible @ phi_k + eps)).sum(-1)  # (B,H,L)
    outgoing = ((phi_k + eps) * (counted @ phi_q + eps)).sum(-1)  # (B,H,S)
    n_visible = visible.sum(-1).clamp_min(1)  # (B,1,L)
    n_counted = counted.sum(-1).clamp_min(1)  # (B,1,S)

    if causal:
        sink_scale, source_scale = n_visible / incoming, n_counted / outgoing
    else:
        sink_scale, source_scale = 1.0 / incoming, 1.0 / outgoing
    conserved_sink = ((phi_q + eps) * (visible @ (phi_k * source_scale[..., None]) + eps)).sum(-1)
    conserved_source = ((phi_k + eps) * (counted @ (phi_q * sink_scale[..., None]) + eps)).sum(-1)
    if causal:
        conserved_sink, conserved_source = conserved_sink / n_visible, conserved_source / n_counted
    if clamp is not None:
        conserved_source = conserved_source.clamp(-clamp, clamp)

    n_sinks = sink_real.sum(-1).clamp_min(1)[:, None, None]
    n_sources = source_real.sum(-1).clamp_min(1)[:, None, None]
    if not options.allocation:
        gate = torch.ones_like(conserved_sink)
    elif causal:
        gate = torch.sigmoid(conserved_sink)
    else:
        gate = torch.sigmoid(conserved_sink * n_sinks / n_sources)

    if not options.competition:
        weight = torch.ones_like(conserved_source)
    elif options.competition_over == "heads":
        weight = torch.softmax(conserved_source, dim=1) * n_sources
    else:
        expo = torch.exp(conserved_source) * source_real[:, None, :]
        if causal:
            prefix = torch.tril(torch.ones(n_src, n_src, dtype=q.dtype, device=q.device))  # (j, j') j' <= j
            n_prefix = (prefix[None] * source_real[:, None, :]).sum(-1).clamp_min(1)[:, None, :]
            weight = expo / (expo @ prefix.transpose(0, 1)).clamp_min(1e-300) * n_prefix
        else:
            weight = expo / expo.sum(-1, keepdim=True).clamp_min(1e-300) * n_sources

    capacity = (phi_q @ phi_k.transpose(-2, -1)) * visible  # A ⊙ P: (B,H,L,S)
    out = (capacity @ (v * weight[..., None])) * (gate / incoming)[..., None]
    return out * sink_real[:, None, :, None]


def official_noncausal_flow(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6, clamp: float = 1.0) -> Tensor:
    """Non-causal Flow-Attention in the official code's formulation. q, k, v: (B, H, L|S, d) -> (B, H, L, d)."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    n_sinks, n_sources = q.shape[2], k.shape[2]
    sink_incoming = 1.0 / torch.einsum("bhld,bhd->bhl", q + eps, k.sum(dim=2) + eps)
    source_outgoing = 1.0 / torch.einsum("bhld,bhd->bhl", k + eps, q.sum(dim=2) + eps)
    conserved_sink = torch.einsum("bhld,bhd->bhl", q + eps, (k * source_outgoing[:, :, :, None]).sum(dim=2) + eps)
    conserved_source = torch.einsum("bhld,bhd->bhl", k + eps, (q * sink_incoming[:, :, :, None]).sum(dim=2) + eps)
    conserved_source = torch.clamp(conserved_source, min=-clamp, max=clamp)
    sink_allocation = torch.sigmoid(conserved_sink * (float(n_sinks) / float(n_sources)))
    source_competition = torch.softmax(conserved_source, dim=-1) * float(n_sources)
    kv = torch.einsum("bhld,bhlm->bhdm", k, v * source_competition[:, :, :, None])
    qkv = torch.einsum("bhld,bhdm->bhlm", q * sink_incoming[:, :, :, None], kv)
    return qkv * sink_allocation[:, :, :, None]


def official_causal_flow(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6, clamp: float = 1.0) -> Tensor:
    """Causal Flow-Attention in the official code's formulation, with the materialised (B, H, L, d, dv) prefix sum."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    position = torch.arange(1, q.shape[2] + 1, device=q.device, dtype=q.dtype)[None, None, :]
    sink_incoming = 1.0 / torch.einsum("bhld,bhld->bhl", q + eps, k.cumsum(dim=2) + eps)
    source_outgoing = 1.0 / torch.einsum("bhld,bhld->bhl", k + eps, q.cumsum(dim=2) + eps)
    conserved_sink = torch.einsum(
        "bhld,bhld->bhl", q + eps, (k * (source_outgoing * position)[:, :, :, None]).cumsum(dim=2) + eps
    ) / position
    conserved_source = torch.einsum(
        "bhld,bhld->bhl", k + eps, (q * (sink_incoming * position)[:, :, :, None]).cumsum(dim=2) + eps
    ) / position
    conserved_source = torch.clamp(conserved_source, min=-clamp, max=clamp)
    sink_allocation = torch.sigmoid(conserved_sink)
    conserved_source = torch.exp(conserved_source)
    source_competition = conserved_source / conserved_source.cumsum(dim=-1) * position
    kv = torch.einsum("bhld,bhlm->bhldm", k, v * source_competition[:, :, :, None]).cumsum(dim=2)
    qkv = torch.einsum("bhld,bhldm->bhlm", q * sink_incoming[:, :, :, None], kv)
    return qkv * sink_allocation[:, :, :, None]
