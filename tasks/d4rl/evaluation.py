"""What an evaluation of a Decision Transformer runs: environment, targets, episodes and their seeds.

The `eval` config node (conf/task/d4rl.yaml) is resolved against the dataset into one `EvaluationProtocol`, which
the datamodule records in `metrics.json` and hands to the module. Every episode has its own seed: episode j of an
evaluation during training resets its environment with `eval.seed + j`, episode j of the test with
`eval.test_seed + j`, so every checkpoint and every training seed meets the same starts, and the test's episodes
are fresh ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tasks.d4rl.environments import ReferenceReturns

VECTORIZATION_MODES = ("sync", "async")


def target_name(target: float) -> str:
    """The metric suffix of a target return: 3600.0 -> "3600" (`val/score_3600`), 0.5 -> "0.5"."""
    return str(int(target)) if float(target).is_integer() else repr(float(target))


@dataclass(frozen=True)
class EvaluationProtocol:
    """How the policy is scored (see the module docstring).

    env_id: gymnasium id evaluated (e.g. Hopper-v4). targets: returns the policy is conditioned on, one evaluation
    each. report_target: the target whose score is logged as `<stage>/score` (the monitored and the table's value).
    episodes / final_episodes: per target, at every evaluation during training / at the last one and the test.
    num_envs: episodes that step together (one batched forward). max_episode_steps: the time limit.
    vectorization: "sync" (one process) or "async" (a process per environment). reference: score 0 and 100.
    """

    env_id: str
    targets: tuple[float, ...]
    report_target: float
    episodes: int
    final_episodes: int
    seed: int
    test_seed: int
    num_envs: int
    max_episode_steps: int
    vectorization: str
    reference: ReferenceReturns

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("eval.targets is empty; give at least one target return, e.g. eval.targets=[3600]")
        if self.report_target not in self.targets:
            raise ValueError(
                f"eval.report_target={self.report_target:g} is not one of eval.targets={list(self.targets)}"
            )
        for key in ("episodes", "final_episodes", "num_envs", "max_episode_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if self.vectorization not in VECTORIZATION_MODES:
            raise ValueError(
                f"eval.vectorization={self.vectorization!r}; expected one of {', '.join(VECTORIZATION_MODES)}"
            )

    @classmethod
    def from_config(
        cls, node: Mapping[str, Any], env_id: str, family: str, reference: ReferenceReturns
    ) -> EvaluationProtocol:
        """Resolve the `eval` node for environment `family`: targets default to its `paper_targets` entry, the
        reported target to the highest one (as CORL reports)."""
        targets = node.get("targets")
        if targets is None:
            paper = node.get("paper_targets") or {}
            if family not in paper:
                raise ValueError(
                    f"eval.targets is null and eval.paper_targets has no entry for {family!r}; "
                    "set eval.targets=[<return>, ...]"
                )
            targets = paper[family]
        targets = tuple(float(t) for t in ([targets] if isinstance(targets, (int, float)) else targets))
        report = node.get("report_target")
        return cls(
            env_id=env_id,
            targets=targets,
            report_target=max(targets) if report is None else float(report),
            episodes=int(node["episodes"]),
            final_episodes=int(node["final_episodes"]),
            seed=int(node["seed"]),
            test_seed=int(node["test_seed"]),
            num_envs=int(node["num_envs"]),
            max_episode_steps=int(node["max_episode_steps"]),
            vectorization=str(node.get("vectorization", "sync")),
            reference=reference,
        )

    def seeds(self, stage: str, final: bool) -> list[int]:
        """The reset seed of each episode of one target's evaluation in `stage` ("val" or "test")."""
        count = self.final_episodes if final or stage == "test" else self.episodes
        base = self.test_seed if stage == "test" else self.seed
        return [base + episode for episode in range(count)]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what the datamodule hands the module through Hydra, and checkpoints keep)."""
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvaluationProtocol:
        values = dict(values)
        return cls(
            **{
                **values,
                "targets": tuple(float(t) for t in values["targets"]),
                "reference": ReferenceReturns(**dict(values["reference"])),
            }
        )

    def describe(self) -> dict[str, Any]:
        """The protocol for metrics.json, with the seeds of every kind of evaluation spelt out."""
        described = self.to_dict()
        described["episode_seeds"] = {
            "val": self.seeds("val", final=False),
            "val_final": self.seeds("val", final=True),
            "test": self.seeds("test", final=True),
        }
        return described


def request_targets(targets: Sequence[float]) -> list[dict[str, float]]:
    """The items of an evaluation loader: one request per target."""
    return [{"target": float(target)} for target in targets]
