"""Tests of results/: the aggregator's arithmetic, protocols, missing cells, averages, bad input, W&B source.

Every test writes a fake metrics.json tree in tmp_path (no training) and reads the generated files back.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from results import aggregate
from results.manifest import load_manifests
from results.paper_tables import load_paper_table
from results.tables import classify, summarize
from tests.helpers import (
    REPO_MANIFESTS,
    csv_row,
    md_line,
    md_lines,
    md_rows,
    read_csv,
    recipe_config,
    run_cli,
    write_run,
)

# ------------------------------------------------------------------------------------------- arithmetic

def test_summarize_mean_and_sample_std():
    assert summarize([97.0, 98.0, 99.0]) == (3, 98.0, 1.0)
    n, mean, std = summarize([1.0, 2.0])
    assert (n, mean) == (2, 1.5) and std == pytest.approx(math.sqrt(0.5))  # ddof=1, not ddof=0 (0.5)
    assert summarize([5.0]) == (1, 5.0, None)
    assert summarize([]) == (0, None, None)


def test_csv_mean_std_delta_and_single_seed(tmp_path):
    for seed, v in enumerate([97.0, 98.0, 99.0]):
        write_run(tmp_path / "runs", "uea/JapaneseVowels", "flow", seed, v)
    write_run(tmp_path / "runs", "uea/Heartbeat", "softmax", 0, 80.0)
    rc, out = run_cli(tmp_path)
    assert rc == 0
    rows = read_csv(out / "uea.csv")
    assert list(rows[0]) == ["table", "row", "variant", "model", "selection", "protocol", "n", "mean", "std", "paper",
                             "delta"]
    jv = csv_row(rows, "JapaneseVowels", "Flowformer")
    assert (jv["table"], jv["n"], float(jv["mean"]), float(jv["std"])) == ("uea", "3", 98.0, 1.0)
    assert float(jv["paper"]) == 98.9
    assert float(jv["delta"]) == pytest.approx(98.0 - 98.9)
    hb = csv_row(rows, "Heartbeat", "Transformer")  # softmax -> the paper's "Transformer" column
    assert (hb["n"], float(hb["mean"]), hb["std"], float(hb["paper"])) == ("1", 80.0, "", 76.1)
    assert float(hb["delta"]) == pytest.approx(3.9)
    missing = csv_row(rows, "Heartbeat", "Flowformer")  # asked for by the manifest, no run yet
    assert (missing["n"], missing["mean"], missing["std"], missing["delta"]) == ("0", "", "", "")
    assert missing["paper"] == "77.6"


def test_selection_protocols_are_never_pooled(tmp_path):
    for seed, v in enumerate([97.0, 98.0, 99.0]):
        write_run(tmp_path / "runs", "uea/JapaneseVowels", "flow", seed, v, selection="best_test")
    for seed, v in enumerate([90.0, 92.0]):
        write_run(tmp_path / "runs", "uea/JapaneseVowels", "flow", seed, v, selection="holdout_val")
    rc, out = run_cli(tmp_path)
    rows = read_csv(out / "uea.csv")
    best = csv_row(rows, "JapaneseVowels", "Flowformer", "best_test")
    hold = csv_row(rows, "JapaneseVowels", "Flowformer", "holdout_val")
    assert (best["n"], float(best["mean"])) == ("3", 98.0)
    assert (hold["n"], float(hold["mean"]), float(hold["std"])) == ("2", 91.0, pytest.approx(math.sqrt(2)))
    assert (best["protocol"], hold["protocol"]) == ("paper", "other")
    md = (out / "uea.md").read_text()
    assert "### Paper protocol" in md and "### Selection `holdout_val` (not the paper's protocol)" in md
    assert "**Protocol:** `best_test` for every row (the official code validates on the TEST file" in md
    assert [cells[1:3] for cells in md_lines(md, "JapaneseVowels")] == [["98.00 ± 1.00 (3)", "98.9"],
                                                                         ["91.00 ± 1.41 (2)", "98.9"]]


def test_demo_run_shows_one_cell_beside_paper_and_everything_else_missing(tmp_path):
    """The issue's 'done' check: after `make demo`, the UEA table has only our JapaneseVowels Flowformer cell."""
    write_run(tmp_path / "runs", "uea/JapaneseVowels", "flow", 0, 97.3)
    rc, out = run_cli(tmp_path)
    md = (out / "uea.md").read_text()
    jv = md_line(md, "JapaneseVowels")
    assert jv[1:3] == ["97.30 (1)", "98.9"]
    data_rows = [cells for cells in md_rows(md) if cells[0] != "Dataset" and not cells[0].startswith(":")
                 and "Average" not in cells[0]]
    ours = [c for cells in data_rows for c in cells[1::2]]
    assert len(ours) == 60 and ours.count("—") == 59
    assert "0 of 60 cells within" in md and "1 worse" in md and "59 missing" in md  # 97.3 is 1.6 below 98.9
    readme = (tmp_path / "README.md").read_text()
    assert "python -m results.aggregate --runs" in readme and md_line(readme, "JapaneseVowels")[1:3] == ["97.30 (1)", "98.9"]
    # `make demo` aggregates only UEA: only uea.* is written, but the README still shows every table.
    rc, out2 = run_cli(tmp_path / "only", "--runs", str(tmp_path / "runs"), "--tables", "uea")
    assert sorted(p.name for p in out2.iterdir()) == ["uea.csv", "uea.md", "uea.tex"]
    readme = (tmp_path / "only" / "README.md").read_text()
    assert "## Long Range Arena" in readme and md_line(readme, "JapaneseVowels")[1:3] == ["97.30 (1)", "98.9"]


def test_show_prints_the_filled_cells_of_a_row_beside_the_paper(tmp_path, capsys):
    write_run(tmp_path / "runs", "uea/JapaneseVowels", "flow", 0, 97.0)
    write_run(tmp_path / "runs", "uea/JapaneseVowels", "flow", 1, 99.0)
    run_cli(tmp_path, "--tables", "uea", "--show", "JapaneseVowels")
    printed = capsys.readouterr().out
    assert "uea · JapaneseVowels · Flowformer · best_test: ours 98.00 ± 1.41 (n=2); paper 98.90 (ours − paper = -0.90)" in printed
    run_cli(tmp_path, "--tables", "uea", "--show", "Heartbeat")
    assert "no filled cell in row 'Heartbeat' yet" in capsys.readouterr().out


def test_within_better_worse_use_paper_std_and_direction():
    assert classify(98.0, 98.9, None, False) == "within"            # |d| = 0.9 <= 1 point
    assert classify(97.8, 98.9, None, False) == "worse"
    assert classify(100.0, 98.9, None, False) == "better"
    assert classify(80.0, 93.5, 13.9, False) == "within"            # D4RL: the paper's std widens the band
    assert classify(29.0, 30.8, None, True) == "better"             # perplexity: lower is better
    assert classify(33.0, 30.8, None, True) == "worse"


def test_lower_is_better_table_status(tmp_path):
    write_run(tmp_path / "runs", "wikitext103/transformer_lm", "flow", 0, 29.0, selection="holdout_val")
    write_run(tmp_path / "runs", "wikitext103/transformer_lm", "softmax", 0, 33.5, selection="holdout_val")
    rc, out = run_cli(tmp_path)
    md = (out / "wikitext103.md").read_text()
    assert "↓ lower is better" in md
    assert "1 of 8 cells within" in md and "1 better (lower)" in md and "0 worse" in md


MANIFESTS = load_manifests(REPO_MANIFESTS)
# the UEA table's shape, for test manifests of their own
UEA_SPEC = ("table: uea\ntitle: UEA\nmetric_label: accuracy (%)\nkey_columns: [dataset]\n"
            "average_row: Average Accuracy\n")


def paper_table(name: str):
    """The paper's numbers of one repository table, laid out as its manifest says."""
    return load_paper_table(MANIFESTS[name].spec)


# --------------------------------------------------------------------------------------------- averages

def test_average_only_over_complete_columns(tmp_path):
    paper = paper_table("uea")
    expected = []
    for row in paper.rows:  # Flowformer: every dataset, two seeds, paper + 0.5 and paper + 1.5
        base = paper.value(row, "Flowformer")
        for seed, bump in enumerate([0.5, 1.5]):
            write_run(tmp_path / "runs", f"uea/{row}", "flow", seed, base + bump)
        expected.append(base + 1.0)
    write_run(tmp_path / "runs", "uea/JapaneseVowels", "softmax", 0, 98.0)  # Transformer: 1 of 10 rows
    rc, out = run_cli(tmp_path)
    rows = read_csv(out / "uea.csv")
    avg = csv_row(rows, "Average Accuracy", "Flowformer")
    assert float(avg["mean"]) == pytest.approx(sum(expected) / 10)
    assert avg["n"] == "2" and float(avg["paper"]) == 73.0
    assert not [r for r in rows if r["row"] == "Average Accuracy" and r["model"] == "Transformer"]
    md = (out / "uea.md").read_text()
    line = md_line(md, "**Average Accuracy**")
    assert line[1] == f"{sum(expected) / 10:.2f} (2)" and line[2] == "73.0"
    assert line[3] == "— (1/10 rows)" and line[4] == "71.9"
    # 10 Flowformer rows (+1.0) and Transformer JapaneseVowels (98.0 vs 98.7)
    assert "11 of 60 cells within" in md


def test_paper_average_slips_are_detected_exactly():
    slips = {}
    for name in ("lra", "uea", "d4rl"):
        t = paper_table(name)
        for m in t.models:
            c = t.average_check(m)
            if not c.agrees:
                slips[(name, m)] = "mean"
            if not c.std_agrees:
                slips[(name, m)] = "std"
    assert slips == {("lra", "Sinkhorn Trans."): "mean", ("uea", "Longformer"): "mean",
                     ("uea", "Performer"): "mean", ("d4rl", "cosFormer"): "std"}


def test_mismatched_paper_averages_are_footnoted(tmp_path):
    rc, out = run_cli(tmp_path)
    uea = (out / "uea.md").read_text()
    line = md_line(uea, "**Average Accuracy**")
    header = md_line(uea, "Dataset")
    assert line[header.index("Performer (paper)")] == "71.9 [1]"
    assert line[header.index("Flowformer (paper)")] == "73.0"
    assert "[1] Performer: the paper prints 71.9 as the average, but its own per-row values average 71.68." in uea
    d4rl = (out / "d4rl.md").read_text()
    assert "cosFormer: the paper prints ± 7.6 for the average, but its per-row stds average 6.68." in d4rl
    lra = (out / "lra.md").read_text()
    assert "Sinkhorn" not in lra  # not one of our columns: no footnote about it


# ------------------------------------------------------------------------------------------- bad input

def test_malformed_partial_and_mismatched_runs_are_reported_and_skipped(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "uea/JapaneseVowels", "flow", 0, 98.0)
    bad = runs / "uea/JapaneseVowels/flow/best_test/seed1/metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"experiment": "uea/JapaneseVowels", ')  # truncated
    partial = write_run(runs, "uea/JapaneseVowels", "flow", 2, 10.0, status="running")
    no_field = write_run(runs, "uea/JapaneseVowels", "flow", 3, 11.0, drop=("primary_value",))
    wrong_type = write_run(runs, "uea/JapaneseVowels", "flow", 4, 12.0, config={"seed": "four"})
    moved = write_run(runs, "uea/JapaneseVowels", "flow", 5, 13.0,
                      run_dir=runs / "uea/JapaneseVowels/flow/best_test/seed6")
    rc, out = run_cli(tmp_path)
    assert rc == 0
    err = capsys.readouterr().err
    for path, kind in [(bad, "malformed"), (partial, "partial"), (no_field, "partial"),
                       (wrong_type, "mismatch"), (moved, "mismatch")]:
        shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
        assert f"{shown}: {kind}" in err, (kind, err)
    row = csv_row(read_csv(out / "uea.csv"), "JapaneseVowels", "Flowformer")
    assert (row["n"], float(row["mean"])) == ("1", 98.0)  # only the good run
    readme = (tmp_path / "README.md").read_text()
    assert "## Skipped runs" in readme and "Runs skipped: 5" in readme
    assert aggregate.main(["--runs", str(runs), "--out", str(out), "--no-figures", "--no-readme",
                           "--manifests", str(REPO_MANIFESTS), "--strict"]) == 1


def test_off_recipe_runs_never_fill_a_paper_cell_and_are_tabulated_as_variants(tmp_path, capsys):
    """A short run, a bf16 run and a debug run under a paper cell's name leave the cell as the recipe runs made it."""
    runs, local = tmp_path / "runs", tmp_path / "local"
    write_run(runs, "uea/JapaneseVowels", "flow", 0, 98.0)
    write_run(runs, "uea/JapaneseVowels", "flow", 1, 99.0)
    short = write_run(local, "uea/JapaneseVowels", "flow", 2, 50.0, config={"trainer": {"max_epochs": 2}},
                      finished_at="2030-01-01T00:00:00")  # newer, in the recipe's own folder
    bf16 = write_run(local, "uea/JapaneseVowels", "flow", 0, 97.0, variant="trainer.precision=bf16-mixed",
                     config={"trainer": {"precision": "bf16-mixed"}})
    debug = write_run(local / "debug", "uea/JapaneseVowels", "flow", 1, 11.0,
                      config={"trainer": {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 2}})
    rc, out = run_cli(tmp_path, "--runs", str(runs), str(local))
    assert rc == 0
    rows = read_csv(out / "uea.csv")
    paper_cell = csv_row(rows, "JapaneseVowels", "Flowformer")
    assert (paper_cell["n"], float(paper_cell["mean"])) == ("2", 98.5)
    assert (paper_cell["variant"], paper_cell["protocol"]) == ("", "paper")
    short_cell = csv_row(rows, "JapaneseVowels", "Flowformer", variant="trainer.max_epochs=2")
    assert (short_cell["n"], float(short_cell["mean"]), short_cell["protocol"]) == ("1", 50.0, "paper")
    bf16_cell = csv_row(rows, "JapaneseVowels", "Flowformer", variant="trainer.precision=bf16-mixed")
    assert (bf16_cell["n"], float(bf16_cell["mean"])) == ("1", 97.0)
    assert not [r for r in rows if r["mean"] == "11.0"]  # the debug run is nowhere
    md = (out / "uea.md").read_text()
    assert md_line(md, "JapaneseVowels")[1] == "98.50 ± 0.71 (2)"
    assert md_line(md, "JapaneseVowels † trainer.max_epochs=2")[1:3] == ["50.00 (1)", "98.9"]
    assert "1 of 60 cells within" in md  # variants are not counted
    readme = (tmp_path / "README.md").read_text()
    assert "## Runs outside the paper recipe" in readme
    assert f"`{short}` (variant `trainer.max_epochs=2`): trainer.max_epochs=2 (recipe: 100)" in readme
    assert f"`{bf16}` (variant `trainer.precision=bf16-mixed`): trainer.precision=bf16-mixed (recipe: 32-true)" in readme
    err = capsys.readouterr().err
    assert f"{debug}: debug: a debug run (trainer.limit_train_batches=3 (recipe: 1.0), " in err


def test_the_manifest_pins_and_named_variants_are_part_of_the_recipe(tmp_path):
    """The expected config is composed from the manifest's own overrides; a declared variant is tabulated by name."""
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "uea.yaml").write_text(
        f"{UEA_SPEC}seeds: [0, 1]\nattentions: [flow]\noverrides: [trainer.max_epochs=50]\n"
        "variants:\n  quick: {overrides: [trainer.max_epochs=5], note: a short schedule}\n"
        "experiments:\n  - experiment: uea/JapaneseVowels\n")
    runs = tmp_path / "runs"
    write_run(runs, "uea/JapaneseVowels", "flow", 0, 98.0, config={"trainer": {"max_epochs": 50}})
    write_run(runs, "uea/JapaneseVowels", "flow", 1, 90.0)  # 100 epochs: not what this manifest pins
    write_run(runs, "uea/JapaneseVowels", "flow", 0, 80.0, variant="quick", config={"trainer": {"max_epochs": 5}})
    rc, out = run_cli(tmp_path, manifests=mdir)
    rows = read_csv(out / "uea.csv")
    assert (csv_row(rows, "JapaneseVowels", "Flowformer")["n"]) == "1"
    assert float(csv_row(rows, "JapaneseVowels", "Flowformer", variant="quick")["mean"]) == 80.0
    assert float(csv_row(rows, "JapaneseVowels", "Flowformer", variant="trainer.max_epochs=100")["mean"]) == 90.0


def test_two_different_records_for_one_cell_are_an_error_naming_both(tmp_path, capsys):
    committed, local = tmp_path / "committed", tmp_path / "local"
    old = write_run(committed, "uea/JapaneseVowels", "flow", 0, 90.0, finished_at="2025-01-01T00:00:00")
    new = write_run(local, "uea/JapaneseVowels", "flow", 0, 95.0, finished_at="2025-02-01T00:00:00")
    rc, out = run_cli(tmp_path, "--runs", str(committed), str(local))
    assert rc == 2
    err = capsys.readouterr().err
    assert "two different records for the same seed" in err and str(old) in err and str(new) in err
    assert not out.exists() and not (tmp_path / "README.md").exists()  # nothing written half-way
    # the same record under both folders (a copy) counts once
    new.write_text(old.read_text())
    rc, out = run_cli(tmp_path, "--runs", str(committed), str(local))
    row = csv_row(read_csv(out / "uea.csv"), "JapaneseVowels", "Flowformer")
    assert (rc, row["n"], float(row["mean"])) == (0, "1", 90.0)


def test_run_outside_every_paper_row_is_reported_and_fills_no_cell(tmp_path, capsys):
    """A run on stand-in data (a collected D4RL dataset) is named as skipped, with how to make it a cell."""
    stand_in = write_run(tmp_path / "runs", "d4rl/hopper-random-collected", "flow", 0, 10.0)
    rc, out = run_cli(tmp_path)
    assert rc == 0
    err = capsys.readouterr().err
    assert f"{stand_in}: unknown: 'd4rl/hopper-random-collected' is no cell of the d4rl table" in err
    assert "experiments/manifests/d4rl.yaml" in err
    assert all(row["n"] in ("", "0") for row in read_csv(out / "d4rl.csv"))


def test_manifest_metric_and_scale_fill_several_rows(tmp_path):
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "imagenet.yaml").write_text(
        "table: imagenet\ntitle: ImageNet\nmetric_label: accuracy (%)\nkey_columns: [metric]\nattentions: [flow]\n"
        "experiments:\n  - experiment: imagenet/hierarchical\n    rows:\n"
        "      - {row: top1_acc, metric: primary_value}\n"
        "      - {row: top5_acc, metric: metrics.test/acc5, scale: 100}\n")
    write_run(tmp_path / "runs", "imagenet/hierarchical", "flow", 0, 80.0, metrics={"test/acc5": 0.95})
    write_run(tmp_path / "runs", "imagenet/hierarchical", "flow", 1, 81.0, metrics={})
    rc, out = run_cli(tmp_path, manifests=mdir)
    rows = read_csv(out / "imagenet.csv")
    top1 = csv_row(rows, "top1_acc", "Flowformer")
    assert (float(top1["mean"]), top1["n"]) == (80.5, "2")
    top5 = csv_row(rows, "top5_acc", "Flowformer")
    assert (top5["n"], float(top5["mean"]), float(top5["paper"])) == ("1", 95.0, 94.9)


# ------------------------------------------------------------------------------------------- W&B source

# A recorded `wandb.Api().runs(...)` response, reduced to the attributes the source reads.
WANDB_RESPONSE = json.loads("""
[
 {"id": "a1", "name": "uea/JapaneseVowels/flow/best_test/seed0", "group": "uea/JapaneseVowels",
  "tags": ["uea", "flow", "best_test"], "state": "finished", "commit": "1111111",
  "created_at": "2025-03-01T10:00:00", "heartbeat_at": "2025-03-01T10:20:00",
  "config": {"experiment_name": "uea/JapaneseVowels", "task_name": "uea", "seed": 0, "selection": "best_test",
             "data": {"dataset": "JapaneseVowels"}, "model": {"attention": {"name": "flow"}}},
  "summary": {"primary_metric": "test/acc", "primary_value": 98.0, "test/acc": 98.0, "_step": 400, "_runtime": 12.5}},
 {"id": "a2", "name": "uea/JapaneseVowels/flow/best_test/seed1", "group": "uea/JapaneseVowels",
  "tags": ["uea", "flow", "best_test"], "state": "finished", "commit": "1111111",
  "created_at": "2025-03-01T11:00:00", "heartbeat_at": "2025-03-01T11:20:00",
  "config": {"experiment_name": {"value": "uea/JapaneseVowels"}, "task_name": {"value": "uea"}, "seed": {"value": 1},
             "selection": {"value": "best_test"}, "data/dataset": {"value": "JapaneseVowels"},
             "model/attention/name": {"value": "flow"}},
  "summary": {"primary_metric": "test/acc", "test/acc": 96.0}},
 {"id": "a3", "name": "uea/JapaneseVowels/flow/best_test/seed2", "group": "uea/JapaneseVowels",
  "tags": ["uea", "flow", "best_test"], "state": "running", "commit": "1111111",
  "created_at": "2025-03-01T12:00:00", "heartbeat_at": "2025-03-01T12:05:00",
  "config": {"experiment_name": "uea/JapaneseVowels", "task_name": "uea", "seed": 2, "selection": "best_test",
             "data": {"dataset": "JapaneseVowels"}, "model": {"attention": {"name": "flow"}}},
  "summary": {"test/acc": 40.0}},
 {"id": "a4", "name": "uea/JapaneseVowels/softmax/best_test/seed0", "group": "uea/JapaneseVowels",
  "tags": ["uea", "softmax", "best_test", "debug"], "state": "finished", "commit": "1111111",
  "created_at": "2025-03-01T13:00:00", "heartbeat_at": "2025-03-01T13:20:00",
  "config": {"experiment_name": "uea/JapaneseVowels", "task_name": "uea", "seed": 0, "selection": "best_test",
             "data": {"dataset": "JapaneseVowels"}, "model": {"attention": {"name": "softmax"}}},
  "summary": {"test/acc": 97.0}},
 {"id": "a5", "name": "other", "group": "uea/Heartbeat", "tags": ["uea", "flow"], "state": "finished",
  "config": {}, "summary": {}}
]
""")


def _flat_wrapped(config: dict, prefix: str = "") -> dict:
    """A config as W&B's raw API may give it: keys flattened with "/", values wrapped as {"value": ...}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat_wrapped(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = {"value": value}
    return out


# What experiments.train logs: the resolved config, nested (a1) or flattened and wrapped (a2); a4 is complete too.
WANDB_RESPONSE[0]["config"] = recipe_config("uea/JapaneseVowels", "flow", 0, "best_test")
WANDB_RESPONSE[1]["config"] = _flat_wrapped(recipe_config("uea/JapaneseVowels", "flow", 1, "best_test"))
WANDB_RESPONSE[3]["config"] = recipe_config("uea/JapaneseVowels", "softmax", 0, "best_test")


class FakeRun:
    def __init__(self, d: dict, project: str):
        self.__dict__.update(d)
        self.path = ["team", project, d["id"]]


class FakeApi:
    """Stands in for wandb.Api(): returns the recorded runs and remembers how it was queried."""

    def __init__(self, response):
        self.response, self.calls = response, []

    def runs(self, path, filters=None, **kwargs):
        self.calls.append((path, filters))
        return [FakeRun(d, path.split("/")[-1]) for d in self.response]


def test_wandb_source_from_recorded_response(tmp_path, capsys):
    api = FakeApi(WANDB_RESPONSE)
    rc, out = run_cli(tmp_path, "--source", "wandb", "--wandb-project", "flowformer", "--wandb-entity", "team",
                      "--wandb-group", "uea/JapaneseVowels", "--wandb-tags", "uea,best_test", wandb_api=api)
    assert rc == 0
    assert api.calls == [("team/flowformer", {"group": "uea/JapaneseVowels", "tags": {"$in": ["uea", "best_test"]}})]
    rows = read_csv(out / "uea.csv")
    flow = csv_row(rows, "JapaneseVowels", "Flowformer")  # a1 (nested config) + a2 (flat, wrapped config)
    assert (flow["n"], float(flow["mean"]), float(flow["std"])) == ("2", 97.0, pytest.approx(math.sqrt(2)))
    err = capsys.readouterr().err
    assert "wandb:team/flowformer/a3: partial" in err  # still running: never averaged
    assert "wandb:team/flowformer/a4: partial" in err and "primary_value" in err  # no primary value logged
    assert "a5" not in err  # another group: filtered out, not an error
    assert "W&B project `team/flowformer`" in (tmp_path / "README.md").read_text()


def test_wandb_source_needs_a_project(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    rc, _ = run_cli(tmp_path, "--source", "wandb", wandb_api=FakeApi([]))
    assert rc == 2 and "WANDB_PROJECT" in capsys.readouterr().err


# ------------------------------------------------------------------------------- outputs and manifests

def test_tex_readme_and_figures(tmp_path):
    history = [{"epoch": 0, "step": 10, "val/acc": 0.6, "val/loss": 1.5}, {"epoch": 1, "step": 20, "val/acc": 0.8}]
    write_run(tmp_path / "runs", "uea/JapaneseVowels", "flow", 0, 98.0, history=history)
    rc, out = run_cli(tmp_path, figures=True)
    tex = (out / "uea.tex").read_text()
    assert "\\toprule" in tex and "best\\_test" in tex and "JapaneseVowels & 98.00 (1) & 98.9" in tex
    assert "$\\pm$" in tex and "--" in tex and "\\multicolumn{2}{c}{Flowformer}" in tex
    assert (tmp_path / "figures" / "uea_paper_protocol_vs_paper.png").stat().st_size > 0
    curve = tmp_path / "figures" / "curves" / "uea_JapaneseVowels__flow__best_test.png"
    first = curve.read_bytes()
    assert first
    run_cli(tmp_path, figures=True)  # the curves come from the record alone: redrawn byte for byte
    assert curve.read_bytes() == first
    assert not (tmp_path / "figures" / "lra_paper_protocol_vs_paper.png").exists()  # nothing to plot
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_figures_are_drawn_only_for_records_used_and_stale_ones_are_removed(tmp_path):
    history = [{"epoch": 0, "step": 10, "val/acc": 0.6}]
    write_run(tmp_path / "runs", "uea/JapaneseVowels", "flow", 0, 98.0, history=history)
    write_run(tmp_path / "runs", "uea/JapaneseVowels", "softmax", 0, 9.0, history=history,
              config={"trainer": {"limit_train_batches": 2}})  # debug: not used
    write_run(tmp_path / "runs", "d4rl/hopper-random-collected", "flow", 0, 1.0, history=history)  # no cell
    curves = tmp_path / "figures" / "curves"
    curves.mkdir(parents=True)
    stale = [curves / "uea_Heartbeat__flow__best_test.png", tmp_path / "figures" / "uea_best_test_vs_paper.png"]
    kept = tmp_path / "figures" / "efficiency.png"  # not the aggregator's: left alone
    for path in (*stale, kept):
        path.write_bytes(b"old")
    run_cli(tmp_path, figures=True)
    assert sorted(p.name for p in curves.iterdir()) == ["uea_JapaneseVowels__flow__best_test.png"]
    assert not any(p.exists() for p in stale) and kept.read_bytes() == b"old"


def test_curves_read_the_evaluation_history_and_leave_out_non_finite_values(tmp_path):
    from results.figures import evaluation_series
    from results.records import Record

    history = [{"epoch": 0, "step": 5, "val/loss": 2.0, "val/acc": 0.5},
               {"epoch": 1, "step": 9, "val/loss": float("nan"), "val/acc": 0.7}]
    series = evaluation_series(Record({"history": history}, "metrics.json"))
    assert series == {"val/loss": [(5.0, 2.0)], "val/acc": [(5.0, 0.5), (9.0, 0.7)]}


def test_repo_manifests_name_real_paper_rows_and_columns():
    assert list(MANIFESTS) == ["lra", "uea", "imagenet", "wikitext103", "d4rl"]  # their `order`
    for name, m in MANIFESTS.items():
        paper = paper_table(name)
        assert set(m.rows) <= set(paper.rows), (name, set(m.rows) - set(paper.rows))
        for model in m.models:
            assert m.paper_column(model, paper.models), (name, model)
        assert all(len(e.seeds) == 3 for e in m.entries)
    lra = MANIFESTS["lra"]
    assert lra.paper_column("Flowformer (official LRA code)", paper_table("lra").models) == "Flowformer"
    assert lra.entry("lra/listops").rows[0].row == "ListOps"
    assert MANIFESTS["uea"].entry("uea/JapaneseVowels").rows[0].row == "JapaneseVowels"  # the default row
    assert MANIFESTS["d4rl"].entry("d4rl/walker2d-medium-replay").rows[0].row == "medium-replay/Walker"
    assert MANIFESTS["d4rl"].column("softmax") == "DT" and MANIFESTS["uea"].column("softmax") == "Transformer"


def test_every_experiment_defaults_to_the_protocol_its_manifest_names():
    """`experiment=<x>` alone runs the paper's protocol: the experiment's config and the manifest agree."""
    from results.recipe import expected_config

    for manifest in MANIFESTS.values():
        for entry in manifest.entries:
            composed = expected_config([f"experiment={entry.experiment}"])
            assert composed["selection"] == entry.selection, entry.experiment
            assert entry.protocol_reason, entry.experiment


def test_writes_only_under_the_outputs_it_is_given(tmp_path, monkeypatch, capsys):
    """--out alone: tables, figures and README all land under it; the repository's results/ is not touched."""
    repo_results = Path(aggregate.__file__).resolve().parent
    before = {p: p.stat().st_mtime_ns for p in repo_results.rglob("*") if p.is_file()}
    write_run(tmp_path / "committed", "uea/JapaneseVowels", "flow", 0, 98.0)
    write_run(tmp_path / "local", "uea/JapaneseVowels", "flow", 1, 99.0)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scratch"
    assert aggregate.main(["--runs", "committed", "local", "--out", str(out), "--tables", "uea"]) == 0
    after = {p: p.stat().st_mtime_ns for p in repo_results.rglob("*") if p.is_file()}
    assert after == before
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "scratch" in p.parts)
    assert "scratch/README.md" in written and "scratch/uea.md" in written
    assert any(name.startswith("scratch/figures/") for name in written)
    readme = (out / "README.md").read_text()
    assert "## Records used" in readme and "committed/uea/JapaneseVowels/flow/best_test/seed0/metrics.json" in readme
    assert "records used: 2 (1 from committed, 1 from local)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- the committed results

COMMITTED = Path(__file__).resolve().parents[1] / "results"


def test_committed_records_are_their_cells_recipe_and_travel():
    """Every committed record fills its paper cell (no variant, no debug run) and names no absolute path."""
    from results.cells import place_records
    from results.portable_paths import absolute_paths
    from results.records import read_run_tree

    records, problems = read_run_tree(COMMITTED / "runs")
    assert records and not problems
    placement = place_records(records, load_manifests(REPO_MANIFESTS))
    assert not placement.off_recipe and not placement.problems
    assert {o.variant for o in placement.observations} == {""}
    assert [hit for r in records for hit in absolute_paths(r.data, r.path)] == []


def test_committed_tables_rebuild_byte_for_byte_from_the_committed_records(tmp_path):
    out = tmp_path / "tables"
    assert aggregate.main(["--runs", str(COMMITTED / "runs"), "--out", str(out), "--no-figures", "--no-readme"]) == 0
    for table in sorted((COMMITTED / "tables").glob("*.*")):
        if table.suffix in (".md", ".csv", ".tex"):
            assert (out / table.name).read_text() == table.read_text(), table.name


# ------------------------------------------------------------------------------------------- a sixth table

SIXTH_MANIFEST = """\
# A table of our own: UEA's BasicMotions (bundled with aeon), Flowformer against the Transformer.
table: motions
title: Motion classification
metric_label: accuracy (%)
key_columns: [dataset]
row_header: Dataset
selection: best_test
protocol_reason: the UEA recipe's protocol (the best test accuracy over the evaluations)
seeds: [0, 1]
attentions: [flow, softmax]
experiments:
  - experiment: uea/BasicMotions
"""


def test_a_sixth_table_needs_a_manifest_a_paper_csv_and_an_experiment_config_only(tmp_path, capsys):
    """The README's "Adding a domain" worked example: no file under results/ (or experiments/) changes."""
    import shutil

    from experiments import reproduce
    from tests.helpers import CONF_DIR

    repo = Path(__file__).resolve().parents[1]
    before = {p: p.stat().st_mtime_ns for folder in ("results", "experiments") for p in (repo / folder).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    conf, manifests, paper = tmp_path / "conf", tmp_path / "manifests", tmp_path / "paper"
    shutil.copytree(CONF_DIR, conf)
    (conf / "experiment" / "uea" / "BasicMotions.yaml").write_text(
        "# @package _global_\ndefaults:\n  - uea/base\n\ndata:\n  dataset: BasicMotions\n")
    shutil.copytree(REPO_MANIFESTS, manifests)
    (manifests / "motions.yaml").write_text(SIXTH_MANIFEST)
    shutil.copytree(repo / "results" / "paper", paper)
    (paper / "motions.csv").write_text("dataset,Flowformer,Transformer\nBasicMotions,97.5,95.0\n")
    for seed, value in enumerate([98.0, 97.0]):
        write_run(tmp_path / "runs", "uea/BasicMotions", "flow", seed, value, conf_dir=conf)
    write_run(tmp_path / "runs", "uea/BasicMotions", "softmax", 0, 90.0, conf_dir=conf)

    rc, out = run_cli(tmp_path, "--paper", str(paper), "--conf", str(conf), manifests=manifests)
    assert rc == 0
    md = (out / "motions.md").read_text()
    assert md.startswith("## Motion classification: accuracy (%) (↑ higher is better)")
    assert md_line(md, "BasicMotions")[1:5] == ["97.50 ± 0.71 (2)", "97.5", "90.00 (1)", "95.0"]
    assert "1 of 2 cells within" in md and "1 worse" in md
    assert "## Motion classification" in (tmp_path / "README.md").read_text()
    assert reproduce.main(["motions", "--manifests", str(manifests), "--conf-dir", str(conf), "--dry-run",
                           "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "uea/BasicMotions  ready: bundled with aeon" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for folder in ("results", "experiments") for p in (repo / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    assert after == before
