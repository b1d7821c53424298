"""Dropout with a cheaper mask on CPU: `Dropout`, a drop-in `nn.Dropout`, and the function `dropout`.

torch's CPU dropout draws its mask with `bernoulli_`: one generator call and one float conversion per element, a large
share of a training step of the UEA model on a CPU. Here each 64-bit draw of the CPU generator gives four 16-bit
lanes, and an element is kept where its lane is at least a threshold. The drop probability is p rounded to a multiple
of 2^-16 (0.1 becomes 0.1000061, a shift a hundred times smaller than the spread of the fraction a single mask of a
UEA activation drops); the kept values are scaled by 1 / (1 - p) as in torch, and the mask is saved as bools for the
backward.

On other devices and for in-place dropout it is torch's own `F.dropout`, the reference `tests/test_dropout.py` holds
this one to. `torch.compile` traces the CPU form as it is (one graph, and with inductor's `fallback_random` the draws
an eager run makes), so a compiled CPU run keeps the eager run's masks.

Both forms draw from torch's default generator, so `torch.manual_seed` fixes the masks; for one seed they are not the
masks torch's own dropout would draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LANE_VALUES = 2**16  # the values of one 16-bit lane: the resolution of the drop probability
_INT64 = torch.iinfo(torch.int64)


def keep_mask(x: Tensor, p: float) -> Tensor:
    """A bool tensor of x's shape, each element True with probability 1 - p (p rounded to a multiple of 2^-16)."""
    numel = x.numel()
    # (nearly) every 64-bit value, so that all four 16-bit lanes are uniform: randint's upper bound is exclusive
    draws = torch.randint(_INT64.min, _INT64.max, ((numel + 3) // 4,), dtype=torch.int64, device=x.device)
    threshold = round(p * _LANE_VALUES) - _LANE_VALUES // 2  # P(lane < threshold) = p for a uniform signed lane
    return draws.view(torch.int16)[:numel].view(x.shape) >= threshold


def _apply(x: Tensor, keep: Tensor, scale: float) -> Tensor:
    """x · keep · scale; the bools multiply as bytes, which is several times faster than torch.where here."""
    return torch.mul(x, keep.view(torch.uint8)).mul_(scale)


class _MaskedDropout(torch.autograd.Function):
    """apply(x, p) -> x · keep / (1 - p) with a fresh `keep_mask`; the backward applies the same mask."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep = keep_mask(x, p)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        return _apply(x, keep, ctx.scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (keep,) = ctx.saved_tensors
        return _apply(grad, keep, ctx.scale), None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """`F.dropout(x, p, training)`, with the cheaper mask where x is a floating-point CPU tensor."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point() or p >= 1.0:
        return F.dropout(x, p, training)
    return _MaskedDropout.apply(x, p)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same arguments, state and checks) that runs `dropout`; in-place dropout stays torch's."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


__all__ = ["Dropout", "dropout", "keep_mask"]
