"""Parameters and multiply-accumulates of an experiment's network at its recipe's input size.

    python -m experiments.profile experiment=imagenet/hierarchical
    python -m experiments.profile experiment=imagenet/hierarchical --attentions flow softmax linear performer
    python -m experiments.profile experiment=imagenet/deit_small model/attention=softmax data.image_size=384

Positional arguments are Hydra overrides, as for `experiments.train`; the network is built from the composed
config with `--num-classes` outputs (default 1000, the ImageNet-1K head the paper counts), so no data is read.
Prints params (M), GMACs of one image (the paper's "GFLOPs" are MACs; FLOPs = 2 × MACs) and the share of the MACs
inside the attention ops; see `tasks/imagenet/complexity.py` for what is counted.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tabulate import tabulate

from results.recipe import register_resolvers
from tasks.imagenet.complexity import Complexity, count_complexity

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
IMAGENET_CLASSES = 1000


def profile(overrides: Sequence[str], num_classes: int = IMAGENET_CLASSES) -> tuple[str, str, int, Complexity]:
    """(experiment, attention, image size, complexity) of the network the overrides compose."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    if "image_size" not in cfg.data:
        raise SystemExit(f"{cfg.experiment_name}: its data config has no image_size; the profile counts image models "
                         "(experiment=imagenet/hierarchical or imagenet/deit_small)")
    image_size = int(cfg.data.image_size)
    model = instantiate(cfg.model, num_classes=num_classes, image_size=image_size, _convert_="all")
    return cfg.experiment_name, cfg.model.attention.name, image_size, count_complexity(model, image_size)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=imagenet/hierarchical")
    parser.add_argument("--attentions", nargs="+", default=None, help="one row per registered attention")
    parser.add_argument("--num-classes", type=int, default=IMAGENET_CLASSES, help="classifier outputs (default 1000)")
    args = parser.parse_args(argv)
    variants = [args.overrides]
    if args.attentions:
        variants = [[*args.overrides, f"model/attention={name}"] for name in args.attentions]
    rows = []
    for overrides in variants:
        experiment, attention, image_size, size = profile(overrides, args.num_classes)
        rows.append([experiment, attention, image_size, f"{size.params_m:.2f}", f"{size.gmacs:.2f}",
                     f"{size.attention_gmacs:.3f}", f"{2 * size.gmacs:.2f}"])
    headers = ["experiment", "attention", "image", "params (M)", "GMACs", "in attention (GMACs)", "GFLOPs"]
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
