"""`WikiTextDataModule`: a corpus in the WikiText layout, tokenised as fairseq does, in fairseq's samples and windows.

- Training: blocks of `tokens_per_sample` tokens of the training stream (fairseq's `--sample-break-mode none`),
  reshuffled every epoch by the engine's seeded sampler.
- Evaluation during training (`val/*`, which picks the best checkpoint): the valid split under
  `selection=holdout_val` (fairseq's protocol: the checkpoint with the best validation loss) and `selection=final`
  (the last weights are tested), the test split under `selection=best_test`; in windows with `val_context_window` tokens of context (0: fairseq-train's validation).
- Testing the selected checkpoint: valid and test, each as `fairseq-eval-lm --tokens-per-sample T --context-window C`
  (T = `tokens_per_sample`, C = `context_window`), reported as `valid/*` and `test/*`.

Tokens per update = batch_size × tokens_per_sample × devices × trainer.accumulate_grad_batches. The paper's fairseq
command used 2,048 tokens per GPU batch (4 samples of 512) and 16 accumulation steps: 32,768 tokens per update and
GPU (results/paper/official_code.md §6; the GPU count is not stated).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from results.run_record import checked_selection, validates_on_test
from tasks.common.datamodule import DataStatus, TaskDataModule
from tasks.common.sampling import seeded_loader
from tasks.wikitext103.cache import TokenizedCorpus, cache_dir_of, load_or_build
from tasks.wikitext103.corpus import SOURCES, SPLITS, MissingSplitError, find_source
from tasks.wikitext103.dictionary import PAD, Dictionary, save_to_run
from tasks.wikitext103.windows import ContextWindows, TokenStream, collate_windows

log = logging.getLogger(__name__)

EVAL_SPLITS = ("valid", "test")


def model_dims_of(dictionary: Dictionary) -> dict[str, Any]:
    """What the language model needs from the data: the vocabulary size and the `<pad>` id."""
    return {"vocab_size": len(dictionary), "padding_idx": PAD}


class WikiTextDataModule(TaskDataModule):
    """See the module docstring.

    Args:
        dataset: folder name under `data_dir` (wikitext-103, wikitext-2, or any corpus in that layout).
        data_dir: the data root (`${paths.data_dir}`).
        source: auto | files | hf (the HF `Salesforce/wikitext` Parquet files, only from the local cache).
        tokens_per_sample: T, tokens per training sample and per evaluation window (paper: 512).
        context_window: C, context tokens of each test window (fairseq-eval-lm's --context-window; paper: 400).
        val_context_window: C of the evaluations during training (fairseq-train validates with 0).
        batch_size: samples per device and micro-batch; eval_batch_size: windows per evaluation batch (default:
            batch_size; results do not depend on it).
        selection: one of results.run_record.SELECTIONS (which split `val/*` scores).
        seed: the training order (`EpochSeededSampler`).
        run_dir: the run directory (`${paths.run_dir}`, set by the training entry point); when given, the
            dictionary is saved there (`dict.txt` and its sha256), so that generation needs the run folder alone.
    """

    def __init__(
        self,
        dataset: str = "wikitext-103",
        data_dir: str | Path = "data",
        source: str = "auto",
        tokens_per_sample: int = 512,
        context_window: int = 400,
        val_context_window: int = 0,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        selection: str = "holdout_val",
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = True,
        run_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        checked_selection(selection)
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r}; expected one of {', '.join(SOURCES)}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        for name, window in (("data.context_window", context_window), ("data.val_context_window", val_context_window)):
            if not 0 <= window < tokens_per_sample:
                raise ValueError(
                    f"{name}={window} must lie in [0, data.tokens_per_sample={tokens_per_sample}): each window scores "
                    "tokens_per_sample - context_window new tokens"
                )
        self.dataset, self.data_dir, self.source = dataset, Path(data_dir), source
        self.tokens_per_sample, self.context_window = int(tokens_per_sample), int(context_window)
        self.val_context_window = int(val_context_window)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size or batch_size)
        self.selection, self.seed = selection, int(seed)
        self.num_workers, self.pin_batches = int(num_workers), bool(pin_memory)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.corpus: TokenizedCorpus | None = None

    # --------------------------------------------------------------------------------------- the contract
    def data_status(self) -> DataStatus:
        """Available when the three split files (or the HF files in the local cache) exist; reads nothing."""
        try:
            source = find_source(self.data_dir, self.dataset, self.source)
        except MissingSplitError as error:
            return DataStatus(False, str(error))
        return DataStatus(True, f"{source.kind}: {source.describe('train')} (and valid, test)")

    def prepare_data(self) -> None:
        """Tokenise into the cache once (under a lock; later runs only check it)."""
        self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self._load()

    def _load(self) -> None:
        source = find_source(self.data_dir, self.dataset, self.source)
        corpus = load_or_build(source, cache_dir_of(self.data_dir, self.dataset))
        self.corpus = corpus
        self.data_info = {
            "dataset": self.dataset,
            "source": source.kind,
            "files": {split: source.describe(split) for split in SPLITS},
            "cache": str(corpus.cache_dir),
            "vocab_size": len(corpus.dictionary),
            "dictionary_sha256": corpus.dictionary.sha256,
            "tokens": {split: int(corpus.streams[split].size) for split in SPLITS},
            "lines": {split: corpus.meta["splits"][split]["lines"] for split in SPLITS},
            "tokens_per_sample": self.tokens_per_sample,
            "context_window": self.context_window,
            "val_context_window": self.val_context_window,
            "val_split": self.val_split,
        }
        log.info("%s: %s tokens, vocabulary %d", self.dataset, self.data_info["tokens"], len(corpus.dictionary))
        if self.run_dir is not None:
            save_to_run(corpus.dictionary, self.run_dir)

    def model_dims(self) -> dict[str, Any]:
        return model_dims_of(self._corpus().dictionary)

    def module_dims(self) -> dict[str, Any]:
        """The test loaders' names, and the tokens of a full training micro-batch (the scale of its loss)."""
        return {"eval_splits": EVAL_SPLITS, "micro_batch_tokens": self.batch_size * self.tokens_per_sample}

    # --------------------------------------------------------------------------------------------- loaders
    @property
    def val_split(self) -> str:
        return "test" if validates_on_test(self.selection) else "valid"

    def _corpus(self) -> TokenizedCorpus:
        if self.corpus is None:
            raise RuntimeError("WikiTextDataModule: call setup() before asking for dimensions or loaders")
        return self.corpus

    def windows(self, split: str, context_window: int) -> ContextWindows:
        """The split's windows of `tokens_per_sample` tokens with `context_window` tokens of context."""
        stream = TokenStream(self._corpus().cache_dir / f"{split}.bin")
        return ContextWindows(stream, self.tokens_per_sample, context_window)

    def train_dataloader(self) -> StatefulDataLoader:
        return seeded_loader(self.windows("train", 0), batch_size=self.batch_size, seed=self.seed, shuffle=True,
                             **self._loader_options())

    def val_dataloader(self) -> StatefulDataLoader:
        return self._eval_loader(self.windows(self.val_split, self.val_context_window))

    def test_dataloader(self) -> list[StatefulDataLoader]:
        return [self._eval_loader(self.windows(split, self.context_window)) for split in EVAL_SPLITS]

    def _loader_options(self) -> dict[str, Any]:
        return {"collate_fn": collate_windows, "num_workers": self.num_workers,
                "pin_memory": self.pin_memory(self.pin_batches),
                "persistent_workers": self.num_workers > 0}

    def _eval_loader(self, dataset: Dataset) -> StatefulDataLoader:
        """In order; under DDP each process takes its share of the windows and none is scored twice."""
        return self.evaluation_loader(dataset, batch_size=self.eval_batch_size, seed=self.seed,
                                      **self._loader_options())


__all__ = ["EVAL_SPLITS", "WikiTextDataModule", "model_dims_of"]
