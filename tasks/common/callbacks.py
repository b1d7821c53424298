"""Callbacks every run uses on top of Lightning's own."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from results.run_record import PREEMPTED_MARKER, last_checkpoint

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU, and CUDA when present) random states."""
    # numpy's state is stored as plain values so that checkpoints load with torch.load(weights_only=True)
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state of `rng_state`."""
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RngStateCheckpoint(L.Callback):
    """Per-process random streams: seeded apart under DDP, saved in each checkpoint and restored on resume.

    - **Seeding.** Every process builds the model from the run's seed, so the initial weights agree on every rank.
      Then, before training, process r > 0 reseeds its global generators with seed + r (as DeiT and the official
      vision code do), so each rank draws its own dropout and drop-path masks and its own augmentation in the main
      process (Mixup/CutMix); rank 0 keeps the run's stream, so a single process trains as it always did. Loader
      workers are seeded per rank by Lightning (seed_everything(workers=True)). The same seed and world size give
      the same run.
    - **Resume.** Lightning restores weights, optimiser and loop state but not the global RNGs, so dropout after a
      resume would draw different masks than the uninterrupted run. Each checkpoint holds every process's states
      (gathered from all ranks; rank 0 writes the file) and each process restores its own. Checkpoints are written
      after a training batch or an evaluation, after which nothing draws from the global RNGs before the next
      training batch (data loaders carry their own generators), so a resumed run continues exactly like an
      uninterrupted one on CPU.
    """

    KEY = "rng_states"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.global_rank > 0:
            seed_all(int(os.environ.get("PL_GLOBAL_SEED", "0")) + trainer.global_rank)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = [rng_state()]
        if trainer.world_size > 1:  # every process saves a checkpoint together; rank 0's file holds them all
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, rng_state())
        checkpoint[self.KEY] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(self.KEY)
        if not states:
            return
        if len(states) != trainer.world_size:
            log.warning("the checkpoint holds the random states of %d processes, this run has %d: process %d "
                        "continues from rank 0's (an exact continuation needs the same world size)",
                        len(states), trainer.world_size, trainer.global_rank)
        set_rng_state(states[trainer.global_rank] if len(states) == trainer.world_size else states[0])


class LastCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for `last.ckpt` that keeps an evaluation which falls on a checkpointed step.

    With `every_n_train_steps=N`, Lightning writes the checkpoint at the end of training batch N, before the
    evaluation of that same step (a step-based `val_check_interval`, or the end of an epoch), and a run resumed
    from it skips that evaluation: its history would lack one entry. So the checkpoint is written again once the
    evaluation is over, at the point where Lightning itself saves after one: the end of the evaluation inside an
    epoch, the end of the training epoch after an epoch-end evaluation.

    With `every_n_epochs`, an epoch's save is skipped while the last one is under `min_interval_s` old, except after
    the last epoch (or when the run stops): short epochs (a UEA epoch takes seconds) would otherwise spend a
    noticeable share of the run writing checkpoints, and a killed run resumes from at most that many seconds back.
    Rank 0's clock decides for every process, since all of them take part in a save.
    """

    def __init__(self, *args: Any, min_interval_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_interval_s = float(min_interval_s)
        self._saved_step: int | None = None
        self._resave_at_epoch_end = False
        self._epoch_save_time: float | None = None

    def _epoch_save_is_due(self, trainer: L.Trainer) -> bool:
        """Whether this epoch's end may write last.ckpt (Lightning's own `every_n_epochs` rule still applies)."""
        epochs = self._every_n_epochs
        if not self.min_interval_s or not epochs or (trainer.current_epoch + 1) % epochs:
            return True
        now = time.monotonic()
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        due = (self._epoch_save_time is None or now - self._epoch_save_time >= self.min_interval_s or last_epoch
               or trainer.should_stop)
        due = trainer.strategy.broadcast(due, src=0)
        if due:
            self._epoch_save_time = now
        return due

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
        if self._epoch_save_is_due(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        if self._resave_at_epoch_end:
            self._resave_at_epoch_end = False
            self._save(trainer)


class RunPreempted(RuntimeError):
    """The run stopped on the cluster's preemption or requeue signal after saving last.ckpt; it resumes from it."""


class PreemptionCheckpoint(L.Callback):
    """Saves `last.ckpt` and stops when the cluster announces a preemption or the end of the time limit.

    SLURM sends a signal some time before it stops a job (`#SBATCH --signal=USR1@90`; submitit's launcher asks for
    USR2). On that signal this callback notes it; at the end of the next training batch (a consistent point:
    weights, optimiser, loop and loader positions all belong to one step) every process saves `last.ckpt`, rank 0
    leaves the marker `.preempted` in the run directory and requeues the job (the signal's previous handler, e.g.
    submitit's, which resubmits the same job; else `scontrol requeue $SLURM_JOB_ID` when the job runs under
    SLURM), and the run stops with `RunPreempted`. When the job starts again with the same command,
    `experiments/train.py` finds the marker and resumes from `last.ckpt` (as `resume=true` would), so the requeued
    run ends with the result of an uninterrupted one.

    Under DDP the processes agree on stopping every `check_every_n_steps` steps (one all-reduce of a flag), so that
    they all save at the same step; a single process checks its flag every step at no cost.

    Args:
        signals: signal names to handle, e.g. ["SIGUSR1", "SIGUSR2"].
        check_every_n_steps: how often processes of a DDP run compare notes (a signal is honoured within that many
            steps; SLURM's warning leaves minutes).
    """

    def __init__(self, signals: Sequence[str] = ("SIGUSR1", "SIGUSR2"), check_every_n_steps: int = 20) -> None:
        self.signals = [getattr(signal, name) for name in signals]
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Registered before Lightning's own SLURM handler, which then stands aside (it writes hpc_ckpt_<n>.ckpt instead)
        if stage != "fit" or not hasattr(signal, "SIGUSR1"):
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._note)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            if trainer.global_step % self.check_every_n_steps:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        run_dir = Path(trainer.default_root_dir)
        trainer.save_checkpoint(last_checkpoint(run_dir))
        signum = self.received or self.signals[0]
        if trainer.is_global_zero:
            (run_dir / PREEMPTED_MARKER).write_text(f"{signal.Signals(signum).name} at step {trainer.global_step}\n")
            self._requeue(signum)
        raise RunPreempted(f"stopped on {signal.Signals(signum).name} at step {trainer.global_step}: last.ckpt saved "
                           f"in {run_dir}; starting the same command again resumes from it")

    def _requeue(self, signum: int) -> None:
        previous = self._previous.get(signum)
        if callable(previous):  # submitit's handler resubmits the job and exits
            previous(signum, None)
        elif os.environ.get("SLURM_JOB_ID"):
            job = os.environ["SLURM_JOB_ID"]
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            log.warning("requeue of SLURM job %s: %s", job, "done" if result.returncode == 0 else result.stderr.strip())
