"""Image-folder datasets: `train/<class>/*` and `test/<class>/*` JPEG or PNG files, read from a folder under the
data root or straight from a tar archive of that layout, converted once into the same safetensors cache as the
other real datasets (methods/data/real.py).

A dataset of this kind is declared once, torch-free, with `declare_image_folder` (methods/data/configs.py holds
the declarations): its name, where its files sit, its image size and, optionally, its class list. Without a class
list the classes are the folder names under `train/` in sorted (code-point) order, so label 0 is the first name;
a class list fixes the order (so a renamed or added folder cannot silently renumber the labels) and must match
the folders exactly.

What is refused, each with one line naming the file or folder: a missing root, a class folder absent from one
split or holding no image, a file that does not decode, an image that is not RGB (greyscale, palette, CMYK, with
alpha) for a colour dataset, and an image whose size differs from the declared one unless the declaration says
`resize=True` (then it is resized with bilinear filtering, and the cache recipe records it).

The images are stored in a fixed-seed shuffled order, not class by class: `data.train_limit` and
`data.test_limit` keep a prefix, and a prefix of a class-sorted list would hold the first classes only.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from methods.core.registry import DATASETS
from methods.data.base import MissingDataError, RawDataset
from methods.data.configs import DATASET_INFOS, DataConfig, DatasetInfo
from methods.data.real import Parts, Source, load_cached, read_images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
ORDER_SEED = 0  # the fixed shuffle of the stored order (recorded in the cache recipe)


class FolderError(MissingDataError):
    """A file or folder of an image-folder dataset that cannot be used; the message names it and the fix."""


# A sample is (where it came from, for messages; a function returning its encoded bytes or path; its label).
Sample = tuple[str, object, int]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not Path(name).name.startswith(".")


def _labels(info: DatasetInfo, found: dict[str, dict[str, list]], where: str) -> dict[str, int]:
    """Class name -> label, from the declared class list or the sorted folder names; both splits must hold every
    class and no other."""
    train, test = sorted(found.get("train", {})), sorted(found.get("test", {}))
    for split, names in (("train", train), ("test", test)):
        if not names:
            raise FolderError(f"{where}/{split} holds no class folder with images ({', '.join(IMAGE_SUFFIXES)})")
    classes = list(info.classes) if info.classes else train
    for split, names in (("train", train), ("test", test)):
        absent = [name for name in classes if name not in names]
        if absent:
            raise FolderError(
                f"{where}/{split}/{absent[0]} is missing or holds no image"
                + (f" (and {len(absent) - 1} more classes)" if len(absent) > 1 else "")
            )
        extra = [name for name in names if name not in classes]
        if extra:
            raise FolderError(
                f"{where}/{split}/{extra[0]} is not one of the declared classes of {info.name}"
                f" ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
            )
    if len(classes) != info.num_classes:
        raise FolderError(
            f"{where}/train holds {len(classes)} classes; {info.name} is declared with {info.num_classes}"
        )
    return {name: label for label, name in enumerate(classes)}


def _shuffled(samples: list[Sample]) -> list[Sample]:
    order = np.random.default_rng(ORDER_SEED).permutation(len(samples))
    return [samples[i] for i in order]


def _decode(info: DatasetInfo, name: str, opened: Image.Image) -> np.ndarray:
    mode = "RGB" if info.channels == 3 else "L"
    if opened.mode != mode:
        raise FolderError(f"{name} is a {opened.mode} image; {info.name} takes {mode} images only (convert it)")
    if opened.size != (info.size, info.size):
        if not info.resize:
            raise FolderError(
                f"{name} is {opened.size[0]}x{opened.size[1]}; {info.name} takes {info.size}x"
                f"{info.size} images (resize them, or declare the dataset with resize=True)"
            )
        opened = opened.resize((info.size, info.size), Image.Resampling.BILINEAR)
    return np.asarray(opened, dtype=np.uint8)


def _read_all(info: DatasetInfo, samples: list[Sample], open_one) -> Parts:
    def get(i: int) -> np.ndarray:
        name, handle, _ = samples[i]
        try:
            with open_one(handle) as opened:
                return _decode(info, name, opened)
        except FolderError:  # _decode's own message (mode, size); FolderError is an OSError, so let it through
            raise
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise FolderError(f"{name} could not be decoded ({type(error).__name__}): replace or delete it") from None

    images = read_images(len(samples), get, info.size, info.channels)
    return images, torch.tensor([label for _, _, label in samples], dtype=torch.int64)


def _from_folder(info: DatasetInfo, base: Path) -> Parts:
    found: dict[str, dict[str, list]] = {}
    for split in SPLITS:
        if not (base / split).is_dir():
            raise FolderError(f"{base / split} is not a folder: {info.name} wants train/<class>/ and test/<class>/")
        for folder in sorted(p for p in (base / split).iterdir() if p.is_dir()):
            files = sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p.name))
            if files:
                found.setdefault(split, {})[folder.name] = files
    labels = _labels(info, found, str(base))
    out: list[torch.Tensor] = []
    for split in SPLITS:
        samples = [(str(path), path, labels[name]) for name, files in found[split].items() for path in files]
        out.extend(_read_all(info, _shuffled(samples), Image.open))
    return out[0], out[1], out[2], out[3]


def _from_archive(info: DatasetInfo, archive: Path) -> Parts:
    found: dict[str, dict[str, list]] = {}
    members = {}
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = Path(member.name).parts
                parts = parts[1:] if parts and parts[0] == "." else parts
                # an archive made from the folder itself (tar czf x.tar.gz cifar10-jpeg) has one more level
                parts = parts[1:] if len(parts) == 4 and parts[1] in SPLITS else parts
                if not member.isfile() or len(parts) != 3 or parts[0] not in SPLITS or not _is_image(parts[2]):
                    continue
                members[member.name] = tar.extractfile(member).read()
                found.setdefault(parts[0], {}).setdefault(parts[1], []).append(member.name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:  # not a tar, truncated, bad compression
        raise FolderError(
            f"{archive} could not be read as a tar archive ({type(error).__name__}): it may be "
            "incomplete or corrupt; replace it with a good copy"
        ) from None
    labels = _labels(info, found, str(archive))
    out: list[torch.Tensor] = []
    for split in SPLITS:
        samples = [
            (f"{archive}:{name}", name, labels[cls])
            for cls, names in sorted(found[split].items())
            for name in sorted(names)
        ]
        out.extend(_read_all(info, _shuffled(samples), lambda name: Image.open(io.BytesIO(members[name]))))
    return out[0], out[1], out[2], out[3]


def image_folder_source(info: DatasetInfo) -> Source:
    """The folder `data_root/<info.folder>` when it exists, else the archive `data_root/<info.archive>`."""

    def missing(root: Path) -> list[Path]:
        folder = root / info.folder
        if folder.exists() or not info.archive:
            return [] if folder.exists() else [folder]
        return [] if (root / info.archive).is_file() else [folder]

    def fetch(root: Path) -> None:
        raise FolderError(
            f"{info.name} cannot be downloaded; put its files at {root / info.folder}"
            + (f" or its archive at {root / info.archive}" if info.archive else "")
        )

    def convert(root: Path) -> Parts:
        folder = root / info.folder
        return _from_folder(info, folder) if folder.exists() else _from_archive(info, root / info.archive)

    classes = ",".join(info.classes) if info.classes else "sorted folders"
    recipe = (
        f"image folder {info.size}px {'resize bilinear' if info.resize else 'exact size'}; classes {classes}; "
        f"order seed {ORDER_SEED}"
    )
    return Source(info, missing, fetch, convert, recipe=recipe)


def register_image_folders() -> None:
    """Register a builder for every declared image-folder dataset (those with `image_folder=True`)."""
    for name, info in DATASET_INFOS.items():
        if info.image_folder:

            def build(
                data_root: Path, download: bool = False, cfg: DataConfig | None = None, info: DatasetInfo = info
            ) -> RawDataset:
                return load_cached(image_folder_source(info), data_root, download)

            build.__doc__ = info.description
            DATASETS.add(name, build)


register_image_folders()
