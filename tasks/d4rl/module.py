"""The Decision Transformer's LightningModule: masked MSE on actions, and evaluation by MuJoCo rollouts.

Training batches are windows (tasks/d4rl/windows.py); the loss is the mean squared error of the predicted actions
over the real (unpadded) steps. Validation and test batches are requests, one per target return; each is played
as a batch of episodes (tasks/d4rl/rollout.py) and logged as `<stage>/return_<target>` (mean raw return) and
`<stage>/score_<target>` (D4RL's normalised score ×100), plus `<stage>/return` and `<stage>/score` for the reported
target (`eval.report_target`), which the objective monitors. Evaluations during training play `eval.episodes`
episodes per target, the last one (at `trainer.max_steps`) `eval.final_episodes`, as the official code does; the
test plays `eval.final_episodes` fresh episodes with the checkpoint the objective picked. Every episode's seed,
return and length, and the evaluation's wall time, go to `<run dir>/evaluations.jsonl`, which always lists the
evaluations of the run's history once (a resumed run first drops the lines its checkpoint does not hold, which it
plays again, and a test replaces the lines of an earlier test). The policy acts in fp32
as in the official evaluation, also when a mixed-precision trainer (`trainer=gpu`, bf16) trains it
(`module.fp32_eval`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from results.atomic_io import write_text_atomic
from tasks.common.full_precision import full_precision
from tasks.common.module import TaskModule
from tasks.common.objective import Objective
from tasks.d4rl.evaluation import EvaluationProtocol, target_name
from tasks.d4rl.rollout import Episode, TransformerPolicy, run_episodes
from tasks.d4rl.windows import Conditioning

EPISODES_FILE = "evaluations.jsonl"
POLICY_KEY = "d4rl_policy"
MODEL_INPUTS = ("states", "actions", "returns_to_go", "timesteps", "padding_mask")


def episode_share(seeds: Sequence[int], world_size: int, rank: int) -> list[int]:
    """The episodes (by seed) process `rank` of `world_size` plays: every world_size-th, from its rank on; the
    shares of all processes hold each seed exactly once."""
    return list(seeds)[rank::world_size]


def gather_episodes(episodes: list[Episode], seeds: list[int], world_size: int) -> list[Episode]:
    """Every process's episodes, in the order of `seeds` (this process's own when there is one process)."""
    if world_size == 1:
        return episodes
    shares: list[list[Episode]] = [[] for _ in range(world_size)]
    torch.distributed.all_gather_object(shares, episodes)
    by_seed = {episode.seed: episode for share in shares for episode in share}
    return [by_seed[seed] for seed in seeds]


def masked_action_error(predicted: Tensor, actions: Tensor, padding_mask: Tensor) -> Tensor:
    """Mean squared error of predicted (B, K, A) against actions (B, K, A) over the steps where padding_mask (B, K)
    is False."""
    real = ~padding_mask
    return (predicted[real] - actions[real]).pow(2).mean()


class DecisionTransformerModule(TaskModule):
    """Offline training and rollout evaluation of a Decision Transformer.

    Args:
        evaluation: the evaluation protocol (environment, targets, episodes, seeds), from the datamodule.
        conditioning: state statistics and scales that build the model's input from an episode, from the datamodule.
        policy_dims: the model's data dims; saved with `conditioning` in checkpoints, so that a checkpoint alone
            is a policy (`python -m tasks.d4rl.collect --policy <run dir>`).
        fp32_eval: the rollouts' forwards compute in fp32 whatever the trainer's precision (the official evaluation
            is fp32); False: in the trainer's precision (bf16 under `trainer=gpu`).
        (model, optimizer, objective, scheduler, scheduler_interval: see `TaskModule`.)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        objective: Mapping[str, Any] | Objective,
        evaluation: Mapping[str, Any] | EvaluationProtocol,
        conditioning: Mapping[str, Any] | Conditioning,
        policy_dims: Mapping[str, Any],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        fp32_eval: bool = True,
    ) -> None:
        super().__init__(model, optimizer, objective, scheduler, scheduler_interval)
        self.fp32_eval = bool(fp32_eval)
        self.evaluation = (
            evaluation if isinstance(evaluation, EvaluationProtocol) else EvaluationProtocol.from_dict(evaluation)
        )
        self.conditioning = (
            conditioning if isinstance(conditioning, Conditioning) else Conditioning.from_dict(conditioning)
        )
        self.policy_dims = dict(policy_dims)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.model(**{key: batch[key] for key in MODEL_INPUTS})

    def step(self, batch: Mapping[str, Any], stage: str) -> Tensor:
        if stage == "train":
            loss = masked_action_error(self(batch), batch["actions"], batch["padding_mask"])
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch["actions"]))
            return loss
        return self.evaluate(float(batch["target"]), stage)

    def final_evaluation(self) -> bool:
        """Whether this validation is the last of the run (it plays `eval.final_episodes` per target)."""
        return 0 < self.trainer.max_steps <= self.global_step

    def evaluate(self, target: float, stage: str) -> Tensor:
        """Play the episodes of one target and log their mean return and score; returns the score.

        Under DDP the episodes are shared out: process r plays seeds r, r + world_size, ... and every process then
        holds all of them (gathered in seed order), so the mean is over exactly the protocol's episodes and every
        process logs the same value."""
        protocol = self.evaluation
        seeds = protocol.seeds(stage, final=stage == "val" and self.final_evaluation())
        world_size, rank = self.trainer.world_size, self.trainer.global_rank
        mine = episode_share(seeds, world_size, rank)
        started = time.perf_counter()
        with full_precision(self.device, self.fp32_eval):
            episodes = run_episodes(
                TransformerPolicy(self.model),
                protocol.env_id,
                target,
                mine,
                self.conditioning,
                num_envs=protocol.num_envs,
                max_episode_steps=protocol.max_episode_steps,
                vectorization=protocol.vectorization,
            ) if mine else []
        episodes = gather_episodes(episodes, list(seeds), world_size)
        mean_return = float(np.mean([episode.episode_return for episode in episodes]))
        score = protocol.reference.score(mean_return)
        values = {f"return_{target_name(target)}": mean_return, f"score_{target_name(target)}": score}
        if target == protocol.report_target:
            values.update({"return": mean_return, "score": score})
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, batch_size=1, prog_bar=name == "score")
        self._record_episodes(stage, target, episodes, time.perf_counter() - started)
        return torch.tensor(score)

    @property
    def episodes_file(self) -> Path:
        return Path(self.trainer.default_root_dir) / EPISODES_FILE

    def on_train_start(self) -> None:
        # Runs once the checkpoint is restored: the history holds exactly the evaluations that are not replayed.
        super().on_train_start()
        kept = {entry["step"] for entry in self.history}
        self._keep_episode_lines(lambda line: line.get("stage") == "val" and line.get("step") in kept)

    def on_test_start(self) -> None:
        super().on_test_start()
        self._keep_episode_lines(lambda line: line.get("stage") != "test")

    def _keep_episode_lines(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite evaluations.jsonl with the lines `keep` accepts (a torn last line of a killed run goes too)."""
        path = self.episodes_file
        if not self.trainer.is_global_zero or not path.exists():
            return
        lines = []
        for text in path.read_text(encoding="utf-8").splitlines():
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if keep(line):
                lines.append(text + "\n")
        write_text_atomic(path, "".join(lines))

    def _record_episodes(self, stage: str, target: float, episodes: list[Episode], seconds: float) -> None:
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        line = {
            "stage": stage,
            "step": self.global_step,
            "target": target,
            "env_id": self.evaluation.env_id,
            "seeds": [episode.seed for episode in episodes],
            "returns": [episode.episode_return for episode in episodes],
            "lengths": [episode.length for episode in episodes],
            "scores": [self.evaluation.reference.score(episode.episode_return) for episode in episodes],
            "seconds": round(seconds, 3),
        }
        path = self.episodes_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[POLICY_KEY] = {
            "model_dims": self.policy_dims,
            "conditioning": self.conditioning.to_dict(),
            "env_id": self.evaluation.env_id,
            "targets": list(self.evaluation.targets),
            "report_target": self.evaluation.report_target,
        }
