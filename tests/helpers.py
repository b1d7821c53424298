"""Shared test helpers: composing the Hydra config and running the engine in-process on tiny data."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# A small model and quiet trainer: the engine is under test here, not the paper recipe.
TINY_UEA = [
    "model.d_model=16",
    "model.n_heads=2",
    "model.d_ff=32",
    "model.n_layers=1",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def write_tiny_uea(data_root: Path, name: str = "Tiny") -> None:
    from tests.fixtures.uea import write_uea_dataset

    write_uea_dataset(data_root, name, n_dims=3, n_classes=3, n_train=24, n_test=18, length=10, equal_length=False, min_length=6)


class PoisonWeights(L.Callback):
    """Sets every parameter to NaN before training batch `at_step` (a stand-in for a diverging run)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.fill_(float("nan"))


class InterruptAtEpoch(L.Callback):
    """Raises KeyboardInterrupt-like failure at the start of epoch `epoch` (a killed run)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated kill at the start of epoch {self.epoch}")


class SleepPerEpoch(L.Callback):
    """Slows each training epoch down so that a test can kill the process mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import time

        time.sleep(self.seconds)
