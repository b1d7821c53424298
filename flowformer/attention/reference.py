"""Dense O(L·S) reference of Flow-Attention, for tests only.

It restates the equations of official-settings.md §1.2-1.3 with explicit visibility matrices instead of sums and
cumulative sums, and builds the flow-capacity matrix A_ij = <φ(q_i), φ(k_j)> between sinks and sources:

    P_ij = 1 if source j is visible to sink i   (j <= i when causal), real tokens only
    Q_ji = 1 if sink i counts for source j      (i <= j when causal: the official causal outgoing flow only
                                                 looks at sinks up to the source, never at later ones)
    I_i = <q_i+ε, Σ_j P_ij k_j + ε>               O_j = <k_j+ε, Σ_i Q_ji q_i + ε>
    non-causal:  s_i = 1/I_i,   o_j = 1/O_j,   Î_i = <q_i+ε, Σ_j o_j k_j + ε>,   Ô_j = <k_j+ε, Σ_i s_i q_i + ε>
    causal:      s_i = n_i/I_i, o_j = m_j/O_j, Î_i = <…>/n_i,                    Ô_j = <…>/m_j
                 with n_i = #visible sources of sink i and m_j = #sinks counted for source j
    α_i = σ(Î_i · L/S) (non-causal) or σ(Î_i) (causal);  c_j = S·softmax(Ô)_j, or n_j·exp(Ô_j)/Σ_{j'<=j} exp(Ô_j')
    R_i = α_i / I_i · Σ_j A_ij P_ij c_j v_j
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowformer.attention.flow import feature_map


def flow_attention_reference(
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
) -> Tensor:
    """Dense Flow-Attention. Same arguments and output as `flow_attention` (q (B,H,L,d) -> (B,H,L,dv))."""
    batch, _, length, _ = q.shape
    n_src = k.shape[-2]
    if causal:
        key_padding_mask = query_padding_mask if key_padding_mask is None else key_padding_mask
        query_padding_mask = key_padding_mask if query_padding_mask is None else query_padding_mask
    sink_real = torch.ones(batch, length, dtype=q.dtype) if query_padding_mask is None else (~query_padding_mask).to(q.dtype)
    source_real = torch.ones(batch, n_src, dtype=q.dtype) if key_padding_mask is None else (~key_padding_mask).to(q.dtype)
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
    if not allocation:
        gate = torch.ones_like(conserved_sink)
    elif causal:
        gate = torch.sigmoid(conserved_sink)
    else:
        gate = torch.sigmoid(conserved_sink * n_sinks / n_sources)

    if not competition:
        weight = torch.ones_like(conserved_source)
    elif competition_over == "heads":
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
