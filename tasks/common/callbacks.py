"""Callbacks every run uses on top of Lightning's own."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class RngStateCheckpoint(L.Callback):
    """Saves the Python, NumPy and torch RNG states in each checkpoint and restores them on resume.

    Lightning restores weights, optimiser and loop state but not the global RNGs, so dropout after a resume would
    draw different masks than the uninterrupted run. Checkpoints are written after a training batch or an
    evaluation, after which nothing draws from the global RNGs before the next training batch (data loaders carry
    their own generators), so restoring these states makes a resumed run continue exactly like an uninterrupted
    one on CPU.
    """

    def state_dict(self) -> dict[str, Any]:
        # numpy's state is stored as plain values so that checkpoints load with torch.load(weights_only=True)
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)]
        state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class LastCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for `last.ckpt` that keeps an evaluation which falls on a checkpointed step.

    With `every_n_train_steps=N`, Lightning writes the checkpoint at the end of training batch N, before the
    evaluation of that same step (a step-based `val_check_interval`, or the end of an epoch), and a run resumed
    from it skips that evaluation: its history would lack one entry. So the checkpoint is written again once the
    evaluation is over, at the point where Lightning itself saves after one: the end of the evaluation inside an
    epoch, the end of the training epoch after an epoch-end evaluation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._saved_step: int | None = None
        self._resave_at_epoch_end = False

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.format_checkpoint_name({}))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        steps = self._every_n_train_steps
        if steps and trainer.global_step % steps == 0 and not trainer.fast_dev_run:
            self._saved_step = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if trainer.sanity_checking or not fitting or trainer.global_step != self._saved_step:
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._resave_at_epoch_end = True
        else:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._resave_at_epoch_end:
            self._resave_at_epoch_end = False
            self._save(trainer)
