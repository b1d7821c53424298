"""The hand-written, chunked backward of causal Flow-Attention (the forward is `causal.causal_pass`).

Every gradient that is a causal sum is read off a (C, C) matrix per chunk plus chunk-level prefix/suffix states,
mirroring the forward. Writing y_i = Σ_{j<=i} (q_i·k_j) u_j (u = c v) and the flows I, O, Ô, Î as in
`causal.py`, all the remaining gradient terms of q and k collapse into one matrix per chunk,
    T_ij = [j <= i] (dy_i·u_j + dI_i + f_i o_j) + [j >= i] (dO_j + s_i e_j),
with dq_c += T k_c and dk_c += Tᵀ q_c (f = dÎ/n, e = dÔ/m), plus rank-4 chunk-level terms. So the backward costs
eight (C, C)-sized GEMMs per chunk and a dozen passes over (L, C) or (L, d) tensors, where autograd through the
forward would keep every intermediate alive and run more passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowformer.attention.flow import causal
from flowformer.attention.flow.causal import CausalSaved
from flowformer.attention.flow.chunks import add_matmul_, exclusive_chunk_suffix, in_chunks
from flowformer.attention.flow.features import FlowInputs
from flowformer.attention.flow.options import FlowOptions


class CausalFlow(torch.autograd.Function):
    """apply(q, k, v, q_real, k_real, options) -> (B, H, L, dv): `causal_pass` with the hand-written backward.

    q, k: (B, H, L, d) feature-mapped and masked; v: (B, H, L, dv), padding zeroed. Every option set except
    competition without a clamp or with one too large for the exp form (see `chunks.prefix_softmax`), whose
    logcumsumexp form is left to autograd.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_real, k_real, options: FlowOptions):
        out, saved = causal_forward(q, k, v, q_real, k_real, options)
        ctx.options = options
        # like torch.exp, the backward reads the output: modifying it in place before backward is an error
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return (*causal_backward(ctx.saved_tensors, ctx.options, grad_out), None, None, None)


def causal_forward(q: Tensor, k: Tensor, v: Tensor, q_real: Tensor | None, k_real: Tensor | None,
                   options: FlowOptions) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """The forward of `CausalFlow`: (out (B, H, L, dv), the fields of `CausalSaved` that `causal_backward` reads,
    None where an option is off)."""
    result = causal.causal_pass(FlowInputs(q, k, v, q_real, k_real), options, for_backward=True)
    return result.out, tuple(result.saved)


def causal_backward(saved: tuple[Tensor | None, ...], options: FlowOptions, grad_out: Tensor):
    """Gradients of q, k and v (B, H, L, ·) from what `causal_forward` saved."""
    with torch.autocast(grad_out.device.type, enabled=False):
        return _backward(CausalSaved(*saved), options, grad_out, grad_out.shape[-2])


def _backward(t: CausalSaved, options: FlowOptions, grad_out: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    competition, allocation, clamp, eps = options.competition, options.allocation, options.clamp, options.eps
    q, k, v, below, above = t.q, t.k, t.v, t.below, t.above
    batch, heads, padded, dim = q.shape
    dim_v = v.shape[-1]
    chunk = below.shape[-1]
    n_chunks = padded // chunk
    tail = padded - length
    grad_out = F.pad(grad_out, (0, 0, 0, tail)) if tail else grad_out

    def flat(x: Tensor) -> Tensor:  # (B, H, N, ..., C) -> (B, H, padded)
        return x.reshape(batch, heads, padded)

    def rows(x: Tensor) -> Tensor:  # (B, H, padded) -> (B, H, N, 1, C)
        return x.view(batch, heads, n_chunks, 1, chunk)

    def columns(x: Tensor) -> Tensor:  # (B|1, H|1, padded) -> (B, H, N, C, 1)
        return x.expand(batch, heads, padded).reshape(batch, heads, n_chunks, chunk, 1)

    def dot_rows(prev: Tensor, x: Tensor) -> Tensor:  # prev (B,H,N,d) · x (B,H,N,C,d) -> (B,H,padded)
        return flat(prev.unsqueeze(-2) @ x.transpose(-2, -1))

    def chunk_sums(weights: Tensor, x: Tensor) -> Tensor:  # Σ_{i in chunk} weights_i x_i -> (B,H,N,d)
        return (rows(weights) @ x).squeeze(-2)

    def suffix(x: Tensor) -> Tensor:  # inclusive suffix sums over positions (B, H, padded)
        return x.flip(-1).cumsum(-1).flip(-1)

    qc, kc = in_chunks(q, chunk), in_chunks(k, chunk)
    incoming, outgoing = t.incoming, t.outgoing
    sink_scale, source_scale = t.sink_scale, t.source_scale
    sources_so_far, sinks_so_far = t.sources_so_far, t.sinks_so_far
    gate_over_incoming = t.gate_over_incoming
    q_rows, k_rows = q.sum(-1), k.sum(-1)
    zeros = torch.zeros_like(incoming)

    # out_i = w_i y_i with w = α / I (α = σ(Î), or 1 without allocation)
    grad_w = (grad_out * t.out).sum(-1) / gate_over_incoming
    grad_incoming = -grad_w * gate_over_incoming / incoming
    f = zeros  # dÎ / n
    if allocation:
        gate = torch.sigmoid(t.conserved_sink)
        f = grad_w / incoming * gate * (1.0 - gate) / sources_so_far
    grad_y = grad_out * gate_over_incoming[..., None]

    # aggregation y_i = Σ_{j<=i} (q_i·k_j) u_j, u = c v
    weights = t.competition_weights if competition else None
    u = v * weights[..., None] if competition else v
    uc, gyc = in_chunks(u, chunk), in_chunks(grad_y, chunk)
    later = exclusive_chunk_suffix((qc.transpose(-2, -1) @ gyc).flatten(-2)).view(batch, heads, n_chunks, dim, dim_v)
    grad_u = add_matmul_(kc @ later, below.transpose(-2, -1), gyc).view(batch, heads, padded, dim_v)
    grad_q = gyc @ t.before.transpose(-2, -1)  # (B,H,N,C,d)
    grad_k = uc @ later.transpose(-2, -1)
    tri = gyc @ uc.transpose(-2, -1)  # dy_i·u_j, kept for j <= i below

    e = zeros  # dÔ / m
    if competition:
        grad_v = grad_u * weights[..., None]
        grad_c = (grad_u * v).sum(-1)
        # c_j = n_j e'_j / Z_j with Z_j = Σ_{j'<=j} e'_j':  dx_j = c_j dc_j - e'_j Σ_{i>=j} dc_i c_i / Z_i
        grad_x = grad_c * weights - t.scaled * suffix((grad_c * weights).double() / t.denominator).to(q.dtype)
        if clamp is not None:
            raw = t.conserved_source
            grad_x = grad_x * ((raw >= -clamp) & (raw <= clamp))
        e = grad_x / sinks_so_far
        # Ô_j m_j = <k_j+ε, Σ_{i<=j} s_i q_i + ε>:  ds_i = Σ_{j>=i} e_j <k_j+ε, q_i>
        ek_later = exclusive_chunk_suffix(chunk_sums(e, kc))
        grad_s = flat(rows(e) @ above.transpose(-2, -1)) + dot_rows(ek_later, qc) + eps * q_rows * suffix(e)
        grad_incoming = grad_incoming - grad_s * sink_scale / incoming
    else:
        grad_v = grad_u
        ek_later = torch.zeros_like(t.k_before)
    grad_outgoing = zeros
    if allocation:
        # Î_i n_i = <q_i+ε, Σ_{j<=i} o_j k_j + ε>:  do_j = Σ_{i>=j} f_i <q_i+ε, k_j>
        fq_later = exclusive_chunk_suffix(chunk_sums(f, qc))
        grad_o = flat(rows(f) @ below) + dot_rows(fq_later, kc) + eps * k_rows * suffix(f)
        grad_outgoing = -grad_o * source_scale / outgoing
    else:
        fq_later = torch.zeros_like(t.k_before)

    # T_ij = [j <= i](dy_i·u_j + dI_i + f_i o_j) + [j >= i](dO_j + s_i e_j); dq_c += T k_c, dk_c += Tᵀ q_c
    tri.add_(columns(grad_incoming))
    if allocation:
        tri.addcmul_(columns(f), rows(source_scale))
    tri.tril_()
    upper = rows(grad_outgoing).expand_as(tri)
    if competition:
        upper = torch.addcmul(upper, columns(sink_scale), rows(e))
    tri.add_(upper.triu())
    grad_q = add_matmul_(grad_q, tri, kc)
    grad_k = add_matmul_(grad_k, tri.transpose(-2, -1), qc)

    # chunk-level terms: earlier chunks (prefix states) and later chunks (suffix states), and the ε shifts
    ok_before = t.ok_before if allocation else torch.zeros_like(t.k_before)
    sq_before = t.sq_before if competition else torch.zeros_like(t.k_before)
    dok_later = exclusive_chunk_suffix(chunk_sums(grad_outgoing, kc))
    diq_later = exclusive_chunk_suffix(chunk_sums(grad_incoming, qc))
    ones = torch.ones_like(incoming)
    shift_q = eps * (grad_incoming + f + suffix(grad_outgoing) + sink_scale * suffix(e))
    shift_k = eps * (suffix(grad_incoming) + grad_outgoing + e + source_scale * suffix(f))
    q_coefficients = torch.stack([grad_incoming, f, ones, sink_scale, shift_q], dim=-1)  # (B,H,padded,5)
    k_coefficients = torch.stack([grad_outgoing, e, ones, source_scale, shift_k], dim=-1)
    ones_d = torch.ones_like(t.k_before)
    q_vectors = torch.stack([t.k_before, ok_before, dok_later, ek_later, ones_d], dim=-2)  # (B,H,N,5,d)
    k_vectors = torch.stack([t.q_before, sq_before, diq_later, fq_later, ones_d], dim=-2)
    grad_q = add_matmul_(grad_q, in_chunks(q_coefficients, chunk), q_vectors).view(batch, heads, padded, dim)
    grad_k = add_matmul_(grad_k, in_chunks(k_coefficients, chunk), k_vectors).view(batch, heads, padded, dim)
    if tail:
        grad_q, grad_k, grad_v = grad_q[:, :, :-tail], grad_k[:, :, :-tail], grad_v[:, :, :-tail]
    return grad_q, grad_k, grad_v
