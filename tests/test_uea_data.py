"""UEA data: aeon-based reading, preprocessing, DataModule, errors, sampler, fixtures and the download CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tasks.common.sampling import EpochSeededSampler
from tasks.uea import download
from tasks.uea.data import (
    STD_EPS,
    MalformedTsFileError,
    UEADataError,
    UEADataModule,
    UEADatasetNotFoundError,
    UnknownUEADatasetError,
    interpolate_missing,
    read_ts_file,
)
from tasks.uea.datasets import PAPER_DATASETS, aeon_bundled_data_dir, bundled_datasets, split_file
from tests.fixtures.uea import write_fixture, write_ts_file, write_uea_dataset


def make_dm(data_dir: Path, dataset: str, **kwargs) -> UEADataModule:
    dm = UEADataModule(dataset=dataset, data_dir=str(data_dir / "uea"), batch_size=4, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def real_lengths(mask: torch.Tensor) -> torch.Tensor:
    return (~mask).sum(dim=1)


# --------------------------------------------------------------------------------------------------------------
# The bundled JapaneseVowels: no network, real sizes, no truncation
# --------------------------------------------------------------------------------------------------------------


def test_aeon_bundles_japanese_vowels_for_the_demo():
    """`make demo` and the committed JapaneseVowels row need no download: aeon must ship the dataset. Fails (never
    skips) if an aeon upgrade drops it: pin aeon in constraints.txt to a release that bundles it."""
    assert "JapaneseVowels" in bundled_datasets(), "the installed aeon does not bundle JapaneseVowels (make demo)"


@pytest.fixture(scope="module")
def japanese_vowels(tmp_path_factory) -> UEADataModule:
    return make_dm(tmp_path_factory.mktemp("empty"), "JapaneseVowels")


def test_bundled_japanese_vowels_loads_without_network(japanese_vowels):
    dm = japanese_vowels
    assert dm.data_info["source"] == "aeon_bundled"
    assert Path(dm.data_info["train_path"]).is_relative_to(aeon_bundled_data_dir())
    assert (dm.data_info["n_train"], dm.data_info["n_test"]) == (270, 370)
    assert dm.model_dims() == {"feat_dim": 12, "num_classes": 9, "max_len": 29}
    # The longest series lies in TEST; the official code (train max = 26) would have cut it.
    assert dm.data_info["max_len_train_file"] < dm.data_info["max_len_test_file"] == 29


def test_japanese_vowels_longest_test_series_keeps_every_step(japanese_vowels):
    dm = japanese_vowels
    raw_train = read_ts_file(dm.data_info["train_path"])
    raw_test = read_ts_file(dm.data_info["test_path"])
    test_set = dm.test_dataloader().dataset
    lengths = np.array([s.shape[0] for s in raw_test.series])
    np.testing.assert_array_equal(real_lengths(test_set.padding_mask).numpy(), lengths)

    stacked = np.concatenate(raw_train.series)
    mean, std = stacked.mean(axis=0), stacked.std(axis=0, ddof=1)
    longest = int(np.argmax(lengths))
    expected = (raw_test.series[longest] - mean) / (std + STD_EPS)
    np.testing.assert_allclose(test_set.x[longest].numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trim_padding", [True, False])
def test_batches_have_the_contract_shapes_and_dtypes(tmp_path, trim_padding):
    dm = make_dm(tmp_path, "JapaneseVowels", trim_padding=trim_padding)
    batch = next(iter(dm.train_dataloader()))
    # cut to the batch's longest series, or padded to the longest of both splits
    length = int(real_lengths(batch["padding_mask"]).max()) if trim_padding else 29
    assert set(batch) == {"x", "padding_mask", "target"}
    assert batch["x"].dtype == torch.float32 and batch["x"].shape == (4, length, 12)
    assert batch["padding_mask"].dtype == torch.bool and batch["padding_mask"].shape == (4, length)
    assert batch["target"].dtype == torch.int64 and batch["target"].shape == (4,)
    assert isinstance(dm.train_dataloader().sampler, EpochSeededSampler)


def test_trimmed_batches_hold_the_same_series_and_score_the_same(tmp_path):
    """With trim_padding, training draws the same series per batch, each batch as long as its longest series;
    evaluation visits every series once, from the shortest up; and the model scores the test set as it does the
    batches padded to max_len."""
    from flowformer.models import TimeSeriesClassifier

    cut, padded = (make_dm(tmp_path, "JapaneseVowels", eval_batch_size=64, trim_padding=trim) for trim in (True, False))
    for cut_batch, padded_batch in zip(cut.train_dataloader(), padded.train_dataloader(), strict=True):
        length = cut_batch["x"].shape[1]
        assert length == int(real_lengths(padded_batch["padding_mask"]).max())
        torch.testing.assert_close(cut_batch["x"], padded_batch["x"][:, :length], rtol=0, atol=0)
        assert torch.equal(cut_batch["padding_mask"], padded_batch["padding_mask"][:, :length])
        assert torch.equal(cut_batch["target"], padded_batch["target"])
    lengths = torch.cat([real_lengths(batch["padding_mask"]) for batch in cut.test_dataloader()])
    assert lengths.tolist() == sorted(real_lengths(padded.test_dataloader().dataset.padding_mask).tolist())
    assert sum(batch["x"].shape[1] * len(batch["target"]) for batch in cut.test_dataloader()) < 0.7 * 370 * 29
    torch.manual_seed(0)
    model = TimeSeriesClassifier(**cut.model_dims(), d_model=32, n_heads=4, d_ff=64).eval()

    def scores(dm: UEADataModule) -> dict[int, torch.Tensor]:  # test-set row -> logits
        order = list(dm.test_dataloader().sampler)
        with torch.no_grad():
            logits = torch.cat([model(batch["x"], batch["padding_mask"]) for batch in dm.test_dataloader()])
        return dict(zip(order, logits))

    cut_scores, padded_scores = scores(cut), scores(padded)
    assert sorted(cut_scores) == list(range(370))
    for row, logits in padded_scores.items():
        torch.testing.assert_close(cut_scores[row], logits, rtol=1e-5, atol=1e-5)


def test_evaluation_batches_change_the_speed_not_the_scores(tmp_path):
    from flowformer.models import TimeSeriesClassifier

    small, large = (make_dm(tmp_path, "JapaneseVowels", eval_batch_size=size) for size in (None, 64))
    assert next(iter(small.test_dataloader()))["x"].shape[0] == 4  # default: the training batch
    assert next(iter(large.val_dataloader()))["x"].shape[0] == next(iter(large.test_dataloader()))["x"].shape[0] == 64
    assert next(iter(large.train_dataloader()))["x"].shape[0] == 4
    torch.manual_seed(0)
    model = TimeSeriesClassifier(**small.model_dims(), d_model=32, n_heads=4, d_ff=64).eval()

    def logits(dm: UEADataModule) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(batch["x"], batch["padding_mask"]) for batch in dm.test_dataloader()])

    torch.testing.assert_close(logits(large), logits(small), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing on fixtures
# --------------------------------------------------------------------------------------------------------------


def test_padding_mask_matches_real_lengths_and_padding_is_zero(tmp_path):
    paths = write_uea_dataset(tmp_path, "Toy", n_dims=3, n_classes=2, n_train=6, n_test=5, length=9,
                              equal_length=False, min_length=3)
    dm = make_dm(tmp_path, "Toy")
    for split, loader in (("TRAIN", dm.train_dataloader()), ("TEST", dm.test_dataloader())):
        raw = read_ts_file(paths[split])
        dataset = loader.dataset
        np.testing.assert_array_equal(real_lengths(dataset.padding_mask).numpy(), [s.shape[0] for s in raw.series])
        assert torch.all(dataset.x[dataset.padding_mask] == 0)
        # Real steps are never masked after padding steps: the mask is a suffix.
        assert torch.all(dataset.padding_mask[:, 1:] >= dataset.padding_mask[:, :-1])
    assert dm.model_dims()["max_len"] == 9


def test_normalisation_uses_training_statistics_only(tmp_path):
    # Train, dim 0: steps 0, 2, 4 -> mean 2, std (ddof=1) 2. Dim 1: 10, 20, 30 -> mean 20, std 10.
    # The test values are far away: statistics that included them would be visibly different.
    root = tmp_path / "uea" / "Hand"
    write_ts_file(root / "Hand_TRAIN.ts", problem_name="Hand",
                  series=[np.array([[0.0, 2.0], [10.0, 20.0]]), np.array([[4.0], [30.0]])], labels=["a", "b"])
    write_ts_file(root / "Hand_TEST.ts", problem_name="Hand",
                  series=[np.array([[2.0, 6.0, 100.0], [20.0, 0.0, 40.0]])], labels=["a"], class_labels=["a", "b"])
    dm = make_dm(tmp_path, "Hand")
    np.testing.assert_allclose(dm.feature_mean, [2.0, 20.0])
    np.testing.assert_allclose(dm.feature_std, [2.0, 10.0])
    train, test = dm.train_dataloader().dataset, dm.test_dataloader().dataset
    np.testing.assert_allclose(train.x[0, :2].numpy(), [[-1.0, -1.0], [0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(train.x[1, :1].numpy(), [[1.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(test.x[0].numpy(), [[0.0, 0.0], [2.0, -2.0], [49.0, 2.0]], atol=1e-5)
    assert dm.model_dims() == {"feat_dim": 2, "num_classes": 2, "max_len": 3}


def test_interpolate_missing_is_linear_with_constant_edges():
    series = np.array([[np.nan, 5.0], [1.0, np.nan], [np.nan, np.nan], [3.0, 8.0], [np.nan, np.nan]])
    out = interpolate_missing(series)
    np.testing.assert_allclose(out[:, 0], [1.0, 1.0, 2.0, 3.0, 3.0])
    np.testing.assert_allclose(out[:, 1], [5.0, 6.0, 7.0, 8.0, 8.0])
    assert np.isnan(series).sum() == 6  # the input is not modified
    assert np.isnan(interpolate_missing(np.full((3, 1), np.nan))).all()


@pytest.mark.parametrize("token", ["?", "NaN"])
def test_missing_values_are_interpolated_end_to_end(tmp_path, token):
    paths = write_uea_dataset(tmp_path, "Gappy", n_dims=2, n_classes=2, n_train=6, n_test=4, length=12,
                              missing_rate=0.2, missing_token=token, seed=3)
    n_missing = sum(np.isnan(s).sum() for path in paths.values() for s in read_ts_file(path).series)
    assert n_missing > 0 and token in paths["TRAIN"].read_text()
    dm = make_dm(tmp_path, "Gappy")
    assert dm.data_info["missing_values_interpolated"] == n_missing
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        assert torch.isfinite(loader.dataset.x).all()


def test_labels_are_coded_by_sorted_train_classes_and_unseen_test_labels_fail(tmp_path):
    root = tmp_path / "uea" / "Labels"
    case = np.zeros((1, 3)) + np.arange(3)
    write_ts_file(root / "Labels_TRAIN.ts", problem_name="Labels", series=[case, case, case], labels=["b", "c", "a"])
    write_ts_file(root / "Labels_TEST.ts", problem_name="Labels", series=[case], labels=["c"])
    dm = make_dm(tmp_path, "Labels")
    assert dm.data_info["classes"] == ["a", "b", "c"]
    assert dm.train_dataloader().dataset.target.tolist() == [1, 2, 0]
    assert dm.test_dataloader().dataset.target.tolist() == [2]

    write_ts_file(root / "Labels_TEST.ts", problem_name="Labels", series=[case], labels=["d"],
                  class_labels=["a", "b", "c", "d"])
    with pytest.raises(UEADataError, match=r"\['d'\].*never occur"):
        make_dm(tmp_path, "Labels")


# --------------------------------------------------------------------------------------------------------------
# Selection protocols
# --------------------------------------------------------------------------------------------------------------


def test_best_test_validates_on_the_test_set(tmp_path):
    write_uea_dataset(tmp_path, "Toy", n_dims=2, n_classes=2, n_train=6, n_test=5, length=4)
    dm = make_dm(tmp_path, "Toy", selection="best_test")
    assert dm.val_dataloader().dataset is dm.test_dataloader().dataset
    assert dm.data_info["n_val"] == dm.data_info["n_test"] == 5


def test_holdout_split_is_stratified_seeded_disjoint_and_fits_stats_on_the_rest(tmp_path):
    paths = write_uea_dataset(tmp_path, "Toy", n_dims=2, n_classes=3, n_train=30, n_test=5, length=6,
                              equal_length=False, min_length=3)
    raw = read_ts_file(paths["TRAIN"])
    codes = np.array([sorted(set(raw.labels)).index(label) for label in raw.labels])
    dm = make_dm(tmp_path, "Toy", selection="holdout_val", val_fraction=0.2, seed=1)
    fit_idx, val_idx = dm.split_indices["train"], dm.split_indices["val"]

    assert len(val_idx) == 6 and len(fit_idx) == 24
    assert not set(fit_idx) & set(val_idx) and set(fit_idx) | set(val_idx) == set(range(30))
    assert np.bincount(codes[val_idx]).tolist() == [2, 2, 2]  # 10 per class in TRAIN -> 2 each
    assert dm.val_dataloader().dataset is not dm.test_dataloader().dataset
    assert len(dm.val_dataloader().dataset) == 6 and len(dm.test_dataloader().dataset) == 5
    np.testing.assert_array_equal(dm.val_dataloader().dataset.target.numpy(), codes[val_idx])

    fit_steps = np.concatenate([raw.series[i] for i in fit_idx])
    np.testing.assert_allclose(dm.feature_mean, fit_steps.mean(axis=0))
    np.testing.assert_allclose(dm.feature_std, fit_steps.std(axis=0, ddof=1))
    assert not np.allclose(dm.feature_mean, np.concatenate(raw.series).mean(axis=0))

    same = make_dm(tmp_path, "Toy", selection="holdout_val", val_fraction=0.2, seed=1)
    other = make_dm(tmp_path, "Toy", selection="holdout_val", val_fraction=0.2, seed=2)
    np.testing.assert_array_equal(same.split_indices["val"], val_idx)
    assert not np.array_equal(other.split_indices["val"], val_idx)


def test_holdout_too_small_for_stratification_says_what_to_change(tmp_path):
    write_uea_dataset(tmp_path, "Toy", n_dims=1, n_classes=4, n_train=8, n_test=2, length=3)
    with pytest.raises(UEADataError, match="val_fraction"):
        make_dm(tmp_path, "Toy", selection="holdout_val", val_fraction=0.2)


def test_spoken_arabic_digits_trains_on_the_train_file_by_default(tmp_path):
    write_fixture(tmp_path, OmegaConf.create({"data": {"dataset": "SpokenArabicDigits"}}))
    dm = make_dm(tmp_path, "SpokenArabicDigits")
    assert dm.data_info["train_path"].endswith("SpokenArabicDigits_TRAIN.ts")
    assert dm.data_info["train_file"] == "TRAIN"
    on_test = make_dm(tmp_path, "SpokenArabicDigits", train_file_pattern="TEST")
    assert on_test.data_info["train_path"].endswith("SpokenArabicDigits_TEST.ts")
    with pytest.raises(ValueError, match="train_file_pattern"):
        UEADataModule("SpokenArabicDigits", str(tmp_path / "uea"), train_file_pattern="*")


# --------------------------------------------------------------------------------------------------------------
# Errors for humans
# --------------------------------------------------------------------------------------------------------------


def test_missing_dataset_names_the_file_what_is_available_and_the_fix(tmp_path):
    write_uea_dataset(tmp_path, "Toy", n_dims=1, n_classes=2, n_train=2, n_test=2, length=3)
    dm = UEADataModule("Handwriting", str(tmp_path / "uea"))
    with pytest.raises(UEADatasetNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(split_file(tmp_path / "uea", "Handwriting", "TRAIN")) in message
    assert "Toy" in message and "make data-uea" in message and "--names Handwriting" in message
    for name in bundled_datasets():
        assert name in message


def test_unknown_dataset_lists_known_names_and_suggests_a_close_one(tmp_path):
    with pytest.raises(UnknownUEADatasetError) as info:
        make_dm(tmp_path, "JapaneseVowel")
    message = str(info.value)
    assert "Did you mean JapaneseVowels" in message
    assert all(name in message for name in PAPER_DATASETS)


def _corrupt(path: Path, case: int, edit) -> int:
    """Apply `edit` to the text of data case `case` (0-based); return its 1-based line number."""
    lines = path.read_text().splitlines()
    number = lines.index("@data") + 1 + case
    lines[number] = edit(lines[number])
    path.write_text("\n".join(lines) + "\n")
    return number + 1


@pytest.mark.parametrize(
    "what, case, edit, reason",
    [
        ("not a number", 2, lambda line: line.replace(",", ",abc,", 1), "not a number"),
        ("empty value", 1, lambda line: line.replace(",", ",,", 1), "not a number"),
        # aeon takes the dimension count from the first case, so it blames case 2 instead of this one.
        ("dimension dropped in the first case", 0, lambda line: line.split(":", 1)[1], "dimension"),
        ("dimension dropped later", 3, lambda line: line.split(":", 1)[1], "dimension"),
        ("short channel", 2, lambda line: line.replace(",", ":", 1).split(":", 1)[1], "different lengths"),
        ("label not in header", 1, lambda line: line.rsplit(":", 1)[0] + ":zz", "not one of the @classLabel"),
        ("blank line", 4, lambda line: "", "empty line"),
    ],
)
def test_malformed_file_error_names_file_and_line(tmp_path, what, case, edit, reason):
    paths = write_uea_dataset(tmp_path, "Broken", n_dims=3, n_classes=2, n_train=6, n_test=3, length=5)
    line = _corrupt(paths["TRAIN"], case, edit)
    with pytest.raises(MalformedTsFileError) as info:
        make_dm(tmp_path, "Broken")
    assert info.value.line == line, what
    assert info.value.path == paths["TRAIN"]
    assert str(paths["TRAIN"]) in str(info.value) and f"line {line}" in str(info.value)
    assert reason in str(info.value)


def test_file_without_data_section_is_malformed(tmp_path):
    paths = write_uea_dataset(tmp_path, "Headless", n_dims=1, n_classes=2, n_train=2, n_test=2, length=3)
    text = paths["TEST"].read_text()
    paths["TEST"].write_text(text[: text.index("@data")])
    with pytest.raises(MalformedTsFileError, match="no @data"):
        make_dm(tmp_path, "Headless")


def test_model_dims_before_setup_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="setup"):
        UEADataModule("JapaneseVowels", str(tmp_path)).model_dims()


# --------------------------------------------------------------------------------------------------------------
# EpochSeededSampler
# --------------------------------------------------------------------------------------------------------------


def test_epoch_seeded_sampler_is_a_deterministic_permutation_per_epoch():
    sampler = EpochSeededSampler(50, seed=7)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert sorted(orders[-1]) == list(range(50)) and len(sampler) == 50
        assert list(sampler) == orders[-1]  # iterating again does not advance anything
    assert orders[0] != orders[1] != orders[2]

    resumed = EpochSeededSampler(50, seed=7)  # a fresh process resuming at epoch 2
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]
    other_seed = EpochSeededSampler(50, seed=8)
    assert list(other_seed) != orders[0]


def test_an_evaluation_order_is_shared_out_without_repeats():
    from tasks.common.sampling import evaluation_loader

    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    order = [9, 3, 0, 7, 1, 8, 2, 6, 4, 5]
    shares = [[int(i) for batch in evaluation_loader(dataset, batch_size=2, seed=0, world_size=3, rank=rank,
                                                      order=order) for i in batch[0]] for rank in range(3)]
    assert shares == [order[rank::3] for rank in range(3)]
    single = [int(i) for batch in evaluation_loader(dataset, batch_size=4, seed=0, order=order) for i in batch[0]]
    assert single == order
    with pytest.raises(ValueError, match="every index"):
        evaluation_loader(dataset, batch_size=2, seed=0, order=order[:-1])


def test_epoch_seeded_sampler_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    list(EpochSeededSampler(10, seed=0))
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError):
        EpochSeededSampler(-1, seed=0)


# --------------------------------------------------------------------------------------------------------------
# Fixtures round-trip through aeon
# --------------------------------------------------------------------------------------------------------------


def test_fixture_files_round_trip_through_aeon(tmp_path):
    from aeon.datasets import load_from_ts_file

    rng = np.random.default_rng(0)
    series = [rng.normal(size=(2, n)) for n in (4, 7, 5)]
    series[1][0, 2] = np.nan
    path = write_ts_file(tmp_path / "RT_TRAIN.ts", problem_name="RT", series=series, labels=["x", "y", "x"])
    data, labels, meta = load_from_ts_file(str(path), return_meta_data=True)
    assert isinstance(data, list) and not meta["equallength"] and meta["missing"]
    for got, want in zip(data, series):
        np.testing.assert_array_equal(got, want)  # repr() formatting is exact for float64
    assert labels.tolist() == ["x", "y", "x"] and meta["class_values"] == ["x", "y"]

    equal = write_ts_file(tmp_path / "EQ_TRAIN.ts", problem_name="EQ", series=series[:1] * 2, labels=["a", "b"])
    data, _ = load_from_ts_file(str(equal))
    assert isinstance(data, np.ndarray) and data.shape == (2, 2, 4)
    assert "@seriesLength 4" in equal.read_text()


@pytest.mark.parametrize("name", ["Handwriting", "JapaneseVowels", "FaceDetection"])
def test_write_fixture_uses_the_real_dims_and_classes(tmp_path, name):
    overrides = write_fixture(tmp_path, OmegaConf.create({"data": {"dataset": name}}))
    assert overrides == {"data.dataset": name}
    dims = make_dm(tmp_path, name).model_dims()
    facts = PAPER_DATASETS[name]
    assert (dims["feat_dim"], dims["num_classes"]) == (facts.n_dims, facts.n_classes)
    assert dims["max_len"] == min(facts.length, 16)


def test_write_fixture_picks_a_dataset_when_missing_and_supports_holdout(tmp_path):
    cfg = OmegaConf.create({"selection": "holdout_val", "data": {"dataset": "???"}})
    overrides = write_fixture(tmp_path, cfg)
    name = overrides["data.dataset"]
    assert split_file(tmp_path / "uea", name, "TRAIN").is_file()
    dm = make_dm(tmp_path, name, selection="holdout_val")
    assert dm.data_info["source"] == "data_dir" and dm.data_info["n_val"] > 0


# --------------------------------------------------------------------------------------------------------------
# Download CLI (no network: bundled copies, fake fetchers, --offline; tests/test_download.py serves real downloads)
# --------------------------------------------------------------------------------------------------------------


def test_download_copies_bundled_and_reports_missing_offline(tmp_path, capsys):
    status = download.main(["--names", "JapaneseVowels", "Heartbeat", "--data-dir", str(tmp_path), "--offline"])
    out = capsys.readouterr().out
    assert status == 1
    assert split_file(tmp_path / "uea", "JapaneseVowels", "TEST").is_file()
    assert "JapaneseVowels  ok (copied" in out and "Heartbeat" in out and "MISSING" in out


def test_download_validation_flags_wrong_sizes(tmp_path):
    write_fixture(tmp_path, OmegaConf.create({"data": {"dataset": "UWaveGestureLibrary"}}))
    ok, status = download.prepare("UWaveGestureLibrary", tmp_path / "uea", offline=True)
    assert not ok and "INVALID" in status and "train cases: found 8, expected 120" in status


def test_download_falls_back_to_the_next_source(tmp_path):
    def broken(name, uea_dir):
        raise OSError("network unreachable")

    def working(name, uea_dir):
        write_uea_dataset(uea_dir.parent, name, n_dims=1, n_classes=2, n_train=2, n_test=2, length=3)

    def silent(name, uea_dir):
        pass

    uea_dir = tmp_path / "uea"
    source = download.download("Toy", uea_dir, {"first": broken, "second": working})
    assert source == "second"
    assert download.has_files(uea_dir, "Toy")
    with pytest.raises(RuntimeError, match="first: OSError: network unreachable; second: FileNotFoundError: no "):
        download.download("Other", uea_dir, {"first": broken, "second": silent})
