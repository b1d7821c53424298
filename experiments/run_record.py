"""What a run writes about itself: `metrics.json` (the DESIGN.md run contract), written atomically."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

# Packages whose versions decide whether a result can be redone; recorded in every metrics.json.
RECORDED_PACKAGES = (
    "torch", "lightning", "torchmetrics", "hydra-core", "omegaconf", "numpy", "pandas", "aeon", "scikit-learn",
    "wandb", "timm", "datasets", "gymnasium", "mujoco", "flowformer-suite",
)
REQUIRED_FIELDS = (
    "experiment", "task", "dataset", "attention", "seed", "selection", "primary_metric", "primary_value",
    "metrics", "git_sha", "versions", "started_at", "finished_at", "status",
)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_sha(cwd: Path | None = None) -> str | None:
    """The checkout's commit, with '-dirty' when tracked files have uncommitted changes; None outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.strip() + ("-dirty" if dirty.strip() else "")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temp file in the same folder and rename it over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=2, sort_keys=False, default=str)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
