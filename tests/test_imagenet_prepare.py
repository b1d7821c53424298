"""`make data-imagenet` on fixtures in the real formats: a flat val folder sorted into class folders from the
devkit's meta.mat and ground-truth file (unpacked or as the tar.gz), the messages when files are missing, and the
final image check, which decodes every image and fills the cache that training runs read."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from PIL import Image

from tasks.imagenet.data import ImageFolderDataModule
from tasks.imagenet.layout import CACHE_NAME, ImageFolderError, unreadable_images
from tasks.imagenet.prepare import PrepareError, main, prepare, read_devkit, sort_val_folder
from tests.fixtures.imagenet import truncate_image, write_devkit, write_image, write_image_folder

WNIDS = ["n01440764", "n01443537", "n01484850"]
LABELS = [2, 1, 3, 1, 3]  # ILSVRC2012_ID of val images 1..5


def flat_val(folder, count):
    rng = np.random.default_rng(0)
    return [write_image(folder / f"ILSVRC2012_val_{i:08d}.JPEG", rng) for i in range(1, count + 1)]


def test_flat_val_is_sorted_into_class_folders_from_the_devkit(tmp_path):
    root = write_image_folder(tmp_path / "subset", WNIDS, {"train": 2})
    images = flat_val(root / "val", len(LABELS))
    write_devkit(tmp_path / "ILSVRC2012_devkit_t12", WNIDS, LABELS)
    prepare(root, devkit=tmp_path / "ILSVRC2012_devkit_t12", workers=0)
    for image, label in zip(images, LABELS):
        assert (root / "val" / WNIDS[label - 1] / image.name).is_file()
    assert not any(path.is_file() for path in (root / "val").iterdir())


def test_the_devkit_archive_is_read_like_its_folder(tmp_path):
    folder = write_devkit(tmp_path / "ILSVRC2012_devkit_t12", WNIDS, LABELS)
    archive = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    assert read_devkit(archive) == read_devkit(folder) == [WNIDS[label - 1] for label in LABELS]


def test_a_val_folder_that_disagrees_with_the_ground_truth_is_left_alone(tmp_path):
    images = flat_val(tmp_path / "val", 3)
    with pytest.raises(PrepareError, match="holds 3 files but the ground truth lists 5"):
        sort_val_folder(tmp_path / "val", [WNIDS[label - 1] for label in LABELS])
    assert all(image.is_file() for image in images)


def test_missing_archives_explain_how_to_obtain_imagenet(tmp_path, capsys):
    assert main(["--root", str(tmp_path / "imagenet")]) == 1
    message = capsys.readouterr().err
    assert "ILSVRC2012_img_train.tar" in message and "image-net.org" in message and "account" in message


def test_a_prepared_subset_fails_the_imagenet_counts(tmp_path):
    root = write_image_folder(tmp_path / "imagenet", WNIDS, {"train": 1, "val": 1})
    with pytest.raises(ImageFolderError, match="1000"):
        prepare(root, workers=0)


def test_the_image_check_runs_in_worker_processes(tmp_path):
    good = flat_val(tmp_path, 3)
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"not an image")
    truncated = truncate_image(good.pop())
    paths = [str(path) for path in good] * 200 + [str(broken), str(truncated)]
    failures = unreadable_images(paths, workers=2)
    assert [path for path, _ in failures] == [str(broken)] and failures == unreadable_images(paths, workers=0)
    decoded = unreadable_images(paths, workers=2, level="decode")
    assert [path for path, _ in decoded] == [str(broken), str(truncated)]
    assert decoded == unreadable_images(paths, workers=0, level="decode")


def test_prepare_decodes_every_image_and_fills_the_cache_that_training_reads(tmp_path, monkeypatch, capsys):
    root = write_image_folder(tmp_path / "subset", WNIDS, {"train": 2})
    flat_val(root / "val", len(LABELS))
    write_devkit(tmp_path / "ILSVRC2012_devkit_t12", WNIDS, LABELS)
    truncated = truncate_image(root / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG")
    devkit = ["--devkit", str(tmp_path / "ILSVRC2012_devkit_t12"), "--workers", "0"]
    assert main(["--root", str(root), *devkit]) == 1
    assert f"{truncated}: OSError: image file is truncated" in capsys.readouterr().err
    write_image(truncated, np.random.default_rng(3))  # re-extracted
    assert main(["--root", str(root), *devkit]) == 0
    assert "every image decodes" in capsys.readouterr().out and (root / CACHE_NAME).is_file()
    opened, real_open = [], Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    dm = ImageFolderDataModule(dataset=root.name, data_dir=root.parent, num_workers=0, batch_size=4)
    dm.setup("fit")  # the first training run: its header check reads the decode check's result
    assert opened == [] and {e["source"] for e in dm.data_info["image_check"]["splits"].values()} == {"cache"}


def test_an_interrupted_train_unpacking_is_finished_on_rerun(tmp_path):
    # torchvision had unpacked the first class, was unpacking the third (one of its two images out, its tar still
    # there) and had not reached the second
    root = tmp_path / "subset"
    rng = np.random.default_rng(0)
    train = root / "train"
    done = write_image(train / WNIDS[0] / f"{WNIDS[0]}_1.JPEG", rng)
    for wnid in WNIDS[1:]:
        images = [write_image(tmp_path / "staging" / wnid / f"{wnid}_{i}.JPEG", rng) for i in (1, 2)]
        with tarfile.open(train / f"{wnid}.tar", "w") as tar:
            for image in images:
                tar.add(image, arcname=image.name)
    (train / WNIDS[2]).mkdir()
    (train / WNIDS[2] / f"{WNIDS[2]}_1.JPEG").write_bytes(b"\xff\xd8 cut off by the interruption")
    flat_val(root / "val", len(LABELS))
    write_devkit(tmp_path / "ILSVRC2012_devkit_t12", WNIDS, LABELS)
    prepare(root, devkit=tmp_path / "ILSVRC2012_devkit_t12", workers=0)  # checks that every image opens
    assert sorted(path.name for path in train.iterdir()) == WNIDS  # no tar left
    assert done.is_file() and all(len(list((train / wnid).iterdir())) == 2 for wnid in WNIDS[1:])
    for wnid in WNIDS[1:]:
        for i in (1, 2):
            name = f"{wnid}_{i}.JPEG"
            assert (train / wnid / name).read_bytes() == (tmp_path / "staging" / wnid / name).read_bytes()
