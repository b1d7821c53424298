"""The LightningModule base every domain shares: optimiser and scheduler, NaN guard, evaluation history.

A domain's module subclasses `TaskModule` and implements `step(batch, stage)`: compute the loss, log its metrics
as `<stage>/<name>`, return the loss. Everything else is here:
- the optimiser and scheduler are Hydra partials (`_partial_: true`) completed with the parameters;
- a non-finite training loss stops the run with the step and the fix, leaving the last checkpoint as it was;
- `history` holds every evaluation's logged `val/*` metrics (the monitored value and the primary value among them),
  with its epoch and step; it travels in checkpoints, so a resumed run reports what an uninterrupted one would.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from tasks.common.objective import Objective


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite. The run stops; its last checkpoint stays as it was."""


class TaskModule(L.LightningModule):
    """Shared training plumbing around `model`; subclasses implement `step`.

    Args:
        model: the network (from `flowformer.models`).
        optimizer: a partial taking the parameters (`module.optimizer` in the config).
        objective: the task's monitor and primary metric (`objective` in the config).
        scheduler: a partial taking the optimiser, or None.
        scheduler_interval: "step" or "epoch".
    """

    HISTORY_KEY = "evaluation_history"

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        objective: Mapping[str, Any] | Objective,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.objective = Objective.from_config(objective)
        self.history: list[dict[str, float]] = []

    def step(self, batch: Any, stage: str) -> Tensor:
        """Loss of `batch` in `stage` ("train", "val" or "test"), after logging the stage's metrics."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(batch, stage)")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.step(batch, "train")
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}). The run stopped; the last checkpoint is kept unchanged. Lower the learning rate "
                "(module.optimizer.lr), enable or tighten gradient clipping (trainer.gradient_clip_val), or check the "
                "data for NaN/Inf; then rerun the same command with resume=true to continue from the last checkpoint."
            )
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        # Runs before any callback's on_validation_end, so a checkpoint written after an evaluation holds it.
        # A subclass that logs in this hook logs first, then calls super().on_validation_epoch_end().
        if self.trainer.sanity_checking:
            return
        logged = {key: float(value) for key, value in self.trainer.callback_metrics.items() if key.startswith("val/")}
        if self.objective.monitor not in logged:
            raise KeyError(
                f"objective.monitor is {self.objective.monitor!r}, but the evaluation at step {self.global_step} "
                f"logged {sorted(logged)}; set objective.monitor in conf/task/<domain>.yaml to one of them"
            )
        self.history.append({"epoch": self.current_epoch, "step": self.global_step, **logged})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.HISTORY_KEY] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get(self.HISTORY_KEY, []))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
