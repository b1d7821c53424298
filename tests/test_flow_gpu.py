"""Flow-Attention on a CUDA GPU: every backend against the dense reference, the Triton kernels against a masked
dense product, and half precision at L = 65536. Marked `gpu`: skipped, with that reason, where torch sees no GPU
(CI); run them on a GPU machine with `python -m pytest -m gpu tests/test_flow_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from flowformer.attention.flow import flow_attention
from flowformer.attention.reference import flow_attention_reference
from tests.test_flow_fast import gradients, random_inputs, relative_error

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _cuda(tensors, dtype=torch.float32):
    return [t.to(CUDA, dtype) for t in tensors]


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    # fp32 matmuls on the GPU may otherwise run in TF32 (torch's flag, set by some libraries): the fp32 tolerances
    # below hold the IEEE products
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [45, 300])
def test_cuda_backends_match_the_reference(backend, causal, length):
    if backend == "triton":
        pytest.importorskip("triton")
        if not causal:
            pytest.skip("backend='triton' replaces only the causal aggregation; the non-causal path is the eager one")
    q, k, v = random_inputs(2, 3, length, 32, value_dim=48, seed=20)
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[1, : length // 3] = True
    weights = torch.randn(2, 3, length, 48, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    run = lambda *t: flow_attention(*t, causal=causal, key_padding_mask=mask.to(CUDA), backend=backend)
    out, grads = gradients(run, _cuda((q, k, v)), weights.to(CUDA, torch.float32))
    ref, ref_grads = gradients(
        lambda *t: flow_attention_reference(*t, causal=causal, key_padding_mask=mask), (q, k, v), weights
    )
    assert relative_error(out.cpu().double(), ref) < 1e-5
    for got, expected in zip(grads, ref_grads):
        assert relative_error(got.cpu().double(), expected) < 1e-4


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("precision, tolerance", [("ieee", 1e-5), ("tf32", 5e-3)])
@pytest.mark.parametrize("block_t", [16, 32, 64])
def test_triton_kernels_match_the_masked_dense_product(reverse, precision, tolerance, block_t):
    pytest.importorskip("triton")
    from flowformer.attention.triton_causal import _launch

    # 1000 tokens: several blocks and a ragged last one; dv = 96 spans two column blocks, one of them ragged
    q, k, w = random_inputs(2, 3, 1000, 64, value_dim=96, seed=22)
    scores = q @ k.transpose(-2, -1)
    dense = (scores.triu() if reverse else scores.tril()) @ w
    got = _launch(*_cuda((q, k, w)), reverse=reverse, block_t=block_t, precision=precision)
    assert torch.isfinite(got).all()
    assert relative_error(got.cpu().double(), dense) < tolerance


def test_triton_backend_follows_the_eager_backend_in_bf16():
    pytest.importorskip("triton")
    q, k, v = _cuda(random_inputs(1, 8, 4096, 64, seed=23), torch.bfloat16)
    with torch.no_grad():
        eager = flow_attention(q, k, v, causal=True, backend="eager")
        fused = flow_attention(q, k, v, causal=True, backend="triton")
        exact = flow_attention(*(t.double() for t in (q, k, v)), causal=True)
    assert fused.dtype == torch.bfloat16
    # both round the output to bf16 (relative 2^-8); TF32 products add less than that
    assert relative_error(fused.double(), exact) < 1e-2
    assert relative_error(eager.double(), exact) < 1e-2


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_at_65536_on_the_gpu_is_finite(backend, dtype):
    if backend == "triton":
        pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(24)
    inputs = [torch.randn(1, 8, 65536, 64, generator=generator).to(CUDA, dtype).requires_grad_() for _ in range(3)]
    out = flow_attention(*inputs, causal=True, backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().sum().backward()
    for t in inputs:
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
