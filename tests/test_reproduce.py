"""Tests of experiments/reproduce.py on a fake conf/data/runs tree: plan states, DRY output, commands.

Nothing is trained: the subprocess runner is injected and only records the commands.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from experiments import reproduce
from results.manifest import load_manifest
from tests.helpers import CONF_DIR, recipe_config

MANIFEST = """
table: uea
title: UEA
metric_label: accuracy (%)
key_columns: [dataset]
selection: best_test
seeds: [0, 1]
attentions: [flow, softmax]
overrides: [trainer.max_epochs=100]
experiments:
  - experiment: uea/JapaneseVowels
  - experiment: uea/Heartbeat
  - experiment: uea/EthanolConcentration
  - experiment: uea/FaceDetection
"""


def metrics(experiment, attention, seed, *, status="complete", max_epochs=100, selection="best_test"):
    return {
        "experiment": experiment, "task": "uea", "dataset": experiment.split("/")[1], "attention": attention,
        "seed": seed, "selection": selection, "primary_metric": "test/acc", "primary_value": 97.0,
        "metrics": {}, "git_sha": None, "versions": {}, "started_at": "t0", "finished_at": "t1", "status": status,
        "config": recipe_config(experiment, attention, seed, selection, {"trainer": {"max_epochs": max_epochs}}),
    }


@pytest.fixture
def tree(tmp_path):
    """The repo's conf/ without FaceDetection's experiment; data for Heartbeat only (JapaneseVowels is bundled
    with aeon); runs: JV flow seed0 done, JV flow seed1 half-done, JV softmax seed0 done with another recipe."""
    shutil.copytree(CONF_DIR, tmp_path / "conf")
    (tmp_path / "conf" / "experiment" / "uea" / "FaceDetection.yaml").unlink()
    data = tmp_path / "data"
    (data / "uea" / "Heartbeat").mkdir(parents=True)
    for split in ("TRAIN", "TEST"):
        (data / "uea" / "Heartbeat" / f"Heartbeat_{split}.ts").write_text("@problemName Heartbeat\n")

    runs = tmp_path / "runs"
    def put(att, seed, payload=None, ckpt=False):
        d = runs / "uea/JapaneseVowels" / att / "best_test" / f"seed{seed}"
        d.mkdir(parents=True)
        if payload is not None:
            (d / "metrics.json").write_text(json.dumps(payload))
        if ckpt:
            (d / "checkpoints").mkdir()
            (d / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    put("flow", 0, metrics("uea/JapaneseVowels", "flow", 0))
    put("flow", 1, metrics("uea/JapaneseVowels", "flow", 1, status="running"), ckpt=True)
    put("softmax", 0, metrics("uea/JapaneseVowels", "softmax", 0, max_epochs=5))
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "uea.yaml").write_text(MANIFEST)
    return tmp_path


def argv(tree: Path, *extra: str) -> list[str]:
    return ["uea", "--manifests", str(tree / "manifests"), "--runs-dir", str(tree / "runs"),
            "--data-dir", str(tree / "data"), "--conf-dir", str(tree / "conf"), *extra]


class Recorder:
    def __init__(self, codes=None):
        self.calls, self.codes = [], list(codes or [])

    def __call__(self, cmd, env=None):
        self.calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, self.codes.pop(0) if self.codes else 0)


def test_plan_states(tree):
    plan = reproduce.make_plan(load_manifest(tree / "manifests" / "uea.yaml"), runs_dir=tree / "runs",
                               conf_dir=tree / "conf", data_dir=tree / "data")
    by_exp = {e.entry.experiment: e for e in plan.experiments}
    assert {k: e.state for k, e in by_exp.items()} == {
        "uea/JapaneseVowels": "ready", "uea/Heartbeat": "ready",
        "uea/EthanolConcentration": "data absent", "uea/FaceDetection": "not implemented"}
    jv = {(c.attention, c.seed): c.state for c in by_exp["uea/JapaneseVowels"].cells}
    assert jv == {("flow", 0): "done", ("flow", 1): "partial", ("softmax", 0): "off-recipe", ("softmax", 1): "missing"}
    assert by_exp["uea/JapaneseVowels"].detail == "bundled with aeon"
    assert {c.state for c in by_exp["uea/Heartbeat"].cells} == {"missing"}
    assert {c.state for c in by_exp["uea/FaceDetection"].cells} == {"skipped"}


def test_dry_run_prints_plan_and_runs_nothing(tree, capsys):
    runner = Recorder()
    assert reproduce.main(argv(tree, "--dry-run"), runner=runner) == 0
    assert runner.calls == []
    out = capsys.readouterr().out
    assert "runs (cell x seed): 16 = 1 done, 1 partial (resumed), 5 missing (started), 1 off-recipe (not counted, " \
           "not rerun), 8 skipped (4 not implemented, 4 data absent)" in out
    assert "    flow                 seed0:done  seed1:partial" in out
    assert "    softmax              seed0:off-recipe  seed1:missing" in out
    assert "Not implemented (1)" in out and "experiment/uea/FaceDetection.yaml does not exist" in out
    assert "Skipped because the dataset is absent (1):" in out
    assert "uea/EthanolConcentration: UEA dataset 'EthanolConcentration' not found: missing" in out
    assert "EthanolConcentration_TRAIN.ts and " in out and "`make data-uea`" in out
    assert "Off-recipe runs in the cells' folders, not counted and not rerun (1)" in out
    assert "uea/JapaneseVowels softmax seed0" in out and "trainer.max_epochs=5 (recipe: 100)" in out
    # JV: flow and softmax both still need seed 1 -> one multirun; Heartbeat: full 2x2 grid -> one multirun.
    assert ("python -m experiments.train -m experiment=uea/JapaneseVowels model/attention=flow,softmax seed=1 "
            "selection=best_test trainer.max_epochs=100 resume=true") in out
    assert ("python -m experiments.train -m experiment=uea/Heartbeat model/attention=flow,softmax seed=0,1 "
            "selection=best_test trainer.max_epochs=100 resume=true") in out
    assert "Commands (2):" in out


def test_pending_cells_that_are_not_a_grid_get_separate_commands(tree):
    manifest = load_manifest(tree / "manifests" / "uea.yaml")
    cells = reproduce.CellFilter(experiments=["uea/JapaneseVowels"], seeds=[0, 1, 2])
    plan = reproduce.make_plan(manifest, runs_dir=tree / "runs", conf_dir=tree / "conf", data_dir=tree / "data",
                               cells=cells)
    cmds = reproduce.build_commands(plan, python="py")
    sweeps = sorted((c[5], c[6]) for c in cmds)
    # flow: 1 resumes, 2 new; softmax: 0 is another recipe (left alone), 1 and 2 new -> same seeds, one command
    assert sweeps == [("model/attention=flow,softmax", "seed=1,2")]
    (tree / "runs/uea/JapaneseVowels/softmax/best_test/seed0/metrics.json").unlink()
    cells = reproduce.CellFilter(experiments=["uea/JapaneseVowels"], seeds=[0, 1, 2])
    plan = reproduce.make_plan(manifest, runs_dir=tree / "runs", conf_dir=tree / "conf", data_dir=tree / "data",
                               cells=cells)
    sweeps = sorted((c[5], c[6]) for c in reproduce.build_commands(plan, python="py"))
    assert sweeps == [("model/attention=flow", "seed=1,2"), ("model/attention=softmax", "seed=0,1,2")]


@pytest.mark.parametrize("launcher,expected", [
    ("basic", []), ("joblib", ["hydra/launcher=joblib"]), ("submitit", ["hydra/launcher=submitit_slurm"]),
    ("slurm", ["hydra/launcher=slurm"]), ("local_parallel", ["hydra/launcher=local_parallel"])])
def test_launcher_selection(launcher, expected):
    assert reproduce.launcher_overrides(launcher) == expected


def test_run_executes_commands_and_continues_after_failure(tree, capsys):
    runner = Recorder(codes=[3, 0])
    rc = reproduce.main(argv(tree, "--launcher", "joblib", "--extra", "trainer=cpu"), runner=runner)
    assert rc == 1
    assert len(runner.calls) == 2  # the second experiment still ran after the first failed
    cmd, env = runner.calls[0]
    assert cmd[1:4] == ["-m", "experiments.train", "-m"] and cmd[-3:] == ["trainer=cpu", "resume=true",
                                                                           "hydra/launcher=joblib"]
    assert env["RUNS_DIR"] == str(tree / "runs") and env["DATA_DIR"] == str(tree / "data")
    captured = capsys.readouterr()
    assert "1 of 2 command(s) failed" in captured.err and "make reproduce-uea" in captured.err


def test_selection_override_changes_where_runs_are_looked_for(tree, capsys):
    assert reproduce.main(argv(tree, "--dry-run", "--only", "uea/JapaneseVowels", "--extra", "selection=holdout_val"),
                          runner=Recorder()) == 0
    out = capsys.readouterr().out
    assert "4 missing" in out and "0 done" in out  # the best_test runs do not count for holdout_val
    line = next(text for text in out.splitlines() if "experiment=uea/JapaneseVowels" in text)
    assert line.count("selection=") == 1 and "selection=holdout_val" in line and "seed=0,1" in line


def test_bad_arguments_are_explained(tree, capsys):
    assert reproduce.main(argv(tree, "--extra", "seed=3"), runner=Recorder()) == 2
    assert "--seeds" in capsys.readouterr().err
    (tree / "manifests" / "uea.yaml").write_text("table: uea\ntitle: UEA\nmetric_label: accuracy\nexperiments:\n"
                                                  "  - experiment: uea/X\n    colour: red\n")
    assert reproduce.main(argv(tree, "--dry-run"), runner=Recorder()) == 2
    err = capsys.readouterr().err
    assert "uea.yaml" in err and "colour" in err


def test_repo_manifests_plan_without_error(capsys):
    """Every table of the repo plans; absent data and missing configs are reported, not dropped."""
    for table in ("lra", "uea", "imagenet", "wikitext103", "d4rl"):
        assert reproduce.main([table, "--dry-run", "--runs-dir", "/nonexistent/runs"], runner=Recorder()) == 0
    out = capsys.readouterr().out
    assert "d4rl/hopper-medium-replay" in out and "wikitext103/transformer_lm" in out and "imagenet/deit_small" in out
    assert "Config errors" not in out  # every implemented experiment composes and constructs its datamodule


def test_data_status_asks_the_domain_datamodule(tmp_path):
    """The planner composes the experiment's config and asks its datamodule (here LRA's official-layout check)."""
    from results.manifest import ExperimentEntry

    entry = ExperimentEntry("lra/listops", rows=(), attentions=("flow",), seeds=(0,), selection="best_test", overrides=())
    state, detail = reproduce.data_status(CONF_DIR, entry, tmp_path)
    assert state == "data absent" and "basic_train.tsv: missing" in detail and "make listops" in detail
    folder = tmp_path / "lra" / "listops-1000"
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (folder / f"basic_{split}.tsv").write_text("Source\tTarget\n( [MAX 1 2 ] )\t2\n")
    assert reproduce.data_status(CONF_DIR, entry, tmp_path) == ("ready", f"found under {tmp_path / 'lra'}")
    broken = ExperimentEntry("lra/listops", rows=(), attentions=("flow",), seeds=(0,), selection="best_test",
                             overrides=("data.datset=listops",))
    state, detail = reproduce.data_status(CONF_DIR, broken, tmp_path)
    assert state == "config error" and "datset" in detail


def test_attentions_narrow_the_plan_to_some_columns(tree, capsys):
    args = argv(tree, "--dry-run", "--only", "uea/JapaneseVowels", "--attentions", "softmax", "--extra",
                "selection=holdout_val")
    assert reproduce.main(args, runner=Recorder()) == 0
    out = capsys.readouterr().out
    assert "runs (cell x seed): 2 = 0 done" in out and "model/attention=softmax seed=0,1 selection=holdout_val" in out


def test_extra_overrides_that_change_the_recipe_run_as_a_variant_in_their_own_folder(tree, capsys):
    """EXTRA=trainer.precision=bf16-mixed never lands in (or counts as) the paper cell's folder."""
    args = argv(tree, "--dry-run", "--only", "uea/JapaneseVowels", "--extra", "trainer.precision=bf16-mixed")
    assert reproduce.main(args, runner=Recorder()) == 0
    out = capsys.readouterr().out
    assert "0 done" in out and "4 missing" in out  # the finished fp32 run of flow seed 0 is not this variant
    assert "Runs go to the variant folder(s) 'trainer.precision=bf16-mixed'" in out
    assert "trainer.precision=bf16-mixed resume=true 'variant=\"trainer.precision=bf16-mixed\"'" in out
    plan = reproduce.make_plan(load_manifest(tree / "manifests" / "uea.yaml"), runs_dir=tree / "runs",
                               conf_dir=tree / "conf", data_dir=tree / "data", extra=["trainer.precision=bf16-mixed"],
                               cells=reproduce.CellFilter(experiments=["uea/JapaneseVowels"]))
    assert {c.run_dir.parent.name for c in plan.cells()} == {"trainer.precision=bf16-mixed"}
    # hardware-only extras are the recipe: trainer=cpu keeps the cells' own folders and states
    plan = reproduce.make_plan(load_manifest(tree / "manifests" / "uea.yaml"), runs_dir=tree / "runs",
                               conf_dir=tree / "conf", data_dir=tree / "data", extra=["trainer=cpu"],
                               cells=reproduce.CellFilter(experiments=["uea/JapaneseVowels"]))
    assert {(c.attention, c.seed): c.state for c in plan.cells()}[("flow", 0)] == "done"


def test_a_declared_variant_runs_under_its_name(tree, capsys):
    manifest = tree / "manifests" / "uea.yaml"
    manifest.write_text(MANIFEST + "variants:\n  quick: {overrides: [trainer.max_epochs=5], attentions: [softmax]}\n")
    assert reproduce.main(argv(tree, "--dry-run", "--only", "uea/JapaneseVowels", "--variant", "quick"),
                          runner=Recorder()) == 0
    out = capsys.readouterr().out
    assert "variant 'quick' (trainer.max_epochs=5)" in out and "model/attention=softmax seed=0,1" in out
    assert "trainer.max_epochs=100 trainer.max_epochs=5 resume=true 'variant=\"quick\"'" in out
    assert reproduce.main(argv(tree, "--dry-run", "--variant", "nope"), runner=Recorder()) == 2
    assert "no variant 'nope' (declared: quick)" in capsys.readouterr().err


def test_a_started_run_of_another_recipe_is_not_resumed(tree):
    """A partial run whose recipe.json differs from the cell's recipe is reported, not resumed as the cell."""
    run = tree / "runs/uea/JapaneseVowels/flow/best_test/seed1"
    (run / "recipe.json").write_text(json.dumps({"science": {"trainer.max_epochs": 3}}))
    plan = reproduce.make_plan(load_manifest(tree / "manifests" / "uea.yaml"), runs_dir=tree / "runs",
                               conf_dir=tree / "conf", data_dir=tree / "data",
                               cells=reproduce.CellFilter(experiments=["uea/JapaneseVowels"]))
    cell = next(c for c in plan.cells() if (c.attention, c.seed) == ("flow", 1))
    assert cell.state == "off-recipe" and "trainer.max_epochs=100 (recipe: 3)" not in cell.note
    assert "trainer.max_epochs=3 (recipe: 100)" in cell.note
