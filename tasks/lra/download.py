"""`make data-lra`: download, unpack and check the Long Range Arena data under ``DATA_DIR/lra/``.

Sources (results/paper/official_code.md §2.1, §2.5):
* ``lra_release.gz`` from the LRA bucket (7.7 GB): ListOps ``listops-1000/``, Retrieval ``tsv_data/`` and
  Pathfinder ``pathfinder32/``. Only those members are unpacked (the release also holds Pathfinder 64–256).
* ``aclImdb_v1.tar.gz`` (the IMDB reviews, Text task) -> ``aclImdb/``.
* ``cifar-10-python.tar.gz`` (Image task) -> ``cifar-10-batches-py/``.

Usage:
    python -m tasks.lra.download [--data-dir DATA_DIR] [--tasks listops text ...] [--check] [--keep-archives]

A source whose layout is already valid is not downloaded again. Archives are fetched by `tasks.common.download`
(progress bar, resume of an interrupted download, size and hash checks): the IMDB and CIFAR archives against the
size and SHA-256 that Hugging Face's `datasets` records for them (and CIFAR's MD5 from its page, as torchvision
checks it); the release, for which nothing is published, against the SHA-256 recorded beside it at its first
download (`downloads/lra_release.gz.sha256`, kept when the archive is deleted, so a later download must match it).
Unpacking goes through `tarfile`'s `data` filter, which refuses members that would land outside DATA_DIR/lra.
Without network each missing file is reported with its URL and where to put it by hand; `--check` only validates.
The exit status is non-zero when a requested task's layout is still incomplete. ListOps can also be generated
locally with `python -m tasks.lra.listops`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from results.roots import data_root
from tasks.common.download import ChecksumError, DownloadError, Source, fetch
from tasks.lra import datasets as lra

COMMAND = "make data-lra"
HF_RECORD = "as Hugging Face's `datasets` records it"


@dataclass(frozen=True)
class Archive:
    """One downloadable archive, the tasks it provides and the members to unpack (prefixes after its top folder)."""

    name: str
    source: Source
    tasks: tuple[str, ...]
    members: tuple[str, ...]
    strip_top: bool  # drop the archive's top folder (lra_release/) when unpacking


ARCHIVES = (
    Archive(
        "lra_release",
        Source("lra_release.gz", ("https://storage.googleapis.com/long-range-arena/lra_release.gz",)),
        ("listops", "retrieval", "pathfinder"),
        (f"{lra.LISTOPS_DIR}/", f"{lra.AAN_DIR}/", f"{lra.PATHFINDER_DIR}/"),
        strip_top=True,
    ),
    Archive(
        "imdb",
        Source(
            "aclImdb_v1.tar.gz",
            ("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",),
            size=84_125_825,
            sha256="c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
            origin=HF_RECORD,
        ),
        ("text",),
        ("aclImdb/train/pos/", "aclImdb/train/neg/", "aclImdb/test/pos/", "aclImdb/test/neg/"),
        strip_top=False,
    ),
    Archive(
        "cifar10",
        Source(
            "cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            size=170_498_071,
            sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            md5="c58f30108f718f92721af3b95e74349a",
            origin="MD5 from the CIFAR page, as torchvision checks it; size and SHA-256 " + HF_RECORD,
        ),
        ("image",),
        (f"{lra.CIFAR_DIR}/",),
        strip_top=False,
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


def unpack(archive: Path, root: Path, spec: Archive) -> None:
    """Extract the members of `spec` from `archive` into `root`, dropping the top folder when asked.

    Only plain files and folders under the wanted prefixes are kept; `tarfile`'s `data` filter refuses any of them
    that would land outside `root`."""
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError(f"unpacking {archive} safely needs Python 3.10.12, 3.11.4 or newer (tarfile's data filter)")

    def wanted(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
        name = member.name.removeprefix("./")
        if spec.strip_top:
            name = name.partition("/")[2]
        if not name or not (member.isfile() or member.isdir()):
            return None
        if not any(name.startswith(prefix) or name + "/" == prefix for prefix in spec.members):
            return None
        return tarfile.data_filter(member.replace(name=name, deep=False), destination)

    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(root, filter=wanted)


def manual_instructions(spec: Archive, root: Path, reason: str) -> str:
    return (
        f"could not download {spec.source.urls[0]} ({reason}). Download it by hand to "
        f"{root / 'downloads' / spec.source.file} and rerun `{COMMAND}`, or unpack it so that "
        f"{', '.join(str(root / m) for m in spec.members)} exist."
    )


def prepare(
    root: Path, tasks: tuple[str, ...], check_only: bool = False, keep_archives: bool = False
) -> dict[str, list[str]]:
    """Download and unpack what the requested tasks lack, then validate. Returns {task: problems}."""
    root = Path(root)
    for spec in ARCHIVES:
        wanted = [task for task in spec.tasks if task in tasks]
        if check_only or not wanted or not any(validate(root, tuple(wanted)).values()):
            continue
        archive = root / "downloads" / spec.source.file
        try:
            fetch(spec.source, archive.parent, COMMAND)
            print(f"unpacking {archive} into {root}", file=sys.stderr)
            unpack(archive, root, spec)
            if not keep_archives:
                archive.unlink()  # its .sha256 record stays: a later download must match it
        except DownloadError as exc:
            print(f"LRA {spec.name}: " + manual_instructions(spec, root, str(exc)), file=sys.stderr)
        except (OSError, tarfile.TarError, ChecksumError, RuntimeError) as exc:
            print(f"LRA {spec.name}: {archive}: {exc}", file=sys.stderr)
    return validate(root, tasks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.lra.download", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=data_root(), help="the DATA_DIR root"
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
            f"Some LRA data under {root} is incomplete. Run `{COMMAND}` where the network allows, place the archives "
            f"by hand under {root / 'downloads'}, or generate ListOps with "
            f"`python -m tasks.lra.listops --seed 0 --out {root / lra.LISTOPS_DIR}`. See data/README.md.",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
