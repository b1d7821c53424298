"""Flow-Attention against its dense reference: forward, gradients, masks, causality, ablations, options."""

from __future__ import annotations

import pytest
import torch

from flowformer.attention import causal_linear_attention, flow_attention
from flowformer.attention.reference import flow_attention_reference, official_causal_flow, official_noncausal_flow
from tests.helpers import random_qkv, relative_error


@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_official_formulation(causal):
    q, k, v = random_qkv(2, 3, 50, 16, dtype=torch.float64)
    expected = (official_causal_flow if causal else official_noncausal_flow)(q, k, v)
    assert relative_error(flow_attention(q, k, v, causal=causal, chunk_size=16), expected) < 1e-12
    assert relative_error(flow_attention_reference(q, k, v, causal=causal), expected) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 7, 63, 1000])
@pytest.mark.parametrize("dim", [16, 60])
def test_forward_and_gradients_match_reference_fp32(causal, length, dim):
    heads = 2 if length == 1000 else 3
    q, k, v = random_qkv(2, heads, length, dim, dtype=torch.float32, seed=length + dim)
    weights = torch.randn(2, heads, length, dim, generator=torch.Generator().manual_seed(1))

    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flow_attention(*inputs, causal=causal)
    (out * weights).sum().backward()

    # the reference runs in float64, so the comparison measures the fp32 error of the fast path
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = flow_attention_reference(*ref_inputs, causal=causal)
    (ref * weights.double()).sum().backward()

    assert out.dtype == torch.float32
    assert relative_error(out.double(), ref) <= 1e-4
    # With a single token the output hardly depends on q and k (I ≈ <q,k>, so q·k/I ≈ 1): their gradients are
    # O(eps) and pure cancellation. Floor the denominator at a small fraction of the value gradient, which is
    # the natural scale, so this degenerate case measures fp32 error rather than dividing by ~0.
    floor = 1e-3 * ref_inputs[2].grad.norm().item()
    for got, expected in zip(inputs, ref_inputs):
        error = (got.grad.double() - expected.grad).norm().item() / max(expected.grad.norm().item(), floor)
        assert error <= 1e-4


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("options", [
    {"competition": False},
    {"allocation": False},
    {"clamp": None},
    {"clamp": 5.0},
    {"kernel": "relu", "clamp": None},
    {"eps": 1e-3},
])
def test_options_match_reference(causal, options):
    q, k, v = random_qkv(2, 2, 37, 12, dtype=torch.float64)
    expected = flow_attention_reference(q, k, v, causal=causal, **options)
    assert relative_error(flow_attention(q, k, v, causal=causal, chunk_size=8, **options), expected) < 1e-10


def test_ablations_change_the_output():
    q, k, v = random_qkv(1, 2, 40, 8, dtype=torch.float64)
    full = flow_attention(q, k, v)
    assert not torch.allclose(full, flow_attention(q, k, v, competition=False))
    assert not torch.allclose(full, flow_attention(q, k, v, allocation=False))
    # the clamp is active: about half of the conserved outgoing flows exceed 1 (results/paper/official_code.md §1.2)
    assert not torch.allclose(full, flow_attention(q, k, v, clamp=None))


def test_competition_over_heads_matches_reference_and_differs_from_keys():
    q, k, v = random_qkv(2, 4, 30, 8, dtype=torch.float64)
    options = dict(kernel="relu", clamp=None, competition_over="heads")
    expected = flow_attention_reference(q, k, v, **options)
    got = flow_attention(q, k, v, **options)
    assert relative_error(got, expected) < 1e-10
    # the official LRA variant inflates outputs by roughly S/H (results/paper/official_code.md §1.4)
    assert got.abs().mean() > 3 * flow_attention(q, k, v, kernel="relu", clamp=None).abs().mean()


def test_cross_attention_matches_reference():
    q, k, v = random_qkv(2, 2, 11, 8, source_length=29, value_dim=5, dtype=torch.float64)
    out = flow_attention(q, k, v)
    assert out.shape == (2, 2, 11, 5)
    assert relative_error(out, flow_attention_reference(q, k, v)) < 1e-12
    with pytest.raises(NotImplementedError, match="L == S"):
        flow_attention(q, k, v, causal=True)


def _padded_batch(lengths, total, *, left=False, dtype=torch.float64):
    q, k, v = random_qkv(len(lengths), 2, total, 8, dtype=dtype, seed=3)
    mask = torch.ones(len(lengths), total, dtype=torch.bool)
    for row, length in enumerate(lengths):
        if left:
            mask[row, total - length:] = False
        else:
            mask[row, :length] = False
    return q, k, v, mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("left", [False, True])
def test_padding_invariance(causal, left):
    lengths, total = [21, 9, 30], 30
    q, k, v, mask = _padded_batch(lengths, total, left=left)
    # garbage in padded slots must not leak into real outputs
    q, k, v = (t.masked_fill(mask[:, None, :, None], 1e3) for t in (q, k, v))
    out = flow_attention(q, k, v, causal=causal, key_padding_mask=mask, query_padding_mask=mask, chunk_size=8)
    reference = flow_attention_reference(q, k, v, causal=causal, key_padding_mask=mask, query_padding_mask=mask)
    assert relative_error(out, reference) < 1e-10
    for row in range(len(lengths)):
        real = ~mask[row]
        alone = flow_attention(q[row:row + 1, :, real], k[row:row + 1, :, real], v[row:row + 1, :, real], causal=causal)
        torch.testing.assert_close(out[row:row + 1, :, real], alone, rtol=1e-12, atol=1e-12)
        assert torch.all(out[row, :, ~real] == 0)


def test_key_padding_only_in_cross_attention():
    q, k, v = random_qkv(2, 2, 6, 8, source_length=12, dtype=torch.float64)
    key_mask = torch.zeros(2, 12, dtype=torch.bool)
    key_mask[0, 7:] = True
    out = flow_attention(q, k, v, key_padding_mask=key_mask)
    alone = flow_attention(q[:1], k[:1, :, :7], v[:1, :, :7])
    torch.testing.assert_close(out[:1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_causality_future_tokens_do_not_change_the_past(chunk_size):
    q, k, v = random_qkv(1, 2, 40, 8, dtype=torch.float32)
    cut = 23
    out = flow_attention(q, k, v, causal=True, chunk_size=chunk_size)
    changed = [t.clone() for t in (q, k, v)]
    for t in changed:
        t[:, :, cut:] = torch.randn_like(t[:, :, cut:]) * 10
    out_changed = flow_attention(*changed, causal=True, chunk_size=chunk_size)
    assert torch.equal(out[:, :, :cut], out_changed[:, :, :cut])
    assert not torch.allclose(out[:, :, cut:], out_changed[:, :, cut:])


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 17, 64, 500])
def test_every_chunk_size_gives_the_reference(chunk_size):
    q, k, v = random_qkv(1, 2, 50, 8, dtype=torch.float64)
    expected = flow_attention_reference(q, k, v, causal=True)
    assert relative_error(flow_attention(q, k, v, causal=True, chunk_size=chunk_size), expected) < 1e-12


def test_causal_linear_attention_equals_masked_dense():
    q, k, v = random_qkv(2, 2, 45, 6, value_dim=4, dtype=torch.float64)
    dense = torch.tril(q @ k.transpose(-2, -1)) @ v
    for chunk_size in (1, 4, 7, 45, 100):
        torch.testing.assert_close(causal_linear_attention(q, k, v, chunk_size=chunk_size), dense)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_inputs_stay_finite(dtype, causal):
    q, k, v = random_qkv(1, 2, 2048, 16, dtype=dtype)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = flow_attention(*inputs, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs)
    expected = flow_attention_reference(q.double(), k.double(), v.double(), causal=causal)
    assert relative_error(out.double(), expected) < 2e-2


def test_bad_inputs_raise_clear_errors():
    q, k, v = random_qkv(1, 2, 5, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="kernel"):
        flow_attention(q, k, v, kernel="softplus")
    with pytest.raises(TypeError, match="bool"):
        flow_attention(q, k, v, key_padding_mask=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        flow_attention(q, k, v, key_padding_mask=torch.zeros(1, 6, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="heads"):
        flow_attention(q, k, v, causal=True, competition_over="heads")
    with pytest.raises(ValueError, match="backend"):
        flow_attention(q, k, v, backend="cuda-magic")
