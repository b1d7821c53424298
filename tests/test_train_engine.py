"""The training engine: the metrics.json contract, seeding, resume, bad input and W&B finishing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from experiments import train as train_entry
from experiments.run_guard import FinishedRunError, RecipeChangedError
from results.portable_paths import absolute_paths
from results.run_record import validate_record
from tasks.common.module import NonFiniteLossError
from tests.helpers import HARNESS, TINY_UEA, compose_config, write_tiny_uea


def tiny_config(tmp_path: Path, *extra: str):
    """The tiny UEA run; last.ckpt after every epoch (not at most once a minute), so that kills land where tests
    expect them."""
    write_tiny_uea(tmp_path / "data")
    return compose_config(
        ["experiment=uea/base", "data.dataset=Tiny", f"paths.data_dir={tmp_path / 'data'}", *TINY_UEA,
         "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=1", "callbacks.last_checkpoint.min_interval_s=0",
         HARNESS, *extra]
    )


def run(tmp_path: Path, run_name: str, *extra: str) -> dict:
    return train_entry.train(tiny_config(tmp_path, *extra), tmp_path / run_name).to_dict()


def test_metrics_json_contract(tmp_path, monkeypatch):
    # The record names the commit checked out when the run started, even if the tree changes while it trains.
    checkpoints = tmp_path / "a" / "checkpoints"
    monkeypatch.setattr(train_entry, "git_sha", lambda: "b" * 40 if checkpoints.exists() else "a" * 40)
    record = run(tmp_path, "a", "seed=3")
    path = tmp_path / "a" / "metrics.json"
    written = json.loads(path.read_text())
    assert validate_record(written) == ("", [])  # the aggregator accepts it as a complete run
    assert written["experiment"] == "uea/Tiny" and written["task"] == "uea" and written["dataset"] == "Tiny"
    assert written["attention"] == "flow" and written["seed"] == 3 and written["selection"] == "best_test"
    assert written["primary_metric"] == "accuracy" and 0 <= written["primary_value"] <= 100
    # best_test: the reported value is the best accuracy over the evaluations (which ran on the test set)
    assert written["primary_value"] == pytest.approx(100 * max(h["val/acc"] for h in written["history"]))
    assert len(written["history"]) == 4
    assert written["versions"]["torch"] == torch.__version__.split("+")[0]
    assert written["config"]["model"]["attention"]["clamp"] is None  # the time-series recipe has no clamp
    assert record["primary_value"] == written["primary_value"] and written["git_sha"] == "a" * 40
    assert not list(path.parent.glob(".metrics.json.*"))  # the atomic write left no temp file
    assert (tmp_path / "a" / "checkpoints" / "last.ckpt").exists()


def test_same_seed_gives_same_metrics_on_cpu(tmp_path):
    first, second = run(tmp_path, "a", "seed=1"), run(tmp_path, "b", "seed=1")
    assert first["history"] == second["history"] and first["metrics"] == second["metrics"]
    assert run(tmp_path, "c", "seed=2")["metrics"]["test/loss"] != first["metrics"]["test/loss"]


def test_holdout_val_reports_test_accuracy_of_the_best_val_checkpoint(tmp_path):
    write_tiny_uea(tmp_path / "data")
    record = run(tmp_path, "h", "selection=holdout_val", "data.val_fraction=0.25", "trainer.max_epochs=6")
    assert record["selection"] == "holdout_val" and record["data"]["val_source"] != "TEST"
    assert record["primary_value"] == pytest.approx(100 * record["metrics"]["test/acc"])
    # the tested weights are best.ckpt, saved at the evaluation the objective picked (not the last one)
    best = torch.load(tmp_path / "h" / "checkpoints" / "best.ckpt", weights_only=False)
    picked = max(record["history"], key=lambda h: (h["val/acc"], -h["step"]))  # ties: the first
    assert record["tested"] == {"checkpoint": "best", "step": picked["step"], "epoch": best["epoch"]}
    assert best["global_step"] == picked["step"] == record["metrics"]["best/step"]
    # it is scored, never resumed: the weights and the module's history, not the optimiser's state (last.ckpt has it)
    assert "optimizer_states" not in best and best["evaluation_history"]
    assert "optimizer_states" in torch.load(tmp_path / "h" / "checkpoints" / "last.ckpt", weights_only=False)
    assert record["tested"]["step"] != record["timing"]["steps"] or picked is record["history"][-1]


def test_final_reports_test_accuracy_of_the_last_weights(tmp_path):
    record = run(tmp_path, "f", "selection=final", "data.val_fraction=0.25")
    assert record["tested"] == {"checkpoint": "last", "step": record["timing"]["steps"], "epoch": 4}
    assert record["primary_value"] == pytest.approx(100 * record["metrics"]["test/acc"])
    assert record["data"]["val_source"] != "TEST"  # the evaluations score the held-out split, for monitoring only
    # the test scored the weights after the last step: the same as scoring last.ckpt, which holds them
    last = torch.load(tmp_path / "f" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == record["tested"]["step"]


def test_a_finished_run_is_never_overwritten(tmp_path):
    first = run(tmp_path, "done")
    record = tmp_path / "done" / "metrics.json"
    before = record.read_bytes()
    with pytest.raises(FinishedRunError, match=r"holds a finished run .*resume=true.*overwrite=true"):
        run(tmp_path, "done", "trainer.max_epochs=2")
    assert record.read_bytes() == before
    again = run(tmp_path, "done", "resume=true")  # continues the finished run: the same result, scored again
    assert again["metrics"] == first["metrics"] and again["history"] == first["history"]
    second = run(tmp_path, "done", "overwrite=true", "trainer.max_epochs=2")
    assert len(second["history"]) == 2
    moved = list((tmp_path / "done" / ".replaced").glob("*/metrics.json"))
    assert len(moved) == 1 and json.loads(moved[0].read_text())["history"] == first["history"]
    assert (moved[0].parent / "checkpoints" / "last.ckpt").exists()  # nothing deleted


def test_resume_under_another_recipe_refuses(tmp_path):
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path, "r", "+callbacks.kill._target_=tests.helpers.InterruptAtEpoch", "+callbacks.kill.epoch=2")
    with pytest.raises(RecipeChangedError, match=r"model.d_model is now 32, the run started with 16"):
        run(tmp_path, "r", "resume=true", "model.d_model=32")
    assert run(tmp_path, "r", "resume=true")["timing"]["resumed_from"].endswith("last.ckpt")


def test_records_name_no_absolute_path(tmp_path, monkeypatch):
    """A record written anywhere travels: paths are relative to the runs and data roots, or a package's data."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    cfg = compose_config(["experiment=uea/JapaneseVowels", *TINY_UEA, "trainer.max_epochs=2",
                          f"paths.runs_dir={runs}", f"paths.data_dir={tmp_path / 'data'}"])
    train_entry.train(cfg, runs / "uea/JapaneseVowels/flow/best_test/seed0")
    written = json.loads((runs / "uea/JapaneseVowels/flow/best_test/seed0/metrics.json").read_text())
    assert absolute_paths(written) == []
    assert written["run_dir"] == "uea/JapaneseVowels/flow/best_test/seed0"
    assert written["data"]["train_path"] == "aeon:datasets/data/JapaneseVowels/JapaneseVowels_TRAIN.ts"
    assert written["config"]["callbacks"]["model_checkpoint"]["dirpath"] == (
        "$RUNS_DIR/uea/JapaneseVowels/flow/best_test/seed0/checkpoints")
    assert written["config"]["paths"]["data_dir"] == "$DATA_DIR"


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    uninterrupted = run(tmp_path, "full")
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path, "resumed", "+callbacks.kill._target_=tests.helpers.InterruptAtEpoch", "+callbacks.kill.epoch=2")
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = run(tmp_path, "resumed", "resume=true")
    assert resumed["timing"]["resumed_from"].endswith("last.ckpt")
    assert resumed["history"] == uninterrupted["history"]
    assert resumed["metrics"] == uninterrupted["metrics"]
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    again = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(full[key], again[key]) for key in full)


def test_short_epochs_write_last_ckpt_at_most_once_a_minute_and_after_the_last_epoch(tmp_path):
    # the shipped default: epoch 0 writes (step 2), epochs 1-2 come within the minute and do not; the kill at the
    # start of epoch 3 leaves step 2's checkpoint, from which the resumed run still ends as the uninterrupted one
    default = "callbacks.last_checkpoint.min_interval_s=60"
    uninterrupted = run(tmp_path, "full", default)
    last = tmp_path / "full" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 8  # the last epoch always writes
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path, "resumed", default, "+callbacks.kill._target_=tests.helpers.InterruptAtEpoch",
            "+callbacks.kill.epoch=3")
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    resumed = run(tmp_path, "resumed", default, "resume=true")
    assert resumed["history"] == uninterrupted["history"] and resumed["metrics"] == uninterrupted["metrics"]


def test_nan_loss_stops_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path, "r", "+callbacks.kill._target_=tests.helpers.InterruptAtEpoch", "+callbacks.kill.epoch=2")
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    # 2 batches per epoch: the resumed run starts at global step 4 and is poisoned at step 5
    with pytest.raises(NonFiniteLossError, match=r"global step 5 .*resume=true"):
        run(tmp_path, "r", "resume=true", "+callbacks.poison._target_=tests.helpers.PoisonWeights", "+callbacks.poison.at_step=5")
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert not (tmp_path / "r" / "metrics.json").exists()  # the failed run wrote none


def test_config_key_typo_gets_hydra_error(tmp_path):
    with pytest.raises(ConfigCompositionException, match="datset"):
        compose_config(["experiment=uea/JapaneseVowels", "data.datset=JapaneseVowels"])


def test_unknown_attention_lists_the_registered_ones(tmp_path):
    with pytest.raises(MissingConfigException, match=r"(?s)Available options.*cosformer.*flow.*softmax"):
        compose_config(["experiment=uea/JapaneseVowels", "model/attention=flow_v2"])
    # the registry's own error (Hydra wraps it in an InstantiationException that keeps the message)
    with pytest.raises(Exception, match="Registered attentions: flow, flow_no_competition"):
        run(tmp_path, "x", "model.attention.name=flow_v2")


def test_unknown_dataset_lists_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match="JapaneseVowels"):
        run(tmp_path, "x", "data.dataset=JapaneseVowel")


def test_wandb_is_finished_even_when_the_run_fails(tmp_path, monkeypatch):
    finished = []
    fake = types.SimpleNamespace(run=object(), finish=lambda exit_code: finished.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_config(tmp_path, "+callbacks.poison._target_=tests.helpers.PoisonWeights", "+callbacks.poison.at_step=0")
    with pytest.raises(NonFiniteLossError):
        train_entry.run_and_finish(cfg, tmp_path / "w")
    assert finished == [1]


def process_command(tmp_path: Path) -> list[str]:
    """A UEA run in a fresh process: 6 batches per epoch and last.ckpt every 4 steps, so most checkpoints, and so
    most interruptions, fall mid-epoch."""
    write_tiny_uea(tmp_path / "data")
    return [
        sys.executable, "-m", "experiments.train", "experiment=uea/base", "data.dataset=Tiny", "data.batch_size=4",
        f"paths.data_dir={tmp_path / 'data'}", *TINY_UEA, "trainer.max_epochs=6", "trainer.check_val_every_n_epoch=1",
        "callbacks.last_checkpoint.every_n_train_steps=4", "callbacks.last_checkpoint.every_n_epochs=null", HARNESS,
    ]


@pytest.mark.distributed
def test_sigkilled_process_resumes_to_the_uninterrupted_result(tmp_path):
    import signal
    import subprocess
    import time

    command = process_command(tmp_path)
    subprocess.run([*command, f"hydra.run.dir={tmp_path / 'full'}"], check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    slow = ["+callbacks.slow._target_=tests.helpers.SleepPerBatch", "+callbacks.slow.seconds=0.25"]
    process = subprocess.Popen(
        [*command, f"hydra.run.dir={killed}", *slow], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2.2)  # about 9 batches later: past a checkpoint or two, before the end
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    subprocess.run([*command, f"hydra.run.dir={killed}", "resume=true"], check=True, capture_output=True, timeout=600)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed["timing"]["resumed_from"] and resumed["history"] == full["history"]
    assert resumed["metrics"] == full["metrics"]


@pytest.mark.distributed
def test_a_run_preempted_by_the_cluster_signal_resumes_to_the_uninterrupted_result(tmp_path):
    """SLURM's warning signal (USR1): last.ckpt is saved at the next step and the run stops; the requeued job runs
    the same command, which resumes from it (no resume=true needed) and ends with the uninterrupted result."""
    import signal
    import subprocess
    import time

    command = [*process_command(tmp_path), "+callbacks.slow._target_=tests.helpers.SleepPerBatch",
               "+callbacks.slow.seconds=0.25"]
    subprocess.run([*command, f"hydra.run.dir={tmp_path / 'full'}"], check=True, capture_output=True, timeout=600)
    run_dir = tmp_path / "preempted"
    requeued = [*command, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(requeued, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.3)  # a few batches past the first checkpoint: the signal falls between checkpoints
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and "RunPreempted" in stderr, stderr[-2000:]
    marker = (run_dir / ".preempted").read_text()
    step = int(marker.split("at step ")[1])
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    assert marker.startswith("SIGUSR1") and not (run_dir / "metrics.json").exists()
    subprocess.run(requeued, check=True, capture_output=True, timeout=600)  # the requeued job: the same command
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["timing"]["resumed_from"] and not (run_dir / ".preempted").exists()
    assert resumed["history"] == full["history"] and resumed["metrics"] == full["metrics"]


@pytest.mark.parametrize("launcher, key, value", [("local_parallel", "n_jobs", 2), ("slurm", "gpus_per_node", 1)])
def test_launcher_configs_compose(launcher, key, value):
    from hydra import compose, initialize_config_dir

    from tests.helpers import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=uea/JapaneseVowels", f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher[key] == value
    assert "Launcher" in cfg.hydra.launcher._target_


def test_out_of_memory_names_the_attention_and_the_fix(tmp_path, monkeypatch):
    from flowformer.models.ts_classifier import TimeSeriesClassifier

    def explode(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(TimeSeriesClassifier, "forward", explode)
    with pytest.raises(MemoryError, match=r"attention 'softmax' \(data\.batch_size=16.*accumulate_grad_batches"):
        run(tmp_path, "oom", "model/attention=softmax")


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("kill_step, saved_step", [(9, 8), (11, 8), (13, 12)])
def test_run_killed_mid_epoch_resumes_on_the_same_batches(tmp_path, kill_step, saved_step):
    """Epoch-based (UEA): 6 batches per epoch, last.ckpt every 4 steps. A kill at step 9 or 11 resumes from step 8
    (epoch 1, batch 2); one at step 13 from step 12, the last batch of epoch 1, whose evaluation followed the
    checkpoint. Each must end with the uninterrupted run's history, metrics and weights."""
    every = ["data.batch_size=4", "callbacks.last_checkpoint.every_n_train_steps=4",
             "callbacks.last_checkpoint.every_n_epochs=null", "trainer.max_epochs=3"]
    uninterrupted = run(tmp_path, "full", *every)
    with pytest.raises(RuntimeError, match=f"simulated kill at global step {kill_step}"):
        run(tmp_path, "resumed", *every, "+callbacks.kill._target_=tests.helpers.InterruptAtStep",
            f"+callbacks.kill.step={kill_step}")
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved_step
    resumed = run(tmp_path, "resumed", *every, "resume=true")
    assert resumed["timing"]["resumed_from"].endswith("last.ckpt")
    assert resumed["history"] == uninterrupted["history"] and resumed["metrics"] == uninterrupted["metrics"]
    full, again = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert all(torch.equal(full[key], again[key]) for key in full)


def test_step_based_run_killed_between_evaluations_resumes_exactly(tmp_path):
    """Step-based (LRA ListOps recipe on a fixture): evaluation every 3 steps, last.ckpt every 2 steps, killed at
    step 7 (mid-epoch), so it resumes from step 6, whose evaluation came after the step's checkpoint: the resumed
    run ends like the uninterrupted one."""
    from tests.fixtures.lra import write_fixture

    data_dir = tmp_path / "data"
    probe = compose_config(["experiment=lra/listops", f"paths.data_dir={data_dir}"])
    fixture = write_fixture(data_dir, probe)
    base = [
        "experiment=lra/listops", f"paths.data_dir={data_dir}", *[f"{key}={value}" for key, value in fixture.items()],
        "model.d_model=16", "model.qkv_dim=16", "model.mlp_dim=16", "data.batch_size=2", "data.num_workers=0",
        "trainer.max_steps=10", "trainer.val_check_interval=3", "trainer.accelerator=cpu", "logger=csv",
        "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.last_checkpoint.every_n_epochs=null", HARNESS,
    ]

    def go(name: str, *extra: str) -> dict:
        return train_entry.train(compose_config([*base, *extra]), tmp_path / name).to_dict()

    uninterrupted = go("full")
    assert [h["step"] for h in uninterrupted["history"]] == [3, 6, 9]
    with pytest.raises(RuntimeError, match="simulated kill at global step 7"):
        go("resumed", "+callbacks.kill._target_=tests.helpers.InterruptAtStep", "+callbacks.kill.step=7")
    resumed = go("resumed", "resume=true")
    assert resumed["history"] == uninterrupted["history"] and resumed["metrics"] == uninterrupted["metrics"]
    full, again = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert all(torch.equal(full[key], again[key]) for key in full)


def test_a_monitor_that_is_never_logged_is_named(tmp_path):
    with pytest.raises(KeyError, match=r"objective.monitor is 'val/accuracy'.*'val/acc'"):
        run(tmp_path, "m", "objective.monitor=val/accuracy")


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    """`trainer.precision=bf16-mixed` runs the whole engine under autocast (every op must accept bf16)."""
    record = run(tmp_path, "bf16", "trainer.precision=bf16-mixed", "trainer.max_epochs=2")
    assert record["config"]["trainer"]["precision"] == "bf16-mixed"
    assert all(map(math.isfinite, (h["val/loss"] for h in record["history"])))


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_records_checkpoints_and_tables_are_readable_as_the_umask_says(tmp_path, mask):
    from results.atomic_io import write_text_atomic
    from tasks.common.checkpoint_io import AtomicCheckpointIO

    old = os.umask(mask)
    try:
        write_text_atomic(tmp_path / "metrics.json", "{}")
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    for name in ("metrics.json", "last.ckpt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
