"""Compile every GPU kernel ahead of time, without a GPU, and check what ptxas says about it.

Triton: every kernel of maskprune.kernels with every autotune config, for sm_80 (A100) and sm_90 (H100),
through triton.compile with a CUDA GPUTarget (Triton ships its own ptxas). CUDA: csrc/cuda/*.cu through
`nvcc -cubin -Xptxas -v` for the same archs. For each (kernel, config, arch, dtypes) it records registers
per thread, spill bytes, shared memory, and ptxas warnings, and fails (exit code 1) on:
  - a wgmma serialisation warning (ptxas C7515) in a GEMM kernel on sm_90;
  - register spills in a GEMM kernel (Triton) or in any CUDA kernel;
  - shared memory over the arch's per-block limit for a config the autotune pruning keeps on that arch,
    or a shared-memory estimate of the pruning below what the compiled kernel uses.
It prints a markdown table (README's compile table) and can write JSON.

    python3 scripts/check_ptxas.py                  # Triton and CUDA, sm_80 and sm_90
    python3 scripts/check_ptxas.py --only triton --jobs 2 --json /tmp/ptxas.json
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
# Shared memory one block may use (opt-in maximum) on the archs checked; kernels/_utils.py has the table too.
SMEM_LIMIT = {80: 166912, 90: 232448}
STATIC_SMEM_LIMIT = 48 * 1024  # statically declared __shared__ arrays (CUDA)

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")
_FUNC = re.compile(r"Function properties for (\S+)")
_COMPILING = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")


def parse_ptxas_log(log: str) -> dict:
    """{function: {"registers", "spill_stores", "spill_loads", "smem", "arch", "warnings"}} from `ptxas -v` output."""
    out: dict = {}
    current = None
    warnings: list = []
    for line in log.splitlines():
        m = _COMPILING.search(line)
        if m:
            current = m.group(1)
            out.setdefault(current, {"registers": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0,
                                     "arch": m.group(2), "warnings": []})
            continue
        m = _FUNC.search(line)
        if m:
            current = m.group(1)
            out.setdefault(current, {"registers": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0,
                                     "arch": "", "warnings": []})
            continue
        if "warning" in line.lower():
            warnings.append(line.strip())
            if current is not None:
                out[current]["warnings"].append(line.strip())
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            out[current]["spill_stores"], out[current]["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = _REGS.search(line)
        if m:
            out[current]["registers"] = int(m.group(1))
            m2 = _SMEM.search(line)
            if m2:
                out[current]["smem"] = int(m2.group(1))
    if not out and warnings:
        out["?"] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0, "arch": "", "warnings": warnings}
    return out


def serialised_wgmma(warnings: list) -> bool:
    """ptxas's C7515: wgmma.mma_async instructions serialised (a Hopper GEMM then runs at a fraction of speed)."""
    return any("C7515" in w or ("wgmma" in w and "serializ" in w) for w in warnings)


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------

def _kernels_module():
    """maskprune.kernels with the real autotune configs (imported with TRITON_INTERPRET unset)."""
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    try:
        import maskprune.kernels as kernels  # noqa: F401
        from maskprune.kernels import masked_matmul, elementwise, threshold  # noqa: F401
        pkg = "maskprune.kernels"
    except ImportError:
        import kernels  # noqa: F401
        pkg = "kernels"
    import importlib
    return {name: importlib.import_module(f"{pkg}.{name}") for name in ("masked_matmul", "elementwise", "threshold",
                                                                         "_utils")}


# Triton specialises a launch on its integer arguments: a value of 1 becomes a constant and one divisible by
# 16 (and a 16-byte aligned pointer) carries that hint. The cases compile what a contiguous training layer
# launches (feature counts multiples of 16): the unit strides as constants, every other argument divisible
# by 16 except those in `nodiv` (not specialised, or small). Without this the compiled code keeps a 64-bit
# address per element and spills, which the real launches never do.
_FORWARD_ONES = dict(stride_ak=1, stride_bk=1, stride_cn=1, stride_bias=1)  # Y = X W_eff^T
_DX_ONES = dict(stride_ak=1, stride_bn=1, stride_cn=1, stride_bias=1)  # dX = dY W_eff
_DS_ONES = dict(stride_gn=1, stride_xk=1, stride_wk=1, stride_sk=1, stride_dsk=1)


def triton_cases() -> list:
    """(kernel, dtypes, module, kernel attr, pointer dtypes, constexprs, configs, role, unit args, nodiv args).

    role "gemm": checked for C7515, spills and shared memory; "fp32" (IEEE fp32 on FMA units, the
    allow_tf32=False default) and "other": shared memory only.
    """
    import triton.language as tl
    mods = _kernels_module()
    mm, ew, th = mods["masked_matmul"], mods["elementwise"], mods["threshold"]
    cases = []
    gemm_dtypes = {"bf16": ("*bf16", "ieee", "gemm"), "fp32-tf32": ("*fp32", "tf32", "gemm"),
                   "fp32": ("*fp32", "ieee", "fp32")}
    for pass_name, ones in (("forward", _FORWARD_ONES), ("dX", _DX_ONES)):
        for name, (ptr, precision, role) in gemm_dtypes.items():
            cases.append((f"matmul ({pass_name})", name, mm, "_matmul_kernel",
                          dict(a_ptr=ptr, b_ptr=ptr, bias_ptr=ptr, c_ptr=ptr),
                          dict(HAS_BIAS=pass_name == "forward", INPUT_PRECISION=precision, UPCAST=False,
                               ACC_DTYPE=tl.float32),
                          mm.gemm_configs(interpret=False), role, ones, {"M_BUCKET"}))
    key_args = dict(seed="i64", layer="i32", step="fp32")  # seed mode's key (unused with SEED_DIST=-1)
    for name, (act, weight, precision, seed_dist) in {
            "bf16 x, bf16 W": ("*bf16", "*bf16", "ieee", -1), "bf16 x, fp32 W": ("*bf16", "*fp32", "ieee", -1),
            "fp32-tf32": ("*fp32", "*fp32", "tf32", -1),
            "bf16 x, seed W (signed_constant)": ("*bf16", "*fp32", "ieee", 0),
            "fp32-tf32 x, seed W (signed_constant)": ("*fp32", "*fp32", "tf32", 0),
            "bf16 x, seed W (kaiming_uniform)": ("*bf16", "*fp32", "ieee", 1)}.items():
        configs = (mm.grad_scores_configs if seed_dist < 0 else mm.seed_grad_scores_configs)(interpret=False)
        for partial in (False, True):
            if partial and seed_dist >= 0:
                continue  # the split path's GEMM never reaches the epilogue: the stored-W rows cover it
            cases.append(("grad_scores (dS)" + (" split-M" if partial else ""), name, mm, "_grad_scores_kernel",
                          dict(g_ptr=act, x_ptr=act, w_ptr=weight, s_ptr="*fp32", ds_ptr="*fp32", part_ptr="*fp32",
                               **key_args),
                          dict(ABS_SCORES=True, PARTIAL=partial, INPUT_PRECISION=precision, UPCAST=False,
                               ACC_DTYPE=tl.float32, SEED_DIST=seed_dist),
                          configs, "gemm", _DS_ONES, {"M_BUCKET", "SPLIT_M", "seed", "layer", "step"}))
    for name, seed_dist in (("fp32", -1), ("fp32, seed W (signed_constant)", 0),
                            ("fp32, seed W (kaiming_normal)", 2)):
        cases.append(("grad_scores reduce", name, mm, "_grad_scores_reduce_kernel",
                      dict(part_ptr="*fp32", w_ptr="*bf16", s_ptr="*fp32", ds_ptr="*fp32", **key_args),
                      dict(ABS_SCORES=True, ACC_DTYPE=tl.float32, SEED_DIST=seed_dist, BLOCK=1024),
                      [{"num_warps": 4}], "other", dict(stride_wk=1, stride_sk=1, stride_dsk=1),
                      {"SPLIT_M", "seed", "layer", "step"}))
    cases.append(("apply_mask (prepass)", "fp32 W -> bf16", ew, "_apply_mask_kernel",
                  dict(w_ptr="*fp32", s_ptr="*fp32", t_ptr="*fp32", out_ptr="*bf16"),
                  dict(ABS_SCORES=True, BLOCK=ew.BLOCK), [{"num_warps": 4}], "other", {}, set()))
    cases.append(("score_grad", "bf16", ew, "_score_grad_kernel",
                  dict(g_ptr="*bf16", w_ptr="*bf16", s_ptr="*fp32", ds_ptr="*fp32"),
                  dict(ABS_SCORES=True, COMPUTE_DTYPE=tl.float32, BLOCK=ew.BLOCK), [{"num_warps": 4}], "other",
                  {}, set()))
    for first in (True, False):
        cases.append(("radix histogram" + (" (first)" if first else ""), "fp32", th, "_radix_histogram_kernel",
                      dict(s_ptr="*fp32", state_ptr="*i64", hist_ptr="*i32"),
                      dict(ABS_SCORES=True, KEY_BITS=32, FIRST=first, COUNT_NONFINITE=first, SHIFT=21 if first else 10,
                           PREFIX_SHIFT=32 if first else 21, NUM_BINS=th.NUM_BINS, BLOCK=4096),
                      [{"num_warps": 8}], "other", dict(stride=1), set()))
    cases.append(("radix select", "fp32", th, "_radix_select_kernel",
                  dict(hist_ptr="*i32", state_ptr="*i64", t_ptr="*fp32"),
                  dict(ABS_SCORES=True, KEY_BITS=32, FIRST=False, LAST=True, NAN_IF_NONFINITE=True, WIDTH=10,
                       NUM_BINS=th.NUM_BINS), [{"num_warps": 4}], "other", {}, {"n_keep"}))
    rng_kernel = importlib.import_module("maskprune.triton_rng")  # the counter-based weight/mask generator
    for dist, init in enumerate(rng_kernel.DISTRIBUTIONS):
        cases.append((f"counter weights ({init})", "fp32", rng_kernel, "_counter_values_kernel",
                      dict(out_ptr="*fp32", n="i64", offset="i64", seed="i64", step="fp32"),
                      dict(DIST=dist, BLOCK=2048), [{"num_warps": 8}], "other", {},
                      {"n", "offset", "seed", "layer", "stream", "step"}))
    pol = importlib.import_module("maskprune.kernels.policy")  # the mask policies' modes
    for code, mode in enumerate(pol.MODES):
        cases.append((f"policy mask ({mode})", "fp32 W -> bf16", pol, "_policy_mask_kernel",
                      dict(w_ptr="*fp32", s_ptr="*fp32", t_ptr="*fp32", u_ptr="*fp32", q_ptr="*bf16",
                           part_ptr="*fp32"),
                      dict(MODE=code, COMPUTE_DTYPE=tl.float32, BLOCK=pol.BLOCK), [{"num_warps": 4}], "other", {},
                      set()))
        cases.append((f"policy score grad ({mode})", "bf16 G, fp32 W", pol, "_policy_score_grad_kernel",
                      dict(g_ptr="*bf16", w_ptr="*fp32", s_ptr="*fp32", ds_ptr="*fp32"),
                      dict(MODE=code, COMPUTE_DTYPE=tl.float32, BLOCK=pol.BLOCK), [{"num_warps": 4}], "other", {},
                      set()))
    seed = importlib.import_module("maskprune.kernels.seed_mask")  # seed mode: W regenerated inside the passes
    for dist, init in enumerate(seed.DISTRIBUTIONS):
        cases.append((f"seed mask ({init})", "fp32 -> bf16", seed, "_seed_mask_kernel",
                      dict(s_ptr="*fp32", t_ptr="*fp32", out_ptr="*bf16", n="i64", seed="i64", step="fp32"),
                      dict(DIST=dist, ABS_SCORES=True, BLOCK=1024), [{"num_warps": 4}], "other", {},
                      {"n", "seed", "layer", "step"}))
        cases.append((f"seed score grad ({init})", "fp32", seed, "_seed_score_grad_kernel",
                      dict(g_ptr="*fp32", s_ptr="*fp32", n="i64", seed="i64", step="fp32"),
                      dict(DIST=dist, ABS_SCORES=True, BLOCK=1024), [{"num_warps": 4}], "other", {},
                      {"n", "seed", "layer", "step"}))
    return cases


def _config_label(config) -> str:
    if isinstance(config, dict):
        return f"w{config['num_warps']}"
    kw = config.kwargs
    label = f"{kw['BLOCK_R']}x{kw['BLOCK_C']}x{kw['BLOCK_K']} s{config.num_stages} w{config.num_warps}"
    return label + (f" sub{kw['EPI_SUB']}" if "EPI_SUB" in kw else "")


def _compile_one(job: tuple) -> dict:
    """Compiles one (case, config, arch) and returns its row (runs in a worker process)."""
    case_index, config_index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel, case, module, attr, pointers, constexprs, configs, role, ones, nodiv = triton_cases()[case_index]
    mods = _kernels_module()
    config = configs[config_index]
    fn = getattr(module, attr)
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn  # the JITFunction under @autotune
    if isinstance(config, dict):
        consts, options = {**constexprs, **ones}, dict(config)
    else:
        consts = {**constexprs, **ones, **config.kwargs}
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    signature = {name: ("constexpr" if name in consts else pointers.get(name, "i32")) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in consts and name not in nodiv}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    log = io.StringIO()
    row = {"kernel": kernel, "case": case, "config": _config_label(config), "arch": f"sm_{arch}", "role": role}
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001  (a failure to compile is a result to report)
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return row
    info = next(iter(parse_ptxas_log(log.getvalue()).values()), {})
    row.update(registers=info.get("registers", 0), spills=info.get("spill_stores", 0) + info.get("spill_loads", 0),
               smem=compiled.metadata.shared, warnings=info.get("warnings", []))
    row["c7515"] = serialised_wgmma(row["warnings"])
    if isinstance(config, dict):
        row.update(kept=True, estimate=None)
    else:
        left, right = (("a_ptr", "b_ptr") if attr == "_matmul_kernel" else ("g_ptr", "x_ptr"))
        size = {"*bf16": 2, "*fp16": 2, "*fp32": 4}
        lb, rb = size[pointers[left]], size[pointers[right]]
        row["estimate"] = mods["masked_matmul"].shared_memory_estimate(config, lb, rb)
        kept = mods["masked_matmul"].fitting_configs(configs, lb, rb, SMEM_LIMIT[arch])
        row["kept"] = any(c is config for c in kept)
    return row


def triton_rows(archs, jobs: int, match: str | None = None, dtypes: str | None = None) -> list:
    cases = triton_cases()
    work = [(ci, k, arch) for ci, case in enumerate(cases)
            if (match is None or match in case[0]) and (dtypes is None or dtypes == case[1])
            for k in range(len(case[6])) for arch in archs]
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a cache hit would skip ptxas and its log
        if jobs <= 1:
            return [_compile_one(w) for w in work]
        with ProcessPoolExecutor(jobs) as pool:
            return list(pool.map(_compile_one, work))


def triton_failures(rows: list) -> list:
    failures = []
    for r in rows:
        where = f"{r['kernel']} [{r['case']}] {r['config']} {r['arch']}"
        if "error" in r:
            if r.get("kept", True):
                failures.append(f"{where}: does not compile: {r['error']}")
            continue
        limit = SMEM_LIMIT[int(r["arch"][3:])]
        if r["kept"] and r["smem"] > limit:
            failures.append(f"{where}: kept by the pruning but needs {r['smem']} B of shared memory > {limit}")
        if r.get("estimate") is not None and r["smem"] > r["estimate"]:
            failures.append(f"{where}: pruning estimate {r['estimate']} B < compiled {r['smem']} B")
        if r["role"] in ("gemm", "fp32") and r["kept"] and r["c7515"]:
            failures.append(f"{where}: wgmma serialised (C7515)")
        if r["role"] == "gemm" and r["kept"] and r["spills"]:
            failures.append(f"{where}: {r['spills']} bytes of register spills")
    return failures


# --------------------------------------------------------------------------------------------
# CUDA (csrc/cuda/*.cu)
# --------------------------------------------------------------------------------------------

def _cuda_home() -> str | None:
    """The toolkit folder, as setup.py finds it: $CUDA_HOME, /usr/local/cuda, or the one above nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    return next((h for h in candidates if h and Path(h, "bin", "nvcc").exists()
                 and Path(h, "include", "cuda_runtime.h").exists()), None)


def _nvcc_command(source: Path, arch: int, out: Path) -> list:
    """nvcc with the extension build's flags and include folders, device code only (-cubin), ptxas verbose."""
    import glob
    import site
    import sysconfig

    import torch.utils.cpp_extension as ext
    home = _cuda_home()
    if home is None:
        raise RuntimeError("nvcc / the CUDA toolkit was not found")
    wheels = sorted({inc for root in site.getsitepackages() + sys.path
                     for inc in glob.glob(os.path.join(root, "nvidia", "*", "include"))})
    includes = wheels + ext.include_paths(device_type="cuda") + [str(Path(home, "include")),
                                                                 sysconfig.get_paths()["include"]]
    return [str(Path(home, "bin", "nvcc")), "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-O3", "--expt-relaxed-constexpr", "-std=c++20", "-Xptxas=-v",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            *[f"-I{i}" for i in includes], str(source), "-o", str(out)]


def _demangle(names: list) -> dict:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, result.stdout.splitlines()))


def _short(demangled: str) -> str:
    """`void maskprune::(anonymous namespace)::radix_histogram_kernel<float, 4>(...)` -> radix_histogram_kernel<float, 4>."""
    head = demangled.replace("(anonymous namespace)::", "").split("(")[0].replace("void ", "")
    name = head.split("::")[-1] if "<" not in head else head[head.rfind("::", 0, head.index("<")) + 2:]
    return name


def _cuda_one(job: tuple) -> list:
    source, arch = job
    with tempfile.TemporaryDirectory() as tmp:
        cmd = _nvcc_command(Path(source), arch, Path(tmp, "out.cubin"))
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        return [{"kernel": Path(source).name, "arch": f"sm_{arch}", "error": run.stderr[-2000:]}]
    parsed = parse_ptxas_log(run.stderr + run.stdout)
    names = _demangle(list(parsed))
    return [{"kernel": _short(names[f]), "file": Path(source).name, "arch": f"sm_{arch}",
             "registers": v["registers"], "spills": v["spill_stores"] + v["spill_loads"], "smem": v["smem"],
             "warnings": v["warnings"]} for f, v in parsed.items() if f != "?"]


def cuda_rows(archs, jobs: int) -> list:
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    work = [(str(s), arch) for s in sources for arch in archs]
    if jobs <= 1:
        return [r for w in work for r in _cuda_one(w)]
    with ProcessPoolExecutor(jobs) as pool:
        return [r for rows in pool.map(_cuda_one, work) for r in rows]


def cuda_failures(rows: list) -> list:
    failures = []
    for r in rows:
        where = f"{r['kernel']} {r['arch']}"
        if "error" in r:
            failures.append(f"{where}: nvcc failed: {r['error']}")
            continue
        if r["spills"]:
            failures.append(f"{where}: {r['spills']} bytes of register spills")
        if r["smem"] > STATIC_SMEM_LIMIT:
            failures.append(f"{where}: {r['smem']} B of static shared memory > {STATIC_SMEM_LIMIT}")
    return failures


# --------------------------------------------------------------------------------------------

def markdown_triton(rows: list) -> str:
    lines = ["| kernel | dtypes | config | arch | regs | spills (B) | smem (KB) | est. (KB) | kept | C7515 |",
             "|---|---|---|---|---:|---:|---:|---:|:-:|:-:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['case']} | {r['config']} | {r['arch']} | error: {r['error'][:80]} "
                         f"| | | | | |")
            continue
        est = "" if r.get("estimate") is None else f"{r['estimate'] / 1024:.0f}"
        lines.append(f"| {r['kernel']} | {r['case']} | {r['config']} | {r['arch']} | {r['registers']} | "
                     f"{r['spills']} | {r['smem'] / 1024:.1f} | {est} | {'yes' if r['kept'] else 'pruned'} | "
                     f"{'**yes**' if r['c7515'] else 'no'} |")
    return "\n".join(lines)


def markdown_cuda(rows: list) -> str:
    lines = ["| kernel | arch | regs | spills (B) | static smem (B) |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['arch']} | nvcc error | | |")
        else:
            lines.append(f"| `{r['kernel']}` | {r['arch']} | {r['registers']} | {r['spills']} | {r['smem']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("triton", "cuda"), help="check only the Triton or only the CUDA kernels")
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), choices=sorted(SMEM_LIMIT),
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="parallel compiler processes (default: min(4, CPUs))")
    parser.add_argument("--kernel", help="only the Triton kernels whose name contains this text")
    parser.add_argument("--dtypes", help="only the Triton cases with exactly these dtypes (e.g. bf16)")
    parser.add_argument("--json", type=Path, help="write the rows and failures to this JSON file")
    args = parser.parse_args(argv)
    result, failures = {}, []
    if args.only in (None, "triton"):
        rows = triton_rows(args.archs, args.jobs, args.kernel, args.dtypes)
        result["triton"] = rows
        failures += triton_failures(rows)
        print("## Triton kernels\n\n" + markdown_triton(rows) + "\n")
    if args.only in (None, "cuda"):
        rows = cuda_rows(args.archs, args.jobs)
        result["cuda"] = rows
        failures += cuda_failures(rows)
        print("## CUDA kernels (csrc/cuda)\n\n" + markdown_cuda(rows) + "\n")
    result["failures"] = failures
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    print(f"{len(failures)} failure(s)" + ("" if not failures else ":\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
