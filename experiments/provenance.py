"""Provenance recorded with every run and benchmark: the commit, the package versions and the time."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

# Packages whose versions decide whether a result can be redone; recorded in every metrics.json.
RECORDED_PACKAGES = (
    "torch", "lightning", "torchmetrics", "hydra-core", "omegaconf", "numpy", "pandas", "aeon", "scikit-learn",
    "wandb", "timm", "datasets", "gymnasium", "mujoco", "minari", "h5py", "flowformer-suite",
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
    """The checkout's commit, with '-dirty' when tracked files have uncommitted changes; None outside git.

    FLOWFORMER_GIT_SHA, when set, wins: a copy of the tree shipped to another machine (a GPU box) may carry a stale
    or no .git, and the sender knows which commit it sent."""
    if os.environ.get("FLOWFORMER_GIT_SHA"):
        return os.environ["FLOWFORMER_GIT_SHA"]
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.strip() + ("-dirty" if dirty.strip() else "")

