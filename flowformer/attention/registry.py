"""Config name -> attention op. Every op is an `nn.Module` with the call shape of `FlowAttention`.

`model/attention=<name>` in Hydra selects an entry; the node's other keys are passed as options. An entry's
`defaults` define its variant (`flow_no_allocation` is flow with `allocation=False`): they are fixed, and an option
that contradicts one is an error rather than a silent override (the config file of a variant restates them, since
a run records its config; a test holds each file to its entry). Entries name their class by import path so that
heavy baselines load only when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class AttentionEntry:
    """A registered attention: the class that implements it and the options that define this variant (fixed)."""

    target: str
    defaults: dict[str, Any] = field(default_factory=dict)

    def load(self) -> type[nn.Module]:
        module_name, class_name = self.target.rsplit(".", 1)
        return getattr(importlib.import_module(module_name), class_name)


_FLOW = "flowformer.attention.modules.FlowAttention"
_BASELINES = "flowformer.attention.baselines"

REGISTRY: dict[str, AttentionEntry] = {
    "flow": AttentionEntry(_FLOW, {}),
    "flow_no_competition": AttentionEntry(_FLOW, {"competition": False}),
    "flow_no_allocation": AttentionEntry(_FLOW, {"allocation": False}),
    # the official LRA (JAX) variant: ReLU kernel, no clamp, competition softmax over heads
    "flow_lra_official": AttentionEntry(_FLOW, {"kernel": "relu", "clamp": None, "competition_over": "heads"}),
    "softmax": AttentionEntry(f"{_BASELINES}.SoftmaxAttention", {}),
    "linear": AttentionEntry(f"{_BASELINES}.LinearAttention", {}),
    "performer": AttentionEntry(f"{_BASELINES}.PerformerAttention", {}),
    "cosformer": AttentionEntry(f"{_BASELINES}.CosformerAttention", {}),
    "reformer": AttentionEntry("flowformer.attention.reformer.ReformerAttention", {}),
}
REGISTERED_NAMES: tuple[str, ...] = tuple(REGISTRY)

# Keys of a `model.attention` node that configure the surrounding layer, not the op.
LAYER_KEYS = ("name", "proj_bias")


class UnknownAttentionError(KeyError):
    """Raised for an attention name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def get_entry(name: str) -> AttentionEntry:
    """The registry entry for `name`, or an error listing every registered name."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownAttentionError(
            f"unknown attention {name!r}. Registered attentions: {', '.join(REGISTERED_NAMES)}. "
            f"Select one with model/attention=<name>."
        ) from None


def build_attention(name: str, head_dim: int, n_heads: int, **options: Any) -> nn.Module:
    """Instantiate the op registered as `name` with `options`; an option that contradicts the options defining the
    variant raises ValueError."""
    entry = get_entry(name)
    conflicts = {key: value for key, value in options.items() if key in entry.defaults and entry.defaults[key] != value}
    if conflicts:
        defining = ", ".join(f"{key}={value!r}" for key, value in entry.defaults.items())
        raise ValueError(f"attention {name!r} is defined by {defining}, but its options set "
                         + ", ".join(f"{key}={value!r}" for key, value in conflicts.items())
                         + f"; drop those keys, or select the attention those options describe (registered: "
                         f"{', '.join(REGISTERED_NAMES)})")
    return entry.load()(head_dim, n_heads, **{**entry.defaults, **options})


def split_attention_config(config: dict[str, Any] | str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A `model.attention` node (or a bare name) -> (name, op options, layer options)."""
    if isinstance(config, str):
        return config, {}, {}
    config = dict(config)
    if "name" not in config:
        raise KeyError(f"the attention config needs a 'name' key (one of {', '.join(REGISTERED_NAMES)}); got {config}")
    name = config.pop("name")
    layer = {key: config.pop(key) for key in LAYER_KEYS if key in config}
    return name, config, layer
