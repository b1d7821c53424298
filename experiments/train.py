"""Training entry point: `python -m experiments.train experiment=<domain>/<Name> [overrides]` (also `flowformer-train`).

It composes the Hydra config, builds the datamodule, model, LightningModule and Trainer, fits, tests the checkpoint
the selection protocol names, and writes `metrics.json` atomically into the run directory. Sweeps use `-m`. See
README.md for the keys users rely on.

What may start in a run directory (a finished run is never overwritten, a resume must keep its recipe, a run the
cluster stopped resumes) is `experiments/run_guard.py`.
"""

from __future__ import annotations

import logging
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

from experiments.build import build_task
from experiments.provenance import git_sha, package_versions, utc_now
from experiments.run_guard import check_recipe_file, guard_finished_run, resume_if_preempted
from results.portable_paths import PathPortability
from results.recipe import recipe_sha, register_resolvers, science_config
from results.run_record import PREEMPTED_MARKER, WANDB_SUMMARY_FIELDS, RunRecord, last_checkpoint, write_record
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
    resume_if_preempted(cfg, run_dir)
    guard_finished_run(cfg, run_dir, started_at)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    datamodule, module = build_task(cfg)
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
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        # W&B runs carry the same result, so `make tables SOURCE=wandb` aggregates them like local runs
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                fields = {key: getattr(record, key) for key in WANDB_SUMMARY_FIELDS}
                logger.experiment.summary.update({"primary_metric": primary_metric, "primary_value": primary_value,
                                                  **fields, **metrics})
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
