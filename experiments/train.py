"""Training entry point: `python -m experiments.train experiment=<domain>/<Name> [overrides]` (also `flowformer-train`).

It composes the Hydra config, builds the datamodule, model, LightningModule and Trainer, fits, tests the checkpoint
the selection protocol names, and writes `metrics.json` atomically into the run directory. Sweeps use `-m`. See
README.md for the keys users rely on.

A run directory that holds a finished run is never overwritten: starting there again refuses, unless `resume=true`
(continue from its last checkpoint) or `overwrite=true` (move the finished run aside into `.replaced/`, then start).
`recipe.json` in the run directory fingerprints the recipe the run started with, and a resume under another recipe
refuses instead of mixing two. A run stopped by the cluster's preemption signal (`PreemptionCheckpoint`) leaves
`.preempted` beside its `last.ckpt`: the same command, started again by the requeued job, resumes from it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.provenance import git_sha, package_versions, utc_now
from flowformer.compile import compile_model
from results.atomic_io import write_json_atomic
from results.portable_paths import PathPortability
from results.recipe import diff_science, recipe_sha, register_resolvers, science_config
from results.run_record import RunRecord, complete_record, last_checkpoint, move_aside, write_record
from tasks.common.callbacks import PREEMPTED_MARKER
from tasks.common.objective import Objective, select_result

log = logging.getLogger("flowformer.train")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_resolvers()


def _instantiate_group(nodes: DictConfig | None) -> list[Any]:
    """Instantiate every non-null node of a callbacks/logger group (a dict of named nodes)."""
    if not nodes:
        return []
    return [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]


def best_checkpoint_path(trainer: L.Trainer, objective: Objective) -> str | None:
    """The best checkpoint of the checkpoint callback that monitors the objective (whatever the callback order);
    None when no callback monitors it or none was saved."""
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor == objective.monitor and callback.best_model_path:
            return callback.best_model_path
    return None


class FinishedRunError(RuntimeError):
    """The run directory already holds a finished run, and neither resume=true nor overwrite=true was given."""


class RecipeChangedError(RuntimeError):
    """resume=true in a run directory whose run started with another recipe."""


RECIPE_FILE = "recipe.json"


def _is_global_zero() -> bool:
    """Rank 0 of a (possibly) distributed launch; a plain run is rank 0."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


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
    path = run_dir / RECIPE_FILE
    if resume and path.is_file():
        started = json.loads(path.read_text(encoding="utf-8"))["science"]
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
        write_json_atomic(path, {"recipe_sha": recipe_sha(science), "science": science})


def _is_out_of_memory(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in message or "can't allocate memory" in message


def _out_of_memory(cfg: DictConfig, error: BaseException) -> MemoryError:
    """A MemoryError that names the configuration which did not fit and the knobs that make it fit."""
    return MemoryError(
        f"out of memory training {cfg.experiment_name} with attention {cfg.model.attention.name!r} "
        f"(data.batch_size={cfg.data.get('batch_size')}, data.max_len={cfg.data.get('max_len', 'default')}). "
        "Lower data.batch_size and raise trainer.accumulate_grad_batches by the same factor (same global batch), "
        "or use a linear-memory attention (flow, linear, performer, cosformer) for long sequences. "
        f"Original error: {error}"
    )


def train(cfg: DictConfig, run_dir: Path) -> RunRecord:
    """Run one training job described by `cfg` in `run_dir`; returns the record it wrote as metrics.json."""
    started_at, wall_start = utc_now(), time.perf_counter()
    # The commit that runs is the one checked out now: the tree may change while a long run trains.
    commit = git_sha()
    run_dir = Path(run_dir).resolve()
    preempted = run_dir / PREEMPTED_MARKER
    if preempted.is_file() and not cfg.resume:
        log.warning("%s: the run was stopped by the cluster (%s); resuming it from its last checkpoint", run_dir,
                    preempted.read_text().strip())
        with open_dict(cfg):
            cfg.resume = True
    guard_finished_run(cfg, run_dir, started_at)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model, **datamodule.model_dims(), _convert_="all")
    module = instantiate(cfg.module, model=model, **datamodule.module_dims())
    if cfg.get("compile"):
        compile_model(module.model)
    objective = module.objective

    loggers = _instantiate_group(cfg.get("logger"))
    trainer = instantiate(
        cfg.trainer, callbacks=_instantiate_group(cfg.get("callbacks")), logger=loggers or False, default_root_dir=str(run_dir)
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    science = science_config(resolved, world_size=trainer.world_size)
    check_recipe_file(run_dir, science, bool(cfg.resume))
    ckpt_path = None
    if cfg.resume:
        if last_checkpoint(run_dir).exists():
            ckpt_path = str(last_checkpoint(run_dir))
            log.info("resuming from %s", ckpt_path)
        else:
            log.warning("resume=true but %s does not exist: starting from scratch", last_checkpoint(run_dir))
    for logger in loggers:
        logger.log_hyperparams(resolved)

    fit_start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError; the CPU allocator's too
        if not _is_out_of_memory(error):
            raise
        raise _out_of_memory(cfg, error) from error
    fit_seconds = time.perf_counter() - fit_start

    # Testing the best checkpoint also reloads its (shorter) evaluation history: read it first.
    history = list(module.history)
    objective.best(history)  # an empty history is an error that says why, before testing the wrong weights
    tested = tested_checkpoint(trainer, objective, cfg.selection)
    test_start = time.perf_counter()
    test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=tested.pop("path"))[0]
    test_seconds = time.perf_counter() - test_start

    primary_metric, primary_value, metrics = select_result(objective, cfg.selection, history, test_metrics)
    portable = PathPortability(cfg.paths.runs_dir, cfg.paths.data_dir)
    record = RunRecord(
        experiment=cfg.experiment_name,
        task=cfg.task_name,
        dataset=cfg.data.get("dataset"),
        attention=cfg.model.attention.name,
        seed=int(cfg.seed),
        selection=cfg.selection,
        primary_metric=primary_metric,
        primary_value=primary_value,
        metrics=metrics,
        history=history,
        timing={
            "fit_s": round(fit_seconds, 3),
            "test_s": round(test_seconds, 3),
            "total_s": round(time.perf_counter() - wall_start, 3),
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "resumed_from": portable.path(ckpt_path) if ckpt_path else None,
        },
        data=portable.rewrite(datamodule.data_info),
        git_sha=commit,
        versions=package_versions(),
        started_at=started_at,
        finished_at=utc_now(),
        status="complete",
        run_dir=_relative_run_dir(run_dir, cfg.paths.runs_dir, portable),
        config=portable.rewrite(resolved),
        variant=cfg.get("variant"),
        recipe_sha=recipe_sha(science),
        world_size=trainer.world_size,
        tested=tested,
    )
    if trainer.is_global_zero:
        write_record(run_dir, record)
        preempted.unlink(missing_ok=True)
        # W&B runs carry the same result, so `make tables SOURCE=wandb` aggregates them like local runs
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update({"primary_metric": primary_metric, "primary_value": primary_value,
                                                  "variant": record.variant, "recipe_sha": record.recipe_sha,
                                                  "world_size": record.world_size, **metrics})
        log.info(
            "%s | %s | %s: %s = %.4g  (metrics.json in %s)",
            cfg.experiment_name, cfg.model.attention.name, cfg.selection, primary_metric, primary_value, run_dir,
        )
    return record


def tested_checkpoint(trainer: L.Trainer, objective: Objective, selection: str) -> dict[str, Any]:
    """Which weights the test scores: the best checkpoint by the objective (best_test, holdout_val), or the weights
    after the last step (final). Returns {"checkpoint", "step", "epoch", "path"}; `path` is what trainer.test loads
    (None: the weights in memory)."""
    last = {"checkpoint": "last", "step": trainer.global_step, "epoch": trainer.current_epoch, "path": None}
    if selection == "final":
        return last
    path = best_checkpoint_path(trainer, objective)
    if path is None:  # a debug run (fast_dev_run saves no checkpoint): says so in the record
        log.warning("selection=%s: no best checkpoint was saved, so the weights in memory are tested", selection)
        return last
    # the checkpoint's own counters (mmap: the weights are not read)
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return {"checkpoint": "best", "step": int(saved["global_step"]), "epoch": int(saved["epoch"]), "path": path}


def _relative_run_dir(run_dir: Path, runs_dir: str, portable: PathPortability) -> str:
    """The run directory relative to the runs root (the record travels with it), else its portable form."""
    root = Path(runs_dir).resolve()
    return run_dir.relative_to(root).as_posix() if run_dir.is_relative_to(root) else portable.path(str(run_dir))


def _finish_wandb(failed: bool) -> None:
    """Close any W&B run, also when training failed, so offline runs are synced and online runs are marked."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def run_and_finish(cfg: DictConfig, run_dir: Path) -> RunRecord:
    """`train`, then always close W&B: marked failed (exit code 1) if training raised."""
    failed = True
    try:
        record = train(cfg, run_dir)
        failed = False
        return record
    finally:
        _finish_wandb(failed)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run_and_finish(cfg, Path(HydraConfig.get().runtime.output_dir)).primary_value


if __name__ == "__main__":
    main()
