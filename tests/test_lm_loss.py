"""The chunked full-vocabulary cross-entropy equals the plain one: loss and gradients, with ignored targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tasks.wikitext103.loss import linear_cross_entropy
from tasks.wikitext103.windows import IGNORE_INDEX


def inputs(n=23, d=8, vocab=37, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n, d, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, d, generator=generator, dtype=dtype)
    target = torch.randint(0, vocab, (2, n), generator=generator)
    target[0, :5] = IGNORE_INDEX  # context positions
    target[1, -3:] = IGNORE_INDEX  # padding
    return hidden, weight, target


def plain(hidden, weight, target):
    logits = hidden @ weight.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float() if logits.dtype != torch.float64 else
                           logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


@pytest.mark.parametrize("chunk_tokens", [1, 7, 46, 1000])
def test_loss_and_gradients_equal_the_plain_cross_entropy(chunk_tokens):
    hidden, weight, target = inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    nll, count = linear_cross_entropy(h1, w1, target, chunk_tokens=chunk_tokens)
    expected = plain(h2, w2, target)
    assert int(count) == int((target != IGNORE_INDEX).sum())
    torch.testing.assert_close(nll.double(), expected, rtol=1e-6, atol=1e-6)  # the sum is kept in fp32
    (nll / count * 3.0).backward()  # a scaled mean, as the module and Lightning's accumulation use it
    (expected / count * 3.0).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-9)


def test_without_gradients_nothing_is_kept():
    hidden, weight, target = inputs(dtype=torch.float32)
    weight.requires_grad_()
    with torch.no_grad():
        nll, _ = linear_cross_entropy(hidden, weight, target, chunk_tokens=5)
    assert nll.grad_fn is None
    torch.testing.assert_close(nll, plain(hidden, weight, target).float())


def test_under_bf16_autocast_close_to_fp32():
    hidden, weight, target = inputs(n=64, d=32, vocab=101, dtype=torch.float32)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = plain(h_ref, w_ref, target)
    expected.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, _ = linear_cross_entropy(h, w, target, chunk_tokens=16)
    assert nll.dtype == torch.float32
    nll.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    assert abs(nll.item() - expected.item()) / expected.item() < 2e-2
    for got, ref in ((h.grad, h_ref.grad), (w.grad, w_ref.grad)):
        assert ((got - ref).norm() / ref.norm()).item() < 3e-2
