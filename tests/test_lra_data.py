"""LRA readers on fixtures in the real layouts: tokenisation as official, splits, protocols, caching, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tasks.lra import datasets as lra
from tasks.lra.data import LRADataModule
from tasks.lra.listops import evaluate
from tasks.lra.tokenize import ListOpsEncoder, build_listops_vocab, preprocess_listops
from tests.fixtures.lra import write_aan, write_cifar, write_fixture, write_imdb, write_listops, write_pathfinder


def datamodule(tmp_path, dataset, **kw) -> LRADataModule:
    dm = LRADataModule(dataset, tmp_path / "lra", **{"batch_size": 4, **kw})
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation


def test_listops_tokenisation_follows_the_official_pipeline():
    source = "( ( ( [MAX 4 ) ( ( [SM 3 ) 9 ] ) ) ] )"
    assert preprocess_listops(source).split() == ["[MAX", "4", "[SM", "3", "9", "X", "X"]
    vocab = build_listops_vocab([source, "( ( [MIN 7 ) ] )", "[MED 0 X"])
    assert vocab == sorted(["[MAX", "[MIN", "[MED", "[SM", "X", "0", "3", "4", "7", "9"])
    encoder = ListOpsEncoder(vocab)
    ids = encoder.encode(source)
    assert ids.min() >= 1  # 0 is padding
    assert [vocab[i - 1] for i in ids] == preprocess_listops(source).split()
    assert encoder.encode("[MAX 5 ]").tolist()[1] == encoder.oov_id == len(vocab) + 1  # 5 is not in this vocab
    assert encoder.vocab_size == len(vocab) + 2


def test_listops_vocab_comes_from_the_first_1002_validation_examples():
    sources = ["[MIN 1 ]"] * 1002 + ["[MAX 2 ]"]
    assert "[MAX" not in build_listops_vocab(sources)
    assert "[MAX" in build_listops_vocab(sources[:-2] + sources[-1:])


def test_listops_reader(tmp_path):
    write_listops(tmp_path)
    dm = datamodule(tmp_path, "listops")
    assert dm.model_dims() == {"vocab_size": 17, "num_classes": 10, "max_len": 2000}
    assert dm.data_info["vocab"] == sorted(["[MIN", "[MAX", "[MED", "[SM", "X", *map(str, range(10))])
    sources, labels = lra.read_listops_tsv(lra.listops_path(tmp_path / "lra", "train"))
    example = dm.splits["train"][3]
    assert example["target"] == labels[3] == evaluate(sources[3])
    vocab = dm.data_info["vocab"]
    assert [vocab[i - 1] for i in example["tokens"]] == preprocess_listops(sources[3]).split()


def test_text_bytes_become_ids_byte_plus_one(tmp_path):
    write_imdb(tmp_path)
    review = tmp_path / "lra" / "aclImdb" / "train" / "neg" / "0_2.txt"
    review.write_text("café <br />", encoding="utf-8")
    dm = datamodule(tmp_path, "text", max_len=8)
    assert dm.model_dims() == {"vocab_size": 257, "num_classes": 2, "max_len": 8}
    assert dm.data_info["text_source"] == "aclImdb"
    files = sorted((tmp_path / "lra/aclImdb/train/neg").glob("*.txt"))
    position = [f.name for f in files].index("0_2.txt")  # neg files come first (label 0), sorted by name
    example = dm.splits["train"][position]
    assert example["target"] == 0
    assert example["tokens"].tolist() == [b + 1 for b in "café <br />".encode()[:8]]  # UTF-8, truncated to max_len
    assert {dm.splits["train"][i]["target"] for i in range(len(dm.splits["train"]))} == {0, 1}


def test_retrieval_reads_label_id_id_text_text(tmp_path):
    write_aan(tmp_path)
    path = lra.aan_path(tmp_path / "lra", "train")
    path.write_text("1.0\tA\tB\tab\tXYZ!\n0.0\tC\tD\t\tq\n")
    dm = datamodule(tmp_path, "retrieval", max_len=3)
    first = dm.splits["train"][0]
    assert first["target"] == 1 and first["tokens1"].tolist() == [98, 99] and first["tokens2"].tolist() == [89, 90, 91]
    second = dm.splits["train"][1]
    assert second["target"] == 0 and second["tokens1"].tolist() == []
    batch = dm._collate()([first, second])
    assert batch["tokens1"].shape == (2, 2) and batch["padding_mask1"].tolist() == [[False, False], [True, True]]
    assert batch["tokens2"].tolist() == [[89, 90, 91], [114, 0, 0]]
    assert len(dm.splits["val"]) == 8  # the `eval` file


def test_grayscale_matches_tensorflow():
    pixels = np.array([[255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0], [10, 200, 30]], np.uint8)
    expected = [int(np.float32(w) * np.float32(255.5)) for w in (0.9999, 0.2989, 0.5870, 0.1140, 0.0)]
    expected.append(int((10 * 0.2989 + 200 * 0.5870 + 30 * 0.1140) / 255 * 255.5))
    assert lra.rgb_to_grayscale(pixels).tolist() == expected


def test_image_reader_splits_45k_5k_style_and_keeps_raw_gray_levels(tmp_path):
    write_cifar(tmp_path, n_per_batch=4, n_test=6)
    folder = tmp_path / "lra" / "cifar-10-batches-py"
    with open(folder / "data_batch_1", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    dm = datamodule(tmp_path, "image")
    assert dm.model_dims() == {"vocab_size": 256, "num_classes": 10, "max_len": 1024}
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 18, "val": 2, "test": 6}  # 90% / 10% of train
    planes = batch[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    example = dm.splits["train"][0]
    assert example["tokens"].tolist() == lra.rgb_to_grayscale(planes).reshape(-1).tolist()
    assert example["target"] == batch[b"labels"][0]
    collated = dm._collate()([example, dm.splits["train"][1]])
    assert set(collated) == {"tokens", "target"}  # pixel 0 is black, not padding: no mask
    assert collated["tokens"].shape == (2, 1024) and collated["tokens"].dtype == torch.long


def test_pathfinder_reader_skips_empty_images_and_splits_80_10_10(tmp_path):
    write_pathfinder(tmp_path, n_dirs=2, n_per_dir=20)
    dm = datamodule(tmp_path, "pathfinder")
    assert dm.data_info["skipped_empty_images"] == ["imgs/0/sample_0.png"]
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 31, "val": 4, "test": 4}  # 39 readable images: floor(31.2), floor(35.1) - 31, rest
    indices = [set(dm.splits[s].index.tolist()) for s in ("train", "val", "test")]
    assert set.union(*indices) == set(range(39)) and sum(map(len, indices)) == 39
    # the split is seeded by split_seed, not by the training seed
    other = datamodule(tmp_path, "pathfinder", seed=5)
    assert other.splits["test"].index.tolist() == dm.splits["test"].index.tolist()
    moved = datamodule(tmp_path, "pathfinder", split_seed=1, cache=False)
    assert moved.splits["test"].index.tolist() != dm.splits["test"].index.tolist()
    # label = field 3 of the metadata line; the image is the PNG's gray levels
    tokens, labels, _ = lra.read_pathfinder(tmp_path / "lra" / lra.PATHFINDER_DIR)
    meta_lines = (tmp_path / "lra" / lra.PATHFINDER_DIR / "metadata" / "0.npy").read_text().splitlines()
    assert labels[:3].tolist() == [int(line.split()[3]) for line in meta_lines[1:4]]  # sample_0 is the empty one
    from PIL import Image

    with Image.open(tmp_path / "lra" / lra.PATHFINDER_DIR / "imgs/0/sample_1.png") as image:
        assert tokens[0].tolist() == np.asarray(image).reshape(-1).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Protocols, batching


def test_selection_switches_the_validation_loader(tmp_path):
    write_listops(tmp_path)
    paper = datamodule(tmp_path, "listops", selection="best_test")
    rigorous = datamodule(tmp_path, "listops", selection="holdout_val")
    assert paper.val_dataloader().dataset is paper.splits["test"]
    assert rigorous.val_dataloader().dataset is rigorous.splits["val"]
    assert rigorous.test_dataloader().dataset is rigorous.splits["test"]


def test_text_holdout_is_a_seeded_split_of_the_imdb_train_set(tmp_path):
    write_imdb(tmp_path, n_per_class=20)
    dm = datamodule(tmp_path, "text", selection="holdout_val")
    train, val = set(dm.splits["train"].index.tolist()), set(dm.splits["val"].index.tolist())
    assert len(val) == 4 and len(train) == 36 and not train & val
    assert dm.val_dataloader().dataset is dm.splits["val"]
    assert datamodule(tmp_path, "text", selection="holdout_val", seed=9).splits["val"].index.tolist() == sorted(val)
    assert len(datamodule(tmp_path, "text").splits["train"]) == 40  # best_test trains on the full train set


def test_padding_is_masked_and_batch_size_is_honoured(tmp_path):
    write_listops(tmp_path)
    dm = datamodule(tmp_path, "listops", batch_size=5)
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape[0] == 5
    lengths = (~batch["padding_mask"]).sum(1)
    assert batch["tokens"].shape[1] == lengths.max()  # pad_to=longest
    assert torch.all(batch["tokens"][batch["padding_mask"]] == 0) and torch.all(
        batch["tokens"][~batch["padding_mask"]] > 0
    )
    full = datamodule(tmp_path, "listops", pad_to="max", max_len=50)
    assert next(iter(full.val_dataloader()))["tokens"].shape[1] == 50


def test_training_order_is_seeded_and_resumable(tmp_path):
    write_listops(tmp_path)
    first = [b["target"].tolist() for b in datamodule(tmp_path, "listops", seed=3).train_dataloader()]
    again = [b["target"].tolist() for b in datamodule(tmp_path, "listops", seed=3).train_dataloader()]
    other = [b["target"].tolist() for b in datamodule(tmp_path, "listops", seed=4).train_dataloader()]
    assert first == again and first != other


# ---------------------------------------------------------------------------------------------------------------
# Caching


def test_tokenised_data_is_cached_and_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    write_listops(tmp_path)
    datamodule(tmp_path, "listops")
    entries = list((tmp_path / "lra" / "cache").iterdir())
    assert len(entries) == 1 and (entries[0] / "train_ids.npy").exists()

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(lra, "read_listops_tsv", fail)
    cached = datamodule(tmp_path, "listops")  # served from the cache
    assert isinstance(cached.splits["train"].sequences.values, np.memmap)
    monkeypatch.undo()

    path = lra.listops_path(tmp_path / "lra", "test")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1])  # an edited file gets a new cache entry
    assert len(datamodule(tmp_path, "listops").splits["test"]) == 1
    assert len(list((tmp_path / "lra" / "cache").iterdir())) == 2


def test_settings_are_part_of_the_cache_key(tmp_path):
    write_aan(tmp_path)
    short = datamodule(tmp_path, "retrieval", max_len=5)
    long = datamodule(tmp_path, "retrieval", max_len=50)
    assert max(len(short.splits["train"][i]["tokens1"]) for i in range(8)) == 5
    assert max(len(long.splits["train"][i]["tokens1"]) for i in range(8)) > 5


# ---------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "dataset, missing",
    [
        ("listops", "listops-1000/basic_train.tsv"),
        ("retrieval", "tsv_data/new_aan_pairs.train.tsv"),
        ("image", "cifar-10-batches-py/data_batch_1"),
        ("pathfinder", "pathfinder32/curv_contour_length_14/metadata"),
    ],
)
def test_missing_files_name_the_file_and_make_data_lra(tmp_path, dataset, missing):
    (tmp_path / "lra").mkdir()
    with pytest.raises(lra.LRADataError) as info:
        datamodule(tmp_path, dataset)
    assert missing in str(info.value) and "make data-lra" in str(info.value)


def test_missing_imdb_without_hf_cache_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(lra, "_imdb_from_hf", lambda: None)
    (tmp_path / "lra").mkdir()
    with pytest.raises(lra.LRADataError, match=r"aclImdb.*make data-lra"):
        datamodule(tmp_path, "text")


def test_imdb_from_the_hf_cache_is_accepted(tmp_path, monkeypatch):
    fake = {"train": ([b"good", b"bad"], np.array([1, 0])), "test": ([b"ok"], np.array([1]))}
    monkeypatch.setattr(lra, "_imdb_from_hf", lambda: fake)
    (tmp_path / "lra").mkdir()
    dm = datamodule(tmp_path, "text")
    assert dm.data_info["text_source"] == "hf" and dm.splits["train"][0]["tokens"].tolist() == [104, 112, 112, 101]


def test_malformed_files_name_the_file_and_line(tmp_path):
    write_listops(tmp_path)
    path = lra.listops_path(tmp_path / "lra", "val")
    path.write_text("Source\tLabel\n[MIN 1 ]\t1\n")
    with pytest.raises(lra.LRADataError, match=r"basic_val\.tsv.*header.*make data-lra"):
        datamodule(tmp_path, "listops", cache=False)
    path.write_text("Source\tTarget\n[MIN 1 ]\tten\n")
    with pytest.raises(lra.LRADataError, match=r"basic_val\.tsv.*line 2"):
        datamodule(tmp_path, "listops", cache=False)

    write_aan(tmp_path)
    lra.aan_path(tmp_path / "lra", "test").write_text("1.0\tonly three\tfields\n")
    with pytest.raises(lra.LRADataError, match=r"new_aan_pairs\.test\.tsv.*line 1"):
        datamodule(tmp_path, "retrieval", cache=False)

    write_cifar(tmp_path)
    (tmp_path / "lra" / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(lra.LRADataError, match=r"test_batch.*not a CIFAR-10 batch"):
        datamodule(tmp_path, "image", cache=False)

    write_pathfinder(tmp_path)
    (tmp_path / "lra" / lra.PATHFINDER_DIR / "metadata" / "1.npy").write_text("imgs/1 sample_0.png\n")
    with pytest.raises(lra.LRADataError, match=r"metadata/1\.npy.*line 1"):
        datamodule(tmp_path, "pathfinder", cache=False)


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="data.dataset"):
        LRADataModule("cifar", tmp_path)
    with pytest.raises(ValueError, match="selection"):
        LRADataModule("listops", tmp_path, selection="val")
    with pytest.raises(ValueError, match="1024"):
        LRADataModule("image", tmp_path, max_len=512)


# ---------------------------------------------------------------------------------------------------------------
# The smoke-test hook


@pytest.mark.parametrize("dataset", lra.TASKS)
def test_write_fixture_writes_the_real_layout_for_the_requested_task(tmp_path, dataset):
    from omegaconf import OmegaConf

    overrides = write_fixture(tmp_path, OmegaConf.create({"data": {"dataset": dataset}}))
    assert overrides["data.batch_size"] == "4"
    written = {p.name for p in (tmp_path / "lra").iterdir()}
    assert (
        written
        == {
            "listops": {"listops-1000"},
            "text": {"aclImdb"},
            "retrieval": {"tsv_data"},
            "image": {"cifar-10-batches-py"},
            "pathfinder": {"pathfinder32"},
        }[dataset]
    )
    dm = datamodule(tmp_path, dataset, selection="holdout_val")
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == (4,)
    assert len(dm.val_dataloader().dataset) > 0 and len(dm.test_dataloader().dataset) > 0


# ---------------------------------------------------------------------------------------------------------------
# make data-lra (tasks/lra/download.py), without network


def test_download_check_reports_each_missing_file(tmp_path, capsys):
    from tasks.lra import download

    assert download.main(["--data-dir", str(tmp_path), "--check", "--tasks", "listops", "retrieval"]) == 1
    err = capsys.readouterr().err
    assert "listops-1000/basic_val.tsv: missing" in err and "new_aan_pairs.eval.tsv: missing" in err
    assert "make data-lra" in err and "python -m tasks.lra.listops" in err
    write_fixture(tmp_path)
    assert download.main(["--data-dir", str(tmp_path), "--check"]) == 0


def test_download_failure_without_network_explains_the_manual_route(tmp_path, monkeypatch, capsys):
    import dataclasses
    import socket

    from tasks.lra import download

    with socket.socket() as probe:  # a loopback port that nothing listens on once closed: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    offline = [
        dataclasses.replace(spec, source=dataclasses.replace(spec.source, urls=(f"http://127.0.0.1:{port}/x",)))
        for spec in download.ARCHIVES
    ]
    monkeypatch.setattr(download, "ARCHIVES", tuple(offline))
    report = download.prepare(tmp_path / "lra", ("image",))
    assert report["image"]
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and "Connection refused" in err and "by hand" in err


def test_unpack_keeps_only_the_needed_release_members_and_drops_the_top_folder(tmp_path):
    import io
    import tarfile

    from tasks.lra import download

    fixture = tmp_path / "fixture"
    write_listops(fixture)
    archive = tmp_path / "lra" / "downloads" / "lra_release.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "val", "test"):
            tar.add(lra.listops_path(fixture / "lra", split), f"lra_release/listops-1000/basic_{split}.tsv")
        junk = b"x"
        info = tarfile.TarInfo("lra_release/pathfinder64/curv_baseline/imgs/0/sample_0.png")
        info.size = len(junk)
        tar.addfile(info, io.BytesIO(junk))
    report = download.prepare(tmp_path / "lra", ("listops",))
    assert report == {"listops": []}
    assert (
        lra.listops_path(tmp_path / "lra", "train").read_bytes()
        == lra.listops_path(fixture / "lra", "train").read_bytes()
    )
    assert not (tmp_path / "lra" / "pathfinder64").exists() and not archive.exists()
