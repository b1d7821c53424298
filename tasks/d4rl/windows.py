"""The Decision Transformer's training windows (results/paper/official_code.md §4.1).

Every timestep of every episode starts a window of K steps; a window that runs past its episode's end is padded.
Padding follows the official code: states are padded with 0 before normalisation (so a padded state is −μ/σ),
actions with −10, returns-to-go and timesteps with 0, and `padding_mask` marks the padded steps (True = padding).
`padding="right"` (official) puts the pads after the real steps; `padding="left"` (the original Decision Transformer
of kzl) puts them before. CORL pads on the right too, but with other values (zeros after normalisation, timesteps that
run on past the episode's end), which no switch here reproduces. States are normalised with the mean and the std
(+1e-6) of every step of the dataset; returns-to-go are undiscounted and divided by `return_scale`; timesteps (the
step's index in its episode) are clipped to `max_timestep − 1`. `Conditioning` holds these choices, so that the
rollouts (tasks/d4rl/rollout.py) build the model's input the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from tasks.d4rl.trajectories import Trajectories

PADDINGS = ("right", "left")
PAD_ACTION = -10.0
STD_EPS = 1e-6


@dataclass(frozen=True)
class StateStats:
    """Per-dimension mean and std (+1e-6) of the dataset's states, (obs_dim,) float32 each."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, observations: np.ndarray) -> StateStats:
        values = observations.astype(np.float64)
        return cls(values.mean(axis=0).astype(np.float32), (values.std(axis=0) + STD_EPS).astype(np.float32))

    def normalise(self, states: np.ndarray) -> np.ndarray:
        return ((states - self.mean) / self.std).astype(np.float32)

    @property
    def pad_state(self) -> np.ndarray:
        """A padded state: 0 before normalisation (the official code pads before it normalises), so −μ/σ."""
        return self.normalise(np.zeros_like(self.mean))


@dataclass(frozen=True)
class Conditioning:
    """What turns steps into the model's input, in training and in rollouts alike: the dataset's state statistics,
    the return scale, the window length K, the timestep embedding's size and the side the padding goes."""

    state_mean: np.ndarray
    state_std: np.ndarray
    return_scale: float
    context_length: int
    max_timestep: int
    padding: str = "right"

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"data.padding={self.padding!r}; expected one of {', '.join(PADDINGS)}")
        if self.context_length < 1:
            raise ValueError(f"data.context_length must be >= 1, got {self.context_length}")

    @property
    def stats(self) -> StateStats:
        return StateStats(np.asarray(self.state_mean, np.float32), np.asarray(self.state_std, np.float32))

    @classmethod
    def identity(cls, state_dim: int) -> Conditioning:
        """States as they are, returns unscaled, one-step windows: for policies that read no history (random)."""
        return cls(np.zeros(state_dim, np.float32), np.ones(state_dim, np.float32), 1.0, 1, 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what the datamodule hands the module through Hydra, and checkpoints keep)."""
        as_lists = {"state_mean": [float(x) for x in self.state_mean], "state_std": [float(x) for x in self.state_std]}
        return {**asdict(self), **as_lists}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Conditioning:
        values = dict(values)
        return cls(
            **{
                **values,
                "state_mean": np.asarray(values["state_mean"], np.float32),
                "state_std": np.asarray(values["state_std"], np.float32),
            }
        )


def returns_to_go(rewards: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """(N,) undiscounted return from each step to the end of its episode."""
    totals = np.cumsum(rewards[::-1].astype(np.float64))[::-1]  # return from step i to the end of the data
    ends = np.repeat(boundaries[1:], np.diff(boundaries))  # each step's episode end
    after_episode = np.append(totals, 0.0)[ends]  # return of everything after that episode
    return totals - after_episode


def episode_timesteps(boundaries: np.ndarray) -> np.ndarray:
    """(N,) each step's index within its episode."""
    starts = np.repeat(boundaries[:-1], np.diff(boundaries))
    return np.arange(boundaries[-1]) - starts


def window_positions(
    starts: np.ndarray, ends: np.ndarray, context_length: int, padding: str
) -> tuple[np.ndarray, np.ndarray]:
    """Steps read by windows that start at `starts` (B,) in episodes ending at `ends` (B,), with `context_length` K.

    Returns (positions (B, K) int64, padded (B, K) bool): position of each window slot in the data (clamped to
    a valid row where padded) and whether the slot is padding.
    """
    offsets = np.arange(context_length)
    real = np.minimum(ends - starts, context_length)  # real steps per window
    if padding == "right":
        padded = offsets[None, :] >= real[:, None]
        positions = starts[:, None] + offsets[None, :]
    else:
        pads = context_length - real
        padded = offsets[None, :] < pads[:, None]
        positions = starts[:, None] + offsets[None, :] - pads[:, None]
    return np.where(padded, starts[:, None], positions), padded


def padded_inputs(
    states: np.ndarray,
    actions: np.ndarray,
    returns_to_go: np.ndarray,
    timesteps: np.ndarray,
    padded: np.ndarray,
    pad_state: np.ndarray,
) -> dict[str, Tensor]:
    """The model's input from gathered windows (B, K, ·), with the official pad values where `padded` (B, K)."""
    inputs = {
        "states": np.where(padded[..., None], pad_state, states).astype(np.float32),
        "actions": np.where(padded[..., None], np.float32(PAD_ACTION), actions).astype(np.float32),
        "returns_to_go": np.where(padded, np.float32(0.0), returns_to_go).astype(np.float32),
        "timesteps": np.where(padded, 0, timesteps).astype(np.int64),
        "padding_mask": padded,
    }
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in inputs.items()}


class WindowDataset(Dataset):
    """Windows of K steps, one starting at every timestep; items and batches are dicts of tensors.

    A batch (`__getitems__`, which the loader calls with a list of indices) holds states (B, K, obs_dim) float32,
    actions (B, K, act_dim) float32, returns_to_go (B, K) float32, timesteps (B, K) int64 and padding_mask (B, K)
    bool (True = padding); `__getitem__` returns one window without the batch dimension.
    """

    def __init__(self, trajectories: Trajectories, conditioning: Conditioning) -> None:
        self.context_length, self.padding = conditioning.context_length, conditioning.padding
        stats = conditioning.stats
        self.states = stats.normalise(trajectories.observations)
        self.pad_state = stats.pad_state
        self.actions = trajectories.actions
        rtg = returns_to_go(trajectories.rewards, trajectories.boundaries) / conditioning.return_scale
        self.returns_to_go = rtg.astype(np.float32)
        self.timesteps = np.minimum(episode_timesteps(trajectories.boundaries), conditioning.max_timestep - 1)
        self.episode_ends = np.repeat(trajectories.boundaries[1:], trajectories.lengths)

    def __len__(self) -> int:
        return len(self.states)

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        starts = np.asarray(indices, dtype=np.int64)
        positions, padded = window_positions(starts, self.episode_ends[starts], self.context_length, self.padding)
        return padded_inputs(
            self.states[positions],
            self.actions[positions],
            self.returns_to_go[positions],
            self.timesteps[positions],
            padded,
            self.pad_state,
        )

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}


def already_batched(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The loader's collate function: `WindowDataset.__getitems__` returns whole batches."""
    return batch
