"""`ImageNetModule`: classification with timm's optimiser and schedule, the lr scaled by the global batch
(results/paper/official_code.md §5.2), and the network's size recorded with the test metrics.

- The optimiser is `timm.optim.create_optimizer_v2` (AdamW): it keeps biases, norms, other 1-D parameters (the
  layer-scale γ) and the model's `no_weight_decay()` names (position embeddings) out of weight decay.
- `lr` is the rate at a global batch of `reference_batch` (512) images; the optimiser runs at
  lr × global batch / 512, the global batch being data.batch_size × devices × nodes × gradient accumulation.
- The schedule is `timm.scheduler.create_scheduler_v2` (cosine with linear warm-up), stepped once per epoch as
  DeiT's and the official code's loops step it: the scheduler sets the warm-up start (1e-6) when it is built, which
  epoch 0 trains at, and after epoch e they call `step(e)`, so epoch e ≥ 1 trains at the schedule's value for e − 1
  (epochs 0 and 1 both at 1e-6, the peak at epoch `warmup_epochs` + 1). Lightning hands timm schedulers to
  `lr_scheduler_step` at the end of each epoch.
- `ema_decay` (off by default) keeps an exponential moving average of the weights, as DeiT's `--model-ema` does
  (timm's `ModelEmaV3`, updated after every optimiser step). Its weights are part of the module's state, so
  checkpoints hold them (`ema.module.*`), and each evaluation also logs its top-1 as `val/ema_acc`. The reported
  result stays the trained model's, as in DeiT's tables.
- Testing also logs `test/params_M` (parameters, millions) and `test/gmacs` (multiply-accumulates of one image, G),
  counted as `python -m experiments.profile` counts them, so the aggregator fills those rows of the paper's table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from tasks.common.classification import ClassificationModule
from tasks.common.objective import Objective
from tasks.imagenet.complexity import count_complexity

log = logging.getLogger(__name__)


class ImageNetModule(ClassificationModule):
    """Top-k classification (hard or Mixup's soft targets) with the §5.2 optimiser and schedule.

    Args:
        model: the network; forward(x (B, 3, S, S)) -> logits (B, K).
        optimizer: partial of `timm.optim.create_optimizer_v2`, completed with the model and the scaled lr.
        scheduler: partial of `timm.scheduler.create_scheduler_v2`, completed with the optimiser and warm-up.
        objective, num_classes, top_k, label_smoothing: see `ClassificationModule`; top-k above the class count
            (top-5 of a 3-class folder) is left out.
        lr: learning rate at the reference global batch (`module.lr`).
        warmup_epochs: linear warm-up length in epochs (`module.warmup_epochs`).
        batch_size: images per device and step (`data.batch_size`).
        image_size: S, at which the MACs are counted (`data.image_size`).
        reference_batch: the global batch at which `lr` applies (512).
        ema_decay: decay of the weights' moving average (`module.ema_decay`; DeiT: 0.99996); None turns it off.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        objective: Mapping[str, Any] | Objective,
        num_classes: int,
        scheduler: Callable[..., Any],
        lr: float,
        warmup_epochs: int,
        batch_size: int,
        image_size: int,
        reference_batch: int = 512,
        top_k: Sequence[int] = (1, 5),
        label_smoothing: float = 0.1,
        ema_decay: float | None = None,
    ) -> None:
        kept = tuple(k for k in top_k if k <= num_classes)
        if kept != tuple(top_k):
            log.warning("module.top_k=%s: %d classes, so top-k is logged for k in %s", list(top_k), num_classes, kept)
        super().__init__(model, optimizer, objective, num_classes, scheduler, "epoch", kept, label_smoothing)
        self.lr, self.warmup_epochs = float(lr), int(warmup_epochs)
        self.batch_size, self.image_size, self.reference_batch = int(batch_size), int(image_size), int(reference_batch)
        self.ema: nn.Module | None = None
        if ema_decay is not None:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"module.ema_decay must lie in (0, 1) or be null (off); got {ema_decay}")
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=float(ema_decay))
            self.ema.requires_grad_(False)  # updated by hand, never by the optimiser; DDP must not wait for its grads
            self.ema_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._ema_step: int | None = None

    @property
    def global_batch(self) -> int:
        """Images per optimiser step across every device, node and accumulated micro-batch."""
        trainer = self.trainer
        return self.batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def scaled_lr(self) -> float:
        """The optimiser's peak lr: `lr` × global batch / reference batch."""
        return self.lr * self.global_batch / self.reference_batch

    def configure_optimizers(self) -> Any:
        optimizer = self.build_optimizer(self.model, lr=self.scaled_lr())
        scheduler, _ = self.scheduler_factory(optimizer, warmup_epochs=self.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # called at the end of epoch `current_epoch`, where DeiT's loop calls step(epoch)
        scheduler.step(epoch=self.current_epoch)

    def on_train_start(self) -> None:
        self._ema_step = self.global_step

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # On a CUDA device, convolution weights channels-last (NHWC): the layout cuDNN's tensor-core kernels take
        # without transposing (the datamodule sends the images so). Done here, before the model moves to the device
        # and DDP wraps it, which keep the layout. The same function up to float rounding; on a CPU nothing changes.
        if self.trainer.strategy.root_device.type == "cuda":
            self.to(memory_format=torch.channels_last)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimiser steps: a batch that only accumulates gradients leaves the average alone
        if self.ema is not None and self.global_step != self._ema_step:
            self.ema.update(self.model)
            self._ema_step = self.global_step

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.ema is not None:
            logits = self.ema.module(**{key: value for key, value in batch.items() if key != "target"})
            self.ema_accuracy.update(logits, batch["target"])
            self.log("val/ema_acc", self.ema_accuracy, on_step=False, on_epoch=True, batch_size=len(logits))

    def on_test_epoch_end(self) -> None:
        size = count_complexity(self.model, self.image_size)
        self.log("test/params_M", size.params_m)
        self.log("test/gmacs", size.gmacs)
