"""The WikiText-103 recipe: fairseq's inverse_sqrt schedule, alone and as the experiment config builds it."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.common.schedules import InverseSqrtSchedule


def fairseq_inverse_sqrt(num_updates: int, lr: float, warmup: int, init: float) -> float:
    """fairseq's InverseSquareRootSchedule.step_update, written out independently."""
    if num_updates < warmup:
        return init + num_updates * (lr - init) / warmup
    return lr * math.sqrt(warmup) * num_updates**-0.5


def lrs_used(schedule, base_lr: float, n_steps: int) -> list[float]:
    """The lr of optimiser steps 0..n_steps-1 under LambdaLR stepped once per optimiser step (as Lightning does)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=base_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    used = []
    for _ in range(n_steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_lambda_lr_follows_fairseq_update_by_update():
    schedule = InverseSqrtSchedule(peak_lr=1e-3, warmup_updates=6, warmup_init_lr=1e-7)
    used = lrs_used(schedule, 1e-3, 20)
    assert used[0] == pytest.approx(1e-7)  # fairseq's first update runs with warmup_init_lr
    assert used[6] == pytest.approx(1e-3)  # the peak at update warmup_updates
    for step, lr in enumerate(used):
        assert lr == pytest.approx(fairseq_inverse_sqrt(step, 1e-3, 6, 1e-7), rel=1e-12)


def test_paper_schedule_points():
    schedule = InverseSqrtSchedule(peak_lr=1e-3, warmup_updates=6000, warmup_init_lr=1e-7)
    assert schedule.learning_rate(3000) == pytest.approx(1e-7 + 0.5 * (1e-3 - 1e-7))
    assert schedule.learning_rate(24_000) == pytest.approx(5e-4)  # sqrt(6000 / 24000) = 1/2
    assert schedule.learning_rate(150_000) == pytest.approx(1e-3 * math.sqrt(6000 / 150_000))
    assert max(schedule.learning_rate(s) for s in range(0, 20_000, 7)) <= 1e-3


@pytest.mark.parametrize("kwargs", [{"peak_lr": 0.0}, {"peak_lr": 1e-3, "warmup_updates": 0},
                                    {"peak_lr": 1e-3, "warmup_init_lr": 1e-2}])
def test_schedule_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError, match="module.warmup_updates"):
        InverseSqrtSchedule(**kwargs)
