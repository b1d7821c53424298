"""`LRADataModule`: the five Long Range Arena tasks behind one LightningDataModule (results/paper/official_code.md §2.4–2.5).

`data.dataset` picks the task: listops | text | retrieval | image | pathfinder.

Protocol (`selection`, recorded in metrics.json; each task's experiment config sets the official code's):
* ``best_test`` (ListOps, Text, Retrieval): the val loader is the test set, as the official code evaluates them.
* ``holdout_val`` and ``final`` (Image, Pathfinder): the val loader is a held-out split: ListOps `basic_val.tsv`,
  Retrieval `new_aan_pairs.eval.tsv`, Image the last 10% of the CIFAR-10 training batches (the official 90/10
  split), Pathfinder the seeded 10% val part (80/10/10, as the official code), Text a seeded `holdout_fraction` of
  the IMDB training set (IMDB has no validation split; the rest stays for training). `holdout_val` tests the
  checkpoint that split picked, `final` the weights after the last step.
The test loader is always the test set.

Batches are dicts: `tokens` (B, L) int64 with `padding_mask` (B, L) bool (True = padding) for the token tasks,
`tokens1/padding_mask1/tokens2/padding_mask2` for Retrieval, and `tokens` alone for Image and Pathfinder, whose pixel
value 0 is a real token (black), never padding. `target` holds the labels.

Batch size: `batch_size` is per device. The paper's batch sizes (results/paper/official_code.md §2.4) are global, so a run on
D devices with `trainer.accumulate_grad_batches=A` matches them when batch_size × D × A equals the paper's number.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from results.run_record import checked_selection, validates_on_test
from tasks.common.datamodule import DataStatus, TaskDataModule
from tasks.lra import datasets as lra
from tasks.lra.tokenize import BYTE_VOCAB_SIZE, PAD_ID, bytes_to_ids

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = {"listops": 2000, "text": 1000, "retrieval": 4000, "image": 1024, "pathfinder": 1024}
NUM_CLASSES = {"listops": 10, "text": 2, "retrieval": 2, "image": 10, "pathfinder": 2}
PAD_MODES = ("longest", "max")


class TokenDataset(Dataset):
    """Ragged token sequences: item -> {"tokens": (n,) int64 ids, truncated to max_len, "target": int}.

    `byte_level` sequences are stored as raw bytes and shifted to ids byte + 1 here.
    """

    def __init__(
        self, sequences: lra.Ragged, labels: np.ndarray, max_len: int, byte_level: bool, index: np.ndarray | None = None
    ):
        self.sequences, self.labels, self.max_len, self.byte_level = sequences, labels, max_len, byte_level
        self.index = np.arange(len(labels)) if index is None else np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def _ids(self, sequences: lra.Ragged, i: int) -> np.ndarray:
        raw = np.asarray(sequences[i][: self.max_len])
        return bytes_to_ids(raw) if self.byte_level else raw.astype(np.int64)

    def __getitem__(self, item: int) -> dict[str, Any]:
        i = int(self.index[item])
        return {"tokens": self._ids(self.sequences, i), "target": int(self.labels[i])}


class PairDataset(TokenDataset):
    """Two byte-level documents per example (Retrieval): {"tokens1", "tokens2", "target"}."""

    def __init__(self, first: lra.Ragged, second: lra.Ragged, labels: np.ndarray, max_len: int):
        super().__init__(first, labels, max_len, byte_level=True)
        self.second = second

    def __getitem__(self, item: int) -> dict[str, Any]:
        i = int(self.index[item])
        return {
            "tokens1": self._ids(self.sequences, i),
            "tokens2": self._ids(self.second, i),
            "target": int(self.labels[i]),
        }


class PixelDataset(Dataset):
    """Fixed-length pixel tokens (N, 1024) uint8 -> {"tokens": (1024,) int64, "target": int}."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, index: np.ndarray | None = None):
        self.tokens, self.labels = tokens, labels
        self.index = np.arange(len(labels)) if index is None else np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Any]:
        i = int(self.index[item])
        return {"tokens": np.asarray(self.tokens[i], dtype=np.int64), "target": int(self.labels[i])}


def pad_sequences(sequences: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with PAD_ID to `length`: ids (B, length) int64 and padding mask (B, length) bool (True = pad)."""
    ids = torch.full((len(sequences), length), PAD_ID, dtype=torch.long)
    mask = torch.ones((len(sequences), length), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        n = min(len(seq), length)
        ids[row, :n] = torch.from_numpy(np.asarray(seq[:n]))
        mask[row, :n] = False
    return ids, mask


class Collate:
    """Stacks a list of examples into a batch dict; pads token keys to the longest sequence or to max_len."""

    def __init__(self, keys: tuple[str, ...], max_len: int, pad_to: str, masked: bool):
        self.keys, self.max_len, self.pad_to, self.masked = keys, max_len, pad_to, masked

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"target": torch.tensor([example["target"] for example in examples], dtype=torch.long)}
        for key in self.keys:
            sequences = [example[key] for example in examples]
            if not self.masked:
                batch[key] = torch.from_numpy(np.stack(sequences))
                continue
            longest = max(1, max(len(seq) for seq in sequences))
            length = self.max_len if self.pad_to == "max" else min(longest, self.max_len)
            ids, mask = pad_sequences(sequences, length)
            batch[key] = ids
            batch[key.replace("tokens", "padding_mask")] = mask
        return batch


class LRADataModule(TaskDataModule):
    """The LRA tasks (see the module docstring).

    Args:
        dataset: listops | text | retrieval | image | pathfinder.
        data_dir: the LRA root (``${paths.data_dir}/lra``).
        batch_size: per-device training batch (global = batch_size × devices × accumulate_grad_batches).
        eval_batch_size: per-device batch for val/test (default: batch_size).
        max_len: tokens per sequence (per document for Retrieval); default the official length per task.
            Text: 1000 as in the official config; 4000 is the LRA paper's nominal length (`data.max_len=4000`).
        selection: one of results.run_record.SELECTIONS (see the module docstring).
        seed: seeds the training order (`EpochSeededSampler`).
        split_seed: seeds the Pathfinder 80/10/10 split and the Text hold-out; fixed across training seeds so every
            run is scored on the same examples.
        holdout_fraction: Text hold-out fraction of the IMDB training set under holdout_val.
        pad_to: "longest" pads each batch to its longest sequence (faster; with masked padding the result equals
            padding to max_len), "max" always pads to max_len like the official code.
        text_source: auto | aclImdb | hf (HF `imdb` from the local cache only).
        cache: write the tokenised cache under ``<data_dir>/cache``.
    """

    def __init__(
        self,
        dataset: str,
        data_dir: str | Path = "data/lra",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_len: int | None = None,
        selection: str = "best_test",
        seed: int = 0,
        split_seed: int = 0,
        holdout_fraction: float = 0.1,
        pad_to: str = "longest",
        num_workers: int = 0,
        pin_memory: bool = True,
        text_source: str = "auto",
        cache: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in lra.TASKS:
            raise ValueError(f"data.dataset={dataset!r} is not an LRA task; expected one of {', '.join(lra.TASKS)}")
        checked_selection(selection)
        if pad_to not in PAD_MODES:
            raise ValueError(f"data.pad_to={pad_to!r}; expected one of {', '.join(PAD_MODES)}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.dataset, self.data_dir = dataset, Path(data_dir)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size or batch_size)
        self.max_len = int(max_len or DEFAULT_MAX_LEN[dataset])
        if dataset in ("image", "pathfinder") and self.max_len != 1024:
            raise ValueError(f"data.max_len for {dataset} is fixed by the 32x32 images at 1024, got {self.max_len}")
        self.selection, self.seed, self.split_seed = selection, int(seed), int(split_seed)
        self.holdout_fraction, self.pad_to = float(holdout_fraction), pad_to
        self.num_workers, self.pin_batches = int(num_workers), bool(pin_memory)
        self.text_source, self.cache = text_source, bool(cache)
        self.vocab_size: int | None = None
        self.splits: dict[str, Dataset] = {}

    # ------------------------------------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path | None:
        return self.data_dir / "cache" if self.cache else None

    def data_status(self) -> DataStatus:
        """Available when the task's official layout under `data_dir` passes the download check."""
        from tasks.lra.download import validate_task

        problems = validate_task(self.data_dir, self.dataset)
        if not problems:
            return DataStatus(True, f"found under {self.data_dir}")
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        fix = "`make listops` (generate) or `make data-lra`" if self.dataset == "listops" else "`make data-lra`"
        return DataStatus(False, f"{problems[0]}{more}; fetch it with {fix}")

    def prepare_data(self) -> None:
        """Nothing to download here (`make data-lra` does that); reading in `setup` builds the cache."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        builder = getattr(self, f"_setup_{self.dataset}")
        builder()
        self.data_info.update(
            {
                "dataset": self.dataset,
                "max_len": self.max_len,
                "pad_to": self.pad_to,
                "vocab_size": self.vocab_size,
                "selection": self.selection,
                "val_loader": "test" if validates_on_test(self.selection) else "val",
                "sizes": {split: len(ds) for split, ds in self.splits.items()},
            }
        )
        log.info("LRA %s: %s", self.dataset, self.data_info["sizes"])

    def _setup_listops(self) -> None:
        splits, vocab = lra.load_listops(self.data_dir, self.cache_dir)
        self.vocab_size = len(vocab) + 2  # padding + vocabulary + OOV
        self.splits = {
            split: TokenDataset(ids, labels, self.max_len, byte_level=False) for split, (ids, labels) in splits.items()
        }
        self.data_info["vocab"] = list(vocab)

    def _setup_text(self) -> None:
        splits, source = lra.load_text(self.data_dir, self.cache_dir, self.max_len, self.text_source)
        self.vocab_size = BYTE_VOCAB_SIZE
        train_bytes, train_labels = splits["train"]
        if not validates_on_test(self.selection):
            val_index, train_index = lra.seeded_split(len(train_labels), (self.holdout_fraction, 1.0), self.split_seed)
            train = TokenDataset(train_bytes, train_labels, self.max_len, True, index=np.sort(train_index))
            val = TokenDataset(train_bytes, train_labels, self.max_len, True, index=np.sort(val_index))
            self.splits = {"train": train, "val": val}
        else:
            self.splits = {"train": TokenDataset(train_bytes, train_labels, self.max_len, True)}
        self.splits["test"] = TokenDataset(*splits["test"], self.max_len, True)
        self.data_info["text_source"] = source

    def _setup_retrieval(self) -> None:
        splits = lra.load_retrieval(self.data_dir, self.cache_dir, self.max_len)
        self.vocab_size = BYTE_VOCAB_SIZE
        self.splits = {split: PairDataset(*parts, self.max_len) for split, parts in splits.items()}

    def _setup_image(self) -> None:
        splits = lra.load_image(self.data_dir, self.cache_dir)
        self.vocab_size = 256
        self.splits = {split: PixelDataset(tokens, labels) for split, (tokens, labels) in splits.items()}

    def _setup_pathfinder(self) -> None:
        tokens, labels, skipped = lra.load_pathfinder(self.data_dir, self.cache_dir)
        self.vocab_size = 256
        parts = lra.seeded_split(len(labels), (0.8, 0.1, 0.1), self.split_seed)
        self.splits = {
            split: PixelDataset(tokens, labels, np.sort(index)) for split, index in zip(("train", "val", "test"), parts)
        }
        self.data_info["skipped_empty_images"] = list(skipped)

    # ------------------------------------------------------------------------------------------------------------
    def model_dims(self) -> dict[str, int]:
        """Sizes the model constructor needs: vocab_size, num_classes and max_len (per document for Retrieval)."""
        if self.vocab_size is None:
            raise RuntimeError("call setup() before model_dims()")
        return {"vocab_size": self.vocab_size, "num_classes": NUM_CLASSES[self.dataset], "max_len": self.max_len}

    def module_dims(self) -> dict[str, int]:
        """The number of classes, for the classification module."""
        return {"num_classes": NUM_CLASSES[self.dataset]}

    def _collate(self) -> Collate:
        if self.dataset == "retrieval":
            return Collate(("tokens1", "tokens2"), self.max_len, self.pad_to, masked=True)
        return Collate(("tokens",), self.max_len, self.pad_to, masked=self.dataset in ("listops", "text"))

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, **kwargs: Any) -> DataLoader:
        # evaluation loaders take each example once, also under DDP
        return self.loader(dataset, shuffle=shuffle, batch_size=batch_size, seed=self.seed, collate_fn=self._collate(),
                           num_workers=self.num_workers, pin_memory=self.pin_memory(self.pin_batches),
                           persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        train = self.splits["train"]
        # Full batches only, as the official input pipelines (drop_remainder); a tiny set keeps its one partial batch.
        return self._loader(train, self.batch_size, shuffle=True, drop_last=len(train) >= self.batch_size)

    def val_dataloader(self) -> DataLoader:
        split = "test" if validates_on_test(self.selection) else "val"
        return self._loader(self.splits[split], self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"], self.eval_batch_size)


__all__ = ["Collate", "LRADataModule", "PairDataset", "PixelDataset", "TokenDataset", "pad_sequences"]
