"""Opt-in plain-urllib downloads of the public benchmark datasets.

Only used when a datamodule is created with ``download=True``.  On a machine without network the
attempt fails fast with a message that says what to copy where instead.
"""

from __future__ import annotations

import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

# dataset -> list of (url, path relative to data_dir, extract?)
SOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "mnist": [
        (f"https://ossci-datasets.s3.amazonaws.com/mnist/{n}.gz", f"MNIST/raw/{n}.gz", False)
        for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    ],
    "fashion_mnist": [
        (f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{n}.gz", f"FashionMNIST/raw/{n}.gz", False)
        for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    ],
    "svhn": [
        ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "train_32x32.mat", False),
        ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "test_32x32.mat", False),
    ],
    "cifar10": [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz", True)],
    "stl10": [("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "stl10_binary.tar.gz", True)],
}


def download_url(url: str, dest: str | Path, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` (atomically, via a .part file); raise RuntimeError when offline."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {url} to {dest}: {exc}. This machine appears to have no network access; "
            f"copy the file to {dest} by hand."
        ) from exc
    tmp.replace(dest)
    return dest


def _safe_extract(archive: Path, target: Path) -> None:
    with tarfile.open(archive) as tar:
        root = target.resolve()
        for member in tar.getmembers():
            if not (target / member.name).resolve().is_relative_to(root):
                raise RuntimeError(f"{archive}: refusing to extract {member.name!r} outside {target}")
        tar.extractall(target)


def download_dataset(name: str, data_dir: str | Path) -> None:
    """Download (and unpack) the files of ``name`` into ``data_dir`` in the layout the loaders read."""
    if name not in SOURCES:
        raise ValueError(f"no download source for {name!r}; place the files by hand")
    data_dir = Path(data_dir)
    for url, rel, extract in SOURCES[name]:
        dest = data_dir / rel
        if not dest.exists():
            download_url(url, dest)
        if extract:
            _safe_extract(dest, data_dir)
