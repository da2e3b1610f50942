"""Tests for parml.data: synthetic generators, file readers and their error messages, batching."""
import gzip
import hashlib
import math
import struct

import numpy as np
import pytest
import torch

from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import DATASETS, Dataset, DataError, batches, load_dataset, read_idx
from parml.training.report import read_metrics
from parml.training.trainer import train

# sha256 of the fixture files (tests/fixtures/mnist/README.md)
FIXTURE_SHA256 = {"t10k-images-idx3-ubyte.gz": "dea257571a8e56515f82c0ee3b3a60128230d9b9210708d7185af68badf7a9e0",
                  "t10k-labels-idx1-ubyte.gz": "a3c98ad4b9ec72f2e248f6dfb6798ecc6c74961a3300ed95aeedd7e96510beed"}


# ------------------------------------------------------------------ helpers
def write_idx_images(path, images, count=None, magic=2051, gz=False):
    n, r, c = images.shape
    data = struct.pack(">IIII", magic, n if count is None else count, r, c) + images.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)
    return str(path)


def write_idx_labels(path, labels, magic=2049, gz=False):
    data = struct.pack(">II", magic, len(labels)) + np.asarray(labels, dtype=np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)
    return str(path)


def write_mnist(d, split, n, gz, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28))
    labels = rng.integers(0, 10, size=n)
    ext = ".gz" if gz else ""
    write_idx_images(d / f"{split}-images-idx3-ubyte{ext}", images, gz=gz)
    write_idx_labels(d / f"{split}-labels-idx1-ubyte{ext}", labels, gz=gz)
    return images, labels


# ------------------------------------------------------------------ circles
def test_circles_deterministic_per_seed_and_different_across_seeds():
    a, b, c = load_dataset("circles", seed=3), load_dataset("circles", seed=3), load_dataset("circles", seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, c.x_train)


def test_circles_sizes_labels_and_gap():
    d = load_dataset("circles", seed=0)
    assert d.x_train.shape == (2000, 2) and d.x_val.shape == (1000, 2)
    assert d.y_train.dtype == torch.int64 and d.x_train.dtype == torch.float32
    assert (d.num_classes, d.task, d.input_shape) == (2, "classification", (2,))
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val)):
        r = x.double().norm(dim=1)
        assert (x.abs() <= 3).all()
        assert not ((r > 1 + 1e-6) & (r < 2 - 1e-6)).any(), "point in the gap"
        assert (r < 3 + 1e-6).all()
        assert torch.equal(y, (r >= 1.5).long())
        assert set(y.tolist()) == {0, 1}
    small = load_dataset("circles", n_train=10, n_val=7)
    assert len(small.x_train) == 10 and len(small.x_val) == 7


# ------------------------------------------------------------------ regression
@pytest.mark.parametrize("function,ref", [
    ("cos2sin", lambda x: np.cos(x) ** 2 * np.sin(x ** 2)),
    ("coscos_sin", lambda x: np.cos(x ** 2) * np.cos(x) * np.sin(x ** 2)),
])
def test_regression_values(function, ref):
    d = load_dataset("regression", seed=1, dtype=torch.float64, function=function)
    assert d.x_train.shape == (2000, 1) and d.y_train.shape == (2000, 1)
    assert d.x_val.shape == (1500, 1) and d.y_val.shape == (1500, 1)
    assert (d.task, d.num_classes, d.input_shape) == ("regression", 0, (1,))
    assert d.y_train.dtype == torch.float64
    assert d.x_train.min() >= 0 and d.x_train.max() <= 2 * math.pi
    xv, xt = d.x_val.numpy(), d.x_train.numpy()
    np.testing.assert_allclose(d.y_val.numpy(), ref(xv), rtol=0, atol=1e-12)  # noise-free
    resid = d.y_train.numpy() - ref(xt)
    assert 0.0015 < resid.std() < 0.0025 and abs(resid.mean()) < 5e-4  # N(0, (1/500)^2)
    assert load_dataset("regression").y_val.dtype == torch.float32


def test_regression_bad_function():
    with pytest.raises(DataError, match="function"):
        load_dataset("regression", function="tanh")


# ------------------------------------------------------------------ registry / options
def test_registry_and_errors():
    assert {"circles", "regression", "mnist", "fashion-mnist", "cifar10", "digits"} <= set(DATASETS)
    with pytest.raises(DataError, match="circles"):
        load_dataset("nope")
    with pytest.raises(DataError, match="n_train"):
        load_dataset("circles", n_trian=5)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="n_val must be a positive integer"):
        load_dataset("circles", n_val=0)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="scikit-learn"):
            load_dataset("digits")


def test_dataset_to():
    d = load_dataset("circles", n_train=5, n_val=5).to(dtype=torch.float64)
    assert isinstance(d, Dataset)
    assert d.x_train.dtype == torch.float64 and d.y_train.dtype == torch.int64


# ------------------------------------------------------------------ MNIST: the fixture and the full set
def test_mnist_fixture_is_intact_and_loads(mnist_fixture):
    for name, digest in FIXTURE_SHA256.items():
        assert hashlib.sha256((mnist_fixture / name).read_bytes()).hexdigest() == digest, name
    d = load_dataset("mnist", data_dir=str(mnist_fixture), seed=0, n_train=400, n_val=200)
    assert d.name == "mnist(t10k split 400/200)"
    assert d.x_train.shape == (400, 784) and d.x_val.shape == (200, 784) and d.num_classes == 10
    for y in (d.y_train, d.y_val):
        assert torch.equal(torch.unique(y), torch.arange(10))
    assert d.x_train.mean(dim=0).abs().max() < 1e-5 and d.x_train.max() - d.x_train.min() > 0.9
    images = read_idx(str(mnist_fixture / "t10k-images-idx3-ubyte.gz"), "images", "mnist")
    labels = read_idx(str(mnist_fixture / "t10k-labels-idx1-ubyte.gz"), "labels", "mnist")
    assert images.shape == (600, 28, 28) and labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    with pytest.raises(DataError, match=r"^mnist: cannot split the 600 t10k samples into n_train=8000 / n_val=2000$"):
        load_dataset("mnist", data_dir=str(mnist_fixture))


def test_mnist_fixture_is_the_head_of_the_official_test_set(mnist_fixture, full_mnist):
    for kind, name in (("images", "t10k-images-idx3-ubyte.gz"), ("labels", "t10k-labels-idx1-ubyte.gz")):
        cut = read_idx(str(mnist_fixture / name), kind, "mnist")
        full = read_idx(str(full_mnist / name), kind, "mnist")
        assert len(full) == 10000 and torch.equal(cut, full[:len(cut)]), name


def test_full_mnist_t10k_split(full_mnist):
    d = load_dataset("mnist", data_dir=str(full_mnist), seed=0)
    assert d.name == "mnist(t10k split 8000/2000)"
    assert d.x_train.shape == (8000, 784) and d.x_val.shape == (2000, 784)
    assert d.input_shape == (784,) and d.num_classes == 10
    assert torch.equal(torch.unique(d.y_train), torch.arange(10))
    assert d.y_val.min() >= 0 and d.y_val.max() <= 9
    assert d.x_train.min() >= -1 and d.x_train.max() <= 1
    assert d.x_train.mean(dim=0).abs().max() < 1e-5
    assert d.x_train.max() - d.x_train.min() > 0.9
    # same seed, same split, whatever the resolution or layout
    again = load_dataset("mnist", data_dir=str(full_mnist), seed=0, flatten=False, resolution=14)
    assert again.x_train.shape == (8000, 1, 14, 14) and again.input_shape == (1, 14, 14)
    assert torch.equal(again.y_train, d.y_train)
    other = load_dataset("mnist", data_dir=str(full_mnist), seed=1, n_train=100, n_val=50)
    assert len(other.x_train) == 100 and len(other.x_val) == 50 and other.name == "mnist(t10k split 100/50)"


# ------------------------------------------------------------------ digits (scikit-learn, in the test extra)
def test_digits_loads_and_trains(tmp_path):
    pytest.importorskip("sklearn", reason="digits needs scikit-learn (pip install -e '.[test]')")
    d = load_dataset("digits")
    assert (d.name, d.num_classes, d.task, d.input_shape) == ("digits", 10, "classification", (64,))
    assert d.x_train.shape == (1438, 64) and d.x_val.shape == (359, 64)
    assert torch.equal(torch.unique(d.y_train), torch.arange(10)) and d.x_train.mean(dim=0).abs().max() < 1e-6
    assert load_dataset("digits", flatten=False).x_train.shape == (1438, 1, 8, 8)
    cfg = TrainConfig(dataset="digits", blocks=4, levels=2, width=12, lr=0.1, max_cycles=8, target_accuracy=None,
                      progress=False, out=str(tmp_path), run_name="digits")
    summary = train(cfg, SelfComm())
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "digits"))]
    assert len(losses) == 8 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert summary["val_acc"] > 0.25          # chance: 0.1


# ------------------------------------------------------------------ IDX reader
@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    images, labels = write_mnist(tmp_path, "t10k", 20, gz)
    imgs = read_idx(str(tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))), "images")
    assert imgs.dtype == torch.uint8 and torch.equal(imgs, torch.from_numpy(images.astype(np.uint8)))
    d = load_dataset("mnist", data_dir=str(tmp_path), flatten=False, n_train=15, n_val=5)
    assert d.x_train.shape == (15, 1, 28, 28) and d.name == "mnist(t10k split 15/5)"
    # the split is a partition: every sample lands in exactly one of train/val
    assert sorted(d.y_train.tolist() + d.y_val.tolist()) == sorted(labels.tolist())


def test_train_and_t10k_files(tmp_path):
    train_imgs, train_labels = write_mnist(tmp_path, "train", 30, gz=False, seed=1)
    _, test_labels = write_mnist(tmp_path, "t10k", 12, gz=True, seed=2)
    d = load_dataset("fashion-mnist", data_dir=str(tmp_path), n_train=25)
    assert d.name == "fashion-mnist" and d.x_train.shape == (25, 784) and d.x_val.shape == (12, 784)
    assert d.y_train.tolist() == train_labels[:25].tolist() and d.y_val.tolist() == test_labels.tolist()
    mean = torch.from_numpy(train_imgs[:25].reshape(25, -1) / 255).mean(0)
    expect = torch.from_numpy(train_imgs[0].reshape(-1) / 255) - mean
    torch.testing.assert_close(d.x_train[0].double(), expect, atol=1e-6, rtol=0)


def test_train_only_is_split(tmp_path):
    write_mnist(tmp_path, "train", 30, gz=True)
    d = load_dataset("mnist", data_dir=str(tmp_path), n_train=20, n_val=10)
    assert d.name == "mnist(train split 20/10)" and len(d.x_train) == 20 and len(d.x_val) == 10
    with pytest.raises(DataError, match="cannot split the 30 train samples"):
        load_dataset("mnist", data_dir=str(tmp_path), n_train=25, n_val=10)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_wrong_magic(tmp_path, gz):
    p = write_idx_images(tmp_path / ("x.idx" + (".gz" if gz else "")), np.zeros((2, 28, 28)), magic=2049, gz=gz)
    with pytest.raises(DataError, match="magic") as e:
        read_idx(p, "images", "mnist")
    assert p in str(e.value)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    p = write_idx_images(tmp_path / ("x.idx" + (".gz" if gz else "")), np.zeros((2, 28, 28)), count=3, gz=gz)
    with pytest.raises(DataError) as e:
        read_idx(p, "images", "mnist")
    msg = str(e.value)
    assert p in msg and "truncated" in msg and "3 images of 28x28 (2368 bytes)" in msg and "1584" in msg


def test_idx_truncated_gzip_stream(tmp_path):
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx_images(p, np.zeros((5, 28, 28)), gz=True)
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(DataError, match=str(p)):
        read_idx(str(p), "images", "mnist")


def test_idx_bad_label(tmp_path):
    p = write_idx_labels(tmp_path / "l.idx", [1, 2, 10])
    with pytest.raises(DataError, match="label 10") as e:
        read_idx(p, "labels", "mnist")
    assert p in str(e.value)


def test_idx_count_mismatch(tmp_path):
    write_idx_images(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28)))
    write_idx_labels(tmp_path / "t10k-labels-idx1-ubyte", [0, 1, 2])
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "4 images" in msg and "3 labels" in msg and str(tmp_path / "t10k-images-idx3-ubyte") in msg


def test_idx_missing_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert "train-images-idx3-ubyte[.gz]" in str(e.value) and str(tmp_path) in str(e.value)
    write_idx_images(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=str(tmp_path))


# ------------------------------------------------------------------ CIFAR-10
def write_cifar(path, n, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    pixels = rng.integers(0, 256, size=(n, 3072))
    path.write_bytes(np.concatenate([labels[:, None], pixels], axis=1).astype(np.uint8).tobytes())
    return pixels, labels


def test_cifar_reader(tmp_path):
    pixels, labels = write_cifar(tmp_path / "data_batch_1.bin", 8, seed=0)
    _, test_labels = write_cifar(tmp_path / "test_batch.bin", 4, seed=1)
    d = load_dataset("cifar10", data_dir=str(tmp_path), flatten=False)
    assert d.x_train.shape == (8, 3, 32, 32) and d.x_val.shape == (4, 3, 32, 32)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert d.y_train.tolist() == labels.tolist() and d.y_val.tolist() == test_labels.tolist()
    per_channel = d.x_train.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3), atol=1e-4, rtol=0)
    # first pixel of the red channel, normalised with train statistics
    red = torch.from_numpy(pixels[:, :1024] / 255)
    torch.testing.assert_close(d.x_train[0, 0, 0, 0].double(), (red[0, 0] - red.mean()) / red.std(), atol=1e-5, rtol=0)
    flat = load_dataset("cifar10", data_dir=str(tmp_path))
    assert flat.x_train.shape == (8, 3072) and flat.input_shape == (3072,)


def test_cifar_wrong_size(tmp_path):
    write_cifar(tmp_path / "test_batch.bin", 2)
    bad = tmp_path / "data_batch_1.bin"
    bad.write_bytes(b"\x00" * 3074)
    with pytest.raises(DataError, match="3073") as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert str(bad) in str(e.value)


# ------------------------------------------------------------------ batches
def test_batches():
    a, b = batches(103, 10, seed=5, epoch=2), batches(103, 10, seed=5, epoch=2)
    assert len(a) == 11 and [len(x) for x in a] == [10] * 10 + [3]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(torch.cat(a).sort().values, torch.arange(103))
    c = batches(103, 10, seed=5, epoch=3)
    assert not torch.equal(torch.cat(a), torch.cat(c))
    assert not torch.equal(torch.cat(a), torch.cat(batches(103, 10, seed=6, epoch=2)))
    for bs in (None, 103, 500):
        (full,) = batches(103, bs, seed=5, epoch=2)
        assert torch.equal(full, torch.arange(103))
