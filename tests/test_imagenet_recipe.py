"""The composed experiment configs hold the published recipes: imagenet/deit_small is DeiT's (facebookresearch/deit
main.py, DeiT-S), imagenet/hierarchical the official Flowformer run's (results/paper/official_code.md §5.2)."""

from __future__ import annotations

import pytest

from tests.helpers import compose_config

# what both recipes share (DeiT's defaults, which the official Flowformer script inherits)
COMMON = {
    "module.lr": 5e-4,
    "module.reference_batch": 512,
    "module.warmup_epochs": 5,
    "module.optimizer.opt": "adamw",
    "module.optimizer.weight_decay": 0.05,
    "module.optimizer.eps": 1e-8,
    "module.scheduler.sched": "cosine",
    "module.scheduler.num_epochs": 300,
    "module.scheduler.warmup_lr": 1e-6,
    "module.scheduler.min_lr": 1e-5,
    "module.scheduler.step_on_epochs": True,
    "trainer.max_epochs": 300,
    "data.image_size": 224,
    "data.label_smoothing": 0.1,
    "data.mixup": 0.8,
    "data.cutmix": 1.0,
    "data.mixing.prob": 1.0,
    "data.mixing.switch_prob": 0.5,
    "data.mixing.mode": "batch",
    "data.train_transform.auto_augment": "rand-m9-mstd0.5-inc1",
    "data.train_transform.interpolation": "bicubic",
    "data.train_transform.color_jitter": 0.4,  # inert beside RandAugment in both
    "data.train_transform.re_mode": "pixel",
    "data.eval_transform.crop_pct": 0.875,
    "data.eval_transform.interpolation": "bicubic",
    "module.ema_decay": None,  # DeiT trains an average too, but reports the model
}
DEIT = {
    "model._target_": "flowformer.models.deit.deit_small",
    "model.drop_path": 0.1,
    "data.repeated_aug": True,
    "data.repeated_aug_repeats": 3,
    "data.train_transform.re_prob": 0.25,
    "trainer.gradient_clip_val": None,
}
OFFICIAL = {
    "model._target_": "flowformer.models.hierarchical_vit.HierarchicalFlowformer",
    "model.drop_path": 0.2,
    "model.heads": 12,
    "model.depths": [3, 3, 10, 3],
    "data.repeated_aug": False,
    "data.train_transform.re_prob": 0.0,
    "trainer.gradient_clip_val": 1.0,
}


def value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return list(node) if hasattr(node, "__len__") and not isinstance(node, str) else node


@pytest.mark.parametrize("experiment,recipe", [("imagenet/deit_small", DEIT), ("imagenet/hierarchical", OFFICIAL)])
def test_each_experiment_composes_its_published_recipe(experiment, recipe):
    cfg = compose_config([f"experiment={experiment}"])
    expected = {**COMMON, **recipe}
    assert {key: value(cfg, key) for key in expected} == expected
