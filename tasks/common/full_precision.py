"""Evaluations that produce reported numbers run in full precision, whatever precision trained the model.

Under `trainer.precision=bf16-mixed` (what `trainer=gpu` picks) Lightning wraps every validation and test step in
`torch.autocast`. The official evaluations the paper reports ran in fp32 (fairseq's `eval_lm`, the Decision
Transformer's rollouts), so a domain whose reported number comes from such an evaluation opens this context in its
step: the weights are fp32 under mixed precision, and inside it every op computes in fp32 again.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


@contextmanager
def full_precision(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """Switch autocast off on `device`'s type for the enclosed code (a no-op when `enabled` is False, so the same
    step serves a `module.fp32_eval=false` run that evaluates in the trainer's precision)."""
    device_type = torch.device(device).type
    with torch.autocast(device_type=device_type, enabled=False) if enabled else nullcontext():
        yield
