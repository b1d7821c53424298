"""Readers for the five LRA tasks, each in its real on-disk format, with a tokenised cache (results/paper/official_code.md §2.5).

Layout under ``DATA_DIR/lra/`` (the unpacked official ``lra_release`` plus the canonical IMDB and CIFAR-10 archives):

    listops-1000/basic_{train,val,test}.tsv                        ListOps (header ``Source<TAB>Target``)
    aclImdb/{train,test}/{pos,neg}/*.txt                           Text (IMDB tarball layout)
    tsv_data/new_aan_pairs.{train,eval,test}.tsv                   Retrieval (no header: label id1 id2 text1 text2)
    cifar-10-batches-py/{data_batch_1..5,test_batch}               Image (pickled batches)
    pathfinder32/curv_contour_length_14/{imgs/<k>/*.png,metadata/<k>.npy}   Pathfinder-32 "hard"

Tokenised arrays are cached as ``.npy`` files under ``DATA_DIR/lra/cache/<name>-<key>/``; the key hashes the source
files' paths, sizes and modification times and the tokenisation settings, so editing a file or a setting rebuilds it.
Variable-length sequences are stored ragged (flat ids + offsets) and memory-mapped on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.lra.tokenize import ListOpsEncoder, build_listops_vocab, utf8_bytes

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
CACHE_VERSION = 1
FIX_COMMAND = "make data-lra"

LISTOPS_DIR = "listops-1000"
IMDB_DIR = "aclImdb"
AAN_DIR = "tsv_data"
CIFAR_DIR = "cifar-10-batches-py"
PATHFINDER_DIR = "pathfinder32/curv_contour_length_14"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
AAN_SPLITS = {"train": "train", "val": "eval", "test": "test"}
# tf.image.rgb_to_grayscale's weights (ITU-R 601 luma, as rounded in TensorFlow)
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)


class LRADataError(FileNotFoundError):
    """A missing or malformed LRA data file. The message names the file and the command that provides it."""


def data_error(task: str, path: Path | str, problem: str, hint: str = "") -> LRADataError:
    """Build an `LRADataError` naming `path`, what is wrong, and `make data-lra` (plus a task-specific hint)."""
    message = (
        f"LRA {task}: {path}: {problem}. Run `{FIX_COMMAND}` to download, unpack and check the LRA data "
        f"under $DATA_DIR/lra (see data/README.md, section Long Range Arena)."
    )
    if hint:
        message += " " + hint
    return LRADataError(message)


LISTOPS_HINT = (
    "ListOps can also be generated locally: `python -m tasks.lra.listops --seed 0 --out $DATA_DIR/lra/listops-1000`."
)


# ---------------------------------------------------------------------------------------------------------------
# Cache


@dataclass
class Ragged:
    """Variable-length sequences: item i is ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_list(cls, items: list[np.ndarray], dtype: Any = np.uint8) -> Ragged:
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum([len(item) for item in items], out=offsets[1:])
        values = np.concatenate(items).astype(dtype) if items else np.zeros(0, dtype=dtype)
        return cls(values, offsets)

    def take(self, index: np.ndarray) -> Ragged:
        """A new (in-memory) Ragged with the items `index`, in that order."""
        return Ragged.from_list([np.asarray(self[int(i)]) for i in index], dtype=self.values.dtype)


def file_fingerprint(paths: Iterable[Path]) -> list[list[Any]]:
    """[resolved path, size, mtime_ns] per file: the part of a cache key that tracks the source files."""
    out = []
    for path in paths:
        stat = Path(path).stat()
        out.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def cached(
    cache_dir: Path | None, name: str, key: dict[str, Any], build: Callable[[], tuple[dict[str, np.ndarray], dict]]
) -> tuple[dict[str, np.ndarray], dict]:
    """Return `build()`'s (arrays, meta), from ``cache_dir/<name>-<hash(key)>/`` when present.

    With `cache_dir=None` nothing is written. Entries are written to a temporary folder and renamed, so concurrent
    or interrupted runs never see a partial entry. Arrays come back memory-mapped (read-only).
    """
    if cache_dir is None:
        return build()
    digest = hashlib.sha1(json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()[:16]
    entry = Path(cache_dir) / f"{name}-{digest}"
    if not (entry / "meta.json").exists():
        arrays, meta = build()
        tmp = Path(cache_dir) / f".{name}-{digest}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for array_name, array in arrays.items():
            np.save(tmp / f"{array_name}.npy", np.ascontiguousarray(array))
        with open(tmp / "meta.json", "w") as handle:
            json.dump({"key": key, "arrays": sorted(arrays), "meta": meta}, handle, indent=1)
        try:
            tmp.rename(entry)
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    with open(entry / "meta.json") as handle:
        stored = json.load(handle)
    arrays = {array_name: np.load(entry / f"{array_name}.npy", mmap_mode="r") for array_name in stored["arrays"]}
    return arrays, stored["meta"]


# ---------------------------------------------------------------------------------------------------------------
# ListOps


def listops_path(root: Path, split: str) -> Path:
    return Path(root) / LISTOPS_DIR / f"basic_{split}.tsv"


def read_listops_tsv(path: Path) -> tuple[list[str], np.ndarray]:
    """Sources and labels (N,) of one ListOps TSV; checks the ``Source<TAB>Target`` header and every row."""
    if not path.is_file():
        raise data_error("listops", path, "file not found", LISTOPS_HINT)
    sources, labels = [], []
    with open(path, encoding="utf-8", newline="") as handle:
        header = handle.readline().rstrip("\r\n")
        if header.split("\t") != ["Source", "Target"]:
            raise data_error(
                "listops", path, f"expected the header 'Source<TAB>Target', found {header[:60]!r}", LISTOPS_HINT
            )
        for line_no, line in enumerate(handle, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[1].strip().isdigit() or not 0 <= int(fields[1]) <= 9:
                raise data_error(
                    "listops",
                    path,
                    f"line {line_no} is not '<expression><TAB><label 0-9>': {line[:60]!r}...",
                    LISTOPS_HINT,
                )
            sources.append(fields[0])
            labels.append(int(fields[1]))
    if not sources:
        raise data_error("listops", path, "no examples", LISTOPS_HINT)
    return sources, np.asarray(labels, dtype=np.int64)


def load_listops(root: Path, cache_dir: Path | None) -> tuple[dict[str, tuple[Ragged, np.ndarray]], list[str]]:
    """{split: (ids, labels)} for train/val/test and the vocabulary (built from val, as the official pipeline does)."""
    paths = {split: listops_path(root, split) for split in ("train", "val", "test")}
    for path in paths.values():
        if not path.is_file():
            raise data_error("listops", path, "file not found", LISTOPS_HINT)

    def build() -> tuple[dict[str, np.ndarray], dict]:
        val_sources, _ = read_listops_tsv(paths["val"])
        encoder = ListOpsEncoder(build_listops_vocab(val_sources))
        arrays: dict[str, np.ndarray] = {}
        for split, path in paths.items():
            sources, labels = read_listops_tsv(path)
            ragged = Ragged.from_list([encoder.encode(source) for source in sources])
            arrays.update(
                {f"{split}_ids": ragged.values, f"{split}_offsets": ragged.offsets, f"{split}_labels": labels}
            )
        return arrays, {"vocab": encoder.vocab}

    arrays, meta = cached(cache_dir, "listops", {"files": file_fingerprint(paths.values())}, build)
    splits = {
        split: (Ragged(arrays[f"{split}_ids"], arrays[f"{split}_offsets"]), arrays[f"{split}_labels"])
        for split in paths
    }
    return splits, meta["vocab"]


# ---------------------------------------------------------------------------------------------------------------
# Text (IMDB)


def _imdb_files(root: Path, split: str) -> list[tuple[Path, int]]:
    files = []
    for label, polarity in ((0, "neg"), (1, "pos")):  # tfds/HF: 0 = neg, 1 = pos
        folder = Path(root) / IMDB_DIR / split / polarity
        if not folder.is_dir():
            raise data_error("text", folder, "folder not found (expected the aclImdb tarball layout with *.txt files)")
        names = sorted(entry.name for entry in os.scandir(folder) if entry.name.endswith(".txt"))
        if not names:
            raise data_error("text", folder, "no *.txt reviews in this folder")
        files.extend((folder / name, label) for name in names)
    return files


def _imdb_from_hf() -> dict[str, tuple[list[bytes], np.ndarray]] | None:
    """The HF `imdb` dataset when it is already in the local cache (never downloads), else None."""
    try:
        import datasets
        from huggingface_hub import constants as hub_constants
    except ImportError:
        return None
    # Offline mode for this call only: both libraries read their flag at import time, so patch the attributes.
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        loaded = datasets.load_dataset("imdb")
        return {
            split: ([utf8_bytes(t) for t in loaded[split]["text"]], np.asarray(loaded[split]["label"], dtype=np.int64))
            for split in ("train", "test")
        }
    except Exception:  # noqa: BLE001 - any failure means "not cached": the caller reports the missing aclImdb
        return None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_text(root: Path, cache_dir: Path | None, max_len: int, source: str = "auto") -> tuple[dict, str]:
    """{"train"/"test": (bytes Ragged truncated to max_len, labels)} and the source used ("aclImdb" or "hf").

    source: "auto" (aclImdb when present, else the HF cache), "aclImdb" or "hf".
    """
    folder = Path(root) / IMDB_DIR
    use_files = source == "aclImdb" or (source == "auto" and folder.is_dir())
    if source not in ("auto", "aclImdb", "hf"):
        raise ValueError(f"data.text_source must be auto, aclImdb or hf, got {source!r}")
    if use_files:
        files = {split: _imdb_files(root, split) for split in ("train", "test")}
        dirs = [Path(root) / IMDB_DIR / s / p for s in ("train", "test") for p in ("neg", "pos")]
        key = {"files": file_fingerprint(dirs), "counts": [len(f) for f in files.values()], "max_len": max_len}

        def build() -> tuple[dict[str, np.ndarray], dict]:
            arrays = {}
            for split, entries in files.items():
                items = [np.frombuffer(path.read_bytes()[:max_len], dtype=np.uint8) for path, _ in entries]
                ragged = Ragged.from_list(items)
                arrays.update(
                    {
                        f"{split}_bytes": ragged.values,
                        f"{split}_offsets": ragged.offsets,
                        f"{split}_labels": np.asarray([label for _, label in entries], dtype=np.int64),
                    }
                )
            return arrays, {}

        arrays, _ = cached(cache_dir, "text", key, build)
        used = "aclImdb"
    else:
        hf = _imdb_from_hf()
        if hf is None:
            raise data_error(
                "text",
                folder,
                "folder not found, and the HF `imdb` dataset is not in the local cache",
                "Alternatively unpack aclImdb_v1.tar.gz there yourself.",
            )
        arrays = {}
        for split, (texts, labels) in hf.items():
            ragged = Ragged.from_list([np.frombuffer(t[:max_len], dtype=np.uint8) for t in texts])
            arrays.update(
                {f"{split}_bytes": ragged.values, f"{split}_offsets": ragged.offsets, f"{split}_labels": labels}
            )
        used = "hf"
    return {
        split: (Ragged(arrays[f"{split}_bytes"], arrays[f"{split}_offsets"]), arrays[f"{split}_labels"])
        for split in ("train", "test")
    }, used


# ---------------------------------------------------------------------------------------------------------------
# Retrieval (AAN)


def aan_path(root: Path, split: str) -> Path:
    return Path(root) / AAN_DIR / f"new_aan_pairs.{AAN_SPLITS[split]}.tsv"


def read_aan_tsv(path: Path, max_len: int) -> tuple[Ragged, Ragged, np.ndarray]:
    """(text1 bytes, text2 bytes, labels) of one AAN TSV: no header, tab-separated, no quoting.

    Columns: label (a float such as 1.0, cast to int), id1, id2, text1, text2. Texts are truncated to `max_len` bytes.
    """
    if not path.is_file():
        raise data_error("retrieval", path, "file not found")
    first, second, labels = [], [], []
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            fields = line.split(b"\t")
            try:
                if len(fields) != 5:
                    raise ValueError
                label = int(float(fields[0]))
                if label not in (0, 1):
                    raise ValueError
            except ValueError:
                raise data_error(
                    "retrieval",
                    path,
                    f"line {line_no} is not 'label<TAB>id1<TAB>id2<TAB>text1<TAB>text2' "
                    f"with a 0/1 label ({len(fields)} fields, starts {line[:40]!r})",
                ) from None
            labels.append(label)
            first.append(np.frombuffer(fields[3][:max_len], dtype=np.uint8))
            second.append(np.frombuffer(fields[4][:max_len], dtype=np.uint8))
    if not labels:
        raise data_error("retrieval", path, "no examples")
    return Ragged.from_list(first), Ragged.from_list(second), np.asarray(labels, dtype=np.int64)


def load_retrieval(root: Path, cache_dir: Path | None, max_len: int) -> dict[str, tuple[Ragged, Ragged, np.ndarray]]:
    """{split: (doc1 bytes, doc2 bytes, labels)} for train/val(= the `eval` file)/test."""
    out = {}
    for split in ("train", "val", "test"):
        path = aan_path(root, split)
        if not path.is_file():
            raise data_error("retrieval", path, "file not found")

        def build(path: Path = path) -> tuple[dict[str, np.ndarray], dict]:
            one, two, labels = read_aan_tsv(path, max_len)
            return {"b1": one.values, "o1": one.offsets, "b2": two.values, "o2": two.offsets, "labels": labels}, {}

        arrays, _ = cached(
            cache_dir, f"retrieval-{split}", {"files": file_fingerprint([path]), "max_len": max_len}, build
        )
        out[split] = (Ragged(arrays["b1"], arrays["o1"]), Ragged(arrays["b2"], arrays["o2"]), arrays["labels"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Image (CIFAR-10)


def rgb_to_grayscale(images: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> uint8 (...) as `tf.image.rgb_to_grayscale` computes it.

    TensorFlow scales to [0, 1] in float32, takes the weighted sum, then converts back by multiplying with 255.5
    and truncating (`convert_image_dtype`). No normalisation follows: each gray level is a token 0–255.
    """
    scaled = images.astype(np.float32) * np.float32(1.0 / 255.0)
    gray = scaled @ GRAY_WEIGHTS
    return np.clip(gray * np.float32(255.5), 0, 255).astype(np.uint8)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 32, 32, 3) uint8 and labels (N,) of one pickled CIFAR-10 batch."""
    if not path.is_file():
        raise data_error("image", path, "file not found (expected the cifar-10-python.tar.gz layout)")
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"data {data.shape}, labels {labels.shape}")
    except Exception as exc:  # noqa: BLE001 - any decoding problem is a malformed file
        raise data_error(
            "image", path, f"not a CIFAR-10 batch (a pickled dict with b'data' uint8 (N, 3072) and b'labels'): {exc}"
        ) from None
    # rows are R(1024) G(1024) B(1024), each a row-major 32x32 plane
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_image(root: Path, cache_dir: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": 45k, "val": last 5k of the training batches, "test": 10k}: gray tokens (N, 1024) uint8 and labels.

    The official code slices tfds `train[:90%]` / `train[90%:]`; we take the same fractions in file order.
    """
    folder = Path(root) / CIFAR_DIR
    paths = [folder / name for name in (*CIFAR_TRAIN_BATCHES, "test_batch")]
    for path in paths:
        if not path.is_file():
            raise data_error("image", path, "file not found (expected the cifar-10-python.tar.gz layout)")

    def build() -> tuple[dict[str, np.ndarray], dict]:
        train = [read_cifar_batch(path) for path in paths[:-1]]
        train_pixels = np.concatenate([pixels for pixels, _ in train])
        train_labels = np.concatenate([labels for _, labels in train])
        test_pixels, test_labels = read_cifar_batch(paths[-1])
        return {
            "train_tokens": rgb_to_grayscale(train_pixels).reshape(len(train_pixels), -1),
            "train_labels": train_labels,
            "test_tokens": rgb_to_grayscale(test_pixels).reshape(len(test_pixels), -1),
            "test_labels": test_labels,
        }, {}

    arrays, _ = cached(cache_dir, "image", {"files": file_fingerprint(paths)}, build)
    n_train = round(0.9 * len(arrays["train_labels"]))
    return {
        "train": (arrays["train_tokens"][:n_train], arrays["train_labels"][:n_train]),
        "val": (arrays["train_tokens"][n_train:], arrays["train_labels"][n_train:]),
        "test": (arrays["test_tokens"], arrays["test_labels"]),
    }


# ---------------------------------------------------------------------------------------------------------------
# Pathfinder-32


def _metadata_files(folder: Path) -> list[Path]:
    meta = folder / "metadata"
    if not meta.is_dir():
        raise data_error(
            "pathfinder", meta, "folder not found (expected pathfinder32/curv_contour_length_14/metadata/*.npy)"
        )
    files = [p for p in meta.iterdir() if p.suffix == ".npy"]
    if not files:
        raise data_error("pathfinder", meta, "no metadata/*.npy files")
    return sorted(files, key=lambda p: (int(p.stem) if p.stem.isdigit() else float("inf"), p.name))


def read_pathfinder(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Tokens (N, 1024) uint8, labels (N,) and the skipped empty files, in metadata order.

    Each metadata line is space-separated: field 0 is the image sub-directory (e.g. ``imgs/0``), field 1 the PNG
    name, field 3 the 0/1 label. Zero-byte images (known to occur in the release) are skipped, as the official
    pipeline filters empty images.
    """
    from PIL import Image

    tokens, labels, skipped = [], [], []
    for meta_path in _metadata_files(folder):
        with open(meta_path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 4 or fields[3] not in ("0", "1"):
                    raise data_error(
                        "pathfinder",
                        meta_path,
                        f"line {line_no} is not '<subdir> <file.png> <n> <label 0/1> ...': {line.strip()!r}",
                    )
                image_path = folder / fields[0] / fields[1]
                if not image_path.is_file():
                    raise data_error(
                        "pathfinder", image_path, f"file not found (listed in {meta_path}, line {line_no})"
                    )
                if image_path.stat().st_size == 0:
                    skipped.append(str(image_path.relative_to(folder)))
                    continue
                try:
                    with Image.open(image_path) as image:
                        pixels = np.asarray(image.convert("L"), dtype=np.uint8)
                except Exception as exc:  # noqa: BLE001
                    raise data_error("pathfinder", image_path, f"cannot decode the PNG: {exc}") from None
                if pixels.shape != (32, 32):
                    raise data_error("pathfinder", image_path, f"expected a 32x32 image, got {pixels.shape}")
                tokens.append(pixels.reshape(-1))
                labels.append(int(fields[3]))
    if not tokens:
        raise data_error("pathfinder", folder, "no readable images")
    return np.stack(tokens), np.asarray(labels, dtype=np.int64), skipped


def load_pathfinder(root: Path, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All Pathfinder-32 hard examples (tokens (N, 1024), labels) and the skipped empty files; splits come later."""
    folder = Path(root) / PATHFINDER_DIR
    meta_files = _metadata_files(folder)

    def build() -> tuple[dict[str, np.ndarray], dict]:
        tokens, labels, skipped = read_pathfinder(folder)
        return {"tokens": tokens, "labels": labels}, {"skipped": skipped}

    arrays, meta = cached(cache_dir, "pathfinder", {"files": file_fingerprint(meta_files)}, build)
    return arrays["tokens"], arrays["labels"], meta["skipped"]


def seeded_split(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split range(n) into consecutive parts of a seeded permutation with the given fractions (last takes the rest)."""
    permutation = np.random.default_rng(seed).permutation(n)
    bounds = np.floor(np.cumsum(fractions[:-1]) * n).astype(int)
    return np.split(permutation, bounds)


__all__ = [
    "TASKS",
    "LRADataError",
    "Ragged",
    "aan_path",
    "cached",
    "data_error",
    "listops_path",
    "load_image",
    "load_listops",
    "load_pathfinder",
    "load_retrieval",
    "load_text",
    "read_aan_tsv",
    "read_cifar_batch",
    "read_listops_tsv",
    "read_pathfinder",
    "rgb_to_grayscale",
    "seeded_split",
]
