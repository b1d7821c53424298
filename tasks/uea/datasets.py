"""Facts about the UEA multivariate archive datasets the paper uses (and those aeon ships).

The numbers come from the UEA archive itself (listed in `results/paper/official_code.md` §3), not from the
Flowformer repository. `tasks.uea.download` checks every downloaded dataset against them.

This module imports nothing heavy (no aeon, no torch) so the download CLI and error paths stay fast.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UEADatasetFacts:
    """Sizes of one UEA dataset as published in the archive.

    `length` is the series length, or the maximum length over both splits when `equal_length` is False.
    `bundled_in_aeon` says whether the aeon package ships the `.ts` files (loadable with no network).
    """

    name: str
    n_train: int
    n_test: int
    n_dims: int
    length: int
    n_classes: int
    equal_length: bool = True
    bundled_in_aeon: bool = False
    in_paper: bool = True


# The paper's ten datasets (Table 4 of the Flowformer paper), in the order of results/paper/official_code.md §3.2's table.
PAPER_DATASETS: dict[str, UEADatasetFacts] = {
    f.name: f
    for f in (
        UEADatasetFacts("EthanolConcentration", 261, 263, 3, 1751, 4),
        UEADatasetFacts("FaceDetection", 5890, 3524, 144, 62, 2),
        UEADatasetFacts("Handwriting", 150, 850, 3, 152, 26),
        UEADatasetFacts("Heartbeat", 204, 205, 61, 405, 2),
        UEADatasetFacts("JapaneseVowels", 270, 370, 12, 29, 9, equal_length=False, bundled_in_aeon=True),
        UEADatasetFacts("PEMS-SF", 267, 173, 963, 144, 7),
        UEADatasetFacts("SelfRegulationSCP1", 268, 293, 6, 896, 2),
        UEADatasetFacts("SelfRegulationSCP2", 200, 180, 7, 1152, 2),
        UEADatasetFacts("SpokenArabicDigits", 6599, 2199, 13, 93, 10, equal_length=False),
        UEADatasetFacts("UWaveGestureLibrary", 120, 320, 3, 315, 8),
    )
}

# Multivariate datasets aeon bundles that the paper does not use; handy for offline tests and demos.
EXTRA_DATASETS: dict[str, UEADatasetFacts] = {
    "BasicMotions": UEADatasetFacts("BasicMotions", 40, 40, 6, 100, 4, bundled_in_aeon=True, in_paper=False),
}

KNOWN_DATASETS: dict[str, UEADatasetFacts] = {**PAPER_DATASETS, **EXTRA_DATASETS}


def aeon_bundled_data_dir() -> Path | None:
    """Folder holding aeon's bundled datasets (`aeon/datasets/data`), found without importing aeon.

    Returns None when aeon is not installed.
    """
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def split_file(root: Path, name: str, split: str) -> Path:
    """Path `<root>/<name>/<name>_<split>.ts`, the archive's layout (split is TRAIN or TEST)."""
    return Path(root) / name / f"{name}_{split}.ts"


def _is_classification_file(path: Path) -> bool:
    """True when the `.ts` header says `@classLabel true` (aeon also bundles regression problems)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            words = line.strip().lower().split()
            if not words or words[0].startswith("#"):
                continue
            if words[0] == "@classlabel":
                return len(words) > 1 and words[1] == "true"
            if words[0] == "@data":
                break
    return False


def datasets_in(root: Path | None) -> list[str]:
    """Names of the classification datasets under `root` that have both a TRAIN and a TEST `.ts` file."""
    if root is None or not Path(root).is_dir():
        return []
    names = []
    for folder in sorted(Path(root).iterdir()):
        train, test = split_file(root, folder.name, "TRAIN"), split_file(root, folder.name, "TEST")
        if train.is_file() and test.is_file() and _is_classification_file(train):
            names.append(folder.name)
    return names


def bundled_datasets() -> list[str]:
    """Classification datasets that the installed aeon ships (loadable with no network)."""
    return datasets_in(aeon_bundled_data_dir())
