"""The LightningModule base every domain shares: optimiser and scheduler, NaN guard, evaluation history.

A domain's module subclasses `TaskModule` and implements `step(batch, stage)`: compute the loss, log its metrics
as `<stage>/<name>`, return the loss. Everything else is here:
- the optimiser and scheduler are Hydra partials (`_partial_: true`) completed with the parameters;
- a non-finite training loss stops the run with the step and the fix, leaving the last checkpoint as it was (on an
  accelerator it is checked without a host synchronisation per step: at logging steps and before any checkpoint);
- `history` holds every evaluation's logged `val/*` metrics (the monitored value and the primary value among them),
  with its epoch and step; it travels in checkpoints, so a resumed run reports what an uninterrupted one would.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from tasks.common.fused_radam import FusedRAdam
from tasks.common.host_memory import keep_freed_host_memory_for
from tasks.common.objective import Objective

# where torch's fused optimiser kernels run
FUSED_DEVICES = ("cpu", "cuda")


def fast_optimizer_options(factory: Callable[..., Any], device: torch.device, fused: bool = True) -> dict[str, bool]:
    """Keyword arguments that pick the fastest implementation of the same update on `device`: the fused kernel
    where the optimiser has one (Adam, AdamW, SGD, Adagrad: one pass over each tensor, on CPUs too) and `fused` allows
    it, else the multi-tensor form (`foreach`, e.g. RAdam). {} where the config already chooses (`fused` or `foreach`
    set) or the factory takes neither. Implementations differ only in float rounding, so the choice is no part of the
    recipe.

    `factory` is the optimiser partial (`module.optimizer`): an optimiser class, or a factory such as timm's
    `create_optimizer_v2`, which passes `foreach` on and `fused` to the optimiser it builds."""
    keywords = getattr(factory, "keywords", None) or {}
    if "fused" in keywords or "foreach" in keywords:
        return {}
    target = getattr(factory, "func", factory)
    accepted = inspect.signature(target).parameters
    if isinstance(target, type) and issubclass(target, torch.optim.Optimizer):
        has_fused = "fused" in accepted
    else:  # timm: opt="adam"/"adamw" builds torch's own class, which has a fused kernel
        has_fused = str(keywords.get("opt", "")).lower() in ("adam", "adamw")
    if fused and has_fused and device.type in FUSED_DEVICES:
        return {"fused": True}
    return {"foreach": True} if "foreach" in accepted else {}


# torch optimisers without a fused kernel, each with a subclass that computes the same update through one
FUSED_SUBCLASSES: dict[type, type] = {torch.optim.RAdam: FusedRAdam}


def fastest_optimizer(factory: Callable[..., Any], device: torch.device, fused: bool = True) -> Callable[..., Any]:
    """`factory` completed with `fast_optimizer_options`, after replacing an optimiser class that has no fused kernel
    by its subclass in `FUSED_SUBCLASSES` (same arguments, defaults and state, so the config keeps naming torch's
    class and checkpoints load in either). `fused=False` rules out torch's own fused kernels, which unscale mixed
    precision gradients inside the step; the subclasses take the gradients as given, like any optimiser, and stay
    fused."""
    target = getattr(factory, "func", factory)
    if target in FUSED_SUBCLASSES:
        factory = functools.partial(FUSED_SUBCLASSES[target], *getattr(factory, "args", ()),
                                    **(getattr(factory, "keywords", None) or {}))
        fused = True
    return functools.partial(factory, **fast_optimizer_options(factory, device, fused))


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
        self._first_bad_step: Tensor | None = None  # see _watch_loss

    def setup(self, stage: str) -> None:
        # CPU runs reuse freed host memory instead of mapping it afresh at every step (tasks/common/host_memory.py);
        # a GPU run's host allocator is left as it is
        keep_freed_host_memory_for(self.trainer.strategy.root_device.type)

    def step(self, batch: Any, stage: str) -> Tensor:
        """Loss of `batch` in `stage` ("train", "val" or "test"), after logging the stage's metrics."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(batch, stage)")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.step(batch, "train")
        if loss.device.type == "cpu":
            if not torch.isfinite(loss):
                raise self._non_finite(loss.item(), f"at global step {self.global_step} (epoch {self.current_epoch}, "
                                                    f"batch {batch_idx})")
        else:
            self._watch_loss(loss)
        return loss

    def _watch_loss(self, loss: Tensor) -> None:
        """On an accelerator, note the first non-finite loss on the device, where reading it back at every step
        would make the host wait for the device; `_check_losses` reads the note before every checkpoint and at
        every logging step."""
        step = self.global_step  # a Python int: the note needs no copy to the device
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), step, self._first_bad_step)
        if step % max(1, self.trainer.log_every_n_steps) == 0:
            self._check_losses()

    def _check_losses(self) -> None:
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            raise self._non_finite(float("nan"), f"first at global step {int(self._first_bad_step)} (found at "
                                                 f"step {self.global_step}, epoch {self.current_epoch})")

    @staticmethod
    def _non_finite(value: float, where: str) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"the training loss is {value} {where}. The run stopped; the last checkpoint is kept unchanged. Lower the "
            "learning rate (module.optimizer.lr), enable or tighten gradient clipping (trainer.gradient_clip_val), or "
            "check the data for NaN/Inf; then rerun the same command with resume=true to continue from the last "
            "checkpoint."
        )

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
        self._check_losses()  # a checkpoint never holds weights trained on a non-finite loss
        checkpoint[self.HISTORY_KEY] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get(self.HISTORY_KEY, []))

    def build_optimizer(self, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """`module.optimizer` completed with `params`, `kwargs` and the fastest implementation on this device.
        Lightning clips gradients under mixed precision only where the optimiser does not unscale them itself, as
        torch's fused optimisers do: there their multi-tensor form runs instead."""
        clipping = bool(getattr(self._trainer, "gradient_clip_val", None))
        mixed = "mixed" in str(getattr(self._trainer, "precision", ""))
        return fastest_optimizer(self.optimizer_factory, self.device, fused=not (clipping and mixed))(params, **kwargs)

    def configure_optimizers(self) -> Any:
        optimizer = self.build_optimizer(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
