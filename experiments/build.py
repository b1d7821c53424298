"""The pieces of a run, built from its config the same way by training and by evaluation.

The datamodule is set up first (`prepare_data`, `setup("fit")`): the model and the module take their sizes from
the data (`model_dims()`, `module_dims()`), so both entry points build exactly the network a checkpoint holds. With
`compile=true` the model is compiled in place (its parameter names, and so its checkpoints, stay the eager ones).
"""
from __future__ import annotations

from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from flowformer.compile import compile_model
from tasks.common.datamodule import TaskDataModule


def build_task(cfg: DictConfig) -> tuple[TaskDataModule, L.LightningModule]:
    """(datamodule, module) of `cfg`, seeded with `cfg.seed` first (the model's initial weights come from it)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model: Any = instantiate(cfg.model, **datamodule.model_dims(), _convert_="all")
    module = instantiate(cfg.module, model=model, **datamodule.module_dims())
    if cfg.get("compile"):
        compile_model(module.model)
    return datamodule, module
