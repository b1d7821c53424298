"""The WikiText-103 recipe: fairseq's inverse_sqrt schedule, alone and as the experiment config builds it."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from flowformer.models.transformer_lm import TransformerLM
from tasks.common.schedules import InverseSqrtSchedule
from tests.helpers import compose_config, lrs_used


def fairseq_inverse_sqrt(num_updates: int, lr: float, warmup: int, init: float) -> float:
    """fairseq's InverseSquareRootSchedule.step_update, written out independently."""
    if num_updates < warmup:
        return init + num_updates * (lr - init) / warmup
    return lr * math.sqrt(warmup) * num_updates**-0.5


def test_lambda_lr_follows_fairseq_update_by_update():
    schedule = InverseSqrtSchedule(peak_lr=1e-3, warmup_updates=6, warmup_init_lr=1e-7)
    used = lrs_used(lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), 1e-3, 20)
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


def test_experiment_config_is_the_papers_recipe():
    cfg = compose_config(["experiment=wikitext103/transformer_lm"])
    assert (cfg.experiment_name, cfg.task_name, cfg.selection) == ("wikitext103/transformer_lm", "wikitext103",
                                                                   "holdout_val")
    assert dict(cfg.objective) == {"monitor": "val/loss", "mode": "min", "primary": "ppl", "label": "perplexity",
                                   "scale": 1}
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff) == (512, 6, 8, 2048)
    assert cfg.model.dropout == 0.1 and cfg.model.activation == "relu" and cfg.model.tie_embeddings
    assert cfg.model.attention.name == "flow" and cfg.model.attention.clamp == 5.0  # the NLP clamp
    assert (cfg.data.tokens_per_sample, cfg.data.context_window, cfg.data.batch_size) == (512, 400, 4)
    assert cfg.trainer.max_steps == 150_000 and cfg.trainer.gradient_clip_val is None
    tokens_per_update = cfg.data.batch_size * cfg.data.tokens_per_sample * cfg.trainer.accumulate_grad_batches
    assert tokens_per_update == 32_768  # 2,048 tokens per batch x 16 accumulation steps on one GPU
    assert cfg.trainer.val_check_interval == 1000 * cfg.trainer.accumulate_grad_batches  # every 1,000 updates

    model = TransformerLM(64, **{k: v for k, v in cfg.model.items() if k != "_target_"} | {"n_layers": 1})
    module = instantiate(cfg.module, model=model, eval_splits=("valid", "test"))
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW)  # fairseq's Adam decays decoupled from the gradient
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.98), 1e-8, 0.01)
    assert group["lr"] == pytest.approx(1e-7)  # the first update
    assert scheduler.lr_lambdas[0].learning_rate(6000) == pytest.approx(1e-3)
    assert setup["lr_scheduler"]["interval"] == "step"


