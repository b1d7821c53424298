"""Parameters and multiply-accumulates (MACs) of a vision network, as the paper's ImageNet table counts them.

The paper's "GFLOPs" are GMACs, the unit timm's tables use (DeiT-S: 4.6). MACs are counted by PyTorch's
`FlopCounterMode`, which counts every matrix product and convolution at 2 FLOPs per MAC, including those inside
the attention ops (the flows and key-value products of Flow-Attention, SDPA's two products), and, like fvcore and
the paper's tables, no elementwise work (normalisation, activations, feature maps, softmax).

The count runs on a CPU copy in fp32, where every registered attention runs as plain PyTorch ops. An attention
whose work the counter could not see (a fused kernel it has no formula for) would count zero MACs; that is an
error here rather than a silently low number.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from flowformer.models.qkv_attention import QkvAttention


@dataclass(frozen=True)
class Complexity:
    """A network's parameter count and the MACs of one image, in total and inside its attention ops."""

    params: int
    macs: int
    attention_macs: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def attention_gmacs(self) -> float:
        return self.attention_macs / 1e9


def count_parameters(model: nn.Module) -> int:
    """Every parameter of `model`, trainable or not (the official count)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_complexity(model: nn.Module, image_size: int, in_chans: int = 3) -> Complexity:
    """Parameters and the MACs of one (in_chans, image_size, image_size) image through `model`.

    The model is copied to the CPU in fp32 and run in eval mode without gradients; `model` itself is untouched.
    """
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    root = type(probe).__name__  # the counter names modules "<root class>.<path>"
    op_names = {f"{root}.{name}.op" for name, module in probe.named_modules() if isinstance(module, QkvAttention)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(torch.zeros(1, in_chans, image_size, image_size))
    per_module = counter.get_flop_counts()
    op_flops = {name: sum(per_module.get(name, {}).values()) for name in op_names}
    blind = sorted(name for name, flops in op_flops.items() if flops == 0)
    if blind:
        raise RuntimeError(
            f"the FLOP counter saw no matrix product in {len(blind)} attention op(s), e.g. {blind[0]}: the op runs a "
            "kernel that torch.utils.flop_counter has no formula for. Register one (FlopCounterMode's "
            "custom_mapping) before reporting MACs for this attention"
        )
    return Complexity(count_parameters(probe), counter.get_total_flops() // 2, sum(op_flops.values()) // 2)
