"""The WikiText recipe's shape (step-based, gradient accumulation, evaluations between checkpoints) resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.train import train
from tests.fixtures.wikitext103 import write_fixture
from tests.helpers import HARNESS, compose_config


def without_timing(values):
    """Metrics minus the tokens-per-second figures, which depend on the machine's load."""
    if isinstance(values, list):
        return [without_timing(entry) for entry in values]
    return {key: value for key, value in values.items() if not key.endswith("tokens_per_s")}


def test_killed_lm_run_resumes_to_the_uninterrupted_result(tmp_path):
    data_dir = tmp_path / "data"
    fixture = write_fixture(data_dir)
    base = [
        "experiment=wikitext103/transformer_lm", f"paths.data_dir={data_dir}",
        *[f"{key}={value}" for key, value in fixture.items()],
        "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", "module.warmup_updates=2",
        "trainer.accumulate_grad_batches=2", "trainer.max_steps=7", "trainer.val_check_interval=6",
        "callbacks.last_checkpoint.every_n_train_steps=2", "logger=csv", "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0",
    ]

    def go(name: str, *extra: str) -> dict:
        train(compose_config(base + [HARNESS] + list(extra)), tmp_path / name)
        return json.loads((tmp_path / name / "metrics.json").read_text())

    uninterrupted = go("full")
    with pytest.raises(RuntimeError, match="simulated kill at global step 5"):
        go("resumed", "+callbacks.kill._target_=tests.helpers.InterruptAtStep", "+callbacks.kill.step=5")
    resumed = go("resumed", "resume=true")
    assert resumed["timing"]["resumed_from"].endswith("last.ckpt")
    assert len(uninterrupted["history"]) == 2  # evaluations after updates 3 and 6
    assert without_timing(resumed["history"]) == without_timing(uninterrupted["history"])
    assert without_timing(resumed["metrics"]) == without_timing(uninterrupted["metrics"])
    full, again = (torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
                   for name in ("full", "resumed"))
    assert all(torch.equal(full[key], again[key]) for key in full)
