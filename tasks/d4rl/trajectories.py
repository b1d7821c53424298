"""Offline-RL datasets as episodes: D4RL's HDF5 files (read with h5py, no `d4rl` import) and Minari datasets.

Both readers return `Trajectories`: every episode's steps concatenated, with the episode boundaries. A D4RL file
holds the arrays `observations` (N, obs_dim), `actions` (N, act_dim), `rewards` (N,), `terminals` (N,) and
`timeouts` (N,); an episode ends where `terminals` or `timeouts` is true, and steps after the last end (an episode
the file cut off) are dropped, as the official conversion does. A Minari episode stores T + 1 observations (the
last one follows the final action); the extra one is dropped so that every step is (observation, action, reward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.d4rl.environments import GYMNASIUM_NAMES, RL_EXTRA_HINT

D4RL_KEYS = {"observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1}  # key -> ndim
D4RL_CACHE_ENV = "D4RL_DATASET_DIR"
MINARI_ROOT_ENV = "MINARI_DATASETS_PATH"
MINARI_DEFAULT_ROOT = Path("~/.minari/datasets")
FETCH_HINT = (
    "Fetch D4RL's datasets with `make data-d4rl`, or collect one with `python -m tasks.d4rl.collect --env {env} "
    "--policy random --episodes 1000 --out {data_dir}/{env}-random-collected.hdf5`"
)


class D4RLDataError(ValueError):
    """A dataset file that is missing, or whose content is not what the D4RL layout promises; names file and fix."""


@dataclass(frozen=True)
class Trajectories:
    """Episodes concatenated step by step.

    observations (N, obs_dim) float32, actions (N, act_dim) float32, rewards (N,) float32; episode e spans
    steps boundaries[e]:boundaries[e + 1] (boundaries (E + 1,) int64, boundaries[0] = 0, boundaries[-1] = N).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    boundaries: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.boundaries[-1])

    @property
    def num_episodes(self) -> int:
        return len(self.boundaries) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(E,) steps per episode."""
        return np.diff(self.boundaries)

    def episode_returns(self) -> np.ndarray:
        """(E,) undiscounted return of every episode."""
        return (
            np.add.reduceat(self.rewards.astype(np.float64), self.boundaries[:-1]) if self.num_episodes else np.zeros(0)
        )


# --------------------------------------------------------------------------------------------- D4RL files


def d4rl_file_names(name: str) -> list[str]:
    """The file names a D4RL dataset may have: ours (`hopper-medium-replay-v2.hdf5`) and D4RL's cache name, with
    underscores up to the version (`hopper_medium_replay-v2.hdf5`)."""
    stem, sep, version = name.rpartition("-")
    cache_name = f"{stem.replace('-', '_')}-{version}" if sep and version[:1] == "v" and version[1:].isdigit() else name
    return list(dict.fromkeys([f"{name}.hdf5", f"{cache_name}.hdf5"]))


def d4rl_candidates(name: str, data_dir: str | Path) -> list[Path]:
    """Where dataset `name` is looked for, in order: `data_dir`, then D4RL's own cache when D4RL_DATASET_DIR is set."""
    folders = [Path(data_dir)]
    if os.environ.get(D4RL_CACHE_ENV):
        folders.append(Path(os.environ[D4RL_CACHE_ENV]).expanduser())
    return [folder / file_name for folder in folders for file_name in d4rl_file_names(name)]


def find_d4rl_file(name: str, data_dir: str | Path) -> Path | None:
    """The first existing candidate file of `name`, or None."""
    return next((path for path in d4rl_candidates(name, data_dir) if path.is_file()), None)


def missing_file_message(name: str, data_dir: str | Path) -> str:
    """What was looked for, and the two ways to get a dataset (for the environment the name starts with)."""
    looked = ", ".join(str(path) for path in d4rl_candidates(name, data_dir))
    env = name.split("-", 1)[0] if name.split("-", 1)[0] in GYMNASIUM_NAMES else "hopper"
    return f"no file for data.dataset={name!r}; looked for {looked}. " + FETCH_HINT.format(env=env, data_dir=data_dir)


def _require_h5py() -> Any:
    try:
        import h5py
    except ImportError as error:
        raise ImportError(f"reading D4RL's HDF5 files needs h5py: {RL_EXTRA_HINT}") from error
    return h5py


def read_d4rl_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The five D4RL arrays of `path`, checked for presence, rank and a common length."""
    h5py = _require_h5py()
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as handle:
            for key, ndim in D4RL_KEYS.items():
                if key not in handle or not isinstance(handle[key], h5py.Dataset):
                    raise D4RLDataError(
                        f"{path}: no array {key!r} (found {sorted(handle.keys())}); a D4RL file holds "
                        f"{', '.join(D4RL_KEYS)}. Fetch it again with `make data-d4rl`, or write it with "
                        "`python -m tasks.d4rl.collect`."
                    )
                value = np.asarray(handle[key][()])
                if key == "rewards" and value.ndim == 2 and value.shape[1] == 1:
                    value = value[:, 0]
                if value.ndim != ndim:
                    expected = "(N, dim)" if ndim == 2 else "(N,)"
                    raise D4RLDataError(f"{path}: {key!r} has shape {value.shape}, expected {expected}")
                arrays[key] = value
    except OSError as error:
        raise D4RLDataError(f"{path}: not a readable HDF5 file ({error}); delete it and fetch it again") from error
    lengths = {key: len(value) for key, value in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise D4RLDataError(f"{path}: the arrays differ in length {lengths}; every key needs one row per step")
    if not lengths["rewards"]:
        raise D4RLDataError(
            f"{path}: the arrays hold no rows, so there is no step to train on. Delete it and fetch it again with "
            "`make data-d4rl`, or write a dataset with `python -m tasks.d4rl.collect`."
        )
    return arrays


CORRUPT_HINT = "the file is corrupt: delete it and fetch it again with `make data-d4rl`"


def _check_finite(path: Path, key: str, values: np.ndarray) -> None:
    finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise D4RLDataError(f"{path}: {key!r} holds NaN or Inf (first at row {row} of {len(values)}); {CORRUPT_HINT}")


def _episode_end_flags(path: Path, key: str, values: np.ndarray) -> np.ndarray:
    """`terminals` or `timeouts` as bool (N,): a flag stored as numbers must be 0 or 1 (astype(bool) would read NaN,
    or any other value, as an episode end)."""
    if values.dtype == bool:
        return values
    bad = ~np.isin(values, (0, 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise D4RLDataError(
            f"{path}: {key!r} holds {values[row].item()!r} at row {row} of {len(values)} (first of {int(bad.sum())}); "
            f"an episode-end flag is 0 or 1, {CORRUPT_HINT}"
        )
    return values.astype(bool)


def split_episodes(ends: np.ndarray) -> np.ndarray:
    """Boundaries (E + 1,) from a per-step episode-end flag (N,) bool; steps after the last end are left out."""
    return np.concatenate([[0], np.flatnonzero(ends) + 1]).astype(np.int64)


def read_d4rl_file(path: str | Path) -> Trajectories:
    """Episodes of one D4RL HDF5 file (see the module docstring); errors name the file and the key. A file that
    `python -m tasks.d4rl.collect` wrote names the environment it was recorded on (`info["recorded_env_id"]`)."""
    path = Path(path)
    trajectories = episodes_of(path, read_d4rl_arrays(path))
    recorded = recorded_env_id(path)
    if recorded is not None:
        trajectories.info["recorded_env_id"] = recorded
    return trajectories


def recorded_env_id(path: str | Path) -> str | None:
    """The `env_id` attribute of a file written by the collector (D4RL's own files have none)."""
    h5py = _require_h5py()
    with h5py.File(path, "r") as handle:
        value = handle.attrs.get("env_id")
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def episodes_of(path: Path, arrays: dict[str, np.ndarray]) -> Trajectories:
    """Episodes of the D4RL arrays read from `path` (which the errors name)."""
    for key in ("observations", "actions", "rewards"):
        _check_finite(path, key, arrays[key])
    ends = _episode_end_flags(path, "terminals", arrays["terminals"])
    ends = ends | _episode_end_flags(path, "timeouts", arrays["timeouts"])
    boundaries = split_episodes(ends)
    if len(boundaries) < 2:
        raise D4RLDataError(f"{path}: no episode ends (terminals and timeouts are all false), so there is no episode")
    used = int(boundaries[-1])
    return Trajectories(
        observations=arrays["observations"][:used].astype(np.float32),
        actions=arrays["actions"][:used].astype(np.float32),
        rewards=arrays["rewards"][:used].astype(np.float32),
        boundaries=boundaries,
        info={"rows": len(arrays["rewards"]), "dropped_steps": len(arrays["rewards"]) - used},
    )


# --------------------------------------------------------------------------------------------- Minari


def minari_root(root: str | Path | None) -> Path:
    """The Minari datasets root: `root`, else MINARI_DATASETS_PATH, else Minari's default `~/.minari/datasets`."""
    chosen = root or os.environ.get(MINARI_ROOT_ENV) or MINARI_DEFAULT_ROOT
    return Path(chosen).expanduser()


def minari_data_dir(dataset_id: str, root: str | Path | None) -> Path:
    """`<root>/<namespace>/<name>-v<k>/data`, the folder Minari keeps a dataset's metadata and episodes in."""
    return minari_root(root) / dataset_id / "data"


@dataclass(frozen=True)
class MinariDataset:
    """A Minari dataset read into `Trajectories`, with the environment it was collected on and its references."""

    trajectories: Trajectories
    env_id: str
    ref_min_score: float | None
    ref_max_score: float | None


def read_minari(dataset_id: str, root: str | Path | None) -> MinariDataset:
    """Episodes of the Minari dataset `dataset_id` (e.g. `mujoco/hopper/medium-v0`) under the local root (no
    download)."""
    data_dir = minari_data_dir(dataset_id, root)
    if not (data_dir / "metadata.json").is_file():
        raise D4RLDataError(
            f"no Minari dataset {dataset_id!r}: {data_dir / 'metadata.json'} does not exist. Set MINARI_DATASETS_PATH "
            f"(or data.minari_root) to the folder that holds {dataset_id}/, or download it with "
            f"`minari download {dataset_id}` where the network allows."
        )
    try:
        import minari
    except ImportError as error:
        raise ImportError(f"reading Minari datasets needs minari: {RL_EXTRA_HINT}") from error
    dataset = minari.MinariDataset(data_dir)
    parts: dict[str, list[np.ndarray]] = {"observations": [], "actions": [], "rewards": []}
    for episode in dataset.iterate_episodes():
        if not isinstance(episode.observations, np.ndarray):
            raise D4RLDataError(
                f"{data_dir}: episode {episode.id} has structured observations; only flat arrays are supported"
            )
        steps = len(episode.rewards)
        parts["observations"].append(episode.observations[:steps])  # drop the observation after the last action
        parts["actions"].append(episode.actions)
        parts["rewards"].append(episode.rewards)
    if not parts["rewards"]:
        raise D4RLDataError(f"{data_dir}: the Minari dataset {dataset_id!r} holds no episode")
    lengths = [len(rewards) for rewards in parts["rewards"]]
    arrays = {key: np.concatenate(values).astype(np.float32) for key, values in parts.items()}
    for key, values in arrays.items():
        _check_finite(data_dir, key, values)
    metadata = dataset.storage.metadata
    spec = dataset.spec.env_spec
    eval_spec = metadata.get("eval_env_spec")
    env_id = _spec_id(eval_spec) or (spec.id if spec is not None else None)
    if env_id is None:
        raise D4RLDataError(f"{data_dir}: the metadata names no environment (env_spec), so it cannot be evaluated")
    trajectories = Trajectories(
        boundaries=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        info={"rows": int(sum(lengths)), "dropped_steps": 0},
        **arrays,
    )
    return MinariDataset(trajectories, env_id, metadata.get("ref_min_score"), metadata.get("ref_max_score"))


def _spec_id(spec: Any) -> str | None:
    """The id of an environment spec stored in Minari's metadata (a JSON string or an EnvSpec)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        import json

        return json.loads(spec).get("id")
    return getattr(spec, "id", None)
