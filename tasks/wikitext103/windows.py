"""A split's token stream cut into model inputs the way fairseq does, for training and for evaluation.

The stream x_0 .. x_{N-1} is one long sequence (fairseq's `--sample-break-mode none`). Token t is predicted from
the tokens before it: the input at position t is x_{t-1}, and `</s>` for t = 0 (fairseq shifts the targets right
and starts the stream with end-of-sentence).

`ContextWindows(stream, tokens_per_sample=T, context_window=C)` is `fairseq-eval-lm --tokens-per-sample T
--context-window C`: the stream is cut into blocks of T − C new tokens; window k scores the targets of block k,
[s, e) with s = k·(T − C), and its input also holds the up to C positions before s, [max(0, s − C), e), which are
context only. Every token of the split is scored exactly once, each with at least C tokens of context except at
the start of the stream. C = 0 gives fairseq's training samples (blocks of T tokens, the last one shorter), which
fairseq-train also validates on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tasks.wikitext103.cache import TOKEN_DTYPE
from tasks.wikitext103.dictionary import EOS, PAD

IGNORE_INDEX = -100  # targets that are not scored: context positions and padding
SCORED_TOKENS = "scored_tokens"  # the batch key of the number of scored targets (see collate_windows)


class TokenStream:
    """A split's ids, opened lazily from its uint32 file, so that a dataset pickles cheaply into worker processes."""

    def __init__(self, path: Path | None = None, array: np.ndarray | None = None) -> None:
        if (path is None) == (array is None):
            raise ValueError("TokenStream takes a path or an array")
        self.path, self._array = path, array

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.array)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_array": None if self.path is not None else self._array}

    def inputs(self, start: int, end: int) -> np.ndarray:
        """Inputs of target positions [start, end): x_{start-1} .. x_{end-2}, with `</s>` before x_0. (end-start,)"""
        if start > 0:
            return np.asarray(self.array[start - 1 : end - 1], dtype=np.int64)
        return np.concatenate([[EOS], np.asarray(self.array[: max(end - 1, 0)], dtype=np.int64)])

    def targets(self, start: int, end: int) -> np.ndarray:
        return np.asarray(self.array[start:end], dtype=np.int64)


class ContextWindows(Dataset):
    """fairseq-eval-lm's windows (see the module docstring).

    Item k: {"input": (L,) int64, "target": (L,) int64 with IGNORE_INDEX on the context positions}, L <= T.
    """

    def __init__(self, stream: TokenStream, tokens_per_sample: int, context_window: int = 0) -> None:
        if not 0 <= context_window < tokens_per_sample:
            raise ValueError(
                f"data.context_window must lie in [0, data.tokens_per_sample); got context_window={context_window}, "
                f"tokens_per_sample={tokens_per_sample} (each window scores tokens_per_sample - context_window tokens)"
            )
        self.stream, self.context_window = stream, int(context_window)
        self.new_tokens = int(tokens_per_sample) - self.context_window
        self.num_tokens = len(stream)

    def __len__(self) -> int:
        return -(-self.num_tokens // self.new_tokens)

    def bounds(self, index: int) -> tuple[int, int, int]:
        """(first input position, first scored position, end) of window `index`."""
        start = index * self.new_tokens
        return max(0, start - self.context_window), start, min(start + self.new_tokens, self.num_tokens)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        first, start, end = self.bounds(index)
        target = np.full(end - first, IGNORE_INDEX, dtype=np.int64)
        target[start - first :] = self.stream.targets(start, end)
        return {"input": self.stream.inputs(first, end), "target": target}


def collate_windows(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor | int]:
    """Right-pad a list of windows: input (B, L) int64 (`<pad>`), target (B, L) int64 (IGNORE_INDEX), and the number
    of scored targets as a Python int under `SCORED_TOKENS`.

    `padding_mask` (B, L) bool (True = padding) is added only when lengths differ (the last window of a split), so
    the common batch runs the attention without a mask. Causal attention never lets padding on the right reach a
    real position; the mask also keeps it out of the ops whose causal form is approximate (LSH buckets).
    """
    length = max(len(item["input"]) for item in items)
    inputs = torch.full((len(items), length), PAD, dtype=torch.long)
    targets = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input"])
        inputs[row, :n] = torch.from_numpy(item["input"])
        targets[row, :n] = torch.from_numpy(item["target"])
    # counted here, on the host and in the loader's workers: reading the count back from a GPU would make the host
    # wait for the GPU at every step
    scored = sum(int(np.count_nonzero(item["target"] != IGNORE_INDEX)) for item in items)
    batch = {"input": inputs, "target": targets, SCORED_TOKENS: scored}
    lengths = [len(item["input"]) for item in items]
    if min(lengths) != length:
        batch["padding_mask"] = torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]
    return batch


__all__ = ["IGNORE_INDEX", "SCORED_TOKENS", "ContextWindows", "TokenStream", "collate_windows"]
