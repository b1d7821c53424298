"""The non-causal backends of Flow-Attention: "batched" (the GPU form, forced on CPU here) against the dense
reference, forward and gradients, with every option set and padding; "auto" picks by device; "blocked" and
"batched" agree on strided fp32 inputs; the batched form keeps half precision inputs in their dtype and stays
accurate at lengths where unnormalised flows would leave fp16's range."""

from __future__ import annotations

import types

import pytest
import torch

from flowformer.attention import flow_attention
from flowformer.attention.flow import resolve_backend
from flowformer.attention.reference import flow_attention_reference
from tests.helpers import FLOW_OPTION_SETS, gradients, random_qkv, relative_error


def padding_masks(batch: int, length: int, source_length: int) -> dict:
    key_mask = torch.zeros(batch, source_length, dtype=torch.bool)
    key_mask[1, source_length - 5:] = True
    query_mask = torch.zeros(batch, length, dtype=torch.bool)
    query_mask[0, :4] = True  # left padding
    return {"key_padding_mask": key_mask, "query_padding_mask": query_mask}


@pytest.mark.parametrize("options", FLOW_OPTION_SETS + [{"competition_over": "heads", "kernel": "relu", "clamp": None}])
@pytest.mark.parametrize("masked", [False, True])
def test_batched_matches_the_reference(options, masked):
    q, k, v = random_qkv(2, 3, 13, 5, source_length=17, value_dim=4)
    masks = padding_masks(2, 13, 17) if masked else {}
    weights = torch.randn(2, 3, 13, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out, grads = gradients(lambda *t: flow_attention(*t, backend="batched", **options, **masks), (q, k, v), weights)
    ref, ref_grads = gradients(lambda *t: flow_attention_reference(*t, **options, **masks), (q, k, v), weights)
    assert relative_error(out, ref) < 1e-12
    for got, expected in zip(grads, ref_grads):
        assert relative_error(got, expected) < 1e-10


def test_auto_picks_by_device_length_and_autograd():
    def keys(length, grad=False, cuda=False):
        if cuda:
            return types.SimpleNamespace(is_cuda=True, shape=(1, 1, length, 2), requires_grad=grad)
        return torch.zeros(1, 1, length, 2, device="meta", requires_grad=grad)

    assert resolve_backend("auto", *[keys(4096, cuda=True)] * 3) == "batched"
    assert resolve_backend("auto", *[keys(4096)] * 3) == "batched"  # CPU inference in the measured range
    assert resolve_backend("auto", *[keys(4096, grad=True)] * 3) == "blocked"  # CPU training
    assert resolve_backend("auto", *[keys(100)] * 3) == "blocked"
    assert resolve_backend("auto", *[keys(16384)] * 3) == "blocked"
    half = torch.zeros(1, 1, 4096, 2, device="meta", dtype=torch.bfloat16)
    assert resolve_backend("auto", half, half, half) == "blocked"  # flows in fp32 on a CPU
    assert resolve_backend("batched", *[keys(100, grad=True)] * 3) == "batched"
    q, k, v = random_qkv(1, 2, 30, 8)
    torch.testing.assert_close(flow_attention(q, k, v, backend="auto"), flow_attention(q, k, v, backend="blocked"))


def test_blocked_equals_batched_on_strided_inputs():
    # heads taken from a (B, L, H, d) projection: rows and heads are strided, the last dimension contiguous
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 300, 4, 64, generator=generator).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[0, 250:] = True
    for options in ({}, {"kernel": "relu", "clamp": 5.0}):
        blocked = flow_attention(q, k, v, key_padding_mask=mask, backend="blocked", **options)
        batched = flow_attention(q, k, v, key_padding_mask=mask, backend="batched", **options)
        assert relative_error(batched, blocked) < 2e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batched_keeps_half_precision_and_stays_accurate_at_length(dtype):
    # at S = 8192 and d = 16, s = 1/I is about 3e-5, below fp16's smallest normal number, and Σ_j φ(k_j) v_jᵀ
    # grows with S: the batched form normalises every flow by its token count instead
    q, k, v = random_qkv(1, 2, 8192, 16, dtype=dtype, seed=4)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = flow_attention(*inputs, backend="batched")
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in inputs)
    exact = flow_attention(*(t.detach().double() for t in inputs), backend="blocked")
    assert relative_error(out.double(), exact) < 2e-2
