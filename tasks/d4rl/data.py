"""`D4RLDataModule`: a D4RL or Minari dataset as Decision Transformer windows, and the evaluation it is scored by.

`data.dataset` names the dataset. With `data.source=d4rl` (default) it is the file `<data_dir>/<name>.hdf5` in
D4RL's layout (D4RL's cache names with underscores and `$D4RL_DATASET_DIR` are looked in too; see
tasks/d4rl/trajectories.py), and its environment is the name's first field (`hopper-medium-v2` -> Hopper, evaluated
on gymnasium's `eval.env_version`, v4 by default). With `data.source=minari` it is a Minari id (e.g.
`mujoco/hopper/medium-v0`) under `data.minari_root` / `$MINARI_DATASETS_PATH`, evaluated on the environment it was
collected on; Minari's MuJoCo sets were collected on v5 environments with other policies, so their runs never fill
the paper's table.

Training batches are windows (tasks/d4rl/windows.py) in an epoch-seeded order: every window start once per epoch,
the resumable equivalent of the official code's uniform sampling with replacement. Evaluation is rollouts, not
data: the val and test loaders yield one request per target return, which the module plays in MuJoCo
(tasks/d4rl/module.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from tasks.common.datamodule import DataStatus, TaskDataModule
from tasks.common.sampling import seeded_loader
from tasks.d4rl import environments
from tasks.d4rl.evaluation import EvaluationProtocol, request_targets
from tasks.d4rl.reward_check import check_rewards, mismatch_message
from tasks.d4rl.trajectories import (
    D4RLDataError,
    Trajectories,
    find_d4rl_file,
    minari_data_dir,
    missing_file_message,
    read_d4rl_file,
    read_minari,
)
from tasks.d4rl.windows import Conditioning, StateStats, WindowDataset, already_batched

log = logging.getLogger(__name__)

SOURCES = ("d4rl", "minari")


class EvaluationRequests(IterableDataset):
    """One item per target return. Iterable, so that under DDP every process evaluates every target (Lightning
    shards only map-style datasets) and logs the same values, with no collective needed."""

    def __init__(self, targets: tuple[float, ...]) -> None:
        self.requests = request_targets(targets)

    def __iter__(self) -> Iterator[dict[str, float]]:
        return iter(self.requests)


class D4RLDataModule(TaskDataModule):
    """Decision Transformer data and its evaluation protocol (see the module docstring).

    Args:
        dataset: D4RL-style name (`hopper-medium-v2`, `hopper-random-collected`) or Minari id.
        source: "d4rl" (an HDF5 file) or "minari".
        data_dir: folder of the HDF5 files (`${paths.data_dir}/d4rl`).
        minari_root: Minari's datasets root (None: $MINARI_DATASETS_PATH, else ~/.minari/datasets).
        context_length: K, steps per window. padding: "right" (official, also CORL's side) or "left" (the
            original Decision Transformer of kzl).
        return_scale: returns-to-go are divided by it. max_timestep: timesteps are clipped below it.
        batch_size: windows per training batch (per device). seed: the training order.
        evaluation: the `eval` node (conf/task/d4rl.yaml), resolved into an `EvaluationProtocol` in `setup`.
        reward_check: replay some transitions of a D4RL file in its environment and refuse the file when the
            rewards are not that environment's (tasks/d4rl/reward_check.py); False skips it (recorded).
    """

    def __init__(
        self,
        dataset: str,
        evaluation: Mapping[str, Any],
        source: str = "d4rl",
        data_dir: str | Path = "data/d4rl",
        minari_root: str | Path | None = None,
        context_length: int = 20,
        padding: str = "right",
        return_scale: float = 1000.0,
        max_timestep: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = True,
        seed: int = 0,
        reward_check: bool = True,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r}; expected one of {', '.join(SOURCES)}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.dataset, self.source, self.data_dir = dataset, source, Path(data_dir)
        self.minari_root = minari_root
        self.context_length, self.padding = int(context_length), padding
        self.return_scale, self.max_timestep = float(return_scale), int(max_timestep)
        self.batch_size, self.num_workers, self.pin_batches = int(batch_size), int(num_workers), bool(pin_memory)
        self.seed, self.reward_check = int(seed), bool(reward_check)
        self.evaluation_config = dict(evaluation)
        self.windows: WindowDataset | None = None
        self.protocol: EvaluationProtocol | None = None
        self.conditioning: Conditioning | None = None
        self.dims: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ contract
    def data_status(self) -> DataStatus:
        """On disk or not, from the file system only (no file is opened)."""
        if self.source == "minari":
            metadata = minari_data_dir(self.dataset, self.minari_root) / "metadata.json"
            if metadata.is_file():
                return DataStatus(True, f"Minari dataset at {metadata.parent}")
            return DataStatus(
                False, f"missing {metadata}; set MINARI_DATASETS_PATH or run `minari download {self.dataset}`"
            )
        path = find_d4rl_file(self.dataset, self.data_dir)
        if path is not None:
            return DataStatus(True, f"found {path}")
        return DataStatus(False, missing_file_message(self.dataset, self.data_dir))

    def prepare_data(self) -> None:
        """Nothing to download here: `make data-d4rl` fetches the paper's files, tasks.d4rl.collect writes others."""

    def setup(self, stage: str | None = None) -> None:
        if self.windows is not None:
            return
        trajectories, env_id, family, reference, location = self._read()
        self._check_environment(env_id, family, trajectories, location)
        stats = StateStats.of(trajectories.observations)
        self.conditioning = Conditioning(
            stats.mean, stats.std, self.return_scale, self.context_length, self.max_timestep, self.padding
        )
        self.windows = WindowDataset(trajectories, self.conditioning)
        self.protocol = EvaluationProtocol.from_config(self.evaluation_config, env_id, family, reference)
        returns = trajectories.episode_returns()
        self.data_info.update(
            {
                "dataset": self.dataset,
                "source": self.source,
                "path": str(location),
                "steps": trajectories.num_steps,
                "episodes": trajectories.num_episodes,
                **trajectories.info,
                "episode_return": {
                    "mean": float(returns.mean()),
                    "min": float(returns.min()),
                    "max": float(returns.max()),
                },
                "windows": len(self.windows),
                "conditioning": self.conditioning.to_dict(),
                "evaluation": self.protocol.describe(),
            }
        )
        log.info(
            "D4RL %s: %d episodes, %d steps, evaluated on %s",
            self.dataset,
            trajectories.num_episodes,
            trajectories.num_steps,
            env_id,
        )

    def _read(self) -> tuple[Trajectories, str, str, environments.ReferenceReturns, Path]:
        """(episodes, gymnasium id, environment family, reference returns, where the data came from)."""
        if self.source == "minari":
            minari = read_minari(self.dataset, self.minari_root)
            family = environments.family_of_env_id(minari.env_id)
            if minari.ref_min_score is not None and minari.ref_max_score is not None:
                reference = environments.ReferenceReturns(minari.ref_min_score, minari.ref_max_score, "minari")
            elif family is not None:
                reference = environments.d4rl_reference(family)
            else:
                raise D4RLDataError(
                    f"Minari dataset {self.dataset!r} ({minari.env_id}) has no reference scores to "
                    "normalise returns with (ref_min_score/ref_max_score in its metadata)"
                )
            return (
                minari.trajectories,
                minari.env_id,
                family or "",
                reference,
                minari_data_dir(self.dataset, self.minari_root),
            )
        family = environments.env_family(self.dataset)
        path = find_d4rl_file(self.dataset, self.data_dir)
        if path is None:
            raise FileNotFoundError(missing_file_message(self.dataset, self.data_dir))
        env_id = environments.gymnasium_id(family, str(self.evaluation_config.get("env_version", "v4")))
        return read_d4rl_file(path), env_id, family, environments.d4rl_reference(family), path

    def _check_environment(self, env_id: str, family: str, trajectories: Trajectories, location: Path) -> None:
        """The evaluation environment must take the dataset's states and actions, and a D4RL file (whose name
        decides the environment) must hold that environment's data: its recorded environment, if the collector
        wrote it, and its rewards replayed in MuJoCo (tasks/d4rl/reward_check.py). Records the versions."""
        gym = environments.require_gymnasium()
        env = environments.make_env(env_id)
        try:
            state_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
            high = np.asarray(env.action_space.high, np.float64)
            low = np.asarray(env.action_space.low, np.float64)
            found = (trajectories.observations.shape[1], trajectories.actions.shape[1])
            if found != (state_dim, act_dim):
                raise D4RLDataError(
                    f"data.dataset={self.dataset!r} has states of size {found[0]} and actions of size {found[1]}, "
                    f"but {env_id} has {state_dim} and {act_dim}: the file does not belong to this environment"
                )
            if self.source == "d4rl":
                self._check_d4rl_file_environment(env, env_id, family, trajectories, location)
        finally:
            env.close()
        if not (np.allclose(high, high[0]) and np.allclose(low, -high)):
            raise D4RLDataError(
                f"{env_id}: the action bounds [{low}, {high}] are not symmetric and equal; "
                "the tanh action head needs [-a, a] in every dimension"
            )
        self.dims = {"state_dim": state_dim, "act_dim": act_dim, "max_action": float(high[0])}
        self.data_info.setdefault("environment", {}).update(
            {"env_id": env_id, "gymnasium": gym.__version__, "mujoco": _mujoco_version()}
        )

    def _check_d4rl_file_environment(
        self, env: Any, env_id: str, family: str, trajectories: Trajectories, location: Path
    ) -> None:
        recorded = trajectories.info.get("recorded_env_id")
        if recorded is not None and environments.family_of_env_id(recorded) != family:
            raise D4RLDataError(
                f"{location}: the file was recorded on {recorded}, but data.dataset={self.dataset!r} names "
                f"{family}: rename it after its environment ({environments.family_of_env_id(recorded) or recorded}-…)"
            )
        if not self.reward_check:
            self.data_info.setdefault("environment", {})["reward_check"] = "skipped (data.reward_check=false)"
            return
        check = check_rewards(
            env, env_id, family, trajectories.observations, trajectories.actions, trajectories.rewards
        )
        if not check.passed:
            raise D4RLDataError(mismatch_message(location, self.dataset, check))
        self.data_info.setdefault("environment", {})["reward_check"] = check.to_dict()

    def model_dims(self) -> dict[str, Any]:
        """state_dim, act_dim, max_action (from the environment), context_length and max_timestep."""
        if not self.dims:
            raise RuntimeError("call setup() before model_dims()")
        return {**self.dims, "context_length": self.context_length, "max_timestep": self.max_timestep}

    def module_dims(self) -> dict[str, Any]:
        """The evaluation protocol, the conditioning (state statistics, scales) and the model's dims, as plain values
        (Hydra would turn dataclasses into configs)."""
        if self.protocol is None:
            raise RuntimeError("call setup() before module_dims()")
        return {
            "evaluation": self.protocol.to_dict(),
            "conditioning": self.conditioning.to_dict(),
            "policy_dims": self.model_dims(),
        }

    # ------------------------------------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        windows = self.windows
        return seeded_loader(
            windows,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=True,
            drop_last=len(windows) >= self.batch_size,
            collate_fn=already_batched,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory(self.pin_batches),
            persistent_workers=self.num_workers > 0,
        )

    def _requests(self) -> DataLoader:
        return seeded_loader(EvaluationRequests(self.protocol.targets), batch_size=None, seed=self.seed, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._requests()

    def test_dataloader(self) -> DataLoader:
        return self._requests()


def _mujoco_version() -> str | None:
    try:
        import mujoco
    except ImportError:
        return None
    return mujoco.__version__


__all__ = ["D4RLDataModule", "EvaluationRequests"]
