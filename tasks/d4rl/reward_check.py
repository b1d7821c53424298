"""Whether a dataset's transitions come from an environment: replay a few of them in MuJoCo and compare the rewards.

A D4RL file's environment is read from its name, and HalfCheetah and Walker2d both have 17-dimensional states and
6-dimensional actions, so sizes cannot tell a walker2d file named `halfcheetah-*` from a real one. The dynamics can.
The observation of these environments is the simulator state without the x position (`qpos[1:]`, then `qvel`), and
the reward of a step depends only on that state and the action (forward speed from the x displacement, which does
not depend on x, plus a healthy bonus, minus a control cost). So a stored transition (s_t, a_t, r_t) is replayed by
setting the state from s_t with x = 0, stepping a_t once and comparing the reward with r_t: on data of the
environment it agrees to float precision, on data of another one it is off by about one per step (the healthy
bonus alone) in almost every transition.

Sampling some rows spread over the file keeps it cheap (milliseconds). Rows whose velocities reach the clip of the
observation (Hopper and Walker2d clip it at ±10) are skipped: the true state is not known there. The check passes
when at least half of the replayed rewards agree within 5% of 1 + |r|, so that a few contact-rich steps simulated
by another MuJoCo version than the one that recorded the data (D4RL's files come from MuJoCo 2.0) cannot refuse a
genuine file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SAMPLED_ROWS = 64
REWARD_TOLERANCE = 0.05  # of 1 + |r|
MIN_AGREEING = 0.5  # the share of replayed rewards that must agree
VELOCITY_CLIP = {"hopper": 10.0, "walker2d": 10.0}  # the bound on qvel in the observation, by family


@dataclass(frozen=True)
class RewardCheck:
    """The outcome: `rows` transitions replayed in `env_id`, `agreeing` of them gave the stored reward."""

    env_id: str
    rows: int
    agreeing: int

    @property
    def passed(self) -> bool:
        return self.rows == 0 or self.agreeing >= MIN_AGREEING * self.rows

    def to_dict(self) -> dict[str, Any]:
        return {"env_id": self.env_id, "rows": self.rows, "agreeing": self.agreeing, "passed": self.passed}


def sampled_rows(observations: np.ndarray, nq: int, velocity_clip: float | None, count: int = SAMPLED_ROWS) -> np.ndarray:
    """Up to `count` row indices spread evenly over the rows whose velocities (observations[:, nq - 1:]) are known."""
    known = np.ones(len(observations), bool)
    if velocity_clip is not None:
        known = (np.abs(observations[:, nq - 1 :]) < velocity_clip).all(axis=1)
    candidates = np.flatnonzero(known)
    if len(candidates) <= count:
        return candidates
    return candidates[np.linspace(0, len(candidates) - 1, count).round().astype(np.int64)]


def replayed_rewards(env: Any, observations: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """The reward `env` (a gymnasium MuJoCo environment) gives for each action (N, act_dim) from the state of each
    observation (N, obs_dim), with x = 0."""
    base = env.unwrapped
    base.reset(seed=0)
    nq = base.model.nq
    rewards = np.empty(len(observations))
    for i, (observation, action) in enumerate(zip(observations.astype(np.float64), actions.astype(np.float64))):
        base.set_state(np.concatenate([[0.0], observation[: nq - 1]]), observation[nq - 1 :])
        rewards[i] = base.step(action)[1]
    return rewards


def check_rewards(
    env: Any, env_id: str, family: str, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray
) -> RewardCheck:
    """Replay sampled transitions (observations (N, obs_dim), actions (N, act_dim), rewards (N,)) in `env`, an
    environment of `family` whose observation is qpos[1:] and qvel."""
    base = env.unwrapped
    nq, nv = base.model.nq, base.model.nv
    if observations.shape[1] != nq - 1 + nv:
        return RewardCheck(env_id, 0, 0)  # another observation layout: nothing to replay
    rows = sampled_rows(observations, nq, VELOCITY_CLIP.get(family))
    replayed = replayed_rewards(env, observations[rows], actions[rows])
    stored = rewards[rows].astype(np.float64)
    agreeing = int((np.abs(replayed - stored) <= REWARD_TOLERANCE * (1.0 + np.abs(stored))).sum())
    return RewardCheck(env_id, len(rows), agreeing)


def mismatch_message(path: Any, dataset: str, check: RewardCheck) -> str:
    """Why a file whose rewards are not the environment's is refused, and what to do."""
    return (
        f"{path}: the data of data.dataset={dataset!r} does not come from {check.env_id}: replayed in {check.env_id}, "
        f"only {check.agreeing} of {check.rows} sampled transitions give the reward the file stores (a file of "
        "another environment with the same state and action sizes, e.g. walker2d data named halfcheetah-*). The "
        "name's first field decides the environment: rename the file <env>-<quality>.hdf5 after the environment "
        "its data came from, or fetch the right file with `make data-d4rl`. (data.reward_check=false skips this "
        "check, for data whose dynamics differ on purpose.)"
    )
