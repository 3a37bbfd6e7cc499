"""`make gpu-check`'s script on a machine without a GPU: the dry run writes every result file; bad input exits 2.

The GPU steps themselves (build for the local arch, tests on CUDA, benchmark) run only on a GPU machine;
here the dry run checks everything around them: the test selection collects, the training runs and their
summaries, the folder's files and their count and sizes.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run_script(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_dry_run_writes_every_file(tmp_path):
    out = tmp_path / "gpu"
    proc = run_script("--out", str(out), "--epochs", "1", env_extra={"GPU_CHECK_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    expected = {"env.json", "build.log", "tests.xml", "tests.log", "train.json", "bench.json", "summary.json"}
    assert expected <= set(files) and len(files) <= 8, files  # bench.png only where the benchmark ran
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert list(summary["steps"]) == ["env", "build", "tests", "train", "bench"]
    assert {s["status"] for s in summary["steps"].values()} <= {"ok", "skipped"}, summary
    # the GPU test selection collects: the CUDA file, the kernel tests and the CUDA cases of test_ops.py
    log = (out / "tests.log").read_text()
    assert "test_ops_cuda.py" in log and "tests/kernels" in log
    assert "collected" in log or "tests collected" in log, log[-2000:]

    train = json.loads((out / "train.json").read_text())
    assert set(train) == {"mask-torch", "mask-cpp", "dense"}
    for name, entry in train.items():
        assert entry["rc"] == 0, entry.get("output_tail")
        assert entry["summary"]["epochs"] == 1 and entry["summary"]["device"] == "cpu"
        assert 0.1 < entry["summary"]["test_acc_last"] <= 1.0  # 512 examples, one epoch: above chance
    assert train["mask-cpp"]["summary"]["backend"] == "cpp" and train["dense"]["summary"]["mode"] == "dense"
    assert "epoch_time_vs_dense" in train["mask-torch"]
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "nvidia_smi" in env
    assert not (out / ".runs").exists()  # the scratch run folders are removed


@pytest.mark.parametrize("args,message", [
    (["--budget-s", "0", "--out", "x"], "--budget-s must be > 0"),
    (["--epochs", "0", "--out", "x"], "--epochs must be >= 1"),
    ([], "--out is required"),
])
def test_bad_arguments_exit_2(args, message):
    proc = run_script(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_without_gpu_the_real_run_says_how_to_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the real run would start")
    proc = run_script("--out", str(tmp_path / "gpu"), env_extra={"GPU_CHECK_DRY_RUN": "0"})
    assert proc.returncode == 2 and "GPU_CHECK_DRY_RUN=1" in proc.stderr, proc.stderr
