"""The run record (``metrics.json``) and the run-directory layout: defined here once, for writer and reader.

The training entry point writes a :class:`RunRecord`; the aggregator, the reproduction planner and the W&B
reader validate what they read with the same class. This module imports only the standard library, so the
training side and the results side can both import it without pulling each other in.
"""
from __future__ import annotations

import json
import math
import shutil
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from results.atomic_io import write_json_atomic

METRICS_FILE = "metrics.json"
# The selection protocols (root key `selection`; recorded in every run, never pooled in a table):
# - best_test: the evaluations during training score the test set and the best one is reported (the paper's own
#   protocol where its code selected on the test set);
# - holdout_val: a validation split held out of the training data picks the checkpoint, the test set is scored once;
# - final: the weights after the last step are scored once on the test set (evaluations during training score the
#   held-out split, for monitoring only).
SELECTIONS = ("best_test", "holdout_val", "final")


def checked_selection(selection: str) -> str:
    """`selection` if it names a protocol, else a ValueError that lists them (for datamodules and the engine)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}: expected one of {', '.join(SELECTIONS)} (root key `selection`)")
    return selection


def validates_on_test(selection: str) -> bool:
    """Whether the evaluations during training score the test set (best_test) rather than a held-out split."""
    return selection == "best_test"
COMPLETE = "complete"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
# Runs that `overwrite=true` moved aside: <run_dir>/.replaced/<UTC time>/ (hidden: the aggregator does not read it)
REPLACED_DIR = ".replaced"
# The science part of the config a run started with (experiments/run_guard.py): a resume must match it
RECIPE_FILE = "recipe.json"
# record fields that experiments.train also puts in a W&B run's summary, beside the metrics (results/wandb_source.py
# reads them back)
WANDB_SUMMARY_FIELDS = ("variant", "recipe_sha", "world_size")
# Left by a run the cluster stopped (tasks/common/callbacks.py PreemptionCheckpoint): the next start resumes it
PREEMPTED_MARKER = ".preempted"


@dataclass(frozen=True)
class RunRecord:
    """What one finished run says about itself.

    Identity: ``experiment`` (``<domain>/<Name>``), ``task``, ``dataset``, ``attention``, ``seed``, ``selection``.
    Result: ``primary_metric`` and ``primary_value`` (in the paper's unit: accuracy in %, perplexity as is, D4RL
    score x100), ``metrics`` (every final metric), ``history`` (every evaluation). Provenance: ``timing``,
    ``data`` (what the datamodule read), ``git_sha``, ``versions``, ``started_at``/``finished_at``, ``status``,
    ``run_dir`` and the resolved ``config``. Recipe: ``variant`` (a named departure from the paper recipe, None for
    the recipe itself), ``recipe_sha`` (the fingerprint of the config's science part, ``results.recipe``),
    ``world_size`` (processes that shared the global batch) and ``tested`` (which checkpoint the test scored:
    ``{"checkpoint": "best" | "last", "step": ..., "epoch": ...}``).

    Paths are portable (``results.portable_paths``): ``run_dir`` is relative to the runs root, and paths in
    ``config`` and ``data`` start with ``$RUNS_DIR``, ``$DATA_DIR`` or ``<package>:`` where they lie below one.
    """

    experiment: str
    task: str
    dataset: str | None
    attention: str
    seed: int
    selection: str
    primary_metric: str
    primary_value: float
    metrics: dict[str, Any]
    git_sha: str | None
    versions: dict[str, Any]
    started_at: str
    finished_at: str
    status: str
    config: dict[str, Any]
    history: list[Any] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None
    variant: str | None = None
    recipe_sha: str | None = None
    world_size: int | None = None
    tested: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _accepted(hint: Any) -> tuple[type, ...]:
    """The runtime types a field annotation admits (``float`` also admits ``int``)."""
    parts = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    accepted: list[type] = []
    for part in parts:
        base = type(None) if part is None else (get_origin(part) or part)
        accepted += [base, int] if base is float else [base]
    return tuple(accepted)


_HINTS = get_type_hints(RunRecord)
FIELD_TYPES: dict[str, tuple[type, ...]] = {f.name: _accepted(_HINTS[f.name]) for f in fields(RunRecord)}
REQUIRED_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(RunRecord) if f.default is MISSING and f.default_factory is MISSING
)


def validate_record(data: Any) -> tuple[str, list[str]]:
    """Check a parsed ``metrics.json`` against :class:`RunRecord`.

    Returns ``(kind, errors)``: kind is ``"malformed"`` for a wrong structure or type, ``"partial"`` for a run
    that did not finish (status not complete, or required fields missing); ``errors`` is empty when usable.
    """
    if not isinstance(data, dict):
        return "malformed", [f"top level is {type(data).__name__}, expected a JSON object"]
    errors = []
    for name, accepted in FIELD_TYPES.items():
        if name not in data:
            continue
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, accepted):
            expected = "/".join(t.__name__ for t in accepted)
            errors.append(f"`{name}` is {value!r} ({type(value).__name__}), expected {expected}")
    value = data.get("primary_value")
    if isinstance(value, float) and not math.isfinite(value):
        errors.append(f"`primary_value` is {value!r}, expected a finite number")
    if isinstance(data.get("selection"), str) and data["selection"] not in SELECTIONS:
        errors.append(f"`selection` is {data['selection']!r}, expected one of {SELECTIONS}")
    if errors:
        return "malformed", errors
    missing = [name for name in REQUIRED_FIELDS if name not in data]
    if data.get("status") != COMPLETE:
        reason = (f"status is {data.get('status')!r}, not {COMPLETE!r} (the run did not finish; "
                  "`make reproduce-<table>` resumes it)")
        return "partial", [reason] + ([f"missing field(s) {missing}"] if missing else [])
    if missing:
        return "partial", [f"missing field(s) {missing}"]
    return "", []


def write_record(run_dir: str | Path, record: RunRecord) -> Path:
    """Write ``record`` as ``<run_dir>/metrics.json`` atomically (readers never see half a file)."""
    path = Path(run_dir) / METRICS_FILE
    write_json_atomic(path, record.to_dict())
    return path


# ------------------------------------------------------------------------------------ run-directory layout

def run_subdir(experiment: str, attention: str, selection: str, seed: int | str, variant: str | None = None) -> str:
    """The deterministic run directory of a cell, relative to the runs root:
    ``<experiment>/<attention>/<selection>/seed<seed>`` for the paper recipe (the experiment name has its own ``/``),
    ``<experiment>/<attention>/<selection>/<variant>/seed<seed>`` for a named variant of it.

    Hydra's ``hydra.run.dir`` and multirun ``subdir`` (``conf/hydra/default.yaml``, through the ``run_subdir``
    resolver), the reproduction planner and the aggregator's layout check all use this function.
    """
    variant_part = f"{variant_folder(variant)}/" if variant else ""
    return f"{experiment}/{attention}/{selection}/{variant_part}seed{seed}"


def variant_folder(variant: str) -> str:
    """A variant's name as one folder name (a ``/`` in it becomes ``_``)."""
    return str(variant).replace("/", "_")


def run_dir_of(runs_dir: str | Path, experiment: str, attention: str, selection: str, seed: int,
               variant: str | None = None) -> Path:
    """The run directory of a cell under ``runs_dir``."""
    return Path(runs_dir) / run_subdir(experiment, attention, selection, seed, variant)


def last_checkpoint(run_dir: str | Path) -> Path:
    """``<run_dir>/checkpoints/last.ckpt``: what ``resume=true`` continues from."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT



def started_science(run_dir: str | Path) -> dict[str, Any] | None:
    """The science config the run in `run_dir` started with (its recipe.json), None where it has none."""
    path = Path(run_dir) / RECIPE_FILE
    return json.loads(path.read_text(encoding="utf-8"))["science"] if path.is_file() else None


def complete_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The record of the finished run in `run_dir` (a valid metrics.json whose status is complete), else None."""
    path = Path(run_dir) / METRICS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if validate_record(data) == ("", []) else None


def recorded_config(run_dir: str | Path) -> tuple[Any, dict[str, Any]] | None:
    """(config, data record) of the run in `run_dir`, as an OmegaConf DictConfig with its paths as this machine has
    them: from metrics.json when the run finished, else Hydra's `.hydra/config.yaml` (and no data record); None where
    the folder holds neither."""
    from omegaconf import OmegaConf

    from results.portable_paths import local_paths

    record = complete_record(run_dir)
    if record is not None:
        return OmegaConf.create(local_paths(record["config"])), local_paths(record.get("data") or {})
    hydra_config = Path(run_dir) / ".hydra" / "config.yaml"
    return (OmegaConf.load(hydra_config), {}) if hydra_config.is_file() else None


def move_aside(run_dir: str | Path, stamp: str, keep: tuple[str, ...] = ()) -> Path:
    """Move everything in `run_dir` except the names in `keep` into `<run_dir>/.replaced/<stamp>/`; return it.

    Nothing is deleted: the old run stays readable there (and out of the tables)."""
    run_dir = Path(run_dir)
    target = run_dir / REPLACED_DIR / stamp.replace(":", "")
    target.mkdir(parents=True, exist_ok=False)
    for entry in sorted(run_dir.iterdir()):
        if entry.name not in (REPLACED_DIR, *keep):
            shutil.move(str(entry), str(target / entry.name))
    return target
