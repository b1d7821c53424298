"""Fetch and check WikiText-103 (or WikiText-2): `python -m tasks.wikitext103.download [--dataset wikitext-103]`.

In order, until one works: keep the `wiki.{train,valid,test}.tokens` files already in `$DATA_DIR/<dataset>/`; else
download the official zip (its mirror first, then the original address) into `$DATA_DIR/<dataset>/downloads/` and
unpack the three files; else download the Hugging Face `Salesforce/wikitext` Parquet files into the local Hugging
Face cache, which the loader reads when the folder is absent (`data.source=auto`). Then the corpus is tokenised into
its cache exactly as training does, which checks WikiText-103's known sizes.

The zip is fetched by `tasks.common.download` (progress bar, resume of an interrupted download) and must have the
size and SHA-256 that Hugging Face's `datasets` records for it; a mismatch is an error, not a reason to fall back.
The Parquet files are checked against the SHA-256 the Hub publishes for each (`huggingface_hub`'s
`verify_repo_checksums`). The exit status is non-zero when nothing could be fetched or a check failed; without
network, the message says which file to put where.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from results.roots import data_root
from tasks.common.download import ChecksumError, Source, fetch
from tasks.wikitext103.cache import cache_dir_of, load_or_build
from tasks.wikitext103.corpus import (
    HF_CONFIGS,
    HF_REPO,
    SPLITS,
    MissingSplitError,
    find_source,
    split_file,
)

log = logging.getLogger("tasks.wikitext103.download")

COMMAND = "make data-wikitext103"
ZIP_NAMES = {"wikitext-103": "wikitext-103-v1.zip", "wikitext-2": "wikitext-2-v1.zip"}
ZIP_MIRRORS = ("https://wikitext.smerity.com/{name}", "https://s3.amazonaws.com/research.metamind.io/wikitext/{name}")
# (bytes, SHA-256) of each zip, as Hugging Face's `datasets` records them (its wikitext dataset_infos.json)
ZIP_CHECKSUMS = {
    "wikitext-103": (190_229_076, "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590"),
    "wikitext-2": (4_475_746, "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c"),
}


def zip_source(dataset: str) -> Source:
    """The official zip of `dataset` as a download: its mirrors, size and hash."""
    name = ZIP_NAMES[dataset]
    size, sha256 = ZIP_CHECKSUMS.get(dataset, (None, None))
    urls = tuple(mirror.format(name=name) for mirror in ZIP_MIRRORS)
    return Source(name, urls, size=size, sha256=sha256, origin="as Hugging Face's `datasets` records it")


def fetch_zip(dataset: str, data_dir: Path) -> None:
    """Download the official zip and move its three `.tokens` files into `data_dir/<dataset>/`.

    The zip is deleted once unpacked; its SHA-256 record stays in `data_dir/<dataset>/downloads/`."""
    archive = fetch(zip_source(dataset), data_dir / dataset / "downloads", COMMAND)
    with tempfile.TemporaryDirectory(dir=data_dir) as staging:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(staging)
        for split in SPLITS:
            found = sorted(Path(staging).rglob(split_file(Path(), dataset, split).name))
            if not found:
                raise FileNotFoundError(f"{archive} holds no wiki.{split}.tokens")
            shutil.move(str(found[0]), split_file(data_dir, dataset, split))
    archive.unlink()


def fetch_hf(dataset: str) -> None:
    """Download the HF Parquet files of `dataset` into the local Hugging Face cache and check them against the
    SHA-256 the Hub publishes for each; raises ChecksumError naming a file that differs."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError("the Hugging Face download needs the `lm` extra: pip install -e '.[lm]'") from error
    config = HF_CONFIGS[dataset]
    snapshot_download(HF_REPO, repo_type="dataset", allow_patterns=f"{config}/*")
    try:
        from huggingface_hub import verify_repo_checksums
    except ImportError:
        log.warning(
            "this huggingface_hub has no verify_repo_checksums: the Parquet files are not checked against the Hub's "
            "hashes (upgrade huggingface_hub to check them)"
        )
        return
    result = verify_repo_checksums(HF_REPO, repo_type="dataset")
    wrong = [m for m in result.mismatches if m["path"].startswith(f"{config}/")]
    if wrong:
        cache = result.verified_path.parent.parent
        found = "; ".join(
            f"{result.verified_path / m['path']}: {m['algorithm']} is {m['actual']}, expected {m['expected']}"
            for m in wrong
        )
        raise ChecksumError(
            f"{found} (the Hugging Face Hub's hash). Delete {cache} and run `{COMMAND}` to download it again."
        )


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
    data_dir = args.data_dir or data_root()
    try:
        print(prepare(args.dataset, data_dir, args.check))
    except (MissingSplitError, ValueError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
