"""Bounded fuzzing of every reader of maskprune.runfiles (and the dataset cache's): fixed-seed byte mutations of
valid files (truncation at every k-th offset, bit flips, byte insertions and deletions, mutations inside the pickle
of a torch zip with valid CRCs), wrong types in every field, huge sizes, deep nesting. Only the documented outcome
may come out: the reader's value, or RunFileError (ConfigError for --config); never another exception or a hang.

Python's `random` with a fixed seed (no extra dependency): every run tries the same inputs. Each test prints how many
inputs it tried and how long it took (`pytest -s` shows them)."""
from __future__ import annotations

import dataclasses
import io
import json
import random
import time
import zipfile
from pathlib import Path

import pytest
import torch

from maskprune import data as datasets
from maskprune.runfiles import (RunFileError, check_fits, load_model_state, load_training_state, read_checkpoint,
                                read_metrics, read_run_config, read_toml)
from maskprune.train import ConfigError, TrainConfig, build_model, dump_config, load_config_file, train, validate

SEED = 20261205
WRONG_VALUES = [None, True, -1, 0, 2**80, 1.5, float("nan"), float("inf"), "", "x" * 10_000, [], [1, "a"], {},
                {"a": {"b": 1}}, (1, 2), b"bytes", torch.zeros(3), torch.zeros(()), torch.zeros(2, dtype=torch.int64)]


def deep_list(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def byte_mutations(raw: bytes, rng: random.Random, n_flips: int, n_truncations: int) -> list[bytes]:
    """Truncations at evenly spaced offsets, single and multiple bit flips, inserted and deleted bytes."""
    out = []
    step = max(1, len(raw) // n_truncations)
    out += [raw[:k] for k in range(0, len(raw), step)]
    for _ in range(n_flips):
        b = bytearray(raw)
        for _ in range(rng.choice((1, 1, 2, 8))):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    for _ in range(n_flips // 4):
        i = rng.randrange(len(raw))
        out.append(raw[:i] + bytes([rng.randrange(256)]) * rng.choice((1, 7, 300)) + raw[i:])
        j = rng.randrange(len(raw))
        out.append(raw[:j] + raw[j + rng.choice((1, 4, 100)):])
    return out


def report(name: str, tried: int, seconds: float, findings: int = 0) -> None:
    print(f"\nfuzz {name}: {tried} inputs in {seconds:.1f} s, {findings} undocumented errors")


# -- checkpoints ------------------------------------------------------------------------------------------------

TINY = dict(model="mlp", widths="16", dataset="mnist", epochs=1, batch_size=32, limit_train=64, device="cpu",
            threads=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A one-epoch run of a 784-16-10 MLP (last.pt ~ 130 KB), trained on fake data shaped as MNIST."""
    g = torch.Generator().manual_seed(0)
    fake = datasets.Splits(**{f"{s}_{k}": (torch.rand(64, 1, 28, 28, generator=g) if k == "x"
                                            else torch.randint(0, 10, (64,), generator=g))
                              for s in ("train", "val", "test") for k in ("x", "y")},
                           num_classes=10, in_shape=(1, 28, 28), name="mnist")
    out = tmp_path_factory.mktemp("fuzz") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets, "load", lambda name, root=None: fake)
        train(TrainConfig(**TINY), out, quiet=True)
    return out


def read_and_restore(path: Path, cfg: TrainConfig) -> None:
    """What `train --resume` does with a last.pt before writing anything: read, check, load into live objects."""
    ckpt = read_checkpoint(path)
    check_fits(cfg, ckpt, path)
    model = build_model(cfg, 10, (1, 28, 28))
    load_model_state(model, ckpt, path)
    if "optimizer" in ckpt:
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        load_training_state(opt, sched, ckpt, path)


def rezip(raw: bytes, pickle_bytes: bytes) -> bytes:
    """RAW (a torch zip checkpoint) with its data.pkl replaced (CRCs recomputed, so the pickle itself is fuzzed)."""
    src = zipfile.ZipFile(io.BytesIO(raw))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = pickle_bytes if info.filename.endswith("/data.pkl") else src.read(info.filename)
            dst.writestr(info.filename, data)
    return buf.getvalue()


def structural_variants(ckpt: dict) -> list:
    """The checkpoint with every field (top level, config, optimizer, scheduler, one tensor) set to each wrong value,
    removed, or nested deep; plus wholly foreign objects."""
    out = [None, [], deep_list(5000), {"model": deep_list(5000)}, {str(i): i for i in range(10_000)}]
    for key in list(ckpt):
        for wrong in WRONG_VALUES + [deep_list(200)]:
            out.append({**ckpt, key: wrong})
        out.append({k: v for k, v in ckpt.items() if k != key})
    for key in list(ckpt["config"]):
        for wrong in WRONG_VALUES:
            out.append({**ckpt, "config": {**ckpt["config"], key: wrong}})
    for key in ("state", "param_groups"):
        for wrong in WRONG_VALUES:
            out.append({**ckpt, "optimizer": {**ckpt["optimizer"], key: wrong}})
    group = ckpt["optimizer"]["param_groups"][0]
    for key in group:
        for wrong in WRONG_VALUES:
            out.append({**ckpt, "optimizer": {**ckpt["optimizer"], "param_groups": [{**group, key: wrong}]}})
    for pid in ckpt["optimizer"]["state"]:
        for wrong in WRONG_VALUES:
            state = {**ckpt["optimizer"]["state"], pid: {"momentum_buffer": wrong}}
            out.append({**ckpt, "optimizer": {**ckpt["optimizer"], "state": state}})
    for key in ckpt["scheduler"]:
        for wrong in WRONG_VALUES:
            out.append({**ckpt, "scheduler": {**ckpt["scheduler"], key: wrong}})
    name = next(iter(ckpt["model"]))
    for wrong in WRONG_VALUES + [torch.zeros(10**6), torch.zeros(3, 3).to_sparse(), torch.zeros(2, dtype=torch.bool)]:
        out.append({**ckpt, "model": {**ckpt["model"], name: wrong}})
    return out


def attempt(fn, *args, allowed=(RunFileError,)) -> str | None:
    """None when FN(*ARGS) returned or raised an allowed error with a one-line message; else what went wrong."""
    try:
        fn(*args)
    except allowed as err:
        if "\n" in str(err):
            return f"{type(err).__name__} of several lines: {str(err)[:300]!r}"
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {str(err)[:300]}"
    return None


def test_fuzz_checkpoint_reader(tiny_run, tmp_path):
    rng = random.Random(SEED)
    cfg = validate(TrainConfig(**TINY))
    raw_last, raw_best = (tiny_run / "last.pt").read_bytes(), (tiny_run / "best.pt").read_bytes()
    pkl = zipfile.ZipFile(io.BytesIO(raw_last)).read(
        next(n for n in zipfile.ZipFile(io.BytesIO(raw_last)).namelist() if n.endswith("/data.pkl")))
    inputs: list[bytes] = []
    inputs += byte_mutations(raw_last, rng, n_flips=200, n_truncations=120)
    inputs += byte_mutations(raw_best, rng, n_flips=100, n_truncations=40)
    inputs += [rezip(raw_last, m) for m in byte_mutations(pkl, rng, n_flips=600, n_truncations=150)]
    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
    variants = structural_variants(ckpt)
    path = tmp_path / "last.pt"
    findings, t0 = [], time.perf_counter()
    for i, data in enumerate(inputs):
        path.write_bytes(data)
        problem = attempt(read_and_restore, path, cfg)
        if problem:
            findings.append(f"bytes #{i}: {problem}")
    for i, obj in enumerate(variants):
        buf = io.BytesIO()
        try:
            torch.save(obj, buf)
        except (RecursionError, RuntimeError):  # too deep for torch's own pickler: not a file anyone can write
            continue
        path.write_bytes(buf.getvalue())
        problem = attempt(read_and_restore, path, cfg)
        if problem:
            findings.append(f"structure #{i}: {problem}")
    seconds = time.perf_counter() - t0
    report("checkpoint (last.pt/best.pt)", len(inputs) + len(variants), seconds, len(findings))
    assert findings == [], findings[:5]
    assert seconds < 60


# -- config.toml ------------------------------------------------------------------------------------------------

def toml_value(value) -> str:
    return {True: "true", False: "false"}.get(value, json.dumps(value)) if isinstance(value, bool) or \
        not isinstance(value, (dict, list)) else ("{x = 1}" if isinstance(value, dict) else "[1, \"a\"]")


def test_fuzz_config_reader(tmp_path):
    rng = random.Random(SEED)
    run = tmp_path / "run"
    run.mkdir()
    raw = dump_config(validate(TrainConfig(**TINY))).encode()
    inputs = byte_mutations(raw, rng, n_flips=600, n_truncations=150)
    lines = raw.decode().splitlines()
    wrong_toml = ["{x = 1}", "[1, \"a\"]", "[[[[1]]]]", "1979-05-27T07:32:00Z", "07:32:00", "1979-05-27", '"x"',
                  "-1", "0", "1e400", "-inf", "nan", "99999999999999999999", "true", "0x10", '"""a\nb"""', "'c:\\x'",
                  '"\\u0000"', '"' + "y" * 100_000 + '"', "[" + ",".join(["1"] * 10_000) + "]"]
    for i in range(len(lines)):
        key = lines[i].split(" = ")[0]
        for wrong in wrong_toml:
            inputs.append("\n".join(lines[:i] + [f"{key} = {wrong}"] + lines[i + 1:]).encode())
    inputs += [b"a = " + b"[" * d + b"]" * d for d in (10, 100, 1000, 10_000, 200_000)]
    inputs += [b"a = " + b"{b = " * d + b"1" + b"}" * d for d in (10, 1000, 50_000)]
    inputs += [b"a." * 10_000 + b"b = 1", b"\xef\xbb\xbf" + raw, raw.replace(b"\n", b"\r\n"), raw * 2,
               raw + b"\x00", b"\xff" * 100, b"# " + b"x" * (2 << 20), b"[" * (2 << 20)]
    findings, t0 = [], time.perf_counter()
    path = tmp_path / "c.toml"
    for i, data in enumerate(inputs):
        path.write_bytes(data)
        (run / "config.toml").write_bytes(data)
        for problem in (attempt(read_toml, path), attempt(read_run_config, run),
                        attempt(load_config_file, path, allowed=(ConfigError,))):
            if problem:
                findings.append(f"#{i} {data[:80]!r}: {problem}")
    seconds = time.perf_counter() - t0
    report("config.toml", len(inputs), seconds, len(findings))
    assert findings == [], findings[:5]
    assert seconds < 60


# -- metrics.jsonl ----------------------------------------------------------------------------------------------

def test_fuzz_metrics_reader(tmp_path):
    rng = random.Random(SEED)
    record = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.6, "val_acc": 0.79, "lr": 0.1,
              "seconds": 1.0, "train_seconds": 0.9, "kept_fraction": 0.5}
    raw = "".join(json.dumps({**record, "epoch": e}) + "\n" for e in range(1, 11)).encode()
    inputs = byte_mutations(raw, rng, n_flips=3000, n_truncations=400)
    for key in record:
        for wrong in WRONG_VALUES[:-3]:
            inputs.append((json.dumps({**record, key: wrong}, default=str) + "\n").encode() + raw)
    inputs += [b"[" * d + b"]" * d + b"\n" + raw for d in (10, 1000, 100_000)]
    inputs += [b'{"epoch": 1e999999}\n', b'{"epoch": ' + b"9" * 100_000 + b"}\n", b"\xff\xfe" * 1000, b"\n" * 100_000,
               b'{"epoch": 1, "epoch": "x"}\n', b"NaN\n", b'{"epoch": 2}' * 1000]
    findings, t0 = [], time.perf_counter()
    path = tmp_path / "metrics.jsonl"
    for i, data in enumerate(inputs):
        path.write_bytes(data)
        try:
            metrics = read_metrics(path)
            assert len(metrics.lines) == len(metrics.records)
            assert all(isinstance(r, dict) and type(r["epoch"]) is int and r["epoch"] >= 1 for r in metrics.records)
            assert all(json.loads(line) == r or r != r for line, r in zip(metrics.lines, metrics.records))
        except Exception as err:  # noqa: BLE001  (read_metrics raises nothing below its 64 MiB cap)
            findings.append(f"#{i} {data[:80]!r}: {type(err).__name__}: {err}")
    seconds = time.perf_counter() - t0
    report("metrics.jsonl", len(inputs), seconds, len(findings))
    assert findings == [], findings[:5]
    assert seconds < 60


# -- the dataset cache ------------------------------------------------------------------------------------------

def test_fuzz_dataset_cache_reader(tmp_path, monkeypatch):
    """A mutated tensors-<key>.pt is either accepted (and then holds sound tensors) or rebuilt; never an error."""
    rng = random.Random(SEED)
    info = datasets.DATASETS["mnist"]
    g = torch.Generator().manual_seed(0)
    good = {"scale": 255.0, **{f"{s}_x": torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=g)
                               for s in ("train", "val", "test")},
            **{f"{s}_y": torch.randint(0, 10, (3,), generator=g) for s in ("train", "val", "test")}}
    monkeypatch.setitem(datasets._DECODERS, "mnist", lambda folder, i: good)
    datasets._decoded(info, tmp_path, ["h"])
    cache = next(tmp_path.glob("tensors-*.pt"))
    raw = cache.read_bytes()
    pkl_name = next(n for n in zipfile.ZipFile(io.BytesIO(raw)).namelist() if n.endswith("/data.pkl"))
    pkl = zipfile.ZipFile(io.BytesIO(raw)).read(pkl_name)
    inputs = byte_mutations(raw, rng, n_flips=600, n_truncations=150)
    inputs += [rezip(raw, m) for m in byte_mutations(pkl, rng, n_flips=600, n_truncations=100)]
    for key in good:
        for wrong in WRONG_VALUES:
            buf = io.BytesIO()
            torch.save({**good, key: wrong}, buf)
            inputs.append(buf.getvalue())
    findings, t0 = [], time.perf_counter()
    for i, data in enumerate(inputs):
        cache.write_bytes(data)
        try:
            got = datasets._decoded(info, tmp_path, ["h"])
            assert datasets._cache_ok(got, info)
        except Exception as err:  # noqa: BLE001
            findings.append(f"#{i}: {type(err).__name__}: {str(err)[:300]}")
    seconds = time.perf_counter() - t0
    report("dataset cache (tensors-<key>.pt)", len(inputs), seconds, len(findings))
    assert findings == [], findings[:5]
    assert seconds < 60
