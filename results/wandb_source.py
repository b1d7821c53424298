"""Optional source: W&B runs, converted into the metrics.json form so they share the aggregation.

What a training run is expected to leave in W&B (``experiments/train.py`` with ``logger=wandb_online``):
- ``run.config``: the resolved Hydra config (nested, or flattened with ``/`` or ``.``), so that
  ``experiment_name``, ``task_name``, ``model.attention.name``, ``seed``, ``selection`` and ``data.dataset``
  can be read back;
- ``run.summary``: ``primary_metric`` (its name) and ``primary_value``, plus every final metric;
- ``run.state == "finished"`` once the run completed.
A run that lacks any of these is reported (with ``wandb:<path>``) and skipped, exactly like a partial
metrics.json. The API object is injectable, so tests use a recorded response and no network.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from results.records import Problem, Record, config_value
from results.run_record import WANDB_SUMMARY_FIELDS, validate_record


def _unwrap(value: Any) -> Any:
    """Raw W&B config values may come wrapped as {"value": x, "desc": ...}."""
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value


def _plain(obj: Any) -> dict[str, Any]:
    """A W&B config/summary object as a plain dict (the public API gives dict-like objects)."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    raw = getattr(obj, "_json_dict", None)
    if isinstance(raw, dict):
        return {k: _unwrap(v) for k, v in raw.items()}
    return {k: _unwrap(obj[k]) for k in obj.keys()}


def nested(config: dict[str, Any]) -> dict[str, Any]:
    """A W&B config as the nested resolved config a metrics.json holds: keys flattened with ``/`` (or ``.`` for
    nested groups logged flat) are split back into dicts, so the recipe check reads both forms alike."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        parts = str(key).replace("/", ".").split(".") if "/" in str(key) else [str(key)]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = nested(value) if isinstance(value, dict) else value
    return out


def _run_path(run: Any, project: str) -> str:
    path = getattr(run, "path", None)
    if isinstance(path, (list, tuple)) and path:
        return "wandb:" + "/".join(str(p) for p in path)
    return f"wandb:{project}/{getattr(run, 'id', getattr(run, 'name', '?'))}"


def run_to_metrics(run: Any) -> dict[str, Any]:
    """Convert one W&B ``Run`` (config, summary, name, group, tags, state) into the metrics.json form.

    Fields that cannot be found are left out, so that :func:`results.records.validate_record` reports them.
    """
    config = nested(_plain(getattr(run, "config", None)))
    summary = _plain(getattr(run, "summary", None))
    out: dict[str, Any] = {}

    def from_config(field: str, key: str) -> None:
        found, value = config_value(config, key)
        if found:
            out[field] = value

    from_config("experiment", "experiment_name")
    from_config("task", "task_name")
    from_config("dataset", "data.dataset")
    from_config("attention", "model.attention.name")
    from_config("seed", "seed")
    from_config("selection", "selection")
    if "dataset" not in out and "experiment" in out:
        out["dataset"] = str(out["experiment"]).rsplit("/", 1)[-1]

    primary = summary.get("primary_metric")
    if isinstance(primary, str):
        out["primary_metric"] = primary
    value = summary.get("primary_value", summary.get(primary) if isinstance(primary, str) else None)
    if value is not None:
        out["primary_value"] = value
    out["metrics"] = {k: v for k, v in summary.items()
                      if not k.startswith("_") and k not in WANDB_SUMMARY_FIELDS and isinstance(v, (int, float))
                      and not isinstance(v, bool)
                      and math.isfinite(v)}
    out["git_sha"] = getattr(run, "commit", None) or config.get("git_sha")
    out["versions"] = config.get("versions") if isinstance(config.get("versions"), dict) else {}
    out["started_at"] = str(getattr(run, "created_at", "") or "")
    out["finished_at"] = str(getattr(run, "heartbeat_at", "") or summary.get("_timestamp", "") or "")
    state = getattr(run, "state", None)
    out["status"] = "complete" if state == "finished" else str(state)
    out["config"] = config
    for key in WANDB_SUMMARY_FIELDS:
        if summary.get(key) is not None:
            out[key] = summary[key]
    return out


def wandb_filters(group: str | None = None, tags: Iterable[str] | None = None) -> dict[str, Any]:
    """Server-side filter (MongoDB syntax accepted by ``wandb.Api().runs``): the group, and any of the tags.

    "All of the tags" is enforced on the client, in :func:`fetch_records`.
    """
    filters: dict[str, Any] = {}
    if group:
        filters["group"] = group
    tags = list(tags or [])
    if tags:
        filters["tags"] = {"$in": tags}
    return filters


def fetch_records(project: str, *, entity: str | None = None, group: str | None = None,
                  tags: Iterable[str] | None = None, api: Any = None) -> tuple[list[Record], list[Problem]]:
    """Pull runs of ``[entity/]project`` (optionally one group, carrying all ``tags``) as records.

    ``api`` is anything with ``runs(path, filters=...)`` returning run objects; by default ``wandb.Api()``
    (imported lazily: W&B is only needed for this source).
    """
    if api is None:
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - wandb is a declared dependency
            raise SystemExit("SOURCE=wandb needs the wandb package: pip install wandb") from exc
        api = wandb.Api()
    tags = list(tags or [])
    path = f"{entity}/{project}" if entity else project
    records: list[Record] = []
    problems: list[Problem] = []
    for run in api.runs(path, filters=wandb_filters(group, tags)):
        run_tags = set(getattr(run, "tags", None) or [])
        if group and getattr(run, "group", None) != group:
            continue
        if not set(tags) <= run_tags:
            continue
        where = _run_path(run, path)
        data = run_to_metrics(run)
        kind, errors = validate_record(data)
        if errors:
            problems.append(Problem(where, kind, "; ".join(errors)))
            continue
        records.append(Record(data=data, path=where, run_dir=None))
    return records, problems
