"""Readers for the standard on-disk formats of the benchmark datasets (numpy only, no torchvision).

Every reader returns ``(images, labels)`` with images as ``uint8`` arrays in NCHW layout and labels
as ``int64`` arrays with classes numbered from 0.  Missing files raise :class:`FileNotFoundError`
listing the exact paths that were looked for, because nothing can be downloaded on offline machines
and the user needs to know precisely where to put the files.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def missing_files_error(dataset: str, expected: Sequence[Path], hint: str = "") -> FileNotFoundError:
    """A FileNotFoundError naming every expected path and explaining that nothing is downloaded."""
    lines = "\n".join(f"  {p}" for p in expected)
    msg = (
        f"{dataset}: dataset files not found. Expected:\n{lines}\n"
        "Downloads are impossible on an offline machine: copy the files there, or pass download=True "
        "where a network is available."
    )
    if hint:
        msg += f"\n{hint}"
    return FileNotFoundError(msg)


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (the MNIST / Fashion-MNIST format), gzip-compressed or not.

    Layout: two zero bytes, a dtype code, the number of dimensions, one big-endian int32 per
    dimension, then the data in C order.
    """
    path = Path(path)
    with _open_maybe_gz(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{dtype_code:02x}")
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    dtype = _IDX_DTYPES[dtype_code]
    count = int(np.prod(dims)) if ndim else 1
    offset = 4 + 4 * ndim
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated IDX file (need {count} items of {dtype}, header dims {dims.tolist()})")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(tuple(int(d) for d in dims)).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip if the name ends in .gz); used to make test fixtures."""
    path = Path(path)
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
    arr = np.ascontiguousarray(array)
    if arr.dtype not in codes:
        raise ValueError("write_idx supports uint8/int8 arrays")
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + np.asarray(arr.shape, dtype=">i4").tobytes()
    payload = header + arr.tobytes()
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as f:
        f.write(payload)


MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def mnist_search_dirs(root: Path, folder: str) -> list[Path]:
    """Directories where MNIST-style IDX files are looked for, most specific first.

    Covers a flat directory and the layouts torchvision and other tools leave behind
    (``<root>/<folder>/raw``, ``<root>/<folder>``).
    """
    return [root, root / folder, root / folder / "raw", root / folder.lower(), root / folder.lower() / "raw"]


def _find_idx(dirs: Iterable[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def load_mnist_idx(root: str | Path, split: str, folder: str = "MNIST", dataset: str = "MNIST") -> tuple[np.ndarray, np.ndarray]:
    """Load an MNIST-format split (``train``/``test``) from IDX files under ``root``.

    ``folder`` is the dataset's conventional sub-directory ("MNIST" or "FashionMNIST").
    """
    root = Path(root)
    img_stem, lbl_stem = MNIST_FILES[split]
    dirs = mnist_search_dirs(root, folder)
    img_path, lbl_path = _find_idx(dirs, img_stem), _find_idx(dirs, lbl_stem)
    if img_path is None or lbl_path is None:
        expected = [root / folder / "raw" / img_stem, root / folder / "raw" / lbl_stem]
        raise missing_files_error(
            dataset,
            expected,
            f"(also accepted: the same names with .gz, directly in {root} or in {root / folder}).",
        )
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise ValueError(f"{img_path}: expected a 3-d IDX image array, got shape {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    return images[:, None, :, :].astype(np.uint8), labels.astype(np.int64)


SVHN_FILES: dict[str, str] = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


def load_svhn_mat(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load an SVHN cropped-digits split from ``<root>/<split>_32x32.mat`` (also ``<root>/svhn/``).

    The .mat holds ``X`` as HxWxCxN uint8 and ``y`` as Nx1 with digit 0 stored as label 10.
    """
    from scipy.io import loadmat  # scipy is an optional dependency of the data extras

    root = Path(root)
    name = SVHN_FILES[split]
    candidates = [root / name, root / "svhn" / name, root / "SVHN" / name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise missing_files_error("SVHN", [candidates[0]], f"(also accepted: {candidates[1]}, {candidates[2]}).")
    mat = loadmat(path)
    x = np.asarray(mat["X"])
    y = np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[2] != 3:
        raise ValueError(f"{path}: expected X of shape (32, 32, 3, N), got {x.shape}")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8)
    labels = np.where(y == 10, 0, y)
    return images, labels


CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def load_cifar10_batches(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10 from the pickled python batches in ``<root>/cifar-10-batches-py``.

    Each batch is a dict with ``data`` (N x 3072 uint8, channel-major 3x32x32) and ``labels``.
    """
    root = Path(root)
    base = root / CIFAR10_DIR
    paths = [base / n for n in CIFAR10_FILES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise missing_files_error("CIFAR-10", missing)
    images, labels = [], []
    for p in paths:
        d = _unpickle(p)
        data = np.asarray(d["data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def cifar10_class_names(root: str | Path) -> list[str] | None:
    """Class names from ``batches.meta`` when present."""
    meta = Path(root) / CIFAR10_DIR / "batches.meta"
    if not meta.is_file():
        return None
    names = _unpickle(meta).get("label_names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names is not None else None


STL10_DIR = "stl10_binary"
STL10_FILES: dict[str, tuple[str, str]] = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}


def load_stl10_bin(root: str | Path, split: str, image_size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Load the labelled STL-10 split from ``<root>/stl10_binary/{split}_X.bin, {split}_y.bin``.

    ``*_X.bin`` is raw uint8 with each image stored as 3 x 96 x 96 in column-major order (so it is
    transposed to row-major here); ``*_y.bin`` holds one uint8 label per image, numbered 1..10.
    """
    root = Path(root)
    x_path, y_path = (root / STL10_DIR / n for n in STL10_FILES[split])
    missing = [p for p in (x_path, y_path) if not p.is_file()]
    if missing:
        raise missing_files_error("STL-10", missing)
    raw = np.fromfile(x_path, dtype=np.uint8)
    per_image = 3 * image_size * image_size
    if raw.size % per_image:
        raise ValueError(f"{x_path}: size {raw.size} is not a multiple of 3x{image_size}x{image_size}")
    images = np.ascontiguousarray(raw.reshape(-1, 3, image_size, image_size).transpose(0, 1, 3, 2))
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != len(images):
        raise ValueError(f"{x_path} has {len(images)} images but {y_path} has {len(labels)} labels")
    return images, labels


def stl10_class_names(root: str | Path) -> list[str] | None:
    """Class names from ``class_names.txt`` when present."""
    path = Path(root) / STL10_DIR / "class_names.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else None


def scan_image_folder(split_dir: str | Path, classes: Sequence[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """List ``<split_dir>/<class>/<image>`` files: (paths, labels, class names).

    Classes are the sorted sub-directory names unless ``classes`` is given (so val uses train's
    numbering).  Files are sorted for a deterministic order.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise missing_files_error("ImageFolder", [split_dir / "<class>" / "<image>.jpg"])
    if classes is None:
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise missing_files_error("ImageFolder", [split_dir / "<class>" / "<image>.jpg"], "(no class sub-directories)")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for c in classes:
        d = split_dir / c
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
                labels.append(index[c])
    if not paths:
        raise missing_files_error("ImageFolder", [split_dir / classes[0] / "<image>.jpg"], "(no image files found)")
    return paths, np.asarray(labels, dtype=np.int64), list(classes)
