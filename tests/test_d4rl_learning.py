"""The Decision Transformer learns: on episodes of a deterministic controller collected in MuJoCo, 150 optimiser steps
bring its action error (the masked MSE it trains on) far below where it starts.

It fails when training does not learn: when no gradient reaches the weights or the optimiser does not step, when the
loss does not compare the predictions with the windows' own actions, or when the windows' actions do not belong to
their steps (actions shuffled against their states leave the error at about 60% of its start). Which token the
action is read from is held by tests/test_d4rl_model.py: on this smooth, nearly deterministic data the return token
could predict almost as well.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowformer.models import DecisionTransformer
from tasks.d4rl import collect
from tasks.d4rl.data import D4RLDataModule
from tasks.d4rl.module import MODEL_INPUTS, masked_action_error
from tasks.d4rl.rollout import EpisodeHistories, run_episodes
from tasks.d4rl.windows import Conditioning

EVAL = {
    "env_version": "v4",
    "targets": None,
    "report_target": None,
    "episodes": 1,
    "final_episodes": 1,
    "num_envs": 1,
    "max_episode_steps": 5,
    "vectorization": "sync",
    "seed": 0,
    "test_seed": 1,
    "paper_targets": {"hopper": [3600, 1800]},
}
STEPS = 150
# measured: after 150 steps the error is about 0.6% of its start (flow and softmax alike); shuffled actions: 60%
THRESHOLD = 0.1


class LinearController:
    """A fixed deterministic policy a = tanh(W s + b) of the current observation: what it does is learnable from the
    state token alone."""

    def __init__(self, state_dim: int, act_dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.weight = (rng.normal(size=(act_dim, state_dim)) * 0.7).astype(np.float32)
        self.bias = (rng.normal(size=act_dim) * 0.3).astype(np.float32)

    def act(self, histories: EpisodeHistories, slots: np.ndarray) -> np.ndarray:
        states = histories.states[slots, histories.length[slots] - 1]  # raw: identity conditioning
        return np.tanh(states @ self.weight.T + self.bias).astype(np.float32)


@pytest.fixture(scope="module")
def controller_data(tmp_path_factory) -> D4RLDataModule:
    root = tmp_path_factory.mktemp("learning")
    episodes = run_episodes(
        LinearController(11, 3),
        "Hopper-v4",
        0.0,
        list(range(30)),
        Conditioning.identity(11),
        num_envs=10,
        max_episode_steps=100,
        record=True,
    )
    collect.write_d4rl_file(root / "d4rl" / "hopper-controller.hdf5", collect.to_d4rl_arrays(episodes), {})
    datamodule = D4RLDataModule("hopper-controller", EVAL, data_dir=root / "d4rl", context_length=5, seed=0)
    datamodule.setup("fit")
    return datamodule


def action_error(model: DecisionTransformer, batch: dict[str, torch.Tensor]) -> float:
    """The masked MSE over the real steps of `batch`, in eval mode."""
    model.eval()
    with torch.no_grad():
        predicted = model(**{key: batch[key] for key in MODEL_INPUTS})
    model.train()
    return masked_action_error(predicted, batch["actions"], batch["padding_mask"]).item()


@pytest.mark.parametrize("attention", ["flow", "softmax"])
def test_the_action_error_falls_far_below_its_start(controller_data, attention):
    torch.manual_seed(0)
    node = {"name": attention, "clamp": 10.0} if attention == "flow" else {"name": attention}
    model = DecisionTransformer(
        **controller_data.model_dims(), d_model=32, n_layers=2, n_heads=2, d_ff=64, attention=node, dropout=0.0
    )
    windows = controller_data.windows
    probe = windows.__getitems__(list(range(0, len(windows), 2)))  # every other window, padded ones included
    start = action_error(model, probe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)  # the recipe's optimiser
    step = 0
    while step < STEPS:
        for batch in controller_data.train_dataloader():
            loss = masked_action_error(model(**{key: batch[key] for key in MODEL_INPUTS}), batch["actions"], batch["padding_mask"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == STEPS:
                break
    end = action_error(model, probe)
    assert start > 0.1  # the controller's actions are far from what the untrained model gives
    assert end < THRESHOLD * start, (start, end)
