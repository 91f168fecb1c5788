"""Real image datasets read from their official on-disk formats and converted once into a tensor cache.

Each builder parses the files under `data_root` (torchvision's dataset classes where torchvision has one, a small
parser for Tiny ImageNet), turns them into uint8 (N, C, H, W) images with int64 labels and stores the result in
`data_root/bdo_cache/<name>.safetensors`. Later loads read only that file. The conversion runs under a file lock
(`<name>.lock` next to the cache) and the cache is written to a temporary file that is then renamed over the final
name, so concurrent processes neither convert twice nor see half-written files. A cache that cannot be read or
does not look like the dataset (wrong keys, dtypes, shapes, label range or recipe) is rebuilt from the sources.

Downloads are opt-in (`download=True`, the `--download` flag); without it a missing dataset raises
`MissingDataError` with a one-line message naming the expected path and the fix.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from methods.core.registry import DATASETS
from methods.data.base import MissingDataError, RawDataset, to_uint8_nchw
from methods.data.configs import (
    CELEBA8_INFO,
    CIFAR10_INFO,
    CIFAR100_INFO,
    GTSRB_INFO,
    MNIST_INFO,
    TINY_IMAGENET_INFO,
    DataConfig,
    DatasetInfo,
    cache_path,
)

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"  # bump when the layout of the cache files changes
KEYS = ("x_train", "y_train", "x_test", "y_test")


# CelebA attributes combined into the 8 classes of celeba8 (most significant bit first).
CELEBA_ATTRIBUTES = ((18, "Heavy_Makeup"), (31, "Smiling"), (21, "Mouth_Slightly_Open"))

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Source:
    """How one dataset is found, fetched and converted."""

    info: DatasetInfo
    missing: Callable[[Path], list[Path]]  # required source paths that are absent
    fetch: Callable[[Path], None]  # download into data_root (only with download=True)
    convert: Callable[[Path], Parts]
    recipe: str  # describes the conversion; a cache made by another recipe is rebuilt
    prepare: Callable[[Path], None] | None = None  # local fix-ups before converting (no network)


# --------------------------------------------------------------------------------------------- cache handling


def _cache_problem(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: Source) -> str | None:
    info = source.info
    if metadata.get("bdo_format") != CACHE_FORMAT or metadata.get("dataset") != info.name:
        return "it was written by another version"
    if metadata.get("recipe") != source.recipe:
        return "it was converted with another recipe"
    if set(tensors) != set(KEYS):
        return f"it holds {sorted(tensors)} instead of {list(KEYS)}"
    for part in ("train", "test"):
        x, y = tensors[f"x_{part}"], tensors[f"y_{part}"]
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != (info.channels, info.size, info.size) or len(x) == 0:
            return f"x_{part} has dtype {x.dtype} and shape {tuple(x.shape)}"
        if y.dtype != torch.int64 or y.shape != (len(x),):
            return f"y_{part} has dtype {y.dtype} and shape {tuple(y.shape)} for {len(x)} images"
        if int(y.min()) < 0 or int(y.max()) >= info.num_classes:
            return f"y_{part} has labels outside 0..{info.num_classes - 1}"
    return None


def read_cache(path: Path, source: Source) -> Parts | None:
    """The cached tensors, or None when the file is absent, unreadable or not what `source` would write."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # any parse failure means the file is damaged: rebuild it
        log.warning("cache %s is unreadable (%s: %s); rebuilding it", path, type(error).__name__, error)
        return None
    problem = _cache_problem(tensors, metadata, source)
    if problem is not None:
        log.warning("cache %s is not usable (%s); rebuilding it", path, problem)
        return None
    return tuple(tensors[key] for key in KEYS)  # type: ignore[return-value]


def write_cache(path: Path, parts: Parts, source: Source) -> None:
    """Write atomically: a temporary file in the same folder, flushed, then renamed over `path`."""
    from safetensors.torch import save_file

    tensors = {key: value.contiguous() for key, value in zip(KEYS, parts)}
    metadata = {"bdo_format": CACHE_FORMAT, "dataset": source.info.name, "recipe": source.recipe}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _missing_error(source: Source, data_root: Path, missing: list[Path]) -> MissingDataError:
    where = Path(data_root) / source.info.folder
    detail = ""
    if where.exists() and missing:
        first = missing[0]
        try:
            first = first.relative_to(where)
        except ValueError:
            pass
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        detail = f" (missing {first}{more})"
    if source.info.archive:
        where = f"{where} nor {Path(data_root) / source.info.archive}"
    return MissingDataError(f"{source.info.name} not found at {where}{detail}; {source.info.missing_fix}")


def _convert(source: Source, data_root: Path) -> Parts:
    where = Path(data_root) / source.info.folder
    try:
        parts = source.convert(Path(data_root))
    except MissingDataError:  # already one line naming the file and the fix
        raise
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as error:
        raise MissingDataError(
            f"{source.info.name} files at {where} could not be read ({_one_line(error)}); they may be incomplete "
            "or corrupt: delete them and pass --download to fetch them again, or set --data-root / BDO_DATA_ROOT "
            "to a good copy"
        ) from error
    x_train, y_train, x_test, y_test = parts
    parts = (to_uint8_nchw(x_train), y_train.to(torch.int64), to_uint8_nchw(x_test), y_test.to(torch.int64))
    problem = _cache_problem(dict(zip(KEYS, parts)), _metadata(source), source)
    if problem is not None:
        raise MissingDataError(f"{source.info.name} files at {where} do not look like the dataset: {problem}")
    return parts


def _metadata(source: Source) -> dict[str, str]:
    return {"bdo_format": CACHE_FORMAT, "dataset": source.info.name, "recipe": source.recipe}


def _build_locked(source: Source, data_root: Path, download: bool, cache: Path | None) -> Parts:
    """Fetch (if asked), check and convert; the caller holds the lock when `cache` is set."""
    if cache is not None:
        parts = read_cache(cache, source)  # another process may have finished while we waited for the lock
        if parts is not None:
            return parts
    if download and source.missing(data_root):
        log.info("downloading %s into %s", source.info.name, data_root / source.info.folder)
        try:
            Path(data_root).mkdir(parents=True, exist_ok=True)
            source.fetch(data_root)
        except Exception as error:
            raise MissingDataError(
                f"downloading {source.info.name} into {data_root / source.info.folder} failed ({_one_line(error)}); "
                "fetch the files by hand and put them there, or set --data-root / BDO_DATA_ROOT to where they are"
            ) from error
    missing = source.missing(data_root)
    if missing:
        raise _missing_error(source, data_root, missing)
    if source.prepare is not None:
        source.prepare(data_root)
    log.info("converting %s from %s (once)", source.info.name, data_root / source.info.folder)
    parts = _convert(source, data_root)
    if cache is not None:
        write_cache(cache, parts, source)
    return parts


def load_cached(source: Source, data_root: Path, download: bool) -> RawDataset:
    from filelock import FileLock

    data_root = Path(data_root).expanduser()
    cache = cache_path(data_root, source.info.name)
    parts = read_cache(cache, source)
    if parts is None:
        if not download and not cache.parent.is_dir():
            # Fail before creating anything under a data root that does not hold the dataset.
            missing = source.missing(data_root)
            if missing:
                raise _missing_error(source, data_root, missing)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            lock: FileLock | None = FileLock(str(cache.with_suffix(".lock")))
            lock.acquire()
        except OSError as error:  # read-only data root: convert in memory every time
            log.warning("cannot write the cache in %s (%s); converting without caching", cache.parent, error)
            lock = None
        if lock is None:
            parts = _build_locked(source, data_root, download, None)
        else:
            try:
                parts = _build_locked(source, data_root, download, cache)
            finally:
                lock.release()
    x_train, y_train, x_test, y_test = parts
    return RawDataset(source.info, x_train, y_train, x_test, y_test)


# --------------------------------------------------------------------------------------------- image helpers


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def read_images(count: int, get: Callable[[int], np.ndarray], size: int, channels: int) -> torch.Tensor:
    """Decode `count` images with `get(i) -> (size, size, channels) uint8` on a few threads (PIL releases the
    GIL while decoding) into one (N, C, H, W) uint8 tensor, in index order."""
    out = np.empty((count, channels, size, size), dtype=np.uint8)

    def fill(start: int) -> None:
        for i in range(start, min(start + 512, count)):
            out[i] = np.asarray(get(i)).reshape(size, size, channels).transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        for _ in pool.map(fill, range(0, count, 512)):
            pass
    return torch.from_numpy(out)


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def center_square_rgb(image: Image.Image, size: int) -> np.ndarray:
    """Crop the largest centred square, then resize it to size x size."""
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left = int(round((width - side) / 2.0))
    top = int(round((height - side) / 2.0))
    if (width, height) != (side, side):
        image = image.crop((left, top, left + side, top + side))
    return resize_rgb(image, size)


def _absent(paths: list[Path]) -> list[Path]:
    return [path for path in paths if not path.exists()]


# --------------------------------------------------------------------------------------------- CIFAR


def _cifar_source(info: DatasetInfo, cls_name: str) -> Source:
    from torchvision import datasets

    cls = getattr(datasets, cls_name)

    def missing(root: Path) -> list[Path]:
        folder = root / cls.base_folder
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return _absent([folder / name for name in names])

    def fetch(root: Path) -> None:
        cls(root=str(root), train=True, download=True)

    def convert(root: Path) -> Parts:
        out = []
        for train in (True, False):
            ds = cls(root=str(root), train=train, download=False)
            out.append(torch.from_numpy(np.ascontiguousarray(ds.data)))  # (N, 32, 32, 3)
            out.append(torch.as_tensor(ds.targets, dtype=torch.int64))
        return out[0], out[1], out[2], out[3]

    return Source(info, missing, fetch, convert, recipe=f"torchvision.{cls_name} HWC->CHW")


@DATASETS.register("cifar10")
def cifar10(data_root: Path, download: bool = False, cfg: DataConfig | None = None) -> RawDataset:
    """CIFAR-10 from `data_root/cifar-10-batches-py` (python pickle batches): 50,000 / 10,000 3x32x32 images."""
    return load_cached(_cifar_source(CIFAR10_INFO, "CIFAR10"), data_root, download)


@DATASETS.register("cifar100")
def cifar100(data_root: Path, download: bool = False, cfg: DataConfig | None = None) -> RawDataset:
    """CIFAR-100 (fine labels) from `data_root/cifar-100-python`: 50,000 / 10,000 3x32x32 images."""
    return load_cached(_cifar_source(CIFAR100_INFO, "CIFAR100"), data_root, download)


# --------------------------------------------------------------------------------------------- MNIST

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _mnist_source() -> Source:
    from torchvision import datasets
    from torchvision.datasets.utils import extract_archive

    def raw(root: Path) -> Path:
        return root / "MNIST" / "raw"

    def missing(root: Path) -> list[Path]:
        # torchvision reads the uncompressed idx files; the .gz files as published are unpacked by `prepare`.
        folder = raw(root)
        return [folder / n for n in MNIST_FILES if not (folder / n).exists() and not (folder / f"{n}.gz").exists()]

    def prepare(root: Path) -> None:
        for name in MNIST_FILES:
            target, packed = raw(root) / name, raw(root) / f"{name}.gz"
            if not target.exists() and packed.exists():
                extract_archive(str(packed), str(raw(root)))

    def fetch(root: Path) -> None:
        datasets.MNIST(root=str(root), train=True, download=True)

    def convert(root: Path) -> Parts:
        out = []
        for train in (True, False):
            ds = datasets.MNIST(root=str(root), train=train, download=False)
            out.append(ds.data)  # (N, 28, 28) uint8
            out.append(ds.targets.to(torch.int64))
        return out[0], out[1], out[2], out[3]

    return Source(MNIST_INFO, missing, fetch, convert, recipe="torchvision.MNIST as is", prepare=prepare)


@DATASETS.register("mnist")
def mnist(data_root: Path, download: bool = False, cfg: DataConfig | None = None) -> RawDataset:
    """MNIST from the idx files in `data_root/MNIST/raw` (plain or .gz): 60,000 / 10,000 1x28x28 digits."""
    return load_cached(_mnist_source(), data_root, download)


# --------------------------------------------------------------------------------------------- GTSRB


def _gtsrb_source() -> Source:
    from torchvision import datasets

    size = GTSRB_INFO.size

    def missing(root: Path) -> list[Path]:
        base = root / "gtsrb"
        return _absent(
            [base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images", base / "GT-final_test.csv"]
        )

    def fetch(root: Path) -> None:
        for split in ("train", "test"):
            datasets.GTSRB(root=str(root), split=split, download=True)

    def convert(root: Path) -> Parts:
        classes = sorted(p.name for p in (root / "gtsrb" / "GTSRB" / "Training").iterdir() if p.is_dir())
        if classes != [f"{i:05d}" for i in range(GTSRB_INFO.num_classes)]:
            # torchvision numbers the class folders in sorted order; that equals the ClassId only when all 43 exist.
            raise ValueError(f"expected the 43 class folders 00000..00042 in GTSRB/Training, found {len(classes)}")
        out = []
        for split in ("train", "test"):
            ds = datasets.GTSRB(root=str(root), split=split, transform=lambda im: resize_rgb(im, size))
            targets = torch.empty(len(ds), dtype=torch.int64)

            def get(i: int, ds=ds, targets=targets) -> np.ndarray:
                image, target = ds[i]
                targets[i] = int(target)
                return image

            out.append(read_images(len(ds), get, size, 3))
            out.append(targets)
        return out[0], out[1], out[2], out[3]

    return Source(GTSRB_INFO, missing, fetch, convert, recipe=f"torchvision.GTSRB resize {size} bilinear")


@DATASETS.register("gtsrb")
def gtsrb(data_root: Path, download: bool = False, cfg: DataConfig | None = None) -> RawDataset:
    """GTSRB from `data_root/gtsrb` (torchvision layout): 39,209 / 12,630 signs of 43 classes, resized to 32x32."""
    return load_cached(_gtsrb_source(), data_root, download)


# --------------------------------------------------------------------------------------------- CelebA


def celeba8_labels(attr: torch.Tensor) -> torch.Tensor:
    """(N, 40) 0/1 attributes -> 0..7: Heavy_Makeup * 4 + Smiling * 2 + Mouth_Slightly_Open."""
    label = torch.zeros(len(attr), dtype=torch.int64)
    for index, _ in CELEBA_ATTRIBUTES:
        label = label * 2 + attr[:, index].to(torch.int64)
    return label


def _celeba_source() -> Source:
    from torchvision import datasets

    size = CELEBA8_INFO.size
    text_files = [name for _, _, name in datasets.CelebA.file_list if not name.endswith((".zip", ".7z"))]

    def missing(root: Path) -> list[Path]:
        base = root / "celeba"
        return _absent([base / "img_align_celeba"] + [base / name for name in text_files])

    def fetch(root: Path) -> None:
        datasets.CelebA(root=str(root), split="all", download=True)

    def convert(root: Path) -> Parts:
        out = []
        for split in ("train", "test"):
            ds = datasets.CelebA(
                root=str(root), split=split, target_type=[], transform=lambda im: center_square_rgb(im, size)
            )
            names = [name for name in ds.attr_names if name]
            for index, expected in CELEBA_ATTRIBUTES:
                if index >= len(names) or names[index] != expected:
                    found = names[index] if index < len(names) else "nothing"
                    raise ValueError(f"attribute {index} of list_attr_celeba.txt is {found}, expected {expected}")
            out.append(read_images(len(ds), lambda i, ds=ds: ds[i][0], size, 3))
            out.append(celeba8_labels(ds.attr))
        return out[0], out[1], out[2], out[3]

    recipe = f"torchvision.CelebA attrs {[i for i, _ in CELEBA_ATTRIBUTES]} msb-first, center square, {size} bilinear"
    return Source(CELEBA8_INFO, missing, fetch, convert, recipe=recipe)


@DATASETS.register("celeba8")
def celeba8(data_root: Path, download: bool = False, cfg: DataConfig | None = None) -> RawDataset:
    """CelebA (aligned) from `data_root/celeba`, 8 classes from Heavy_Makeup, Smiling and Mouth_Slightly_Open as
    in the PBE paper; the official train split (162,770) trains, the official test split (19,962) tests; the
    centred 178x178 square of each image is resized to 64x64."""
    return load_cached(_celeba_source(), data_root, download)


# --------------------------------------------------------------------------------------------- Tiny ImageNet


def _tiny_source() -> Source:
    size = TINY_IMAGENET_INFO.size

    def base(root: Path) -> Path:
        return root / "tiny-imagenet-200"

    def missing(root: Path) -> list[Path]:
        b = base(root)
        return _absent([b / "wnids.txt", b / "train", b / "val" / "images", b / "val" / "val_annotations.txt"])

    def fetch(root: Path) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINY_IMAGENET_URL, str(root), md5=TINY_IMAGENET_MD5, remove_finished=True)

    def convert(root: Path) -> Parts:
        b = base(root)
        wnids = sorted({line.strip() for line in (b / "wnids.txt").read_text().splitlines() if line.strip()})
        if len(wnids) != TINY_IMAGENET_INFO.num_classes:
            raise ValueError(f"wnids.txt lists {len(wnids)} classes, expected {TINY_IMAGENET_INFO.num_classes}")
        index = {wnid: i for i, wnid in enumerate(wnids)}  # sorted wnids, as ImageFolder would number them
        train: list[tuple[Path, int]] = []
        for wnid in wnids:
            folder = b / "train" / wnid / "images"
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
            if not files:
                raise ValueError(f"no images in {folder}")
            train.extend((p, index[wnid]) for p in files)
        test: list[tuple[Path, int]] = []
        for line in (b / "val" / "val_annotations.txt").read_text().splitlines():
            fields = line.split("\t") if "\t" in line else line.split()
            if len(fields) < 2:
                continue
            if fields[1] not in index:
                raise ValueError(f"val_annotations.txt names class {fields[1]}, which wnids.txt does not list")
            test.append((b / "val" / "images" / fields[0], index[fields[1]]))
        if not test:
            raise ValueError("val_annotations.txt lists no images")
        out = []
        for samples in (train, test):

            def get(i: int, samples=samples) -> np.ndarray:
                with Image.open(samples[i][0]) as image:
                    return resize_rgb(image, size)

            out.append(read_images(len(samples), get, size, 3))
            out.append(torch.tensor([label for _, label in samples], dtype=torch.int64))
        return out[0], out[1], out[2], out[3]

    return Source(TINY_IMAGENET_INFO, missing, fetch, convert, recipe=f"sorted wnids, val as test, {size}")


@DATASETS.register("tiny_imagenet")
def tiny_imagenet(data_root: Path, download: bool = False, cfg: DataConfig | None = None) -> RawDataset:
    """Tiny ImageNet from `data_root/tiny-imagenet-200`: 100,000 train images of 200 classes (numbered in sorted
    wnid order) and, since the official test split has no labels, the 10,000 labelled val images as test."""
    return load_cached(_tiny_source(), data_root, download)
