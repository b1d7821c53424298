"""Fetch and check WikiText-103 (or WikiText-2): `python -m tasks.wikitext103.download [--dataset wikitext-103]`.

In order, until one works: keep the `wiki.{train,valid,test}.tokens` files already in `$DATA_DIR/<dataset>/`; else
download the official zip (its mirror first, then the original address) and unpack the three files there; else
download the Hugging Face `Salesforce/wikitext` Parquet files into the local Hugging Face cache, which the loader
reads when the folder is absent (`data.source=auto`). Then the corpus is tokenised into its cache exactly as
training does, which checks WikiText-103's known sizes. The exit status is non-zero when nothing could be fetched or
the check failed; without network, the message says which file to put where.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tasks.wikitext103.cache import cache_dir_of, load_or_build
from tasks.wikitext103.corpus import (
    HF_CONFIGS,
    HF_REPO,
    SPLITS,
    MissingSplitError,
    data_root_from_env,
    find_source,
    split_file,
)

log = logging.getLogger("tasks.wikitext103.download")

ZIP_NAMES = {"wikitext-103": "wikitext-103-v1.zip", "wikitext-2": "wikitext-2-v1.zip"}
ZIP_MIRRORS = ("https://wikitext.smerity.com/{name}", "https://s3.amazonaws.com/research.metamind.io/wikitext/{name}")


def fetch_zip(dataset: str, data_dir: Path) -> None:
    """Download the official zip and move its three `.tokens` files into `data_dir/<dataset>/`."""
    name = ZIP_NAMES[dataset]
    errors = []
    with tempfile.TemporaryDirectory(dir=data_dir) as staging:
        archive = Path(staging) / name
        for url in (mirror.format(name=name) for mirror in ZIP_MIRRORS):
            try:
                log.info("downloading %s", url)
                with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                    shutil.copyfileobj(response, out)
                break
            except OSError as error:
                errors.append(f"{url}: {error}")
        else:
            raise OSError("; ".join(errors))
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(staging)
        (data_dir / dataset).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            found = sorted(Path(staging).rglob(split_file(Path(), dataset, split).name))
            if not found:
                raise FileNotFoundError(f"{name} holds no wiki.{split}.tokens")
            shutil.move(str(found[0]), split_file(data_dir, dataset, split))


def fetch_hf(dataset: str) -> None:
    """Download the HF Parquet files of `dataset` into the local Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError("the Hugging Face download needs the `lm` extra: pip install -e '.[lm]'") from error
    snapshot_download(HF_REPO, repo_type="dataset", allow_patterns=f"{HF_CONFIGS[dataset]}/*")


def prepare(dataset: str, data_dir: Path, check_only: bool = False) -> str:
    """Fetch (unless present or `check_only`) and tokenise `dataset`; returns where it was found."""
    try:
        source = find_source(data_dir, dataset)
    except MissingSplitError:
        if check_only or dataset not in ZIP_NAMES:
            raise
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fetch_zip(dataset, data_dir)
        except (OSError, zipfile.BadZipFile) as zip_error:
            log.warning("the zip download failed (%s); trying the Hugging Face files", zip_error)
            try:
                fetch_hf(dataset)
            except Exception as hf_error:
                raise MissingSplitError(
                    f"could not fetch {dataset}: zip: {zip_error}; Hugging Face: {hf_error}. Without network, "
                    f"download {ZIP_MIRRORS[0].format(name=ZIP_NAMES[dataset])} elsewhere and unpack "
                    f"wiki.{{train,valid,test}}.tokens into {data_dir / dataset}/"
                ) from hf_error
        source = find_source(data_dir, dataset)
    corpus = load_or_build(source, cache_dir_of(data_dir, dataset))
    sizes = ", ".join(f"{split} {corpus.streams[split].size:,}" for split in SPLITS)
    return f"{dataset} ({source.kind}: {source.describe('train')}): {sizes} tokens, vocabulary {len(corpus.dictionary):,}"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m tasks.wikitext103.download", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="wikitext-103", help="wikitext-103 | wikitext-2 | another folder name")
    parser.add_argument("--data-dir", type=Path, default=None, help="data root (default $DATA_DIR, else data/)")
    parser.add_argument("--check", action="store_true", help="only check and tokenise what is on disk")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or data_root_from_env()
    try:
        print(prepare(args.dataset, data_dir, args.check))
    except (MissingSplitError, ValueError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
