"""Evaluation in real MuJoCo: the vectorised rollouts against the sequential reference loop, seeds, the score, the
collector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowformer.models import DecisionTransformer
from tasks.d4rl import collect
from tasks.d4rl.environments import REFERENCE_RETURNS, d4rl_reference
from tasks.d4rl.evaluation import EvaluationProtocol, target_name
from tasks.d4rl.rollout import TransformerPolicy, run_episodes, run_episodes_sequentially
from tasks.d4rl.trajectories import read_d4rl_file
from tasks.d4rl.windows import Conditioning

EVAL = {
    "targets": None,
    "report_target": None,
    "episodes": 2,
    "final_episodes": 5,
    "num_envs": 4,
    "max_episode_steps": 30,
    "seed": 7,
    "test_seed": 70,
    "paper_targets": {"hopper": [3600, 1800]},
}


def policy_model(padding="right", attention="flow") -> tuple[DecisionTransformer, Conditioning]:
    torch.manual_seed(3)
    node = {"name": attention, "clamp": 10.0} if attention == "flow" else {"name": attention}
    model = DecisionTransformer(11, 3, context_length=5, d_model=16, n_layers=1, n_heads=2, d_ff=32, attention=node)
    rng = np.random.default_rng(0)
    conditioning = Conditioning(
        rng.normal(size=11).astype(np.float32), rng.uniform(0.5, 2, 11).astype(np.float32), 1000.0, 5, 1000, padding
    )
    return model.eval(), conditioning


@pytest.mark.parametrize("padding, attention", [("right", "flow"), ("left", "flow"), ("right", "softmax")])
def test_vectorised_episodes_equal_the_sequential_loop(padding, attention):
    """Same seeds, same policy: batched windows (padded, masked, slots refilled) play the episodes the one-env loop
    plays with unpadded windows."""
    model, conditioning = policy_model(padding, attention)
    seeds = [11, 12, 13, 14, 15]
    vectorised = run_episodes(
        TransformerPolicy(model), "Hopper-v4", 360.0, seeds, conditioning, num_envs=3, max_episode_steps=80
    )
    sequential = run_episodes_sequentially(model, "Hopper-v4", 360.0, seeds, conditioning, max_episode_steps=80)
    assert [e.seed for e in vectorised] == seeds
    assert [e.length for e in vectorised] == [e.length for e in sequential]
    np.testing.assert_allclose(
        [e.episode_return for e in vectorised], [e.episode_return for e in sequential], rtol=1e-4
    )
    # the hopper falls at different steps, so slots are refilled and idle at different times
    assert all(e.terminated for e in vectorised) and len({e.length for e in vectorised}) > 1


def test_vectorised_episodes_equal_the_sequential_loop_when_they_end_on_the_time_limit():
    """HalfCheetah never terminates: every episode is truncated by the time limit, its slot is refilled with the next
    seed, and timesteps past max_timestep - 1 are clipped as in training."""
    torch.manual_seed(3)
    model = DecisionTransformer(
        17, 6, context_length=4, max_timestep=10, d_model=16, n_layers=1, n_heads=2, d_ff=32,
        attention={"name": "flow", "clamp": 10.0},
    ).eval()
    rng = np.random.default_rng(1)
    conditioning = Conditioning(
        rng.normal(size=17).astype(np.float32), rng.uniform(0.5, 2, 17).astype(np.float32), 1000.0, 4, 10, "right"
    )
    seeds = [21, 22, 23, 24, 25]
    vectorised = run_episodes(
        TransformerPolicy(model), "HalfCheetah-v4", 6000.0, seeds, conditioning, num_envs=3, max_episode_steps=25
    )
    sequential = run_episodes_sequentially(model, "HalfCheetah-v4", 6000.0, seeds, conditioning, max_episode_steps=25)
    assert [e.length for e in vectorised] == [e.length for e in sequential] == [25] * 5
    assert not any(e.terminated for e in vectorised + sequential)
    # HalfCheetah amplifies the float rounding of a padded, batched forward more than the hopper's short episodes
    np.testing.assert_allclose(
        [e.episode_return for e in vectorised], [e.episode_return for e in sequential], rtol=1e-3, atol=1e-3
    )
    assert len({round(e.episode_return, 3) for e in vectorised}) == 5  # the seeds gave different episodes


def test_an_episode_does_not_depend_on_how_many_step_beside_it():
    model, conditioning = policy_model()
    run = lambda n: run_episodes(
        TransformerPolicy(model), "Hopper-v4", 360.0, [5, 6, 7, 8], conditioning, num_envs=n, max_episode_steps=80
    )
    one, four = run(1), run(4)
    np.testing.assert_allclose([e.episode_return for e in one], [e.episode_return for e in four], rtol=1e-4)


def test_the_protocol_gives_every_episode_its_seed_and_reports_the_highest_target():
    protocol = EvaluationProtocol.from_config(EVAL, "Hopper-v4", "hopper", d4rl_reference("hopper"))
    assert protocol.targets == (3600.0, 1800.0) and protocol.report_target == 3600.0
    assert protocol.seeds("val", final=False) == [7, 8]
    assert protocol.seeds("val", final=True) == [7, 8, 9, 10, 11]
    assert protocol.seeds("test", final=False) == [70, 71, 72, 73, 74]
    assert EvaluationProtocol.from_dict(protocol.to_dict()) == protocol
    assert target_name(3600.0) == "3600" and target_name(0.5) == "0.5"
    with pytest.raises(ValueError, match="eval.report_target=5000 is not one of"):
        EvaluationProtocol.from_config({**EVAL, "report_target": 5000}, "Hopper-v4", "hopper", d4rl_reference("hopper"))


def test_the_score_is_d4rls_normalised_return_times_100():
    for family, (random, expert) in REFERENCE_RETURNS.items():
        reference = d4rl_reference(family)
        assert reference.score(random) == pytest.approx(0.0)
        assert reference.score(expert) == pytest.approx(100.0)


@pytest.mark.parametrize(
    "family, random, expert",
    [  # D4RL's published REF_MIN_SCORE / REF_MAX_SCORE of the v2 locomotion datasets (d4rl/infos.py)
        ("halfcheetah", -280.178953, 12135.0),
        ("hopper", -20.272305, 3234.3),
        ("walker2d", 1.629008, 4592.3),
    ],
)
def test_the_reference_returns_are_d4rls_published_constants(family, random, expert):
    reference = d4rl_reference(family)
    assert (reference.random, reference.expert, reference.source) == (random, expert, "d4rl")
    assert reference.score(1607.0) == pytest.approx(100 * (1607.0 - random) / (expert - random))


def test_the_collector_writes_d4rls_layout_reproducibly(tmp_path):
    out = [tmp_path / f"hopper-random-{i}.hdf5" for i in range(2)]
    for path in out:
        assert (
            collect.main(
                [
                    "--env",
                    "hopper",
                    "--policy",
                    "random",
                    "--episodes",
                    "4",
                    "--max-episode-steps",
                    "20",
                    "--num-envs",
                    "3",
                    "--out",
                    str(path),
                ]
            )
            == 0
        )
    first, second = read_d4rl_file(out[0]), read_d4rl_file(out[1])
    assert first.num_episodes == 4 and first.info["dropped_steps"] == 0
    np.testing.assert_array_equal(first.observations, second.observations)
    import h5py

    with h5py.File(out[0]) as handle:
        terminals, timeouts = handle["terminals"][()], handle["timeouts"][()]
        assert handle.attrs["env_id"] == "Hopper-v4" and list(handle.attrs["seeds"]) == [0, 1, 2, 3]
        np.testing.assert_array_equal(
            handle["next_observations"][()][:-1][~(terminals | timeouts)[:-1]],
            handle["observations"][()][1:][~(terminals | timeouts)[:-1]],
        )
    assert (terminals | timeouts).sum() == 4 and not (terminals & timeouts).any()
    assert (first.lengths[timeouts[first.boundaries[1:] - 1]] == 20).all()  # a timeout is the time limit


def test_mujoco_warnings_go_to_logging_not_to_a_file_in_the_working_directory(tmp_path, monkeypatch):
    from tasks.d4rl.environments import make_env

    monkeypatch.chdir(tmp_path)
    make_env("HalfCheetah-v4").close()  # its model makes MuJoCo warn about a deprecated attribute
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_without_the_rl_extra_the_error_names_it(monkeypatch):
    import sys

    from tasks.d4rl.environments import require_gymnasium

    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import gymnasium now fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[rl\]'"):
        require_gymnasium()


def test_the_evaluation_bench_reports_equal_means_not_identical_episodes(tmp_path):
    from experiments import d4rl_eval_bench

    args = ["--episodes", "3", "--max-episode-steps", "5", "--widths", "16", "--out", str(tmp_path)]
    assert d4rl_eval_bench.main(args) == 0
    import json

    measurement = json.loads((tmp_path / "d4rl_eval.json").read_text())["measurements"][0]
    assert measurement["same_lengths"] and measurement["steps"] == 15
    difference = measurement["return_difference"]
    assert abs(difference["mean"]) <= difference["ci95"] + 1e-3
    assert "mean Δ return (95% CI)" in (tmp_path / "d4rl_eval.md").read_text()
