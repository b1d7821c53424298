"""`make data-lra`: download, unpack and check the Long Range Arena data under ``DATA_DIR/lra/``.

Sources (results/paper/official_code.md §2.1, §2.5):
* ``lra_release.gz`` from the LRA bucket (7.7 GB): ListOps ``listops-1000/``, Retrieval ``tsv_data/`` and
  Pathfinder ``pathfinder32/``. Only those members are unpacked (the release also holds Pathfinder 64–256).
* ``aclImdb_v1.tar.gz`` (the IMDB reviews, Text task) -> ``aclImdb/``.
* ``cifar-10-python.tar.gz`` (Image task) -> ``cifar-10-batches-py/``.

Usage:
    python -m tasks.lra.download [--data-dir DATA_DIR] [--tasks listops text ...] [--check] [--keep-archives]

A source whose layout is already valid is not downloaded again. Without network each missing file is reported with
its URL and where to put it by hand; `--check` only validates. The exit status is non-zero when a requested task's
layout is still incomplete. ListOps can also be generated locally with `python -m tasks.lra.listops`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tasks.lra import datasets as lra


@dataclass(frozen=True)
class Source:
    """One downloadable archive, the tasks it provides and the members to unpack (prefixes after its top folder)."""

    name: str
    url: str
    archive: str
    tasks: tuple[str, ...]
    members: tuple[str, ...]
    strip_top: bool  # drop the archive's top folder (lra_release/) when unpacking
    md5: str | None = None


SOURCES = (
    Source(
        "lra_release",
        "https://storage.googleapis.com/long-range-arena/lra_release.gz",
        "lra_release.gz",
        ("listops", "retrieval", "pathfinder"),
        (f"{lra.LISTOPS_DIR}/", f"{lra.AAN_DIR}/", f"{lra.PATHFINDER_DIR}/"),
        strip_top=True,
    ),
    Source(
        "imdb",
        "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
        "aclImdb_v1.tar.gz",
        ("text",),
        ("aclImdb/train/pos/", "aclImdb/train/neg/", "aclImdb/test/pos/", "aclImdb/test/neg/"),
        strip_top=False,
    ),
    Source(
        "cifar10",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        ("image",),
        (f"{lra.CIFAR_DIR}/",),
        strip_top=False,
        md5="c58f30108f718f92721af3b95e74349a",
    ),
)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def validate_task(root: Path, task: str) -> list[str]:
    """Problems with one task's layout under `root` (= DATA_DIR/lra); empty when it looks complete.

    Checks that every file the reader needs exists and that its head has the expected format; it does not read
    whole files (the readers do, with per-line errors).
    """
    root = Path(root)
    problems: list[str] = []
    if task == "listops":
        for split in ("train", "val", "test"):
            path = lra.listops_path(root, split)
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            with open(path, encoding="utf-8", errors="replace") as handle:
                header = handle.readline().rstrip("\r\n")
            if header.split("\t") != ["Source", "Target"]:
                problems.append(f"{path}: header is {header[:40]!r}, expected 'Source<TAB>Target'")
    elif task == "text":
        for split in ("train", "test"):
            for polarity in ("pos", "neg"):
                folder = root / lra.IMDB_DIR / split / polarity
                if not folder.is_dir():
                    problems.append(f"{folder}: missing")
                elif not any(name.endswith(".txt") for name in os.listdir(folder)):
                    problems.append(f"{folder}: no *.txt reviews")
    elif task == "retrieval":
        for split in ("train", "val", "test"):
            path = lra.aan_path(root, split)
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            with open(path, "rb") as handle:
                first = handle.readline().rstrip(b"\r\n")
            n_fields = len(first.split(b"\t"))
            if n_fields != 5:
                problems.append(f"{path}: first line has {n_fields} tab-separated fields, expected 5")
    elif task == "image":
        for name in (*lra.CIFAR_TRAIN_BATCHES, "test_batch"):
            path = root / lra.CIFAR_DIR / name
            if not path.is_file() or path.stat().st_size == 0:
                problems.append(f"{path}: missing")
    elif task == "pathfinder":
        folder = root / lra.PATHFINDER_DIR
        meta = folder / "metadata"
        metas = sorted(meta.glob("*.npy")) if meta.is_dir() else []
        if not metas:
            problems.append(f"{meta}: missing or without *.npy metadata files")
        for path in metas:
            with open(path, encoding="utf-8", errors="replace") as handle:
                fields = handle.readline().split()
            if len(fields) < 4:
                problems.append(f"{path}: first line is not '<subdir> <file.png> <n> <label> ...'")
            elif not (folder / fields[0] / fields[1]).is_file():
                problems.append(f"{folder / fields[0] / fields[1]}: missing (listed in {path})")
    else:
        raise ValueError(f"unknown LRA task {task!r}; expected one of {', '.join(lra.TASKS)}")
    return problems


def validate(root: Path, tasks: tuple[str, ...] = lra.TASKS) -> dict[str, list[str]]:
    """{task: problems} for the requested tasks."""
    return {task: validate_task(root, task) for task in tasks}


# ---------------------------------------------------------------------------------------------------------------
# Download and unpack


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path) -> None:
    """Stream `url` to `target` (via a .part file, renamed when complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as handle:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        for block in iter(lambda: response.read(1 << 22), b""):
            handle.write(block)
            done += len(block)
            if total:
                print(f"\r  {target.name}: {done / 1e6:,.0f} / {total / 1e6:,.0f} MB", end="", file=sys.stderr)
    print(file=sys.stderr)
    part.replace(target)


def unpack(archive: Path, root: Path, source: Source) -> None:
    """Extract the members of `source` from `archive` into `root`, dropping the top folder when asked."""
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if source.strip_top:
                parts = name.split("/", 1)
                if len(parts) < 2:
                    continue
                name = parts[1]
            if not any(name.startswith(prefix) or name + "/" == prefix for prefix in source.members):
                continue
            if not (member.isfile() or member.isdir()) or ".." in Path(name).parts:
                continue  # only plain files and folders, never outside root
            destination = root / name
            if member.isdir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(destination, "wb") as dst:
                shutil.copyfileobj(src, dst)


def manual_instructions(source: Source, root: Path, reason: str) -> str:
    return (
        f"could not download {source.url} ({reason}). Download it by hand to {root / 'downloads' / source.archive} "
        f"and rerun `make data-lra`, or unpack it so that {', '.join(str(root / m) for m in source.members)} exist."
    )


def prepare(
    root: Path, tasks: tuple[str, ...], check_only: bool = False, keep_archives: bool = False
) -> dict[str, list[str]]:
    """Download and unpack what the requested tasks lack, then validate. Returns {task: problems}."""
    root = Path(root)
    for source in SOURCES:
        wanted = [task for task in source.tasks if task in tasks]
        if check_only or not wanted or not any(validate(root, tuple(wanted)).values()):
            continue
        archive = root / "downloads" / source.archive
        try:
            if not archive.is_file():
                print(f"downloading {source.url}", file=sys.stderr)
                download(source.url, archive)
            if source.md5 and _md5(archive) != source.md5:
                raise ValueError(f"{archive} has the wrong MD5 checksum (expected {source.md5}); delete it and retry")
            print(f"unpacking {archive} into {root}", file=sys.stderr)
            unpack(archive, root, source)
            if not keep_archives:
                archive.unlink()
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            print(
                f"LRA {source.name}: " + manual_instructions(source, root, str(getattr(exc, "reason", exc))),
                file=sys.stderr,
            )
        except (tarfile.TarError, ValueError) as exc:
            print(f"LRA {source.name}: {archive}: {exc}", file=sys.stderr)
    return validate(root, tasks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.lra.download", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", "data")), help="the DATA_DIR root"
    )
    parser.add_argument("--tasks", nargs="+", choices=lra.TASKS, default=list(lra.TASKS))
    parser.add_argument("--check", action="store_true", help="only validate the layout")
    parser.add_argument("--keep-archives", action="store_true")
    args = parser.parse_args(argv)
    root = args.data_dir / "lra"
    report = prepare(root, tuple(args.tasks), check_only=args.check, keep_archives=args.keep_archives)
    failed = False
    for task, problems in report.items():
        if problems:
            failed = True
            print(f"[missing] {task}:", file=sys.stderr)
            for problem in problems:
                print(f"    {problem}", file=sys.stderr)
        else:
            print(f"[ok] {task}")
    if failed:
        print(
            f"Some LRA data under {root} is incomplete. Run `make data-lra` where the network allows, place the archives "
            f"by hand under {root / 'downloads'}, or generate ListOps with "
            f"`python -m tasks.lra.listops --seed 0 --out {root / lra.LISTOPS_DIR}`. See data/README.md.",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
