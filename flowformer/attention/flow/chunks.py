"""Chunk and scan primitives of Flow-Attention: cache-sized row blocks, chunk views, exclusive prefix sums over
chunks, the causal prefix softmax and the chunked causal linear attention.

These know nothing about flows: they are the building blocks that `noncausal.py` and `causal.py` compose.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from flowformer.attention.flow.options import DEFAULT_CHUNK_SIZE

# Rows per block of the CPU passes: a (B, H, block, d) slice of ~2 MiB stays in cache between the few ops that read
# it, so each pass reads q or k from memory once.
BLOCK_BYTES = 2 * 2**20
# Narrow chunk-level sums are prefix-summed in groups of this many chunks (see `blocked_exclusive_prefix`).
PREFIX_GROUP = 16
# On CPU, chunk-level states at least this wide are prefix-summed by a sequential in-place scan (`ExclusiveScan`).
SCAN_MIN_WIDTH = 512
# A prefix softmax with |logits| <= clamp is computed as exp(x - clamp) / cumsum, safe while e^(-2 clamp) is normal.
EXP_PREFIX_MAX_CLAMP = 30.0
# A finite "minus infinity" for masked logits: -inf would turn fully padded rows into NaN (and NaN gradients
# through torch.where), while exp(-1e30 - x) underflows to an exact 0 in fp32.
MASKED_LOGIT = -1e30


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rows_per_cache_block(x: Tensor, itemsize: int) -> int:
    """How many rows of x (B, H, N, d), at `itemsize` bytes per element, fill `BLOCK_BYTES`."""
    return BLOCK_BYTES // max(1, x.shape[0] * x.shape[1] * x.shape[-1] * itemsize)


def row_blocks(x: Tensor) -> list[slice]:
    """Slices of the sequence axis of x (B, H, N, d) into cache-sized blocks; one block on a GPU, where every block
    costs a dozen kernel launches and the caches are not what limits the passes."""
    if x.is_cuda:
        return [slice(0, x.shape[-2])]
    size = max(256, rows_per_cache_block(x, x.element_size()))
    return [slice(start, min(start + size, x.shape[-2])) for start in range(0, x.shape[-2], size)]


def join(parts: list[Tensor]) -> Tensor:
    """Per-block (B, H, 1, n) row vectors -> one (B, H, 1, N) row."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def in_chunks(x: Tensor, chunk: int) -> Tensor:
    """(B, H, N·C, X) -> (B, H, N, C, X): a view with one (C, X) block per chunk."""
    batch, heads, padded, width = x.shape
    return x.view(batch, heads, padded // chunk, chunk, width)


def add_matmul_(base: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """base += left @ right in place, for (..., M, K) @ (..., K, N) with any leading dims (3-D views for baddbmm_).

    `base` must be a fresh matmul output (its backward does not need it); out of place, baddbmm would first copy
    it, which costs as much as the addition it saves.
    """
    flat = base.view((-1,) + base.shape[-2:])
    flat.baddbmm_(left.reshape((-1,) + left.shape[-2:]), right.reshape((-1,) + right.shape[-2:]))
    return base


def strict_lower(n: int, like: Tensor) -> Tensor:
    return torch.ones(n, n, device=like.device, dtype=like.dtype).tril(-1)


def exclusive_chunk_prefix(x: Tensor) -> Tensor:
    """y[..., n, :] = Σ_{m<n} x[..., m, :] for x (..., N, M): the sum over all earlier chunks."""
    if x.shape[-2] == 1:
        return torch.zeros_like(x)
    if x.is_cuda:
        # cumsum is fast on GPU; shifting (not subtracting) keeps chunk n independent of chunk n
        return torch.cat([torch.zeros_like(x[..., :1, :]), x[..., :-1, :].cumsum(-2)], dim=-2)
    if x.shape[-1] >= SCAN_MIN_WIDTH:
        return ExclusiveScan.apply(x)
    return blocked_exclusive_prefix(x)


def exclusive_chunk_suffix(x: Tensor) -> Tensor:
    """y[..., n, :] = Σ_{m>n} x[..., m, :] for x (..., N, M): the sum over all later chunks."""
    return exclusive_chunk_prefix(x.flip(-2)).flip(-2)


def chunk_offsets(per_chunk: Tensor, start: Tensor | None) -> Tensor:
    """(B, H, N, M) per-chunk sums -> the sum over all *earlier* chunks (plus the carried `start` (B, H, M))."""
    out = exclusive_chunk_prefix(per_chunk)
    return out if start is None else out + start[:, :, None]


def scalar_prefix(x: Tensor, start: Tensor | None) -> Tensor:
    """Inclusive prefix sum of (B, H, L) scalars, plus Σ_d of the carried (B, H, d) sum."""
    out = x.cumsum(-1)
    return out if start is None else out + start.sum(-1, keepdim=True)


class ExclusiveScan(torch.autograd.Function):
    """Exclusive prefix sum over axis -2 by a loop over N, for wide rows (the (d, dv) chunk states) on CPU.

    A copy of the input is scanned in place by `exclusive_scan_`. On CPU, in-place row additions run several
    times faster than `torch.add(..., out=)` on rows of one tensor, than the blocked matmul form, and than
    torch.cumsum along a non-last axis.
    """

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        exclusive_scan_(out, None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # x[m] feeds every out[n] with n > m: the exclusive suffix sum of the gradient
        grad = grad_out.clone()
        exclusive_scan_(grad, None, reverse=True)
        return grad


def scans_in_place(x: Tensor) -> bool:
    """Whether the chunk states `x` (..., N, M) may be prefix-summed in place: wide CPU rows, outside autograd."""
    return not x.is_cuda and x.shape[-1] >= SCAN_MIN_WIDTH and not needs_grad(x)


def exclusive_scan_(x: Tensor, start: Tensor | None, *, reverse: bool = False) -> Tensor:
    """In place: x[..., n, :] becomes start + Σ_{m<n} x[..., m, :] (Σ_{m>n} with reverse=True), row by row, so row
    n never reads a row on its far side. Returns the total, start + Σ_m x[..., m, :].
    """
    carry = torch.zeros_like(x[..., 0, :]) if start is None else start.clone()
    for n in range(x.shape[-2] - 1, -1, -1) if reverse else range(x.shape[-2]):
        row = x[..., n, :]
        total = carry + row
        row.copy_(carry)
        carry = total
    return carry


def blocked_exclusive_prefix(x: Tensor) -> Tensor:
    """y[..., n, :] = Σ_{m<n} x[..., m, :] for x (..., N, M), for narrow rows (M small).

    (G, G) strictly-lower-triangular matmuls on groups of G = `PREFIX_GROUP` chunks, then a recursive prefix over
    the group totals: O(N·M·G) flops, where a single (N, N) matmul would be quadratic in N, and faster on CPU than
    torch.cumsum over a non-last axis. Chunk n reads later chunks only through exact zeros, so earlier outputs
    stay bit-identical when later tokens change.
    """
    n = x.shape[-2]
    if n <= PREFIX_GROUP:
        return strict_lower(n, x) @ x
    groups = math.ceil(n / PREFIX_GROUP)
    if groups * PREFIX_GROUP != n:
        x = F.pad(x, (0, 0, 0, groups * PREFIX_GROUP - n))
    grouped = x.reshape(x.shape[:-2] + (groups, PREFIX_GROUP, x.shape[-1]))
    within = strict_lower(PREFIX_GROUP, x) @ grouped
    before = blocked_exclusive_prefix(grouped.sum(-2))
    out = within.add_(before.unsqueeze(-2)).reshape(x.shape)  # in place: the matmul's backward does not need it
    return out[..., :n, :]


class PrefixSoftmax(NamedTuple):
    """The result of `prefix_softmax`; `scaled` and `denominator` are what its backward reads (None for the
    logcumsumexp form, which autograd differentiates)."""

    weights: Tensor
    lse_last: Tensor
    scaled: Tensor | None = None
    denominator: Tensor | None = None


def prefix_softmax(logits: Tensor, clamp: float | None, start_lse: Tensor | None, length: int) -> PrefixSoftmax:
    """exp(x_j) / Σ_{j'<=j} exp(x_j') over the last axis of (B, H, N), continuing a carried log-sum-exp.

    Returns the weights (B, H, N) and the log-sum-exp up to position `length` - 1 (B, H). With a clamp the logits
    are bounded, so exp(x - clamp) is a safe scale and the prefix sum runs in float64 (a (B, H, N) cumsum, cheap;
    torch.logcumsumexp is an order of magnitude slower on CPU). Without a clamp: logcumsumexp.
    """
    if clamp is not None and clamp <= EXP_PREFIX_MAX_CLAMP:
        scaled = torch.exp(logits - clamp)  # in [e^-2clamp, 1]; exactly 0 for masked logits
        denominator = scaled.double().cumsum(-1)
        if start_lse is not None:
            denominator = denominator + torch.exp(start_lse.double() - clamp)[..., None]
        # a prefix with no real source yet has denominator 0 (and numerator 0): give it weight 0, not NaN
        denominator = denominator.clamp_min(1e-300)
        weights = scaled / denominator.to(scaled.dtype).clamp_min(torch.finfo(scaled.dtype).tiny)
        lse_last = (denominator[..., length - 1].log() + clamp).to(logits.dtype).clamp_min(MASKED_LOGIT)
        return PrefixSoftmax(weights, lse_last, scaled, denominator)
    # logcumsumexp keeps the prefix softmax stable without a clamp and exactly causal
    lse = torch.logcumsumexp(logits, dim=-1)
    if start_lse is not None:
        lse = torch.logaddexp(lse, start_lse[..., None])
    return PrefixSoftmax(torch.exp(logits - lse), lse[..., length - 1])


def chunk_aggregate(qc: Tensor, before: Tensor, below: Tensor, vc: Tensor) -> Tensor:
    """Queries (B, H, N, C, d) @ earlier-chunk states (B, H, N, d, dv) + masked (C, C) scores @ values, as
    (B, H, N·C, dv).

    Without autograd the result is written straight into a fresh (B, H, N·C, dv) tensor (so the output is not a
    view, and a custom Function may return it); with autograd, out= is not allowed and a view is returned.
    """
    batch, heads, n_chunks, chunk, dim = qc.shape
    dim_v = vc.shape[-1]
    if torch.is_grad_enabled():
        return add_matmul_(qc @ before, below, vc).view(batch, heads, n_chunks * chunk, dim_v)
    out = qc.new_empty(batch, heads, n_chunks * chunk, dim_v)
    flat = out.view(-1, chunk, dim_v)
    torch.bmm(qc.reshape(-1, chunk, dim), before.reshape(-1, dim, dim_v), out=flat)
    flat.baddbmm_(below.reshape(-1, chunk, chunk), vc.reshape(-1, chunk, dim_v))
    return out


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """out_i = Σ_{j<=i} (q_i · k_j) v_j, chunked so that memory is linear in L.

    Within a chunk: a masked (C, C) score matrix. Across chunks: each chunk's kᵀv state (d, dv) and an exclusive
    prefix sum of those states. Never builds the (L, d, dv) prefix tensor. Computed in the promoted dtype of its
    inputs with autocast off, so that under mixed precision the in-place chunk ops see one dtype.

    Args: q, k: (B, H, L, d); v: (B, H, L, dv). Returns (B, H, L, dv).
    """
    with torch.autocast(q.device.type, enabled=False):
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        length = q.shape[-2]
        chunk = max(1, min(int(chunk_size), length))
        n_chunks = math.ceil(length / chunk)
        padded = n_chunks * chunk
        if padded != length:
            # Zero keys/values at the tail contribute nothing; their query rows are cropped below.
            pad = (0, 0, 0, padded - length)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        qc, kc, vc = in_chunks(q, chunk), in_chunks(k, chunk), in_chunks(v, chunk)
        states = kc.transpose(-2, -1) @ vc  # (B,H,N,d,dv): one state per chunk
        # exclusive prefix: chunk n sees the states of chunks < n
        before = exclusive_chunk_prefix(states.flatten(-2)).view_as(states)
        # intra-chunk masked scores, added onto the inter-chunk part inside the GEMM
        return chunk_aggregate(qc, before, (qc @ kc.transpose(-2, -1)).tril_(), vc)[:, :, :length]
