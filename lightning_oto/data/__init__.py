"""Datasets for the paper experiments as LightningDataModules (no torchvision).

``build_datamodule(name, ...)`` is the one entry point.  Real datasets are read from their standard
on-disk formats under ``data_dir`` (nothing is downloaded unless ``download=True``); ``digits``,
``mnist5k`` and ``synthetic`` always work offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .datamodules import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    ImageFolderDataModule,
    MNIST5kDataModule,
    MNISTDataModule,
    STL10DataModule,
    SVHNDataModule,
    SyntheticDataModule,
    split_indices,
)
from .datasets import ImageTransform, TensorImageDataset, adapt_channels

_REGISTRY: dict[str, type[ImageDataModule]] = {
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "svhn": SVHNDataModule,
    "cifar10": CIFAR10DataModule,
    "stl10": STL10DataModule,
    "imagefolder": ImageFolderDataModule,
    "digits": DigitsDataModule,
    "mnist5k": MNIST5kDataModule,
    "synthetic": SyntheticDataModule,
}
_ALIASES: dict[str, str] = {
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "cifar": "cifar10",
    "cifar_10": "cifar10",
    "stl_10": "stl10",
    "imagenet": "imagefolder",
    "image_folder": "imagefolder",
}

DATASET_NAMES: tuple[str, ...] = tuple(_REGISTRY)
OFFLINE_DATASET_NAMES: tuple[str, ...] = ("digits", "mnist5k", "synthetic")


def build_datamodule(
    name: str,
    data_dir: str | Path = "data",
    batch_size: int = 64,
    image_size: int | None = None,
    in_channels: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    **kwargs: Any,
) -> ImageDataModule:
    """Create the datamodule ``name`` (see ``DATASET_NAMES``; case/dash-insensitive).

    ``image_size``/``in_channels`` (default: the dataset's native ones) let any dataset feed any
    model.  Extra ``kwargs``: ``val_fraction``, ``test_fraction``, ``augment``, ``download``,
    ``max_samples``, ``pin_memory``; for ``synthetic`` also ``num_samples``, ``num_classes``, ``noise``.
    """
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(DATASET_NAMES)}")
    return _REGISTRY[key](
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=image_size,
        in_channels=in_channels,
        num_workers=num_workers,
        seed=seed,
        **kwargs,
    )


__all__ = [
    "DATASET_NAMES",
    "OFFLINE_DATASET_NAMES",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageTransform",
    "MNIST5kDataModule",
    "MNISTDataModule",
    "STL10DataModule",
    "SVHNDataModule",
    "SyntheticDataModule",
    "TensorImageDataset",
    "adapt_channels",
    "build_datamodule",
    "split_indices",
]
