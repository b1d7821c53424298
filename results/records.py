"""Read and check run records (``metrics.json``, whose schema is :class:`results.run_record.RunRecord`).

Every problem (unreadable file, partial run, config that is not the manifest's recipe) becomes a
:class:`Problem` with the file's path; the run is then skipped, never averaged.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from results.manifest import ExperimentEntry
from results.run_record import METRICS_FILE, run_subdir, validate_record


@dataclass(frozen=True)
class Problem:
    """Something wrong with one run; ``path`` is its metrics.json (or ``wandb:<project>/<id>``)."""

    path: str
    kind: str  # malformed | partial | mismatch | duplicate | unknown | missing-metric
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: {self.message}"


@dataclass
class Record:
    """One complete, valid run: the metrics.json content plus where it came from."""

    data: dict[str, Any]
    path: str
    run_dir: Path | None = None
    source: str = "runs"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def experiment(self) -> str:
        return self.data["experiment"]

    @property
    def attention(self) -> str:
        return self.data["attention"]

    @property
    def seed(self) -> int:
        return self.data["seed"]

    @property
    def selection(self) -> str:
        return self.data["selection"]


def read_metrics_file(path: Path) -> tuple[Record | None, Problem | None]:
    """Read one metrics.json; return (record, None) when usable, else (None, problem)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, Problem(str(path), "malformed", f"cannot parse JSON: {exc}")
    kind, errors = validate_record(data)
    if errors:
        return None, Problem(str(path), kind, "; ".join(errors))
    return Record(data=data, path=str(path), run_dir=path.parent, source="runs"), None


def read_run_tree(root: str | Path) -> tuple[list[Record], list[Problem]]:
    """Every metrics.json below ``root`` (sorted walk). Returns usable records and problems.

    A run whose directory follows the deterministic layout
    ``<root>/<experiment>/<attention>/<selection>/seed<seed>/`` but whose metrics.json names another cell
    is reported as a mismatch (it was copied or written by another recipe).
    """
    root = Path(root)
    records: list[Record] = []
    problems: list[Problem] = []
    if not root.is_dir():
        return records, problems
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if METRICS_FILE not in filenames:
            continue
        path = Path(dirpath) / METRICS_FILE
        record, problem = read_metrics_file(path)
        if problem:
            problems.append(problem)
            continue
        assert record is not None
        layout = layout_mismatch(record, root)
        if layout:
            problems.append(Problem(str(path), "mismatch", layout))
            continue
        records.append(record)
    return records, problems


def layout_mismatch(record: Record, root: Path) -> str | None:
    """Describe a disagreement between the run directory's name and the record's identity, or None."""
    if record.run_dir is None:
        return None
    try:
        parts = record.run_dir.resolve().relative_to(root.resolve()).parts
    except ValueError:
        return None
    if not parts or not re.fullmatch(r"seed-?\d+", parts[-1]):
        return None  # not the deterministic layout (e.g. a Hydra multirun folder): nothing to compare
    expected = tuple(run_subdir(record.experiment, record.attention, record.selection, record.seed).split("/"))
    if tuple(parts[-len(expected):]) != expected:
        return (f"directory says {'/'.join(parts[-len(expected):])} but metrics.json says "
                f"{'/'.join(expected)}; move the run to its own directory or delete it")
    return None


def config_get(config: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """Look up ``a.b.c`` in a nested config; also accepts flat keys ``a.b.c`` / ``a/b/c`` (W&B style)."""
    for flat in (dotted, dotted.replace(".", "/")):
        if flat in config:
            return True, config[flat]
    node: Any = config
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _parse_override_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # Hydra reads 1e-3 as a float; YAML 1.1 does not.
            return float(value)
        except ValueError:
            return value
    return value


def _same(a: Any, b: Any) -> bool:
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b or str(a) == str(b)


def pinned_values(overrides: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``key=value`` overrides that can be checked against a resolved config.

    Group choices (``model/attention=flow``), deletions (``~key``) and ``hydra.*`` keys are not visible in
    the resolved config, so they are left out.
    """
    out: dict[str, Any] = {}
    for ov in overrides:
        key, sep, value = ov.partition("=")
        key = key.lstrip("+")
        if not sep or key.startswith("~") or "/" in key or key.startswith("hydra."):
            continue
        out[key] = _parse_override_value(value)
    return out


def check_config(record: Record, entry: ExperimentEntry | None) -> list[str]:
    """Differences between a run's recorded config and its manifest cell (empty list: it matches).

    Compares the identity keys (experiment_name, model.attention.name, seed, selection) with the record,
    and every pinned ``key=value`` override of the manifest entry with the config.
    """
    cfg = record.data.get("config") or {}
    diffs: list[str] = []
    identity = {
        "experiment_name": record.experiment,
        "model.attention.name": record.attention,
        "seed": record.seed,
        "selection": record.selection,
    }
    for key, want in identity.items():
        found, got = config_get(cfg, key)
        if not found:
            diffs.append(f"config has no `{key}` (expected {want!r})")
        elif not _same(got, want):
            diffs.append(f"config `{key}` = {got!r} but metrics.json says {want!r}")
    if entry is not None:
        for key, want in pinned_values(entry.overrides).items():
            found, got = config_get(cfg, key)
            if not found:
                diffs.append(f"config has no `{key}`; the manifest pins {key}={want!r}")
            elif not _same(got, want):
                diffs.append(f"config `{key}` = {got!r}; the manifest pins {key}={want!r}")
    return diffs


def metric_value(data: dict[str, Any], metric: str) -> float | None:
    """Read the value named by a manifest ``metric`` from a record.

    ``primary_value`` (or any top-level numeric field) is read directly; ``metrics.<key>`` reads
    ``data["metrics"][<key>]`` (keys may contain ``/``, e.g. ``metrics.test/acc``). Returns None when absent
    or not a finite number.
    """
    if metric.startswith("metrics."):
        value = (data.get("metrics") or {}).get(metric[len("metrics."):])
    else:
        value = data.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
