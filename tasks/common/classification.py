"""The LightningModule shared by every classification task (UEA, LRA, ImageNet).

Batches are dicts: `target` holds the labels and every other key is passed to the model as a keyword argument.
The optimiser and scheduler are Hydra partials (`_partial_: true`) completed here with the parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite. The run stops; its last checkpoint stays as it was."""


class ClassificationModule(L.LightningModule):
    """Cross-entropy training with accuracy metrics for train / val / test.

    `val_history` records (epoch, step, val accuracy) for every evaluation; it is saved in checkpoints so a resumed
    run reports the same best value as an uninterrupted one.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        num_classes: int,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.metrics = nn.ModuleDict(
            # keyed "<stage>_acc": a key "train" would shadow nn.Module.train
            {f"{stage}_acc": MulticlassAccuracy(num_classes=num_classes, average="micro") for stage in ("train", "val", "test")}
        )
        self.val_history: list[dict[str, float]] = []

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(**{key: value for key, value in batch.items() if key != "target"})

    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["target"])
        self.metrics[f"{stage}_acc"].update(logits.detach(), batch["target"])
        on_step = stage == "train"
        batch_size = batch["target"].shape[0]
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, batch_size=batch_size, prog_bar=on_step)
        self.log(f"{stage}/acc", self.metrics[f"{stage}_acc"], on_step=False, on_epoch=True, batch_size=batch_size, prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "train")
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}). The run stopped; the last checkpoint is kept unchanged. Lower the learning rate "
                "(module.optimizer.lr), enable or tighten gradient clipping (trainer.gradient_clip_val), or check the "
                "data for NaN/Inf; then rerun the same command with resume=true to continue from the last checkpoint."
            )
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        accuracy = self.trainer.callback_metrics.get("val/acc")
        if accuracy is not None:
            self.val_history.append({"epoch": self.current_epoch, "step": self.global_step, "acc": float(accuracy)})

    @staticmethod
    def summarize(
        selection: str, history: list[dict[str, float]], test_metrics: dict[str, float]
    ) -> tuple[str, float, dict[str, float]]:
        """(primary_metric, primary_value in %, all final metrics) under the selection protocol.

        best_test (paper): the validation loader was the test set, so the value is the best accuracy over all
        evaluations. holdout_val: the test accuracy of the checkpoint with the best held-out validation accuracy.
        """
        best = max(history, key=lambda record: record["acc"], default=None)
        metrics = {key: float(value) for key, value in test_metrics.items()}
        if best is not None:
            metrics.update({"best_val/acc": best["acc"], "best_val/epoch": best["epoch"], "best_val/step": best["step"]})
        if selection == "best_test" and best is not None:
            return "accuracy", 100.0 * best["acc"], metrics
        if selection in ("best_test", "holdout_val"):
            return "accuracy", 100.0 * metrics["test/acc"], metrics
        raise ValueError(f"unknown selection {selection!r}; expected 'best_test' or 'holdout_val'")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_history"] = list(self.val_history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_history = list(checkpoint.get("val_history", []))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
