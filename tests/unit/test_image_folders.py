"""Image-folder datasets (methods/data/folders.py) on tiny JPEG/PNG files written into tmp_path in the real
layout (train/<class>/*, test/<class>/*), as a folder and as a tar archive. A 3-class DatasetInfo built with
dataclasses.replace keeps the global registry untouched; the registered cifar10_jpeg goes through load_raw.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from methods.data.base import MissingDataError, load_raw, load_splits
from methods.data.configs import CIFAR10_JPEG_INFO, DataConfig, absent_dataset, cache_path
from methods.data.folders import FolderError, image_folder_source
from methods.data.real import load_cached

# Declared order on purpose not alphabetical, with a different image count per class, so a count per label
# tells which order the loader used (sorted would give apple 0, mango 1, zebra 2).
CLASSES = ("zebra", "apple", "mango")
TRAIN_COUNT = {"zebra": 5, "apple": 2, "mango": 3}
TINY = dataclasses.replace(
    CIFAR10_JPEG_INFO, name="tiny_folder", folder="tiny", archive="tiny.tar.gz", classes=CLASSES, num_classes=3
)
REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _rng_image(rng: np.random.Generator, size: int = 32, channels: int = 3) -> np.ndarray:
    shape = (size, size, channels) if channels > 1 else (size, size)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_tree(base: Path, classes=CLASSES, train=None, test=1, suffix=".png", seed=0) -> dict:
    """base/{train,test}/<class>/NNNN<suffix>; returns {split: [(class, array written)]}."""
    rng, written = np.random.default_rng(seed), {"train": [], "test": []}
    for split in ("train", "test"):
        for name in classes:
            folder = base / split / name
            folder.mkdir(parents=True)
            count = (train or TRAIN_COUNT).get(name, 2) if split == "train" else test
            for i in range(count):
                pixels = _rng_image(rng)
                Image.fromarray(pixels).save(folder / f"{i:04d}{suffix}")
                written[split].append((name, pixels))
    return written


def make_archive(tree: Path, archive: Path, prefix: str = "") -> None:
    """A tar.gz whose members are <prefix>train/<class>/0000.jpg (no folder of the dataset's name on top)."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=prefix + path.relative_to(tree).as_posix(), recursive=False)


def load(info, root: Path):
    return load_cached(image_folder_source(info), root, download=False)


def counts(labels: torch.Tensor, n: int) -> list[int]:
    return torch.bincount(labels, minlength=n).tolist()


# ------------------------------------------------------------------------------------------- layouts, labels


@pytest.mark.parametrize("prefix", ["", "./"])
def test_folder_and_archive_give_the_same_tensors(tmp_path, prefix):
    write_tree(tmp_path / "a" / "tiny", suffix=".jpg")
    from_folder = load(TINY, tmp_path / "a")
    (tmp_path / "b").mkdir()
    make_archive(tmp_path / "a" / "tiny", tmp_path / "b" / "tiny.tar.gz", prefix)
    from_archive = load(TINY, tmp_path / "b")
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(from_folder, key), getattr(from_archive, key)), key
    assert from_archive.x_train.dtype == torch.uint8 and from_archive.x_train.shape == (10, 3, 32, 32)
    assert from_archive.y_train.dtype == torch.int64 and from_archive.x_test.shape == (3, 3, 32, 32)
    assert counts(from_archive.y_train, 3) == [5, 2, 3]  # zebra 0, apple 1, mango 2: the declared order


def test_without_a_class_list_labels_follow_the_sorted_folder_names(tmp_path):
    write_tree(tmp_path / "tiny")
    raw = load(dataclasses.replace(TINY, classes=()), tmp_path)
    assert counts(raw.y_train, 3) == [2, 3, 5]  # apple, mango, zebra


def test_registered_cifar10_jpeg_uses_cifar10_label_order(tmp_path):
    classes = CIFAR10_JPEG_INFO.classes
    written = write_tree(tmp_path / "cifar10-jpeg", classes, train={c: 1 + i % 2 for i, c in enumerate(classes)})
    raw = load_raw("cifar10_jpeg", tmp_path)
    # CIFAR-10's label order happens to be alphabetical too, so this pins the mapping of the registered dataset;
    # declared-versus-sorted order is told apart by the TINY tests above.
    assert raw.info.name == "cifar10_jpeg" and raw.x_train.shape == (15, 3, 32, 32)
    by_pixels = {pixels.tobytes(): name for name, pixels in written["train"]}
    stored = {by_pixels[x.permute(1, 2, 0).numpy().tobytes()]: int(y) for x, y in zip(raw.x_train, raw.y_train)}
    assert stored["airplane"] == 0 and stored["truck"] == 9 and stored["cat"] == 3
    assert stored == {name: label for label, name in enumerate(classes)}


def test_png_decodes_pixel_exact_with_the_right_labels(tmp_path):
    written = write_tree(tmp_path / "tiny")
    raw = load(TINY, tmp_path)
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        # The stored order is shuffled: match each written image by content, then compare its label.
        expected = sorted((pixels.tobytes(), CLASSES.index(name)) for name, pixels in written[split])
        got = sorted((img.permute(1, 2, 0).numpy().tobytes(), int(label)) for img, label in zip(x, y))
        assert got == expected, split


def test_stored_order_is_a_fixed_shuffle_not_class_by_class(tmp_path):
    train = dict.fromkeys(CLASSES, 8)
    write_tree(tmp_path / "one" / "tiny", train=train)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    first, second = load(TINY, tmp_path / "one"), load(TINY, tmp_path / "two")  # two separate conversions
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_train, second.y_train)
    # Class by class, the first 8 of 24 would all be zebra (what data.train_limit keeps would be one class).
    assert len(set(first.y_train[:8].tolist())) > 1
    assert first.y_train.tolist() != sorted(first.y_train.tolist())


# ------------------------------------------------------------------------------------------- cache


def test_second_load_reads_the_cache_without_the_sources(tmp_path):
    write_tree(tmp_path / "tiny", suffix=".jpg")
    first = load(TINY, tmp_path)
    assert cache_path(tmp_path, "tiny_folder").is_file()
    shutil.rmtree(tmp_path / "tiny")
    second = load(TINY, tmp_path)  # would raise MissingDataError if it looked for the sources
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)


@pytest.mark.parametrize("how", ["chmod", "cache_dir_blocked"])
def test_unwritable_data_root_still_loads(tmp_path, how):
    root = tmp_path / "root"
    written = write_tree(root / "tiny")
    if how == "chmod":
        root.chmod(0o555)
        if os.access(root, os.W_OK):  # root ignores the mode bits
            root.chmod(0o755)
            pytest.skip("running as a user who can write a 0o555 folder (root)")
    else:  # a file where the cache folder goes: mkdir fails as on a read-only root, whoever runs the test
        (root / "bdo_cache").write_text("not a folder")
    try:
        raw = load(TINY, root)
    finally:
        root.chmod(0o755)
    assert len(raw.y_train) == len(written["train"]) and not cache_path(root, "tiny_folder").exists()


# ------------------------------------------------------------------------------------------- bad inputs


def test_missing_root_names_folder_and_archive(tmp_path):
    root = tmp_path / "data"
    line = absent_dataset(CIFAR10_JPEG_INFO, root)
    assert line is not None and str(root / "cifar10-jpeg") in line and str(root / "cifar10-jpeg.tar.gz") in line
    with pytest.raises(MissingDataError) as caught:
        load_raw("cifar10_jpeg", root)
    assert str(caught.value) == line and "\n" not in line
    assert not root.exists()  # nothing created under a root that does not hold the data


def _bad_image(path: Path, kind: str) -> None:
    rng = np.random.default_rng(1)
    if kind == "corrupt":
        path.write_bytes(rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    elif kind == "L":
        Image.fromarray(_rng_image(rng, channels=1)).save(path)
    elif kind == "RGBA":
        Image.fromarray(_rng_image(rng, channels=4), "RGBA").save(path)
    else:  # "28x28"
        Image.fromarray(_rng_image(rng, size=28)).save(path)


@pytest.mark.parametrize(
    "kind, suffix, expected",
    [
        ("corrupt", ".jpg", "could not be decoded"),
        ("L", ".png", "is a L image"),
        ("RGBA", ".png", "is a RGBA image"),
        ("28x28", ".png", "is 28x28"),
    ],
)
def test_bad_image_names_the_file(tmp_path, kind, suffix, expected):
    write_tree(tmp_path / "tiny")
    bad = tmp_path / "tiny" / "train" / "apple" / f"bad{suffix}"
    _bad_image(bad, kind)
    with pytest.raises(FolderError, match=expected) as caught:
        load(TINY, tmp_path)
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)
    assert not cache_path(tmp_path, "tiny_folder").exists()


def test_bad_image_inside_an_archive_names_the_member(tmp_path):
    write_tree(tmp_path / "tree")
    _bad_image(tmp_path / "tree" / "test" / "mango" / "bad.jpg", "corrupt")
    make_archive(tmp_path / "tree", tmp_path / "tiny.tar.gz")
    with pytest.raises(FolderError, match="could not be decoded") as caught:
        load(TINY, tmp_path)
    assert f"{tmp_path / 'tiny.tar.gz'}:test/mango/bad.jpg" in str(caught.value)


def test_resize_true_accepts_and_resizes_another_size(tmp_path):
    write_tree(tmp_path / "tiny", train=dict.fromkeys(CLASSES, 0) | {"apple": 1})  # one 32x32 train image
    small = _rng_image(np.random.default_rng(2), size=28)
    Image.fromarray(small).save(tmp_path / "tiny" / "train" / "zebra" / "small.png")
    Image.fromarray(small).save(tmp_path / "tiny" / "train" / "mango" / "small.png")
    raw = load(dataclasses.replace(TINY, resize=True), tmp_path)
    assert raw.x_train.shape == (3, 3, 32, 32)
    expected = np.asarray(Image.fromarray(small).resize((32, 32), Image.Resampling.BILINEAR))
    zebra = raw.x_train[raw.y_train == 0][0]
    assert np.array_equal(zebra.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize(
    "damage, named",
    [
        ("test_class_removed", "test/apple is missing"),
        ("test_class_empty", "test/apple is missing"),
        ("extra_class", "train/kiwi is not one of the declared classes"),
        ("test_split_removed", "test is not a folder"),
    ],
)
def test_bad_layout_names_the_folder(tmp_path, damage, named):
    write_tree(tmp_path / "tiny")
    base = tmp_path / "tiny"
    if damage == "test_class_removed":
        shutil.rmtree(base / "test" / "apple")
    elif damage == "test_class_empty":  # a folder with no image counts as missing
        for path in (base / "test" / "apple").iterdir():
            path.unlink()
        (base / "test" / "apple" / "notes.txt").write_text("not an image")
    elif damage == "extra_class":
        write_tree(base, classes=("kiwi",), seed=5)
    else:
        shutil.rmtree(base / "test")
    with pytest.raises(MissingDataError) as caught:
        load(TINY, tmp_path)
    assert isinstance(caught.value, FolderError)
    assert f"{base}/{named}" in str(caught.value) and "\n" not in str(caught.value)


def test_wrong_class_count_without_a_class_list(tmp_path):
    write_tree(tmp_path / "tiny")
    with pytest.raises(FolderError, match=r"train holds 3 classes; tiny_folder is declared with 4"):
        load(dataclasses.replace(TINY, classes=(), num_classes=4), tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_archive_raises_one_line_naming_it(tmp_path, damage):
    write_tree(tmp_path / "tree", suffix=".jpg")
    archive = tmp_path / "tiny.tar.gz"
    make_archive(tmp_path / "tree", archive)
    good = archive.read_bytes()
    archive.write_bytes(os.urandom(2000) if damage == "garbage" else good[: len(good) // 2])
    with pytest.raises(MissingDataError) as caught:
        load(TINY, tmp_path)
    assert str(archive) in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------- CLI layer


@pytest.mark.parametrize("state", ["nothing", "class_missing"])
def test_check_data_turns_missing_data_into_one_line_bad_input(tmp_path, state):
    from orchestrator.errors import BadInput
    from orchestrator.resolve import check_data, resolve_run

    spec = resolve_run("badnets", "cifar10_jpeg", "small_cnn")
    if state == "class_missing":
        write_tree(tmp_path / "cifar10-jpeg", CIFAR10_JPEG_INFO.classes[:-1])  # no truck
    with pytest.raises(BadInput) as caught:
        check_data(spec, SimpleNamespace(data_root=tmp_path, download=False))
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "cifar10-jpeg") in message
    assert ("cifar10-jpeg.tar.gz" in message) if state == "nothing" else ("train/truck is missing" in message)


# ------------------------------------------------------------------------------------------- the real copy


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_DATA / "cifar10-jpeg.tar.gz").is_file(),
    reason=f"the real CIFAR-10 JPEG archive is not at {REAL_DATA} (the project's machines only)",
)
def test_real_cifar10_jpeg_archive(tmp_path):
    (tmp_path / "cifar10-jpeg.tar.gz").symlink_to(REAL_DATA / "cifar10-jpeg.tar.gz")
    raw = load_raw("cifar10_jpeg", tmp_path)
    assert raw.x_train.shape == (50_000, 3, 32, 32) and raw.x_test.shape == (10_000, 3, 32, 32)
    assert counts(raw.y_train, 10) == [5000] * 10 and counts(raw.y_test, 10) == [1000] * 10
    assert all(800 <= n <= 1200 for n in counts(raw.y_train[:10_000], 10))
    # What a run with data.train_limit=10000 trains on (after the validation split), read from the cache.
    splits = load_splits("cifar10_jpeg", 0, tmp_path, cfg=DataConfig(train_limit=10_000))
    assert len(splits.y_train) == 10_000 and all(800 <= n <= 1200 for n in counts(splits.y_train, 10))
