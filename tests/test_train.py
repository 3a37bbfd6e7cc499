"""Tests of maskprune.train: config checks, the files a run writes, mask/dense modes and policies, resume,
the refusal of a non-empty --out, and DistributedDataParallel over two CPU processes (torchrun, gloo).

Runs are tiny (lenet300 on the first few hundred MNIST training images) so the file takes seconds."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from maskprune import data as datasets
from maskprune import train as trainer
from maskprune.runfiles import RunFileError
from maskprune.train import ConfigError, TrainConfig, load_config_file, train, validate
from train_helpers import Stop, train_until_first_checkpoint

TINY = dict(model="lenet300", dataset="mnist", epochs=2, batch_size=64, limit_train=512, device="cpu", threads=1)
METRIC_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "train_seconds",
               "kept_fraction"}
SUMMARY_KEYS = {"test_acc_last", "test_acc_best", "best_val_acc", "best_epoch", "kept_weights", "total_weights",
                "kept_fraction", "wall_time_s", "seconds_per_epoch", "device", "world_size", "torch", "maskprune",
                "mode", "model", "dataset", "density", "backend", "autocast"}


REAL_LOAD = datasets.load


@pytest.fixture(scope="module")
def mnist_subset() -> datasets.Splits:
    """MNIST cut to 2048 train / 1000 val / 1000 test images, loaded once for the file."""
    full = REAL_LOAD("mnist")
    cut = {k: getattr(full, k)[:n] for k, n in (("train_x", 2048), ("train_y", 2048), ("val_x", 1000),
                                                   ("val_y", 1000), ("test_x", 1000), ("test_y", 1000))}
    return dataclasses.replace(full, **cut)


@pytest.fixture(autouse=True)
def small_data(monkeypatch, mnist_subset):
    """The trainer sees the MNIST subset (in-process runs only; torchrun's processes load the real data)."""
    monkeypatch.setattr(datasets, "load", lambda name, root=None: mnist_subset)



def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


# -- config checks ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, flag", [
    ("model", "nope", "--model"), ("dataset", "imagenet", "--dataset"), ("mode", "sparse", "--mode"),
    ("density", 0.0, "--density"), ("density", 1.5, "--density"), ("density", float("nan"), "--density"),
    ("epochs", 0, "--epochs"), ("batch_size", 0, "--batch-size"), ("lr", -0.1, "--lr"),
    ("momentum", 1.0, "--momentum"), ("weight_decay", -1.0, "--weight-decay"), ("policy", "random", "--policy"),
    ("weight_init", "zeros", "--weight-init"), ("score_init", "zeros", "--score-init"),
    ("optimizer", "lbfgs", "--optimizer"), ("backend", "nope", "--backend"), ("device", "tpu", "--device"),
    ("widths", "100,100", "--widths"), ("label_smoothing", 1.0, "--label-smoothing"), ("threads", -1, "--threads"), ("limit_train", -1, "--limit-train"),
    ("warmup_epochs", 5, "--warmup-epochs"), ("nesterov", True, "--nesterov"), ("epochs", "3", "--epochs"),
    ("amp", 1, "--amp"),
])
def test_validate_names_the_flag(field, value, flag):
    with pytest.raises(ConfigError) as err:
        validate(tiny(**{field: value, **({"momentum": 0.0} if field == "nesterov" else {})}))
    assert str(err.value).startswith(flag + ":"), str(err.value)
    assert err.value.key == field


def test_validate_accepts_and_normalises():
    cfg = validate(tiny(density=1, widths=[300, 100], model="mlp"))
    assert cfg.density == 1.0 and isinstance(cfg.density, float) and cfg.widths == "300,100"


def test_cuda_device_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="^--device: .*no CUDA GPU"):
        validate(tiny(device="cuda"))


def test_model_that_cannot_be_built_names_model(tmp_path, monkeypatch):
    def too_small(name, **kwargs):
        raise ValueError("in_shape (1, 28, 28) is too small for it")
    monkeypatch.setattr(trainer.models, "create", too_small)
    with pytest.raises(ConfigError, match=r"^--model: lenet300 cannot be built for mnist \(1, 28, 28\)"):
        train(tiny(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_config_file_round_trip(tmp_path):
    cfg = validate(tiny(lr=0.2, nesterov=True, widths="", label_smoothing=0.1))
    (tmp_path / "c.toml").write_text(trainer.dump_config(cfg))
    assert TrainConfig(**load_config_file(tmp_path / "c.toml")) == cfg


def test_lr_schedule_warmup_then_cosine():
    assert trainer.lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert trainer.lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert trainer.lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert trainer.lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert trainer.lr_factor(0, 100, 0) == pytest.approx(1.0)


# -- runs -------------------------------------------------------------------------------------------------------

def test_mask_run_writes_every_file(tmp_path):
    run = tmp_path / "run"
    summary = train(tiny(), run, quiet=True)
    assert sorted(p.name for p in run.iterdir()) == sorted(trainer.RUN_FILES)
    assert TrainConfig(**load_config_file(run / "config.toml")) == validate(tiny())
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2] and all(set(r) == METRIC_KEYS for r in rows)
    assert rows[0]["lr"] == pytest.approx(0.1) and rows[1]["lr"] == pytest.approx(0.05)  # cosine, per step
    assert all(r["kept_fraction"] == pytest.approx(0.5, abs=1e-5) for r in rows)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert SUMMARY_KEYS <= set(summary)
    assert summary["total_weights"] == 784 * 300 + 300 * 100 + 100 * 10
    assert summary["kept_weights"] == pytest.approx(summary["total_weights"] / 2, abs=3)
    assert summary["backend"] in ("cpp", "torch") and summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert 0.3 < summary["test_acc_last"] <= 1 and 0.3 < summary["test_acc_best"] <= 1
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    assert last["epoch"] == 1 and last["config"] == dataclasses.asdict(validate(tiny()))
    assert {"model", "optimizer", "scheduler", "best_val_acc", "best_epoch", "wall_time"} <= set(last)
    assert any(k.endswith("scores") for k in last["model"])
    assert summary["autocast"] is None  # bf16 autocast is for CUDA only, even with amp = true
    assert best["epoch"] + 1 == summary["best_epoch"]


def test_mask_mode_learns_scores_only(tmp_path):
    """The frozen random weights are bit-identical before and after; only the scores moved."""
    cfg = validate(tiny(epochs=1))
    torch.manual_seed(cfg.seed)
    before = trainer.build_model(cfg, 10, (1, 28, 28)).state_dict()
    train(cfg, tmp_path / "run", quiet=True)
    after = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert set(before) == set(after)
    for key in before:
        if key.endswith("scores"):
            assert not torch.equal(before[key], after[key]), key
        else:
            assert torch.equal(before[key], after[key]), key


def test_dense_mode(tmp_path):
    cfg = validate(tiny(mode="dense", epochs=1))
    torch.manual_seed(cfg.seed)
    before = trainer.build_model(cfg, 10, (1, 28, 28)).state_dict()
    summary = train(cfg, tmp_path / "run", quiet=True)
    after = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert not any(k.endswith("scores") for k in after)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # weights and biases trained
    assert summary["mode"] == "dense" and summary["backend"] == "dense" and summary["density"] == 1.0
    assert summary["kept_weights"] == summary["total_weights"] and summary["kept_fraction"] == 1.0
    assert summary["test_acc_last"] > 0.5


def test_global_policy_keeps_density_overall(tmp_path):
    summary = train(tiny(policy="global", density=0.3, epochs=1), tmp_path / "run", quiet=True)
    assert summary["kept_weights"] == round(0.3 * summary["total_weights"])
    # one threshold over all layers: the layers keep different fractions
    from maskprune.nn import mask_stats
    cfg = validate(tiny(policy="global", density=0.3))
    model = trainer.build_model(cfg, 10, (1, 28, 28))
    model.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"])
    fractions = [row["fraction"] for row in mask_stats(model)["layers"]]
    assert {row["policy"] for row in mask_stats(model)["layers"]} == {"global"}
    assert max(fractions) - min(fractions) > 1e-3


def test_seed_repeats_on_cpu(tmp_path):
    a = train(tiny(epochs=1), tmp_path / "a", quiet=True)
    b = train(tiny(epochs=1), tmp_path / "b", quiet=True)
    assert without_times(metrics(tmp_path / "a")) == without_times(metrics(tmp_path / "b"))
    assert a["test_acc_last"] == b["test_acc_last"]
    train(tiny(epochs=1, seed=1), tmp_path / "c", quiet=True)
    assert metrics(tmp_path / "c")[0]["train_loss"] != metrics(tmp_path / "a")[0]["train_loss"]


def test_quiet_prints_nothing_and_plain_lines_otherwise(tmp_path, capsys):
    train(tiny(epochs=1), tmp_path / "q", quiet=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    train(tiny(epochs=2), tmp_path / "v")
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("mask lenet300 on mnist") and sum(l.startswith("epoch ") for l in lines) == 2
    assert "\r" not in captured.err  # stderr is not a terminal here: no progress bar


# -- resume -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["mask", "dense"])
def test_resume_after_epoch_k_equals_uninterrupted(tmp_path, monkeypatch, mode):
    cfg = dict(epochs=3, mode=mode, nesterov=True, warmup_epochs=1)
    whole = train(tiny(**cfg), tmp_path / "whole", quiet=True)

    train_until_first_checkpoint(tiny(**cfg), tmp_path / "cut", monkeypatch)  # dies right after epoch 1's last.pt
    assert len(metrics(tmp_path / "cut")) == 1
    resumed = train(tiny(**cfg), tmp_path / "cut", resume=str(tmp_path / "cut" / "last.pt"), quiet=True)

    for key in ("test_acc_last", "test_acc_best", "best_val_acc", "best_epoch", "kept_weights"):
        assert resumed[key] == whole[key], key
    assert without_times(metrics(tmp_path / "cut")) == without_times(metrics(tmp_path / "whole"))
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_stop_between_metrics_and_checkpoint(tmp_path, monkeypatch):
    """Epoch 2's metrics line was written, its checkpoint was not: the resumed run redoes epoch 2 once."""
    whole = train(tiny(epochs=2), tmp_path / "whole", quiet=True)
    real_save = trainer.save_atomic
    def stop_before_epoch_2_checkpoint(obj, path):
        if obj["epoch"] == 1:
            raise Stop
        real_save(obj, path)
    monkeypatch.setattr(trainer, "save_atomic", stop_before_epoch_2_checkpoint)
    with pytest.raises(Stop):
        train(tiny(epochs=2), tmp_path / "cut", quiet=True)
    monkeypatch.setattr(trainer, "save_atomic", real_save)
    assert len(metrics(tmp_path / "cut")) == 2
    resumed = train(tiny(epochs=2), tmp_path / "cut", resume=str(tmp_path / "cut" / "last.pt"), quiet=True)
    assert without_times(metrics(tmp_path / "cut")) == without_times(metrics(tmp_path / "whole"))
    assert resumed["test_acc_best"] == whole["test_acc_best"]


def test_resume_errors(tmp_path):
    run = tmp_path / "run"
    train(tiny(epochs=1), run, quiet=True)
    with pytest.raises(ConfigError, match="^--resume: checkpoint .* does not exist"):
        train(tiny(epochs=1), run, resume=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="^--resume: the checkpoint was made with density=0.5"):
        train(tiny(epochs=1, density=0.3), run, resume=str(run / "last.pt"))
    with pytest.raises(RunFileError, match="best.pt: is a best.pt \\(weights only\\): resume from the run's last.pt"):
        train(tiny(epochs=1), run, resume=str(run / "best.pt"))
    with pytest.raises(ConfigError, match="^--out: a resumed run continues in its own folder"):
        train(tiny(epochs=1), tmp_path / "elsewhere", resume=str(run / "last.pt"))
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunFileError, match="junk.pt: is not a readable checkpoint"):
        train(tiny(epochs=1), tmp_path, resume=str(tmp_path / "junk.pt"))


# -- the output folder ------------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


def test_non_empty_out_is_refused_and_left_untouched(tmp_path):
    run = tmp_path / "run"
    train(tiny(epochs=1), run, quiet=True)
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"^--out: .* is not empty; pass --resume .*last.pt .* --overwrite"):
        train(tiny(epochs=1), run)
    with pytest.raises(ConfigError, match="^--density"):  # a bad option with --overwrite: still nothing written
        train(tiny(epochs=1, density=2.0), run, overwrite=True)
    assert snapshot(run) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="^--out: .* not a directory"):
        train(tiny(epochs=1), tmp_path / "file")


def test_overwrite_replaces_the_run_files_only(tmp_path):
    run = tmp_path / "run"
    train(tiny(epochs=2), run, quiet=True)
    (run / "notes.txt").write_text("mine")
    train(tiny(epochs=1, seed=3), run, overwrite=True, quiet=True)
    assert (run / "notes.txt").read_text() == "mine"
    assert len(metrics(run)) == 1 and load_config_file(run / "config.toml")["seed"] == 3


def test_unfetchable_dataset_writes_nothing(tmp_path, monkeypatch):
    def refuse(name, root=None):
        raise datasets.DatasetUnavailable(f"{name}: no source worked (test)")
    monkeypatch.setattr(datasets, "load", REAL_LOAD)
    monkeypatch.setattr(datasets, "fetch", refuse)
    with pytest.raises(datasets.DatasetUnavailable):
        train(tiny(data_root=str(tmp_path / "empty-cache")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- distributed ------------------------------------------------------------------------------------------------

def _loopback_ok() -> str | None:
    """None when two local processes can rendezvous over TCP on 127.0.0.1, else why not."""
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available in this torch build"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
    except OSError as err:
        return f"cannot bind a loopback socket ({err})"
    return None


def test_ddp_two_cpu_processes_agree_with_one(tmp_path, monkeypatch):
    reason = _loopback_ok()
    if reason:
        print(f"skipping the DDP test: {reason}")
        pytest.skip(reason)
    flags = ["--model", "lenet300", "--dataset", "mnist", "--epochs", "2", "--batch-size", "64",
             "--limit-train", "1024", "--device", "cpu", "--threads", "1", "--quiet"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "maskprune", "train", *flags,
           "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2
    monkeypatch.setattr(datasets, "load", REAL_LOAD)  # the same full data the torchrun processes loaded
    single = train(tiny(epochs=2, batch_size=64, limit_train=1024), tmp_path / "one", quiet=True)
    # the same batches, gradients summed in another order: equal up to float rounding
    for a, b in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "one")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=3e-3)
    assert ddp["test_acc_last"] == pytest.approx(single["test_acc_last"], abs=3e-3)
    assert ddp["kept_weights"] == single["kept_weights"]
    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), key


# -- CUDA (skipped with "needs a CUDA GPU" elsewhere) ----------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("mode", ["mask", "dense"])
def test_cuda_run_uses_bf16_autocast_and_learns(tmp_path, mode):
    summary = train(tiny(device="cuda", mode=mode, epochs=2), tmp_path / "run", quiet=True)
    assert summary["device"] == torch.cuda.get_device_name() and summary["autocast"] == "bf16"
    rows = metrics(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert summary["test_acc_last"] > 0.6  # 2 epochs on 512 images: far above chance (0.1)
    if mode == "mask":
        assert summary["kept_fraction"] == pytest.approx(0.5, abs=1e-5)
        assert summary["backend"] in ("triton", "cpp", "torch")


@needs_cuda
def test_cuda_amp_off_matches_cpu_run_closely(tmp_path):
    """Without autocast a CUDA run computes what the CPU run does (float32; TF32 is off by default in torch)."""
    gpu = train(tiny(device="cuda", amp=False, epochs=1), tmp_path / "gpu", quiet=True)
    cpu = train(tiny(epochs=1), tmp_path / "cpu", quiet=True)
    assert gpu["autocast"] is None
    assert gpu["test_acc_last"] == pytest.approx(cpu["test_acc_last"], abs=0.02)
    assert gpu["kept_weights"] == pytest.approx(cpu["kept_weights"], abs=3)


@needs_cuda
def test_ddp_nccl_one_gpu_process_runs(tmp_path):
    """torchrun on CUDA uses nccl; one process per GPU (one GPU suffices to exercise the path)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "maskprune", "train", "--model", "lenet300",
           "--dataset", "mnist", "--epochs", "1", "--batch-size", "64", "--limit-train", "1024", "--device", "cuda",
           "--quiet", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["device"] == torch.cuda.get_device_name()
    assert summary["test_acc_last"] > 0.5
