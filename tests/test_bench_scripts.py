"""The benchmark scripts stay runnable: tiny CPU runs of bench_cpu and bench_epoch, and bench_kernels' refusal
without a GPU.

Timings are never asserted here (they belong to the benchmarks); only that the scripts run and write
what they promise.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cpu_tiny_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_cpu.py"), "--widths", "16,32,4",
                           "--batch", "8", "--rounds", "2", "--steps", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    names = [row["variant"] for row in result["rows"]]
    assert names[0] == "dense" and len(names) == 4
    assert all(row["median_ms"] > 0 for row in result["rows"])
    assert "x dense" in proc.stdout
    passes = result["extra_passes_ms"]
    assert len(passes) == 7 and all(ms >= 0 for ms in passes.values())
    assert any(name.startswith("threshold, hint") for name in passes)
    assert any(name.startswith("threshold + mask in one pass") for name in passes)
    assert any(name.startswith("threshold + mask + sign bytes") for name in passes)
    assert any(name.startswith("fused dS pass from the sign bytes") for name in passes)
    seed = result["seed_mode"]
    assert [r["variant"] for r in seed["rows"]] == ["dense", "mask (stored W)", "mask (seed mode)"]
    assert all(r["median_ms"] > 0 and r["peak_rss_above_start_mb"] >= 0 for r in seed["rows"])
    stored, seeded = seed["rows"][1], seed["rows"][2]
    assert seeded["state_dict_mb"] * 2 == stored["state_dict_mb"]  # no W in the seed-mode state
    assert "mask (seed mode)" in proc.stdout


def test_bench_cpu_only_seed_writes_its_own_json(tmp_path):
    out = tmp_path / "seed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_cpu.py"), "--only-seed", "--widths", "16,32,4",
                           "--batch", "8", "--rounds", "2", "--steps", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result) == {"config", "seed_mode", "machine"} and len(result["seed_mode"]["rows"]) == 3


def test_bench_epoch_tiny_run_writes_json(tmp_path):
    out = tmp_path / "epoch.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_epoch.py"), "--epochs", "1", "--rounds", "1",
                           "--limit-train", "512", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["epoch_train_seconds"]) == {"dense", "mask"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["epoch_train_seconds"].values())
    assert result["mask_over_dense"] == result["median_s"]["mask"] / result["median_s"]["dense"]
    assert "mask / dense" in proc.stdout


def test_bench_epoch_rejects_bad_options(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_epoch.py"), "--rounds", "0",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rounds" in proc.stderr


def test_bench_cpu_rejects_bad_threads(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_cpu.py"), "--threads", "-1",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--threads" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_bench_kernels_exits_2_without_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "GPU" in proc.stderr or "CUDA" in proc.stderr
