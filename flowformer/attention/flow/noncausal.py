"""Non-causal Flow-Attention in cache-sized blocks of rows, with a hand-written backward (the "blocked" backend).

The flows form a chain of global sums (Σk -> I -> Σ s q -> Ô -> softmax -> kv; Σq -> O -> Σ o k -> Î), so the forward
is four passes over blocks of the sequence that stay in cache: one over k (feature map, a = Σ φ(k)), one over q
(feature map, I, Σq, Σ s q), one over k and v (O and Ô together, Σ o k, and kv accumulated with the unnormalised
weights exp(Ô - clamp), normalised at the end) and one over q (Î, the gate, the output). Applying the feature map
inside the first two passes saves two more passes over q and k.

Every flow is a row vector (B, H, 1, N) computed as (1, d) @ (d, N): BLAS runs that form at memory speed on CPU,
(N, d) @ (d, 1) an order of magnitude slower. Flows that read the same block are stacked into one (r, d) @ (d, N)
product. Every ε-shifted dot product is folded as <x + ε, a> = x·a + ε·Σa (a already holds its own + ε): a
matrix-vector product plus a per-head constant, instead of shifted copies and a broadcast multiply-sum.

The backward saves only φ(q), φ(k), v and (B, H, 1, N) flow vectors, where autograd through the forward would keep a
dozen (L, d)-sized intermediates and run each rank-1 gradient term as its own pass; it gathers those terms into
one small matmul per block, in blocked passes like the forward's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from flowformer.attention.flow.chunks import EXP_PREFIX_MAX_CLAMP, MASKED_LOGIT, add_matmul_, join, row_blocks
from flowformer.attention.flow.features import FlowInputs, feature_map_grad, map_rows
from flowformer.attention.flow.options import FlowOptions


class _Saved(NamedTuple):
    """What the backward reads, besides φ(q), φ(k) and v (None where an option is off)."""

    k_total: Tensor  # (B,H,1,d) Σ φ(k) + ε
    sink_scale: Tensor  # (B,H,1,L) s = 1 / I
    row_scale: Tensor  # (B,H,1,L) α s (s without allocation)
    kv: Tensor  # (B,H,d,dv) Σ_j φ(k_j) c_j v_jᵀ
    n_sources: Tensor
    q_weighted: Tensor | None = None  # (B,H,1,d) Σ s q + ε (competition)
    conserved_source: Tensor | None = None  # (B,H,1,S) Ô before the clamp
    competition_weights: Tensor | None = None  # (B,H,1,S) c
    q_total: Tensor | None = None  # (B,H,1,d) Σ q + ε (allocation)
    source_scale: Tensor | None = None  # (B,H,1,S) o = 1 / O
    k_weighted: Tensor | None = None  # (B,H,1,d) Σ o k + ε
    gate: Tensor | None = None  # (B,H,1,L) α
    ratio: Tensor | None = None  # L / S, real tokens


class _Keys(NamedTuple):
    """The key side of the forward: φ(k) (B,H,S,d), v (B,H,S,dv), their row blocks, the (B,1,1,S) padding flags
    (None without a mask) and the number of real keys."""

    k: Tensor
    v: Tensor
    blocks: list[slice]
    is_pad: Tensor | None
    count: Tensor


class _Sources(NamedTuple):
    """The pass over k and v: kv, Σ o k (B,H,1,d), and the (B,H,1,S) rows o, Ô, c (None where not computed)."""

    kv: Tensor
    ok_sum: Tensor | float
    source_scale: Tensor | None
    conserved_source: Tensor | None
    weights: Tensor | None


class BlockedFlow(torch.autograd.Function):
    """apply(q_raw, k_raw, v, q_real, k_real, options) -> (B, H, L, dv): `blocked_forward` with the hand-written
    `blocked_backward`.

    q_raw, k_raw: (B, H, L|S, d) before the feature map; v: (B, H, S, dv), padding zeroed; q_real, k_real: (B, 1,
    N, 1) real-token weights or None; options: `FlowOptions`. Computes in the dtype of its inputs.
    """

    @staticmethod
    def forward(ctx, q_raw, k_raw, v, q_real, k_real, options: FlowOptions):
        out, saved = blocked_forward(q_raw, k_raw, v, q_real, k_real, options)
        ctx.options = options
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_q, grad_k, grad_v = blocked_backward(ctx.saved_tensors, ctx.options, grad_out)
        return grad_q, grad_k, grad_v, None, None, None


def blocked_forward(q_raw: Tensor, k_raw: Tensor, v: Tensor, q_real: Tensor | None, k_real: Tensor | None,
                    options: FlowOptions) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """The forward of `BlockedFlow`: (out (B, H, L, dv), what `blocked_backward` reads: φ(q), φ(k), v, then the
    fields of `_Saved`, None where an option is off)."""
    q_blocks, k_blocks = row_blocks(q_raw), row_blocks(k_raw)
    q, k = torch.empty_like(q_raw), torch.empty_like(k_raw)
    tokens = FlowInputs(q_raw, k_raw, v, q_real, k_real, mapped=False)
    n_sinks, n_sources = tokens.n_sinks(), tokens.n_sources()
    key_is_pad = None if k_real is None else k_real.transpose(-2, -1) == 0  # (B,1,1,S)
    competition, allocation, eps = options.competition, options.allocation, options.eps

    # passes over k, then q: φ(k), a = Σ φ(k) + ε; φ(q), (1) I_i = <q_i+ε, a>, s_i = 1/I_i; the sums Σ_i q_i
    # (allocation) and Σ_i s_i q_i (competition)
    k_total = 0.0
    for rows in k_blocks:
        k_total = k_total + map_rows(k_raw, rows, options.kernel, k_real, out=k[..., rows, :]).sum(-2, keepdim=True)
    k_total = k_total + eps
    k_shift = eps * k_total.sum(-1, keepdim=True)
    scales, q_stats = [], 0.0
    for rows in q_blocks:
        block = map_rows(q_raw, rows, options.kernel, q_real, out=q[..., rows, :])
        scale = torch.reciprocal_((k_total @ block.transpose(-2, -1)).add_(k_shift))
        scales.append(scale)
        weights = ([torch.ones_like(scale)] if allocation else []) + ([scale] if competition else [])
        if weights:
            q_stats = q_stats + torch.cat(weights, -2) @ block
    sink_scale = join(scales)

    # pass over k and v, then the competition softmax over keys (or heads)
    keys_softmax = competition and options.competition_over == "keys"
    clamp = options.clamp
    streamed = not keys_softmax or (clamp is not None and clamp <= EXP_PREFIX_MAX_CLAMP)
    sink_sums = q_stats + eps if (allocation or competition) else None  # rows: Σ q + ε (allocation), Σ s q + ε
    keys = _Keys(k, v, k_blocks, key_is_pad, n_sources)
    sources = _source_pass(keys, sink_sums, options, streamed)
    kv, weights = sources.kv, sources.weights
    if keys_softmax:
        kv, weights = _normalise_competition(keys, sources, options, streamed)

    # pass over q: (2)+(3) Î_i = <q_i+ε, Σ_j o_j k_j + ε> and the allocation gate; (4) out_i = α_i/I_i q_i kv,
    # each block's product written straight into the output (bmm on (B·H, n, ·) views: no copy)
    gate_terms = None
    if allocation:
        k_weighted = sources.ok_sum + eps
        gate_terms = (k_weighted, eps * k_weighted.sum(-1, keepdim=True), n_sinks / n_sources)
    batch_heads, dim, dim_v = q.shape[0] * q.shape[1], q.shape[-1], v.shape[-1]
    out = q.new_empty(q.shape[:-1] + (dim_v,))
    out_rows, kv_3d, gates = out.view(batch_heads, -1, dim_v), kv.reshape(batch_heads, dim, dim_v), []
    for rows in q_blocks:
        block = q[..., rows, :]
        target = out_rows[:, rows]
        torch.bmm(block.reshape(batch_heads, -1, dim), kv_3d, out=target)
        scale = sink_scale[..., rows]
        if allocation:
            weighted, shift, ratio = gate_terms
            gate = torch.sigmoid_((weighted @ block.transpose(-2, -1)).add_(shift).mul_(ratio))
            gates.append(gate)
            scale = gate * scale
        target.mul_(scale.reshape(batch_heads, -1, 1))

    saved = _Saved(k_total, sink_scale, sink_scale, kv, n_sources)
    if competition:
        q_weighted = sink_sums[..., -1:, :]
        saved = saved._replace(q_weighted=q_weighted, conserved_source=sources.conserved_source,
                               competition_weights=weights)
    if allocation:
        gate = join(gates)
        saved = saved._replace(row_scale=gate * sink_scale, q_total=sink_sums[..., :1, :],
                               source_scale=sources.source_scale, k_weighted=gate_terms[0], gate=gate,
                               ratio=gate_terms[2])
    return out, (q, k, v, *saved)


def blocked_backward(saved: tuple[Tensor | None, ...], options: FlowOptions, grad_out: Tensor):
    """Gradients of q_raw, k_raw and v from what `blocked_forward` saved (see `_backward`)."""
    with torch.autocast(grad_out.device.type, enabled=False):
        return _backward(saved, options, grad_out.contiguous())


def _source_pass(keys: _Keys, sink_sums: Tensor | None, options: FlowOptions, streamed: bool) -> _Sources:
    """The forward's pass over k and v.

    (1) O_j = <k_j+ε, Σ q + ε>, o_j = 1/O_j, Σ_j o_j k_j; (2) Ô_j = <k_j+ε, Σ s_i q_i + ε> (one product for both);
    (3) the competition weights c_j; (4) kv = Σ_j k_j c_j v_jᵀ. With a clamp, exp(Ô_j - clamp) <= 1 is a safe
    unnormalised softmax over keys, so kv is accumulated in the same pass and normalised afterwards (`streamed`);
    without one, only the logits are gathered here.
    """
    competition, allocation, clamp = options.competition, options.allocation, options.clamp
    k, v, key_is_pad = keys.k, keys.v, keys.is_pad
    sink_shifts = None if sink_sums is None else options.eps * sink_sums.sum(-1, keepdim=True)  # (B,H,r,1)
    source_scales, raw_logits, weight_parts, ok_sum, kv = [], [], [], 0.0, None
    for rows in keys.blocks:
        block = k[..., rows, :]
        block_t = block.transpose(-2, -1)
        if sink_sums is not None:
            flows = (sink_sums @ block_t).add_(sink_shifts)  # (B,H,r,n): O_j, Ô_j
        if allocation:
            scale = torch.reciprocal_(flows[..., :1, :])
            source_scales.append(scale)
            ok_sum = ok_sum + scale @ block
        values = v[..., rows, :]
        if competition:
            logits = flows[..., -1:, :]
            raw_logits.append(logits)
            if not streamed:
                continue
            if clamp is not None:
                logits = logits.clamp(-clamp, clamp)
            if options.competition_over == "heads":
                weight = torch.softmax(logits, dim=1) * keys.count
            else:
                weight = torch.exp(logits - clamp)
                if key_is_pad is not None:
                    weight = weight.masked_fill(key_is_pad[..., rows], 0.0)
            weight_parts.append(weight)
            values = values * weight.transpose(-2, -1)
        kv = block_t @ values if kv is None else add_matmul_(kv, block_t, values)
    return _Sources(
        kv,
        ok_sum,
        join(source_scales) if allocation else None,
        join(raw_logits) if competition else None,
        join(weight_parts) if weight_parts else None,
    )


def _normalise_competition(keys: _Keys, sources: _Sources, options: FlowOptions, streamed: bool):
    """The competition softmax over keys: (kv, c). A streamed pass only rescales its unnormalised kv and weights;
    without a usable bound on the logits, the softmax over all keys comes first and a second pass builds kv."""
    kv, weights = sources.kv, sources.weights
    if streamed:
        normaliser = keys.count / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        return kv.mul_(normaliser), weights.mul_(normaliser)
    clamp = options.clamp
    logits = sources.conserved_source if clamp is None else sources.conserved_source.clamp(-clamp, clamp)
    if keys.is_pad is not None:
        logits = logits.masked_fill(keys.is_pad, MASKED_LOGIT)
    weights = torch.softmax(logits, dim=-1) * keys.count
    kv = None
    for rows in keys.blocks:
        values = keys.v[..., rows, :] * weights[..., rows].transpose(-2, -1)
        block_t = keys.k[..., rows, :].transpose(-2, -1)
        kv = block_t @ values if kv is None else add_matmul_(kv, block_t, values)
    return kv, weights


def _backward(saved: tuple[Tensor, ...], options: FlowOptions, grad_out: Tensor):
    """Gradients of q_raw, k_raw and v from what the forward saved (φ(q), φ(k), v, then `_Saved`), in the same
    cache-sized blocks as the forward: three passes over q and two over k (plus one GEMV over k), each reading its
    block once. Every flow gradient is a (B, H, 1, N) row vector."""
    competition, allocation, clamp, eps = options.competition, options.allocation, options.clamp, options.eps
    q, k, v, *rest = saved
    t = _Saved(*rest)
    row_scale, sink_scale, kv = t.row_scale, t.sink_scale, t.kv
    q_blocks, k_blocks = row_blocks(q), row_blocks(k)

    def accumulate(total, rows: list[Tensor], x: Tensor):  # total + Σ_j rows_j x_j, rows stacked as (r, n)
        stacked = torch.cat(rows, -2)
        return stacked @ x if total is None else add_matmul_(total, stacked, x)

    def with_eps(total: Tensor, rows: list[Tensor]) -> list[Tensor]:  # a = Σ_j row_j x_j + ε Σ_j row_j, per row
        return [total[..., i : i + 1, :] + eps * row.sum(-1, keepdim=True) for i, row in enumerate(rows)]

    # pass over q: out_i = w_i q_i kv, so g kvᵀ (kept in grad_q until the last pass), ∂w_i, and ∂kv
    grad_q = torch.empty_like(q)
    grad_row_scale, grad_kv = [], None
    kv_t = kv.transpose(-2, -1)
    for rows in q_blocks:
        block, g = q[..., rows, :], grad_out[..., rows, :]
        projected = grad_q[..., rows, :]
        projected.copy_(g @ kv_t)
        grad_row_scale.append((block * projected).sum(-1).unsqueeze(-2))
        weighted = g * row_scale[..., rows].transpose(-2, -1)
        block_t = block.transpose(-2, -1)
        grad_kv = block_t @ weighted if grad_kv is None else add_matmul_(grad_kv, block_t, weighted)
    grad_row_scale = join(grad_row_scale)

    # pass over k and v: kv = kᵀ (c v), so ∂v, the kv part of ∂k, and ∂c
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    grad_kv_t = grad_kv.transpose(-2, -1)
    grad_c = []
    for rows in k_blocks:
        block, values = k[..., rows, :], v[..., rows, :]
        value_proj = block @ grad_kv
        if competition:
            weight = t.competition_weights[..., rows].transpose(-2, -1)
            torch.mul(value_proj, weight, out=grad_v[..., rows, :])
            grad_k[..., rows, :] = (values * weight) @ grad_kv_t
            grad_c.append((values * value_proj).sum(-1).unsqueeze(-2))
        else:
            grad_v[..., rows, :] = value_proj
            grad_k[..., rows, :] = values @ grad_kv_t

    if competition:
        # c = n_sources · softmax(clamp(Ô)) over the keys (or the heads), then Ô_j = k_j·b' + ε Σ b'
        c = t.competition_weights
        grad_c = join(grad_c)
        axis = 1 if options.competition_over == "heads" else -1
        grad_logits = c * (grad_c - (c / t.n_sources * grad_c).sum(axis, keepdim=True))
        if clamp is not None:
            grad_logits = grad_logits * ((t.conserved_source >= -clamp) & (t.conserved_source <= clamp))
        # one pass over k, at memory speed: ∂b' needs every ∂Ô_j before any ∂s_i can be formed
        (grad_q_weighted,) = with_eps(grad_logits @ k, [grad_logits])

    # pass over q: ∂s (through b' = Σ s_i q_i, and through w = α s), ∂Î (allocation), then ∂I from s = 1/I;
    # accumulates ∂b = Σ ∂Î_i q_i and Σ ∂I_i q_i, the q-side sums of the rank-1 terms of ∂k
    grad_incoming, grad_conserved_sink, q_sums = [], [], None
    for rows in q_blocks:
        block, scale, grad_scale = q[..., rows, :], sink_scale[..., rows], grad_row_scale[..., rows]
        grad_sink_scale = grad_q_weighted @ block.transpose(-2, -1) if competition else 0.0
        sums = []
        if allocation:
            block_gate = t.gate[..., rows]
            grad_sink_scale = grad_sink_scale + grad_scale * block_gate
            grad_conserved_sink.append(grad_scale * scale * block_gate * (1.0 - block_gate) * t.ratio)
            sums.append(grad_conserved_sink[-1])
        else:
            grad_sink_scale = grad_sink_scale + grad_scale
        grad_incoming.append(-grad_sink_scale * scale * scale)
        sums.append(grad_incoming[-1])
        q_sums = accumulate(q_sums, sums, block)
    grad_incoming = join(grad_incoming)
    if allocation:
        grad_conserved_sink = join(grad_conserved_sink)
        grad_k_weighted, incoming_vector = with_eps(q_sums, [grad_conserved_sink, grad_incoming])
    else:
        (incoming_vector,) = with_eps(q_sums, [grad_incoming])

    # pass over k: with allocation, ∂o from Î (b = Σ o_j k_j + ε) and ∂O from o = 1/O; then ∂k gets its rank-1
    # terms (rows ⊗ vectors) and the feature map's derivative
    ones = torch.ones_like(sink_scale[..., :1, :1])
    outgoing_sum, grad_outgoing = None, []
    for rows in k_blocks:
        block = k[..., rows, :]
        block_rows, block_vectors = [], []
        if competition:
            block_rows.append(grad_logits[..., rows])
            block_vectors.append(t.q_weighted)
        if allocation:
            source_scale = t.source_scale[..., rows]
            grad_out_flow = -(grad_k_weighted @ block.transpose(-2, -1)) * source_scale * source_scale
            grad_outgoing.append(grad_out_flow)
            outgoing_sum = accumulate(outgoing_sum, [grad_out_flow], block)
            block_rows += [source_scale, grad_out_flow]
            block_vectors += [grad_k_weighted, t.q_total]
        block_rows.append(ones.expand(block.shape[:-2] + (1, block.shape[-2])))
        block_vectors.append(incoming_vector)
        target = grad_k[..., rows, :]
        target.add_(torch.cat(block_rows, -2).transpose(-2, -1) @ torch.cat(block_vectors, -2))
        target.mul_(feature_map_grad(block, options.kernel))

    # pass over q: ∂q = w_i g_i kvᵀ plus its rank-1 terms, times the feature map's derivative
    q_vectors = ([grad_q_weighted] if competition else []) + ([t.k_weighted] if allocation else [])
    if allocation:
        (outgoing_vector,) = with_eps(outgoing_sum, [join(grad_outgoing)])
        q_vectors.append(outgoing_vector)
    q_vectors = torch.cat(q_vectors + [t.k_total], -2)
    for rows in q_blocks:
        block = q[..., rows, :]
        block_rows = [sink_scale[..., rows]] if competition else []
        if allocation:
            block_rows += [grad_conserved_sink[..., rows], ones.expand(block.shape[:-2] + (1, block.shape[-2]))]
        block_rows.append(grad_incoming[..., rows])
        target = grad_q[..., rows, :]
        target.mul_(row_scale[..., rows].transpose(-2, -1))
        target.add_(torch.cat(block_rows, -2).transpose(-2, -1) @ q_vectors)
        target.mul_(feature_map_grad(block, options.kernel))
    return grad_q, grad_k, grad_v
