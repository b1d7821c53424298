"""Tokenise a corpus once into `uint32` memory maps, cached next to the data, and check the cache on every load.

`<data_dir>/<dataset>/cache/` holds `dict.txt` (fairseq's dictionary of the training split), `<split>.bin` (the
token ids of each split, one `</s>` per line, native-endian uint32: WikiText-103's 267,744 ids do not fit uint16) and
`meta.json` (the dictionary's checksum, each split's token and line counts, and the size and mtime of the source
files). `meta.json` is written last, so a cache without it is incomplete.

On load: a missing, unreadable, truncated or out-of-range cache, or one whose source files changed, is rebuilt with a
message; a `dict.txt` that is not the dictionary the ids were made with is an error (the ids would silently mean
other words). Building takes a lock, so processes of one DDP run build it once.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from results.atomic_io import write_text_atomic
from tasks.wikitext103.corpus import FETCH_COMMAND, SPLITS, CorpusSource
from tasks.wikitext103.dictionary import EOS, Dictionary

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
TOKEN_DTYPE = np.uint32
# Token counts of WikiText-103 (one </s> per line) and the size of fairseq's dictionary built on its training split.
KNOWN_SIZES = {"wikitext-103": {"train": 103_227_021, "valid": 217_646, "test": 245_569, "vocab": 267_744}}


class EmptySplitError(ValueError):
    """A split has no lines."""


class DictionaryMismatchError(ValueError):
    """The cache's dict.txt is not the dictionary its token ids were made with."""


class KnownSizeError(ValueError):
    """A corpus named like a known one (WikiText-103) does not have its known sizes."""


class CorruptCacheError(ValueError):
    """Part of the cache is missing, truncated or inconsistent; `load_or_build` rebuilds it."""


@dataclass
class TokenizedCorpus:
    """The dictionary, each split's token ids as a read-only uint32 memmap (N,), and what `meta.json` records."""

    dictionary: Dictionary
    streams: dict[str, np.ndarray]
    meta: dict[str, Any]
    cache_dir: Path


def cache_dir_of(data_dir: Path, dataset: str) -> Path:
    return Path(data_dir) / dataset / "cache"


def load_or_build(source: CorpusSource, cache_dir: Path) -> TokenizedCorpus:
    """The tokenised corpus from `cache_dir`, (re)building the cache first when needed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / ".lock")):
        problem = _cache_problem(source, cache_dir)
        if problem is not None:
            if problem != "absent":
                log.warning("rebuilding the token cache %s: %s", cache_dir, problem)
            build(source, cache_dir)
        corpus = _open(cache_dir)
    check_known_sizes(source, corpus)
    return corpus


def _cache_problem(source: CorpusSource, cache_dir: Path) -> str | None:
    """Why the cache cannot be used as it is ("absent" when it was never built), or None when it can."""
    meta_path = cache_dir / "meta.json"
    if not meta_path.is_file():
        return "absent"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT or set(meta["splits"]) != set(SPLITS):
            return f"{meta_path} is from another cache format"
        for split in SPLITS:
            if meta["splits"][split]["source"] != source.fingerprint(split):
                return f"the source of the {split} split ({source.describe(split)}) changed since the cache was built"
        _check_streams(cache_dir, meta)
    except (ValueError, KeyError, TypeError, CorruptCacheError) as error:
        return f"the cache is corrupted ({error})"
    _check_dictionary(cache_dir, meta)
    return None


def _check_dictionary(cache_dir: Path, meta: dict[str, Any]) -> None:
    path = cache_dir / "dict.txt"
    if not path.is_file():
        raise CorruptCacheError(f"{path} is missing")
    dictionary = Dictionary.load(path)
    if dictionary.sha256 != meta["dictionary_sha256"] or len(dictionary) != meta["vocab_size"]:
        raise DictionaryMismatchError(
            f"{path} (sha256 {dictionary.sha256[:12]}..., {len(dictionary)} entries) is not the dictionary the token "
            f"ids in {cache_dir} were made with (sha256 {meta['dictionary_sha256'][:12]}..., {meta['vocab_size']} "
            f"entries); the ids would mean other words. Delete {cache_dir} to rebuild the cache from the corpus."
        )


def _check_streams(cache_dir: Path, meta: dict[str, Any]) -> None:
    """Raise CorruptCacheError unless every split's file holds its recorded tokens, ends lines with </s> as often as
    it has lines, and has no id outside the dictionary."""
    for split in SPLITS:
        path, expected = cache_dir / f"{split}.bin", meta["splits"][split]
        size = path.stat().st_size if path.is_file() else None
        if size != expected["tokens"] * np.dtype(TOKEN_DTYPE).itemsize:
            raise CorruptCacheError(f"{path} holds {size} bytes, expected {expected['tokens']} uint32 tokens")
        stream = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        if int(stream.max()) >= meta["vocab_size"] or int(np.count_nonzero(stream == EOS)) != expected["lines"]:
            raise CorruptCacheError(f"{path} has ids outside the dictionary or a wrong number of </s>")


def _open(cache_dir: Path) -> TokenizedCorpus:
    meta = json.loads((cache_dir / "meta.json").read_text())
    streams = {split: np.memmap(cache_dir / f"{split}.bin", dtype=TOKEN_DTYPE, mode="r") for split in SPLITS}
    return TokenizedCorpus(Dictionary.load(cache_dir / "dict.txt"), streams, meta, cache_dir)


def count_words(source: CorpusSource, split: str = "train") -> tuple[Counter[str], int]:
    """Word counts of a split (with one `</s>` per line) and its number of lines."""
    counts: Counter[str] = Counter()
    lines = 0
    for line in source.lines(split):
        counts.update(line.split())
        lines += 1
    if lines == 0:
        raise EmptySplitError(
            f"the {split} split ({source.describe(split)}) is empty; it needs at least one line "
            f"(re-fetch it with `{FETCH_COMMAND}`)"
        )
    counts["</s>"] += lines
    return counts, lines


def build(source: CorpusSource, cache_dir: Path) -> None:
    """Build the dictionary from the training split, write every split's ids, then `meta.json`.

    All or nothing: the files are staged under temporary names and put in place only once every split has been
    read, so a split that cannot be read (bad bytes, an empty file) leaves the cache folder as it was.
    """
    log.info("tokenising %s into %s (once)", source.dataset, cache_dir)
    counts, _ = count_words(source, "train")
    dictionary = Dictionary.from_counts(counts)
    staged: dict[str, Path] = {}
    try:
        staged["dict.txt"] = _stage(cache_dir / "dict.txt", dictionary.to_text().encode("utf-8"))
        splits = {}
        for split in SPLITS:
            ids, lines = encode_split(source, split, dictionary)
            staged[f"{split}.bin"] = _stage(cache_dir / f"{split}.bin", ids.tobytes())
            splits[split] = {"tokens": int(ids.size), "lines": lines, "source": source.fingerprint(split)}
    except BaseException:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)
        raise
    (cache_dir / "meta.json").unlink(missing_ok=True)  # the old cache stops being valid before any file changes
    for name, temporary in staged.items():
        os.replace(temporary, cache_dir / name)
    meta = {
        "format": CACHE_FORMAT,
        "dataset": source.dataset,
        "source": source.kind,
        "vocab_size": len(dictionary),
        "dictionary_sha256": dictionary.sha256,
        "splits": splits,
    }
    write_text_atomic(cache_dir / "meta.json", json.dumps(meta, indent=1))


def encode_split(source: CorpusSource, split: str, dictionary: Dictionary) -> tuple[np.ndarray, int]:
    """A split's ids (N,) uint32, `</s>` after every line, and its number of lines."""
    pieces, lines, pending = [], 0, []
    for line in source.lines(split):
        pending.extend(dictionary.encode_line(line))
        lines += 1
        if len(pending) >= 1 << 20:  # convert in pieces: a Python list of 10^8 ints would take ~4 GB
            pieces.append(np.asarray(pending, dtype=TOKEN_DTYPE))
            pending = []
    if lines == 0:
        raise EmptySplitError(
            f"the {split} split ({source.describe(split)}) is empty; it needs at least one line "
            f"(re-fetch it with `{FETCH_COMMAND}`)"
        )
    pieces.append(np.asarray(pending, dtype=TOKEN_DTYPE))
    return np.concatenate(pieces), lines


def _stage(path: Path, data: bytes) -> Path:
    """Write `data` next to `path` under a temporary name (the caller holds the cache's lock) and return that name."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    return temporary


def check_known_sizes(source: CorpusSource, corpus: TokenizedCorpus) -> None:
    """For a corpus named like a known one (WikiText-103), its token counts and dictionary size must be the known
    ones: a truncated download or an edited file would otherwise give perplexities that compare with nothing."""
    known = KNOWN_SIZES.get(source.dataset)
    if known is None:
        return
    found = {split: int(corpus.streams[split].size) for split in SPLITS} | {"vocab": len(corpus.dictionary)}
    wrong = [f"{key}: {found[key]:,} (expected {value:,})" for key, value in known.items() if found[key] != value]
    if wrong:
        raise KnownSizeError(
            f"{source.dataset} from {source.describe('train')} and its siblings does not have the known sizes: "
            f"{'; '.join(wrong)}. Re-fetch it with `{FETCH_COMMAND}` (then delete {corpus.cache_dir}); a different "
            "corpus in this layout belongs in a folder of its own name (data.dataset=<folder>)."
        )


__all__ = [
    "KNOWN_SIZES", "TOKEN_DTYPE", "CorruptCacheError", "DictionaryMismatchError", "EmptySplitError", "KnownSizeError",
    "TokenizedCorpus", "build", "cache_dir_of", "check_known_sizes", "count_words", "encode_split", "load_or_build",
]
