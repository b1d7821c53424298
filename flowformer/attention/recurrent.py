"""Recurrent (token-by-token) causal Flow-Attention, for autoregressive generation (language model, Decision
Transformer).

Causal Flow-Attention (results/paper/official_code.md §1.3) needs, at step t, only running sums over the tokens
before it: counts, Σ φ(k_j), Σ φ(q_i), Σ s_i φ(q_i), Σ o_j φ(k_j), the log-sum-exp of the conserved outgoing flows
(for the prefix softmax of the competition) and the (d, dv) sum Σ φ(k_j) c_j v_jᵀ. `FlowState` holds them:
O(d·dv) per head, whatever the length of the prefix.

A model's attention module carries its options as `op.options` (a `FlowOptions`); pass the same object to both
calls, so that the steps compute what the module computed on the whole sequence:

    out, state = flow_attention_prefill(q, k, v, options=op.options)          # a prompt (B, H, L, d), chunked
    for t in ...:
        out_t, state = flow_attention_step(q_t, k_t, v_t, state, options=op.options)   # (B, H, d) -> (B, H, dv)

The options may also be given as keywords (`flow_attention_prefill(q, k, v, clamp=10.0)`), alone or on top of
`options=`. Feeding a sequence token by token gives the output of `flow_attention(..., causal=True)` on the whole
sequence (up to rounding); `tests/test_flow_recurrent.py` holds them equal. A prefill can also continue a state
(`flow_attention_prefill(..., state=state)`), so a long sequence can be processed in segments. Under autocast both
calls cast their inputs to the autocast dtype and keep the sums in fp32.

Padding: `padding_mask` (True = pad) marks tokens that are neither sinks nor sources, as in `flow_attention`; a padded
step returns 0 and leaves the state exactly unchanged, so left-padded prompts in a batch can be generated together.
The state is a plain tensor container: gradients flow through it, `detach()` cuts them (truncated backpropagation).
Beam search would need reordering along the batch axis: `state.select_batch(indices)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from flowformer.attention.flow import FlowOptions
from flowformer.attention.flow.api import compute_dtype
from flowformer.attention.flow.causal import RunningSums, causal_flow_in_segments, causal_pass, inference_segment
from flowformer.attention.flow.chunks import MASKED_LOGIT
from flowformer.attention.flow.features import feature_map, prepare
from flowformer.attention.precision import autocast_inputs

__all__ = ["FlowOptions", "FlowState", "flow_attention_prefill", "flow_attention_step"]


@dataclass(frozen=True)
class FlowState(RunningSums):
    """The running sums of `RunningSums` over a processed prefix, and the options they were made with (every later
    call must compute the same maths; chunk size and backend may differ)."""

    options: FlowOptions

    @classmethod
    def empty(
        cls,
        batch: int,
        heads: int,
        dim: int,
        dim_v: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        options: FlowOptions | None = None,
    ) -> FlowState:
        """The state before any token (equivalent to `state=None`)."""
        dtype = torch.promote_types(dtype, torch.float32)
        zeros = lambda *shape: torch.zeros(shape, device=device, dtype=dtype)
        return cls(
            sinks=zeros(batch),
            sources=zeros(batch),
            q_sum=zeros(batch, heads, dim),
            k_sum=zeros(batch, heads, dim),
            sq_sum=zeros(batch, heads, dim),
            ok_sum=zeros(batch, heads, dim),
            lse=torch.full((batch, heads), MASKED_LOGIT, device=device, dtype=dtype),
            kv=zeros(batch, heads, dim, dim_v),
            options=options or FlowOptions(),
        )

    def detach(self) -> FlowState:
        """The same sums without their autograd history."""
        return replace(self, **{name: t.detach() for name, t in self.tensors().items()})

    def select_batch(self, index: Tensor) -> FlowState:
        """Rows `index` (1-D long) of the batch, e.g. to reorder beams."""
        return replace(self, **{name: t.index_select(0, index) for name, t in self.tensors().items()})


def _check_state(state: FlowState, options: FlowOptions, shape: tuple[int, int, int, int]) -> None:
    """`shape`: the (B, H, d, dv) that the call's inputs need."""
    if not state.options.same_maths(options):
        raise ValueError(
            f"this FlowState was built with {state.options}, but the call uses {options}; pass the same options "
            "to flow_attention_prefill and flow_attention_step"
        )
    if tuple(state.kv.shape) != shape:
        raise ValueError(
            f"FlowState holds kv of shape {tuple(state.kv.shape)}, but the inputs need (B, H, d, dv) = {shape}"
        )


def flow_attention_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    state: FlowState | None = None,
    padding_mask: Tensor | None = None,
    options: FlowOptions | None = None,
    **flow_options: Any,
) -> tuple[Tensor, FlowState]:
    """Causal Flow-Attention over a block of tokens (chunked), continuing `state`, returning the new state.

    Args:
        q, k: (B, H, L, d); v: (B, H, L, dv). `padding_mask`: (B, L) bool, True = padding.
        state: the state after the tokens before this block; None = start of the sequence.
        options: a `FlowOptions` (e.g. a module's `.options`); keywords (`clamp=`, `chunk_size=`, ... as in
            `flow_attention`) override its fields, or the defaults without it.
    Returns:
        out (B, H, L, dv) in the dtype of q (equal to `flow_attention(..., causal=True)` on the concatenation of
        every block so far, restricted to this block), and the state after the block.
    """
    options = FlowOptions.resolve(options, flow_options)
    options.check_causal()
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"flow_attention_prefill expects q, k (B,H,L,d) and v (B,H,L,dv); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if padding_mask is not None and tuple(padding_mask.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"padding_mask must be (B, L) = {(q.shape[0], q.shape[2])}, got {tuple(padding_mask.shape)}")
    if state is not None:
        _check_state(state, options, (*q.shape[:2], q.shape[-1], v.shape[-1]))
    q, k, v = autocast_inputs(q, k, v)
    with torch.autocast(q.device.type, enabled=False):
        # a long prompt without autograd runs in cache-sized segments, as in flow_attention
        segment = inference_segment(q, k, v, options.chunk)
        x = prepare((q, k, v), (padding_mask, padding_mask), options.kernel, dtype=compute_dtype(q),
                    mapped=segment is None)
        initial = None if state is None else state.to(x.q.dtype)
        if segment is None:
            result = causal_pass(x, options, initial=initial, keep_sums=True)
        else:
            result = causal_flow_in_segments(x, options, segment, initial=initial, keep_sums=True)
        out = result.out if x.q_real is None else result.out * x.q_real
    return out.to(q.dtype), FlowState(**result.sums.tensors(), options=options)


def flow_attention_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    state: FlowState | None = None,
    *,
    padding_mask: Tensor | None = None,
    options: FlowOptions | None = None,
    **flow_options: Any,
) -> tuple[Tensor, FlowState]:
    """One token of causal Flow-Attention in O(d·dv) per head.

    Args:
        q_t, k_t: (B, H, d) (or (B, H, 1, d)); v_t: (B, H, dv) (or (B, H, 1, dv)): the new token, projected.
        state: the state after the previous tokens; None = first token.
        padding_mask: (B,) bool, True = this token is padding: its output is 0 and the state is left unchanged.
        options / keywords: as in `flow_attention_prefill`.
    Returns:
        out_t (B, H, dv) (or (B, H, 1, dv), following q_t), in the dtype of q_t, and the updated state.
    """
    options = FlowOptions.resolve(options, flow_options)
    options.check_causal()
    squeeze = q_t.dim() == 4
    if squeeze:
        if q_t.shape[2] != 1 or k_t.shape[2] != 1 or v_t.shape[2] != 1:
            raise ValueError(
                f"flow_attention_step takes one token; got length {q_t.shape[2]}. "
                "Use flow_attention_prefill for blocks."
            )
        q_t, k_t, v_t = q_t[:, :, 0], k_t[:, :, 0], v_t[:, :, 0]
    if q_t.dim() != 3 or q_t.shape != k_t.shape or v_t.shape[:2] != q_t.shape[:2]:
        raise ValueError(
            f"flow_attention_step expects q_t, k_t (B,H,d) and v_t (B,H,dv); got {tuple(q_t.shape)}, "
            f"{tuple(k_t.shape)}, {tuple(v_t.shape)}"
        )
    batch, heads, dim = q_t.shape
    dim_v = v_t.shape[-1]
    q_t, k_t, v_t = autocast_inputs(q_t, k_t, v_t)
    compute = compute_dtype(q_t)
    if state is None:
        state = FlowState.empty(batch, heads, dim, dim_v, device=q_t.device, dtype=compute, options=options)
    _check_state(state, options, (batch, heads, dim, dim_v))
    if padding_mask is not None and (padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (batch,)):
        raise ValueError(
            f"padding_mask must be a (B,) = ({batch},) bool tensor, "
            f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    with torch.autocast(q_t.device.type, enabled=False):
        old = state.to(compute)
        new, out = _step(old, q_t.to(compute), k_t.to(compute), v_t.to(compute), options)
        if padding_mask is not None:
            # a padded token is neither a sink nor a source: keep every sum as it was (torch.where, not arithmetic
            # with zeroed features, so that not even a 0 * inf can reach the state)
            real = ~padding_mask.to(q_t.device)
            kept = old.tensors()
            new = RunningSums(**{name: torch.where(real.view((batch,) + (1,) * (t.dim() - 1)), t, kept[name])
                                 for name, t in new.tensors().items()})
            out = torch.where(real[:, None, None], out, torch.zeros_like(out))
    out = out.to(q_t.dtype)
    return (out[:, :, None] if squeeze else out), FlowState(**new.tensors(), options=options)


def _step(old: RunningSums, q_t: Tensor, k_t: Tensor, v_t: Tensor, options: FlowOptions) -> tuple[RunningSums, Tensor]:
    """The sums after one more token, and its output (B, H, dv), in the dtype of the inputs."""
    eps, competition, allocation = options.eps, options.competition, options.allocation
    q, k, v = feature_map(q_t, options.kernel), feature_map(k_t, options.kernel), v_t
    sinks, sources = old.sinks + 1, old.sources + 1  # (B,)
    n_sinks, n_sources = sinks[:, None], sources[:, None]  # (B, 1) against (B, H)

    def dot_shifted(x: Tensor, total: Tensor) -> Tensor:  # <x + ε, total + ε> over d: (B, H)
        return ((x + eps) * (total + eps)).sum(-1)

    q_sum, k_sum = old.q_sum + q, old.k_sum + k
    incoming = dot_shifted(q, k_sum)  # I_t over sources j <= t
    outgoing = dot_shifted(k, q_sum)  # O_t over sinks i <= t
    sink_scale, source_scale = n_sources / incoming, n_sinks / outgoing
    # Σ s_i q_i is needed only by the competition, Σ o_j k_j only by the allocation (as in the chunked path)
    sq_sum = old.sq_sum + sink_scale[..., None] * q if competition else old.sq_sum
    ok_sum = old.ok_sum + source_scale[..., None] * k if allocation else old.ok_sum
    lse = old.lse
    if competition:
        conserved_source = dot_shifted(k, sq_sum) / n_sinks
        if options.clamp is not None:
            conserved_source = conserved_source.clamp(-options.clamp, options.clamp)
        lse = torch.logaddexp(lse, conserved_source)
        weight = torch.exp(conserved_source - lse) * n_sources  # c_t = n · exp(Ô_t) / Σ_{j<=t} exp(Ô_j)
        v = v * weight[..., None]
    kv = old.kv + k[..., :, None] * v[..., None, :]
    out = (q[..., None, :] @ kv).squeeze(-2)  # Σ_{j<=t} (q_t·k_j) c_j v_j
    if allocation:
        conserved_sink = dot_shifted(q, ok_sum) / n_sources
        out = out * (torch.sigmoid(conserved_sink) / incoming)[..., None]
    else:
        out = out / incoming[..., None]
    return RunningSums(sinks, sources, q_sum, k_sum, sq_sum, ok_sum, lse, kv), out
