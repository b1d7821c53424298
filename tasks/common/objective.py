"""What a task optimises and reports, and the selection step that turns a run's evaluations into its result.

Every task config (`conf/task/<domain>.yaml`) declares an `objective`:

    objective:
      monitor: val/acc   # the logged metric that picks the best evaluation (and the best checkpoint)
      mode: max          # max | min
      primary: acc       # the table's metric: `val/<primary>` in each evaluation, `test/<primary>` after testing
      label: accuracy    # its name in metrics.json (`primary_metric`)
      scale: 100         # factor to the paper's unit (accuracy in %, perplexity 1, D4RL score 100)

The best-checkpoint callback reads `monitor` and `mode` from the same node, so the two never disagree.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from results.run_record import SELECTIONS

MODES = ("max", "min")


class EmptyHistoryError(RuntimeError):
    """A run ended without a single evaluation, so there is no best checkpoint and no value to report."""


@dataclass(frozen=True)
class Objective:
    """The task's monitor (metric and direction) and its primary metric (name, label, unit)."""

    monitor: str
    mode: str
    primary: str
    label: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"objective.mode must be one of {MODES}, got {self.mode!r} (conf/task/<domain>.yaml)")
        if not self.monitor.startswith("val/"):
            raise ValueError(f"objective.monitor must name a validation metric (val/...), got {self.monitor!r}")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | Objective) -> Objective:
        return node if isinstance(node, Objective) else cls(**dict(node))

    @property
    def val_key(self) -> str:
        return f"val/{self.primary}"

    @property
    def test_key(self) -> str:
        return f"test/{self.primary}"

    def better(self, a: float, b: float) -> bool:
        """Whether monitored value `a` is strictly better than `b`."""
        return a > b if self.mode == "max" else a < b

    def best(self, history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
        """The first evaluation with the best monitored value (ties keep the earlier one, like the checkpoint)."""
        if not history:
            raise EmptyHistoryError(
                f"the run ended without an evaluation, so nothing was monitored ({self.monitor}) and no checkpoint "
                "was selected. Make sure validation runs: trainer.check_val_every_n_epoch (epoch-based) or "
                "trainer.val_check_interval (step-based) must fall within trainer.max_epochs / trainer.max_steps, "
                "and trainer.limit_val_batches must be above 0."
            )
        best = history[0]
        for entry in history[1:]:
            if self.better(_value(entry, self.monitor), _value(best, self.monitor)):
                best = entry
        return best


def _value(entry: Mapping[str, Any], key: str) -> float:
    if key not in entry:
        raise KeyError(f"the evaluation at step {entry.get('step')} logged no {key!r}; it logged {sorted(entry)}")
    return float(entry[key])


def select_result(
    objective: Objective, selection: str, history: Sequence[Mapping[str, Any]], test_metrics: Mapping[str, float]
) -> tuple[str, float, dict[str, float]]:
    """(primary_metric, primary_value in the paper's unit, every final metric) under a selection protocol.

    best_test (the paper's protocol where the evaluations ran on the test set): the primary value of the
    evaluation with the best monitored value. holdout_val: the test value of the checkpoint that a held-out
    validation split picked; final: the test value of the weights after the last step (the trainer tested those
    weights). The metrics also keep the best and the last evaluation, so both can be reported.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    best, last = objective.best(history), history[-1]
    metrics = {key: float(value) for key, value in test_metrics.items()}
    metrics.update({f"best/{key}": float(value) for key, value in best.items()})
    metrics.update({f"last/{key}": float(value) for key, value in last.items()})
    if selection == "best_test":
        value = _value(best, objective.val_key)
    elif objective.test_key in metrics:
        value = metrics[objective.test_key]
    else:
        raise KeyError(f"testing logged no {objective.test_key!r} (objective.primary); it logged {sorted(test_metrics)}")
    return objective.label, objective.scale * value, metrics
