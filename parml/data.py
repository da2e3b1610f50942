"""Datasets parml trains on, plus deterministic mini-batching.

Nothing is downloaded: synthetic sets are generated from a seeded
``torch.Generator`` (so a run is reproducible from its seed alone) and
image sets are read from local files under ``--data-dir``.  Every problem
with those files is reported as a one-line :class:`DataError` that names the
file and what is wrong, because a stack trace from deep inside a decoder
tells the user nothing about which download went bad.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import inspect
import math
import os
from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """A user-facing problem with a dataset name, option or data file."""


@dataclass
class Dataset:
    """A train/validation pair of tensors plus what a model needs to know.

    Labels of classification sets stay int64 whatever the float dtype, since
    that is what ``cross_entropy`` expects; regression targets follow the
    float dtype of the inputs.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int  # 0 for regression
    task: str  # "classification" | "regression"
    input_shape: tuple  # per-sample shape

    def to(self, dtype=None, device=None) -> "Dataset":
        """Return a copy with x (and y for regression) cast to ``dtype``, all moved to ``device``."""
        ydtype = dtype if self.task == "regression" else None
        x = {k: getattr(self, k).to(device=device, dtype=dtype) for k in ("x_train", "x_val")}
        y = {k: getattr(self, k).to(device=device, dtype=ydtype) for k in ("y_train", "y_val")}
        return dataclasses.replace(self, **x, **y)


def _classification(name, xt, yt, xv, yv, num_classes, flatten):
    """Build a classification Dataset, flattening images to [n, features] when asked."""
    if flatten:
        xt, xv = xt.reshape(len(xt), -1), xv.reshape(len(xv), -1)
    return Dataset(name, xt, yt, xv, yv, num_classes, "classification", tuple(xt.shape[1:]))


# --------------------------------------------------------------------- synthetic
def _circles(data_dir, seed, flatten, n_train=2000, n_val=1000):
    """Co-centric circles (Gaedke-Merzhäuser et al., §4).

    Points are uniform in [-3, 3]^2; ``||x|| <= 1`` is class 0 and
    ``2 <= ||x|| < 3`` is class 1.  Points in the gap or beyond radius 3 are
    rejected and redrawn, so the classes are separated by a margin and every
    point has a label.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        kept, have = [], 0
        while have < n:
            x = torch.rand(2 * (n - have) + 64, 2, generator=g, dtype=torch.float64) * 6 - 3
            r = x.norm(dim=1)
            x = x[(r <= 1) | ((r >= 2) & (r < 3))]
            kept.append(x)
            have += len(x)
        x = torch.cat(kept)[:n]
        return x, (x.norm(dim=1) >= 2).long()

    (xt, yt), (xv, yv) = draw(n_train), draw(n_val)
    return Dataset("circles", xt, yt, xv, yv, 2, "classification", (2,))


REGRESSION_FUNCTIONS = {
    "cos2sin": lambda x: torch.cos(x) ** 2 * torch.sin(x**2),
    "coscos_sin": lambda x: torch.cos(x**2) * torch.cos(x) * torch.sin(x**2),
}


def _regression(data_dir, seed, flatten, n_train=2000, n_val=1500, function="cos2sin", noise=1 / 500):
    """1-D regression of Zang's thesis on [0, 2*pi]: noisy train targets, noise-free validation.

    The validation set is the noise-free "test" set, so the validation loss
    measures how well the function itself (not the noise) is fitted.
    """
    if function not in REGRESSION_FUNCTIONS:
        raise DataError(f"regression: unknown function={function!r} (valid: {', '.join(REGRESSION_FUNCTIONS)})")
    f = REGRESSION_FUNCTIONS[function]
    g = torch.Generator().manual_seed(seed)
    xt = torch.rand(n_train, 1, generator=g, dtype=torch.float64) * (2 * math.pi)
    yt = f(xt) + noise * torch.randn(n_train, 1, generator=g, dtype=torch.float64)
    xv = torch.rand(n_val, 1, generator=g, dtype=torch.float64) * (2 * math.pi)
    return Dataset(f"regression({function})", xt, yt, xv, f(xv), 0, "regression", (1,))


# ------------------------------------------------------------------ image files
def _find(dirs, base):
    """Path of ``base`` or ``base.gz`` in the first directory that has one, else None."""
    for d in dirs:
        for p in (os.path.join(d, base), os.path.join(d, base + ".gz")):
            if os.path.isfile(p):
                return p
    return None


def _read_bytes(name, path):
    """File contents, transparently gunzipped; unreadable files become DataError."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        with open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{name}: cannot read {path}: {e}") from None


def read_idx(path: str, kind: str, name: str = "idx") -> torch.Tensor:
    """Read an IDX file (``kind`` "images" -> uint8 [n, rows, cols], "labels" -> int64 [n]).

    The header is checked against the file length so that a truncated
    download fails here with the sizes involved, not later as a reshape error.
    """
    data = _read_bytes(name, path)
    magic, ndim = (2051, 3) if kind == "images" else (2049, 1)
    hdr = 4 + 4 * ndim
    if len(data) < hdr:
        raise DataError(f"{name}: {path} is truncated: {len(data)} bytes, shorter than the {hdr}-byte IDX header")
    if int.from_bytes(data[:4], "big") != magic:
        got = int.from_bytes(data[:4], "big")
        raise DataError(f"{name}: {path} is not an IDX {kind} file: magic number {got}, expected {magic}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expect = hdr + math.prod(dims)
    what = f"{dims[0]} images of {dims[1]}x{dims[2]}" if kind == "images" else f"{dims[0]} labels"
    if len(data) != expect:
        problem = "is truncated" if len(data) < expect else "has trailing data"
        raise DataError(f"{name}: {path} {problem}: header says {what} ({expect} bytes) but the file has {len(data)}")
    arr = torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=hdr).copy()).reshape(dims)
    if kind == "labels":
        arr = arr.long()
        if len(arr) and int(arr.max()) >= 10:
            raise DataError(f"{name}: {path} has label {int(arr.max())}; labels must be 0..9")
    return arr


def _split(name, x, y, seed, n_train, n_val, source):
    """Deterministic seeded split of one file set into train/val, for when only that set exists."""
    if n_train < 1 or n_val < 1 or n_train + n_val > len(x):
        raise DataError(f"{name}: cannot split the {len(x)} {source} samples into n_train={n_train} / n_val={n_val}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:n_train], perm[n_train:n_train + n_val]
    return x[tr], y[tr], x[va], y[va], f"{name}({source} split {n_train}/{n_val})"


def _mnist_like(name, data_dir, seed, flatten, n_train=None, n_val=None, resolution=28):
    """MNIST / Fashion-MNIST from IDX files, scaled to [0, 1] and centred per pixel on the train split.

    If only the 10,000-image t10k set is present it is split 8000/2000 (by
    default) with a seeded permutation, and the split is recorded in the name.
    """
    if data_dir is None:
        raise DataError(f"{name}: --data-dir is required (a directory with the {name} IDX files)")
    dirs = [data_dir, os.path.join(data_dir, name)]
    sets = {}
    for split in ("train", "t10k"):
        img, lab = _find(dirs, f"{split}-images-idx3-ubyte"), _find(dirs, f"{split}-labels-idx1-ubyte")
        if img and not lab:
            raise DataError(f"{name}: {img} found but no {split}-labels-idx1-ubyte[.gz] in --data-dir {data_dir}")
        if img:
            x, y = read_idx(img, "images", name), read_idx(lab, "labels", name)
            if len(x) != len(y):
                raise DataError(f"{name}: {img} has {len(x)} images but {lab} has {len(y)} labels")
            sets[split] = (x, y)
    if not sets:
        raise DataError(f"{name}: no train-images-idx3-ubyte[.gz] or t10k-images-idx3-ubyte[.gz] in "
                        f"--data-dir {data_dir}")
    if "train" in sets and "t10k" in sets:
        (xt, yt), (xv, yv) = sets["train"], sets["t10k"]
        xt, yt, xv, yv, title = xt[:n_train], yt[:n_train], xv[:n_val], yv[:n_val], name
    else:
        source = next(iter(sets))
        xt, yt, xv, yv, title = _split(name, *sets[source], seed, n_train or 8000, n_val or 2000, source)
    rows = xt.shape[1]
    if resolution < 1 or rows % resolution:
        raise DataError(f"{name}: resolution={resolution} must divide the image size {rows}")
    xt, xv = (x.unsqueeze(1).float() / 255 for x in (xt, xv))
    if resolution != rows:  # average pooling keeps the [0, 1] range and the mean intensity
        k = rows // resolution
        xt, xv = (torch.nn.functional.avg_pool2d(x, k) for x in (xt, xv))
        title = f"{title}@{resolution}x{resolution}"
    mean = xt.mean(dim=0, keepdim=True)
    return _classification(title, xt - mean, yt, xv - mean, yv, 10, flatten)


def _cifar10(data_dir, seed, flatten, n_train=None, n_val=None):
    """CIFAR-10 binary version, scaled to [0, 1] and normalised per channel with train mean/std."""
    if data_dir is None:
        raise DataError("cifar10: --data-dir is required (a directory with data_batch_*.bin and test_batch.bin)")
    dirs = [data_dir, os.path.join(data_dir, "cifar-10-batches-bin"), os.path.join(data_dir, "cifar10")]

    def read(path):
        data = _read_bytes("cifar10", path)
        if len(data) == 0 or len(data) % 3073:
            raise DataError(f"cifar10: {path} has {len(data)} bytes, not a multiple of the 3073-byte record "
                            "(1 label + 3072 pixels)")
        rec = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).reshape(-1, 3073)
        y = rec[:, 0].long()
        if int(y.max()) >= 10:
            raise DataError(f"cifar10: {path} has label {int(y.max())}; labels must be 0..9")
        return rec[:, 1:].reshape(-1, 3, 32, 32), y

    parts = [read(p) for p in (_find(dirs, f"data_batch_{i}.bin") for i in range(1, 6)) if p]
    test = _find(dirs, "test_batch.bin")
    if not parts and not test:
        raise DataError(f"cifar10: no data_batch_[1-5].bin or test_batch.bin in --data-dir {data_dir}")
    train = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])) if parts else None
    if train and test:
        (xt, yt), (xv, yv), title = train, read(test), "cifar10"
        xt, yt, xv, yv = xt[:n_train], yt[:n_train], xv[:n_val], yv[:n_val]
    else:  # only one of the two present: split it, as for MNIST
        source = "data_batch" if train else "test_batch"
        xt, yt, xv, yv, title = _split("cifar10", *(train or read(test)), seed, n_train or 8000, n_val or 2000, source)
    xt, xv = xt.float() / 255, xv.float() / 255
    mean, std = xt.mean(dim=(0, 2, 3), keepdim=True), xt.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return _classification(title, (xt - mean) / std, yt, (xv - mean) / std, yv, 10, flatten)


def _digits(data_dir, seed, flatten):
    """scikit-learn's bundled 8x8 digits: a tiny real image set that needs no files."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.as_tensor(d.target, dtype=torch.int64)
    n_val = len(x) // 5
    xt, yt, xv, yv, _ = _split("digits", x, y, seed, len(x) - n_val, n_val, "all")
    mean = xt.mean(dim=0, keepdim=True)
    return _classification("digits", xt - mean, yt, xv - mean, yv, 10, flatten)


DATASETS = {
    "circles": _circles,
    "regression": _regression,
    "mnist": functools.partial(_mnist_like, "mnist"),
    "fashion-mnist": functools.partial(_mnist_like, "fashion-mnist"),
    "cifar10": _cifar10,
    "digits": _digits,
}
"""Registry: name -> loader(data_dir, seed, flatten, **options) -> Dataset."""


def default_mnist_dir() -> str | None:
    """``../shared/data/mnist`` next to the repository root, if it exists (the workplace's MNIST files)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.normpath(os.path.join(root, "..", "shared", "data", "mnist"))
    return path if os.path.isdir(path) else None


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0, dtype=torch.float32,
                 flatten: bool = True, **options) -> Dataset:
    """Load dataset ``name`` with x (and y for regression) in ``dtype``.

    Unknown names and options are rejected with the valid choices, so a typo
    on the command line is not silently ignored.
    """
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (valid: {', '.join(DATASETS)})")
    loader = DATASETS[key]
    valid = [p for p in inspect.signature(loader).parameters if p not in ("data_dir", "seed", "flatten")]
    bad = [k for k in options if k not in valid]
    if bad:
        raise DataError(f"{key}: unknown option {bad[0]!r} (valid: {', '.join(valid) or 'none'})")
    for k in ("n_train", "n_val"):
        if options.get(k) is not None and (not isinstance(options[k], int) or options[k] < 1):
            raise DataError(f"{key}: {k} must be a positive integer, got {options[k]!r}")
    return loader(data_dir, seed, flatten, **options).to(dtype=dtype)


def batches(n: int, batch_size: int | None, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index tensors covering ``range(n)`` once for one epoch.

    The shuffle depends only on ``(seed, epoch)``, so a resumed or
    distributed run sees the same batches as an uninterrupted one.  A
    ``batch_size`` of None or >= n gives one full batch in natural order
    (full-batch training); the last partial batch is kept.
    """
    if batch_size is None or batch_size >= n:
        return [torch.arange(n)]
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return list(torch.randperm(n, generator=g).split(batch_size))
