"""Fused Triton kernel for the causal aggregation of Flow-Attention: out_i = Σ_{j<=i} (q_i·k_j) w_j.

Used by `flow_attention(..., causal=True, backend="triton")` for step (4) of the causal path (the per-token flows
stay in PyTorch). One program per (batch·head, block of value columns) walks the sequence in blocks of T tokens,
keeping the running (d, dv) state Σ k_jᵀ w_j in registers: per block it computes the masked (T, T) scores, the
intra-block part and the contribution of the state, then adds the block to the state. Nothing larger than the
inputs is ever written to memory. The backward is three launches of the same kernel:
    dq_i = Σ_{j<=i} (g_i·w_j) k_j          (forward direction: a=g, b=w, values=k)
    dk_j = Σ_{i>=j} (w_j·g_i) q_i          (reverse direction: a=w, b=g, values=q)
    dw_j = Σ_{i>=j} (q_i·k_j) g_i          (reverse direction: a=k, b=q, values=g)
Matmuls use IEEE fp32 (`input_precision="ieee"`), so results match the eager path to fp32 rounding.

Status: correctness-first. It is tested on CPU through the Triton interpreter (TRITON_INTERPRET=1, slow tests in
tests/test_flow_fast.py); no GPU was available to this work, so it has never been timed on one and is off by
default. Its parallelism is B·H·⌈dv/64⌉ programs, each sequential over L: fine for training batches, poor for
B·H small and L large, where a chunk-parallel form (states in parallel, then a prefix) would be needed.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

_KERNELS: dict[bool, object] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def check_triton_usable(like: Tensor) -> None:
    """Raise a clear error when backend='triton' cannot run on tensors like `like`."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "flow_attention(backend='triton') needs the `triton` package (pip install triton); "
            "use backend='eager' instead"
        ) from error
    if not like.is_cuda and not _interpreting():
        raise RuntimeError(
            f"flow_attention(backend='triton') runs on CUDA tensors (got device {like.device}); on CPU use "
            "backend='eager', or set TRITON_INTERPRET=1 before the first call to run the kernel in Triton's "
            "(slow) interpreter, as the tests do"
        )


def _kernel():
    """The jitted kernel, built on first use: Triton decides between compiled and interpreted at decoration time,
    so building it lazily lets TRITON_INTERPRET be set any time before the first call. (The kernel calls no
    @triton.jit helper such as tl.cdiv or tl.zeros: those are decorated when triton.language is imported, and would stay
    compiled-mode if triton was imported before TRITON_INTERPRET was set.)"""
    interpret = _interpreting()
    if interpret in _KERNELS:
        return _KERNELS[interpret]
    import triton
    import triton.language as tl

    @triton.jit
    def causal_aggregate(
        a_ptr, b_ptr, w_ptr, out_ptr,
        length, n_blocks, dim, dim_w,
        stride_a_bh, stride_a_l, stride_b_bh, stride_b_l, stride_w_bh, stride_w_l, stride_o_bh, stride_o_l,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, REVERSE: tl.constexpr,
    ):
        # out_r = Σ_{c allowed} (a_r·b_c) w_c with c <= r (forward) or c >= r (REVERSE)
        bh = tl.program_id(0)
        col_block = tl.program_id(1)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        offs_w = col_block * BLOCK_W + tl.arange(0, BLOCK_W)
        d_ok = offs_d < dim
        w_ok = offs_w < dim_w
        if REVERSE:
            keep = offs_t[:, None] <= offs_t[None, :]
        else:
            keep = offs_t[:, None] >= offs_t[None, :]
        state = tl.full((BLOCK_D, BLOCK_W), 0.0, tl.float32)
        for step in range(n_blocks):
            if REVERSE:
                block = n_blocks - 1 - step
            else:
                block = step
            rows = block * BLOCK_T + offs_t
            rows_ok = rows < length
            a = tl.load(
                a_ptr + bh * stride_a_bh + rows[:, None] * stride_a_l + offs_d[None, :],
                mask=rows_ok[:, None] & d_ok[None, :], other=0.0,
            )
            b = tl.load(
                b_ptr + bh * stride_b_bh + rows[:, None] * stride_b_l + offs_d[None, :],
                mask=rows_ok[:, None] & d_ok[None, :], other=0.0,
            )
            w = tl.load(
                w_ptr + bh * stride_w_bh + rows[:, None] * stride_w_l + offs_w[None, :],
                mask=rows_ok[:, None] & w_ok[None, :], other=0.0,
            )
            scores = tl.dot(a, tl.trans(b), input_precision="ieee")
            scores = tl.where(keep, scores, 0.0)
            out = tl.dot(scores, w, input_precision="ieee") + tl.dot(a, state, input_precision="ieee")
            tl.store(
                out_ptr + bh * stride_o_bh + rows[:, None] * stride_o_l + offs_w[None, :],
                out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & w_ok[None, :],
            )
            state += tl.dot(tl.trans(b), w, input_precision="ieee")

    _KERNELS[interpret] = causal_aggregate
    return causal_aggregate


def _next_power_of_two(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(1, n) - 1).bit_length())


def _launch(a: Tensor, b: Tensor, w: Tensor, *, reverse: bool, block_t: int) -> Tensor:
    """a, b: (B, H, L, D); w: (B, H, L, Dw) -> (B, H, L, Dw), fp32 accumulation."""
    batch, heads, length, dim = a.shape
    dim_w = w.shape[-1]
    a, b, w = (t.reshape(batch * heads, length, t.shape[-1]).contiguous() for t in (a, b, w))
    result = torch.empty(batch, heads, length, dim_w, device=w.device, dtype=w.dtype)
    out = result.view(batch * heads, length, dim_w)
    block_w = min(64, _next_power_of_two(dim_w))
    grid = (batch * heads, -(-dim_w // block_w))
    _kernel()[grid](
        a, b, w, out,
        length, -(-length // block_t), dim, dim_w,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_D=_next_power_of_two(dim), BLOCK_W=block_w, REVERSE=reverse,
    )
    return result


class _TritonCausalAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, w, block_t):
        ctx.save_for_backward(q, k, w)
        ctx.block_t = block_t
        return _launch(q, k, w, reverse=False, block_t=block_t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, w = ctx.saved_tensors
        grad = grad.contiguous()
        block_t = ctx.block_t
        grad_q = _launch(grad, w, k, reverse=False, block_t=block_t)
        grad_k = _launch(w, grad, q, reverse=True, block_t=block_t)
        grad_w = _launch(k, q, grad, reverse=True, block_t=block_t)
        return grad_q, grad_k, grad_w, None


def causal_linear_attention_triton(q: Tensor, k: Tensor, w: Tensor, *, block_size: int = 64) -> Tensor:
    """out_i = Σ_{j<=i} (q_i·k_j) w_j with the fused kernel (forward and backward).

    Args: q, k: (B, H, L, d); w: (B, H, L, dv), same dtype and device (CUDA, or CPU under TRITON_INTERPRET=1).
        block_size: tokens per block (a power of two >= 16).
    Returns: (B, H, L, dv).
    """
    check_triton_usable(q)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (Triton's dot needs 16), got {block_size}")
    return _TritonCausalAggregate.apply(q, k, w, block_size)
