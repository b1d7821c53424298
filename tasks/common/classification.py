"""Classification (UEA, LRA, ImageNet): cross-entropy with top-k accuracy, hard or soft targets.

Batches are dicts: `target` holds the labels (int64 (B,), or float (B, K) class probabilities from Mixup/CutMix
with label smoothing) and every other key is passed to the model as a keyword argument.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tasks.common.module import TaskModule
from tasks.common.objective import Objective


def accuracy_name(k: int) -> str:
    """The logged name of top-k accuracy: `acc` for k = 1, `acc_top<k>` otherwise (e.g. `test/acc_top5`)."""
    return "acc" if k == 1 else f"acc_top{k}"


class ClassificationModule(TaskModule):
    """Cross-entropy training with top-k accuracy for train / val / test.

    Args:
        num_classes: K, from the datamodule (`module_dims()`).
        top_k: the accuracies logged, e.g. (1, 5) for ImageNet.
        label_smoothing: smoothing of hard targets in the training loss (soft targets arrive already smoothed).
        (model, optimizer, objective, scheduler, scheduler_interval: see `TaskModule`.)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        objective: Mapping[str, Any] | Objective,
        num_classes: int,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        top_k: Sequence[int] = (1,),
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(model, optimizer, objective, scheduler, scheduler_interval)
        self.top_k = tuple(int(k) for k in top_k)
        if any(not 1 <= k <= num_classes for k in self.top_k):
            raise ValueError(f"module.top_k={list(self.top_k)} must lie in [1, num_classes={num_classes}]")
        self.label_smoothing = float(label_smoothing)
        # keyed "<stage>_<name>": a key "train" would shadow nn.Module.train. Metrics keep sums and counts, which
        # DDP adds over the processes: an evaluation scores each example once, whatever the number of processes.
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{accuracy_name(k)}": MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")
                for stage in ("train", "val", "test")
                for k in self.top_k
            }
        )
        self.metrics.update({f"{stage}_loss": MeanMetric() for stage in ("val", "test")})

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(**{key: value for key, value in batch.items() if key != "target"})

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch)
        target = batch["target"]
        soft = target.is_floating_point()
        # smoothing regularises training; evaluation reports the plain cross-entropy
        smoothing = self.label_smoothing if stage == "train" and not soft else 0.0
        loss = F.cross_entropy(logits, target, label_smoothing=smoothing)
        # Mixed targets have no single class: accuracy is scored against the dominant one.
        labels = target.argmax(dim=-1) if soft else target
        on_step = stage == "train"
        batch_size = target.shape[0]
        if on_step:
            self.log(f"{stage}/loss", loss, on_step=True, on_epoch=True, batch_size=batch_size, prog_bar=True)
        else:  # the mean over the examples of all processes (Lightning's own mean would average their means)
            self.metrics[f"{stage}_loss"].update(loss.detach(), weight=batch_size)
            self.log(f"{stage}/loss", self.metrics[f"{stage}_loss"], on_step=False, on_epoch=True, batch_size=batch_size)
        for k in self.top_k:
            metric = self.metrics[f"{stage}_{accuracy_name(k)}"]
            metric.update(logits.detach(), labels)
            self.log(f"{stage}/{accuracy_name(k)}", metric, on_step=False, on_epoch=True, batch_size=batch_size,
                     prog_bar=k == 1)
        return loss
