"""The contract between a domain's data and the engine: what `experiments/train.py` and `experiments/reproduce.py`
ask of every datamodule.

A domain's datamodule subclasses `TaskDataModule` and provides:
- `data_status()`: whether its files are on disk, without loading them (the reproduction planner calls it on a
  freshly constructed datamodule, so constructors must not read data);
- `model_dims()`, after `setup()`: the keyword arguments the model needs from the data (feature or vocabulary
  size, number of classes, sequence length, state and action sizes...);
- `module_dims()`, after `setup()`: those the LightningModule needs (number of classes, action ranges, the
  evaluation environment...), {} by default;
- `data_info`, filled by `setup()`: the provenance written to `metrics.json` under `data` (paths, sizes, splits,
  checksums, versions), small enough to read;
- the usual Lightning loaders, built with `tasks.common.sampling.seeded_loader` so that the order depends only on
  the seed and a run resumes mid-epoch on the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L


@dataclass(frozen=True)
class DataStatus:
    """Whether a dataset is on disk. `detail` says where it was found, or names what is missing and the
    command that fetches it (e.g. "missing data/uea/X/X_TRAIN.ts; fetch it with `make data-uea`")."""

    available: bool
    detail: str


class TaskDataModule(L.LightningDataModule):
    """Base class of every domain's datamodule (see the module docstring for the contract)."""

    def __init__(self) -> None:
        super().__init__()
        self.data_info: dict[str, Any] = {}

    def data_status(self) -> DataStatus:
        raise NotImplementedError(f"{type(self).__name__} must implement data_status()")

    def model_dims(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement model_dims()")

    def module_dims(self) -> dict[str, Any]:
        return {}
