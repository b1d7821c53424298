"""The D4RL recipes as configs: the paper's (Flowformer script) and the DT authors' own as the preset dt_kzl."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from flowformer.models import DecisionTransformer
from tests.helpers import compose_config


def _flat(node, prefix=""):
    if isinstance(node, dict):
        return {key: value for name, child in node.items() for key, value in _flat(child, f"{prefix}{name}.").items()}
    return {prefix[:-1]: node}


@pytest.mark.parametrize("experiment", ["d4rl/hopper-medium", "d4rl/walker2d-medium-replay"])
def test_the_dt_kzl_preset_is_the_flowformer_recipe_with_kzls_deltas(experiment):
    """preset=d4rl/dt_kzl keeps the cell (experiment, dataset) and changes exactly the keys of kzl's recipe."""
    base = [f"experiment={experiment}", "model/attention=softmax"]
    paper = _flat(OmegaConf.to_container(compose_config(base), resolve=False))
    kzl_cfg = compose_config([*base, "preset=d4rl/dt_kzl"])
    kzl = _flat(OmegaConf.to_container(kzl_cfg, resolve=False))
    changed = {key: (paper.get(key), kzl.get(key)) for key in paper.keys() | kzl.keys() if paper.get(key) != kzl.get(key)}
    assert changed == {
        "variant": (None, "dt_kzl"),
        "model.d_model": (256, 128),
        "model.n_heads": (4, 1),
        "model.d_ff": (1024, 512),
        "module.optimizer.lr": (1e-3, 1e-4),
        "data.padding": ("right", "left"),
        "eval.episodes": (10, 100),
    }
    assert kzl_cfg.experiment_name == experiment and kzl_cfg.data.dataset == compose_config(base).data.dataset
    node = OmegaConf.to_container(kzl_cfg.model, resolve=True)
    model = DecisionTransformer(11, 3, **{key: value for key, value in node.items() if key != "_target_"})
    assert model.blocks[0].attention.n_heads == 1 and model.blocks[0].attention.op.dropout == 0.1
    assert len(model.blocks) == 3 and kzl_cfg.module.optimizer.weight_decay == 1e-4 and kzl_cfg.data.batch_size == 64
