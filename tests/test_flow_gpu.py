"""Flow-Attention on a CUDA GPU: both non-causal backends and the causal path against the dense reference, and half
precision at L = 65536. Marked `gpu`: skipped, with that reason, where torch sees no GPU (CI); run them on a GPU
machine with `python -m pytest -m gpu tests/test_flow_gpu.py tests/test_attention_autocast.py`."""

from __future__ import annotations

import pytest
import torch

from flowformer.attention import flow_attention
from flowformer.attention.reference import flow_attention_reference
from tests.helpers import gradients, random_qkv, relative_error

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


@pytest.mark.parametrize("backend", ["blocked", "batched"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [45, 300])
def test_cuda_backends_match_the_reference(backend, causal, length):
    q, k, v = random_qkv(2, 3, length, 32, value_dim=48, seed=20)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batched_runs_in_the_input_dtype_and_follows_fp64(dtype):
    q, k, v = _cuda(random_qkv(1, 8, 4096, 64, seed=23), dtype)
    with torch.no_grad():
        out = flow_attention(q, k, v, backend="batched")
        exact = flow_attention(*(t.double() for t in (q, k, v)))
    assert out.dtype == dtype
    # the output is rounded to the half type (2^-8 relative for bf16); the flows in between are kept in fp32
    assert relative_error(out.double(), exact) < 1e-2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_at_65536_on_the_gpu_is_finite(causal, dtype):
    generator = torch.Generator().manual_seed(24)
    inputs = [torch.randn(1, 8, 65536, 64, generator=generator).to(CUDA, dtype).requires_grad_() for _ in range(3)]
    out = flow_attention(*inputs, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().sum().backward()
    for t in inputs:
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
