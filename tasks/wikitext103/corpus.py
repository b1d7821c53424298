"""Where a corpus's three splits are, and how their lines are read.

A corpus in the WikiText layout is a folder `$DATA_DIR/<dataset>/` with `wiki.train.tokens`, `wiki.valid.tokens`
and `wiki.test.tokens` (the official zip's layout; `data.dataset=wikitext-2` reads WikiText-2 the same way). For
WikiText-103 and WikiText-2, the Hugging Face `Salesforce/wikitext` Parquet files are used instead when the folder
is absent but the files are already in the local Hugging Face cache (`make data-wikitext103` can put them there):
one row per line of the original file, blank lines as "", so the tokens are the same.

Lines are read as fairseq reads them: UTF-8 text with universal newlines (\\n, \\r\\n and \\r end a line; other
Unicode separators do not). A file that is not UTF-8 raises `CorpusEncodingError` naming the file, the line and
byte offset of the first bad byte, and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "valid", "test")
SOURCES = ("auto", "files", "hf")
FETCH_COMMAND = "make data-wikitext103"
HF_REPO = "Salesforce/wikitext"
# folder name -> Hugging Face config; the HF split names differ from fairseq's for validation
HF_CONFIGS = {"wikitext-103": "wikitext-103-v1", "wikitext-2": "wikitext-2-v1"}
HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


class MissingSplitError(FileNotFoundError):
    """A split of the corpus is on disk neither as a file nor in the Hugging Face cache."""


class CorpusEncodingError(ValueError):
    """A split file holds bytes that are not UTF-8."""


def split_file(data_dir: Path, dataset: str, split: str) -> Path:
    """`<data_dir>/<dataset>/wiki.<split>.tokens`."""
    return Path(data_dir) / dataset / f"wiki.{split}.tokens"


@dataclass(frozen=True)
class CorpusSource:
    """The files holding each split: the `.tokens` files, or the HF Parquet shards of each split."""

    dataset: str
    kind: str  # "files" | "hf"
    files: dict[str, tuple[Path, ...]]

    def lines(self, split: str) -> Iterator[str]:
        """The split's lines in order (each with or without its line break; only whitespace tokens matter)."""
        if self.kind == "files":
            path = self.files[split][0]
            try:
                with open(path, encoding="utf-8") as handle:
                    yield from handle
            except UnicodeDecodeError as error:
                raise CorpusEncodingError(_encoding_message(path, error)) from None
            return
        import pyarrow.parquet as pq  # with `datasets` (the `lm` extra)

        for path in self.files[split]:
            yield from pq.read_table(path, columns=["text"]).column("text").to_pylist()

    def fingerprint(self, split: str) -> list[list]:
        """[name, size, mtime_ns] of each file of the split: a changed source invalidates the cache."""
        return [[path.name, (stat := path.stat()).st_size, stat.st_mtime_ns] for path in self.files[split]]

    def describe(self, split: str) -> str:
        paths = self.files[split]
        return str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/{HF_SPLITS[split]}-*.parquet"


def first_invalid_utf8(path: Path) -> tuple[int, int, bytes] | None:
    """(line number from 1, byte offset in the file, the offending bytes) of the first byte sequence of `path` that is
    not UTF-8, counting lines at \\n as editors and `sed -n <line>p` do; None when the whole file decodes."""
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                # a sequence cut by the line break cannot continue past it: the error lies within the line
                return number, offset + error.start, line[error.start : error.end]
            offset += len(line)
    return None


def _encoding_message(path: Path, error: UnicodeDecodeError) -> str:
    found = first_invalid_utf8(path)
    where = (f"line {found[0]}, byte offset {found[1]:,} (bytes {found[2].hex(' ')})" if found is not None
             else f"({error.reason})")
    return (
        f"{path} is not UTF-8 text: {where}. WikiText files (and fairseq-preprocess) are UTF-8: re-fetch the corpus "
        f"with `{FETCH_COMMAND}`, or convert this file to UTF-8 from the encoding it was saved in (e.g. `iconv -f "
        f"latin1 -t utf-8 {path.name} > {path.name}.utf8`, then move it in place). Nothing was written to the token cache"
    )


def find_source(data_dir: Path, dataset: str, source: str = "auto") -> CorpusSource:
    """The corpus `dataset` under `data_dir` (files), or in the HF cache (hf); `auto` prefers the files.

    Raises `MissingSplitError` naming the first missing file and the command that fetches it.
    """
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}; expected one of {', '.join(SOURCES)}")
    paths = {split: split_file(data_dir, dataset, split) for split in SPLITS}
    missing = [path for path in paths.values() if not path.is_file()]
    if source == "files" or (source == "auto" and not missing):
        if missing:
            raise MissingSplitError(_missing_message(missing[0], dataset))
        return CorpusSource(dataset, "files", {split: (path,) for split, path in paths.items()})
    cached = hf_cached_files(dataset)
    if cached is not None:
        return CorpusSource(dataset, "hf", cached)
    if source == "hf":
        raise MissingSplitError(
            f"the Hugging Face files of {dataset!r} ({HF_REPO}, config {HF_CONFIGS.get(dataset, 'none')}) are not in "
            f"the local cache; fetch them with `{FETCH_COMMAND}`, or use the files (data.source=files)"
        )
    raise MissingSplitError(_missing_message(missing[0], dataset))


def _missing_message(path: Path, dataset: str) -> str:
    fetch = f"fetch it with `{FETCH_COMMAND}`" + ("" if dataset == "wikitext-103" else f" ARGS='--dataset {dataset}'")
    return (
        f"missing {path}: a corpus in the WikiText layout needs wiki.train.tokens, wiki.valid.tokens and "
        f"wiki.test.tokens in {path.parent}; {fetch}, or point data.dataset / DATA_DIR at the folder that holds them"
    )


def hf_cached_files(dataset: str) -> dict[str, tuple[Path, ...]] | None:
    """Each split's Parquet shards of the HF `Salesforce/wikitext` config of `dataset`, from the first snapshot in the
    local Hugging Face hub cache (where `datasets.load_dataset` and `make data-wikitext103` leave them) that holds
    all three splits; None when there is none (nothing is downloaded)."""
    config = HF_CONFIGS.get(dataset)
    if config is None:
        return None
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:  # the `lm` extra is not installed
        return None
    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=HF_REPO, repo_type="dataset") / "snapshots"
    folders = sorted(snapshots.glob(f"*/{config}"), key=lambda path: path.stat().st_mtime, reverse=True)
    for folder in folders:
        found = {split: tuple(sorted(folder.glob(f"{name}-*.parquet"))) for split, name in HF_SPLITS.items()}
        if all(found.values()):
            return found
    return None


__all__ = [
    "FETCH_COMMAND", "HF_CONFIGS", "HF_REPO", "HF_SPLITS", "SOURCES", "SPLITS", "CorpusEncodingError", "CorpusSource",
    "MissingSplitError", "find_source", "first_invalid_utf8", "hf_cached_files", "split_file",
]
