"""UEA multivariate time-series classification data: `.ts` reading (via aeon), preprocessing, DataModule.

Preprocessing follows the official Flowformer_TimeSeries code (results/paper/official_code.md §3.1-3.2) with one fix:
series are padded to the longest series of *either* split, whereas the official code pads/truncates to the
longest TRAIN series and so cuts test series that are longer (JapaneseVowels loses steps 27-29 of one case).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from results.run_record import checked_selection, validates_on_test
from tasks.common.datamodule import DataStatus, TaskDataModule
from tasks.uea.datasets import (
    KNOWN_DATASETS,
    aeon_bundled_data_dir,
    bundled_datasets,
    datasets_in,
    split_file,
)

log = logging.getLogger(__name__)

SPLITS = ("TRAIN", "TEST")
# The official code divides by (std + eps) with numpy's float64 epsilon.
STD_EPS = float(np.finfo(np.float64).eps)
SOURCE_DATA_DIR = "data_dir"
SOURCE_BUNDLED = "aeon_bundled"


class UEADataError(Exception):
    """Base class for UEA data problems (missing files, unknown names, malformed files)."""


class UEADatasetNotFoundError(UEADataError, FileNotFoundError):
    """A known dataset whose `.ts` files are neither under data_dir nor bundled with aeon."""


class UnknownUEADatasetError(UEADataError, ValueError):
    """A dataset name that is not a known UEA dataset and has no files anywhere."""


class MalformedTsFileError(UEADataError, ValueError):
    """A `.ts` file that aeon cannot read or whose content contradicts its header.

    Attributes: `path` (the file), `line` (1-based line number of the first offending line, or None when it
    could not be located), `reason`.
    """

    def __init__(self, path: Path, line: int | None, reason: str, hint: str = "") -> None:
        self.path, self.line, self.reason = Path(path), line, reason
        where = f"line {line}" if line is not None else "line unknown"
        super().__init__(f"Malformed .ts file {self.path} ({where}): {reason}{hint}")


def _download_hint(name: str, data_dir: Path) -> str:
    return (
        f"Run `make data-uea` (all ten paper datasets into $DATA_DIR/uea) or "
        f"`python -m tasks.uea.download --names {name} --uea-dir {data_dir}`."
    )


# --------------------------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetFiles:
    """The two `.ts` files a run reads and where they came from (`data_dir` or `aeon_bundled`)."""

    train: Path
    test: Path
    source: str


def available_datasets(data_dir: Path | str) -> dict[str, str]:
    """Datasets loadable right now: name -> "data_dir" or "aeon_bundled" (data_dir wins when both)."""
    found = {name: SOURCE_BUNDLED for name in bundled_datasets()}
    found.update({name: SOURCE_DATA_DIR for name in datasets_in(Path(data_dir))})
    return dict(sorted(found.items()))


def _describe_available(data_dir: Path) -> str:
    on_disk = datasets_in(data_dir)
    bundled = [n for n in bundled_datasets() if n not in on_disk]
    return (
        f"Available under {data_dir}: {', '.join(on_disk) or 'none'}. "
        f"Bundled with aeon (no download needed): {', '.join(bundled) or 'none'}."
    )


def resolve_dataset_files(name: str, data_dir: Path | str, train_split: str = "TRAIN") -> DatasetFiles:
    """Find `<name>_{train_split,TEST}.ts` under `data_dir/<name>/`, else in aeon's bundled copy.

    Raises UnknownUEADatasetError for a name that is neither a known UEA dataset nor present anywhere, and
    UEADatasetNotFoundError (a FileNotFoundError) for a known dataset whose files are missing.
    """
    data_dir = Path(data_dir).expanduser()
    if train_split not in SPLITS:
        raise ValueError(f"train_file_pattern must be one of {SPLITS}, got {train_split!r}")
    local = {"train": split_file(data_dir, name, train_split), "test": split_file(data_dir, name, "TEST")}
    if all(p.is_file() for p in local.values()):
        log.info("UEA %s: reading %s and %s", name, local["train"], local["test"])
        return DatasetFiles(local["train"], local["test"], SOURCE_DATA_DIR)

    bundled_root = aeon_bundled_data_dir()
    if bundled_root is not None:
        bundled = {"train": split_file(bundled_root, name, train_split), "test": split_file(bundled_root, name, "TEST")}
        if all(p.is_file() for p in bundled.values()):
            partial = [str(p) for p in local.values() if p.is_file()]
            if partial:
                log.warning("UEA %s: %s present but incomplete; using aeon's bundled copy instead", name, partial)
            log.info("UEA %s: not under %s, using aeon's bundled copy %s", name, data_dir, bundled["train"].parent)
            return DatasetFiles(bundled["train"], bundled["test"], SOURCE_BUNDLED)

    if name not in KNOWN_DATASETS and not (data_dir / name).is_dir():
        known = sorted(set(KNOWN_DATASETS) | set(available_datasets(data_dir)))
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        suggestion = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownUEADatasetError(
            f"Unknown UEA dataset {name!r} (data.dataset).{suggestion} Known datasets: {', '.join(known)}. "
            f"{_describe_available(data_dir)}"
        )
    missing = [str(p) for p in local.values() if not p.is_file()]
    raise UEADatasetNotFoundError(
        f"UEA dataset {name!r} not found: missing {' and '.join(missing)}. {_describe_available(data_dir)} "
        f"{_download_hint(name, data_dir)}"
    )


# --------------------------------------------------------------------------------------------------------------
# Reading one .ts file
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TsSplit:
    """One `.ts` file as loaded: `series[i]` is float64 (T_i, C); `labels[i]` the class name (as aeon gives it)."""

    path: Path
    series: list[np.ndarray]
    labels: list[str]


def _read_header(path: Path) -> tuple[dict, int | None]:
    """Header fields this module checks, and the 1-based line number of `@data` (None when absent)."""
    header = {"dimensions": None, "equallength": None, "serieslength": None, "timestamps": False,
              "classlabel": True, "class_values": None, "targetlabel": False}
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            words = raw.strip().lower().split()
            if not words or words[0].startswith("#"):
                continue
            key, args = words[0][1:], words[1:]
            if key == "data":
                return header, number
            if key in ("dimensions", "serieslength") and args:
                header[key] = int(args[0]) if args[0].isdigit() else args[0]
            elif key in ("equallength", "timestamps", "targetlabel") and args:
                header[key] = args[0] == "true"
            elif key == "classlabel" and args:
                header["classlabel"] = args[0] == "true"
                header["class_values"] = args[1:] if args[0] == "true" else None
    return header, None


def locate_malformed_line(path: Path | str) -> tuple[int, str] | None:
    """First line of a `.ts` file that breaks the format or contradicts its header, as (line number, reason).

    A checker, not a reader: it is only run after aeon has failed (or returned something inconsistent), to
    tell the user *where* the problem is, because aeon reports case numbers or nothing at all.
    Returns None when no offending line is found.
    """
    path = Path(path)
    header, data_line = _read_header(path)
    if data_line is None:
        n_lines = _count_lines(path)
        return (max(n_lines, 1), "no @data line: the header never ends" if n_lines else "the file is empty")
    if isinstance(header["dimensions"], str) or isinstance(header["serieslength"], str):
        return (data_line, "@dimensions and @seriesLength must be integers")
    if header["timestamps"]:
        return None  # timestamped cases are not used by the UEA archive; not checked here
    has_target = bool(header["classlabel"] or header["targetlabel"])
    class_values = set(header["class_values"] or []) if header["classlabel"] else set()
    expected_dims, expected_len, n_cases, number = header["dimensions"], header["serieslength"], 0, data_line

    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if number <= data_line:
                continue
            line = raw.strip()
            if not line:
                return number, "empty line after @data (every line must hold exactly one case)"
            n_cases += 1
            fields = line.split(":")
            channels = fields[:-1] if has_target else fields
            if expected_dims is None:
                expected_dims = len(channels)
            if len(channels) != expected_dims:
                return number, (
                    f"case has {len(channels)} dimension(s) but {expected_dims} expected (@dimensions or first "
                    f"case); dimensions are separated by ':' and the label comes last"
                )
            lengths = []
            for dim, channel in enumerate(channels):
                values = channel.split(",")
                for value in values:
                    token = value.strip().lower()
                    if token in ("?", "nan"):
                        continue
                    try:
                        float(token)
                    except ValueError:
                        return number, f"value {value.strip()!r} in dimension {dim} is not a number ('?' marks missing)"
                lengths.append(len(values))
            if len(set(lengths)) > 1:
                return number, f"dimensions of one case have different lengths {lengths}"
            if header["equallength"]:
                expected_len = expected_len if expected_len is not None else lengths[0]
                if lengths[0] != expected_len:
                    return number, f"series length {lengths[0]} but @equalLength true with length {expected_len}"
            if class_values and fields[-1].strip().lower() not in class_values:
                label = fields[-1].strip()
                return number, f"label {label!r} is not one of the @classLabel values {sorted(class_values)}"
    if n_cases == 0:
        return number, "no cases after @data"
    return None


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for _ in handle)


def _malformed(path: Path, detail: str, name: str | None = None) -> MalformedTsFileError:
    try:
        located = locate_malformed_line(path)
    except UnicodeDecodeError:
        located = None  # not UTF-8 text at all; aeon's message is all we have
    hint = f". Fix the file or re-download it: `python -m tasks.uea.download --names {name}`." if name else ""
    if located is None:
        return MalformedTsFileError(path, None, detail, hint)
    line, reason = located
    return MalformedTsFileError(path, line, f"{reason} [aeon: {detail}]" if detail else reason, hint)


def read_ts_file(path: Path | str, name: str | None = None) -> TsSplit:
    """Read a classification `.ts` file with aeon's `load_from_ts_file`.

    Returns a TsSplit whose series are float64 (T_i, C) with NaN for missing values. Raises
    MalformedTsFileError naming the file and the first offending line when aeon fails, when the file holds
    no cases, or when the content contradicts the header (aeon itself checks neither @dimensions nor labels).
    """
    from aeon.datasets import load_from_ts_file  # aeon takes seconds to import; only pay for it when reading

    path = Path(path)
    try:
        data, labels, meta = load_from_ts_file(str(path), return_meta_data=True)
    except (OSError, ValueError, IndexError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise _malformed(path, f"{type(exc).__name__}: {exc}", name) from exc
    if not meta.get("classlabel"):
        raise UEADataError(f"{path} is not a classification problem (its header has no `@classLabel true`)")
    if len(labels) == 0:
        raise _malformed(path, "", name)

    # aeon returns (N, C, T) for equal-length files and a list of (C, T_i) otherwise; use (T_i, C) throughout.
    series = [np.asarray(case, dtype=np.float64).T for case in data]
    labels = [str(label) for label in labels]
    header, _ = _read_header(path)
    n_dims = {s.shape[1] for s in series}
    wrong_dims = isinstance(header["dimensions"], int) and n_dims != {header["dimensions"]}
    wrong_labels = meta.get("class_values") and not set(labels) <= set(meta["class_values"])
    if wrong_dims or wrong_labels:
        raise _malformed(path, "content contradicts the header", name)
    return TsSplit(path=path, series=series, labels=labels)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------


def interpolate_missing(series: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaNs of one case along time, per channel; edges take the nearest value.

    series: (T, C). Returns a new (T, C) array. Matches pandas `interpolate(limit_direction="both")` as in
    the official code. A channel with no finite value stays NaN.
    """
    out = np.array(series, dtype=np.float64, copy=True)
    steps = np.arange(out.shape[0])
    for channel in range(out.shape[1]):
        column = out[:, channel]
        missing = np.isnan(column)
        if missing.any() and not missing.all():
            column[missing] = np.interp(steps[missing], steps[~missing], column[~missing])
    return out


def fit_standardiser(series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (ddof=1) over all time steps of all given cases (each (T_i, C)).

    Returns (mean, std), each (C,). Padding never enters: the cases are concatenated at their real lengths.
    """
    stacked = np.concatenate(series, axis=0)
    if stacked.shape[0] < 2:
        raise ValueError("need at least two time steps in the training part to estimate a std (ddof=1)")
    return np.nanmean(stacked, axis=0), np.nanstd(stacked, axis=0, ddof=1)


def pad_cases(series: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad cases at the end to `max_len`.

    series: list of (T_i, C) with T_i <= max_len. Returns x (N, max_len, C) float32 and padding_mask
    (N, max_len) bool, True at padded steps.
    """
    n_dims = series[0].shape[1]
    x = np.zeros((len(series), max_len, n_dims), dtype=np.float32)
    padding_mask = np.ones((len(series), max_len), dtype=bool)
    for i, case in enumerate(series):
        if case.shape[0] > max_len:
            raise ValueError(f"case {i} has {case.shape[0]} steps, more than max_len={max_len}")
        x[i, : case.shape[0]] = case
        padding_mask[i, : case.shape[0]] = False
    return x, padding_mask


class UEACaseDataset(Dataset):
    """Padded cases; item i is {"x": (T, C) float32, "padding_mask": (T,) bool, "target": () int64}."""

    def __init__(self, x: np.ndarray, padding_mask: np.ndarray, target: np.ndarray) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.padding_mask = torch.from_numpy(np.ascontiguousarray(padding_mask, dtype=bool))
        self.target = torch.from_numpy(np.asarray(target, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "padding_mask": self.padding_mask[index], "target": self.target[index]}


def extents(padding_mask: torch.Tensor) -> torch.Tensor:
    """(N,) int64: the steps of each row of a (N, T) padding mask up to its last real one (0 for padding only)."""
    real = ~padding_mask
    return torch.where(real.any(1), real.shape[1] - real.flip(1).int().argmax(1), 0)


def collate_to_longest(cases: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack cases into a batch and cut the steps that are padding in every case of it (at the end): the batch is
    as long as its longest series."""
    batch = default_collate(cases)
    length = max(int(extents(batch["padding_mask"]).max()), 1)
    if length < batch["x"].shape[1]:
        batch["x"] = batch["x"][:, :length].contiguous()
        batch["padding_mask"] = batch["padding_mask"][:, :length].contiguous()
    return batch


# --------------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------------


class UEADataModule(TaskDataModule):
    """One UEA dataset, preprocessed as in the official code (see module docstring).

    Batches are {"x": float32 (B, T, C), "padding_mask": bool (B, T) True = padding, "target": int64 (B,)}: of
    `batch_size` series for training, of `eval_batch_size` (default `batch_size`) for validation and test, where each
    series is scored on its own, so that the batch changes the speed and not the scores. T is the longest series
    of both splits (`max_len`), or with `trim_padding` the longest series of the batch, and evaluation then visits
    the series from the shortest up, so that its batches are short too. The model treats a shorter batch as padded
    to `max_len` (`TimeSeriesClassifier`): cutting changes the work, not the function; dropout draws its masks over
    the shorter batch, so a seed's masks are not those of the padded batch.
    `selection="best_test"` (the paper's protocol) validates on the TEST set; `"holdout_val"` and `"final"`
    validate on a seeded stratified `val_fraction` split of TRAIN and fit the normalisation on the rest. The test loader
    is always TEST. `train_file_pattern` picks the training file: "TRAIN" (always, for the paper's results) or
    "TEST" (only to study the official SpokenArabicDigits script, which may have trained on the TEST file).
    After `setup()`, `model_dims()` gives the model's sizes and `data_info` records what was used.
    """

    def __init__(
        self,
        dataset: str,
        data_dir: str,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        selection: str = "best_test",
        val_fraction: float = 0.2,
        seed: int = 0,
        train_file_pattern: str = "TRAIN",
        trim_padding: bool = True,
    ) -> None:
        super().__init__()
        checked_selection(selection)
        if train_file_pattern not in SPLITS:
            raise ValueError(f"data.train_file_pattern must be one of {SPLITS}, got {train_file_pattern!r}")
        if not validates_on_test(selection) and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters(logger=False)
        self.dataset = dataset
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = num_workers
        self.pin_batches = bool(pin_memory)
        self.selection = selection
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_file_pattern = train_file_pattern
        self.trim_padding = bool(trim_padding)
        # Kept out of data_info (metrics.json) because they grow with the dataset; tests and analyses read them.
        self.feature_mean: np.ndarray | None = None  # (C,)
        self.feature_std: np.ndarray | None = None  # (C,), ddof=1
        self.split_indices: dict[str, np.ndarray] = {}  # rows of the training file in the train / val parts
        self._splits: dict[str, UEACaseDataset] | None = None
        self._dims: dict[str, int] | None = None

    def data_status(self) -> DataStatus:
        """Available when both `.ts` files are under `data_dir/<Name>/` or bundled with aeon."""
        try:
            files = resolve_dataset_files(self.dataset, self.data_dir, self.train_file_pattern)
        except UEADataError as error:
            return DataStatus(False, str(error))
        where = "bundled with aeon" if files.source == SOURCE_BUNDLED else f"found in {files.train.parent}"
        return DataStatus(True, where)

    def prepare_data(self) -> None:
        """Check that both files can be found (raises a clear error otherwise); downloads nothing."""
        resolve_dataset_files(self.dataset, self.data_dir, self.train_file_pattern)

    def setup(self, stage: str | None = None) -> None:
        """Load, interpolate, normalise and pad once; later calls do nothing."""
        if self._splits is not None:
            return
        # The official SpokenArabicDigits run passed no --pattern, so its "training" file was glob()[0] of
        # both .ts files and may have been TEST. We read the TRAIN file unless told otherwise.
        if self.train_file_pattern != "TRAIN":
            log.warning("UEA %s: training on the %s file (train_file_pattern)", self.dataset, self.train_file_pattern)
        files = resolve_dataset_files(self.dataset, self.data_dir, self.train_file_pattern)
        train = read_ts_file(files.train, self.dataset)
        test = read_ts_file(files.test, self.dataset)
        if train.series[0].shape[1] != test.series[0].shape[1]:
            raise UEADataError(
                f"{files.train} has {train.series[0].shape[1]} dimensions but {files.test} has "
                f"{test.series[0].shape[1]}; the two files do not belong together"
            )

        # Codes come from the sorted TRAIN class names (pandas categorical order in the official code).
        classes = sorted(set(train.labels))
        unseen = sorted(set(test.labels) - set(classes))
        if unseen:
            raise UEADataError(
                f"{files.test} has labels {unseen} that never occur in {files.train} (classes {classes}); "
                f"a classifier trained on that file cannot predict them"
            )
        code_of = {label: code for code, label in enumerate(classes)}
        train_y = np.array([code_of[label] for label in train.labels], dtype=np.int64)
        test_y = np.array([code_of[label] for label in test.labels], dtype=np.int64)

        n_missing = int(sum(np.isnan(s).sum() for s in train.series + test.series))
        train_x = [interpolate_missing(s) for s in train.series]
        test_x = [interpolate_missing(s) for s in test.series]

        fit_idx = np.arange(len(train_x))
        val_idx = np.array([], dtype=np.int64)
        if not validates_on_test(self.selection):
            fit_idx, val_idx = self._holdout_split(train_y, files.train)

        mean, std = fit_standardiser([train_x[i] for i in fit_idx])
        constant = np.flatnonzero(std == 0).tolist()
        if constant:
            log.warning("UEA %s: features %s are constant in the training part", self.dataset, constant)

        def normalise(case: np.ndarray) -> np.ndarray:
            # A channel that is NaN throughout one case stays NaN after interpolation; 0 is its feature mean.
            return np.nan_to_num((case - mean) / (std + STD_EPS), nan=0.0)

        train_x = [normalise(s) for s in train_x]
        test_x = [normalise(s) for s in test_x]
        # Longest series of EITHER file: the official code used the TRAIN maximum and truncated test cases.
        max_len = max(s.shape[0] for s in train_x + test_x)

        def build(cases: list[np.ndarray], targets: np.ndarray) -> UEACaseDataset:
            x, padding_mask = pad_cases(cases, max_len)
            return UEACaseDataset(x, padding_mask, targets)

        splits = {
            "train": build([train_x[i] for i in fit_idx], train_y[fit_idx]),
            "test": build(test_x, test_y),
        }
        if not validates_on_test(self.selection):
            splits["val"] = build([train_x[i] for i in val_idx], train_y[val_idx])

        feat_dim = int(train_x[0].shape[1])
        self._dims = {"feat_dim": feat_dim, "num_classes": len(classes), "max_len": int(max_len)}
        self.data_info = {
            "dataset": self.dataset,
            "source": files.source,
            "train_path": str(files.train),
            "test_path": str(files.test),
            "train_file": self.train_file_pattern,
            "selection": self.selection,
            "val_source": "TEST" if validates_on_test(self.selection) else f"stratified {self.val_fraction:g} of TRAIN",
            "val_fraction": self.val_fraction if not validates_on_test(self.selection) else None,
            "split_seed": self.seed if not validates_on_test(self.selection) else None,
            "n_train": len(splits["train"]),
            "n_val": len(splits["val"]) if "val" in splits else len(splits["test"]),
            "n_test": len(splits["test"]),
            "classes": classes,
            "feat_dim": feat_dim,
            "max_len": int(max_len),
            "max_len_train_file": max(s.shape[0] for s in train.series),
            "max_len_test_file": max(s.shape[0] for s in test.series),
            "missing_values_interpolated": n_missing,
            "normalisation": "per-feature (x - mean) / (std_ddof1 + eps), fitted on the training part",
        }
        self.feature_mean, self.feature_std = mean, std
        self.split_indices = {"train": fit_idx, "val": val_idx}
        self._splits = splits

    def _holdout_split(self, targets: np.ndarray, train_path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Seeded stratified split of TRAIN indices into (fit, val), each sorted."""
        from sklearn.model_selection import train_test_split

        try:
            fit_idx, val_idx = train_test_split(
                np.arange(len(targets)),
                test_size=self.val_fraction,
                stratify=targets,
                random_state=self.seed,
                shuffle=True,
            )
        except ValueError as exc:
            raise UEADataError(
                f"cannot hold out a stratified data.val_fraction={self.val_fraction} of {train_path} "
                f"({len(targets)} cases, class counts {np.bincount(targets).tolist()}): {exc}. "
                f"Use a larger val_fraction or selection=best_test."
            ) from exc
        return np.sort(fit_idx), np.sort(val_idx)

    def model_dims(self) -> dict[str, int]:
        """{"feat_dim": C, "num_classes": K, "max_len": T} for the model constructor (after setup())."""
        if self._dims is None:
            raise RuntimeError("UEADataModule.model_dims() needs setup() to have run first")
        return dict(self._dims)

    def module_dims(self) -> dict[str, int]:
        """{"num_classes": K} for the classification module (after setup())."""
        return {"num_classes": self.model_dims()["num_classes"]}

    def _split(self, name: str) -> UEACaseDataset:
        if self._splits is None:
            raise RuntimeError(f"UEADataModule: call setup() before asking for the {name} loader")
        return self._splits[name]

    def _loader(self, dataset: UEACaseDataset, shuffle: bool = False) -> DataLoader:
        # drop_last=False as in the official code; evaluation loaders take each series once, also under DDP
        options = {"seed": self.seed, "drop_last": False, "num_workers": self.num_workers,
                   "pin_memory": self.pin_memory(self.pin_batches), "persistent_workers": self.num_workers > 0}
        if self.trim_padding:
            options["collate_fn"] = collate_to_longest
        if shuffle:
            return self.loader(dataset, shuffle=True, batch_size=self.batch_size, **options)
        # trimmed evaluation visits the series from the shortest up, so that every batch is cut
        order = torch.argsort(extents(dataset.padding_mask), stable=True).tolist() if self.trim_padding else None
        return self.evaluation_loader(dataset, batch_size=self.eval_batch_size, order=order, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._split("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        # best_test: the paper selects its reported number on the TEST set, so validation *is* the test set.
        return self._loader(self._split("test" if validates_on_test(self.selection) else "val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"))
