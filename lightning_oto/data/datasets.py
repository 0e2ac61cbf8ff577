"""Tensor transforms and map-style datasets shared by every datamodule (torch only, no torchvision)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# Rec. 601 luma weights, used when a colour dataset is asked for one channel.
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def adapt_channels(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Map an NCHW batch to ``in_channels``: repeat gray to 3 channels, luma for 3 -> 1.

    Models are built for a fixed input channel count (e.g. DemoNet on 1-channel Fashion-MNIST,
    CIFAR nets on 3 channels); this lets any dataset feed any model.
    """
    c = x.shape[1]
    if c == in_channels:
        return x
    if c == 1:
        return x.expand(-1, in_channels, -1, -1).clone()
    if c == 3 and in_channels == 1:
        return (x * _LUMA.to(x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {in_channels} channels")


def adapt_stats(values: Sequence[float], in_channels: int) -> list[float]:
    """Per-channel normalisation statistics after :func:`adapt_channels`."""
    values = list(values)
    if len(values) == in_channels:
        return values
    if len(values) == 1:
        return values * in_channels
    if len(values) == 3 and in_channels == 1:
        return [float(sum(w * v for w, v in zip(_LUMA.tolist(), values)))]
    raise ValueError(f"cannot adapt {len(values)}-channel statistics to {in_channels} channels")


class ImageTransform:
    """uint8/float image(s) -> float, resized, channel-adapted, normalised (and optionally augmented).

    Works on a single CHW image or an NCHW batch, so small datasets can be transformed once up front.
    Augmentation (training only): random crop after ``pad`` pixels of zero padding, and a horizontal
    flip when ``hflip`` (off for digits, where flips change the class).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        pad: int = 4,
        hflip: bool = True,
    ) -> None:
        self.image_size = image_size
        self.in_channels = in_channels
        self.mean = torch.tensor(adapt_stats(mean, in_channels)).view(1, -1, 1, 1)
        self.std = torch.tensor(adapt_stats(std, in_channels)).view(1, -1, 1, 1)
        self.augment = augment
        self.pad = pad
        self.hflip = hflip

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        single = img.dim() == 3
        x = img[None] if single else img
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = adapt_channels(x, self.in_channels)
        h, w = x.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            shrink = h > self.image_size or w > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=shrink)
        x = (x - self.mean) / self.std
        if self.augment:
            x = self._augment(x)
        return x[0] if single else x

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.pad:
            padded = F.pad(x, (self.pad,) * 4)
            out = torch.empty_like(x)
            offs = torch.randint(0, 2 * self.pad + 1, (n, 2))
            for i in range(n):
                dy, dx = int(offs[i, 0]), int(offs[i, 1])
                out[i] = padded[i, :, dy : dy + h, dx : dx + w]
            x = out
        if self.hflip:
            flip = torch.rand(n) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        return x


class TensorImageDataset(Dataset):
    """Images held in memory as an NCHW tensor (uint8 or float) with int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]


class ImageFileDataset(Dataset):
    """Images read lazily from files with PIL (imported on first use), e.g. an ImageNet-style folder."""

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, image_size: int, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.labels = labels.long()
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image  # lazy: PIL is only needed for image folders

        with Image.open(self.paths[index]) as im:
            im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        x = data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).contiguous()
        return self.transform(x), self.labels[index]
