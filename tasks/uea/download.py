"""Fetch and check the paper's UEA datasets: `python -m tasks.uea.download [--names ...] [--data-dir DIR]`.

For each dataset, in order: keep the files already under `<DATA_DIR>/uea/<Name>/`; else copy aeon's bundled
copy; else download it, first from its Zenodo record (the archive's current home; the record ids are aeon's), then
from the per-dataset zip on timeseriesclassification.com. Every dataset is then loaded with the same reader training
uses and checked against `tasks/uea/datasets.py`. The exit status is non-zero when any dataset is missing or
fails the check; a summary says which.

Downloads go through `tasks.common.download` (progress bar, resume of an interrupted download). Zenodo's two `.ts`
files are checked against the size and MD5 Zenodo publishes for each; the zip, for which nothing is published,
against the SHA-256 recorded at its first download (`uea/downloads/<Name>.zip.sha256`). The SHA-256 of every
downloaded `.ts` file is recorded beside it (`<Name>_TRAIN.ts.sha256`), and every later run checks the file
against it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from results.roots import data_root
from tasks.common.download import HEADERS, TIMEOUT_S, ChecksumError, Source, fetch, record_hash, verify_record
from tasks.uea.datasets import KNOWN_DATASETS, PAPER_DATASETS, aeon_bundled_data_dir, split_file

log = logging.getLogger("tasks.uea.download")

COMMAND = "make data-uea"
ZENODO_RECORD = "https://zenodo.org/api/records/{record}"
TSC_SITE_ZIP = "https://www.timeseriesclassification.com/aeon-toolkit/{name}.zip"
SPLITS = ("TRAIN", "TEST")


def default_uea_dir() -> Path:
    """`$DATA_DIR/uea`, with DATA_DIR defaulting to `data` as in `conf/paths`."""
    return data_root() / "uea"


def has_files(root: Path, name: str) -> bool:
    """True when `<root>/<name>/<name>_TRAIN.ts` and `..._TEST.ts` both exist."""
    return all(split_file(root, name, split).is_file() for split in SPLITS)


def _install(found_dir: Path, name: str, uea_dir: Path) -> None:
    """Move `<name>_{TRAIN,TEST}.ts` found anywhere under `found_dir` into `uea_dir/<name>/`."""
    target = uea_dir / name
    found = {split: sorted(found_dir.rglob(f"{name}_{split}.ts")) for split in SPLITS}
    for split, matches in found.items():
        if not matches:
            raise FileNotFoundError(f"the download holds no {name}_{split}.ts")
    target.mkdir(parents=True, exist_ok=True)
    for split, matches in found.items():
        # Same filesystem (the staging folder lives inside uea_dir), so this is an atomic rename.
        os.replace(matches[0], target / f"{name}_{split}.ts")


def copy_bundled(name: str, uea_dir: Path) -> None:
    """Copy aeon's bundled `.ts` files of `name` into `uea_dir/<name>/`."""
    root = aeon_bundled_data_dir()
    if root is None or not has_files(root, name):
        raise FileNotFoundError(f"aeon does not bundle {name}")
    (uea_dir / name).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        shutil.copy2(split_file(root, name, split), split_file(uea_dir, name, split))


def zenodo_record_id(name: str) -> int:
    """The Zenodo record of `name`, from aeon's table of the archive's records."""
    from aeon.datasets.tsc_datasets import tsc_zenodo

    if name not in tsc_zenodo:
        raise FileNotFoundError(f"aeon knows no Zenodo record of {name}")
    return tsc_zenodo[name]


def zenodo_sources(name: str) -> list[Source]:
    """The two `.ts` files of `name` in its Zenodo record, with the size and MD5 Zenodo publishes for each."""
    import requests

    url = ZENODO_RECORD.format(record=zenodo_record_id(name))
    with requests.get(url, headers=dict(HEADERS, Accept="application/json"), timeout=TIMEOUT_S) as response:
        response.raise_for_status()
        files = {entry.get("key"): entry for entry in response.json().get("files", [])}
    sources = []
    for split in SPLITS:
        entry = files.get(f"{name}_{split}.ts")
        if entry is None:
            raise FileNotFoundError(f"the Zenodo record {url} holds no {name}_{split}.ts")
        algorithm, _, checksum = str(entry.get("checksum", "")).partition(":")
        md5 = checksum if algorithm == "md5" else None
        link = entry["links"]["self"]
        sources.append(Source(entry["key"], (link,), size=entry.get("size"), md5=md5, origin=f"as {url} gives it"))
    return sources


def fetch_zenodo(name: str, uea_dir: Path) -> None:
    """Download the two `.ts` files of `name` from its Zenodo record into `uea_dir/<name>/`."""
    for source in zenodo_sources(name):
        fetch(source, uea_dir / name, COMMAND)


def fetch_tsc_site_zip(name: str, uea_dir: Path) -> None:
    """Download the per-dataset zip from timeseriesclassification.com and install its two `.ts` files into
    `uea_dir/<name>/`. The zip is deleted once unpacked; its SHA-256 record stays in `uea_dir/downloads/`."""
    archive = fetch(Source(f"{name}.zip", (TSC_SITE_ZIP.format(name=name),)), uea_dir / "downloads", COMMAND)
    # A staging folder inside uea_dir: an interrupted unpacking never leaves half a file in <Name>/.
    staging = Path(tempfile.mkdtemp(prefix=f".unpack-{name}-", dir=uea_dir))
    try:
        try:
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(staging)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{archive} is not a zip archive; delete it and run `{COMMAND}` again") from exc
        _install(staging, name, uea_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    archive.unlink()
    for split in SPLITS:
        record_hash(split_file(uea_dir, name, split))


FETCHERS: dict[str, Callable[[str, Path], None]] = {
    "Zenodo": fetch_zenodo,
    "timeseriesclassification.com": fetch_tsc_site_zip,
}


def download(name: str, uea_dir: Path, fetchers: dict[str, Callable[[str, Path], None]] | None = None) -> str:
    """Try each fetcher in turn until `uea_dir/<name>/` holds both files; return the name of the one that worked.

    Raises RuntimeError if none did, and ChecksumError (without trying the next source) when a download differs
    from what its source publishes."""
    errors = []
    uea_dir.mkdir(parents=True, exist_ok=True)
    for source, fetch_from in (fetchers or FETCHERS).items():
        try:
            log.info("%s: downloading via %s", name, source)
            fetch_from(name, uea_dir)
            if not has_files(uea_dir, name):
                raise FileNotFoundError(f"no {name}_TRAIN.ts and {name}_TEST.ts in {uea_dir / name}")
            return source
        except ChecksumError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is reported per source below
            errors.append(f"{source}: {type(exc).__name__}: {exc}")
            log.warning("%s: %s failed: %s", name, source, exc)
    raise RuntimeError("; ".join(errors))


def validate(name: str, uea_dir: Path) -> list[str]:
    """Load `name` with the training reader and compare it with its facts; return the problems found."""
    from tasks.uea.data import UEADataError, read_ts_file

    try:
        train = read_ts_file(split_file(uea_dir, name, "TRAIN"), name)
        test = read_ts_file(split_file(uea_dir, name, "TEST"), name)
    except (UEADataError, OSError) as exc:
        return [str(exc)]
    facts = KNOWN_DATASETS.get(name)
    if facts is None:
        return []
    problems = []
    observed = {
        "train cases": (len(train.series), facts.n_train),
        "test cases": (len(test.series), facts.n_test),
        "dimensions": (train.series[0].shape[1], facts.n_dims),
        "classes in TRAIN": (len(set(train.labels)), facts.n_classes),
    }
    problems += [f"{what}: found {got}, expected {want}" for what, (got, want) in observed.items() if got != want]
    lengths = {s.shape[0] for s in train.series + test.series}
    if facts.equal_length and lengths != {facts.length}:
        problems.append(f"series lengths {sorted(lengths)[:5]}, expected all {facts.length}")
    if not facts.equal_length and max(lengths) > facts.length:
        problems.append(f"longest series has {max(lengths)} steps, expected at most {facts.length}")
    return problems


def prepare(name: str, uea_dir: Path, offline: bool = False, fetchers=None) -> tuple[bool, str]:
    """Make `name` present and valid under `uea_dir`; return (ok, one-line status).

    Files downloaded before are first checked against the SHA-256 recorded beside them."""
    if has_files(uea_dir, name):
        origin = "already present"
        try:
            for split in SPLITS:
                verify_record(split_file(uea_dir, name, split), COMMAND)
        except ChecksumError as exc:
            return False, f"INVALID ({origin}): {exc}"
    else:
        bundled_root = aeon_bundled_data_dir()
        if bundled_root is not None and has_files(bundled_root, name):
            copy_bundled(name, uea_dir)
            origin = "copied from aeon's bundled data"
        elif offline:
            return False, "MISSING (--offline: no download attempted)"
        else:
            try:
                origin = f"downloaded via {download(name, uea_dir, fetchers)}"
            except RuntimeError as exc:
                return False, f"MISSING (download failed: {exc})"
            except ChecksumError as exc:
                return False, f"INVALID (download): {exc}"
    problems = validate(name, uea_dir)
    if problems:
        return False, (
            f"INVALID ({origin}): {'; '.join(problems)}. Delete {uea_dir / name} and run this command again."
        )
    return True, f"ok ({origin})"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the process exit status (0 when every requested dataset is present and valid)."""
    parser = argparse.ArgumentParser(prog="python -m tasks.uea.download", description=__doc__.splitlines()[0])
    parser.add_argument("--names", nargs="+", default=list(PAPER_DATASETS),
                        help="datasets to fetch (default: the paper's ten)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--data-dir", type=Path, help="data root, as $DATA_DIR; files go to <data-dir>/uea/<Name>/")
    target.add_argument("--uea-dir", type=Path, help="the UEA folder itself; files go to <uea-dir>/<Name>/")
    parser.add_argument("--offline", action="store_true", help="only use local and aeon-bundled files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    uea_dir = args.uea_dir or (args.data_dir / "uea" if args.data_dir else default_uea_dir())
    uea_dir = uea_dir.expanduser().resolve()
    log.info("UEA folder: %s", uea_dir)
    results = {}
    for name in args.names:
        if name not in KNOWN_DATASETS:
            log.warning("%s is not one of the known UEA datasets (%s)", name, ", ".join(KNOWN_DATASETS))
        results[name] = prepare(name, uea_dir, offline=args.offline)
        log.info("%s: %s", name, results[name][1])

    width = max(len(name) for name in results)
    print(f"\nUEA datasets under {uea_dir}:")
    for name, (_, status) in results.items():
        print(f"  {name:<{width}}  {status}")
    failed = [name for name, (ok, _) in results.items() if not ok]
    if failed:
        print(f"\n{len(failed)} of {len(results)} not ready: {' '.join(failed)}. Check the network, or place "
              f"<Name>_TRAIN.ts and <Name>_TEST.ts from the UEA archive under {uea_dir}/<Name>/ by hand.")
        return 1
    print(f"\nAll {len(results)} ready.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
