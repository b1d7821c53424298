"""Every registered attention op under mixed precision (`torch.autocast`), forward and backward, against its own
fp32 output: on CPU in bf16 here, on a CUDA GPU in bf16 and fp16 (marked gpu). Also one whole model, an encoder of
`MultiHeadAttention` blocks, and the step mode of causal Flow-Attention.

The tolerances fit bf16: its rounding is 2^-8 relative, the inputs are rounded to it before the op, and the
gradients of q and k carry the cancellation of the normalisations (a small difference of large terms)."""

from __future__ import annotations

import pytest
import torch

from flowformer.attention import REGISTERED_NAMES, build_attention, flow_attention_prefill, flow_attention_step
from flowformer.nn import Encoder
from tests.helpers import random_qkv, relative_error

FORWARD_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3}
GRADIENT_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 2e-2}
CASES = [(name, causal) for name in REGISTERED_NAMES for causal in (False, True) if (name, causal) != (
    "flow_lra_official", True)]  # the official LRA variant has no causal form


def _build(name: str, causal: bool, device: str) -> torch.nn.Module:
    options = {"allow_causal_hash_leak": True} if name == "reformer" and causal else {}
    return build_attention(name, head_dim=16, n_heads=2, **options).eval().to(device)


def _run(op, inputs, causal, mask, autocast_dtype=None):
    """The output and the gradients of Σ out² · w with respect to q, k, v (None where the op ignores one)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autocast(leaves[0].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = op(*leaves, causal=causal, key_padding_mask=mask, query_padding_mask=mask)
    grads = torch.autograd.grad(out.float().square().sum(), leaves, allow_unused=True)
    return out, grads


def _assert_close_to_fp32(name, causal, device, dtype):
    op = _build(name, causal, device)
    inputs = [t.float().to(device) for t in random_qkv(2, 2, 40, 16, seed=1)]
    mask = torch.zeros(2, 40, dtype=torch.bool, device=device)
    mask[1, 30:] = True
    expected, expected_grads = _run(op, inputs, causal, mask)
    out, grads = _run(op, inputs, causal, mask, autocast_dtype=dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out.float(), expected) < FORWARD_TOLERANCE[dtype]
    for got, want in zip(grads, expected_grads):
        if want is None:  # Reformer shares queries and keys: k is not used
            assert got is None
            continue
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert relative_error(got, want) < GRADIENT_TOLERANCE[dtype]


@pytest.mark.parametrize("name, causal", CASES)
def test_every_op_under_cpu_autocast_matches_its_fp32_output(name, causal):
    _assert_close_to_fp32(name, causal, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, causal", CASES)
def test_every_op_under_cuda_autocast_matches_its_fp32_output(name, causal, dtype):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 run is the exact one
    try:
        _assert_close_to_fp32(name, causal, "cuda", dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("attention", ["flow", "softmax", "performer"])
def test_an_encoder_trains_under_cpu_autocast(attention):
    torch.manual_seed(0)
    model = Encoder(2, d_model=32, n_heads=4, d_ff=64, attention=attention, dropout=0.0).eval()
    x = torch.randn(3, 50, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[2, 35:] = True

    def loss_and_grads(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, padding_mask=mask)
        loss = out.float()[~mask].square().mean()
        loss.backward()
        return out, loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    expected, expected_loss, expected_grads = loss_and_grads(False)
    out, loss, grads = loss_and_grads(True)
    assert out.dtype == torch.float32  # the final LayerNorm runs in fp32 under autocast
    assert relative_error(out[~mask], expected[~mask]) < 2e-2
    assert abs(loss - expected_loss) / expected_loss < 2e-2
    # all parameter gradients as one vector: some are exactly 0 in exact arithmetic (softmax ignores a key bias)
    assert torch.isfinite(grads).all() and relative_error(grads, expected_grads) < 5e-2


def test_flow_step_mode_under_cpu_autocast():
    op = build_attention("flow", head_dim=8, n_heads=2, clamp=5.0)
    q, k, v = (t.float() for t in random_qkv(2, 2, 12, 8, seed=3))
    full = op(q, k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prompt, state = flow_attention_prefill(q[:, :, :8], k[:, :, :8], v[:, :, :8], options=op.options)
        steps = []
        for t in range(8, 12):
            out_t, state = flow_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, options=op.options)
            steps.append(out_t)
    assert prompt.dtype == torch.bfloat16 and state.kv.dtype == torch.float32
    generated = torch.cat([prompt.float(), torch.stack(steps, dim=2).float()], dim=2)
    assert relative_error(generated, full) < 1e-2
