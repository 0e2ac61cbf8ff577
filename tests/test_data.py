"""Datamodules: offline sets load and split deterministically; every real-format loader parses a tiny
fake file set written here in the genuine on-disk format; missing files name the expected paths."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_oto.data import DATASET_NAMES, build_datamodule, split_indices
from lightning_oto.data import formats
from lightning_oto.data.datasets import ImageTransform, adapt_channels

RNG = np.random.default_rng(0)


def _labels_of(ds: torch.utils.data.Dataset) -> torch.Tensor:
    return torch.stack([ds[i][1] for i in range(len(ds))])


# ------------------------------------------------------------------------------------------------
# offline sets
# ------------------------------------------------------------------------------------------------
def test_digits_shapes_labels_and_deterministic_split() -> None:
    dm = build_datamodule("digits", batch_size=32, seed=3)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 8)
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797 and sizes[0] > sizes[2] > sizes[1] > 0
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(_labels_of(dm.test_set).tolist()) == set(range(10))
    # normalised with train statistics
    all_train = dm.train_set.images
    assert abs(all_train.mean().item()) < 1e-4 and abs(all_train.std().item() - 1) < 1e-2

    again = build_datamodule("digits", batch_size=32, seed=3)
    again.setup()
    assert torch.equal(again.test_set.images, dm.test_set.images)
    assert torch.equal(_labels_of(again.val_set), _labels_of(dm.val_set))
    other = build_datamodule("digits", seed=4)
    other.setup()
    assert not torch.equal(_labels_of(other.val_set), _labels_of(dm.val_set))
    # the shuffled training order is reproducible too
    y1 = next(iter(dm.train_dataloader()))[1]
    y2 = next(iter(again.train_dataloader()))[1]
    assert torch.equal(y1, y2)


def test_digits_resized_to_three_channels() -> None:
    dm = build_datamodule("digits", image_size=28, in_channels=3, batch_size=4, max_samples=20)
    dm.setup()
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 28, 28)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # gray repeated
    assert len(dm.train_set) == 20


def test_mnist5k() -> None:
    dm = build_datamodule("mnist5k", batch_size=16, seed=0)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 5000
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.min() >= 0 and y.max() <= 9
    assert set(_labels_of(dm.val_set).tolist()) == set(range(10))


def test_synthetic_is_learnable() -> None:
    dm = build_datamodule("synthetic", image_size=16, in_channels=3, num_samples=600, num_classes=6, seed=1)
    dm.setup()
    xs, ys = dm.train_set.images.flatten(1), dm.train_set.labels
    centroids = torch.stack([xs[ys == c].mean(0) for c in range(6)])
    xv, yv = dm.val_set.images.flatten(1), dm.val_set.labels
    acc = (torch.cdist(xv, centroids).argmin(1) == yv).float().mean().item()
    assert acc > 0.9, acc  # a nearest-centroid rule already separates the classes
    assert dm.train_set.images.shape[1:] == (3, 16, 16)


def test_split_indices_partition() -> None:
    parts = split_indices(100, [0.7, 0.1], seed=5)
    assert [len(p) for p in parts] == [70, 10, 20]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(100))
    assert all(torch.equal(a, b) for a, b in zip(parts, split_indices(100, [0.7, 0.1], seed=5)))
    with pytest.raises(ValueError):
        split_indices(10, [0.9, 0.2], seed=0)


def test_transform_channels_and_augment() -> None:
    rgb = torch.rand(2, 3, 8, 8)
    assert adapt_channels(rgb, 1).shape == (2, 1, 8, 8)
    t = ImageTransform(12, 3, (0.5,), (0.5,), augment=True, pad=2)
    out = t(torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8))
    assert out.shape == (3, 12, 12)
    with pytest.raises(ValueError):
        adapt_channels(torch.rand(1, 2, 4, 4), 3)


def test_factory_names_and_errors() -> None:
    assert {"mnist", "fashion_mnist", "svhn", "cifar10", "stl10", "imagefolder", "digits", "mnist5k", "synthetic"} <= set(
        DATASET_NAMES
    )
    assert build_datamodule("Fashion-MNIST").name == "fashion_mnist"
    with pytest.raises(KeyError, match="available"):
        build_datamodule("nope")


def test_lightning_trainer_consumes_datamodule() -> None:
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

        def training_step(self, batch, batch_idx):  # noqa: ANN001
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):  # noqa: ANN001
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = build_datamodule("digits", batch_size=64)
    trainer = L.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(Tiny(), datamodule=dm)


# ------------------------------------------------------------------------------------------------
# real formats: tiny fake files written in the genuine layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx(tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    ext = ".gz" if gz else ""
    train_x = RNG.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    train_y = (np.arange(10) % 10).astype(np.uint8)
    test_x = RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    test_y = np.array([3, 1, 4, 1], dtype=np.uint8)
    formats.write_idx(raw / f"train-images-idx3-ubyte{ext}", train_x)
    formats.write_idx(raw / f"train-labels-idx1-ubyte{ext}", train_y)
    formats.write_idx(raw / f"t10k-images-idx3-ubyte{ext}", test_x)
    formats.write_idx(raw / f"t10k-labels-idx1-ubyte{ext}", test_y)

    imgs, labels = formats.load_mnist_idx(tmp_path, "test", folder=folder)
    assert imgs.shape == (4, 1, 28, 28) and np.array_equal(imgs[:, 0], test_x)
    assert labels.tolist() == [3, 1, 4, 1]
    assert np.array_equal(formats.read_idx(raw / f"train-images-idx3-ubyte{ext}"), train_x)

    dm = build_datamodule(name, data_dir=tmp_path, batch_size=4, val_fraction=0.2)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 2, 4)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 1, 28, 28) and y.tolist() == [3, 1, 4, 1]
    expected = (torch.from_numpy(test_x[0]).float() / 255 - dm.mean[0]) / dm.std[0]
    assert torch.allclose(x[0, 0], expected, atol=1e-5)


def test_idx_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x05abcde")
    with pytest.raises(ValueError, match="magic"):
        formats.read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([9], dtype=">i4").tobytes() + b"abc")
    with pytest.raises(ValueError, match="truncated"):
        formats.read_idx(short)


def test_svhn_mat(tmp_path: Path) -> None:
    from scipy.io import savemat

    n = 6
    x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [2], [3], [10], [9]], dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    savemat(tmp_path / "test_32x32.mat", {"X": x[..., :3], "y": y[:3]})
    imgs, labels = formats.load_svhn_mat(tmp_path, "train")
    assert imgs.shape == (n, 3, 32, 32)
    assert np.array_equal(imgs[2], x[:, :, :, 2].transpose(2, 0, 1))
    assert labels.tolist() == [0, 1, 2, 3, 0, 9]  # label 10 is digit 0

    dm = build_datamodule("svhn", data_dir=tmp_path, batch_size=3, val_fraction=0.0)
    dm.setup()
    xb, yb = next(iter(dm.test_dataloader()))
    assert xb.shape == (3, 3, 32, 32) and yb.tolist() == [0, 1, 2]


def _write_cifar(root: Path, per_batch: int = 4) -> tuple[np.ndarray, list[int]]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    test_data = None
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        with open(base / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": []}, f)
        if name == "test_batch":
            test_data, test_labels = data, labels
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{k}".encode() for k in range(10)], b"num_vis": 3072}, f)
    return test_data, test_labels


def test_cifar10_pickles(tmp_path: Path) -> None:
    test_data, test_labels = _write_cifar(tmp_path)
    imgs, labels = formats.load_cifar10_batches(tmp_path, "train")
    assert imgs.shape == (20, 3, 32, 32) and len(labels) == 20
    t_imgs, t_labels = formats.load_cifar10_batches(tmp_path, "test")
    assert np.array_equal(t_imgs[1].reshape(-1), test_data[1]) and t_labels.tolist() == test_labels

    dm = build_datamodule("cifar10", data_dir=tmp_path, batch_size=4, image_size=16, in_channels=1, val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 4)
    assert dm.classes == [f"c{k}" for k in range(10)]
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 1, 16, 16) and y.tolist() == test_labels


def test_stl10_bin(tmp_path: Path) -> None:
    base = tmp_path / "stl10_binary"
    base.mkdir()
    imgs = RNG.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
    # STL-10 stores each channel column-major: write the transposed planes.
    for split, k in (("train", 3), ("test", 2)):
        (base / f"{split}_X.bin").write_bytes(np.ascontiguousarray(imgs[:k].transpose(0, 1, 3, 2)).tobytes())
        (base / f"{split}_y.bin").write_bytes(np.arange(1, k + 1, dtype=np.uint8).tobytes())
    (base / "class_names.txt").write_text("\n".join(f"n{k}" for k in range(10)) + "\n")
    x, y = formats.load_stl10_bin(tmp_path, "train")
    assert x.shape == (3, 3, 96, 96) and np.array_equal(x, imgs) and y.tolist() == [0, 1, 2]

    dm = build_datamodule("stl10", data_dir=tmp_path, batch_size=2, val_fraction=0.0)
    assert dm.image_size == 96
    dm.setup()
    xb, yb = next(iter(dm.test_dataloader()))
    assert xb.shape == (2, 3, 96, 96) and yb.tolist() == [0, 1]
    assert dm.classes[0] == "n0"


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for split, n in (("train", 3), ("val", 1)):
        for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 24), colour).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")

    dm = build_datamodule("imagefolder", data_dir=tmp_path, image_size=16, batch_size=8, val_fraction=0.0)
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]
    dm.setup()
    assert len(dm.train_set) == 6 and len(dm.test_set) == 2
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]
    # red cat vs blue dog survive decoding + normalisation
    assert x[0, 0].mean() > x[0, 2].mean() and x[1, 2].mean() > x[1, 0].mean()


# ------------------------------------------------------------------------------------------------
# missing files and downloads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,expected",
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
        ("svhn", "train_32x32.mat"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("stl10", "stl10_binary/train_X.bin"),
        ("imagefolder", "train/<class>/<image>.jpg"),
    ],
)
def test_missing_files_name_expected_paths(tmp_path: Path, name: str, expected: str) -> None:
    dm = build_datamodule(name, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert str(tmp_path / expected) in msg
    assert "offline" in msg or name == "imagefolder"


def test_download_fails_clearly_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    dm = build_datamodule("cifar10", data_dir=tmp_path, download=True)
    with pytest.raises(RuntimeError, match="no network access") as info:
        dm.prepare_data()
    assert "cifar-10-python.tar.gz" in str(info.value)
    assert not list(tmp_path.rglob("*.part"))  # nothing half-written is left behind


def test_max_samples_keeps_every_class():
    """Regression: mnist5k is stored sorted by class; a capped split must still hold all ten classes."""
    import torch

    from lightning_oto.data import build_datamodule

    dm = build_datamodule("mnist5k", image_size=28, in_channels=1, batch_size=256, max_samples=600, seed=0)
    dm.setup("fit")
    ys = torch.cat([y for _, y in dm.train_dataloader()])
    assert len(ys) == 600
    counts = torch.bincount(ys, minlength=10)
    assert (counts > 30).all(), counts.tolist()
