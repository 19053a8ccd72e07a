"""The config's data section (`data.*`): the source, the loader, augmentation recipes and the
synthetic set. Part of the schema (common/schema.py re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from common.constraints import (
    RUNTIME,
    AtLeast,
    Check,
    NonNegative,
    Positive,
    PositiveFloat,
    PositiveInt,
    fraction_range,
    ratio_range,
)


@dataclass
class SyntheticConfig:
    train_samples: PositiveInt = 24_000  # generated in memory from `seed`
    test_samples: PositiveInt = 5_000  # the test set, drawn from the same distribution
    channels: PositiveInt = 1  # 1x28x28 (Fashion-MNIST-shaped) or 3x32x32 (CIFAR-shaped)
    image_size: Annotated[int, AtLeast(16, "LeNet needs it")] = 28  # pixels per side
    num_classes: Annotated[int, AtLeast(2)] = 10  # one smooth random prototype per class


@dataclass
class ImageFolderConfig:
    """data.name=imagefolder: class folders of JPEG/PNG files (torchvision's ImageFolder layout)."""

    train: str = "train"  # the sub-folder of data.root holding the training images
    val: str = "val"  # the sub-folder holding the evaluation images (the same class folders)


@dataclass
class ImagenetRecipe:
    """data.augment=imagenet: RandomResizedCrop to data.image_size and a flip; evaluation
    resizes and center-crops at `eval_crop` of the image."""

    scale: Annotated[list[float], Check(fraction_range, "must be [low, high] with "
                                        "0 < low <= high <= 1")] = field(
        default_factory=lambda: [0.08, 1.0])  # fraction of the image's area a crop covers
    ratio: Annotated[list[float], Check(ratio_range, "must be [low, high] with "
                                        "0 < low <= high")] = field(
        default_factory=lambda: [3 / 4, 4 / 3])  # crop aspect ratios (width / height)
    flip: Annotated[float, Check(lambda v: 0 <= v <= 1, "must be in [0, 1]")] = 0.5  # probability
    # evaluation resizes the shorter side to image_size / eval_crop, then takes the center crop
    eval_crop: Annotated[float, Check(lambda v: 0 < v <= 1, "must be in (0, 1]")] = 0.875


@dataclass
class CifarRecipe:
    """data.augment=cifar: pad, random crop back to data.image_size, flip."""

    padding: Annotated[int, NonNegative] = 4  # zero pixels added on each side before the crop
    flip: Annotated[float, Check(lambda v: 0 <= v <= 1, "must be in [0, 1]")] = 0.5  # probability


@dataclass
class DataConfig:
    # synthetic | fashion_mnist | mnist | cifar10 | imagefolder | python
    name: str = "synthetic"
    # torchvision datasets are read from (and downloaded into) this folder; imagefolder: the
    # folder holding the train and val sub-folders (where, not what: the run's identity holds
    # the files' fingerprint instead, train/run/data_identity.py)
    root: Annotated[str, RUNTIME] = "data"
    # try to download torchvision datasets that are missing (how files arrive: not the run)
    download: Annotated[bool, RUNTIME] = True
    factory: str = ""  # data.name=python: module:callable returning (train, test) Datasets
    # memory: the dataset as one uint8 tensor per split, batches gathered by index; stream: a
    # DataLoader per worker; auto: memory when the decoded dataset fits in data.memory_gb
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_gb: PositiveFloat = 4.0  # what auto holds in memory per worker (decoded), GiB
    # hold the whole in-memory dataset on the worker's GPU when it fits (where, not what: not
    # the run)
    on_device: Annotated[bool, RUNTIME] = True
    normalize: bool = True  # zero mean, unit variance per channel (training-set statistics)
    # images of a stream dataset the statistics are computed from (a fixed random subset)
    stats_samples: PositiveInt = 1000
    # training resolution in pixels; null: the dataset's own (imagefolder and python: 224)
    image_size: Annotated[int | None, AtLeast(8)] = None
    augment: Literal["none", "cifar", "imagenet"] = "none"  # the recipe (data.<recipe>.*)
    imagenet: ImagenetRecipe = field(default_factory=ImagenetRecipe)
    cifar: CifarRecipe = field(default_factory=CifarRecipe)
    # decoded: the first epoch decodes each image once at a fixed size into a memory-mapped
    # uint8 file in data.cache_dir; later epochs gather from it by index (stream path)
    cache: Literal["none", "decoded"] = "none"
    # where decoded files live (a fast local disk; one file per node and split); "": the
    # system's temp folder
    cache_dir: Annotated[str, RUNTIME] = ""
    # JPEG decoder: simplejpeg (libjpeg-turbo; other files via PIL), pil, auto (simplejpeg if
    # installed, else pil; both at reduced size when the target is smaller, the same pixels:
    # docs/performance.md); nvjpeg: batches decoded on the GPU (torchvision.io, GPUs only)
    decoder: Literal["auto", "simplejpeg", "pil", "nvjpeg"] = "auto"
    # stream loader processes per worker; null: usable cores per worker - 1 (at least 1)
    num_workers: Annotated[int | None, NonNegative, RUNTIME] = None
    pin_memory: Annotated[bool | None, RUNTIME] = None  # page-locked batches; null: with GPUs
    persistent_workers: Annotated[bool, RUNTIME] = True  # loader processes live across epochs
    prefetch_factor: Annotated[int, Positive, RUNTIME] = 2  # batches each loader process readies
    # skip (and count, per epoch) image files that cannot be decoded instead of stopping
    skip_bad_files: Annotated[bool, RUNTIME] = False
    imagefolder: ImageFolderConfig = field(default_factory=ImageFolderConfig)
    # imagefolder without a val/ folder: this share of each class's train/ images is held out
    # for evaluation (seeded by `seed`, recorded in run.dir/val_split.json); 0: val/ is needed
    val_fraction: Annotated[float, Check(lambda v: 0 <= v < 1, "must be in [0, 1)",
                                         "0 evaluates on data.root/val")] = 0.0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
