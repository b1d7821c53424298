"""Every experiment config under conf/experiment/ composes and trains for one step on fixtures in the real format.

A new domain joins this check by adding `tests/fixtures/<task_name>.py` with `write_fixture(data_dir, cfg)`.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest

from experiments.train import train
from results.cells import place_records
from results.manifest import load_manifests
from results.records import read_metrics_file
from results.run_record import validate_record
from tests.helpers import CONF_DIR, compose_config

EXPERIMENTS = sorted(
    str(path.relative_to(CONF_DIR / "experiment").with_suffix("")) for path in (CONF_DIR / "experiment").rglob("*.yaml")
)


def test_experiments_are_found():
    assert "uea/JapaneseVowels" in EXPERIMENTS and "uea/base" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_one_step(experiment, tmp_path):
    data_dir, runs_dir = tmp_path / "data", tmp_path / "runs"
    base = [f"experiment={experiment}", f"paths.data_dir={data_dir}", f"paths.runs_dir={runs_dir}"]
    probe = compose_config(base)
    fixtures = importlib.import_module(f"tests.fixtures.{probe.task_name}")  # a missing writer fails loudly
    extra = fixtures.write_fixture(data_dir, probe)
    cfg = compose_config(
        base + ["debug=fast_dev_run", "logger=csv", "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null"]
        + [f"{key}={value}" for key, value in extra.items()]
    )
    record = train(cfg, tmp_path / "run")
    path = tmp_path / "run" / "metrics.json"
    written = json.loads(path.read_text())
    assert validate_record(written) == ("", [])  # a well-formed, complete record...
    assert written["experiment"] == cfg.experiment_name and written["status"] == "complete"
    assert record.primary_value == written["primary_value"] and math.isfinite(written["primary_value"])
    # ...that never fills a table: a one-batch run is a debug run (or, off the manifests, no cell at all)
    manifests = load_manifests()
    listed = any(m.entry(cfg.experiment_name) for m in manifests.values())
    placement = place_records([read_metrics_file(path)[0]], manifests)
    assert not placement.observations
    assert [p.kind for p in placement.problems] == ["debug" if listed else "unknown"]
