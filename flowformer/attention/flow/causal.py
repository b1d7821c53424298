"""Causal Flow-Attention, chunked: the forward pass (its backward is in `causal_backward.py`).

Nothing larger than (B, H, L, max(d, chunk)) is built, so memory is linear in L, where the official causal code
materialises a (B, H, L, d, dv) prefix sum of φ(k_j) v_jᵀ.

Each causal flow is a dot product with a prefix sum, q_i·Σ_{j<=i} k_j = Σ_{j<=i} q_i·k_j, read off the chunk's
(C, C) score matrix (which the aggregation needs anyway) plus a chunk-level state; the chunk-level states are
prefix-summed by the primitives of `chunks.py`. Only (B, H, L) scalars get a real cumsum: on CPU, torch.cumsum
along the sequence axis of an (L, d) tensor is slower than a matmul. Products that read the same tensor are
stacked into one. The result is exactly causal: earlier outputs are bit-identical whatever the later tokens.

A pass can continue from the running sums of an earlier one (`RunningSums`), which is how the recurrent mode
prefills a prompt and how CPU inference runs in cache-sized segments (`causal_flow_in_segments`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from flowformer.attention.flow.chunks import (
    MASKED_LOGIT,
    chunk_aggregate,
    chunk_offsets,
    exclusive_scan_,
    in_chunks,
    needs_grad,
    prefix_softmax,
    rows_per_cache_block,
    scalar_prefix,
    scans_in_place,
)
from flowformer.attention.flow.features import FlowInputs
from flowformer.attention.flow.options import FlowOptions


@dataclass(frozen=True)
class RunningSums:
    """Running sums of causal Flow-Attention over a processed prefix (B batch rows, H heads).

    sinks, sources: (B,) number of real tokens so far (as sinks / as sources).
    q_sum, k_sum: (B, H, d) Σ φ(q_i), Σ φ(k_j).
    sq_sum: (B, H, d) Σ s_i φ(q_i), with s_i = n_i / I_i (feeds the conserved outgoing flow).
    ok_sum: (B, H, d) Σ o_j φ(k_j), with o_j = m_j / O_j (feeds the conserved incoming flow).
    lse: (B, H) log Σ_j exp(Ô_j) over the real sources (the prefix softmax of the competition); -1e30 when empty.
    kv: (B, H, d, dv) Σ φ(k_j) c_j v_jᵀ.
    """

    sinks: Tensor
    sources: Tensor
    q_sum: Tensor
    k_sum: Tensor
    sq_sum: Tensor
    ok_sum: Tensor
    lse: Tensor
    kv: Tensor

    def tensors(self) -> dict[str, Tensor]:
        """The sums by name (the fields of `RunningSums`, whatever a subclass adds)."""
        return {f.name: getattr(self, f.name) for f in fields(RunningSums)}

    def to(self, dtype: torch.dtype) -> RunningSums:
        return RunningSums(**{name: t.to(dtype) for name, t in self.tensors().items()})


class CausalSaved(NamedTuple):
    """What the hand-written backward reads: the padded inputs and the forward's intermediates (None where an option
    is off). Vectors are (B, H, P) over the P padded positions; `before` etc. are chunk-level (B, H, N, ·)."""

    q: Tensor
    k: Tensor
    v: Tensor
    below: Tensor  # (B,H,N,C,C) lower-triangular scores
    above: Tensor  # (B,H,N,C,C) upper-triangular scores
    k_before: Tensor
    q_before: Tensor
    incoming: Tensor
    outgoing: Tensor
    sink_scale: Tensor
    source_scale: Tensor
    sinks_so_far: Tensor
    sources_so_far: Tensor
    gate_over_incoming: Tensor
    before: Tensor | None = None  # (B,H,N,d,dv) kv states of the earlier chunks
    out: Tensor | None = None  # (B,H,P,dv) the padded output
    conserved_source: Tensor | None = None
    competition_weights: Tensor | None = None
    sq_before: Tensor | None = None
    scaled: Tensor | None = None
    denominator: Tensor | None = None
    conserved_sink: Tensor | None = None
    ok_before: Tensor | None = None


class CausalResult(NamedTuple):
    out: Tensor  # (B, H, L, dv)
    sums: RunningSums | None  # after the pass, when asked for
    saved: CausalSaved | None  # for the backward, when asked for


class _Flows(NamedTuple):
    """The per-token flows of one pass: c v (B,H,P,dv), the lower-triangular scores, α / I (B,H,P), the sums that
    continue a later pass, and the backward's intermediates."""

    weighted_v: Tensor
    below: Tensor
    gate_over_incoming: Tensor
    sums: dict[str, Tensor]
    saved: CausalSaved | None


@dataclass(frozen=True)
class _Pass:
    """One causal pass over padded, feature-mapped tokens: q, k (B, H, P, d), v (B, H, P, dv), P a multiple of the
    chunk; `length` real positions (the tail is padding); the running counts n_i, m_i (B|1, 1|H, P); the key
    weights (B, 1, L, 1) or None; the carried sums or None."""

    q: Tensor
    k: Tensor
    v: Tensor
    chunk: int
    length: int
    sinks_so_far: Tensor
    sources_so_far: Tensor
    k_real: Tensor | None
    initial: RunningSums | None

    @property
    def tail(self) -> int:
        return self.q.shape[-2] - self.length

    def start(self, name: str) -> Tensor | None:
        """The carried-over (B, H, d) sum `name`, or None at the start of a sequence."""
        return None if self.initial is None else getattr(self.initial, name)


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


def _zero_tail(x: Tensor, tail: int) -> Tensor:
    return torch.cat([x[..., :-tail], x.new_zeros(x.shape[:-1] + (tail,))], dim=-1)


def _start_pass(x: FlowInputs, chunk_size: int, initial: RunningSums | None) -> _Pass:
    """Pad x to a whole number of chunks and count the real sinks and sources up to each position (the official
    code's `normal` = 1..L), continuing the counts of `initial`."""
    length = x.q.shape[-2]
    chunk = max(1, min(int(chunk_size), length))
    tail = math.ceil(length / chunk) * chunk - length
    q, k, v = x.q, x.k, x.v
    if tail:
        # Zero tokens at the tail: they add nothing to any prefix; their rows are cropped at the end.
        pad = (0, 0, 0, tail)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    sinks_so_far = _running_count(x.q_real, length, tail, q)
    sources_so_far = _running_count(x.k_real, length, tail, q)
    if initial is not None:
        sinks_so_far = sinks_so_far + initial.sinks[:, None, None]
        sources_so_far = sources_so_far + initial.sources[:, None, None]
    return _Pass(q, k, v, chunk, length, sinks_so_far.clamp_min(1), sources_so_far.clamp_min(1), x.k_real, initial)


def causal_pass(
    x: FlowInputs, options: FlowOptions, *, initial: RunningSums | None = None, keep_sums: bool = False,
    for_backward: bool = False, into: Tensor | None = None,
) -> CausalResult:
    """Causal flow attention over feature-mapped inputs x (L == S), continuing `initial`.

    keep_sums: also return the running sums after the pass. for_backward: also return what
    `causal_backward.CausalFlow` needs (the hand-written backward). into: a (B, H, L, dv) tensor (no autograd) that
    receives the output instead of a fresh tensor.
    """
    p = _start_pass(x, options.chunk, initial)
    qc, kc = in_chunks(p.q, p.chunk), in_chunks(p.k, p.chunk)
    flows = _causal_flows(p, qc @ kc.transpose(-2, -1), options, for_backward=for_backward)

    # (4) aggregation Σ_{j<=i} (q_i·k_j) c_j v_j
    vc = in_chunks(flows.weighted_v, p.chunk)
    states = kc.transpose(-2, -1) @ vc  # (B,H,N,d,dv): one kᵀ(cv) state per chunk
    kv_start = None if initial is None else initial.kv.flatten(-2)
    if scans_in_place(states.flatten(-2)):
        # the states are not needed afterwards: turn them into their prefixes in place, which saves an allocation
        # as large as the states, whose fresh pages cost more than the arithmetic on them
        kv_total = exclusive_scan_(states.flatten(-2), kv_start).view_as(states[:, :, 0])
        before = states
    else:
        before = chunk_offsets(states.flatten(-2), kv_start).view_as(states)
        kv_total = before[:, :, -1] + states[:, :, -1]  # the last prefix plus the last state
    del states
    out = chunk_aggregate(qc, before, flows.below, vc)
    gate = flows.gate_over_incoming
    if into is not None:
        # the gated rows go straight to the caller's tensor (a segment's slice): no copy of the result
        out = torch.mul(out[:, :, : p.length], gate[:, :, : p.length, None], out=into)
    else:
        out = out.mul_(gate[..., None])
    saved = None if flows.saved is None else flows.saved._replace(before=before, out=out)
    if p.tail and into is None:
        out = out[:, :, : p.length]
    sums = _final_sums(p, x, flows.sums, kv_total) if keep_sums else None
    return CausalResult(out, sums, saved)


def _final_sums(p: _Pass, x: FlowInputs, sums: dict[str, Tensor], kv: Tensor) -> RunningSums:
    """The running sums after pass p: those the flows kept, the rest counted here or carried over unchanged."""
    batch, heads, _, dim = p.q.shape

    def carried(name: str, fill: float, *shape: int) -> Tensor:  # a sum this pass's options did not need
        return p.start(name) if p.initial is not None else p.q.new_full(shape, fill)

    return RunningSums(
        sinks=_plus(_count_total(x.q_real, p.length, batch, p.q), p.start("sinks")),
        sources=_plus(_count_total(x.k_real, p.length, batch, p.q), p.start("sources")),
        q_sum=_plus(p.q.sum(-2), p.start("q_sum")),
        k_sum=_plus(p.k.sum(-2), p.start("k_sum")),
        sq_sum=sums["sq_sum"] if "sq_sum" in sums else carried("sq_sum", 0.0, batch, heads, dim),
        ok_sum=sums["ok_sum"] if "ok_sum" in sums else carried("ok_sum", 0.0, batch, heads, dim),
        lse=sums["lse"] if "lse" in sums else carried("lse", MASKED_LOGIT, batch, heads),
        kv=kv,
    )


def _causal_flows(p: _Pass, scores: Tensor, options: FlowOptions, *, for_backward: bool) -> _Flows:
    """The per-token flows of pass p, from the chunks' (B, H, N, C, C) scores (scores[t, u] = q_t·k_u), which it
    makes lower-triangular in place."""
    q, k, v, chunk, tail = p.q, p.k, p.v, p.chunk, p.tail
    batch, heads, padded, dim = q.shape
    n_chunks = padded // chunk
    eps, competition, allocation = options.eps, options.competition, options.allocation

    def flat(x: Tensor) -> Tensor:  # (B, H, N, C) -> (B, H, padded)
        return x.reshape(batch, heads, padded)

    def rows(x: Tensor) -> Tensor:  # (B, H, padded) -> (B, H, N, 1, C) row vectors, one per chunk
        return x.view(batch, heads, n_chunks, 1, chunk)

    # The per-token flows are memory-bound passes over (L, d) or (L, C) tensors, so products that read the same
    # tensor and do not depend on each other are stacked into one (r, ·) @ (·, ·) product: one pass instead of r.
    # Row vectors against a chunk, (1, d) @ (d, C), run at memory speed on CPU, unlike (C, d) @ (d, 1).
    def stacked_dots(vectors: list[Tensor], x: Tensor) -> list[Tensor]:  # [(B,H,N,d)] · x (B,H,N,C,d) -> [(B,H,P)]
        return [flat(r) for r in (torch.stack(vectors, dim=-2) @ x.transpose(-2, -1)).unbind(-2)]

    def stacked_sums(weights: list[Tensor], x: Tensor) -> list[Tensor]:  # Σ_{i in chunk} w_i x_i -> [(B,H,N,X)]
        stacked = torch.stack([w.view(batch, heads, n_chunks, chunk) for w in weights], dim=-2)  # (B,H,N,r,C)
        return list((stacked @ x).unbind(-2))

    qc, kc = in_chunks(q, chunk), in_chunks(k, chunk)
    # source u counts the sinks t <= u; sink t sees the sources u <= t (in place: the matmul does not need its
    # output for its backward)
    above = scores.triu()
    below = scores.tril_()
    del scores
    k_rows = k.sum(-1)  # Σ_d k_j: (B,H,padded)
    shift = dim * eps * eps

    # (1) I_i = <q_i+ε, K_i+ε> = q_i·K_i + ε Σ_d q_i + ε Σ_d K_i + dε², with K_i = Σ_{j<=i} k_j, and
    # q_i·K_i = Σ_{j<=i in the chunk} q_i·k_j + q_i·(Σ of earlier chunks). O_j likewise over sinks i <= j.
    k_before = chunk_offsets(kc.sum(-2), p.start("k_sum"))  # (B,H,N,d)
    earlier_k, q_rows = stacked_dots([k_before, torch.ones_like(k_before)], qc)  # q_rows = Σ_d q_i
    incoming = flat(below.sum(-1)) + earlier_k + eps * (q_rows + scalar_prefix(k_rows, p.start("k_sum"))) + shift
    sink_scale = p.sources_so_far / incoming  # s_i
    if tail:
        # tail rows must add exactly nothing to the running sums below (0 * inf would be NaN when eps = 0)
        sink_scale = _zero_tail(sink_scale, tail)
    # (2) with competition, the conserved source Ô_j = <k_j+ε, Σ_{i<=j} s_i q_i + ε> / m_j reads the same tensors
    # as O_j (q's chunk sums, the `above` scores, k): both flows come out of the same passes.
    sink_weights = [torch.ones_like(sink_scale)] + ([sink_scale] if competition else [])
    chunk_sums = stacked_sums(sink_weights, qc)  # Σ_{i in chunk} q_i (and s_i q_i), (B,H,N,d)
    q_before = chunk_offsets(chunk_sums[0], p.start("q_sum"))
    sq_before = chunk_offsets(chunk_sums[1], p.start("sq_sum")) if competition else None
    within = [flat(x) for x in stacked_sums(sink_weights, above)]  # Σ_{i<=j in the chunk} (s_i) q_i·k_j
    if not for_backward:
        del above  # only the backward reads it again
        above = None
    earlier_q = stacked_dots([q_before] + ([sq_before] if competition else []), kc)
    outgoing = within[0] + earlier_q[0] + eps * (k_rows + scalar_prefix(q_rows, p.start("q_sum"))) + shift
    source_scale = p.sinks_so_far / outgoing  # o_j
    if tail:
        source_scale = _zero_tail(source_scale, tail)
    sums: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}  # the backward's intermediates of the options that are on

    # (3) the conserved source, clamped, and its prefix softmax over the sources so far
    if competition:
        conserved_source = (
            within[1] + earlier_q[1] + eps * (k_rows + scalar_prefix(sink_scale * q_rows, p.start("sq_sum"))) + shift
        ) / p.sinks_so_far
        clamp = options.clamp
        logits = conserved_source if clamp is None else conserved_source.clamp(-clamp, clamp)
        if p.k_real is not None:
            logits = logits.masked_fill(F.pad(p.k_real.squeeze(-1), (0, tail), value=1.0) == 0, MASKED_LOGIT)
        softmax = prefix_softmax(logits, clamp, p.start("lse"), p.length)
        competition_weights = softmax.weights * p.sources_so_far  # c_j
        v = v * competition_weights[..., None]
        sums.update(sq_sum=_plus(chunk_sums[1].sum(2), p.start("sq_sum")), lse=softmax.lse_last)
        kept.update(conserved_source=conserved_source, competition_weights=competition_weights, sq_before=sq_before,
                    scaled=softmax.scaled, denominator=softmax.denominator)

    # (2)+(3) conserved sink Î_i = <q_i+ε, Σ_{j<=i} o_j k_j + ε> / n_i and the allocation of sinks
    if allocation:
        ok_chunks = (rows(source_scale) @ kc).squeeze(-2)  # Σ_{j in chunk} o_j k_j, (B,H,N,d)
        ok_before = chunk_offsets(ok_chunks, p.start("ok_sum"))
        conserved_sink = (
            flat(rows(source_scale) @ below.transpose(-2, -1))  # Σ_{j<=i in the chunk} o_j q_i·k_j
            + flat(ok_before.unsqueeze(-2) @ qc.transpose(-2, -1))
            + eps * (q_rows + scalar_prefix(source_scale * k_rows, p.start("ok_sum")))
            + shift
        ) / p.sources_so_far
        gate_over_incoming = torch.sigmoid(conserved_sink) / incoming
        sums.update(ok_sum=_plus(ok_chunks.sum(2), p.start("ok_sum")))
        kept.update(conserved_sink=conserved_sink, ok_before=ok_before)
    else:
        gate_over_incoming = 1.0 / incoming
    saved = None
    if for_backward:
        saved = CausalSaved(
            q, k, p.v, below, above, k_before, q_before, incoming, outgoing, sink_scale, source_scale,
            p.sinks_so_far, p.sources_so_far, gate_over_incoming, **kept,
        )
    return _Flows(v, below, gate_over_incoming, sums, saved)


def _plus(value: Tensor, start: Tensor | None) -> Tensor:
    """value + start, where a missing start (the beginning of a sequence) adds nothing."""
    return value if start is None else value + start


# A causal inference pass runs in segments of at least this many chunks (see `inference_segment`).
MIN_SEGMENT_CHUNKS = 8


def inference_segment(q: Tensor, k: Tensor, v: Tensor, chunk: int) -> int | None:
    """Tokens per segment for a causal pass without autograd on CPU, or None to run the sequence in one piece.

    Each of the causal path's ~20 passes over (L, d)- and (L, C)-sized tensors reads memory once per pass when the
    whole sequence is processed at once. In segments of ~`chunks.BLOCK_BYTES` per (B, H, segment, d) tensor, each
    continuing the running sums of the one before, the passes of a segment run in cache. Not with autograd (the
    hand-written backward needs the whole sequence's intermediates) and not on a GPU (there the passes are bound
    by kernel launches, which segments multiply).
    """
    if q.is_cuda or needs_grad(q, k, v):
        return None
    itemsize = torch.finfo(torch.promote_types(q.dtype, torch.float32)).bits // 8  # the compute dtype's
    segment = max(MIN_SEGMENT_CHUNKS, rows_per_cache_block(q, itemsize) // chunk) * chunk
    return segment if q.shape[-2] > segment else None


def causal_flow_in_segments(
    x: FlowInputs, options: FlowOptions, segment: int, *, initial: RunningSums | None = None, keep_sums: bool = False
) -> CausalResult:
    """Causal flow attention without autograd, `segment` tokens at a time (see `inference_segment`).

    x: inputs *before* the feature map (mapped=False), which is applied here segment by segment. Segment
    boundaries are multiples of the chunk size, so only the last segment has a padded tail, and the result equals
    the one-piece pass up to rounding (the running sums are added in a different order).
    """
    length = x.q.shape[-2]
    out = x.v.new_empty(x.q.shape[:-1] + x.v.shape[-1:])
    sums = initial
    for start in range(0, length, segment):
        rows = slice(start, min(start + segment, length))
        more = rows.stop < length
        sums = causal_pass(
            x.rows(rows, options.kernel), options, initial=sums, keep_sums=more or keep_sums, into=out[..., rows, :]
        ).sums
    return CausalResult(out, sums, None)

