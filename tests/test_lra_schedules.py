"""The official LRA learning-rate schedule and optimiser, alone and as the five experiment configs build them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tasks.common.schedules import FactorSchedule
from tests.helpers import lrs_used

CONF = str(Path(__file__).resolve().parent.parent / "conf")


# Points of the official create_learning_rate_scheduler (results/paper/official_code.md §2.3), each worked out by hand
# from its definition: lr(step) = base x min(1, step / warmup) x (1 / sqrt(max(step, warmup)) for rsqrt_decay, or
# max(0, (1 + cos(pi x frac((step - warmup) / cycle))) / 2) for cosine_decay).
RSQRT = "constant * linear_warmup * rsqrt_decay"
COSINE = "constant * linear_warmup * cosine_decay"
HAND_CHECKED = [
    # (factors, warmup, cycle, base, step, lr)
    (RSQRT, 1000, 100_000, 0.005, 0, 0.0),                            # the first update has lr 0
    (RSQRT, 1000, 100_000, 0.005, 1, 0.005 / 1000 / math.sqrt(1000)),  # 1.58e-7
    (RSQRT, 1000, 100_000, 0.005, 500, 0.005 * 0.5 / math.sqrt(1000)),
    (RSQRT, 1000, 100_000, 0.005, 1000, 1.5811388300841897e-4),        # the peak, 0.005 / sqrt(1000)
    (RSQRT, 1000, 100_000, 0.005, 4000, 7.905694150420949e-5),         # 0.005 / sqrt(4000): half the peak
    (COSINE, 175, 35_000, 5e-4, 0, 0.0),
    (COSINE, 175, 35_000, 5e-4, 175, 5e-4),                           # warm-up done, cosine at its start
    (COSINE, 175, 35_000, 5e-4, 175 + 17_500, 2.5e-4),                # half a cycle: cos(pi/2) = 0
    (COSINE, 175, 35_000, 5e-4, 175 + 26_250, 5e-4 * (1 - math.sqrt(0.5)) / 2),  # three quarters: cos(3 pi / 4)
    ("constant*linear_warmup*cosine_decay", 7, 20, 0.005, 17, 0.0025),  # tiny cycle: half way
    ("constant*linear_warmup*cosine_decay", 7, 20, 0.005, 27, 0.005),   # the cycle restarts (frac), as in the code
]


@pytest.mark.parametrize("factors, warmup, cycle, base, step, lr", HAND_CHECKED)
def test_factor_product_at_hand_checked_points(factors, warmup, cycle, base, step, lr):
    schedule = FactorSchedule(factors, warmup_steps=warmup, steps_per_cycle=cycle)
    assert schedule.learning_rate(base, step) == pytest.approx(lr, rel=1e-12, abs=1e-18)


def test_lambda_lr_uses_lr_of_step_s_for_update_s():
    """Lightning steps LambdaLR once per optimiser update: update s must use lr(s), the official loop's order."""
    schedule = FactorSchedule(RSQRT, warmup_steps=10)
    used = lrs_used(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule), 0.05, 40)
    assert used[0] == 0.0 and used[5] == pytest.approx(0.05 * 0.5 / math.sqrt(10), rel=1e-12)
    assert used[10] == pytest.approx(0.05 / math.sqrt(10), rel=1e-12)
    assert used[39] == pytest.approx(0.05 / math.sqrt(39), rel=1e-12)


def test_paper_peaks():
    rsqrt = RSQRT
    listops = FactorSchedule(rsqrt, warmup_steps=1000)
    assert listops.learning_rate(0.005, 1000) == pytest.approx(1.58e-4, abs=5e-7)  # the peak
    assert listops.learning_rate(0.005, 5000) == pytest.approx(7.1e-5, abs=5e-7)
    assert max(listops.learning_rate(0.005, s) for s in range(0, 5001, 10)) == listops.learning_rate(0.005, 1000)
    retrieval = FactorSchedule(rsqrt, warmup_steps=8000)
    assert retrieval.learning_rate(0.05, 5000) == pytest.approx(3.5e-4, rel=5e-3)  # never leaves warm-up
    assert retrieval.learning_rate(0.05, 4999) < retrieval.learning_rate(0.05, 5000)
    text = FactorSchedule(rsqrt, warmup_steps=8000)
    assert text.learning_rate(0.005, 8000) == pytest.approx(5.6e-5, abs=5e-7)
    assert text.learning_rate(0.005, 20000) == pytest.approx(3.5e-5, abs=5e-7)
    image = FactorSchedule("constant * linear_warmup * cosine_decay", warmup_steps=175, steps_per_cycle=35_000)
    assert image.learning_rate(5e-4, 175) == pytest.approx(5e-4)
    assert image.learning_rate(5e-4, 35_000) < 1e-7  # cosine measured from the end of warm-up: almost 0, not 0


def test_schedule_rejects_unknown_or_incomplete_factors():
    with pytest.raises(ValueError, match="unknown lr factor"):
        FactorSchedule("constant * linear_warmup * bogus")
    with pytest.raises(ValueError, match="constant"):
        FactorSchedule("linear_warmup * rsqrt_decay")


def test_adamw_is_flax_adam_with_decoupled_decay():
    """One step of torch AdamW(0.9, 0.98, 1e-9) equals flax optim.Adam: p - lr·(m̂/(√v̂+eps)) - lr·wd·p."""
    torch.manual_seed(0)
    p0, grad = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    lr, wd, (b1, b2), eps = 0.01, 0.1, (0.9, 0.98), 1e-9
    param = torch.nn.Parameter(p0.clone())
    optimizer = torch.optim.AdamW([param], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    param.grad = grad.clone()
    optimizer.step()
    m_hat = (1 - b1) * grad / (1 - b1)
    v_hat = (1 - b2) * grad**2 / (1 - b2)
    expected = p0 - lr * m_hat / (v_hat.sqrt() + eps) - lr * wd * p0
    torch.testing.assert_close(param.detach(), expected)


# Per task: (experiment, base lr, weight decay, max_steps, eval every, batch, [(step, expected lr)])
RECIPES = [
    ("listops", 0.005, 0.1, 5000, 50, 32, [(1000, 0.005 / math.sqrt(1000)), (500, 0.005 * 0.5 / math.sqrt(1000))]),
    ("text", 0.005, 0.1, 20_000, 100, 32, [(8000, 0.005 / math.sqrt(8000)), (20_000, 0.005 / math.sqrt(20_000))]),
    ("retrieval", 0.05, 0.1, 5000, 100, 32, [(5000, 0.05 * 5000 / 8000 / math.sqrt(8000))]),
    ("image", 5e-4, 0.0, 35_000, 175, 256, [(175, 5e-4), (17_675, 5e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))]),
    ("pathfinder", 1e-4, 0.0, 62_400, 312, 512, [(312, 1e-4), (31_512, 1e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))]),
]


@pytest.mark.parametrize("task, lr, wd, max_steps, every, batch, points", RECIPES, ids=[r[0] for r in RECIPES])
def test_experiment_configs_build_the_official_optimiser_and_schedule(task, lr, wd, max_steps, every, batch, points):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment=lra/{task}"])
    assert cfg.experiment_name == f"lra/{task}" and cfg.task_name == "lra"
    assert cfg.model.attention.name == "flow_lra_official"  # the variant that produced the paper's LRA numbers
    assert cfg.trainer.max_steps == max_steps and cfg.trainer.val_check_interval == every
    assert cfg.trainer.check_val_every_n_epoch is None and cfg.trainer.max_epochs == -1
    assert cfg.data.batch_size == batch and cfg.module.scheduler_interval == "step"

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = instantiate(cfg.module.optimizer)([param])
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (lr, (0.9, 0.98), 1e-9, wd)
    scheduler = instantiate(cfg.module.scheduler)(optimizer)
    schedule = scheduler.lr_lambdas[0]
    for step, expected in points:
        assert lr * schedule(step) == pytest.approx(expected, rel=1e-9), (task, step)
