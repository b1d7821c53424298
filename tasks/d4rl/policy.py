"""Policies that play episodes outside training: a seeded random policy, and a trained Decision Transformer
loaded from one of our run directories."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn

from results.run_record import CHECKPOINT_DIR, METRICS_FILE, recorded_config
from tasks.d4rl.module import POLICY_KEY
from tasks.d4rl.rollout import EpisodeHistories
from tasks.d4rl.windows import Conditioning

CHECKPOINT_ORDER = ("best.ckpt", "last.ckpt")


class RandomPolicy:
    """Uniform actions in [low, high]; episode e draws from its own generator seeded with (seed, e), so an
    episode's actions do not depend on which episodes step beside it."""

    def __init__(self, low: np.ndarray, high: np.ndarray, seed: int) -> None:
        self.low, self.high, self.seed = np.asarray(low, np.float32), np.asarray(high, np.float32), int(seed)
        self.generators: dict[int, np.random.Generator] = {}

    def act(self, histories: EpisodeHistories, slots: np.ndarray) -> np.ndarray:
        actions = []
        for episode in histories.episode[slots]:
            generator = self.generators.setdefault(int(episode), np.random.default_rng([self.seed, int(episode)]))
            actions.append(generator.uniform(self.low, self.high))
        return np.asarray(actions, np.float32)


@dataclass(frozen=True)
class TrainedPolicy:
    """A Decision Transformer from a run directory, with what it needs to act and where it came from."""

    model: nn.Module
    conditioning: Conditioning
    env_id: str
    report_target: float
    checkpoint: Path


def load_trained_policy(run_dir: str | Path, device: str = "cpu") -> TrainedPolicy:
    """The model of `<run_dir>/checkpoints/best.ckpt` (else last.ckpt), rebuilt from the run's config."""
    run_dir = Path(run_dir)
    checkpoint_path = next(
        (run_dir / CHECKPOINT_DIR / name for name in CHECKPOINT_ORDER if (run_dir / CHECKPOINT_DIR / name).is_file()),
        None,
    )
    recorded = recorded_config(run_dir)
    if checkpoint_path is None or recorded is None:
        raise FileNotFoundError(
            f"{run_dir} is not a Decision Transformer run directory: it needs {CHECKPOINT_DIR}/best.ckpt or "
            f"last.ckpt, and .hydra/config.yaml or {METRICS_FILE} (train one with `python -m experiments.train "
            "experiment=d4rl/base data.dataset=<name>`)"
        )
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
    if POLICY_KEY not in checkpoint:
        raise ValueError(f"{checkpoint_path} holds no {POLICY_KEY!r} entry: it was not written by a D4RL run")
    policy = checkpoint[POLICY_KEY]
    model = instantiate(recorded[0].model, **policy["model_dims"], _convert_="all")
    weights = {
        key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items() if key.startswith("model.")
    }
    model.load_state_dict(weights)
    return TrainedPolicy(
        model=model.to(device).eval(),
        conditioning=Conditioning.from_dict(policy["conditioning"]),
        env_id=policy["env_id"],
        report_target=float(policy["report_target"]),
        checkpoint=checkpoint_path,
    )
