"""ImageFolder data on fixtures written as real image files: the layout checks, the image check and its cache, images
that fail to decode while loading (truncated JPEGs), the datamodule's batches, timm's transforms and Mixup as the task
config builds them, the hold-out protocol, and the digits converter."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image, ImageFile

from tasks.imagenet import layout as layout_module
from tasks.imagenet.data import ImageFolderDataModule, UnreadableImageError, decode_rgb
from tasks.imagenet.digits import DigitsExistError, write_digits
from tasks.imagenet.digits import main as digits_main
from tasks.imagenet.layout import CACHE_NAME, ImageFolderError, TruncatedLoadingError, load_layout, open_error
from tests.fixtures.imagenet import (
    FIXTURE_CLASSES,
    FIXTURE_DATASET,
    truncate_image,
    write_fixture,
    write_image,
    write_image_folder,
)
from tests.helpers import compose_config

CLASSES = FIXTURE_CLASSES[:3]


def datamodule(data_dir: Path, dataset: str = "folder", **options) -> ImageFolderDataModule:
    defaults = {"image_size": 32, "batch_size": 4, "num_workers": 0, "pin_memory": False}
    return ImageFolderDataModule(dataset=dataset, data_dir=data_dir, **{**defaults, **options})


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "folder", CLASSES, {"train": 4, "val": 2})


def test_setup_reads_classes_from_the_folders_and_batches_images(folder):
    dm = datamodule(folder.parent)
    assert dm.data_status().available
    dm.setup("fit")
    assert dm.model_dims() == {"num_classes": 3, "image_size": 32}
    assert dm.data_info["sizes"] == {"train": 12, "val": 6} and dm.data_info["skipped_images"] == []
    batch = next(iter(dm.val_dataloader()))
    assert batch["x"].shape == (4, 3, 32, 32) and batch["x"].dtype == torch.float32
    assert batch["target"].tolist() == [0, 0, 1, 1]  # sorted class folders, sorted files
    train = next(iter(dm.train_dataloader()))
    assert train["x"].shape == (4, 3, 32, 32)
    assert len(dm.train_dataloader()) == 3  # 12 images, full batches only


def config_datamodule(folder: Path, experiment: str) -> ImageFolderDataModule:
    """The datamodule exactly as an experiment's config builds it, on the fixture folder."""
    cfg = compose_config([f"experiment={experiment}", f"paths.data_dir={folder.parent}", f"data.dataset={folder.name}",
                          "data.num_workers=0", "data.pin_memory=false"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("experiment", ["imagenet/hierarchical", "imagenet/deit_small"])
def test_the_task_config_builds_timms_recipe(folder, experiment):
    dm = config_datamodule(folder, experiment)
    train = {type(t).__name__: t for t in dm.splits["train"].transform.transforms}
    crop, rand_augment = train["RandomResizedCropAndInterpolation"], train["RandAugment"]
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and str(crop.interpolation.value) == "bicubic"
    assert train["RandomHorizontalFlip"].p == 0.5
    # rand-m9-mstd0.5-inc1: 2 ops per image, magnitude 9 with noise 0.5, the increasing variants
    assert rand_augment.num_layers == 2
    assert {(op.magnitude, op.magnitude_std) for op in rand_augment.ops} == {(9, 0.5)}
    assert {"PosterizeIncreasing", "SolarizeIncreasing"} <= {op.name for op in rand_augment.ops}
    if experiment == "imagenet/deit_small":  # DeiT: random erasing 0.25 with per-pixel noise
        erasing = train["RandomErasing"]
        assert (erasing.probability, erasing.mode, erasing.per_pixel, erasing.max_count) == (0.25, "pixel", True, 1)
    else:  # the official run: none
        assert "RandomErasing" not in train
    evaluation = [type(t).__name__ for t in dm.splits["val"].transform.transforms]
    resize, center = dm.splits["val"].transform.transforms[:2]
    assert evaluation[:2] == ["Resize", "CenterCrop"] and resize.size == 256 and center.size == (224, 224)
    assert str(resize.interpolation.value) == "bicubic"
    mixer = dm.mixer
    assert (mixer.mixup_alpha, mixer.cutmix_alpha, mixer.label_smoothing) == (0.8, 1.0, 0.1)
    assert (mixer.mix_prob, mixer.switch_prob, mixer.mode) == (1.0, 0.5, "batch")
    assert dm.splits["train"][0]["x"].shape == (3, 224, 224)


def test_mixup_mixes_training_batches_only(folder):
    dm = datamodule(folder.parent, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    labels = batch["target"].clone()
    dm.trainer = SimpleNamespace(training=False)
    assert torch.equal(dm.on_after_batch_transfer(dict(batch), 0)["target"], labels)
    dm.trainer = SimpleNamespace(training=True)
    mixed = dm.on_after_batch_transfer(dict(batch), 0)["target"]
    assert mixed.shape == (4, 3) and mixed.is_floating_point()
    assert torch.allclose(mixed.sum(-1), torch.ones(4))
    assert mixed.min() >= 0.1 / 3 - 1e-6  # label smoothing spreads 0.1 over the classes


def test_no_mixing_keeps_hard_targets(folder):
    dm = datamodule(folder.parent, mixup=0, cutmix=0, batch_size=3)  # an odd batch is fine without mixing
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=True)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["target"].dtype == torch.int64
    with pytest.raises(ValueError, match="data.batch_size=3 must be even"):
        datamodule(folder.parent, batch_size=3)


def test_a_class_only_in_val_is_an_error_naming_it(folder):
    write_image_folder(folder, ["n09999999"], {"val": 1})
    with pytest.raises(ImageFolderError, match=r"val has class folders that .*train lacks: n09999999"):
        datamodule(folder.parent).setup()


def test_a_class_missing_from_val_is_an_error(folder):
    shutil.rmtree(folder / "val" / CLASSES[1])
    with pytest.raises(ImageFolderError, match=f"lacks class folders that .* has: {CLASSES[1]}"):
        load_layout(folder)


def test_an_empty_class_is_an_error_naming_it(folder):
    for image in (folder / "train" / CLASSES[2]).iterdir():
        image.unlink()
    (folder / "train" / CLASSES[2] / "notes.txt").write_text("not an image")
    with pytest.raises(ImageFolderError, match=f"empty class folder.* {CLASSES[2]}"):
        load_layout(folder)


def test_a_corrupt_image_is_fatal_or_skipped_and_listed(folder):
    broken = folder / "train" / CLASSES[0] / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    with pytest.raises(ImageFolderError, match="broken.JPEG") as error:
        datamodule(folder.parent).setup()
    assert "data.corrupt_images=skip" in str(error.value)
    dm = datamodule(folder.parent, corrupt_images="skip")
    dm.setup()
    assert dm.data_info["skipped_images"] == [str(broken)] and dm.data_info["sizes"]["train"] == 12


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path PIL opens from now on, in this process."""
    paths, real_open = [], Image.open

    def counting_open(path, *args, **kwargs):
        paths.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return paths


def sources(dm: ImageFolderDataModule) -> dict[str, str]:
    return {split: entry["source"] for split, entry in dm.data_info["image_check"]["splits"].items()}


def test_a_second_setup_reads_the_check_from_the_cache_and_opens_no_image(folder, opened):
    first = datamodule(folder.parent)
    first.setup("fit")
    assert len(opened) == 18 and sources(first) == {"train": "checked", "val": "checked"}
    check = first.data_info["image_check"]
    assert check["level"] == "header" and check["splits"]["train"]["cache"] == str(folder / CACHE_NAME)
    opened.clear()
    second = datamodule(folder.parent)  # a later run, or another DDP rank
    second.setup("fit")
    assert opened == [] and sources(second) == {"train": "cache", "val": "cache"}
    assert {s: e["key"] for s, e in second.data_info["image_check"]["splits"].items()} == \
        {s: e["key"] for s, e in check["splits"].items()}
    assert second.data_info["sizes"] == first.data_info["sizes"]


def _add(folder: Path) -> Path:
    return write_image(folder / "train" / CLASSES[0] / "added.JPEG", np.random.default_rng(1))


def _remove(folder: Path) -> Path:
    (folder / "val" / CLASSES[1] / f"{CLASSES[1]}_0.JPEG").unlink()
    return folder / "val"


def _resize(folder: Path) -> Path:  # rewritten with another size, its modification time put back
    image = folder / "train" / CLASSES[2] / f"{CLASSES[2]}_1.JPEG"
    stat = image.stat()
    write_image(image, np.random.default_rng(2), size=24)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return image


def _touch(folder: Path) -> Path:  # the same bytes, a later modification time
    image = folder / "val" / CLASSES[0] / f"{CLASSES[0]}_1.JPEG"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    return image


@pytest.mark.parametrize(("change", "split"), [(_add, "train"), (_remove, "val"), (_resize, "train"), (_touch, "val")])
def test_a_changed_split_is_checked_again_and_the_other_read_from_the_cache(folder, opened, change, split):
    datamodule(folder.parent).setup()
    change(folder)
    opened.clear()
    dm = datamodule(folder.parent)
    dm.setup()
    other = "val" if split == "train" else "train"
    assert sources(dm) == {split: "checked", other: "cache"}
    assert len(opened) == dm.data_info["sizes"][split] and all(f"/{split}/" in path for path in opened)
    opened.clear()
    datamodule(folder.parent).setup()
    assert opened == []  # the new listing is cached in turn


def test_a_cached_failure_is_reported_again_without_opening_any_image(folder, opened):
    broken = folder / "train" / CLASSES[0] / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    with pytest.raises(ImageFolderError, match="broken.JPEG"):
        datamodule(folder.parent).setup()
    opened.clear()
    with pytest.raises(ImageFolderError, match="broken.JPEG"):
        datamodule(folder.parent).setup()
    dm = datamodule(folder.parent, corrupt_images="skip")
    dm.setup()
    assert opened == [] and sources(dm) == {"train": "cache", "val": "cache"}
    assert dm.data_info["skipped_images"] == [str(broken)] and dm.data_info["sizes"]["train"] == 12
    cached = json.loads((folder / CACHE_NAME).read_text())["splits"]["train"]["failures"]
    assert [path for path, _ in cached] == [f"train/{CLASSES[0]}/broken.JPEG"]


def test_concurrent_first_checks_check_each_image_once(folder, monkeypatch):
    checked, started = [], threading.Event()
    real_open_error = layout_module.open_error

    def slow_open_error(path, level="header"):
        checked.append(path)
        started.set()
        time.sleep(0.02)  # long enough that the second process arrives while the first holds the lock
        return real_open_error(path, level)

    monkeypatch.setattr(layout_module, "open_error", slow_open_error)
    results = {}

    def check(name):
        results[name] = load_layout(folder).image_check

    first = threading.Thread(target=check, args=("first",))
    first.start()
    assert started.wait(10)
    check("second")  # waits for the lock, then reads what the first wrote
    first.join()
    assert sorted(checked) == sorted(set(checked)) and len(checked) == 18
    assert {e["source"] for e in results["first"]["splits"].values()} == {"checked"}
    assert {e["source"] for e in results["second"]["splits"].values()} == {"cache"}


def test_a_data_folder_that_cannot_be_written_keeps_the_cache_in_the_users_cache(folder, opened, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    real_lock = layout_module.FileLock

    def read_only_data(lock_path):
        if Path(lock_path).parent == folder:
            raise PermissionError(13, "Permission denied", lock_path)
        return real_lock(lock_path)

    monkeypatch.setattr(layout_module, "FileLock", read_only_data)
    datamodule(folder.parent).setup()
    assert not (folder / CACHE_NAME).exists()
    opened.clear()
    dm = datamodule(folder.parent)
    dm.setup()
    assert opened == [] and sources(dm) == {"train": "cache", "val": "cache"}
    cache = Path(dm.data_info["image_check"]["splits"]["train"]["cache"])
    assert cache.parent == tmp_path / "user_cache" / "flowformer" / "image_check" and cache.name.startswith("folder-")


def test_a_truncated_jpeg_passes_the_header_check_and_fails_to_load_naming_its_path(folder):
    image = truncate_image(folder / "val" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG")
    assert open_error(str(image)) is None  # the header is whole: PIL's verify cannot tell
    dm = datamodule(folder.parent)
    dm.setup()
    assert dm.data_info["skipped_images"] == []
    with pytest.raises(UnreadableImageError, match="truncated") as error:
        dm.splits["val"][0]
    assert str(image) in str(error.value)
    assert "data.corrupt_images=skip" in str(error.value) and "re-extract" in str(error.value)


def test_a_truncated_jpeg_is_replaced_by_the_next_image_under_skip_and_listed(folder, tmp_path):
    image = truncate_image(folder / "val" / CLASSES[1] / f"{CLASSES[1]}_0.JPEG")
    dm = datamodule(folder.parent, corrupt_images="skip")
    dm.setup()
    dm.trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"), world_size=1, global_rank=0)
    val = dm.splits["val"]
    index = [path for path, _ in val.samples].index(str(image))
    replaced, following = val[index], val[index + 1]
    assert torch.equal(replaced["x"], following["x"]) and replaced["target"] == following["target"] == 1
    batches = list(dm.val_dataloader())
    assert [batch["x"].shape[0] for batch in batches] == [4, 2]  # every batch keeps its size
    dm.teardown("fit")
    assert dm.data_info["skipped_while_loading"] == [str(image)]


@pytest.mark.parametrize("corrupt_images", ["error", "skip"])
def test_a_decode_error_in_a_loader_worker_names_the_path(folder, tmp_path, corrupt_images):
    image = truncate_image(folder / "val" / CLASSES[2] / f"{CLASSES[2]}_1.JPEG")
    dm = datamodule(folder.parent, num_workers=1, corrupt_images=corrupt_images)
    dm.setup()
    dm.trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"), world_size=1, global_rank=0)
    if corrupt_images == "error":
        # the worker's exception is re-raised in this process with the worker's traceback as its message
        with pytest.raises(UnreadableImageError, match="DataLoader worker") as error:
            list(dm.val_dataloader())
        assert str(image) in str(error.value) and "data.corrupt_images=skip" in str(error.value)
    else:
        assert sum(len(batch["target"]) for batch in dm.val_dataloader()) == 6
        dm.teardown("fit")  # what the worker skipped reaches metrics.json through the run directory's skip log
        assert dm.data_info["skipped_while_loading"] == [str(image)]
        assert list((tmp_path / "run" / "skipped_while_loading").glob("*.tsv"))


def test_the_decode_check_finds_truncated_images_and_serves_later_header_checks(folder, opened):
    image = truncate_image(folder / "train" / CLASSES[0] / f"{CLASSES[0]}_1.JPEG")
    with pytest.raises(ImageFolderError, match=f"cannot be decoded:\n  {image}: OSError: image file is truncated"):
        datamodule(folder.parent, check_images="decode").setup()
    opened.clear()
    dm = datamodule(folder.parent, corrupt_images="skip")  # a header check: the decode check's cache serves it
    dm.setup()
    assert opened == [] and dm.data_info["skipped_images"] == [str(image)]
    assert {e["level"] for e in dm.data_info["image_check"]["splits"].values()} == {"decode"}
    shutil.copy(folder / "train" / CLASSES[1] / f"{CLASSES[1]}_0.JPEG", image)  # repaired: a new listing
    dm = datamodule(folder.parent, check_images="decode")
    dm.setup()
    assert sources(dm) == {"train": "checked", "val": "cache"} and dm.data_info["skipped_images"] == []


def test_a_header_check_does_not_serve_a_decode_check_and_off_opens_nothing(folder, opened):
    datamodule(folder.parent).setup()
    opened.clear()
    dm = datamodule(folder.parent, check_images="decode")
    dm.setup()
    assert len(opened) == 18 and sources(dm) == {"train": "checked", "val": "checked"}
    opened.clear()
    dm = datamodule(folder.parent, check_images=False)
    dm.setup()
    assert opened == [] and dm.data_info["image_check"] == {"level": "off"}
    with pytest.raises(ValueError, match="data.check_images must be one of"):
        datamodule(folder.parent, check_images="full")


def test_a_run_lists_the_images_it_skipped_while_loading_in_metrics_json(tmp_path):
    from experiments.train import train

    data_dir = tmp_path / "data"
    extra = write_fixture(data_dir)
    name = f"{FIXTURE_CLASSES[0]}_0.JPEG"
    truncate_image(data_dir / FIXTURE_DATASET / "val" / FIXTURE_CLASSES[0] / name)  # the first image val loads
    cfg = compose_config(
        ["experiment=imagenet/hierarchical", f"paths.data_dir={data_dir}", f"paths.runs_dir={tmp_path / 'runs'}",
         "debug=fast_dev_run", "logger=csv", "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
         "data.corrupt_images=skip", "model.patch_size=2", "model.dims=[16,32,32]", "model.depths=[1,1,1]",
         "model.heads=[2,2,2]"] + [f"{key}={value}" for key, value in extra.items()]
    )
    train(cfg, tmp_path / "run")
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]
    assert data["skipped_while_loading"] == [f"$DATA_DIR/{FIXTURE_DATASET}/val/{FIXTURE_CLASSES[0]}/{name}"]
    assert data["skipped_images"] == [] and data["image_check"]["level"] == "header"
    assert data["image_check"]["splits"]["val"]["cache"] == f"$DATA_DIR/{FIXTURE_DATASET}/{CACHE_NAME}"


def test_truncated_images_are_never_padded_silently(folder, monkeypatch):
    image = truncate_image(folder / "val" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some imported code might set it
    with pytest.raises(TruncatedLoadingError, match="LOAD_TRUNCATED_IMAGES"):
        datamodule(folder.parent).setup()
    with pytest.raises(TruncatedLoadingError, match="data.corrupt_images=skip"):
        decode_rgb(str(image))


def test_a_folder_named_imagenet_must_hold_imagenet(tmp_path):
    root = write_image_folder(tmp_path / "imagenet", CLASSES, {"train": 1, "val": 1})
    with pytest.raises(ImageFolderError, match="holds 3 classes.*where imagenet has 1000"):
        load_layout(root)


def test_missing_data_is_reported_with_the_command(tmp_path):
    status = datamodule(tmp_path, dataset="imagenet").data_status()
    assert not status.available and "make data-imagenet" in status.detail
    with pytest.raises(ImageFolderError, match="make data-imagenet"):
        datamodule(tmp_path, dataset="imagenet").setup()


def test_holdout_val_picks_on_train_images_and_tests_on_val(folder):
    dm = datamodule(folder.parent, selection="holdout_val", holdout_per_class=1, seed=3)
    dm.setup()
    held, kept, test = (dm.splits[split].samples for split in ("val", "train", "test"))
    assert sorted(label for _, label in held) == [0, 1, 2]
    assert not set(held) & set(kept) and len(kept) == 9
    assert test == dm.layout.val
    with pytest.raises(ImageFolderError, match="holdout_per_class=4"):
        datamodule(folder.parent, selection="holdout_val", holdout_per_class=4).setup()


def test_digits_are_written_as_a_real_image_folder(tmp_path):
    counts = write_digits(tmp_path / "digits", size=24, val_fraction=0.2, seed=0)
    assert counts["train"] + counts["val"] == 1797 and counts["val"] == 360
    layout = load_layout(tmp_path / "digits")
    assert layout.classes == [str(d) for d in range(10)] and len(layout.val) == 360
    with Image.open(layout.train[0][0]) as image:
        assert image.format == "PNG" and image.size == (24, 24)


def test_digits_refuse_to_mix_with_an_earlier_split(tmp_path, capsys):
    out = tmp_path / "digits"
    write_digits(out, size=8, seed=0)
    with pytest.raises(DigitsExistError, match="--overwrite"):
        write_digits(out, size=8, seed=1)
    assert digits_main(["--out", str(out), "--size", "8", "--seed", "1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    counts = write_digits(out, size=8, seed=1, overwrite=True)
    names = {split: {path.name for path in (out / split).rglob("*.png")} for split in ("train", "val")}
    assert not names["train"] & names["val"]  # no image in both splits
    assert {split: len(found) for split, found in names.items()} == counts


def test_randaugment_survives_posterize_to_zero_bits(folder):
    # rand-m9-mstd0.5-inc1 asks for 0 bits now and then (magnitude noise reaching 10); Pillow 13 raises on it, so
    # pyproject keeps Pillow below 13, where 0 bits give the black image the official run trained on
    dm = datamodule(folder.parent, train_transform={"auto_augment": "rand-m9-mstd0.5-inc1"})
    dm.setup()
    rand_augment = next(t for t in dm.splits["train"].transform.transforms if type(t).__name__ == "RandAugment")
    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    kept_bits, results = [], []
    apply = posterize.aug_fn

    def spy(image, bits, **kwargs):
        kept_bits.append(bits)
        results.append(apply(image, bits, **kwargs))
        return results[-1]

    posterize.aug_fn = spy
    image = Image.new("RGB", (8, 8), (100, 150, 200))
    random.seed(0)  # timm draws the ops with numpy and their magnitudes with random
    np.random.seed(0)
    for _ in range(3000):
        rand_augment(image)
        if 0 in kept_bits:
            break
    assert 0 in kept_bits, "3000 draws asked for no 0-bit posterize: this test tested nothing"
    assert results[kept_bits.index(0)].getextrema() == ((0, 0),) * 3
