"""Score a run's checkpoint on a split: `python -m experiments.evaluate run=<run dir> [ckpt=best|last|<path>]
[split=test|val] [key=value ...]`.

It rebuilds the run's datamodule, model and module from the config the run recorded (`metrics.json`, or
`.hydra/config.yaml` for a run that did not finish), loads the checkpoint and runs Lightning's test (`split=test`)
or validation (`split=val`: the run's own validation split, which under `best_test` is the test set) over it, then
prints every metric under the name the run logged it (`test/acc`, `test/ppl`, `test/score_<target>`, ...) and, with
`out=<file.json>`, writes them there. Like timm's `validate.py` or fairseq's `eval_lm`, it runs on one process or
several: `trainer.devices=2 trainer.strategy=ddp trainer.accelerator=cpu` (or GPUs); every evaluation counts each
sample exactly once, so the metrics do not depend on the number of processes. Other `key=value` arguments override
the recorded config (`data.batch_size=...`, `data.num_workers=...`, `trainer.precision=...`).

Nothing in the run directory changes: the evaluation writes only under a scratch folder (files a domain writes during
a test, such as D4RL's episode log).
"""
from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.build import build_task
from results.atomic_io import write_json_atomic
from results.recipe import register_resolvers
from results.run_record import CHECKPOINT_DIR, METRICS_FILE, recorded_config

log = logging.getLogger("flowformer.evaluate")
# Lightning warns that a checkpoint's callbacks are not there to restore: an evaluation restores weights only
warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")
register_resolvers()
USAGE = ("usage: python -m experiments.evaluate run=<run dir> [ckpt=best|last|<path>] [split=test|val] "
         "[out=<file.json>] [key=value ...]")
SPLITS = ("test", "val")


def run_config(run_dir: Path) -> DictConfig:
    """The resolved config a run recorded, its paths as this machine has them."""
    recorded = recorded_config(run_dir)
    if recorded is not None:
        return recorded[0]
    raise SystemExit(f"{run_dir} holds neither {METRICS_FILE} nor .hydra/config.yaml: pass the run directory of a "
                     f"training (experiments/runs/<experiment>/<attention>/<selection>/seed<seed>). {USAGE}")


def checkpoint_path(run_dir: Path, ckpt: str) -> Path:
    """`best` and `last` name the run's own checkpoints; anything else is a path."""
    path = run_dir / CHECKPOINT_DIR / f"{ckpt}.ckpt" if ckpt in ("best", "last") else Path(ckpt)
    if not path.is_file():
        raise SystemExit(f"no checkpoint at {path} (ckpt={ckpt}): a run keeps checkpoints/best.ckpt and "
                         f"checkpoints/last.ckpt; pass ckpt=<path> for another one")
    return path


def evaluate(run_dir: str | Path, *, ckpt: str = "best", split: str = "test", overrides: Sequence[str] = (),
             scratch: str | Path | None = None) -> dict[str, float]:
    """Score checkpoint `ckpt` of the run in `run_dir` on `split`; returns {logged name: value}.

    `overrides` are `key=value` changes to the recorded config; `scratch` is where the evaluation may write (a
    temporary folder by default)."""
    if split not in SPLITS:
        raise SystemExit(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    run_dir = Path(run_dir).resolve()
    cfg = run_config(run_dir)
    path = checkpoint_path(run_dir, ckpt)
    with tempfile.TemporaryDirectory(prefix="flowformer-evaluate-") as temporary:
        root = str(scratch or temporary)
        with open_dict(cfg):
            cfg.merge_with(OmegaConf.from_dotlist(list(overrides)))
            if "run_dir" in cfg.data:  # what a datamodule writes for its run (the LM's dictionary) goes here
                cfg.data.run_dir = root
        datamodule, module = build_task(cfg)
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[], default_root_dir=root,
                              enable_checkpointing=False)
        stage = trainer.test if split == "test" else trainer.validate
        results = stage(module, datamodule=datamodule, ckpt_path=str(path), verbose=False)
    metrics: dict[str, float] = {}
    for loader_metrics in results:  # one dict per loader (WikiText-103 tests valid and test)
        metrics.update({name.split("/dataloader_idx_")[0]: float(value) for name, value in loader_metrics.items()})
    return metrics


def parse(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The command's own arguments (run, ckpt, split, out) and the config overrides."""
    own, overrides = {}, []
    for argument in argv:
        key, sep, value = argument.partition("=")
        if not sep:
            raise SystemExit(f"{argument!r} is not key=value. {USAGE}")
        if key in ("run", "ckpt", "split", "out"):
            own[key] = value
        else:
            overrides.append(argument)
    if "run" not in own:
        raise SystemExit(USAGE)
    return own, overrides


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    own, overrides = parse(sys.argv[1:] if argv is None else argv)
    metrics = evaluate(own["run"], ckpt=own.get("ckpt", "best"), split=own.get("split", "test"), overrides=overrides)
    if rank_zero_only.rank == 0:
        for name, value in sorted(metrics.items()):
            print(f"{name} {value:.6g}")
        if "out" in own:
            write_json_atomic(Path(own["out"]), {"run": own["run"], "ckpt": own.get("ckpt", "best"),
                                                 "split": own.get("split", "test"), "metrics": metrics})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
