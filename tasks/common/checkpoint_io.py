"""Checkpoint writing that survives a kill: a checkpoint file is either the old one or the new one, never half."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from results.atomic_io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the checkpoint folder, then renames it over the target.

    Lightning writes checkpoints in place, so a run killed while writing `last.ckpt` would leave a truncated file
    that `resume=true` cannot load.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
