"""The speed tooling: train_speed's configurations and report, the side-by-side UEA comparison's verdict, and
`make gpu-check DEVICE=cpu`, the small version of the GPU acceptance command (run here so that it never rots)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from experiments import train_speed
from experiments.bench import uea_speed

REPO = Path(__file__).resolve().parents[1]


def test_train_speed_compiles_the_chosen_attentions_and_times_the_matmuls_once():
    args = train_speed.parse_args(["--quick"])
    configs = {(c["workload"], c["attention"], c["mode"]) for c in train_speed.configurations(args)}
    assert ("uea", "flow", "compiled") in configs and ("uea", "softmax", "compiled") not in configs
    assert ("uea", "flow", "matmul") in configs and ("uea", "softmax", "matmul") not in configs
    assert {c[0] for c in configs} == set(train_speed.QUICK_WORKLOADS)
    assert args.tag == "train_speed_quick" and train_speed.parse_args([]).tag == "train_speed"
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--workloads", "uea,imagenet22k"])


def test_train_speed_report_gives_ratios():
    record = {"workload": "uea", "batch": 16, "peak_mib": 700.0, "threads": 2}
    results = {
        "scale": "paper", "command": "python -m experiments.train_speed", "git_sha": "abc", "started_at": "now",
        "machine": {"cpu_model": "cpu", "cpu_count": 2}, "versions": {"torch": "2"}, "load_average_at_start": (1, 1, 1),
        "load_average_at_end": (1, 1, 1), "workloads": {"uea": {"notes": ""}},
        "records": [{**record, "attention": "flow", "mode": "eager", "step_ms": 100.0, "steps_per_s": 10.0},
                    {**record, "attention": "flow", "mode": "compiled", "step_ms": 50.0, "steps_per_s": 20.0,
                     "warmup_s": 30.0},
                    {**record, "attention": "flow", "mode": "matmul", "step_ms": 40.0, "steps_per_s": 25.0},
                    {**record, "attention": "softmax", "mode": "eager", "step_ms": 80.0, "steps_per_s": 12.5}],
    }
    rows = [line for line in train_speed.markdown(results).splitlines() if line.startswith("| uea")]
    assert rows[0].split(" | ")[3:8] == ["100", "50", "40", "2.00", "700"] and rows[0].endswith("| 0.80 |")
    assert rows[1].split(" | ")[2:5] == ["softmax", "80", "—"]


def test_a_failed_configuration_keeps_its_batch_and_each_scale_its_own_notes():
    from experiments.bench.train_step import WORKLOADS

    results = {
        "scale": "paper", "command": "c", "git_sha": "abc", "started_at": "now", "machine": {}, "versions": {},
        "load_average_at_start": None, "load_average_at_end": None,
        "workloads": {"imagenet": {"notes": "", "shapes": {"batch": 128}}},
        "records": [{"workload": "imagenet", "attention": "flow", "mode": "eager", "error": "killed by signal 9"}],
    }
    report = train_speed.markdown(results)
    assert "| imagenet | 128 | flow | fail |" in report and "- imagenet flow eager: killed by signal 9" in report
    assert WORKLOADS["wikitext103"].notes_at("paper") == "" and "WikiText-2" in WORKLOADS["wikitext103"].notes_at("quick")
    assert WORKLOADS["lra_retrieval"].notes_at("paper") == WORKLOADS["lra_retrieval"].notes_at("tiny") != ""


def test_uea_speed_keeps_the_fastest_run_of_each_side_and_checks_the_targets():
    def run(side, wall, accuracy):
        return {"side": side, "wall_s": wall, "accuracy": accuracy, "load_before": (1.0, 1.0, 1.0)}

    runs = [run("baseline", 100.0, 98.6), run("ours", 75.0, 98.4), run("baseline", 98.0, 98.6), run("ours", 70.0, 98.1)]
    summary = uea_speed.compare(runs)
    assert summary["speedup"] == pytest.approx(98.0 / 70.0) and summary["meets_targets"]
    assert not uea_speed.compare(runs[:2])["meets_targets"]  # 1.33x
    assert not uea_speed.compare([run("baseline", 100.0, 99.0), run("ours", 50.0, 97.5)])["meets_targets"]
    assert uea_speed.compare([run("baseline", 100.0, 99.0), {**run("ours", 50.0, 0), "error": "x"}])["speedup"] is None


def test_make_gpu_check_on_a_cpu_runs_its_small_version(tmp_path):
    completed = subprocess.run(["make", "gpu-check", "DEVICE=cpu", f"ARGS=--out {tmp_path}"], cwd=REPO,
                               capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [stage["outcome"] for stage in report["stages"]] == ["passed"] * 3
    speed = json.loads((tmp_path / "gpu_check_train_speed.json").read_text())
    assert {r["mode"] for r in speed["records"] if "steps_per_s" in r} == {"eager", "compiled"}
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## Attention benchmark" in markdown and "## Training speed" in markdown
