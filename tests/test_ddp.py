"""Every domain under DDP (2 CPU processes over gloo): what several processes compute is what one computes.

Each test trains one experiment of a domain end to end on fixtures with `trainer=ddp`, on an evaluation set whose
size does not divide by 2, then scores the tested checkpoint again in one process with `experiments.evaluate`: the
test metrics the DDP run recorded must equal the single-process ones (each sample counted exactly once, the
denominator the set's size). The UEA run also checks per-rank seeding: equal initial weights, different random
streams and data shares, a new data order every epoch. These tests start real processes; they run in
`make test-distributed`, which CI runs after `make test`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.evaluate import evaluate
from tests.helpers import HARNESS, TINY_UEA

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logger=csv", "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false"]
# the recorded run used 2 processes: evaluating it again in this one
ONE_PROCESS = ["trainer.devices=1", "trainer.strategy=auto"]
# metrics that measure the machine, not the model
TIMING = ("tokens_per_s", "seconds")


def write_data(domain: str, data_dir: Path) -> list[str]:
    """Write a domain's fixture with an odd-sized evaluation set; return the overrides that train on it quickly."""
    if domain == "uea":
        from tests.fixtures.uea import write_uea_dataset

        write_uea_dataset(data_dir, "Odd", n_dims=3, n_classes=3, n_train=24, n_test=19, length=10,
                          equal_length=False, min_length=6)
        return ["experiment=uea/base", "data.dataset=Odd", *TINY_UEA, "trainer.max_epochs=2",
                "trainer.check_val_every_n_epoch=1"]
    from omegaconf import OmegaConf

    module = __import__(f"tests.fixtures.{domain}", fromlist=["write_fixture"])
    experiment = {"lra": "lra/listops", "imagenet": "imagenet/hierarchical",
                  "wikitext103": "wikitext103/transformer_lm", "d4rl": "d4rl/base"}[domain]
    probe = OmegaConf.create({"data": {"dataset": None}})
    fixture = module.write_fixture(data_dir, probe)
    extra = {
        "lra": ["model.d_model=16", "model.qkv_dim=16", "model.mlp_dim=16", "trainer.max_steps=4",
                "trainer.val_check_interval=2"],
        "imagenet": ["model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]", "model.heads=[1,1,2,4]",
                     "trainer.max_epochs=1", "module.warmup_epochs=0"],
        "wikitext103": ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32",
                        "module.warmup_updates=2", "trainer.accumulate_grad_batches=1", "trainer.max_steps=4",
                        "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0"],
        "d4rl": ["model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.n_layers=1",
                 "eval.final_episodes=3", "trainer.val_check_interval=2", "trainer.max_steps=4",
                 "callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.last_checkpoint.every_n_epochs=null"],
    }[domain]
    return [f"experiment={experiment}", *[f"{key}={value}" for key, value in fixture.items()], *extra]


def train_ddp(tmp_path: Path, overrides: list[str]) -> tuple[Path, dict]:
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "experiments.train", *overrides, "trainer=ddp", *QUIET, HARNESS,
               f"paths.data_dir={tmp_path / 'data'}", f"paths.runs_dir={tmp_path / 'runs'}", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def assert_equal_metrics(recorded: dict, evaluated: dict) -> None:
    names = [name for name in evaluated if name.startswith("test/") and not name.endswith(TIMING)]
    assert names
    for name in names:
        assert recorded[name] == pytest.approx(evaluated[name], rel=1e-5, abs=1e-7), name


@pytest.fixture(autouse=True)
def roots(tmp_path, monkeypatch):
    """The data and runs roots of this machine, which the records' portable paths ($DATA_DIR/...) refer to."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))


@pytest.mark.parametrize("domain", ["uea", "lra", "imagenet", "wikitext103", "d4rl"])
def test_ddp_metrics_equal_a_single_process_evaluation_of_the_same_checkpoint(domain, tmp_path):
    overrides = write_data(domain, tmp_path / "data")
    run_dir, written = train_ddp(tmp_path, overrides)
    assert written["world_size"] == 2 and written["status"] == "complete"
    tested = written["tested"]
    if tested["checkpoint"] == "last":  # final: the weights after the last step, which last.ckpt holds
        import torch

        assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == tested["step"]
    single = evaluate(run_dir, ckpt=tested["checkpoint"], split="test", overrides=ONE_PROCESS)
    assert_equal_metrics(written["metrics"], single)


def test_ddp_ranks_start_equal_and_draw_apart_and_evaluate_exactly_once(tmp_path):
    overrides = write_data("uea", tmp_path / "data")
    streams = tmp_path / "streams"
    run_dir, written = train_ddp(tmp_path, [*overrides, "+callbacks.streams._target_=tests.helpers.RecordRankStreams",
                                            f"+callbacks.streams.folder={streams}"])
    ranks = [json.loads((streams / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # one model: the same initial weights everywhere
    assert ranks[0]["draws"] != ranks[1]["draws"]  # but each rank its own dropout and augmentation stream
    for rank in ranks:  # a new order every epoch (Lightning hands set_epoch to the seeded sampler)
        assert rank["first_batches"]["0"] != rank["first_batches"]["1"]
    assert ranks[0]["first_batches"]["0"] != ranks[1]["first_batches"]["0"]  # each rank its own share
    # the DDP evaluation of the run directory counts each of the 19 test series once, as one process does
    two = evaluate_in_processes(run_dir, tmp_path / "evaluated.json")
    one = evaluate(run_dir, ckpt="best", split="test", overrides=ONE_PROCESS)
    assert_equal_metrics(two, one)
    assert_equal_metrics(written["metrics"], one)


def evaluate_in_processes(run_dir: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "experiments.evaluate", f"run={run_dir}", "ckpt=best", "split=test",
               f"out={out}", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "test/acc" in result.stdout
    return json.loads(out.read_text())["metrics"]
