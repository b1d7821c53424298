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
- the usual Lightning loaders: the training loader built with `tasks.common.sampling.seeded_loader` (the order
  depends only on the seed, and a run resumes mid-epoch on the same batches), the validation and test loaders with
  `evaluation_loader` below (under DDP every sample is evaluated exactly once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from tasks.common import sampling


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

    def pin_memory(self, requested: bool) -> bool:
        """Whether loaders pin their batches: when `data.pin_memory` asks for it and the batches go to a CUDA device
        (page-locked batches copy to it asynchronously); never for training on a CPU, where it only costs a copy."""
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        return bool(requested) and device is not None and device.type == "cuda"

    def process_share(self) -> tuple[int, int]:
        """(number of processes, this one's rank): what a loader shares a split out by; (1, 0) before a trainer."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def evaluation_loader(self, dataset: Dataset, *, batch_size: int, seed: int, **kwargs: Any) -> StatefulDataLoader:
        """A validation or test loader in dataset order that, under DDP, gives this process its share of the split
        with no sample repeated (`tasks.common.sampling.evaluation_loader`)."""
        world_size, rank = self.process_share()
        return sampling.evaluation_loader(dataset, batch_size=batch_size, seed=seed, world_size=world_size, rank=rank,
                                          **kwargs)

    def loader(self, dataset: Dataset, *, shuffle: bool, batch_size: int, seed: int,
               **kwargs: Any) -> StatefulDataLoader:
        """The training loader (`shuffle`: a new order every epoch, `tasks.common.sampling.seeded_loader`) or an
        evaluation loader (`evaluation_loader`); `kwargs` go to the loader."""
        if shuffle:
            return sampling.seeded_loader(dataset, batch_size=batch_size, seed=seed, shuffle=True, **kwargs)
        return self.evaluation_loader(dataset, batch_size=batch_size, seed=seed, **kwargs)
