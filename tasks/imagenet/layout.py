"""The ImageFolder layout (`<root>/{train,val}/<class>/<image>`) and the checks run on it before training.

Checks, each failing with the path at fault and the fix:
- both split folders exist and hold class folders;
- train and val have the same class folders, and no class folder is empty;
- a folder named `imagenet` holds ImageNet-1K's counts (1000 classes, 1,281,167 / 50,000 images);
- every image opens (`data.check_images`): `header` parses each header (PIL's `verify`: fast, but blind to a JPEG
  cut short, whose header is intact), `decode` decodes each image (JPEGs at 1/8 scale, which still reads every
  byte, so truncated files fail; `make data-imagenet` runs this one), `off` opens none. The unreadable images are
  listed, then skipped or fatal (`data.corrupt_images`). Files with other extensions are not images to ImageFolder
  and are ignored.

The image check runs once per folder, not once per run and DDP rank. Its result is cached per split, keyed by the
split's listing: a sha256 over every image's path below the split folder, size and modification time, which the walk
that finds the images computes as it goes (one walk, shared with building the sample lists). A process whose
listing matches a cache entry checked at least as thoroughly reads the unreadable images from it and opens none; a
file added, removed, rewritten or touched changes the key and that split is checked again. Concurrent first runs
(DDP ranks started together, e.g. by SLURM) check once: the first to take the cache file's lock checks, the others
wait for it and read what it wrote. The cache file is `<root>/.image_check.json` (with its lock file
`.image_check.json.lock`) where the data folder is writable, else
`$XDG_CACHE_HOME/flowformer/image_check/<folder name>-<hash of its absolute path>.json` (`~/.cache` by default), or
in `data.cache_dir` when that is set. A cache in the data folder travels with it (a copy that keeps modification
times, such as `rsync -a`, keeps it valid).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image, ImageFile
from rich.progress import track
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from results.atomic_io import write_json_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
CORRUPT_IMAGE_POLICIES = ("error", "skip")
# each level finds what the one before it finds, and more: a cache entry serves its own level and those below
CHECK_LEVELS = ("off", "header", "decode")
PREPARE_HINT = "`make data-imagenet` explains how to obtain ImageNet and sorts its val images into class folders"
# below this many images a progress bar would only flicker
PROGRESS_MIN_IMAGES = 10_000
CACHE_NAME = ".image_check.json"
# bumped when the cache's content changes meaning; a file of another format is checked again and rewritten
CACHE_FORMAT = 1


class ImageFolderError(ValueError):
    """The folder does not have the ImageFolder layout the data module expects; the message names the path."""


@dataclass(frozen=True)
class ExpectedCounts:
    """The class and image counts a known dataset must have."""

    classes: int
    train: int
    val: int


# checked for a folder named `imagenet` (ILSVRC-2012)
KNOWN_COUNTS = {"imagenet": ExpectedCounts(classes=1000, train=1_281_167, val=50_000)}

Samples = list[tuple[str, int]]  # (image path, class index), class folders and files in sorted order


@dataclass
class FolderLayout:
    """A checked ImageFolder: class names (sorted folder names), samples per split, and the unreadable images."""

    root: Path
    classes: list[str]
    train: Samples
    val: Samples
    unreadable: list[str] = field(default_factory=list)
    image_check: dict[str, Any] = field(default_factory=lambda: {"level": "off"})

    def summary(self) -> dict:
        """The provenance recorded in metrics.json (`data`)."""
        return {
            "root": str(self.root),
            "num_classes": len(self.classes),
            "sizes": {"train": len(self.train), "val": len(self.val)},
            "skipped_images": list(self.unreadable),
            "image_check": self.image_check,
        }


@dataclass(frozen=True)
class SplitListing:
    """One split folder's images: class folder name -> its image files (paths, sorted), both in sorted order, and
    the listing's key (module docstring; None when the walk did not compute it)."""

    files: dict[str, list[str]]
    key: str | None = None

    def paths(self) -> list[str]:
        """Every image path, class by class."""
        return [path for paths in self.files.values() for path in paths]


def list_split(split_dir: Path, keyed: bool = False, workers: int = 0) -> SplitListing:
    """Walk one split folder once: its class folders and their image files, and with `keyed` the listing's key
    (each file's size and modification time are read as the walk goes). `workers` threads list class folders in
    parallel, since network storage answers many requests at once."""
    if not split_dir.is_dir():
        raise ImageFolderError(f"{split_dir} does not exist: expected <root>/train and <root>/val. {PREPARE_HINT}")
    with os.scandir(split_dir) as entries:
        names = sorted(entry.name for entry in entries if entry.is_dir())
    if not names:
        raise ImageFolderError(
            f"{split_dir} holds no class folders: images must sit in {split_dir}/<class>/ (`make data-imagenet` "
            "sorts a flat ImageNet val folder into class folders)"
        )
    list_one = partial(_list_class, keyed=keyed)
    folders = [split_dir / name for name in names]
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            listed = list(pool.map(list_one, folders))
    else:
        listed = [list_one(folder) for folder in folders]
    key = None
    if keyed:
        digest = hashlib.sha256()
        for name, (_, class_digest) in zip(names, listed):
            digest.update(f"{name}\t{class_digest}\n".encode())
        key = digest.hexdigest()
    return SplitListing({name: paths for name, (paths, _) in zip(names, listed)}, key)


def _list_class(folder: Path, keyed: bool) -> tuple[list[str], str | None]:
    """A class folder's image paths (sorted) and, with `keyed`, a sha256 over their names, sizes and mtimes."""
    with os.scandir(folder) as entries:
        images = sorted((entry for entry in entries if _is_image(entry.name)), key=lambda entry: entry.name)
    paths = [str(folder / entry.name) for entry in images]
    if not keyed:
        return paths, None
    digest = hashlib.sha256()
    for entry in images:
        try:
            info = entry.stat()
            size, mtime = info.st_size, info.st_mtime_ns
        except OSError:  # a dangling link: it keys as missing, and the check reports it
            size, mtime = -1, -1
        digest.update(f"{entry.name}\t{size}\t{mtime}\n".encode())
    return paths, digest.hexdigest()


def _is_image(name: str) -> bool:
    return has_file_allowed_extension(name, IMG_EXTENSIONS)


def check_classes(root: Path, splits: dict[str, dict[str, list[str]]]) -> list[str]:
    """The class names shared by every split; raises when the splits disagree or a class folder is empty."""
    train = set(splits["train"])
    for split, files in splits.items():
        extra = sorted(set(files) - train)
        if extra:
            raise ImageFolderError(
                f"{root / split} has class folders that {root / 'train'} lacks: {_first(extra)}. Every class needs "
                "training images; remove these folders or add them to train"
            )
        missing = sorted(train - set(files))
        if missing:
            raise ImageFolderError(
                f"{root / split} lacks class folders that {root / 'train'} has: {_first(missing)}; both splits need "
                "the same classes"
            )
        empty = sorted(name for name, paths in files.items() if not paths)
        if empty:
            raise ImageFolderError(
                f"empty class folder(s) in {root / split}: {_first(empty)} (no file with an image extension "
                f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder"
            )
    return sorted(train)


def check_counts(root: Path, classes: Sequence[str], sizes: dict[str, int]) -> None:
    """For a folder named like a known dataset, its class and image counts must be the known ones."""
    expected = KNOWN_COUNTS.get(root.name)
    if expected is None:
        return
    found = ExpectedCounts(len(classes), sizes["train"], sizes["val"])
    if found != expected:
        raise ImageFolderError(
            f"{root} is named {root.name!r} but holds {found.classes} classes and {found.train:,} / {found.val:,} "
            f"train / val images, where {root.name} has {expected.classes} and {expected.train:,} / "
            f"{expected.val:,}. Complete it ({PREPARE_HINT}), or train on a subset under another folder name "
            f"(data.dataset=<folder>)"
        )


class TruncatedLoadingError(RuntimeError):
    """PIL is set to pad truncated images instead of failing on them (`ImageFile.LOAD_TRUNCATED_IMAGES`)."""


def refuse_truncated_loading() -> None:
    """Raise when `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is on in this process: PIL would then pad a truncated image
    with grey without a word, past both the decode check and `data.corrupt_images`."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise TruncatedLoadingError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process (code imported before the data module set "
            "it), so a truncated image would be padded with grey instead of failing, and neither the image check "
            "nor data.corrupt_images could see it. Set it back to False (from PIL import ImageFile; "
            "ImageFile.LOAD_TRUNCATED_IMAGES = False); data.corrupt_images=skip skips truncated images instead"
        )


def check_level(check_images: bool | str | None) -> str:
    """`data.check_images` as one of CHECK_LEVELS (true: header, false or null: off)."""
    if check_images is True:
        return "header"
    if check_images is False or check_images is None:
        return "off"
    if check_images not in CHECK_LEVELS:
        raise ValueError(f"data.check_images must be one of {CHECK_LEVELS} (true: header, false: off), got "
                         f"{check_images!r}")
    return str(check_images)


def open_error(path: str, level: str = "header") -> str | None:
    """Why the image at `path` fails the check at `level` (header: it opens and its header parses; decode: its
    pixels decode too), or None when it passes."""
    if level == "decode":
        refuse_truncated_loading()
    try:
        with Image.open(path) as image:
            if level == "decode":
                image.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, which still reads every byte of the file
                image.load()
            else:
                image.verify()
    except MemoryError:
        raise
    except Exception as error:  # PIL raises many types for a broken file; each is a reason to report it
        return f"{type(error).__name__}: {error}"
    return None


def unreadable_images(paths: Sequence[str], workers: int = 0, level: str = "header") -> list[tuple[str, str]]:
    """(path, reason) for every image that fails the check at `level`, checked in `workers` processes (0: in
    this one)."""
    check, chunk = partial(open_error, level=level), 256
    if workers > 1 and len(paths) > chunk:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return _failures(paths, pool.map(check, paths, chunksize=chunk), level)
    return _failures(paths, map(check, paths), level)


def _failures(paths: Sequence[str], reasons: Iterable[str | None], level: str) -> list[tuple[str, str]]:
    if len(paths) >= PROGRESS_MIN_IMAGES:
        verb = "decodes" if level == "decode" else "opens"
        reasons = track(reasons, total=len(paths), description=f"checking that every image {verb}", transient=True)
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


def cache_files(root: Path, cache_dir: str | Path | None = None) -> list[Path]:
    """Where the image check's cache of `root` may be, in the order it is read and written (module docstring)."""
    resolved = Path(root).resolve()
    name = f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:16]}.json"
    if cache_dir is not None:
        return [Path(cache_dir).expanduser() / name]
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [Path(root) / CACHE_NAME, user_cache / "flowformer" / "image_check" / name]


# a cache entry: split -> (the entry as stored, "cache" or "checked", the file it was read from or written to)
_Entries = dict[str, tuple[dict[str, Any], str, Path | None]]


def checked_images(
    root: Path, listings: dict[str, SplitListing], level: str, workers: int = 0, cache_dir: str | Path | None = None
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(path, reason) of every image of `listings` that fails the check at `level`, split by split, and the
    provenance of the check (its level, and per split the listing key, whether it was checked or read from the
    cache, and the cache file). Splits that a cache entry matches are read from it; the others are checked once
    (module docstring)."""
    keys = {split: str(listing.key) for split, listing in listings.items()}
    candidates = cache_files(root, cache_dir)
    entries = _cached_entries(candidates, keys, level)
    if len(entries) < len(keys):
        entries = _check_once(root, listings, level, workers, candidates, entries)
    failures, provenance = [], {"level": level, "splits": {}}
    for split in listings:
        entry, source, path = entries[split]
        where = f"read from {path}" if source == "cache" else f"checked, cached in {path}" if path else "checked"
        log.info("image check of %s (%s): %s; %d unreadable", root / split, level, where, len(entry["failures"]))
        failures += [(str(root / relative), reason) for relative, reason in entry["failures"]]
        provenance["splits"][split] = {"key": keys[split], "source": source, "level": entry["level"],
                                       "cache": _shown(path) if path is not None else None}
    return failures, provenance


def _check_once(root: Path, listings: dict[str, SplitListing], level: str, workers: int, candidates: list[Path],
                entries: _Entries) -> _Entries:
    """Check the splits `entries` lacks under the lock of the first cache file that can be written, and store them
    there; a process that waited for the lock finds them stored by the holder and checks nothing."""
    keys = {split: str(listing.key) for split, listing in listings.items()}
    for path in candidates:
        try:
            lock = _locked(path)
        except OSError as error:
            log.info("the image check's cache cannot be kept in %s (%s)", path, error)
            continue
        try:
            entries = {**_cached_entries([path], keys, level), **entries}
            checked = {split: _check_split(root, listings[split], level, workers)
                       for split in listings if split not in entries}
            if checked:
                _store(path, root, checked)
            return {**entries, **{split: (entry, "checked", path) for split, entry in checked.items()}}
        finally:
            lock.release()
    log.warning("no writable place for the image check's cache (%s): this process checks the images itself; "
                "data.cache_dir=<folder> names one", ", ".join(map(str, candidates)))
    return {**entries, **{split: (_check_split(root, listings[split], level, workers), "checked", None)
                          for split in listings if split not in entries}}


def _locked(path: Path) -> FileLock:
    """The lock of cache file `path`, held; waits while another process holds it (it is checking this folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is checking the images of this folder; waiting for its result (%s.lock)", path)
        lock.acquire()
    return lock


def _check_split(root: Path, listing: SplitListing, level: str, workers: int) -> dict[str, Any]:
    """The cache entry of one split: its key, the level, and the images that fail (paths relative to `root`)."""
    paths = listing.paths()
    failures = unreadable_images(paths, workers, level)
    return {
        "key": listing.key,
        "level": level,
        "images": len(paths),
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "failures": [[Path(path).relative_to(root).as_posix(), reason] for path, reason in failures],
    }


def _cached_entries(candidates: Sequence[Path], keys: dict[str, str], level: str) -> _Entries:
    """The entries of the cache files that match a split's key and were checked at `level` or more thoroughly."""
    found: _Entries = {}
    for path in candidates:
        for split, entry in _read_cache(path).items():
            if split in keys and split not in found and _serves(entry, keys[split], level):
                found[split] = (entry, "cache", path)
    return found


def _serves(entry: Any, key: str, level: str) -> bool:
    return (isinstance(entry, dict) and entry.get("key") == key and entry.get("level") in CHECK_LEVELS
            and CHECK_LEVELS.index(entry["level"]) >= CHECK_LEVELS.index(level)
            and isinstance(entry.get("failures"), list))


def _read_cache(path: Path) -> dict[str, Any]:
    """A cache file's entries by split; none for a missing file, one of another format or one that does not parse
    (it is then checked again and rewritten)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("ignoring the image check's cache %s, which cannot be read (%s)", path, error)
        return {}
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        return {}
    if not isinstance(payload.get("splits"), dict):
        return {}
    return payload["splits"]


def _store(path: Path, root: Path, checked: dict[str, dict[str, Any]]) -> None:
    """Write `checked` into cache file `path` atomically, keeping its other splits' entries."""
    payload = {"format": CACHE_FORMAT, "root": str(Path(root).resolve()), "splits": {**_read_cache(path), **checked}}
    try:
        write_json_atomic(path, payload)
    except OSError as error:  # the result stands; only the next run pays for the check again
        log.warning("the image check's result could not be written to %s (%s)", path, error)


def _shown(path: Path) -> str:
    """`path`, below the home folder written from `~`, as metrics.json names no machine's home."""
    try:
        return f"~/{path.relative_to(Path.home()).as_posix()}"
    except ValueError:
        return str(path)


def load_layout(root: Path, check_images: bool | str = "header", corrupt_images: str = "error", workers: int = 0,
                cache_dir: str | Path | None = None) -> FolderLayout:
    """Scan and check `<root>/{train,val}` (see the module docstring); returns the samples to train on.

    `check_images` is a level of CHECK_LEVELS (true: header, false: off); `workers` threads walk the folders and
    `workers` processes check the images; `cache_dir` places the check's cache (None: beside the data, else the
    user's cache folder).
    """
    level = check_level(check_images)
    if corrupt_images not in CORRUPT_IMAGE_POLICIES:
        raise ValueError(f"data.corrupt_images must be one of {CORRUPT_IMAGE_POLICIES}, got {corrupt_images!r}")
    if not root.is_dir():
        raise ImageFolderError(f"{root} does not exist (data.data_dir / data.dataset). {PREPARE_HINT}")
    listings = {split: list_split(root / split, keyed=level != "off", workers=workers) for split in SPLITS}
    splits = {split: listing.files for split, listing in listings.items()}
    classes = check_classes(root, splits)
    check_counts(root, classes, {split: sum(map(len, files.values())) for split, files in splits.items()})
    samples = {split: [(path, index) for index, name in enumerate(classes) for path in files[name]]
               for split, files in splits.items()}
    failures: list[tuple[str, str]] = []
    provenance: dict[str, Any] = {"level": level}
    if level != "off":
        failures, provenance = checked_images(root, listings, level, workers, cache_dir)
    if failures and corrupt_images == "error":
        listing = "\n".join(f"  {path}: {reason}" for path, reason in failures[:20])
        raise ImageFolderError(
            f"{len(failures)} image(s) under {root} cannot be {'decoded' if level == 'decode' else 'opened'}:\n"
            f"{listing}\nReplace them (re-extract them from their archive), delete them, or skip them with "
            "data.corrupt_images=skip (they are then listed in metrics.json under data.skipped_images)"
        )
    unreadable = [path for path, _ in failures]
    for path, reason in failures:
        log.warning("skipping unreadable image %s (%s)", path, reason)
    bad = set(unreadable)
    kept = {split: [sample for sample in samples[split] if sample[0] not in bad] for split in SPLITS}
    return FolderLayout(root, classes, kept["train"], kept["val"], unreadable, provenance)


def hold_out(samples: Samples, per_class: int, seed: int) -> tuple[Samples, Samples]:
    """(kept, held out): `per_class` random images of every class held out of `samples`, drawn with `seed`.

    A class needs more than `per_class` images, so that some remain to train on.
    """
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    small = sorted(index for index, members in by_class.items() if len(members) <= per_class)
    if small:
        raise ImageFolderError(
            f"data.holdout_per_class={per_class} leaves no training image in the class(es) of index {_first(small)}; "
            "lower it or add images"
        )
    rng = np.random.default_rng(seed)
    held: set[tuple[str, int]] = set()
    for members in by_class.values():
        held.update(members[i] for i in rng.permutation(len(members))[:per_class])
    return [s for s in samples if s not in held], [s for s in samples if s in held]


def _first(names: Sequence[str], shown: int = 10) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(str(n) for n in names[:shown]) + more
