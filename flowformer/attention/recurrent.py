"""Recurrent (token-by-token) causal Flow-Attention, for autoregressive generation (language model, Decision
Transformer).

Causal Flow-Attention (official-settings.md §1.3) needs, at step t, only running sums over the tokens before it:
counts, Σ φ(k_j), Σ φ(q_i), Σ s_i φ(q_i), Σ o_j φ(k_j), the log-sum-exp of the conserved outgoing flows (for the
prefix softmax of the competition) and the (d, dv) sum Σ φ(k_j) c_j v_jᵀ. `FlowState` holds them: O(d·dv) per head,
whatever the length of the prefix.

    out, state = flow_attention_prefill(q, k, v)          # a prompt (B, H, L, d), chunked, in one call
    for t in ...:
        out_t, state = flow_attention_step(q_t, k_t, v_t, state)   # one token (B, H, d) -> (B, H, dv)

Feeding a sequence token by token gives the output of `flow_attention(..., causal=True)` on the whole sequence (up
to rounding); `tests/test_flow_recurrent.py` holds them equal. A prefill can also continue a state
(`flow_attention_prefill(..., state=state)`), so a long sequence can be processed in segments.

Padding: `padding_mask` (True = pad) marks tokens that are neither sinks nor sources, as in `flow_attention`; a padded
step returns 0 and leaves the state exactly unchanged, so left-padded prompts in a batch can be generated together.
The state is a plain tensor container: gradients flow through it, `detach()` cuts them (truncated backpropagation).
Beam search would need reordering along the batch axis: `state.select_batch(indices)`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from flowformer.attention.flow import (
    _MASKED_LOGIT,
    DEFAULT_CHUNK_SIZE,
    KERNELS,
    _causal_flow,
    _causal_flow_in_segments,
    _inference_segment,
    _prepare,
    feature_map,
)


@dataclass(frozen=True)
class FlowOptions:
    """The options of causal Flow-Attention that a state depends on (see `flow_attention`)."""

    competition: bool = True
    allocation: bool = True
    clamp: float | None = 1.0
    eps: float = 1e-6
    kernel: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown flow-attention kernel {self.kernel!r}; expected one of {KERNELS}")

    @property
    def core(self) -> dict:
        return {"competition": self.competition, "allocation": self.allocation, "clamp": self.clamp, "eps": self.eps}


@dataclass
class FlowState:
    """Running sums of causal Flow-Attention over a processed prefix (B batch rows, H heads).

    sinks, sources: (B,) number of real tokens so far (as sinks / as sources).
    q_sum, k_sum: (B, H, d) Σ φ(q_i), Σ φ(k_j).
    sq_sum: (B, H, d) Σ s_i φ(q_i), with s_i = n_i / I_i (feeds the conserved outgoing flow).
    ok_sum: (B, H, d) Σ o_j φ(k_j), with o_j = m_j / O_j (feeds the conserved incoming flow).
    lse: (B, H) log Σ_j exp(Ô_j) over the real sources (the prefix softmax of the competition); -1e30 when empty.
    kv: (B, H, d, dv) Σ φ(k_j) c_j v_jᵀ.
    options: the options the sums were made with; every later call must use the same.
    """

    sinks: Tensor
    sources: Tensor
    q_sum: Tensor
    k_sum: Tensor
    sq_sum: Tensor
    ok_sum: Tensor
    lse: Tensor
    kv: Tensor
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
            lse=torch.full((batch, heads), _MASKED_LOGIT, device=device, dtype=dtype),
            kv=zeros(batch, heads, dim, dim_v),
            options=options or FlowOptions(),
        )

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}

    def detach(self) -> FlowState:
        """The same sums without their autograd history."""
        return replace(self, **{name: t.detach() for name, t in self.tensors().items()})

    def select_batch(self, index: Tensor) -> FlowState:
        """Rows `index` (1-D long) of the batch, e.g. to reorder beams."""
        return replace(self, **{name: t.index_select(0, index) for name, t in self.tensors().items()})


def _options(competition, allocation, clamp, eps, kernel) -> FlowOptions:
    return FlowOptions(competition=competition, allocation=allocation, clamp=clamp, eps=eps, kernel=kernel)


def _check_state(state: FlowState, options: FlowOptions, batch: int, heads: int, dim: int, dim_v: int) -> None:
    if state.options != options:
        raise ValueError(
            f"this FlowState was built with {state.options}, but the call uses {options}; pass the same options "
            "to flow_attention_prefill and flow_attention_step"
        )
    if tuple(state.kv.shape) != (batch, heads, dim, dim_v):
        raise ValueError(
            f"FlowState holds kv of shape {tuple(state.kv.shape)}, but the inputs need (B, H, d, dv) = "
            f"{(batch, heads, dim, dim_v)}"
        )


def flow_attention_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    state: FlowState | None = None,
    padding_mask: Tensor | None = None,
    competition: bool = True,
    allocation: bool = True,
    clamp: float | None = 1.0,
    eps: float = 1e-6,
    kernel: str = "sigmoid",
    chunk_size: int | None = None,
) -> tuple[Tensor, FlowState]:
    """Causal Flow-Attention over a block of tokens (chunked), continuing `state`, returning the new state.

    Args:
        q, k: (B, H, L, d); v: (B, H, L, dv). `padding_mask`: (B, L) bool, True = padding.
        state: the state after the tokens before this block; None = start of the sequence.
        Other options as in `flow_attention`.
    Returns:
        out (B, H, L, dv) in the dtype of q (equal to `flow_attention(..., causal=True)` on the concatenation of
        every block so far, restricted to this block), and the state after the block.
    """
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"flow_attention_prefill expects q, k (B,H,L,d) and v (B,H,L,dv); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if padding_mask is not None and tuple(padding_mask.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"padding_mask must be (B, L) = {(q.shape[0], q.shape[2])}, got {tuple(padding_mask.shape)}")
    options = _options(competition, allocation, clamp, eps, kernel)
    batch, heads, _, dim = q.shape
    if state is not None:
        _check_state(state, options, batch, heads, dim, v.shape[-1])
    out_dtype = q.dtype
    chunk = int(chunk_size or DEFAULT_CHUNK_SIZE)
    # a long prompt without autograd runs in cache-sized segments, as in flow_attention
    segment = _inference_segment(q, k, v, chunk)
    q, k, v, q_real, k_real = _prepare(q, k, v, padding_mask, padding_mask, kernel, map_features=segment is None)
    initial = None if state is None else {name: t.to(q.dtype) for name, t in state.tensors().items()}
    if segment is None:
        out, sums = _causal_flow(
            q, k, v, q_real, k_real, chunk_size=chunk, initial=initial, return_state=True, **options.core
        )
    else:
        out, sums = _causal_flow_in_segments(
            q, k, v, q_real, k_real, kernel=kernel, segment=segment, chunk_size=chunk, initial=initial,
            return_state=True, **options.core,
        )
    if q_real is not None:
        out = out * q_real
    return out.to(out_dtype), FlowState(**sums, options=options)


def flow_attention_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    state: FlowState | None = None,
    *,
    padding_mask: Tensor | None = None,
    competition: bool = True,
    allocation: bool = True,
    clamp: float | None = 1.0,
    eps: float = 1e-6,
    kernel: str = "sigmoid",
) -> tuple[Tensor, FlowState]:
    """One token of causal Flow-Attention in O(d·dv) per head.

    Args:
        q_t, k_t: (B, H, d) (or (B, H, 1, d)); v_t: (B, H, dv) (or (B, H, 1, dv)): the new token, projected.
        state: the state after the previous tokens; None = first token.
        padding_mask: (B,) bool, True = this token is padding: its output is 0 and the state is left unchanged.
        Other options as in `flow_attention`.
    Returns:
        out_t (B, H, dv) (or (B, H, 1, dv), following q_t), in the dtype of q_t, and the updated state.
    """
    squeeze = q_t.dim() == 4
    if squeeze:
        if q_t.shape[2] != 1 or k_t.shape[2] != 1 or v_t.shape[2] != 1:
            raise ValueError(
                f"flow_attention_step takes one token; got length {q_t.shape[2]}. Use flow_attention_prefill for blocks."
            )
        q_t, k_t, v_t = q_t[:, :, 0], k_t[:, :, 0], v_t[:, :, 0]
    if q_t.dim() != 3 or q_t.shape != k_t.shape or v_t.shape[:2] != q_t.shape[:2]:
        raise ValueError(
            f"flow_attention_step expects q_t, k_t (B,H,d) and v_t (B,H,dv); got {tuple(q_t.shape)}, "
            f"{tuple(k_t.shape)}, {tuple(v_t.shape)}"
        )
    batch, heads, dim = q_t.shape
    dim_v = v_t.shape[-1]
    options = _options(competition, allocation, clamp, eps, kernel)
    out_dtype = q_t.dtype
    compute = torch.promote_types(q_t.dtype, torch.float32)
    if state is None:
        state = FlowState.empty(batch, heads, dim, dim_v, device=q_t.device, dtype=compute, options=options)
    _check_state(state, options, batch, heads, dim, dim_v)
    if padding_mask is not None and (padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (batch,)):
        raise ValueError(
            f"padding_mask must be a (B,) = ({batch},) bool tensor, got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    old = {name: t.to(compute) for name, t in state.tensors().items()}

    q = feature_map(q_t.to(compute), kernel)
    k = feature_map(k_t.to(compute), kernel)
    v = v_t.to(compute)
    sinks = old["sinks"] + 1  # (B,)
    sources = old["sources"] + 1
    n_sinks, n_sources = sinks[:, None], sources[:, None]  # (B, 1) against (B, H)

    def dot_shifted(x: Tensor, total: Tensor) -> Tensor:  # <x + ε, total + ε> over d: (B, H)
        return ((x + eps) * (total + eps)).sum(-1)

    q_sum, k_sum = old["q_sum"] + q, old["k_sum"] + k
    incoming = dot_shifted(q, k_sum)  # I_t over sources j <= t
    outgoing = dot_shifted(k, q_sum)  # O_t over sinks i <= t
    sink_scale, source_scale = n_sources / incoming, n_sinks / outgoing
    # Σ s_i q_i is needed only by the competition, Σ o_j k_j only by the allocation (as in the chunked path)
    sq_sum = old["sq_sum"] + sink_scale[..., None] * q if competition else old["sq_sum"]
    ok_sum = old["ok_sum"] + source_scale[..., None] * k if allocation else old["ok_sum"]
    lse = old["lse"]
    if competition:
        conserved_source = dot_shifted(k, sq_sum) / n_sinks
        if clamp is not None:
            conserved_source = conserved_source.clamp(-clamp, clamp)
        lse = torch.logaddexp(lse, conserved_source)
        weight = torch.exp(conserved_source - lse) * n_sources  # c_t = n · exp(Ô_t) / Σ_{j<=t} exp(Ô_j)
        weighted_v = v * weight[..., None]
    else:
        weighted_v = v
    kv = old["kv"] + k[..., :, None] * weighted_v[..., None, :]
    out = (q[..., None, :] @ kv).squeeze(-2)  # Σ_{j<=t} (q_t·k_j) c_j v_j
    if allocation:
        conserved_sink = dot_shifted(q, ok_sum) / n_sources
        out = out * (torch.sigmoid(conserved_sink) / incoming)[..., None]
    else:
        out = out / incoming[..., None]

    new = {"sinks": sinks, "sources": sources, "q_sum": q_sum, "k_sum": k_sum, "sq_sum": sq_sum, "ok_sum": ok_sum,
           "lse": lse, "kv": kv}
    if padding_mask is not None:
        # a padded token is neither a sink nor a source: keep every sum as it was (torch.where, not arithmetic with
        # zeroed features, so that not even a 0 * inf can reach the state)
        real = ~padding_mask.to(q.device)
        new = {name: torch.where(real.view((batch,) + (1,) * (t.dim() - 1)), t, old[name]) for name, t in new.items()}
        out = torch.where(real[:, None, None], out, torch.zeros_like(out))
    out = out.to(out_dtype)
    return (out[:, :, None] if squeeze else out), FlowState(**new, options=options)
