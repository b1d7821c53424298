"""The data root and the runs root: `DATA_DIR` and `RUNS_DIR` from the environment, else their defaults.

Defined once here: the configs read them through the `${data_root:}` and `${runs_root:}` resolvers
(`conf/paths/default.yaml`), and the commands (`make data-<domain>`, the planner, the aggregator) call these
functions.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOTS = {"DATA_DIR": "data", "RUNS_DIR": "experiments/runs"}  # variable -> default, relative to the working folder


def root(variable: str) -> str:
    """The root a variable of ROOTS names on this machine (the variable's value, else its default)."""
    return os.environ.get(variable) or ROOTS[variable]


def data_root() -> Path:
    """Where datasets live (`DATA_DIR`, default `data`)."""
    return Path(root("DATA_DIR"))


def runs_root() -> Path:
    """Where runs go (`RUNS_DIR`, default `experiments/runs`)."""
    return Path(root("RUNS_DIR"))
