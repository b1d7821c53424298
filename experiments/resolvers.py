"""OmegaConf resolvers the configs use; `register()` runs before any config is composed.

- `${run_subdir:<experiment>,<attention>,<selection>,<seed>}`: the run-directory layout of
  `results.run_record.run_subdir`, so Hydra places runs exactly where the planner and the aggregator look.
- `${gpu_mixed_precision:}`: "bf16-mixed" on a GPU that computes in bfloat16 (Ampere and newer), else "16-mixed".
"""
from __future__ import annotations

from omegaconf import OmegaConf

from results.run_record import run_subdir


def gpu_mixed_precision() -> str:
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"


def register() -> None:
    OmegaConf.register_new_resolver("run_subdir", run_subdir, replace=True)
    OmegaConf.register_new_resolver("gpu_mixed_precision", gpu_mixed_precision, replace=True)
