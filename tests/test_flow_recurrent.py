"""Recurrent causal Flow-Attention: token-by-token steps and chunked prefills equal the full causal output."""

from __future__ import annotations

import pytest
import torch

from flowformer.attention import (
    FlowAttention,
    FlowOptions,
    FlowState,
    flow_attention,
    flow_attention_prefill,
    flow_attention_step,
)
from flowformer.attention.flow import causal, chunks

OPTION_SETS = [
    {},
    {"competition": False},
    {"allocation": False},
    {"clamp": None},
    {"clamp": 10.0, "kernel": "relu"},
    {"eps": 1e-3},
]


def random_inputs(batch=2, heads=3, length=23, dim=5, dim_v=4, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, n, generator=generator, dtype=dtype) for n in (dim, dim, dim_v)]


def padding(batch=2, length=23):
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, :4] = True  # left padding, as in batched generation
    mask[1, 10:13] = True  # a gap in the middle
    return mask


def run_steps(q, k, v, state=None, mask=None, start=0, **options):
    outs = []
    for t in range(start, q.shape[2]):
        step_mask = None if mask is None else mask[:, t]
        out, state = flow_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, padding_mask=step_mask, **options)
        outs.append(out)
    return torch.stack(outs, dim=2), state


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("masked", [False, True])
def test_token_by_token_equals_full_causal(options, masked):
    q, k, v = random_inputs()
    mask = padding() if masked else None
    full = flow_attention(q, k, v, causal=True, key_padding_mask=mask, **options)
    steps, _ = run_steps(q, k, v, mask=mask, **options)
    torch.testing.assert_close(steps, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("masked", [False, True])
def test_prefill_then_steps_and_segmented_prefill_equal_full_causal(options, masked):
    q, k, v = random_inputs(seed=1)
    mask = padding() if masked else None
    full = flow_attention(q, k, v, causal=True, key_padding_mask=mask, **options)
    cut = 9

    def part(x, lo, hi):
        return None if x is None else x[:, lo:hi]

    prompt, state = flow_attention_prefill(
        q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], padding_mask=part(mask, 0, cut), chunk_size=4, **options
    )
    generated, step_state = run_steps(q, k, v, state=state, mask=mask, start=cut, **options)
    torch.testing.assert_close(torch.cat([prompt, generated], dim=2), full, rtol=1e-12, atol=1e-12)

    rest, segment_state = flow_attention_prefill(
        q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], state=state, padding_mask=part(mask, cut, None), chunk_size=3,
        **options,
    )
    torch.testing.assert_close(torch.cat([prompt, rest], dim=2), full, rtol=1e-12, atol=1e-12)
    # both routes end in the same state
    for name, value in step_state.tensors().items():
        torch.testing.assert_close(segment_state.tensors()[name], value, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("options", OPTION_SETS)
def test_prefill_without_autograd_in_segments_equals_the_one_piece_prefill(monkeypatch, options):
    # BLOCK_BYTES = 1: segments of 8 chunks of 2 = 16 tokens, so a 37-token prompt after a 6-token one runs in
    # three segments, the last with a padded tail, and continues the first prompt's state
    monkeypatch.setattr(chunks, "BLOCK_BYTES", 1)
    q, k, v = random_inputs(length=43, seed=4)
    mask = torch.zeros(2, 43, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, 15:20] = True  # a gap across the first segment boundary of the second prompt

    def prefill(lo, hi, state):
        return flow_attention_prefill(
            q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], state=state, padding_mask=mask[:, lo:hi], chunk_size=2,
            **options,
        )

    first, state = prefill(0, 6, None)
    calls = []
    one_piece_pass = causal.causal_pass
    monkeypatch.setattr(
        causal, "causal_pass", lambda x, *a, **kw: calls.append(x.q.shape[-2]) or one_piece_pass(x, *a, **kw)
    )
    with torch.no_grad():
        segmented, segmented_state = prefill(6, 43, state)
    assert calls == [16, 16, 5]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    q, k, v = leaves  # with autograd: one piece
    one_piece, one_piece_state = prefill(6, 43, state)
    torch.testing.assert_close(segmented, one_piece.detach(), rtol=1e-12, atol=1e-12)
    for name, value in one_piece_state.tensors().items():
        torch.testing.assert_close(segmented_state.tensors()[name], value.detach(), rtol=1e-12, atol=1e-12, msg=name)


def test_padded_step_leaves_the_state_exactly_unchanged():
    q, k, v = random_inputs(length=6, seed=2)
    _, state = flow_attention_prefill(q[:, :, :5], k[:, :, :5], v[:, :, :5])
    pad = torch.tensor([True, False])
    out, new = flow_attention_step(q[:, :, 5] * 1e3, k[:, :, 5], v[:, :, 5], state, padding_mask=pad)
    assert torch.all(out[0] == 0) and torch.any(out[1] != 0)
    for name, value in state.tensors().items():
        assert torch.equal(new.tensors()[name][0], value[0]), name
        assert not torch.equal(new.tensors()[name][1], value[1]) or name in ("lse",), name


def test_state_size_does_not_grow_with_length():
    q, k, v = random_inputs(batch=1, heads=2, length=300, dim=8, dim_v=8, dtype=torch.float32, seed=3)
    _, short = flow_attention_prefill(q[:, :, :10], k[:, :, :10], v[:, :, :10])
    _, long = flow_attention_prefill(q, k, v)
    assert [t.shape for t in short.tensors().values()] == [t.shape for t in long.tensors().values()]
    assert long.kv.shape == (1, 2, 8, 8)


def test_step_accepts_length_one_blocks_and_keeps_the_dtype():
    q, k, v = random_inputs(length=3, dtype=torch.bfloat16, seed=4)
    out, state = flow_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    assert out.shape == (2, 3, 1, 4) and out.dtype == torch.bfloat16
    assert state.kv.dtype == torch.float32  # sums are kept in fp32 for half inputs
    full = flow_attention(q, k, v, causal=True)
    steps, _ = run_steps(q, k, v)
    torch.testing.assert_close(steps.float(), full.float(), rtol=2e-2, atol=2e-2)


def test_gradients_through_steps_equal_gradients_of_the_full_op():
    q, k, v = random_inputs(batch=1, heads=2, length=8, dim=4, dim_v=3, seed=5)
    weights = torch.randn(1, 2, 8, 3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    (flow_attention(*leaves, causal=True) * weights).sum().backward()
    expected = [t.grad for t in leaves]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    steps, _ = run_steps(*leaves)
    (steps * weights).sum().backward()
    for got, want in zip((t.grad for t in leaves), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_detach_and_select_batch():
    q, k, v = (t.requires_grad_() for t in random_inputs(length=5, seed=6))
    _, state = flow_attention_prefill(q, k, v)
    assert state.kv.requires_grad and not state.detach().kv.requires_grad
    swapped = state.select_batch(torch.tensor([1, 0]))
    torch.testing.assert_close(swapped.kv[0], state.kv[1])
    torch.testing.assert_close(swapped.sinks, state.sinks.flip(0))


def test_empty_state_equals_no_state():
    q, k, v = random_inputs(length=4, seed=7)
    empty = FlowState.empty(2, 3, 5, 4, dtype=torch.float64)
    with_empty, _ = flow_attention_prefill(q, k, v, state=empty)
    without, _ = flow_attention_prefill(q, k, v)
    torch.testing.assert_close(with_empty, without, rtol=1e-14, atol=1e-14)


def test_mismatched_options_or_shapes_raise_clear_errors():
    q, k, v = random_inputs(length=4, seed=8)
    _, state = flow_attention_prefill(q, k, v, clamp=5.0)
    assert state.options == FlowOptions(clamp=5.0)
    with pytest.raises(ValueError, match="same options"):
        flow_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state)
    with pytest.raises(ValueError, match="kv of shape"):
        flow_attention_step(q[:1, :, 0], k[:1, :, 0], v[:1, :, 0], state, clamp=5.0)
    with pytest.raises(ValueError, match="one token"):
        flow_attention_step(q[:, :, :2], k[:, :, :2], v[:, :, :2], state, clamp=5.0)
    with pytest.raises(ValueError, match="kernel"):
        flow_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], kernel="softplus")


def test_a_module_and_the_step_mode_share_one_options_object():
    op = FlowAttention(5, 3, clamp=10.0, kernel="relu", chunk_size=4)
    q, k, v = random_inputs(seed=9)
    full = op(q, k, v, causal=True)
    cut = 15
    prompt, state = flow_attention_prefill(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], options=op.options)
    steps, _ = run_steps(q, k, v, state=state, start=cut, options=op.options)
    torch.testing.assert_close(torch.cat([prompt, steps], dim=2), full, rtol=1e-12, atol=1e-12)
    # the options object also unpacks as keywords, and a keyword overrides a field of `options=`
    keywords, _ = flow_attention_prefill(q, k, v, **op.options)
    torch.testing.assert_close(keywords, full, rtol=1e-12, atol=1e-12)
    _, other = flow_attention_prefill(q, k, v, options=op.options, chunk_size=16)
    assert other.options == FlowOptions(clamp=10.0, kernel="relu", chunk_size=16)
    # chunk size and backend change speed only: a state continues under either
    flow_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], other, options=op.options)
    with pytest.raises(TypeError, match="unknown flow-attention option"):
        flow_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], other, options=op.options, clammp=1.0)
