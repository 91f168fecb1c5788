"""What bdo knows about its datasets without loading one or importing torch: each dataset's DatasetInfo
(DATASET_INFOS, the source of the dataset names that validation accepts), DataConfig (the `data.KEY` of
`--set`) and where datasets live. The loaders register in DATASETS (methods/data/embedded.py, real.py) under
these names; a test holds the two equal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods.core.config import Config, ranged
from methods.core.registry import Registry

DATASET_INFOS: Registry[Any] = Registry("dataset")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Training augmentation this dataset tolerates (digits must not be flipped, CIFAR may be).
    crop_pad: int = 4
    hflip: bool = True
    rotation_deg: float = 0.0
    val_fraction: float = 0.05
    # Where a real dataset's files sit below the data root ("" for the embedded ones): named in error messages, and
    # checked before anything starts (no torch needed to say a dataset is missing).
    folder: str = ""
    # L-inf radius (in [0, 1] pixel units) of the PGD behind the blind `adv_concentration` signal
    # (methods/core/blind_signals.py): large enough that a backdoored model's adversarial examples reach its
    # target class, small enough that a clean model's do not all leave their class. 8/255 is the usual radius on
    # CIFAR-like images; coarse low-resolution images need more (digits, below).
    adv_concentration_eps: float = 8 / 255
    # Image-folder datasets (methods/data/folders.py): train/<class>/ and test/<class>/ under `folder`, or the
    # same layout inside the tar archive `archive` (read when the folder is absent). `classes` fixes the label
    # order (default: the sorted folder names); `resize` lets images of another size in, resized bilinearly.
    image_folder: bool = False
    archive: str = ""
    classes: tuple[str, ...] = ()
    resize: bool = False
    # Which folder of search_spaces/presets holds this dataset's presets (default: its own name): a copy of a
    # dataset in another format trains with the same recipes.
    presets: str = ""
    description: str = ""

    @property
    def preset_folder(self) -> str:
        return self.presets or self.name

    @property
    def missing_fix(self) -> str:
        return IMAGE_FOLDER_FIX if self.image_folder else MISSING_FIX


def declare_dataset(**fields: Any) -> DatasetInfo:
    info = DatasetInfo(**fields)
    DATASET_INFOS.add(info.name, info)
    return info


def default_data_root() -> Path:
    return Path(os.environ.get("BDO_DATA_ROOT", Path.home() / ".cache" / "bdo" / "data")).expanduser()


CACHE_DIR = "bdo_cache"  # below the data root: each real dataset converted once into <name>.safetensors
MISSING_FIX = "pass --download to fetch it or set --data-root / BDO_DATA_ROOT to where it is"
IMAGE_FOLDER_FIX = "set --data-root / BDO_DATA_ROOT to the folder that holds it (it cannot be downloaded)"


def cache_path(data_root: Path, name: str) -> Path:
    return Path(data_root) / CACHE_DIR / f"{name}.safetensors"


def absent_dataset(info: DatasetInfo, data_root: Path) -> str | None:
    """The one-line error for a real dataset with neither its folder nor its converted cache under the data root;
    None when there is something to read (whether it is complete is for the loader to say)."""
    root = Path(data_root)
    if not info.folder or cache_path(root, info.name).is_file() or (root / info.folder).exists():
        return None
    if info.archive and (root / info.archive).is_file():
        return None
    if info.archive:
        return f"{info.name} not found at {root / info.folder} nor {root / info.archive}; {info.missing_fix}"
    return f"{info.name} not found at {root / info.folder}; {info.missing_fix}"


@dataclass
class DataConfig(Config):
    """Options of the dataset (the `data.KEY` of `--set`)."""

    val_fraction: float | None = ranged(None, 0.0, 0.5, "fraction of the training part held out for validation")
    train_limit: int | None = ranged(None, 10, None, "keep at most this many training images (quick runs)")
    test_limit: int | None = ranged(None, 10, None, "keep at most this many test images (quick runs)")
    synthetic_train: int = ranged(10000, 100, 10_000_000, "training images of the synthetic dataset")
    synthetic_test: int = ranged(2000, 100, 1_000_000, "test images of the synthetic dataset")
    # Calibrated on small_cnn, 8 epochs at lr 0.05 on 4,000 images (seed 0, CPU): test ACC 1.000 at 0,
    # 0.914 at 0.4, 0.872 at 0.45, 0.837 at 0.5: 0.45 sits in the 85-90% band, room to see what a defense costs.
    synthetic_difficulty: float = ranged(
        0.45,
        0.0,
        1.0,
        "how much the synthetic classes overlap (orientation, frequency and colour jitter, pixel noise); 0 is "
        "the original easy set that small models learn perfectly",
    )


DIGITS_INFO = declare_dataset(
    name="digits",
    num_classes=10,
    channels=1,
    size=16,
    mean=(0.33,),
    std=(0.40,),
    crop_pad=2,
    hflip=False,
    rotation_deg=10.0,
    val_fraction=0.125,
    # Measured on small_cnn (BadNets / Blend all2one 10% vs the same recipe unpoisoned, 3 PGD steps, 128 val
    # images): concentration 0.21 / 0.43 vs 0.15 at 8/255, 0.59 / 0.98 vs 0.19 at 16/255, 0.68 / 1.0 vs 0.24 at
    # 24/255. At 8/255 the coarse 16 px images barely move; 16/255 separates best before the clean model's own
    # adversarial examples start to gather.
    adv_concentration_eps=16 / 255,
)


SYNTHETIC_INFO = declare_dataset(
    name="synthetic",
    num_classes=10,
    channels=3,
    size=32,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    crop_pad=4,
    hflip=True,
    rotation_deg=0.0,
    val_fraction=0.05,
)


# Channel statistics are the commonly quoted per-pixel values over each training set (0..1 scale).
CIFAR10_INFO = declare_dataset(
    name="cifar10",
    folder="cifar-10-batches-py",
    num_classes=10,
    channels=3,
    size=32,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    crop_pad=4,
    hflip=True,
    rotation_deg=0.0,
    val_fraction=0.05,
)


def declare_image_folder(
    name: str,
    folder: str,
    num_classes: int,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    description: str,
    channels: int = 3,
    **fields: Any,
) -> DatasetInfo:
    """Declare a dataset of train/<class>/ and test/<class>/ image files (methods/data/folders.py reads it). One
    call here is all a new image-folder dataset needs; its presets go in search_spaces/presets/<name>/ (or name
    another dataset's with presets=...)."""
    return declare_dataset(
        name=name,
        folder=folder,
        num_classes=num_classes,
        channels=channels,
        size=size,
        mean=mean,
        std=std,
        image_folder=True,
        description=description,
        **fields,
    )


# CIFAR-10's 60,000 images saved as JPEG (quality 75, 4:2:0 chroma): the official split and labels, decoded
# pixels that differ from the official batches, so results on it are reported as this copy, never as CIFAR-10.
# It trains with CIFAR-10's presets and recipes (one place for both).
CIFAR10_JPEG_INFO = declare_image_folder(
    name="cifar10_jpeg",
    folder="cifar10-jpeg",
    archive="cifar10-jpeg.tar.gz",
    num_classes=10,
    size=32,
    mean=CIFAR10_INFO.mean,
    std=CIFAR10_INFO.std,
    presets="cifar10",
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    description="CIFAR-10 as JPEG files (train/<class>/*.jpg, test/<class>/*.jpg, in the folder cifar10-jpeg or "
    "the archive cifar10-jpeg.tar.gz): 50,000 / 10,000 3x32x32 images, CIFAR-10's classes and split",
)


CIFAR100_INFO = declare_dataset(
    name="cifar100",
    folder="cifar-100-python",
    num_classes=100,
    channels=3,
    size=32,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    crop_pad=4,
    hflip=True,
    rotation_deg=0.0,
    val_fraction=0.05,
)


MNIST_INFO = declare_dataset(
    name="mnist",
    folder="MNIST/raw",
    num_classes=10,
    channels=1,
    size=28,
    mean=(0.1307,),
    std=(0.3081,),
    crop_pad=2,
    hflip=False,
    rotation_deg=10.0,
    val_fraction=0.05,
)


GTSRB_INFO = declare_dataset(
    name="gtsrb",
    folder="gtsrb",
    num_classes=43,
    channels=3,
    size=32,
    mean=(0.3403, 0.3121, 0.3214),
    std=(0.2724, 0.2608, 0.2669),
    crop_pad=4,
    hflip=False,
    rotation_deg=10.0,
    val_fraction=0.05,
)


CELEBA8_INFO = declare_dataset(
    name="celeba8",
    folder="celeba",
    num_classes=8,
    channels=3,
    size=64,
    mean=(0.5063, 0.4258, 0.3832),
    std=(0.3107, 0.2904, 0.2897),
    crop_pad=8,
    hflip=True,
    rotation_deg=0.0,
    val_fraction=0.05,
)


TINY_IMAGENET_INFO = declare_dataset(
    name="tiny_imagenet",
    folder="tiny-imagenet-200",
    num_classes=200,
    channels=3,
    size=64,
    mean=(0.4802, 0.4481, 0.3975),
    std=(0.2770, 0.2691, 0.2821),
    crop_pad=8,
    hflip=True,
    rotation_deg=0.0,
    val_fraction=0.05,
)
