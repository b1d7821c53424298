"""Mixed precision for the attention ops.

Under `torch.autocast`, an op takes its inputs in the autocast dtype, as a matmul would, and then runs its own
arithmetic with autocast off in the dtype it chooses (each op says which, and where it accumulates in fp32). Letting
autocast cast op by op inside an op breaks ops with `out=` tensors and in-place updates, which must see one dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under autocast, the floating-point tensors cast to the autocast dtype of the first one's device; otherwise
    the tensors unchanged."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
