"""The real-dataset builders (methods/data/real.py) on tiny copies of each official on-disk format.

Every fixture writes a few images per class in the exact layout the real download unpacks to, so the builders run
their real parsing code (torchvision's dataset classes, or the Tiny ImageNet parser) without any network.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import methods  # noqa: F401  (registers every dataset)
from methods.core.registry import DATASETS
from methods.data import real
from methods.data.base import MissingDataError, load_raw, load_splits

NAMES = ("cifar10", "cifar100", "mnist", "gtsrb", "celeba8", "tiny_imagenet")
SOURCE_FOLDER = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "mnist": "MNIST",
    "gtsrb": "gtsrb",
    "celeba8": "celeba",
    "tiny_imagenet": "tiny-imagenet-200",
}
EXPECTED_PATH = {**SOURCE_FOLDER, "mnist": "MNIST/raw"}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _skip_md5(monkeypatch):
    """torchvision compares the md5 of the real CIFAR and CelebA files with the published checksums, which our
    tiny stand-ins cannot match. Bypass ONLY that checksum comparison: the file must still exist."""
    import torchvision.datasets.celeba as tv_celeba
    import torchvision.datasets.cifar as tv_cifar

    def exists_only(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(tv_cifar, "check_integrity", exists_only)
    monkeypatch.setattr(tv_celeba, "check_integrity", exists_only)


# ------------------------------------------------------------------------------------------- file writers


def write_cifar10(root: Path, per_batch: int = 6) -> dict:
    """Five training pickles and a test pickle as in cifar-10-python.tar.gz: dicts with data (N, 3072) uint8 in
    CHW order, labels, filenames, batch_label; plus batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = _rng(10)
    known = {}
    all_train = []
    for b, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(per_batch) + b) % 10]
        entry = {
            "batch_label": f"batch {b}",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        if name == "test_batch":
            known["test"] = (data, labels)
        else:
            all_train.append((data, labels))
    known["train"] = (np.concatenate([d for d, _ in all_train]), sum((lab for _, lab in all_train), []))
    meta = {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "num_cases_per_batch": per_batch,
        "num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return known


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> dict:
    """`train` and `test` pickles with fine_labels / coarse_labels, and `meta` with the label names."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = _rng(100)
    known = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in np.arange(n) % 100]
        entry = {
            "filenames": [f"{name}_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": fine,
            "coarse_labels": [v // 5 for v in fine],
            "data": data,
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        known[name] = (data, fine)
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return known


def _idx(array: np.ndarray) -> bytes:
    """IDX (ubyte) encoding: magic 0x0000 0x08 <ndim>, big-endian int32 sizes, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = 30, n_test: int = 20) -> dict:
    """MNIST/raw with the training files uncompressed (what torchvision reads) and the test files still .gz, as
    published: the builder must unpack them itself."""
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = _rng(28)
    known = {}
    for prefix, n, packed in (("train", n_train, False), ("t10k", n_test, True)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            payload = _idx(array)
            if packed:
                (folder / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / f"{prefix}-{kind}").write_bytes(payload)
        known["train" if prefix == "train" else "test"] = (images, labels)
    return known


def write_gtsrb(root: Path) -> dict:
    """gtsrb/GTSRB/Training/000CC/*.ppm (+ GT-000CC.csv) for all 43 classes, and the test images in
    gtsrb/GTSRB/Final_Test/Images with their labels in gtsrb/GT-final_test.csv (';'-separated, ClassId column)."""
    base = root / "gtsrb"
    rng = _rng(43)
    known = {}
    for c in range(43):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for track, size in enumerate((32, 41) if c % 10 == 0 else (29,)):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            name = f"{track:05d}_00000.ppm"
            Image.fromarray(pixels).save(folder / name)
            rows.append(f"{name};{size};{size};5;5;{size - 5};{size - 5};{c}")
            if size == 32:
                known.setdefault("train32", []).append((c, pixels))
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")
    images = base / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    test_labels = [7, 42, 0, 13, 7]
    for i, c in enumerate(test_labels):
        size = 32 if i == 1 else 50 + i
        pixels = rng.integers(0, 256, size=(size + 3, size, 3), dtype=np.uint8)  # not square, like real signs
        if i == 1:
            pixels = pixels[:32]
            known["test32"] = (i, c, pixels)
        Image.fromarray(pixels).save(images / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;{pixels.shape[1]};{pixels.shape[0]};5;5;20;20;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    known["test_labels"] = test_labels
    return known


CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()


def write_celeba(root: Path) -> dict:
    """celeba/img_align_celeba/NNNNNN.jpg (178x218) and the five annotation text files, each in the layout of
    the official release (count line and header line where the release has them; -1/1 attributes)."""
    base = root / "celeba"
    images = base / "img_align_celeba"
    images.mkdir(parents=True)
    rng = _rng(8)
    # partition 0 = train, 1 = valid, 2 = test; train covers all 8 bit patterns of (makeup, smiling, mouth open).
    plan = [(0, code) for code in range(8)] + [(1, 3), (1, 5), (2, 6), (2, 1), (2, 0)]
    attr_rows, part_rows, id_rows, bbox_rows, lm_rows = [], [], [], [], []
    known = {"train_labels": [], "test_labels": [], "files": []}
    for i, (partition, code) in enumerate(plan):
        name = f"{i + 1:06d}.jpg"
        attrs = rng.choice([-1, 1], size=40)
        for bit, index in zip((4, 2, 1), (18, 31, 21)):
            attrs[index] = 1 if code & bit else -1
        colour = rng.integers(30, 226, size=3)
        pixels = np.empty((218, 178, 3), dtype=np.uint8)
        pixels[:] = 255 - colour  # top and bottom strips, cut off by the centre crop
        pixels[20:198] = colour  # the centred 178x178 square
        if i == 2:  # one image already 64x64 (no crop, no resize): must decode to exactly what PIL decodes
            pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name, quality=95)
        known["files"].append((partition, name, colour, i == 2))
        attr_rows.append(name + " " + " ".join(f"{v:2d}" for v in attrs))
        part_rows.append(f"{name} {partition}")
        id_rows.append(f"{name} {1000 + i}")
        bbox_rows.append(f"{name}    95  71 226 313")
        lm_rows.append(f"{name} 69  109  106  113   77  142   73  152  108  154")
        if partition == 0:
            known["train_labels"].append(code)
        elif partition == 2:
            known["test_labels"].append(code)
    n = len(plan)
    (base / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(CELEBA_ATTRS) + " \n" + "\n".join(attr_rows) + "\n")
    (base / "list_eval_partition.txt").write_text("\n".join(part_rows) + "\n")
    (base / "identity_CelebA.txt").write_text("\n".join(id_rows) + "\n")
    (base / "list_bbox_celeba.txt").write_text(f"{n}\nimage_id x_1 y_1 width height\n" + "\n".join(bbox_rows) + "\n")
    lm_header = " ".join(
        f"{part}_{axis}" for part in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth") for axis in "xy"
    )
    (base / "list_landmarks_align_celeba.txt").write_text(f"{n}\n{lm_header}\n" + "\n".join(lm_rows) + "\n")
    return known


def write_tiny_imagenet(root: Path) -> dict:
    """tiny-imagenet-200 as unzipped: wnids.txt (not sorted), words.txt, train/<wnid>/images/<wnid>_K.JPEG with
    <wnid>_boxes.txt, val/images/val_K.JPEG with val/val_annotations.txt (tab-separated), test/images (unlabelled)."""
    base = root / "tiny-imagenet-200"
    rng = _rng(200)
    wnids = [f"n{int(v):08d}" for v in rng.choice(10**8, size=200, replace=False)]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("\n".join(f"{w}\tthing {w}" for w in wnids) + "\n")
    order = sorted(wnids)
    known = {"order": order}
    for k, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        count = 2 if k < 3 else 1
        for j in range(count):
            pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            if k == 1 and j == 0:  # some real Tiny ImageNet images are greyscale JPEGs
                Image.fromarray(pixels[:, :, 0]).save(folder / f"{wnid}_{j}.JPEG")
            else:
                Image.fromarray(pixels).save(folder / f"{wnid}_{j}.JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    (base / "val" / "images").mkdir(parents=True)
    val_rows = []
    val_classes = [wnids[5], wnids[0], wnids[199], wnids[5]]
    for i, wnid in enumerate(val_classes):
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "val" / "images" / f"val_{i}.JPEG")
        val_rows.append(f"val_{i}.JPEG\t{wnid}\t0\t32\t44\t62")
    (base / "val" / "val_annotations.txt").write_text("\n".join(val_rows) + "\n")
    (base / "test" / "images").mkdir(parents=True)
    unlabelled = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(unlabelled).save(base / "test" / "images" / "test_0.JPEG")
    known["val"] = [(f"val_{i}.JPEG", order.index(w)) for i, w in enumerate(val_classes)]
    known["wnids"] = wnids
    return known


WRITERS = {
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "mnist": write_mnist,
    "gtsrb": write_gtsrb,
    "celeba8": write_celeba,
    "tiny_imagenet": write_tiny_imagenet,
}


def _check_common(raw, name: str) -> None:
    info = raw.info
    assert info.name == name
    for x, y in ((raw.x_train, raw.y_train), (raw.x_test, raw.y_test)):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.shape[1:] == (info.channels, info.size, info.size)
        assert x.is_contiguous() and len(x) == len(y) > 0
        assert 0 <= int(y.min()) and int(y.max()) < info.num_classes
    assert len(info.mean) == len(info.std) == info.channels
    assert info.val_fraction == 0.05


# ------------------------------------------------------------------------------------------- tests


def test_all_real_datasets_registered_with_sane_info():
    expected = {
        "cifar10": (10, 3, 32),
        "cifar100": (100, 3, 32),
        "mnist": (10, 1, 28),
        "gtsrb": (43, 3, 32),
        "celeba8": (8, 3, 64),
        "tiny_imagenet": (200, 3, 64),
    }
    infos = {
        i.name: i
        for i in (
            real.CIFAR10_INFO,
            real.CIFAR100_INFO,
            real.MNIST_INFO,
            real.GTSRB_INFO,
            real.CELEBA8_INFO,
            real.TINY_IMAGENET_INFO,
        )
    }
    for name, (classes, channels, size) in expected.items():
        assert name in DATASETS
        info = infos[name]
        assert (info.num_classes, info.channels, info.size) == (classes, channels, size)
        assert all(0 < s < 1 for s in info.std) and all(0 < m < 1 for m in info.mean)
    assert not real.MNIST_INFO.hflip and not real.GTSRB_INFO.hflip
    assert real.CIFAR10_INFO.hflip and real.CELEBA8_INFO.hflip


def test_cifar10_parses_pickle_batches(tmp_path):
    known = write_cifar10(tmp_path)
    raw = load_raw("cifar10", tmp_path)
    _check_common(raw, "cifar10")
    assert raw.x_train.shape == (30, 3, 32, 32) and raw.x_test.shape == (6, 3, 32, 32)
    data, labels = known["train"]
    # row layout is 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    assert torch.equal(raw.x_train, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert raw.y_train.tolist() == labels
    data, labels = known["test"]
    assert torch.equal(raw.x_test[3], torch.from_numpy(data[3].reshape(3, 32, 32)))
    assert raw.y_test.tolist() == labels


def test_cifar100_uses_fine_labels(tmp_path):
    known = write_cifar100(tmp_path)
    raw = load_raw("cifar100", tmp_path)
    _check_common(raw, "cifar100")
    assert raw.x_train.shape == (200, 3, 32, 32) and raw.x_test.shape == (100, 3, 32, 32)
    assert raw.y_train.tolist() == known["train"][1]
    assert sorted(set(raw.y_test.tolist())) == list(range(100))
    assert torch.equal(raw.x_test[57], torch.from_numpy(known["test"][0][57].reshape(3, 32, 32)))


def test_mnist_parses_idx_files_plain_and_gz(tmp_path):
    known = write_mnist(tmp_path)
    raw = load_raw("mnist", tmp_path)
    _check_common(raw, "mnist")
    assert raw.x_train.shape == (30, 1, 28, 28) and raw.x_test.shape == (20, 1, 28, 28)
    assert torch.equal(raw.x_train[:, 0], torch.from_numpy(known["train"][0]))
    assert torch.equal(raw.x_test[:, 0], torch.from_numpy(known["test"][0]))  # came from the .gz files
    assert raw.y_test.tolist() == known["test"][1].tolist()


def test_gtsrb_parses_folders_and_csv_and_resizes_to_32(tmp_path):
    known = write_gtsrb(tmp_path)
    raw = load_raw("gtsrb", tmp_path)
    _check_common(raw, "gtsrb")
    assert raw.x_train.shape == (43 + 5, 3, 32, 32)  # one image per class, two in classes 0, 10, ..., 40
    assert sorted(set(raw.y_train.tolist())) == list(range(43))  # class folder 000CC -> label CC
    assert raw.y_test.tolist() == known["test_labels"]  # ClassId column of GT-final_test.csv, in CSV order
    assert raw.x_test.shape == (5, 3, 32, 32)
    # a 32x32 image is stored untouched (ppm is lossless)
    label, pixels = known["train32"][2]
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    hits = [i for i in range(len(raw.y_train)) if torch.equal(raw.x_train[i], chw)]
    assert len(hits) == 1 and raw.y_train[hits[0]] == label == 20
    i, label, pixels = known["test32"]
    assert torch.equal(raw.x_test[i], torch.from_numpy(pixels).permute(2, 0, 1)) and raw.y_test[i] == label


def test_celeba8_combines_three_attributes_and_crops_to_64(tmp_path):
    known = write_celeba(tmp_path)
    raw = load_raw("celeba8", tmp_path)
    _check_common(raw, "celeba8")
    assert raw.x_train.shape == (8, 3, 64, 64) and raw.x_test.shape == (3, 3, 64, 64)  # valid split left out
    # label = Heavy_Makeup * 4 + Smiling * 2 + Mouth_Slightly_Open
    assert raw.y_train.tolist() == known["train_labels"] == list(range(8))
    assert raw.y_test.tolist() == known["test_labels"]
    train_files = [f for f in known["files"] if f[0] == 0]
    for k, (_, name, colour, exact) in enumerate(train_files):
        if exact:  # 64x64 source: the decoded JPEG, pixel for pixel
            with Image.open(tmp_path / "celeba" / "img_align_celeba" / name) as image:
                decoded = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
            assert torch.equal(raw.x_train[k], decoded)
        else:  # the centre square has one colour; the strips cut off by the crop have another
            inner = raw.x_train[k][:, 4:-4, 4:-4].float().mean(dim=(1, 2))
            assert torch.allclose(inner, torch.tensor(colour, dtype=torch.float32), atol=4.0), (inner, colour)


def test_celeba8_rejects_unexpected_attribute_columns(tmp_path):
    write_celeba(tmp_path)
    attr = tmp_path / "celeba" / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    names = lines[1].split()
    names[18], names[20] = names[20], names[18]
    lines[1] = " ".join(names)
    attr.write_text("\n".join(lines) + "\n")
    with pytest.raises(MissingDataError, match="Heavy_Makeup"):
        load_raw("celeba8", tmp_path)


def test_tiny_imagenet_parses_folders_with_val_as_test(tmp_path):
    known = write_tiny_imagenet(tmp_path)
    raw = load_raw("tiny_imagenet", tmp_path)
    _check_common(raw, "tiny_imagenet")
    assert raw.x_train.shape == (203, 3, 64, 64) and raw.x_test.shape == (4, 3, 64, 64)
    assert sorted(set(raw.y_train.tolist())) == list(range(200))
    assert raw.y_test.tolist() == [label for _, label in known["val"]]  # sorted-wnid numbering
    base = tmp_path / "tiny-imagenet-200"
    with Image.open(base / "val" / "images" / "val_2.JPEG") as image:
        assert torch.equal(raw.x_test[2], torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
    # the greyscale image of the second listed class becomes three equal channels
    wnid = known["wnids"][1]
    label = known["order"].index(wnid)
    first = int((raw.y_train == label).nonzero()[0])
    with Image.open(base / "train" / wnid / "images" / f"{wnid}_0.JPEG") as image:
        grey = torch.from_numpy(np.array(image))
    assert all(torch.equal(raw.x_train[first][c], grey) for c in range(3))


@pytest.mark.parametrize("name", NAMES)
def test_cache_is_written_and_then_used_without_the_sources(tmp_path, name):
    WRITERS[name](tmp_path)
    first = load_raw(name, tmp_path)
    cache = tmp_path / "bdo_cache" / f"{name}.safetensors"
    assert cache.is_file() and (tmp_path / "bdo_cache" / f"{name}.lock").exists()
    assert not [p for p in cache.parent.iterdir() if p.suffix == ".tmp"]  # no temp file left behind
    shutil.rmtree(tmp_path / SOURCE_FOLDER[name])
    second = load_raw(name, tmp_path)  # would raise MissingDataError if it looked at the sources
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, key), getattr(second, key))
    assert second.info == first.info


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong_contents"])
def test_damaged_cache_is_rebuilt_from_the_sources(tmp_path, damage):
    known = write_cifar10(tmp_path)
    load_raw("cifar10", tmp_path)
    cache = tmp_path / "bdo_cache" / "cifar10.safetensors"
    if damage == "garbage":
        cache.write_bytes(b"\x00\xffnot a safetensors file" * 10)
    elif damage == "truncated":
        good = cache.read_bytes()
        cache.write_bytes(good[: len(good) // 2])  # header intact, tensor bytes cut short
    elif damage == "empty":
        cache.write_bytes(b"")
    else:  # a valid safetensors file that is not this dataset
        from safetensors.torch import save_file

        save_file({"x_train": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, str(cache))
    raw = load_raw("cifar10", tmp_path)
    assert torch.equal(raw.x_train, torch.from_numpy(known["train"][0].reshape(-1, 3, 32, 32)))
    from safetensors.torch import load_file

    rewritten = load_file(str(cache))  # rewritten as a good cache
    assert sorted(rewritten) == ["x_test", "x_train", "y_test", "y_train"]
    assert torch.equal(rewritten["x_train"], raw.x_train) and torch.equal(rewritten["y_test"], raw.y_test)
    shutil.rmtree(tmp_path / "cifar-10-batches-py")
    assert torch.equal(load_raw("cifar10", tmp_path).x_train, raw.x_train)


def test_damaged_cache_without_sources_raises_missing_data(tmp_path):
    (tmp_path / "bdo_cache").mkdir()
    (tmp_path / "bdo_cache" / "mnist.safetensors").write_bytes(b"junk")
    with pytest.raises(MissingDataError, match="--download"):
        load_raw("mnist", tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_missing_dataset_raises_one_line_naming_path_and_fix(tmp_path, name):
    root = tmp_path / "data"
    with pytest.raises(MissingDataError) as caught:
        load_raw(name, root)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{name} not found at {root / EXPECTED_PATH[name]}")
    assert "--download" in message and "BDO_DATA_ROOT" in message
    assert not root.exists()  # nothing created under a root that does not hold the data


@pytest.mark.parametrize("name", NAMES)
def test_the_torch_free_check_says_what_the_loader_says(tmp_path, name):
    from methods.data.configs import DATASET_INFOS, absent_dataset

    info = DATASET_INFOS.get(name)
    root = tmp_path / "data"
    with pytest.raises(MissingDataError) as caught:
        load_raw(name, root)
    assert absent_dataset(info, root) == str(caught.value)
    (root / info.folder).mkdir(parents=True)
    assert absent_dataset(info, root) is None, "a folder is there: the loader decides what it lacks"


def test_the_cifar_folders_are_torchvisions():
    from torchvision import datasets

    assert real.CIFAR10_INFO.folder == datasets.CIFAR10.base_folder
    assert real.CIFAR100_INFO.folder == datasets.CIFAR100.base_folder


def test_partly_missing_dataset_names_the_missing_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(MissingDataError, match=r"missing data_batch_3\).*--download"):
        load_raw("cifar10", tmp_path)


def test_corrupt_source_files_raise_missing_data_with_the_fix(tmp_path, monkeypatch):
    write_cifar100(tmp_path)
    monkeypatch.undo()  # restore torchvision's md5 check: our stand-in files do not match the real checksums
    with pytest.raises(MissingDataError) as caught:
        load_raw("cifar100", tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "cifar-100-python") in message and "--download" in message
    assert not (tmp_path / "bdo_cache" / "cifar100.safetensors").exists()


def test_download_runs_under_the_lock_then_converts(tmp_path, monkeypatch):
    """download=True calls the fetcher (here a stand-in for torchvision's download_and_extract_archive, which
    writes the unzipped folder) while holding the dataset's lock; later loads need neither network nor sources."""
    import torchvision.datasets.utils as tv_utils
    from filelock import FileLock, Timeout

    calls = []

    def fake_download_and_extract_archive(
        url, download_root, extract_root=None, filename=None, md5=None, remove_finished=False
    ):
        calls.append((url, md5))
        with pytest.raises(Timeout):  # somebody (the builder) holds the lock right now
            FileLock(str(tmp_path / "bdo_cache" / "tiny_imagenet.lock")).acquire(timeout=0)
        write_tiny_imagenet(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download_and_extract_archive)
    raw = load_raw("tiny_imagenet", tmp_path, download=True)
    assert calls == [(real.TINY_IMAGENET_URL, real.TINY_IMAGENET_MD5)]
    assert raw.x_train.shape == (203, 3, 64, 64)
    load_raw("tiny_imagenet", tmp_path, download=True)  # cached: no second download
    assert len(calls) == 1


def test_failed_download_raises_one_line(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\nno network")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    with pytest.raises(MissingDataError) as caught:
        load_raw("mnist", tmp_path, download=True)
    message = str(caught.value)
    assert "\n" not in message and "downloading mnist" in message and "no network" in message


def test_concurrent_loads_convert_once(tmp_path, monkeypatch):
    """Two loaders starting together: one converts under the lock, the other waits and then reads the cache."""
    write_cifar10(tmp_path)
    conversions = []
    original = real._convert

    def slow_convert(source, data_root):
        conversions.append(source.info.name)
        time.sleep(0.3)
        return original(source, data_root)

    monkeypatch.setattr(real, "_convert", slow_convert)
    results, errors = [], []

    def load():
        try:
            results.append(load_raw("cifar10", tmp_path))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2
    assert conversions == ["cifar10"]
    assert torch.equal(results[0].x_train, results[1].x_train)


def test_load_splits_on_a_real_dataset(tmp_path):
    write_cifar100(tmp_path)
    splits = load_splits("cifar100", split_seed=3, data_root=tmp_path)
    assert len(splits.y_val) == 10 and len(splits.y_train) == 190 and len(splits.y_test) == 100
