"""Episodes in real MuJoCo, many at once: the vectorised evaluation, and the sequential loop it replaces.

`run_episodes` steps `num_envs` environments of one gymnasium vector environment together; the policy acts for
every live episode in one batched call. Each environment slot plays episodes one after another: when an episode
ends, its slot is reset at once with the next waiting episode's seed. A finished episode is never stepped again
and never reaches the policy; once no episode is waiting, its slot idles (the vector API steps every slot, so an
idle one is reset, fed zero actions, and its outputs are discarded). An episode's course is fixed by its seed
and the (deterministic) policy, not by `num_envs` or by which episodes step beside it.

`run_episodes_sequentially` is the loop that kzl's and CORL's Decision Transformer code runs: one environment,
one episode at a time, one forward per step on the unpadded last K steps. It is the reference the vectorised
version is tested against and the baseline of its benchmark (experiments/d4rl_eval_bench.py).

"The same as sequential" means: the same episodes (seeds, order, lengths where no rounding tips a termination),
each action equal up to float rounding (a padded, masked window in a batch is not computed with the same
operations as the unpadded window alone: differences of about 1e-7), and therefore the same mean return. It does
not mean bit-identical single episodes: MuJoCo's dynamics amplify those rounding differences step by step, so over
1000-step episodes single returns can drift apart (by tens on HalfCheetah with the paper's model) while their means
agree within the noise. The tests hold single returns equal on short episodes, where the drift stays small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from tasks.d4rl.environments import make_env, make_vector_env
from tasks.d4rl.windows import Conditioning, padded_inputs, window_positions


class EpisodeHistories:
    """The steps so far of the episode in each environment slot: normalised states, actions and scaled
    returns-to-go, (slots, max_steps + 1, ·) each (a step's timestep is its index); `length[i]` states are stored
    for slot i, the last one current; `episode[i]` is the episode slot i plays (-1: idle)."""

    def __init__(self, slots: int, max_steps: int, state_dim: int, act_dim: int, conditioning: Conditioning) -> None:
        self.conditioning, self.stats = conditioning, conditioning.stats
        self.states = np.zeros((slots, max_steps + 1, state_dim), np.float32)
        self.actions = np.zeros((slots, max_steps + 1, act_dim), np.float32)
        self.returns_to_go = np.zeros((slots, max_steps + 1), np.float32)
        self.length = np.zeros(slots, np.int64)
        self.episode = np.full(slots, -1, np.int64)

    def start(self, slot: int, episode: int, observation: np.ndarray, target: float) -> None:
        self.episode[slot], self.length[slot] = episode, 1
        self.states[slot, 0] = self.stats.normalise(observation)
        self.actions[slot, 0] = 0.0
        self.returns_to_go[slot, 0] = target / self.conditioning.return_scale

    def advance(self, slots: np.ndarray, actions: np.ndarray, rewards: np.ndarray, observations: np.ndarray) -> None:
        """Record the action taken and the reward got at each slot's current step, and the next state."""
        now = self.length[slots] - 1
        self.actions[slots, now] = actions
        self.states[slots, now + 1] = self.stats.normalise(observations)
        self.actions[slots, now + 1] = 0.0  # unknown until chosen; the state token that predicts it never sees it
        self.returns_to_go[slots, now + 1] = self.returns_to_go[slots, now] - rewards / self.conditioning.return_scale
        self.length[slots] += 1

    def windows(self, slots: np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """The model's input for the last K steps of each slot's episode, padded like the training windows, and
        the window position of each slot's current step (B,)."""
        k, conditioning = self.conditioning.context_length, self.conditioning
        ends = self.length[slots]
        starts = np.maximum(ends - k, 0)
        positions, padded = window_positions(starts, ends, k, conditioning.padding)
        rows = slots[:, None]
        timesteps = np.minimum(positions, conditioning.max_timestep - 1)
        states, actions = self.states[rows, positions], self.actions[rows, positions]
        returns = self.returns_to_go[rows, positions]
        inputs = padded_inputs(states, actions, returns, timesteps, padded, self.stats.pad_state)
        current = ends - starts - 1 if conditioning.padding == "right" else np.full(len(slots), k - 1)
        return inputs, current


class Policy(Protocol):
    """Acts for a batch of live episodes: actions (len(slots), act_dim) from their histories."""

    def act(self, histories: EpisodeHistories, slots: np.ndarray) -> np.ndarray: ...


class TransformerPolicy:
    """A Decision Transformer acting for every live episode in one forward pass (in eval mode, without gradients)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def act(self, histories: EpisodeHistories, slots: np.ndarray) -> np.ndarray:
        inputs, current = histories.windows(slots)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            predicted = self.model(**{key: value.to(device) for key, value in inputs.items()})
        return predicted[torch.arange(len(slots)), torch.from_numpy(current).to(device)].float().cpu().numpy()


@dataclass
class Episode:
    """One finished episode: its seed, return and length, and with `record=True` its transitions (observations,
    actions, rewards, next_observations (T, ·) and whether it ended by termination rather than the time limit)."""

    seed: int
    episode_return: float = 0.0
    length: int = 0
    terminated: bool = False
    transitions: dict[str, list] = field(default_factory=dict)


def run_episodes(
    policy: Policy,
    env_id: str,
    target: float,
    seeds: Sequence[int],
    conditioning: Conditioning,
    *,
    num_envs: int,
    max_episode_steps: int,
    vectorization: str = "sync",
    record: bool = False,
) -> list[Episode]:
    """Play one episode per seed with `policy` conditioned on return `target`; results in the order of `seeds`."""
    slots = min(num_envs, len(seeds))
    envs = make_vector_env(env_id, slots, max_episode_steps, vectorization)
    try:
        state_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
        histories = EpisodeHistories(slots, max_episode_steps, state_dim, act_dim, conditioning)
        episodes = [Episode(int(seed)) for seed in seeds]
        observations, _ = envs.reset(seed=[int(seed) for seed in seeds[:slots]])
        for slot in range(slots):
            histories.start(slot, slot, observations[slot], target)
        waiting = slots
        while (histories.episode >= 0).any():
            live = np.flatnonzero(histories.episode >= 0)
            actions = np.zeros((slots, act_dim), np.float32)
            actions[live] = policy.act(histories, live)
            previous = observations
            observations, rewards, terminated, truncated, _ = envs.step(actions)
            for slot in live:
                episode = episodes[histories.episode[slot]]
                episode.episode_return += float(rewards[slot])
                episode.length += 1
                episode.terminated = bool(terminated[slot])
                if record:
                    _record(episode, previous[slot], actions[slot], rewards[slot], observations[slot])
            histories.advance(live, actions[live], rewards[live].astype(np.float32), observations[live])
            ended = np.asarray(terminated | truncated)
            if ended.any():
                waiting, observations = _restart(envs, histories, ended, seeds, waiting, target)
    finally:
        envs.close()
    return episodes


def _restart(
    envs, histories: EpisodeHistories, ended: np.ndarray, seeds: Sequence[int], waiting: int, target: float
) -> tuple[int, np.ndarray]:
    """Reset every slot whose episode ended: with the next waiting episode's seed, or as an idle slot. Returns the
    next waiting episode and every slot's current observation."""
    reset_seeds: list[int | None] = [None] * len(ended)
    starts = []
    for slot in np.flatnonzero(ended):
        histories.episode[slot] = -1
        if waiting < len(seeds):
            reset_seeds[slot] = int(seeds[waiting])
            starts.append((slot, waiting))
            waiting += 1
    observations, _ = envs.reset(seed=reset_seeds, options={"reset_mask": ended})
    for slot, episode in starts:
        histories.start(slot, episode, observations[slot], target)
    return waiting, observations


def _record(episode: Episode, observation, action, reward, next_observation) -> None:
    for key, value in (
        ("observations", observation),
        ("actions", action),
        ("rewards", reward),
        ("next_observations", next_observation),
    ):
        episode.transitions.setdefault(key, []).append(np.asarray(value))


def run_episodes_sequentially(
    model: nn.Module,
    env_id: str,
    target: float,
    seeds: Sequence[int],
    conditioning: Conditioning,
    *,
    max_episode_steps: int,
) -> list[Episode]:
    """The reference loop: one environment, one episode after another, one forward per step on the last K steps
    without padding (results/paper/official_code.md §4.2), the history kept as tensors."""
    env = make_env(env_id, max_episode_steps=max_episode_steps)
    device = next(model.parameters()).device
    mean = torch.as_tensor(np.asarray(conditioning.state_mean, np.float32), device=device)
    std = torch.as_tensor(np.asarray(conditioning.state_std, np.float32), device=device)
    k, scale = conditioning.context_length, conditioning.return_scale
    episodes = []
    try:
        for seed in seeds:
            observation, _ = env.reset(seed=int(seed))
            states = ((torch.as_tensor(observation, dtype=torch.float32, device=device) - mean) / std)[None]
            actions = torch.zeros(1, env.action_space.shape[0], device=device)
            returns = torch.tensor([target / scale], device=device)
            timesteps = torch.zeros(1, dtype=torch.long, device=device)
            episode = Episode(int(seed))
            while True:
                with torch.inference_mode():
                    predicted = model(states[None, -k:], actions[None, -k:], returns[None, -k:], timesteps[None, -k:])
                action = predicted[0, -1].float()
                observation, reward, terminated, truncated, _ = env.step(action.cpu().numpy())
                episode.episode_return += float(reward)
                episode.length += 1
                episode.terminated = bool(terminated)
                if terminated or truncated:
                    break
                actions[-1] = action
                state = (torch.as_tensor(observation, dtype=torch.float32, device=device) - mean) / std
                states = torch.cat([states, state[None]])
                actions = torch.cat([actions, torch.zeros_like(actions[:1])])
                returns = torch.cat([returns, returns[-1:] - float(reward) / scale])
                next_step = min(episode.length, conditioning.max_timestep - 1)
                timesteps = torch.cat([timesteps, torch.tensor([next_step], device=device)])
            episodes.append(episode)
    finally:
        env.close()
    return episodes
