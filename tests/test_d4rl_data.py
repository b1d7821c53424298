"""D4RL data: reading D4RL's HDF5 layout and Minari datasets, the training windows, and the datamodule contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.d4rl.data import D4RLDataModule
from tasks.d4rl.environments import UnknownEnvironmentError, env_family
from tasks.d4rl.trajectories import (
    D4RLDataError,
    d4rl_file_names,
    find_d4rl_file,
    read_d4rl_file,
    read_minari,
)
from tasks.d4rl.windows import PAD_ACTION, Conditioning, StateStats, WindowDataset, returns_to_go
from tests.fixtures.d4rl import (
    episode_arrays,
    recorded_arrays,
    write_d4rl_dataset,
    write_d4rl_file,
    write_minari_dataset,
)

EVAL = {
    "env_version": "v4",
    "targets": None,
    "report_target": None,
    "episodes": 2,
    "final_episodes": 3,
    "num_envs": 2,
    "max_episode_steps": 5,
    "vectorization": "sync",
    "seed": 100,
    "test_seed": 200,
    "paper_targets": {"hopper": [3600, 1800], "halfcheetah": [12000, 6000], "walker2d": [5000, 2500]},
}


def datamodule(data_dir, dataset="hopper-fixture", **kwargs) -> D4RLDataModule:
    return D4RLDataModule(dataset=dataset, evaluation=EVAL, data_dir=data_dir / "d4rl", **kwargs)


# ------------------------------------------------------------------------------------------------ reading files


def test_episodes_end_at_terminals_or_timeouts_and_an_unfinished_tail_is_dropped(tmp_path):
    arrays = episode_arrays("hopper", [5, 3, 4], terminated=[True, False, True])
    arrays["terminals"][-1] = False  # the file stops in the middle of the third episode
    trajectories = read_d4rl_file(write_d4rl_file(tmp_path / "hopper-x.hdf5", arrays))
    assert trajectories.boundaries.tolist() == [0, 5, 8]
    assert trajectories.info == {"rows": 12, "dropped_steps": 4}
    np.testing.assert_array_equal(trajectories.observations, arrays["observations"][:8])
    np.testing.assert_allclose(
        trajectories.episode_returns(), [arrays["rewards"][:5].sum(), arrays["rewards"][5:8].sum()], rtol=1e-6
    )


def test_d4rl_cache_names_and_dir_are_found(tmp_path, monkeypatch):
    assert d4rl_file_names("hopper-medium-replay-v2") == [
        "hopper-medium-replay-v2.hdf5",
        "hopper_medium_replay-v2.hdf5",
    ]
    cache = tmp_path / "cache"
    write_d4rl_file(cache / "hopper_medium_replay-v2.hdf5", episode_arrays("hopper", [4]))
    assert find_d4rl_file("hopper-medium-replay-v2", tmp_path / "data") is None
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    assert find_d4rl_file("hopper-medium-replay-v2", tmp_path / "data") == cache / "hopper_medium_replay-v2.hdf5"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a: a.pop("timeouts"), "no array 'timeouts'"),
        (lambda a: a.update(actions=a["actions"][:, 0]), "'actions' has shape"),
        (lambda a: a.update(rewards=a["rewards"][:-1]), "differ in length"),
        (lambda a: a["observations"].__setitem__((6, 2), np.nan), "'observations' holds NaN or Inf (first at row 6"),
        (lambda a: (a["terminals"].fill(False), a["timeouts"].fill(False)), "no episode ends"),
        (lambda a: a.update({key: value[:0] for key, value in a.items()}), "the arrays hold no rows"),
        (lambda a: a.update(terminals=_float_flags(a["terminals"], nan_at=3)), "'terminals' holds nan at row 3 of 9"),
        (lambda a: a.update(timeouts=_float_flags(a["timeouts"], nan_at=2)), "'timeouts' holds nan at row 2 of 9"),
        (lambda a: a.update(timeouts=a["timeouts"] * 2.0), "'timeouts' holds 2.0 at row 8"),
    ],
)
def test_bad_files_name_the_file_and_the_key(tmp_path, damage, message):
    arrays = episode_arrays("hopper", [5, 4])
    damage(arrays)
    path = write_d4rl_file(tmp_path / "hopper-bad.hdf5", arrays)
    with pytest.raises(D4RLDataError, match="hopper-bad.hdf5") as error:
        read_d4rl_file(path)
    assert message in str(error.value)


def _float_flags(flags: np.ndarray, nan_at: int) -> np.ndarray:
    values = flags.astype(np.float32)
    values[nan_at] = np.nan
    return values


def test_float_flags_of_0_and_1_are_episode_ends(tmp_path):
    arrays = episode_arrays("hopper", [5, 4])
    arrays.update(terminals=arrays["terminals"].astype(np.float32), timeouts=arrays["timeouts"].astype(np.float64))
    assert read_d4rl_file(write_d4rl_file(tmp_path / "hopper-x.hdf5", arrays)).boundaries.tolist() == [0, 5, 9]


def test_a_missing_file_names_both_ways_to_get_one(tmp_path):
    module = datamodule(tmp_path, dataset="hopper-medium-v2")
    status = module.data_status()
    assert not status.available
    assert "make data-d4rl" in status.detail and "tasks.d4rl.collect" in status.detail
    with pytest.raises(FileNotFoundError, match="hopper-medium-v2.hdf5"):
        module.setup("fit")


def test_an_environment_no_dataset_name_maps_to_is_an_error():
    assert env_family("walker2d-medium-expert-v2") == "walker2d"
    with pytest.raises(UnknownEnvironmentError, match="'ant'.*halfcheetah, hopper, walker2d"):
        env_family("ant-medium-v2")


def test_minari_episodes_drop_the_observation_after_the_last_action(tmp_path):
    data = write_minari_dataset(tmp_path / "minari", "mujoco/hopper/tiny-v0", episodes=3, max_steps=12)
    dataset = read_minari("mujoco/hopper/tiny-v0", tmp_path / "minari")
    import minari

    stored = list(minari.MinariDataset(data).iterate_episodes())
    assert dataset.env_id == "Hopper-v5"
    assert dataset.trajectories.lengths.tolist() == [len(e.rewards) for e in stored]
    assert all(len(e.observations) == len(e.rewards) + 1 for e in stored)
    np.testing.assert_allclose(
        dataset.trajectories.observations[: len(stored[0].rewards)], stored[0].observations[:-1], rtol=1e-6
    )


def test_a_missing_minari_dataset_names_the_root_and_the_download(tmp_path):
    with pytest.raises(D4RLDataError, match="MINARI_DATASETS_PATH.*minari download mujoco/hopper/medium-v0"):
        read_minari("mujoco/hopper/medium-v0", tmp_path)


# ------------------------------------------------------------------------------------------------ windows


def windows(lengths, padding="right", context_length=4, max_timestep=1000, return_scale=10.0):
    from tasks.d4rl.trajectories import Trajectories, split_episodes

    arrays = episode_arrays("hopper", lengths)
    ends = arrays["terminals"] | arrays["timeouts"]
    trajectories = Trajectories(arrays["observations"], arrays["actions"], arrays["rewards"], split_episodes(ends))
    stats = StateStats.of(trajectories.observations)
    conditioning = Conditioning(stats.mean, stats.std, return_scale, context_length, max_timestep, padding)
    return trajectories, stats, WindowDataset(trajectories, conditioning)


def test_every_timestep_starts_a_right_padded_window_with_the_official_pad_values():
    trajectories, stats, dataset = windows([3, 6])
    assert len(dataset) == 9
    batch = dataset.__getitems__([1, 3, 8])
    assert batch["states"].shape == (3, 4, 11) and batch["actions"].shape == (3, 4, 3)
    assert batch["padding_mask"].tolist() == [[False, False, True, True], [False] * 4, [False, True, True, True]]
    np.testing.assert_allclose(batch["states"][0, :2], stats.normalise(trajectories.observations[1:3]), rtol=1e-6)
    np.testing.assert_allclose(batch["states"][0, 2], -stats.mean / stats.std, rtol=1e-6)  # 0 before normalising
    assert (batch["actions"][0, 2:] == PAD_ACTION).all()
    assert (batch["returns_to_go"][0, 2:] == 0).all() and (batch["timesteps"][0, 2:] == 0).all()
    assert batch["timesteps"][1].tolist() == [0, 1, 2, 3]
    rewards = trajectories.rewards
    np.testing.assert_allclose(batch["returns_to_go"][0, :2], [rewards[1:3].sum() / 10, rewards[2] / 10], rtol=1e-5)


def test_left_padding_moves_the_same_steps_to_the_end_of_the_window():
    _, _, right = windows([3, 6])
    _, _, left = windows([3, 6], padding="left")
    a, b = right.__getitems__([1]), left.__getitems__([1])
    assert b["padding_mask"].tolist() == [[True, True, False, False]]
    for key in ("states", "actions", "returns_to_go", "timesteps", "padding_mask"):
        torch.testing.assert_close(b[key][0, 2:], a[key][0, :2])
        torch.testing.assert_close(b[key][0, :2], a[key][0, 2:])


def test_returns_to_go_restart_with_every_episode_and_timesteps_are_clipped():
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0], np.float32)
    np.testing.assert_allclose(returns_to_go(rewards, np.array([0, 3, 5])), [6, 5, 3, 30, 20])
    _, _, dataset = windows([8], max_timestep=5)
    assert dataset.__getitems__([3])["timesteps"][0].tolist() == [3, 4, 4, 4]


def test_state_statistics_come_from_every_step_of_the_dataset():
    trajectories, stats, _ = windows([3, 6])
    np.testing.assert_allclose(stats.mean, trajectories.observations.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.std, trajectories.observations.std(0) + 1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ datamodule


def test_data_status_reads_no_data_and_setup_fills_the_contract(tmp_path):
    path = write_d4rl_dataset(tmp_path, "hopper-fixture", lengths=[6, 9])
    module = datamodule(tmp_path)
    assert module.data_status().available and module.windows is None
    module.setup("fit")
    assert module.model_dims() == {
        "state_dim": 11,
        "act_dim": 3,
        "max_action": 1.0,
        "context_length": 20,
        "max_timestep": 1000,
    }
    dims = module.module_dims()
    assert dims["evaluation"]["env_id"] == "Hopper-v4" and dims["evaluation"]["targets"] == [3600.0, 1800.0]
    assert dims["evaluation"]["report_target"] == 3600.0
    info = module.data_info
    assert info["path"] == str(path) and info["steps"] == 15 and info["episodes"] == 2
    assert info["evaluation"]["episode_seeds"] == {
        "val": [100, 101],
        "val_final": [100, 101, 102],
        "test": [200, 201, 202],
    }
    assert info["environment"]["env_id"] == "Hopper-v4" and info["environment"]["gymnasium"]
    batch = next(iter(module.train_dataloader()))
    assert batch["states"].shape == (15, 20, 11)  # every window start, in one (partial) batch
    assert [request["target"] for request in module.val_dataloader()] == [3600.0, 1800.0]


def test_a_dataset_of_another_environment_is_refused(tmp_path):
    write_d4rl_file(tmp_path / "d4rl" / "hopper-wrong.hdf5", episode_arrays("walker2d", [5]))
    with pytest.raises(D4RLDataError, match="states of size 17 and actions of size 6, but Hopper-v4 has 11 and 3"):
        datamodule(tmp_path, dataset="hopper-wrong").setup("fit")


def test_data_of_another_environment_with_the_same_sizes_is_refused_by_its_rewards(tmp_path):
    """HalfCheetah and Walker2d both take 17/6: a walker2d file named halfcheetah-* passes the size check, but its
    rewards replayed in HalfCheetah (and the other way round) are not the stored ones."""
    walker, cheetah = recorded_arrays("walker2d", [40, 40]), recorded_arrays("halfcheetah", [40, 40])
    write_d4rl_file(tmp_path / "d4rl" / "halfcheetah-wrong.hdf5", walker)
    write_d4rl_file(tmp_path / "d4rl" / "walker2d-wrong.hdf5", cheetah)
    for dataset, env_id in (("halfcheetah-wrong", "HalfCheetah-v4"), ("walker2d-wrong", "Walker2d-v4")):
        with pytest.raises(D4RLDataError, match=f"{dataset}.hdf5: .* does not come from {env_id}: replayed") as error:
            datamodule(tmp_path, dataset=dataset).setup("fit")
        assert "rename the file <env>-<quality>.hdf5" in str(error.value)
    skipped = datamodule(tmp_path, dataset="halfcheetah-wrong", reward_check=False)
    skipped.setup("fit")
    assert skipped.data_info["environment"]["reward_check"] == "skipped (data.reward_check=false)"
    write_d4rl_file(tmp_path / "d4rl" / "walker2d-right.hdf5", walker)
    module = datamodule(tmp_path, dataset="walker2d-right")
    module.setup("fit")
    check = module.data_info["environment"]["reward_check"]
    assert check["passed"] and check["agreeing"] == check["rows"] > 8


def test_a_collected_file_names_the_environment_it_was_recorded_on(tmp_path):
    from tasks.d4rl.collect import write_d4rl_file as write_collected

    path = tmp_path / "d4rl" / "halfcheetah-renamed.hdf5"
    write_collected(path, recorded_arrays("walker2d", [10]), {"env_id": "Walker2d-v4"})
    assert read_d4rl_file(path).info["recorded_env_id"] == "Walker2d-v4"
    with pytest.raises(D4RLDataError, match="recorded on Walker2d-v4, but data.dataset='halfcheetah-renamed' names"):
        datamodule(tmp_path, dataset="halfcheetah-renamed").setup("fit")


def test_a_minari_dataset_is_evaluated_on_its_own_environment(tmp_path):
    write_minari_dataset(tmp_path / "minari", "mujoco/hopper/tiny-v0", episodes=2, max_steps=10)
    module = datamodule(tmp_path, dataset="mujoco/hopper/tiny-v0", source="minari", minari_root=tmp_path / "minari")
    assert module.data_status().available
    module.setup("fit")
    assert module.module_dims()["evaluation"]["env_id"] == "Hopper-v5"
    assert module.data_info["source"] == "minari"
