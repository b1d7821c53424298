"""The ImageNet recipe in the module (official_code.md §5.2): lr scaled by the global batch, timm's AdamW groups,
per-epoch warm-up + cosine stepped as DeiT steps it, the optional weight average, and a short run of the engine that
records top-5, parameters and MACs."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from experiments.train import train
from flowformer.models.hierarchical_vit import HierarchicalFlowformer
from tasks.imagenet.complexity import count_parameters
from tests.fixtures.imagenet import write_fixture
from tests.helpers import compose_config

TINY_MODEL = ["model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]", "model.heads=[1,1,2,4]"]
QUIET = ["logger=csv", "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "trainer.accelerator=cpu"]


def recipe_module(num_classes: int = 6, overrides: tuple[str, ...] = (), **trainer):
    """The task config's module around a tiny network, attached to a stand-in trainer (devices, accumulation)."""
    cfg = compose_config(["experiment=imagenet/hierarchical", *overrides])
    model = HierarchicalFlowformer(num_classes, image_size=32, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), heads=1)
    module = instantiate(cfg.module, model=model, num_classes=num_classes)
    module._trainer = SimpleNamespace(**{"world_size": 1, "accumulate_grad_batches": 1, "current_epoch": 0, **trainer})
    return module


def test_lr_scales_with_the_global_batch():
    module = recipe_module(world_size=6)  # the official 6 GPUs x 128 images
    assert module.global_batch == 768 and module.scaled_lr() == pytest.approx(7.5e-4)
    module = recipe_module(world_size=2, accumulate_grad_batches=2)
    assert module.scaled_lr() == pytest.approx(5e-4)


def test_no_weight_decay_on_biases_norms_layer_scale_and_positions():
    module = recipe_module()
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    kept = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert type(optimizer).__name__ == "AdamW" and {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert "pos_embed" in kept and "stages.0.0.gamma" in kept and "norm.weight" in kept and "head.bias" in kept
    assert decayed == {n for n, p in module.model.named_parameters() if p.ndim > 1 and n != "pos_embed"}


def epoch_rates(module, epochs: int) -> list[float]:
    """The lr each epoch trains at, stepping the scheduler at each epoch's end as Lightning does."""
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    rates = []
    for epoch in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        module._trainer.current_epoch = epoch
        module.lr_scheduler_step(scheduler, None)
    return rates


def test_schedule_follows_deit_epoch_by_epoch():
    # DeiT's loop: the scheduler starts at warmup_lr (1e-6) and after epoch e it calls step(e), so epoch e >= 1 trains
    # at the schedule's value for e - 1. Peak 5e-4 (global batch 512), 5 warm-up epochs, cosine to 1e-5 over 300.
    rates = epoch_rates(recipe_module(world_size=4, accumulate_grad_batches=1), 300)
    assert rates[0] == pytest.approx(1e-6)  # the scheduler's warm-up start
    assert rates[1] == pytest.approx(1e-6)  # schedule(0)
    assert rates[2] == pytest.approx(1.008e-4)  # schedule(1) = 1e-6 + (5e-4 - 1e-6) / 5
    assert rates[5] == pytest.approx(4.002e-4)  # the last warm-up epoch: schedule(4) = 1e-6 + 4 (5e-4 - 1e-6) / 5
    assert rates[6] == pytest.approx(1e-5 + 0.5 * 4.9e-4 * (1 + math.cos(math.pi * 5 / 300)))  # schedule(5)
    assert rates[151] == pytest.approx(2.55e-4)  # schedule(150), the cosine's midpoint: 1e-5 + 4.9e-4 / 2
    assert max(rates) == rates[6] and rates[6:] == sorted(rates[6:], reverse=True)


def test_the_weight_average_follows_optimiser_steps_only():
    assert recipe_module().ema is None  # off by default: DeiT reports the trained model
    module = recipe_module(overrides=("module.ema_decay=0.75",), global_step=0)
    module.on_train_start()
    average = module.ema.module
    start = [p.detach().clone() for p in module.model.parameters()]
    assert not any(p.requires_grad for p in module.ema.parameters())  # DDP waits for no gradient of it
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter.add_(1.0)
    module.on_train_batch_end(None, None, 0)  # no optimiser step yet (accumulating): the average stays
    assert all(torch.equal(a, s) for a, s in zip(average.parameters(), start))
    module._trainer.global_step = 1
    module.on_train_batch_end(None, None, 1)
    assert all(torch.allclose(a, s + 0.25) for a, s in zip(average.parameters(), start))
    assert {f"ema.module.{name}" for name, _ in module.model.named_parameters()} <= module.state_dict().keys()
    with pytest.raises(Exception, match="module.ema_decay must lie in"):  # Hydra wraps the ValueError
        recipe_module(overrides=("module.ema_decay=1.5",))


def test_top_k_beyond_the_classes_is_left_out():
    assert recipe_module(num_classes=3).top_k == (1,)
    assert recipe_module(num_classes=6).top_k == (1, 5)


def test_a_short_run_records_top5_parameters_and_macs(tmp_path):
    data_dir = tmp_path / "data"
    overrides = [f"{key}={value}" for key, value in write_fixture(data_dir).items()]
    cfg = compose_config(
        ["experiment=imagenet/hierarchical", f"paths.data_dir={data_dir}", "trainer.max_epochs=3",
         "trainer.accumulate_grad_batches=1",
         "module.warmup_epochs=1", "module.lr=0.128", "module.ema_decay=0.9", "trainer.log_every_n_steps=1", *TINY_MODEL,
         *QUIET, *overrides]
    )
    record = train(cfg, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    metrics = written["metrics"]
    assert {"test/acc", "test/acc_top5", "best/val/acc_top5", "last/val/acc"} <= metrics.keys()
    assert all(0 <= entry["val/ema_acc"] <= 1 for entry in written["history"])
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "ema.module.head.weight" in state and not torch.equal(state["ema.module.head.weight"], state["model.head.weight"])
    model = HierarchicalFlowformer(6, image_size=32, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), heads=[1, 1, 2, 4])
    assert metrics["test/params_M"] == pytest.approx(count_parameters(model) / 1e6, rel=1e-6)
    assert metrics["test/gmacs"] > 0
    assert [entry["epoch"] for entry in written["history"]] == [0, 1, 2]
    assert record.primary_value == pytest.approx(100 * max(e["val/acc"] for e in written["history"]))
    assert written["data"]["num_classes"] == 6 and written["data"]["skipped_images"] == []
    # batch 4 on one device: peak 0.128 x 4 / 512 = 1e-3, one warm-up epoch, a cosine over 3 epochs; as in DeiT,
    # epochs 0 and 1 train at 1e-6 and epoch 2 at the schedule's value for epoch 1
    with open(next((tmp_path / "run").rglob("metrics.csv"))) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("lr-AdamW/pg1")]
    rates = {int(row["step"]) // 3: float(row["lr-AdamW/pg1"]) for row in rows}
    assert rates == pytest.approx({0: 1e-6, 1: 1e-6, 2: 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 3))})
