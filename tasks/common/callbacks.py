"""Callbacks every run uses on top of Lightning's own."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


class RngStateCheckpoint(L.Callback):
    """Saves the Python, NumPy and torch RNG states in each checkpoint and restores them on resume.

    Lightning restores weights, optimiser and loop state but not the global RNGs, so dropout after a resume would
    draw different masks than the uninterrupted run. Checkpoints are written at the end of an epoch, after which
    nothing draws from the global RNGs before the next training batch (data loaders carry their own generators),
    so restoring these states makes a resumed run continue exactly like an uninterrupted one on CPU.
    """

    def state_dict(self) -> dict[str, Any]:
        # numpy's state is stored as plain values so that checkpoints load with torch.load(weights_only=True)
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)]
        state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
