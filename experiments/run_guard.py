"""What may start in a run directory, checked before a run trains.

- A finished run is never overwritten: starting in its directory again refuses, unless `resume=true` (continue
  from its last checkpoint) or `overwrite=true` (the finished run is moved into `.replaced/<time>/`, then the run
  starts over).
- `recipe.json` fingerprints the recipe a run started with, and a resume under another recipe refuses instead of
  mixing two.
- A run the cluster stopped (`tasks.common.callbacks.PreemptionCheckpoint`) leaves `.preempted` beside its
  `last.ckpt`: the same command, started again by the requeued job, resumes from it.

Under DDP every process runs these checks with the same config; only rank 0 writes or moves files.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from results.atomic_io import write_json_atomic
from results.recipe import diff_science, recipe_sha
from results.run_record import PREEMPTED_MARKER, RECIPE_FILE, complete_record, move_aside, started_science

log = logging.getLogger("flowformer.train")


class FinishedRunError(RuntimeError):
    """The run directory already holds a finished run, and neither resume=true nor overwrite=true was given."""


class RecipeChangedError(RuntimeError):
    """resume=true in a run directory whose run started with another recipe."""


def _is_global_zero() -> bool:
    """Rank 0 of a (possibly) distributed launch, before the trainer exists: the ranks Lightning's launcher, torchrun
    and SLURM (one task per process) put in the environment; a plain run is rank 0."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def guard_finished_run(cfg: DictConfig, run_dir: Path, started_at: str) -> None:
    """Refuse to start over a finished run, or move it aside under overwrite=true (see the module docstring)."""
    finished = complete_record(run_dir)
    if finished is None or cfg.resume:
        return
    if not cfg.get("overwrite"):
        raise FinishedRunError(
            f"{run_dir} holds a finished run ({finished['primary_metric']} = {finished['primary_value']:.4g}, "
            f"finished {finished['finished_at']}); nothing was changed. Rerun with resume=true to continue it from "
            f"its last checkpoint (it ends where it ended and is scored again), with overwrite=true to move it aside "
            f"into {run_dir}/.replaced/ and start over, or give this run another directory (hydra.run.dir=...)."
        )
    if _is_global_zero():
        # Hydra already wrote this launch's .hydra/ and log file into the folder: those stay with the new run
        moved = move_aside(run_dir, started_at, keep=(".hydra", f"{HydraConfig.get().job.name}.log")
                           if HydraConfig.initialized() else ())
        log.warning("overwrite=true: the finished run in %s was moved to %s", run_dir, moved)


def check_recipe_file(run_dir: Path, science: dict[str, Any], resume: bool) -> None:
    """Write recipe.json for a new run; on resume, refuse when the run started with another recipe."""
    started = started_science(run_dir) if resume else None
    if started is not None:
        diffs = diff_science(science, started)
        if diffs:
            raise RecipeChangedError(
                f"resume=true, but the run in {run_dir} started with another recipe ({RECIPE_FILE}): "
                + "; ".join(f"{d.key} is now {d.found!r}, the run started with {d.expected!r}" for d in diffs)
                + ". Resume with the run's own overrides, or start over with overwrite=true (the old run is moved "
                "aside) or in another directory."
            )
        return
    if _is_global_zero():
        write_json_atomic(run_dir / RECIPE_FILE, {"recipe_sha": recipe_sha(science), "science": science})


def resume_if_preempted(cfg: DictConfig, run_dir: Path) -> None:
    """Set `resume=true` for a run the cluster stopped (its `.preempted` marker), as the requeued job needs."""
    marker = run_dir / PREEMPTED_MARKER
    if marker.is_file() and not cfg.resume:
        log.warning("%s: the run was stopped by the cluster (%s); resuming it from its last checkpoint", run_dir,
                    marker.read_text().strip())
        with open_dict(cfg):
            cfg.resume = True
