"""Fused Triton kernels for the causal aggregation of Flow-Attention: out_i = Σ_{j<=i} (q_i·k_j) w_j.

Used by `flow_attention(..., causal=True, backend="triton")` for step (4) of the causal path (the per-token flows
stay in PyTorch). The sequence is cut into blocks of T tokens and every block is handled by its own program, so
a long sequence fills the GPU even at batch 1 (a kernel that walked the sequence with a running state had only
B·H programs: 8 of the H100's 132 multiprocessors at B=1, H=8). Three steps, all parallel over blocks:
    1. `block_states`: S_n = K_nᵀ W_n, one (d, dv) fp32 state per block;
    2. `torch.cumsum_` over the blocks, in place: the state of everything up to and including block n;
    3. `block_outputs`: out_n = tril(Q_n K_nᵀ) W_n + Q_n (state up to block n-1).
Nothing larger than the (B·H, L/T, d, dv) states is written, the same memory as the eager chunked path.

The backward runs the same two kernels three times, in both directions (REVERSE walks the blocks from the end and
keeps the upper triangle):
    dq_i = Σ_{j<=i} (g_i·w_j) k_j          (forward direction: a=g, b=w, values=k)
    dk_j = Σ_{i>=j} (w_j·g_i) q_i          (reverse direction: a=w, b=g, values=q)
    dw_j = Σ_{i>=j} (q_i·k_j) g_i          (reverse direction: a=k, b=q, values=g)

Precision: inputs arrive in fp32 (flow_attention computes its flows in fp32). Their products use IEEE fp32
(`precision="ieee"`, equal to the eager path to fp32 rounding) unless the caller allows TF32
(`precision="tf32"`), which flow_attention does for bf16/fp16 inputs, whose own rounding is coarser than TF32's.
Accumulation is fp32 either way.

Tested on CPU through the Triton interpreter (TRITON_INTERPRET=1, slow tests in tests/test_flow_fast.py) and on a
CUDA GPU (tests/test_flow_gpu.py, marked gpu); timed by `make bench-gpu`. Measured on an H100 (B=1, H=8, d=64,
results/bench/efficiency_cuda_*.md): in bf16 (TF32 products) it is within 10% of the eager backend, e.g. 4.7 vs
5.1 ms forward and 13.7 vs 12.8 ms forward+backward at L=65536, because the per-token flows around it, not the
aggregation, set the time; in fp32, with IEEE products, the whole call is 4x slower than eager (20.9 vs 4.8 ms
forward at 65536).
So it stays off by default, and backend="auto" picks eager.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

PRECISIONS = ("ieee", "tf32")
BLOCK_SIZES = (16, 32, 64)
_KERNELS: dict[bool, tuple] = {}


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


def _kernels():
    """The two jitted kernels, built on first use: Triton decides between compiled and interpreted at decoration
    time, so building them lazily lets TRITON_INTERPRET be set any time before the first call. (The kernels call no
    @triton.jit helper such as tl.cdiv or tl.zeros: those are decorated when triton.language is imported, and would
    stay compiled-mode if triton was imported before TRITON_INTERPRET was set.)"""
    interpret = _interpreting()
    if interpret in _KERNELS:
        return _KERNELS[interpret]
    import triton
    import triton.language as tl

    @triton.jit
    def block_states(
        b_ptr, w_ptr, s_ptr,
        length, n_blocks, dim, dim_w,
        stride_b_bh, stride_b_l, stride_w_bh, stride_w_l, stride_s_bh, stride_s_n, stride_s_d,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, REVERSE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # S[slot] = Σ_{c in block} b_cᵀ w_c; REVERSE stores block n at slot N-1-n, so that a cumsum over the
        # slots gives suffix sums
        bh = tl.program_id(0)
        block = tl.program_id(1)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        offs_w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        d_ok = offs_d < dim
        w_ok = offs_w < dim_w
        rows = block * BLOCK_T + offs_t
        rows_ok = rows < length
        b = tl.load(
            b_ptr + bh * stride_b_bh + rows[:, None] * stride_b_l + offs_d[None, :],
            mask=rows_ok[:, None] & d_ok[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + bh * stride_w_bh + rows[:, None] * stride_w_l + offs_w[None, :],
            mask=rows_ok[:, None] & w_ok[None, :], other=0.0,
        )
        state = tl.dot(tl.trans(b), w, input_precision=PRECISION)
        if REVERSE:
            slot = n_blocks - 1 - block
        else:
            slot = block
        tl.store(
            s_ptr + bh * stride_s_bh + slot * stride_s_n + offs_d[:, None] * stride_s_d + offs_w[None, :],
            state, mask=d_ok[:, None] & w_ok[None, :],
        )

    @triton.jit
    def block_outputs(
        a_ptr, b_ptr, w_ptr, s_ptr, out_ptr,
        length, n_blocks, dim, dim_w,
        stride_a_bh, stride_a_l, stride_b_bh, stride_b_l, stride_w_bh, stride_w_l,
        stride_s_bh, stride_s_n, stride_s_d, stride_o_bh, stride_o_l,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, REVERSE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # out_r = Σ_{c in block, c <= r (c >= r if REVERSE)} (a_r·b_c) w_c + a_r · (summed state of earlier blocks)
        bh = tl.program_id(0)
        block = tl.program_id(1)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        offs_w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        d_ok = offs_d < dim
        w_ok = offs_w < dim_w
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
        if REVERSE:
            keep = offs_t[:, None] <= offs_t[None, :]
            slot = n_blocks - 1 - block
        else:
            keep = offs_t[:, None] >= offs_t[None, :]
            slot = block
        scores = tl.dot(a, tl.trans(b), input_precision=PRECISION)
        scores = tl.where(keep, scores, 0.0)
        # the cumsum left slot s holding the blocks up to and including s: the earlier blocks are slot s-1,
        # absent (masked to 0) for the first block. (The slot test is broadcast to a tensor: the interpreter
        # rejects a scalar term in a mask.)
        earlier = tl.load(
            s_ptr + bh * stride_s_bh + (slot - 1) * stride_s_n + offs_d[:, None] * stride_s_d + offs_w[None, :],
            mask=(offs_d[:, None] * 0 + slot > 0) & d_ok[:, None] & w_ok[None, :], other=0.0,
        )
        out = tl.dot(scores, w, input_precision=PRECISION) + tl.dot(a, earlier, input_precision=PRECISION)
        tl.store(
            out_ptr + bh * stride_o_bh + rows[:, None] * stride_o_l + offs_w[None, :],
            out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & w_ok[None, :],
        )

    _KERNELS[interpret] = (block_states, block_outputs)
    return _KERNELS[interpret]


def _next_power_of_two(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(1, n) - 1).bit_length())


def _launch(a: Tensor, b: Tensor, w: Tensor, *, reverse: bool, block_t: int, precision: str = "ieee") -> Tensor:
    """out_r = Σ_{c<=r} (a_r·b_c) w_c (c >= r when `reverse`). a, b: (B, H, L, D); w: (B, H, L, Dw) -> (B, H, L, Dw)."""
    batch, heads, length, dim = a.shape
    dim_w = w.shape[-1]
    a, b, w = (t.reshape(batch * heads, length, t.shape[-1]).contiguous() for t in (a, b, w))
    result = torch.empty(batch, heads, length, dim_w, device=w.device, dtype=w.dtype)
    out = result.view(batch * heads, length, dim_w)
    n_blocks = -(-length // block_t)
    states = torch.empty(batch * heads, n_blocks, dim, dim_w, device=w.device, dtype=torch.float32)
    block_d = _next_power_of_two(dim)
    block_w = min(64, _next_power_of_two(dim_w))
    grid = (batch * heads, n_blocks, -(-dim_w // block_w))
    sizes = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_W=block_w, REVERSE=reverse, PRECISION=precision)
    block_states, block_outputs = _kernels()
    block_states[grid](
        b, w, states, length, n_blocks, dim, dim_w,
        b.stride(0), b.stride(1), w.stride(0), w.stride(1), states.stride(0), states.stride(1), states.stride(2),
        **sizes,
    )
    states.cumsum_(dim=1)  # in place: no second (B·H, N, d, dv) buffer
    block_outputs[grid](
        a, b, w, states, out, length, n_blocks, dim, dim_w,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), w.stride(0), w.stride(1),
        states.stride(0), states.stride(1), states.stride(2), out.stride(0), out.stride(1),
        **sizes,
    )
    return result


class _TritonCausalAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, w, block_t, precision):
        ctx.save_for_backward(q, k, w)
        ctx.block_t, ctx.precision = block_t, precision
        return _launch(q, k, w, reverse=False, block_t=block_t, precision=precision)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, w = ctx.saved_tensors
        grad = grad.contiguous()
        options = {"block_t": ctx.block_t, "precision": ctx.precision}
        grad_q = _launch(grad, w, k, reverse=False, **options)
        grad_k = _launch(w, grad, q, reverse=True, **options)
        grad_w = _launch(k, q, grad, reverse=True, **options)
        return grad_q, grad_k, grad_w, None, None


def causal_linear_attention_triton(
    q: Tensor, k: Tensor, w: Tensor, *, block_size: int = 64, precision: str = "ieee"
) -> Tensor:
    """out_i = Σ_{j<=i} (q_i·k_j) w_j with the fused kernels (forward and backward).

    Args: q, k: (B, H, L, d); w: (B, H, L, dv), same dtype and device (CUDA, or CPU under TRITON_INTERPRET=1).
        block_size: tokens per block, one of `BLOCK_SIZES`.
        precision: "ieee" (exact fp32 products) or "tf32" (tensor cores; ~1e-3 relative error per product).
    Returns: (B, H, L, dv).
    """
    check_triton_usable(q)
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block_size must be one of {BLOCK_SIZES} (Triton's dot needs 16 rows; at 128 the fp32 tiles outgrow the "
            f"registers, and a test at 128 did not finish in minutes on an H100), got {block_size}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return _TritonCausalAggregate.apply(q, k, w, block_size, precision)
