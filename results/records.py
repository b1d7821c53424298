"""Read run records (``metrics.json``, whose schema is :class:`results.run_record.RunRecord`).

Every problem (unreadable file, partial run, a record in another cell's folder) becomes a :class:`Problem` with the
file's path; the run is then skipped, never averaged. Whether a record is its cell's recipe is `results.cells`'.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from results.run_record import METRICS_FILE, run_subdir, validate_record


@dataclass(frozen=True)
class Problem:
    """Something wrong with one run; ``path`` is its metrics.json (or ``wandb:<project>/<id>``)."""

    path: str
    kind: str  # malformed | partial | mismatch | unknown | missing-metric | debug
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: {self.message}"


@dataclass
class Record:
    """One complete, valid run: the metrics.json content plus where it came from."""

    data: dict[str, Any]
    path: str
    run_dir: Path | None = None

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

    @property
    def variant(self) -> str | None:
        return self.data.get("variant")


def read_metrics_file(path: Path) -> tuple[Record | None, Problem | None]:
    """Read one metrics.json; return (record, None) when usable, else (None, problem)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, Problem(str(path), "malformed", f"cannot parse JSON: {exc}")
    kind, errors = validate_record(data)
    if errors:
        return None, Problem(str(path), kind, "; ".join(errors))
    return Record(data=data, path=str(path), run_dir=path.parent), None


def read_run_tree(root: str | Path) -> tuple[list[Record], list[Problem]]:
    """Every metrics.json below ``root`` (sorted walk; hidden folders such as the ``.replaced/`` runs that
    ``overwrite=true`` moved aside are not read). Returns usable records and problems.

    A run whose directory follows the deterministic layout (`results.run_record.run_subdir`) but whose metrics.json
    names another cell is reported as a mismatch (it was copied, or written by another recipe).
    """
    root = Path(root)
    records: list[Record] = []
    problems: list[Problem] = []
    if not root.is_dir():
        return records, problems
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
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
    subdir = run_subdir(record.experiment, record.attention, record.selection, record.seed, record.variant)
    expected = tuple(subdir.split("/"))
    if tuple(parts[-len(expected):]) != expected:
        return (f"directory says {'/'.join(parts[-len(expected):])} but metrics.json says "
                f"{'/'.join(expected)}; move the run to its own directory or delete it")
    return None


def config_value(config: Any, dotted: str) -> tuple[bool, Any]:
    """(found, value) of the dotted key ``a.b.c`` in a nested config; (False, None) where any part is missing."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


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
