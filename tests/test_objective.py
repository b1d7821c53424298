"""The task-neutral selection step: best_test and holdout_val for any metric, in either direction."""
from __future__ import annotations

import types

import pytest

from experiments.train import best_checkpoint_path
from tasks.common.objective import EmptyHistoryError, Objective, select_result

ACCURACY = Objective(monitor="val/acc", mode="max", primary="acc", label="accuracy", scale=100)
PERPLEXITY = Objective(monitor="val/loss", mode="min", primary="ppl", label="perplexity", scale=1)

HISTORY = [
    {"epoch": 0, "step": 10, "val/acc": 0.50, "val/loss": 2.0, "val/ppl": 7.4},
    {"epoch": 1, "step": 20, "val/acc": 0.80, "val/loss": 1.5, "val/ppl": 4.5},
    {"epoch": 2, "step": 30, "val/acc": 0.80, "val/loss": 1.2, "val/ppl": 3.3},
    {"epoch": 3, "step": 40, "val/acc": 0.70, "val/loss": 1.4, "val/ppl": 4.1},
]


def test_best_test_takes_the_first_best_evaluation_in_the_paper_unit():
    label, value, metrics = select_result(ACCURACY, "best_test", HISTORY, {"test/acc": 0.7})
    assert (label, value) == ("accuracy", pytest.approx(80.0))
    assert metrics["best/step"] == 20  # ties keep the earlier evaluation, as the best-checkpoint callback does
    assert metrics["last/val/acc"] == 0.70 and metrics["test/acc"] == 0.7


def test_min_direction_picks_the_lowest_monitored_value():
    label, value, metrics = select_result(PERPLEXITY, "best_test", HISTORY, {})
    assert (label, value, metrics["best/step"]) == ("perplexity", pytest.approx(3.3), 30)


def test_holdout_val_reports_the_test_value_of_the_selected_checkpoint():
    _, value, metrics = select_result(PERPLEXITY, "holdout_val", HISTORY, {"test/ppl": 3.9, "test/loss": 1.36})
    assert value == pytest.approx(3.9) and metrics["best/val/loss"] == 1.2
    with pytest.raises(KeyError, match="test/ppl"):
        select_result(PERPLEXITY, "holdout_val", HISTORY, {"test/loss": 1.36})


def test_empty_history_is_an_error_that_says_why():
    with pytest.raises(EmptyHistoryError, match="without an evaluation.*val_check_interval"):
        select_result(ACCURACY, "best_test", [], {"test/acc": 0.9})


@pytest.mark.parametrize("node, message", [
    ({"monitor": "val/acc", "mode": "maximum", "primary": "acc", "label": "accuracy"}, "objective.mode"),
    ({"monitor": "test/acc", "mode": "max", "primary": "acc", "label": "accuracy"}, "validation metric"),
])
def test_bad_objective_declarations_are_named(node, message):
    with pytest.raises(ValueError, match=message):
        Objective.from_config(node)


def test_unknown_selection_is_rejected():
    with pytest.raises(ValueError, match="holdout_val"):
        select_result(ACCURACY, "best_val", HISTORY, {})


def test_the_best_checkpoint_is_the_one_monitoring_the_objective_whatever_the_order():
    last = types.SimpleNamespace(monitor=None, best_model_path="/run/checkpoints/last.ckpt")
    best = types.SimpleNamespace(monitor="val/acc", best_model_path="/run/checkpoints/best.ckpt")
    for callbacks in ([last, best], [best, last]):
        trainer = types.SimpleNamespace(checkpoint_callbacks=callbacks)
        assert best_checkpoint_path(trainer, ACCURACY) == "/run/checkpoints/best.ckpt"
    assert best_checkpoint_path(types.SimpleNamespace(checkpoint_callbacks=[last]), ACCURACY) is None
