"""The fast CPU Flow-Attention paths against the dense reference: hand-written backward, chunk-level prefix sums, every
chunk size, causality, and half-precision numerics at long lengths."""

from __future__ import annotations

import itertools

import pytest
import torch

from flowformer.attention import causal_linear_attention, flow_attention
from flowformer.attention.flow import causal, chunks
from flowformer.attention.reference import flow_attention_reference
from tests.helpers import FLOW_OPTION_SETS, gradients, random_qkv, relative_error


def assert_output_and_gradients_match_reference(inputs, weights, **kwargs):
    """flow_attention(**kwargs) against the dense reference: outputs to 1e-12, input gradients to 1e-10."""
    out, grads = gradients(lambda *t: flow_attention(*t, **kwargs), inputs, weights)
    ref, ref_grads = gradients(lambda *t: flow_attention_reference(*t, **kwargs), inputs, weights)
    assert relative_error(out, ref) < 1e-12
    for got, expected in zip(grads, ref_grads):
        assert relative_error(got, expected) < 1e-10


def count_passes(monkeypatch) -> list[int]:
    """Make every causal pass record its length in the returned list."""
    calls: list[int] = []
    one_pass = causal.causal_pass
    monkeypatch.setattr(causal, "causal_pass", lambda x, *a, **kw: calls.append(x.q.shape[-2]) or one_pass(x, *a, **kw))
    return calls


@pytest.mark.parametrize("options", FLOW_OPTION_SETS + [{"competition_over": "heads", "kernel": "relu", "clamp": None}])
@pytest.mark.parametrize("masked", [False, True])
def test_noncausal_hand_written_backward_matches_reference(options, masked):
    q, k, v = random_qkv(2, 3, 13, 5, source_length=17, value_dim=4)
    masks = {}
    if masked:
        key_mask = torch.zeros(2, 17, dtype=torch.bool)
        key_mask[0, 12:] = True
        query_mask = torch.zeros(2, 13, dtype=torch.bool)
        query_mask[1, 9:] = True
        masks = {"key_padding_mask": key_mask, "query_padding_mask": query_mask}
    weights = torch.randn(2, 3, 13, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert_output_and_gradients_match_reference((q, k, v), weights, **options, **masks)


@pytest.mark.parametrize("options", FLOW_OPTION_SETS)
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_causal_gradients_match_reference_with_padding(options, chunk_size):
    q, k, v = random_qkv(2, 2, 23, 6, value_dim=3, seed=1)
    mask = torch.zeros(2, 23, dtype=torch.bool)
    mask[0, :5] = True  # left padding
    mask[1, 17:] = True  # right padding
    weights = torch.randn(2, 2, 23, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_output_and_gradients_match_reference(
        (q, k, v), weights, causal=True, key_padding_mask=mask, chunk_size=chunk_size, **options
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"clamp": None},
        {"competition": False},
        {"allocation": False},
        {"competition_over": "heads"},
        {"kernel": "relu", "clamp": None},  # the feature map and its gradient are applied block by block
        {"competition": False, "allocation": False},
    ],
)
def test_noncausal_blocked_passes_match_reference(monkeypatch, options):
    # the smallest block is 256 rows: 700 queries and 600 keys take 3 blocks each, the last one partial
    monkeypatch.setattr(chunks, "BLOCK_BYTES", 1)
    q, k, v = random_qkv(2, 2, 700, 6, source_length=600, value_dim=5, seed=13)
    key_mask = torch.zeros(2, 600, dtype=torch.bool)
    key_mask[1, 450:] = True
    query_mask = torch.zeros(2, 700, dtype=torch.bool)
    query_mask[0, 600:] = True  # a padded tail that spans a block boundary
    masks = {"key_padding_mask": key_mask, "query_padding_mask": query_mask}
    weights = torch.randn(2, 2, 700, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    assert_output_and_gradients_match_reference((q, k, v), weights, **options, **masks)


def test_hand_written_backward_passes_gradcheck():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 6, 3, source_length=7, value_dim=2, seed=3))
    assert torch.autograd.gradcheck(lambda *t: flow_attention(*t), (q, k, v))


@pytest.mark.parametrize("length", [1, 15, 16, 17, 160, 1100])
def test_exclusive_chunk_prefix_forms_agree(length):
    x = torch.randn(2, 3, length, 5, dtype=torch.float64)
    expected = torch.cat([torch.zeros_like(x[..., :1, :]), x[..., :-1, :].cumsum(-2)], dim=-2)
    torch.testing.assert_close(chunks.blocked_exclusive_prefix(x), expected)
    torch.testing.assert_close(chunks.ExclusiveScan.apply(x), expected)
    torch.testing.assert_close(chunks.exclusive_chunk_prefix(x), expected)


@pytest.mark.parametrize("with_start", [False, True])
def test_in_place_exclusive_scan_returns_the_prefixes_and_the_total(with_start):
    x = torch.randn(2, 3, 11, 600, dtype=torch.float64)
    start = torch.randn(2, 3, 600, dtype=torch.float64) if with_start else None
    offset = 0.0 if start is None else start[:, :, None]
    expected = torch.cat([torch.zeros_like(x[..., :1, :]), x[..., :-1, :].cumsum(-2)], dim=-2) + offset
    total = x.sum(-2) + (0.0 if start is None else start)
    scanned = x.clone()
    got_total = chunks.exclusive_scan_(scanned, start)
    torch.testing.assert_close(scanned, expected)
    torch.testing.assert_close(got_total, total)


@pytest.mark.parametrize("options", [{}, {"competition": False}, {"allocation": False}, {"clamp": None}])
def test_causal_inference_path_equals_the_training_path(options):
    # without gradients the causal path keeps nothing for a backward and scans the (d, dv) chunk states in place
    # (d·dv = 1024 >= chunks.SCAN_MIN_WIDTH); it must give the training path's output, padding included
    q, k, v = random_qkv(2, 2, 150, 32, seed=8)
    mask = torch.zeros(2, 150, dtype=torch.bool)
    mask[1, 120:] = True
    run = lambda *t: flow_attention(*t, causal=True, key_padding_mask=mask, chunk_size=16, **options)
    with torch.no_grad():
        inference = run(q, k, v)
    training = run(*(t.clone().requires_grad_() for t in (q, k, v)))
    assert relative_error(inference, training.detach()) < 1e-13
    reference = flow_attention_reference(q, k, v, causal=True, key_padding_mask=mask, **options)
    assert relative_error(inference, reference) < 1e-12


@pytest.mark.parametrize("options", FLOW_OPTION_SETS)
def test_causal_inference_in_segments_matches_reference(monkeypatch, options):
    # BLOCK_BYTES = 1 makes the segments as short as allowed: 8 chunks of 4 = 32 tokens, so 150 tokens run in five
    # segments, the last one (22 tokens) with a padded tail inside its last chunk
    monkeypatch.setattr(chunks, "BLOCK_BYTES", 1)
    calls = count_passes(monkeypatch)
    # (seed 21 makes the dense reference itself overflow to NaN for relu without a clamp)
    q, k, v = random_qkv(2, 2, 150, 6, value_dim=5, seed=22)
    mask = torch.zeros(2, 150, dtype=torch.bool)
    mask[0, :40] = True  # left padding across the first segment boundary
    mask[1, 100:] = True  # right padding across the last boundaries
    run = lambda *t: flow_attention(*t, causal=True, key_padding_mask=mask, chunk_size=4, **options)
    with torch.no_grad():
        segmented = run(q, k, v)
    assert calls == [32, 32, 32, 32, 22]
    reference = flow_attention_reference(q, k, v, causal=True, key_padding_mask=mask, **options)
    assert relative_error(segmented, reference) < 1e-12
    assert torch.equal(segmented[1, :, 100:], torch.zeros_like(segmented[1, :, 100:]))
    # with autograd the sequence runs in one piece (the hand-written backward needs all of it), to the same output
    calls.clear()
    training = run(*(t.clone().requires_grad_() for t in (q, k, v)))
    assert calls == [150]
    assert relative_error(segmented, training.detach()) < 1e-12


def test_causal_inference_in_segments_stays_exactly_causal_in_float32(monkeypatch):
    monkeypatch.setattr(chunks, "BLOCK_BYTES", 1)
    q, k, v = random_qkv(1, 2, 300, 16, dtype=torch.float32, seed=22)
    assert causal.inference_segment(q, k, v, 16) == 128
    with torch.no_grad():
        out = flow_attention(q, k, v, causal=True, chunk_size=16)
        changed = [t.clone() for t in (q, k, v)]
        for t in changed:
            t[:, :, 200:] = torch.randn_like(t[:, :, 200:]) * 5
        later = flow_attention(*changed, causal=True, chunk_size=16)
    assert torch.equal(out[:, :, :200], later[:, :, :200])
    reference = flow_attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert relative_error(out.double(), reference) < 1e-5


def test_causal_segments_only_for_cpu_inference_longer_than_a_segment():
    q, k, v = random_qkv(1, 8, 4096, 64, dtype=torch.float32)
    assert causal.inference_segment(q, k, v, 64) == 1024  # (1, 8, 1024, 64) fp32 = 2 MiB
    assert causal.inference_segment(q[:, :, :1024], k[:, :, :1024], v[:, :, :1024], 64) is None
    assert causal.inference_segment(q.requires_grad_(), k, v, 64) is None
    with torch.no_grad():
        assert causal.inference_segment(q, k, v, 64) == 1024
    wide = random_qkv(16, 8, 4096, 64, dtype=torch.float32)
    assert causal.inference_segment(*wide, 64) == 8 * 64  # never fewer than causal.MIN_SEGMENT_CHUNKS chunks


def test_exclusive_scan_gradient():
    x = torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(chunks.ExclusiveScan.apply, (x,))


@pytest.mark.parametrize("grad", [False, True])
def test_wide_chunk_states_take_the_scan_and_stay_exactly_causal(grad):
    # d·dv = 1024 >= SCAN_MIN_WIDTH, so the (d, dv) chunk states go through ExclusiveScan (with gradients) or
    # the in-place scan (inference)
    assert 32 * 32 >= chunks.SCAN_MIN_WIDTH
    q, k, v = random_qkv(1, 2, 300, 32, dtype=torch.float32, seed=4)
    with torch.set_grad_enabled(grad):
        inputs = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        out = flow_attention(*inputs, causal=True, chunk_size=16).detach()
        changed = [t.clone() for t in (q, k, v)]
        for t in changed:
            t[:, :, 200:] = torch.randn_like(t[:, :, 200:]) * 5
        changed = [t.requires_grad_(grad) for t in changed]
        later = flow_attention(*changed, causal=True, chunk_size=16).detach()
    assert torch.equal(out[:, :, :200], later[:, :, :200])
    reference = flow_attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert relative_error(out.double(), reference) < 1e-5


def test_causal_linear_attention_with_wide_states_equals_masked_dense():
    q, k, v = random_qkv(1, 2, 70, 24, value_dim=40)
    dense = torch.tril(q @ k.transpose(-2, -1)) @ v
    torch.testing.assert_close(causal_linear_attention(q, k, v, chunk_size=8), dense)


@pytest.mark.parametrize("clamp", [1.0, 10.0, 25.0, None, 1e6])
def test_prefix_softmax_forms_agree(clamp):
    # clamp <= 30: exp + float64 cumsum; larger or None: logcumsumexp
    q, k, v = random_qkv(2, 2, 40, 8, seed=6)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :7] = True
    expected = flow_attention_reference(q, k, v, causal=True, key_padding_mask=mask, clamp=clamp)
    got = flow_attention(q, k, v, causal=True, key_padding_mask=mask, clamp=clamp, chunk_size=8)
    assert relative_error(got, expected) < 1e-12


# ------------------------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------------------------


def _finite_outputs_and_gradients(dtype, causal, length, heads, dim):
    generator = torch.Generator().manual_seed(12)
    inputs = [torch.randn(1, heads, length, dim, generator=generator).to(dtype).requires_grad_() for _ in range(3)]
    out = flow_attention(*inputs, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # a sum, not a mean: with 2^18 outputs a mean's gradients would underflow fp16 (loss scaling's job, not ours)
    out.float().square().sum().backward()
    for t in inputs:
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    return inputs, out


@pytest.mark.parametrize("dtype, causal", list(itertools.product([torch.bfloat16, torch.float16], [False, True])))
def test_half_precision_at_8192_is_finite_and_accurate(dtype, causal):
    inputs, out = _finite_outputs_and_gradients(dtype, causal, 8192, 2, 16)
    # flows are accumulated in fp32: the error against a float64 run of the same inputs is the input/output
    # rounding of the half type, not a sum growing with L
    exact = flow_attention(*(t.detach().double() for t in inputs), causal=causal)
    assert relative_error(out.double(), exact) < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("dtype, causal", list(itertools.product([torch.bfloat16, torch.float16], [False, True])))
def test_half_precision_at_65536_is_finite(dtype, causal):
    _finite_outputs_and_gradients(dtype, causal, 65536, 8, 64)
