"""The D4RL domain in the engine: evaluations by rollouts, the run record, resume, and a checkpoint as a policy."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from experiments.train import train
from tasks.d4rl import collect
from tasks.d4rl.module import masked_action_error
from tasks.d4rl.trajectories import read_d4rl_file
from tests.fixtures.d4rl import write_d4rl_dataset
from tests.helpers import HARNESS, compose_config

TINY = [
    "model.d_model=16",
    "model.n_heads=2",
    "model.d_ff=32",
    "model.n_layers=1",
    "data.batch_size=8",
    "eval.episodes=2",
    "eval.final_episodes=3",
    "eval.num_envs=2",
    "eval.max_episode_steps=6",
    "trainer.val_check_interval=2",
    "trainer.max_steps=4",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def run(tmp_path, name, *overrides):
    data_dir = tmp_path / "data"
    if not (data_dir / "d4rl" / "hopper-fixture.hdf5").exists():
        write_d4rl_dataset(data_dir, "hopper-fixture", lengths=[12, 20, 9, 15])
    cfg = compose_config(
        ["experiment=d4rl/base", "data.dataset=hopper-fixture", f"paths.data_dir={data_dir}", *TINY, *overrides]
    )
    return train(cfg, tmp_path / name)


def evaluations(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]


def test_evaluations_play_the_protocol_and_fill_the_run_record(tmp_path):
    record = run(tmp_path, "run")
    assert [entry["step"] for entry in record.history] == [2, 4]
    metrics = record.metrics
    for stage in ("test", "best/val", "last/val"):
        for target in ("3600", "1800"):
            assert f"{stage}/return_{target}" in metrics and f"{stage}/score_{target}" in metrics
    assert metrics["test/score"] == metrics["test/score_3600"]  # the highest target is reported
    assert record.primary_metric == "normalised_score"
    # the paper's protocol (final): the weights after the last step play fresh test episodes
    assert record.selection == "final" and record.tested["checkpoint"] == "last" and record.tested["step"] == 4
    assert record.primary_value == pytest.approx(metrics["test/score"])
    played = evaluations(tmp_path / "run")
    assert [(e["stage"], e["step"], e["target"], e["seeds"]) for e in played] == [
        ("val", 2, 3600.0, [10000, 10001]),
        ("val", 2, 1800.0, [10000, 10001]),
        ("val", 4, 3600.0, [10000, 10001, 10002]),
        ("val", 4, 1800.0, [10000, 10001, 10002]),  # the last evaluation
        ("test", 4, 3600.0, [20000, 20001, 20002]),
        ("test", 4, 1800.0, [20000, 20001, 20002]),
    ]
    assert all(e["seconds"] >= 0 for e in played)
    last = played[2]
    assert metrics["last/val/return_3600"] == pytest.approx(np.mean(last["returns"]), rel=1e-6)
    assert record.data["evaluation"]["env_id"] == "Hopper-v4" and record.data["environment"]["mujoco"]


def test_holdout_val_reports_the_fresh_test_episodes(tmp_path):
    record = run(tmp_path, "run", "selection=holdout_val", "trainer.max_steps=2")
    assert record.primary_value == pytest.approx(record.metrics["test/score"])


def test_a_run_killed_between_evaluations_resumes_to_the_same_result(tmp_path):
    every = ["callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.last_checkpoint.every_n_epochs=null",
             HARNESS]
    whole = run(tmp_path, "whole", *every)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(
            tmp_path,
            "killed",
            *every,
            "+callbacks.kill._target_=tests.helpers.InterruptAtStep",
            "+callbacks.kill.step=3",
        )
    resumed = run(tmp_path, "killed", *every, "resume=true")
    assert resumed.timing["resumed_from"]
    assert resumed.history == whole.history
    assert resumed.metrics == pytest.approx(whole.metrics)


def test_a_resumed_run_lists_each_evaluation_once(tmp_path):
    """Killed after the evaluation of step 3 but before the checkpoint of step 4, the run resumes from step 2 and
    plays step 3 again: evaluations.jsonl must hold it once, as the uninterrupted run's file does. Resuming a
    finished run tests again: its test lines replace the earlier ones."""
    every = [
        "trainer.val_check_interval=1",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "callbacks.last_checkpoint.every_n_epochs=null",
        HARNESS,
    ]
    run(tmp_path, "whole", *every)
    kill = ["+callbacks.kill._target_=tests.helpers.InterruptAtStep", "+callbacks.kill.step=3"]
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path, "killed", *every, *kill)
    assert [(e["stage"], e["step"]) for e in evaluations(tmp_path / "killed")][-1] == ("val", 3)
    run(tmp_path, "killed", *every, "resume=true")
    run(tmp_path, "whole", *every, "resume=true")

    def played(name):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in evaluations(tmp_path / name)]

    whole = played("whole")
    assert [(e["stage"], e["step"]) for e in whole] == [
        *[("val", step) for step in (1, 1, 2, 2, 3, 3, 4, 4)],
        ("test", 4),
        ("test", 4),
    ]
    assert played("killed") == whole


def test_a_trained_run_is_a_policy_for_the_collector(tmp_path):
    run(tmp_path, "run", "trainer.max_steps=2")
    out = tmp_path / "hopper-ours.hdf5"
    code = collect.main(
        [
            "--env",
            "hopper",
            "--policy",
            str(tmp_path / "run"),
            "--episodes",
            "2",
            "--max-episode-steps",
            "5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert read_d4rl_file(out).num_episodes == 2
    assert (
        collect.main(["--env", "walker2d", "--policy", str(tmp_path / "run"), "--episodes", "1", "--out", str(out)])
        == 2
    )


class RecordForwardDtypes(L.Callback):
    """Records (training?, output dtype) of every forward of the model, in `RecordForwardDtypes.seen`."""

    seen: list[tuple[bool, torch.dtype]] = []

    def setup(self, trainer, pl_module, stage) -> None:
        if stage == "fit":
            RecordForwardDtypes.seen = []
            pl_module.model.register_forward_hook(
                lambda model, inputs, output: RecordForwardDtypes.seen.append((model.training, output.dtype))
            )


@pytest.mark.parametrize("fp32_eval, eval_dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_rollouts_act_in_fp32_under_a_bf16_mixed_trainer(tmp_path, fp32_eval, eval_dtype):
    """trainer=gpu trains in bf16-mixed; the official evaluation is fp32, and so are ours unless module.fp32_eval=false."""
    probe = ["+callbacks.dtypes._target_=tests.test_d4rl_module.RecordForwardDtypes"]
    run(tmp_path, "run", "trainer.precision=bf16-mixed", f"module.fp32_eval={fp32_eval}", "trainer.max_steps=2", *probe)
    training = {dtype for is_training, dtype in RecordForwardDtypes.seen if is_training}
    evaluating = {dtype for is_training, dtype in RecordForwardDtypes.seen if not is_training}
    assert training == {torch.bfloat16}  # the trainer's autocast is on
    assert evaluating == {eval_dtype}


def test_the_loss_ignores_padded_steps():
    predicted, actions = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [-10.0, -10.0]]])
    mask = torch.tensor([[False, False, True]])
    assert masked_action_error(predicted, actions, mask).item() == pytest.approx(2.5)


def test_the_rl_clamp_reaches_flow_attention():
    cfg = compose_config(["experiment=d4rl/hopper-medium"])
    assert cfg.model.attention.clamp == 10.0 and cfg.flow_clamp == 10.0


@pytest.mark.parametrize("episodes, world_size", [(3, 2), (100, 8), (1, 4), (10, 1)])
def test_ddp_processes_share_out_the_episodes_each_once(episodes, world_size):
    """Under DDP an evaluation's episodes are shared out (tests/test_ddp.py checks the gathered score)."""
    from tasks.d4rl.module import episode_share

    seeds = list(range(20_000, 20_000 + episodes))
    shares = [episode_share(seeds, world_size, rank) for rank in range(world_size)]
    assert sorted(seed for share in shares for seed in share) == seeds
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
