"""The D4RL table: manifest, naming, aggregation of D4RL run records, and the planner's view of absent datasets."""

from __future__ import annotations

import csv
from pathlib import Path

from experiments.reproduce import make_plan
from results import aggregate
from results.manifest import load_manifests
from results.paper_tables import load_paper_table
from results.run_record import RunRecord, run_dir_of, write_record
from tests.fixtures.d4rl import write_d4rl_dataset
from tests.helpers import recipe_config

REPO = Path(__file__).resolve().parents[1]
MANIFEST = load_manifests(REPO / "experiments" / "manifests")["d4rl"]


def test_the_manifest_covers_the_papers_table():
    paper = load_paper_table(MANIFEST.spec)
    assert sorted(MANIFEST.rows) == sorted(paper.rows)
    assert MANIFEST.models == ["Flowformer", "DT", "Linear Trans.", "Performer", "Reformer", "cosFormer"]
    assert all(entry.seeds == (0, 1, 2) for entry in MANIFEST.entries)
    assert all((REPO / "conf" / "experiment" / f"{entry.experiment}.yaml").is_file() for entry in MANIFEST.entries)
    assert MANIFEST.notes and "highest target" in " ".join(MANIFEST.notes)


def test_only_the_papers_datasets_have_rows():
    assert MANIFEST.entry("d4rl/hopper-medium-replay").rows[0].row == "medium-replay/Hopper"
    assert MANIFEST.entry("d4rl/walker2d-medium-expert").rows[0].row == "medium-expert/Walker"
    assert MANIFEST.entry("d4rl/hopper-random-collected") is None
    assert MANIFEST.entry("d4rl/mujoco/hopper/medium-v0") is None  # Minari: kept apart


def write_d4rl_run(root: Path, attention: str, seed: int, score: float, **config) -> None:
    """A record of the hopper-medium cell's recipe under its paper protocol (final); `section__key=value` changes it."""
    experiment = "d4rl/hopper-medium"
    changes: dict = {}
    for key, value in config.items():
        section, name = key.split("__")
        changes.setdefault(section, {})[name] = value
    record = RunRecord(
        experiment=experiment,
        task="d4rl",
        dataset="hopper-medium-v2",
        attention=attention,
        seed=seed,
        selection="final",
        primary_metric="normalised_score",
        primary_value=score,
        metrics={"best/val/score": score, "test/score_3600": score},
        git_sha=None,
        versions={},
        started_at="2026-01-01T00:00:00",
        finished_at="2026-01-01T01:00:00",
        status="complete",
        config=recipe_config(experiment, attention, seed, "final", changes),
    )
    write_record(run_dir_of(root, experiment, attention, "final", seed), record)


def test_runs_fill_their_cell_and_minari_or_v5_runs_never_do(tmp_path):
    runs = tmp_path / "runs"
    for seed, score in enumerate([60.0, 64.0, 68.0]):
        write_d4rl_run(runs, "flow", seed, score)
    write_d4rl_run(runs, "softmax", 0, 50.0, data__source="minari")
    write_d4rl_run(runs, "softmax", 1, 50.0, eval__env_version="v5")
    out = tmp_path / "tables"
    code = aggregate.main(
        [
            "--runs",
            str(runs),
            "--out",
            str(out),
            "--readme",
            str(tmp_path / "README.md"),
            "--no-figures",
            "--tables",
            "d4rl",
        ]
    )
    assert code == 0
    cells = {(row["row"], row["model"], row["variant"]): row for row in csv.DictReader((out / "d4rl.csv").open())}
    flow = cells[("medium/Hopper", "Flowformer", "")]
    assert (flow["n"], float(flow["mean"]), float(flow["std"]), float(flow["paper"])) == ("3", 64.0, 4.0, 66.9)
    assert cells[("medium/Hopper", "DT", "")]["n"] == "0"  # the Minari and v5 runs are variants beside the cell
    assert cells[("medium/Hopper", "DT", "data.source=minari")]["n"] == "1"
    assert cells[("medium/Hopper", "DT", "eval.env_version=v5")]["n"] == "1"
    readme = (tmp_path / "README.md").read_text()
    assert "data.source=minari (recipe: d4rl)" in readme and "eval.env_version=v5 (recipe: v4)" in readme
    assert "**Which number fills a cell.**" in (out / "d4rl.md").read_text()


def test_the_planner_lists_absent_datasets_with_the_command_that_fetches_them(tmp_path):
    write_d4rl_dataset(tmp_path / "data", "hopper-medium-v2")
    plan = make_plan(MANIFEST, runs_dir=tmp_path / "runs", conf_dir=REPO / "conf", data_dir=tmp_path / "data")
    states = {experiment.entry.experiment: experiment for experiment in plan.experiments}
    assert states["d4rl/hopper-medium"].state == "ready"
    absent = [e for e in plan.experiments if e.state == "data absent"]
    assert len(absent) == 8 and all("make data-d4rl" in e.detail for e in absent)
    assert "--env walker2d" in states["d4rl/walker2d-medium"].detail
