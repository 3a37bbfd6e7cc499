"""The GPU kernels compiled ahead of time, without a GPU (scripts/check_ptxas.py): every Triton kernel with
every autotune config for sm_80 and sm_90, and csrc/cuda/*.cu through nvcc -Xptxas -v. Fails on a
serialised-wgmma warning (C7515) or register spills in a GEMM kernel, spills in a CUDA kernel, or shared
memory over the arch's limit for a config the autotune pruning keeps.

The full compile takes a few minutes on two cores; MASKPRUNE_SKIP_COMPILE_CHECK=1 skips it (the parser
test always runs).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_ptxas.py"
skip_full = pytest.mark.skipif(os.environ.get("MASKPRUNE_SKIP_COMPILE_CHECK") == "1",
                               reason="MASKPRUNE_SKIP_COMPILE_CHECK=1")


def _script():
    spec = importlib.util.spec_from_file_location("check_ptxas", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_matmul_kernel' for 'sm_90a'
ptxas info    : Function properties for _matmul_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 154 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]
ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to the \
presence of Extern calls in the function '_masked_linear_fwd_kernel'.
ptxas info    : Compiling entry function '_other' for 'sm_90a'
ptxas info    : Function properties for _other
    8 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 400 bytes cmem[0]
"""


def test_parser_reads_registers_spills_smem_and_c7515():
    check = _script()
    parsed = check.parse_ptxas_log(PTXAS_LOG)
    assert parsed["_matmul_kernel"]["registers"] == 154 and parsed["_matmul_kernel"]["smem"] == 16
    assert parsed["_matmul_kernel"]["arch"] == "sm_90a"
    assert check.serialised_wgmma(parsed["_matmul_kernel"]["warnings"])
    assert parsed["_other"]["registers"] == 255
    assert (parsed["_other"]["spill_stores"], parsed["_other"]["spill_loads"]) == (24, 16)
    assert not check.serialised_wgmma(parsed["_other"]["warnings"])


def test_failure_rules():
    check = _script()
    base = dict(kernel="k", case="bf16", config="c", arch="sm_90", role="gemm", registers=100, spills=0,
                smem=1000, estimate=2000, kept=True, c7515=False, warnings=[])
    assert check.triton_failures([base]) == []
    assert "C7515" in check.triton_failures([{**base, "c7515": True}])[0]
    assert "spills" in check.triton_failures([{**base, "spills": 8}])[0]
    assert "shared memory" in check.triton_failures([{**base, "smem": 300000, "estimate": 400000}])[0]
    assert check.triton_failures([{**base, "smem": 300000, "estimate": 400000, "kept": False}]) == []
    assert "estimate" in check.triton_failures([{**base, "estimate": 500}])[0]
    assert check.triton_failures([{**base, "role": "other", "spills": 8, "c7515": True}]) == []
    assert "spills" in check.cuda_failures([{"kernel": "k", "arch": "sm_80", "registers": 1, "spills": 4,
                                              "smem": 0}])[0]


def _run(args: list, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real autotune configs
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=3000)
    print(run.stdout[-20000:])
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    return json.loads(out.read_text())


@skip_full
def test_every_triton_config_compiles_clean_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton")
    result = _run(["--only", "triton", "--jobs", str(min(4, os.cpu_count() or 1))], tmp_path)
    rows = result["triton"]
    assert result["failures"] == []
    kernels = {r["kernel"] for r in rows}
    assert {"matmul (forward)", "matmul (dX)", "grad_scores (dS)", "grad_scores (dS) split-M", "apply_mask (prepass)",
            "radix histogram", "radix select"} <= kernels
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    # The redesign's point: no serialised wgmma anywhere in the GEMMs, and the large tiles are kept on H100.
    assert not any(r.get("c7515") for r in rows)
    assert any(r["kernel"].startswith("matmul") and r["config"].startswith("128x256") and r["arch"] == "sm_90"
               and r["kept"] for r in rows)


@skip_full
@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="needs nvcc")
def test_cuda_kernels_have_no_spills(tmp_path):
    result = _run(["--only", "cuda", "--jobs", "2"], tmp_path)
    rows = result["cuda"]
    assert result["failures"] == []
    assert any("radix_histogram_kernel" in r["kernel"] for r in rows)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
