"""Tests of maskprune.data: real MNIST / Fashion-MNIST (fetched into the default cache once), checksum and
availability errors, CIFAR loaders on tiny archives in the official layout, and iterate_batches."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from maskprune import data

MNIST_SHA = data.DATASETS["mnist"].files[0].sha256
UNREACHABLE = "http://127.0.0.1:9/"  # loopback discard port: refused at once, nothing leaves the machine


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def u8_hash(t: torch.Tensor) -> str:
    """An endianness-free fingerprint of a label tensor."""
    return hashlib.sha256(t.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def mnist() -> data.Splits:
    return data.load("mnist")


@pytest.fixture(scope="module")
def fashion() -> data.Splits:
    return data.load("fashion-mnist")


# -- real data --------------------------------------------------------------------------------------------------

def test_mnist_real(mnist):
    s = mnist
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (50000, 10000, 10000)
    assert s.train_x.shape[1:] == s.in_shape == (1, 28, 28) and s.num_classes == 10 and s.name == "mnist"
    for x, y in ((s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(x) == len(y)
        assert x.min() >= 0 and x.max() < 1 and x.max() > 0.99
        assert y.min() == 0 and y.max() == 9
    # the file's own split, in the file's order
    assert s.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert s.val_y[:8].tolist() == [3, 8, 6, 9, 6, 4, 5, 3]
    assert s.test_y[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert torch.bincount(s.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    again = data.load("mnist")
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(s, key), getattr(again, key)), key


def test_mnist_cache_equals_fresh_decode(mnist, tmp_path):
    """The decoded-tensor cache gives exactly what decoding the verified file gives."""
    src = data.fetch("mnist")
    (tmp_path / "mnist").mkdir()
    shutil.copyfile(src / "mnist.pkl.gz", tmp_path / "mnist" / "mnist.pkl.gz")
    fresh = data.load("mnist", root=tmp_path, download=False)
    assert list((tmp_path / "mnist").glob("tensors-*.pt"))
    for key in ("train_x", "val_x", "test_y"):
        assert torch.equal(getattr(fresh, key), getattr(mnist, key)), key


def test_fashion_real(fashion):
    s = fashion
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (54000, 6000, 10000)
    assert s.in_shape == (1, 28, 28) and s.train_x.shape[1:] == (1, 28, 28) and s.num_classes == 10
    assert s.train_x.dtype == torch.float32 and s.train_y.dtype == torch.int64
    assert s.train_x.min() >= 0 and s.train_x.max() <= 1
    assert torch.bincount(s.test_y).tolist() == [1000] * 10
    # the seeded hold-out is pinned: these change only if the split does
    assert torch.bincount(s.val_y).tolist() == [628, 610, 576, 587, 599, 618, 602, 601, 598, 581]
    assert s.val_y[:8].tolist() == [0, 0, 5, 9, 3, 2, 0, 2]
    assert u8_hash(s.val_y) == "b2103d900ebba08e"
    assert u8_hash((s.val_x * 255).round()) == "78841fb5234cc68d"  # the same 6000 images, in the same order
    again = data.load("fashion-mnist")
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(s, key), getattr(again, key)), key


def test_fashion_split_is_disjoint():
    train, val = data._holdout(60000)
    assert len(train) == 54000 and len(val) == 6000
    assert len(np.union1d(train, val)) == 60000
    assert np.array_equal(val[:5], data._holdout(60000)[1][:5])


def test_fashion_from_installed_package_dir(fashion, tmp_path, monkeypatch):
    """With the Debian package installed, fetch copies its files (no download)."""
    system = tmp_path / "usr-share"
    shutil.copytree(data.fetch("fashion-mnist"), system, ignore=shutil.ignore_patterns(".*", "tensors-*"))
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", system)
    monkeypatch.setattr(data, "APT_GET", "maskprune-no-such-apt-get")
    monkeypatch.setattr(data, "FASHION_URL", UNREACHABLE)
    root = tmp_path / "cache"
    folder = data.fetch("fashion-mnist", root=root)
    assert folder == root / "fashion-mnist"
    assert sorted(p.name for p in folder.glob("*.gz")) == sorted(f.name for f in data.DATASETS["fashion-mnist"].files)
    assert torch.equal(data.load("fashion-mnist", root=root, download=False).val_x, fashion.val_x)


def test_normalize_and_to(mnist):
    n = mnist.normalize()
    assert n.normalized and not mnist.normalized
    assert abs(n.train_x.mean().item()) < 1e-3 and abs(n.train_x.std().item() - 1) < 1e-3
    assert torch.equal(n.train_y, mnist.train_y)
    with pytest.raises(ValueError, match="already normalized"):
        n.normalize()
    moved = mnist.to("cpu")
    assert moved.name == "mnist" and torch.equal(moved.val_x, mnist.val_x)
    assert "train=50000" in repr(mnist)


# -- errors -----------------------------------------------------------------------------------------------------

def test_checksum_error_on_truncated_copy(tmp_path, mnist):
    src = data.fetch("mnist")
    dst = tmp_path / "mnist"
    dst.mkdir()
    shutil.copyfile(src / "mnist.pkl.gz", dst / "mnist.pkl.gz")
    data.fetch("mnist", root=tmp_path)  # verifies it and stamps it
    for cache in src.glob("tensors-*.pt"):  # a valid decoded cache must not rescue a bad source
        shutil.copyfile(cache, dst / cache.name)
    with open(dst / "mnist.pkl.gz", "r+b") as fh:
        fh.truncate(1_000_000)
    got = sha256_of(dst / "mnist.pkl.gz")
    with pytest.raises(data.ChecksumError) as info:
        data.load("mnist", root=tmp_path, download=False)
    msg = str(info.value)
    assert str(dst / "mnist.pkl.gz") in msg and MNIST_SHA in msg and got in msg
    assert "maskprune datasets fetch mnist" in msg and "elete" in msg
    assert info.value.expected == MNIST_SHA and info.value.got == got
    with pytest.raises(data.ChecksumError):  # fetch does not paper over it either
        data.fetch("mnist", root=tmp_path)
    with pytest.raises(data.ChecksumError):  # nor does download=True
        data.load("mnist", root=tmp_path)


def test_checksum_error_on_same_size_corruption(tmp_path, mnist):
    (tmp_path / "mnist").mkdir()
    path = tmp_path / "mnist" / "mnist.pkl.gz"
    raw = bytearray((data.fetch("mnist") / "mnist.pkl.gz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(data.ChecksumError, match=MNIST_SHA):
        data.load("mnist", root=tmp_path, download=False)


@pytest.mark.parametrize("name", list(data.DATASETS))
def test_unavailable_without_download(tmp_path, name):
    with pytest.raises(data.DatasetUnavailable) as info:
        data.load(name, root=tmp_path, download=False)
    assert f"maskprune datasets fetch {name}" in str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert not (tmp_path / name).exists()  # nothing fetched, nothing created


def test_unknown_name():
    for call in (lambda: data.load("imagenet"), lambda: data.fetch("imagenet")):
        with pytest.raises(ValueError) as info:
            call()
        for name in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
            assert name in str(info.value)


def test_fashion_unfetchable_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setattr(data, "APT_GET", "maskprune-no-such-apt-get")
    monkeypatch.setattr(data, "FASHION_URL", UNREACHABLE)
    with pytest.raises(data.DatasetUnavailable) as info:
        data.load("fashion-mnist", root=tmp_path / "cache")
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and UNREACHABLE in msg
    assert "maskprune datasets fetch fashion-mnist" in msg
    assert not list((tmp_path / "cache" / "fashion-mnist").glob("*.gz"))


def test_cifar_unfetchable_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR_URL", UNREACHABLE)
    with pytest.raises(data.DatasetUnavailable, match="cifar-10-python.tar.gz"):
        data.fetch("cifar10", root=tmp_path)
    assert not (tmp_path / "cifar10" / "cifar-10-python.tar.gz").exists()


def test_status(tmp_path, monkeypatch):
    src = data.fetch("mnist") / "mnist.pkl.gz"
    monkeypatch.setenv("MASKPRUNE_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    rows = data.status()
    assert [r["name"] for r in rows] == list(data.DATASETS)
    assert all(set(r) >= {"name", "source", "present"} and r["present"] is False for r in rows)
    (tmp_path / "mnist").mkdir()
    shutil.copyfile(src, tmp_path / "mnist" / "mnist.pkl.gz")
    assert {r["name"]: r["present"] for r in data.status()} == {
        "mnist": True, "fashion-mnist": False, "cifar10": False, "cifar100": False}
    assert {r["name"]: r["present"] for r in data.status(tmp_path / "elsewhere")}["mnist"] is False


# -- CIFAR on tiny archives in the official layout ----------------------------------------------------------------

def _batch(ids: range, labels_key: bytes, num_classes: int, extra: dict | None = None) -> dict:
    """A batch dict as in the official pickles: image i has its id in the first red pixel and green plane 77."""
    rows = np.random.RandomState(len(ids)).randint(0, 256, size=(len(ids), 3072)).astype(np.uint8)
    rows[:, 0] = np.array(ids, dtype=np.uint8)
    rows[:, 1024:2048] = 77
    batch = {b"batch_label": b"tiny batch", b"data": rows, labels_key: [i % num_classes for i in ids],
             b"filenames": [f"img_{i}.png".encode() for i in ids]}
    batch.update(extra or {})
    return batch


def _add(tar: tarfile.TarFile, name: str, obj, protocol: int = 2) -> None:
    raw = pickle.dumps(obj, protocol=protocol)
    member = tarfile.TarInfo(name)
    member.size = len(raw)
    tar.addfile(member, io.BytesIO(raw))


def _tiny_cifar10(path: Path) -> dict[int, np.ndarray]:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = {}
    with tarfile.open(path, "w:gz") as tar:
        for b in range(5):
            ids = range(20 * b, 20 * b + 20)
            batch = _batch(ids, b"labels", 10)
            images.update(zip(ids, batch[b"data"]))
            _add(tar, f"cifar-10-batches-py/data_batch_{b + 1}", batch, protocol=5 if b == 0 else 2)
        test = _batch(range(200, 210), b"labels", 10)
        _add(tar, "cifar-10-batches-py/test_batch", test)
        _add(tar, "cifar-10-batches-py/batches.meta",
             {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 20, b"num_vis": 3072})
    return images


def _tiny_cifar100(path: Path) -> dict[int, np.ndarray]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        train = _batch(range(100), b"fine_labels", 100, {b"coarse_labels": [i % 20 for i in range(100)]})
        _add(tar, "cifar-100-python/train", train)
        _add(tar, "cifar-100-python/test",
             _batch(range(100, 110), b"fine_labels", 100, {b"coarse_labels": [0] * 10}))
        _add(tar, "cifar-100-python/meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                            b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})
    return dict(zip(range(100), train[b"data"]))


def _accept(monkeypatch, name: str, archive: Path) -> None:
    """Point the registry's expected sha256 at the tiny archive (the official hash stays in the real table)."""
    info = data.DATASETS[name]
    spec = dataclasses.replace(info.files[0], sha256=sha256_of(archive))
    monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(info, files=(spec,)))


@pytest.mark.parametrize("name,maker,archive,num_classes", [
    ("cifar10", _tiny_cifar10, "cifar-10-python.tar.gz", 10),
    ("cifar100", _tiny_cifar100, "cifar-100-python.tar.gz", 100)])
def test_cifar_tiny_archive(tmp_path, monkeypatch, name, maker, archive, num_classes):
    path = tmp_path / name / archive
    images = maker(path)
    official = data.DATASETS[name].files[0].sha256
    with pytest.raises(data.ChecksumError) as info:  # not the official archive: refused
        data.load(name, root=tmp_path, download=False)
    assert official in str(info.value) and f"maskprune datasets fetch {name}" in str(info.value)

    _accept(monkeypatch, name, path)
    s = data.load(name, root=tmp_path, download=False)
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (90, 10, 10)
    assert s.in_shape == (3, 32, 32) and s.train_x.shape[1:] == (3, 32, 32) and s.num_classes == num_classes
    assert s.train_x.dtype == torch.float32 and s.train_y.dtype == torch.int64
    assert s.train_x.min() >= 0 and s.train_x.max() <= 1
    x = torch.cat([s.train_x, s.val_x])
    y = torch.cat([s.train_y, s.val_y])
    pixels = (x * 255).round().to(torch.uint8)
    ids = pixels[:, 0, 0, 0].tolist()
    assert sorted(ids) == list(range(100))  # train and val partition the training images
    assert torch.all(pixels[:, 1] == 77)  # planar layout: the second 1024 bytes are the green channel
    for k, i in enumerate(ids):
        assert np.array_equal(pixels[k].numpy().reshape(3072), images[i])
        assert y[k].item() == i % num_classes
    first_test_id = 200 if name == "cifar10" else 100
    assert (s.test_x[:, 0, 0, 0] * 255).round().long().tolist() == list(range(first_test_id, first_test_id + 10))
    assert s.test_y.tolist() == [i % num_classes for i in range(first_test_id, first_test_id + 10)]
    again = data.load(name, root=tmp_path, download=False)  # from the decoded cache now
    assert list((tmp_path / name).glob("tensors-*.pt"))
    assert torch.equal(again.train_x, s.train_x) and torch.equal(again.val_y, s.val_y)
    n = s.normalize()
    mean = torch.tensor(data.DATASETS[name].mean).view(1, 3, 1, 1)
    std = torch.tensor(data.DATASETS[name].std).view(1, 3, 1, 1)
    assert torch.allclose(n.test_x, (s.test_x - mean) / std)


def test_cifar_archive_with_code_is_refused(tmp_path, monkeypatch):
    """Even with verification bypassed, a pickle that would run code is not unpickled."""
    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with tarfile.open(path, "w:gz") as tar:
        for b in range(1, 6):
            _add(tar, f"cifar-10-batches-py/data_batch_{b}", Evil())
        _add(tar, "cifar-10-batches-py/test_batch", Evil())
    _accept(monkeypatch, "cifar10", path)
    with pytest.raises(data.DatasetUnavailable, match=r"refusing to load .*print"):
        data.load("cifar10", root=tmp_path, download=False)


def test_cifar_archive_missing_batch(tmp_path, monkeypatch):
    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-10-batches-py/data_batch_1", _batch(range(10), b"labels", 10))
    _accept(monkeypatch, "cifar10", path)
    with pytest.raises(data.DatasetUnavailable, match="data_batch_2 is missing"):
        data.load("cifar10", root=tmp_path, download=False)


# -- iterate_batches --------------------------------------------------------------------------------------------

def test_iterate_batches_deterministic():
    x = torch.arange(103, dtype=torch.float32).view(-1, 1)
    y = torch.arange(103)

    def order(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return [yb.tolist() for _, yb in data.iterate_batches(x, y, 10, shuffle=True, generator=g, **kw)]

    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c
    assert [len(batch) for batch in a] == [10] * 10 + [3]
    assert sorted(sum(a, [])) == list(range(103))  # every example exactly once
    dropped = order(0, drop_last=True)
    assert [len(batch) for batch in dropped] == [10] * 10 and dropped == a[:10]
    for xb, yb in data.iterate_batches(x, y, 10, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert torch.equal(xb.view(-1).long(), yb)  # x and y stay paired
    # one generator drives successive epochs: each differs, the sequence repeats with the seed
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    e1 = [[yb.tolist() for _, yb in data.iterate_batches(x, y, 7, shuffle=True, generator=g1)] for _ in range(2)]
    e2 = [[yb.tolist() for _, yb in data.iterate_batches(x, y, 7, shuffle=True, generator=g2)] for _ in range(2)]
    assert e1 == e2 and e1[0] != e1[1]


def test_iterate_batches_in_order_and_errors():
    x, y = torch.randn(25, 3), torch.arange(25)
    batches = list(data.iterate_batches(x, y, 8, shuffle=False))
    assert [yb.tolist() for _, yb in batches][0] == list(range(8))
    assert torch.equal(torch.cat([xb for xb, _ in batches]), x)
    assert len(list(data.iterate_batches(x, y, 8, shuffle=False, drop_last=True))) == 3
    assert len(list(data.iterate_batches(x, y, 100, shuffle=True, drop_last=True))) == 0
    with pytest.raises(ValueError):
        list(data.iterate_batches(x, y, 0, shuffle=False))
    with pytest.raises(ValueError):
        list(data.iterate_batches(x, y[:3], 4, shuffle=False))
