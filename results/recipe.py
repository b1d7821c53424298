"""The recipe of a run: the part of its resolved config that decides what is computed, and the check of a run
against the recipe of its table cell.

A run's resolved config (``config`` in metrics.json) holds the recipe (model, data, optimiser, schedule, trainer
limits, precision, protocol) and settings that do not change what is computed: where files go, loggers, progress
bars, loader workers, how many processes share a fixed global batch. :func:`science_config` keeps the first and
drops the second by the explicit list :data:`NON_SCIENCE` (plus a task's own ``non_science`` keys), so that a run on
8 GPUs with the paper's global batch has the recipe of a run on one GPU with gradient accumulation.

The aggregator and the reproduction planner compose each cell's expected config with Hydra's compose API, from the
overrides :func:`recipe_overrides` gives (the ones the planner runs), and compare science parts with :func:`check`:
the run is the cell's recipe, a debug run (never tabulated), or a variant of the recipe (tabulated apart, by name).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from results.roots import root
from results.run_record import run_subdir

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Keys (dotted, fnmatch patterns) that do not change what a run computes, each with the reason.
NON_SCIENCE: tuple[tuple[str, str], ...] = (
    ("paths.*", "where data and runs live"),
    ("hydra.*", "Hydra's own settings (run directory, launcher, logging)"),
    ("logger.*", "what is logged where (CSV, W&B)"),
    ("resume", "how the run starts: a resumed run ends with the weights and metrics of an uninterrupted one"),
    ("overwrite", "how the run starts: a finished run in the folder is moved aside first"),
    ("compile", "torch.compile: the same function up to float rounding (random ops draw as in eager mode)"),
    ("variant", "the name of a variant; its identity is what it changes, compared key by key"),
    ("non_science", "this list's additions from the task config"),
    ("callbacks.rich_progress_bar*", "the progress bar"),
    ("callbacks.lr_monitor*", "logs the learning rate"),
    ("callbacks.rng_state*", "saves the random state in checkpoints for exact resumes"),
    ("callbacks.last_checkpoint*", "how often last.ckpt is written (resumes are exact at any step)"),
    ("callbacks.preemption*", "saves last.ckpt and requeues on the cluster's signal (resumes are exact)"),
    ("callbacks.model_checkpoint.dirpath", "where the best checkpoint goes"),
    ("callbacks.model_checkpoint.filename", "the best checkpoint's file name"),
    ("callbacks.model_checkpoint.enable_version_counter", "file naming"),
    ("callbacks.model_checkpoint.auto_insert_metric_name", "file naming"),
    ("callbacks.model_checkpoint.save_last", "an extra copy of the last weights"),
    ("callbacks.model_checkpoint.save_weights_only", "whether the best checkpoint also holds the optimiser's state"),
    ("*.data_dir", "where the dataset lives"),
    ("*.cache_dir", "where the tokenised or decoded cache lives"),
    ("data.num_workers", "loader processes: the batches are the same"),
    ("data.pin_memory", "host memory of the loader"),
    ("data.persistent_workers", "loader processes kept between epochs"),
    ("data.prefetch_factor", "batches a loader worker prepares ahead"),
    ("trainer.accelerator", "the hardware; precision is compared on its own"),
    ("trainer.strategy", "how processes share the work (DDP flavours)"),
    ("trainer.devices", "replaced by the global batch (below)"),
    ("trainer.num_nodes", "replaced by the global batch (below)"),
    ("trainer.accumulate_grad_batches", "replaced by the global batch (below)"),
    ("data.batch_size", "replaced by the global batch (below)"),
    ("data.eval_batch_size", "evaluation batches: each sample is scored on its own, the same scores up to rounding"),
    ("data.trim_padding", "batches cut to their longest sequence: the model's function is the same (dropout draws "
                          "its masks over the shorter batch)"),
    ("trainer.enable_progress_bar", "the progress bar"),
    ("trainer.enable_model_summary", "the printed summary"),
    ("trainer.log_every_n_steps", "logging frequency"),
    ("trainer.num_sanity_val_steps", "a check before training; its metrics are discarded"),
    ("trainer.plugins", "checkpoint I/O (atomic writes)"),
    ("trainer.default_root_dir", "where Lightning writes"),
    ("trainer.deterministic", "kernel selection: the same function up to float rounding"),
    ("trainer.benchmark", "cuDNN kernel selection: the same function up to float rounding"),
    ("trainer.profiler", "profiling"),
    ("model.attention.backend", "backends compute the same function (the tests hold them equal)"),
    ("model.attention.chunk_size", "the causal chunk length: the same function (the tests hold them equal)"),
)

# A run that changed one of these is a debug run: a few batches or one batch, never a table cell or a variant.
DEBUG_KEYS = ("trainer.fast_dev_run", "trainer.overfit_batches", "trainer.limit_train_batches",
              "trainer.limit_val_batches", "trainer.limit_test_batches")

# The samples behind one optimiser update: data.batch_size x processes x trainer.accumulate_grad_batches. Runs that
# split the same global batch differently over devices and accumulation compute the same recipe.
GLOBAL_BATCH = "global_batch"
# trainer.val_check_interval counts micro-batches; in optimiser updates it does not depend on the accumulation.
EVAL_INTERVAL = "trainer.val_check_interval"

_ABSENT = "<absent>"


# --------------------------------------------------------------------------------------------- science part

def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": value}; lists are values (compared whole)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def non_science_patterns(config: Mapping[str, Any]) -> tuple[str, ...]:
    """NON_SCIENCE's patterns plus the task's own (`non_science: [...]` in conf/task/<domain>.yaml)."""
    extra = config.get("non_science") or ()
    return tuple(pattern for pattern, _ in NON_SCIENCE) + tuple(str(key) for key in extra)


def world_size_of(config: Mapping[str, Any]) -> int:
    """Processes that shared a global batch, read from the trainer config (devices x nodes; 'auto' counts 1)."""
    trainer = config.get("trainer") or {}
    devices = trainer.get("devices", 1)
    if isinstance(devices, list | tuple):
        count = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        count = int(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    else:
        count = 1
    return count * int(trainer.get("num_nodes") or 1)


def science_config(config: Mapping[str, Any], *, world_size: int | None = None,
                   patterns: Sequence[str] | None = None) -> dict[str, Any]:
    """The flattened science part of a resolved config (see the module docstring).

    `world_size` is the number of processes the run had (recorded in metrics.json), else read from the config;
    `patterns` are the non-science patterns to drop (default: those of `config` itself)."""
    flat = flatten(config)
    trainer = config.get("trainer") or {}
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    science = {key: value for key, value in flat.items()
               if not any(fnmatch.fnmatchcase(key, p) for p in (patterns or non_science_patterns(config)))}
    batch = (config.get("data") or {}).get("batch_size")
    if isinstance(batch, int):
        science[GLOBAL_BATCH] = batch * (world_size or world_size_of(config)) * accumulate
    interval = science.get(EVAL_INTERVAL)
    if isinstance(interval, int) and not isinstance(interval, bool) and accumulate > 1:
        science[EVAL_INTERVAL] = interval / accumulate
    return science


def recipe_sha(science: Mapping[str, Any]) -> str:
    """A fingerprint of a science part: the sha256 of its canonical JSON."""
    text = json.dumps(science, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------- comparing

@dataclass(frozen=True)
class KeyDiff:
    """One key whose value in a run differs from the recipe's (``<absent>`` where one side lacks the key)."""

    key: str
    found: Any
    expected: Any

    def __str__(self) -> str:
        return f"{self.key}={_show(self.found)} (recipe: {_show(self.expected)})"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def diff_science(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[KeyDiff]:
    """Keys whose values differ between two science parts, in key order."""
    keys = sorted(set(found) | set(expected))
    return [KeyDiff(key, found.get(key, _ABSENT), expected.get(key, _ABSENT)) for key in keys
            if key not in found or key not in expected or not _same(found[key], expected[key])]


def variant_label(diffs: Sequence[KeyDiff], limit: int = 3) -> str:
    """A name for an unnamed variant, usable as a folder name: its changed keys with their values
    (``trainer.max_epochs=2,trainer.precision=bf16-mixed``)."""
    parts = [f"{d.key}={_show(d.found)}".replace(" ", "") for d in diffs]
    if len(parts) <= limit:
        return ",".join(parts)
    return ",".join(parts[:limit]) + f",+{len(parts) - limit}-more"


@dataclass(frozen=True)
class RecipeCheck:
    """How a run relates to the recipe of its cell.

    kind: ``recipe`` (every science key agrees), ``variant`` (some differ: tabulated apart under ``name``) or
    ``debug`` (a debug setting differs: never tabulated). ``diffs`` are the differing keys against the paper
    recipe; ``key`` identifies a variant (runs with the same changes pool into one variant cell)."""

    kind: str
    diffs: tuple[KeyDiff, ...] = ()
    name: str | None = None

    @property
    def key(self) -> str:
        return "" if self.kind == "recipe" else recipe_sha({d.key: d.found for d in self.diffs})[:12]


def check(found: Mapping[str, Any], expected: Mapping[str, Any], *, named: Mapping[str, Mapping[str, Any]] = {},
          claimed: str | None = None) -> RecipeCheck:
    """Compare a run's science part with its cell's recipe.

    `named` maps a declared variant's name to its expected science part (the manifest's `variants`); a run that
    equals one of them is that variant. `claimed` is the name the run gave itself (root key `variant`): kept as the
    label of an undeclared variant, beside what it changed."""
    diffs = tuple(diff_science(found, expected))
    if not diffs:
        return RecipeCheck("recipe")
    if any(d.key in DEBUG_KEYS and d.found != _ABSENT for d in diffs):
        return RecipeCheck("debug", diffs)
    for name, science in named.items():
        if not diff_science(found, science):
            return RecipeCheck("variant", diffs, name)
    label = variant_label(diffs)
    return RecipeCheck("variant", diffs, f"{claimed} ({label})" if claimed and claimed != label else label)


# ---------------------------------------------------------------------------------------------- composing

def recipe_overrides(experiment: str, attention: str, seed: int | str, selection: str,
                     pinned: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """The Hydra overrides of one cell: what the planner runs and what the aggregator composes to check a run.
    `attention` and `seed` may be comma lists (a multirun sweep)."""
    return [f"experiment={experiment}", f"model/attention={attention}", f"seed={seed}", f"selection={selection}",
            *pinned, *extra]


def register_resolvers() -> None:
    """The OmegaConf resolvers the configs use; registered before any config is composed or resolved.

    - ``${run_subdir:<experiment>,<attention>,<selection>,<seed>,<variant>}``: the run-directory layout of
      `results.run_record.run_subdir`, so Hydra places runs exactly where the planner and the aggregator look;
    - ``${gpu_mixed_precision:}``: "bf16-mixed", or "16-mixed" on a GPU that cannot compute in bfloat16;
    - ``${data_root:}``, ``${runs_root:}``: `DATA_DIR` and `RUNS_DIR`, else their defaults (`results.roots`).
    """
    OmegaConf.register_new_resolver("run_subdir", run_subdir, replace=True)
    OmegaConf.register_new_resolver("gpu_mixed_precision", _gpu_mixed_precision, replace=True)
    OmegaConf.register_new_resolver("data_root", lambda: root("DATA_DIR"), replace=True)
    OmegaConf.register_new_resolver("runs_root", lambda: root("RUNS_DIR"), replace=True)


def _gpu_mixed_precision() -> str:
    """bf16-mixed, unless the GPU in sight cannot compute in bfloat16 (before Ampere). A machine without a GPU (a
    login node planning a cluster's runs) answers bf16-mixed too, so the plan names the variant the jobs will run."""
    import torch

    return "16-mixed" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16-mixed"


@lru_cache(maxsize=256)
def _composed(conf_dir: str, overrides: tuple[str, ...]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def expected_config(overrides: Sequence[str], *, conf_dir: str | Path = CONF_DIR) -> dict[str, Any]:
    """The resolved config `python -m experiments.train <overrides>` runs with (without Hydra's own node).

    Composition is cached per overrides without the seed, which is set after composing (as a command-line override
    would be), so checking the seeds of a cell composes it once."""
    seeds = [o for o in overrides if o.startswith("seed=")]
    rest = tuple(o for o in overrides if not o.startswith("seed="))
    cfg = _composed(str(Path(conf_dir).resolve()), rest).copy()
    if seeds:
        cfg.seed = int(seeds[-1].partition("=")[2])
    return OmegaConf.to_container(cfg, resolve=True)


@dataclass
class CellRecipe:
    """The expected science parts of one cell: the paper recipe and the manifest's named variants of it."""

    recipe: dict[str, Any]
    named: dict[str, dict[str, Any]] = field(default_factory=dict)
    patterns: tuple[str, ...] = ()

    def check(self, config: Mapping[str, Any], *, world_size: int | None = None,
              claimed: str | None = None) -> RecipeCheck:
        found = science_config(config, world_size=world_size, patterns=self.patterns)
        return check(found, self.recipe, named=self.named, claimed=claimed)


def cell_recipe(experiment: str, attention: str, seed: int, selection: str, *, pinned: Sequence[str] = (),
                extra: Sequence[str] = (), variants: Mapping[str, Sequence[str]] = {},
                conf_dir: str | Path = CONF_DIR) -> CellRecipe:
    """Compose a cell's recipe as the planner would run it (`pinned`: the manifest's overrides, `extra`: more
    overrides), and the recipes of its named `variants` (each adds its overrides)."""
    base = recipe_overrides(experiment, attention, seed, selection, pinned, extra)
    config = expected_config(base, conf_dir=conf_dir)
    patterns = non_science_patterns(config)
    named = {}
    for name, overrides in variants.items():
        named[name] = science_config(expected_config([*base, *overrides], conf_dir=conf_dir), patterns=patterns)
    return CellRecipe(science_config(config, patterns=patterns), named, patterns)
