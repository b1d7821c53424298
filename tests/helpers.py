"""Shared test helpers: composing the Hydra config and running the engine in-process on tiny data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from results import aggregate
from results.run_record import run_subdir

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# A small model and quiet trainer: the engine is under test here, not the paper recipe.
TINY_UEA = [
    "model.d_model=16",
    "model.n_heads=2",
    "model.d_ff=32",
    "model.n_layers=1",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
]


# The test harness's callbacks (a simulated kill, poisoned weights, a slow batch) are not part of the recipe that a
# resume checks against the run's recipe.json: a killed run resumes without the callback that killed it.
HARNESS = "non_science=[callbacks.kill*,callbacks.poison*,callbacks.slow*,callbacks.streams*]"


def compose_config(overrides: list[str]) -> DictConfig:
    from results.recipe import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def write_tiny_uea(data_root: Path, name: str = "Tiny") -> None:
    from tests.fixtures.uea import write_uea_dataset

    write_uea_dataset(data_root, name, n_dims=3, n_classes=3, n_train=24, n_test=18, length=10, equal_length=False, min_length=6)


class PoisonWeights(L.Callback):
    """Sets every parameter to NaN before training batch `at_step` (a stand-in for a diverging run)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.fill_(float("nan"))


class InterruptAtEpoch(L.Callback):
    """Raises KeyboardInterrupt-like failure at the start of epoch `epoch` (a killed run)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated kill at the start of epoch {self.epoch}")


class InterruptAtStep(L.Callback):
    """Fails at the start of training batch `step` (a run killed in the middle of an epoch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated kill at global step {self.step} (batch {batch_idx} of epoch {trainer.current_epoch})")


class RecordRankStreams(L.Callback):
    """Writes `<folder>/rank<r>.json` per process: a hash of the initial weights, three draws of the global torch
    generator when training starts, and a hash of the first batch of each epoch (what DDP seeding must keep apart)."""

    def __init__(self, folder: str) -> None:
        self.folder, self.seen = Path(folder), {}

    def on_train_start(self, trainer, pl_module) -> None:
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        self.seen = {"weights": float(weights.double().sum()), "draws": torch.rand(3).tolist(), "first_batches": {}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            tensors = [v for v in (batch.values() if isinstance(batch, dict) else batch) if torch.is_tensor(v)]
            self.seen["first_batches"][str(trainer.current_epoch)] = float(sum(t.double().sum() for t in tensors))

    def on_train_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


class SleepPerBatch(L.Callback):
    """Slows each training batch down so that a test can kill the process mid-epoch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)


# --- attention ops ---------------------------------------------------------------------------------------------

# Flow-Attention option sets that the fast paths are held to the dense reference with (see test_flow_fast.py).
FLOW_OPTION_SETS = [
    {},
    {"competition": False},
    {"allocation": False},
    {"competition": False, "allocation": False},
    {"clamp": None},
    {"clamp": 25.0},
    {"kernel": "relu", "clamp": None},
    {"eps": 1e-3},
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected| over the whole tensor (Frobenius norms)."""
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def random_qkv(batch, heads, length, dim, *, source_length=None, value_dim=None, dtype=torch.float64, seed=0):
    """Seeded q (B, H, L, d), k (B, H, S, d), v (B, H, S, dv) from a standard normal."""
    generator = torch.Generator().manual_seed(seed)
    source_length = source_length or length
    shapes = [(batch, heads, length, dim), (batch, heads, source_length, dim), (batch, heads, source_length, value_dim or dim)]
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]


def gradients(fn, inputs, weights):
    """fn(*inputs) and the gradients of Σ fn(*inputs) · weights with respect to each input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out * weights).sum().backward()
    return out.detach(), [t.grad for t in leaves]


# --- run records and tables -----------------------------------------------------------------------------------

REPO_MANIFESTS = Path(__file__).resolve().parents[1] / "experiments" / "manifests"


def deep_update(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, nested dicts key by key (a copy)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_config(experiment: str, attention: str, seed: int, selection: str, changes: dict | None = None, *,
                  conf_dir: Path = CONF_DIR) -> dict:
    """The resolved config a run of the cell's recipe records (composed from `conf_dir`, the repository's conf/ by
    default, as the aggregator and the planner compose it), with `changes` merged in; a minimal config for an
    experiment that has no config file."""
    from results.recipe import expected_config, recipe_overrides

    if (conf_dir / "experiment" / f"{experiment}.yaml").is_file():
        cfg = expected_config(recipe_overrides(experiment, attention, seed, selection), conf_dir=conf_dir)
    else:
        cfg = {"experiment_name": experiment, "task_name": experiment.split("/")[0], "seed": seed,
               "selection": selection, "model": {"attention": {"name": attention}}, "trainer": {"max_epochs": 100}}
    return deep_update(cfg, changes or {})


def write_run(root: Path, experiment: str, attention: str, seed: int, value: float, *, selection: str = "best_test",
              status: str = "complete", config: dict | None = None, metrics: dict | None = None,
              finished_at: str = "2025-01-01T01:00:00", run_dir: Path | None = None,
              drop: tuple[str, ...] = (), history: list[dict] | None = None, variant: str | None = None,
              conf_dir: Path = CONF_DIR) -> Path:
    """Write one metrics.json following the run contract, its config the cell's recipe (from `conf_dir`) with
    `config` merged in; return its path."""
    cfg = recipe_config(experiment, attention, seed, selection, {**(config or {}), "variant": variant},
                        conf_dir=conf_dir)
    data = {
        "experiment": experiment, "task": experiment.split("/")[0], "dataset": experiment.split("/")[-1],
        "attention": attention, "seed": seed, "selection": selection, "primary_metric": "test/acc",
        "primary_value": value, "metrics": metrics if metrics is not None else {"test/acc": value / 100},
        "git_sha": "0" * 40, "versions": {"torch": "2"}, "started_at": "2025-01-01T00:00:00",
        "finished_at": finished_at, "status": status, "config": cfg, "history": history or [], "variant": variant,
    }
    for key in drop:
        data.pop(key)
    d = run_dir or root / run_subdir(experiment, attention, selection, seed, variant)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(data))
    return d / "metrics.json"


def run_cli(tmp_path: Path, *extra: str, manifests: Path = REPO_MANIFESTS, wandb_api=None,
            figures: bool = False) -> tuple[int, Path]:
    out = tmp_path / "tables"
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--manifests", str(manifests),
            "--readme", str(tmp_path / "README.md"), "--figures", str(tmp_path / "figures"), *extra]
    if not figures:
        argv.append("--no-figures")
    return aggregate.main(argv, wandb_api=wandb_api), out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def csv_row(rows, row, model, selection="best_test", variant=""):
    hits = [r for r in rows if r["row"] == row and r["model"] == model and r["selection"] == selection
            and r["variant"] == variant]
    assert len(hits) == 1, (row, model, selection, hits)
    return hits[0]


def md_rows(md: str) -> list[list[str]]:
    """Cells of every markdown table line (header and separator lines included)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]


def md_lines(md: str, label: str) -> list[list[str]]:
    """Cells of every markdown table line whose first cell is ``label``."""
    return [cells for cells in md_rows(md) if cells[0] == label]


def md_line(md: str, label: str) -> list[str]:
    """Cells of the first markdown table line whose first cell is ``label``."""
    found = md_lines(md, label)
    if not found:
        raise AssertionError(f"no table line for {label!r} in\n{md}")
    return found[0]


# --- learning-rate schedules ----------------------------------------------------------------------------------

def lrs_used(scheduler_factory, base_lr: float, n_steps: int) -> list[float]:
    """lr of each optimiser step 0..n_steps-1 when LambdaLR is stepped once per optimiser step (Lightning)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=base_lr)
    scheduler = scheduler_factory(optimizer)
    used = []
    for _ in range(n_steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used
