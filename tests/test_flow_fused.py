"""backend="fused": the compiled CPU loops of Flow-Attention (`flowformer/attention/csrc/flow_cpu.cpp`), non-causal
and causal, against the float64 dense reference and the eager passes, and the fallback when they cannot be built.

The first test to need the loops builds them (~30-60 s once; then cached under $TORCH_EXTENSIONS_DIR). Where this
machine cannot build them (no C++ compiler or Python headers), every test that needs them is skipped with the
build error as its reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import flowformer.attention.flow as flow_module
from flowformer.attention import cpu_fused
from flowformer.attention.flow import flow_attention
from flowformer.attention.reference import flow_attention_reference
from tests.test_flow_fast import OPTION_SETS, gradients, random_inputs, relative_error


@pytest.fixture(scope="module")
def fused():
    module = cpu_fused.load()
    if module is None:
        pytest.skip(f"the fused CPU loops could not be built on this machine: {cpu_fused.failure()}")
    return module


class CallCounter:
    """Stands in for the compiled module and counts the calls of each loop, so a test can tell that the fused
    loops ran (a silent fallback to the eager passes would compute the same numbers)."""

    def __init__(self, module):
        self.module, self.calls = module, {}

    def __getattr__(self, name):
        function = getattr(self.module, name)

        def counted(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return function(*args)

        return counted


def padding_masks(batch: int, length: int, source_length: int) -> dict:
    key_mask = torch.zeros(batch, source_length, dtype=torch.bool)
    key_mask[1, source_length - 150:] = True  # a padded tail across a block boundary
    query_mask = torch.zeros(batch, length, dtype=torch.bool)
    query_mask[0, :37] = True  # left padding, not a whole tile of rows
    return {"key_padding_mask": key_mask, "query_padding_mask": query_mask}


@pytest.mark.parametrize("options", OPTION_SETS + [{"competition_over": "heads", "kernel": "relu", "clamp": None}])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_matches_reference_across_blocks(fused, monkeypatch, options, masked):
    # 256-row blocks: 700 queries and 600 keys take 3 blocks each, the last one partial and not a multiple of the
    # loops' 16-row tiles; d = 20 and dv = 13 leave a partial vector at the end of every row
    monkeypatch.setattr(flow_module, "_BLOCK_BYTES", 1)
    counter = CallCounter(fused)
    monkeypatch.setattr(flow_module, "_fused_loops", lambda q: counter)
    q, k, v = random_inputs(2, 2, 700, 20, source_length=600, value_dim=13, dtype=torch.float32, seed=21)
    masks = padding_masks(2, 700, 600) if masked else {}
    weights = torch.randn(2, 2, 700, 13, generator=torch.Generator().manual_seed(22))
    out, grads = gradients(lambda *t: flow_attention(*t, backend="fused", **options, **masks), (q, k, v), weights)
    ref, ref_grads = gradients(
        lambda *t: flow_attention_reference(*t, **options, **masks), [t.double() for t in (q, k, v)], weights.double()
    )
    assert relative_error(out.double(), ref) < 2e-6
    for got, expected in zip(grads, ref_grads):
        assert relative_error(got.double(), expected) < 2e-5
    streamed_keys = options.get("competition_over", "keys") == "keys" and options.get("clamp", 1.0) is not None
    has_flows = options.get("competition", True) or options.get("allocation", True)
    assert counter.calls["sink_pass"] == 2  # once over k, once over q
    assert counter.calls["output_pass"] == 3  # once per query block
    assert counter.calls.get("source_pass", 0) == (3 if streamed_keys and has_flows else 0)


def test_fused_equals_eager_on_strided_inputs(fused):
    # heads taken from a (B, L, H, d) projection: rows and heads are strided, the last dimension contiguous
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 300, 4, 64, generator=generator).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[0, 250:] = True
    for options in ({}, {"kernel": "relu", "clamp": 5.0}):
        eager = flow_attention(q, k, v, key_padding_mask=mask, **options)
        fused_out = flow_attention(q, k, v, key_padding_mask=mask, backend="fused", **options)
        assert relative_error(fused_out, eager) < 2e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_computes_half_precision_inputs_in_float32(fused, monkeypatch, dtype):
    counter = CallCounter(fused)
    monkeypatch.setattr(flow_module, "_fused_loops", lambda q: counter if q.dtype == torch.float32 else None)
    q, k, v = random_inputs(1, 2, 500, 32, dtype=dtype, seed=4)
    out = flow_attention(q, k, v, backend="fused")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert counter.calls["sink_pass"] == 2  # the flows ran in the loops, on the float32 upcast
    ref = flow_attention_reference(q.double(), k.double(), v.double())
    assert relative_error(out.double(), ref) < 1e-2
    with torch.no_grad():
        causal = flow_attention(q, k, v, causal=True, backend="fused")
    assert causal.dtype == dtype and counter.calls["causal_flows"] == 1
    ref = flow_attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert relative_error(causal.double(), ref) < 1e-2


def test_fused_leaves_float64_to_the_eager_passes():
    q = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    assert flow_module._fused_loops(q) is None


def causal_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, :37] = True  # left padding across the first segment boundary
    mask[1, 230:] = True  # right padding across the last boundaries
    return mask


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("masked", [False, True])
def test_fused_causal_matches_reference_in_segments(fused, monkeypatch, options, masked):
    # _BLOCK_BYTES = 1: segments of 8 chunks of 20 = 160 tokens, so 350 tokens run as 160, 160 and 30, the last one
    # with a padded tail inside its second chunk; each segment continues the running sums of the one before. Chunks of
    # 20 and d = 20, dv = 13 leave partial vectors in every row of the loop.
    monkeypatch.setattr(flow_module, "_BLOCK_BYTES", 1)
    counter = CallCounter(fused)
    monkeypatch.setattr(flow_module, "_fused_loops", lambda q: counter)
    q, k, v = random_inputs(2, 2, 350, 20, value_dim=13, dtype=torch.float32, seed=31)
    mask = {"key_padding_mask": causal_mask(2, 350)} if masked else {}
    with torch.no_grad():
        out = flow_attention(q, k, v, causal=True, chunk_size=20, backend="fused", **options, **mask)
    reference = flow_attention_reference(*(t.double() for t in (q, k, v)), causal=True, **options, **mask)
    assert relative_error(out.double(), reference) < 2e-6
    # the loop has the clamped prefix softmax only: competition without a clamp stays eager
    fuses = not options.get("competition", True) or options.get("clamp", 1.0) is not None
    assert counter.calls.get("causal_flows", 0) == (3 if fuses else 0)


def test_fused_causal_serves_inference_only(fused, monkeypatch):
    # one piece (no segments at this length) without autograd: the loop; with autograd: the hand-written backward's
    # eager forward, to the same output
    counter = CallCounter(fused)
    monkeypatch.setattr(flow_module, "_fused_loops", lambda q: counter)
    q, k, v = random_inputs(1, 3, 200, 64, dtype=torch.float32, seed=32)
    with torch.no_grad():
        inference = flow_attention(q, k, v, causal=True, backend="fused")
    assert counter.calls == {"causal_flows": 1}
    training = flow_attention(*(t.clone().requires_grad_() for t in (q, k, v)), causal=True, backend="fused")
    assert counter.calls == {"causal_flows": 1}
    assert relative_error(inference, training.detach()) < 2e-6


def test_fused_causal_is_exactly_causal(fused, monkeypatch):
    # changing the last tokens leaves every earlier output bit-identical, across segments (_BLOCK_BYTES = 1: six
    # segments of 8 chunks of 64), and inside the chunk that holds the change
    monkeypatch.setattr(flow_module, "_BLOCK_BYTES", 1)
    counter = CallCounter(fused)
    monkeypatch.setattr(flow_module, "_fused_loops", lambda q: counter)
    q, k, v = random_inputs(1, 2, 3000, 32, dtype=torch.float32, seed=33)
    changed = [t.clone() for t in (q, k, v)]
    for t in changed:
        t[:, :, 2900:] = torch.randn_like(t[:, :, 2900:])
    with torch.no_grad():
        before = flow_attention(q, k, v, causal=True, backend="fused")
        after = flow_attention(*changed, causal=True, backend="fused")
    assert counter.calls == {"causal_flows": 12}
    assert torch.equal(before[:, :, :2900], after[:, :, :2900])
    assert not torch.equal(before[:, :, 2900:], after[:, :, 2900:])


def test_fused_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_build(**kwargs):
        raise RuntimeError("Error building extension 'x'\nflow_cpu.cpp:1:1: error: no compiler here")

    monkeypatch.setattr(cpu_fused, "_loaded", {})
    monkeypatch.setattr(cpu_fused, "_failure", {})
    monkeypatch.setattr("torch.utils.cpp_extension.load", broken_build)
    q, k, v = random_inputs(1, 2, 40, 8, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="could not build its CPU loops .*error: no compiler here"):
        out = flow_attention(q, k, v, backend="fused")
    torch.testing.assert_close(out, flow_attention(q, k, v))
    assert "no compiler here" in cpu_fused.failure()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second build, no second warning
        flow_attention(q, k, v, backend="fused")
