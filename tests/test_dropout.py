"""flowformer.dropout against torch's dropout, its reference: the same distribution of masks, the same scaling, the
same gradient, the identity in evaluation, and torch's own code wherever the cheaper mask does not apply."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowformer.dropout import Dropout, dropout, keep_mask
from flowformer.models import TimeSeriesClassifier


def _drop_fraction_bound(p: float, n: int) -> float:
    return 6 * math.sqrt(p * (1 - p) / n)  # six standard deviations of the dropped fraction


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_mask_drops_a_fraction_p_in_every_16_bit_lane(p):
    torch.manual_seed(0)
    x = torch.empty(1000, 1024)
    dropped = ~keep_mask(x, p)
    assert abs(dropped.float().mean().item() - p) < _drop_fraction_bound(p, x.numel())
    # each 64-bit draw gives four consecutive elements: every lane position is unbiased on its own
    lanes = dropped.reshape(-1, 4).float().mean(0)
    assert torch.all((lanes - p).abs() < _drop_fraction_bound(p, x.numel() // 4)), lanes
    # and neighbouring lanes are independent: both dropped as often as p²
    both = (dropped.reshape(-1, 4)[:, 0] & dropped.reshape(-1, 4)[:, 1]).float().mean().item()
    assert abs(both - p * p) < _drop_fraction_bound(p * p, x.numel() // 4)


def test_kept_values_are_scaled_as_torch_scales_them_and_dropped_ones_are_zero():
    torch.manual_seed(1)
    x = torch.rand(64, 33, dtype=torch.float64) + 1.0  # no zeros, so the output shows the mask
    out = dropout(x, 0.3)
    kept = out != 0
    reference = F.dropout(x, 0.3, training=True)  # torch's own: same scaling of what it keeps
    torch.testing.assert_close(out[kept], x[kept] / 0.7, rtol=1e-15, atol=0)
    torch.testing.assert_close(reference[reference != 0], x[reference != 0] / 0.7, rtol=1e-15, atol=0)
    assert 0 < kept.sum() < x.numel()


def test_the_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = (torch.rand(8, 5, 7, dtype=torch.float64) + 1.0).requires_grad_()
    weights = torch.randn(8, 5, 7, dtype=torch.float64)
    out = dropout(x, 0.25)
    (out * weights).sum().backward()
    expected = weights * (out != 0) / 0.75
    torch.testing.assert_close(x.grad, expected, rtol=1e-15, atol=0)


def test_a_seed_fixes_the_masks_and_draws_move_on():
    x = torch.ones(4, 100)
    torch.manual_seed(3)
    first, second = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), first)
    assert not torch.equal(first, second)


def test_odd_sizes_non_contiguous_inputs_and_low_precision():
    torch.manual_seed(4)
    x = torch.rand(7, 13, dtype=torch.float64).t() + 1.0  # 91 elements: not a multiple of four; transposed
    out = dropout(x, 0.5)
    kept = out != 0
    assert out.shape == x.shape and torch.equal(out[kept], x[kept] * 2)  # doubling is exact
    half = dropout(torch.ones(3, 5, dtype=torch.bfloat16), 0.5)
    assert half.dtype == torch.bfloat16 and set(half.unique().tolist()) <= {0.0, 2.0}


def test_evaluation_p_zero_and_p_one_behave_as_torch():
    x = torch.randn(4, 6)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    layer = Dropout(0.5).eval()
    assert torch.equal(layer(x), x)


def test_the_module_is_a_drop_in_nn_dropout():
    layer = Dropout(0.2)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.2 and repr(layer) == repr(nn.Dropout(0.2))
    with pytest.raises(ValueError):
        Dropout(1.5)
    in_place = Dropout(0.5, inplace=True)  # stays torch's in-place dropout
    x = torch.ones(50, 50)
    in_place(x)
    assert (x == 0).any()


def test_the_models_use_it():
    model = TimeSeriesClassifier(feat_dim=3, num_classes=2, max_len=5, d_model=8, n_heads=2, n_layers=1, d_ff=16)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(isinstance(m, Dropout) for m in dropouts)


@pytest.mark.gpu
def test_on_a_gpu_it_is_torch_dropout():
    x = torch.ones(1000, device="cuda")
    torch.manual_seed(5)
    ours = dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(ours, F.dropout(x, 0.3, training=True))
