"""GPU benchmark of the mask kernels: masked linear (forward, forward+backward) and the threshold select.

Every implementation runs in this one process on the same tensors, timed with triton.testing.do_bench
(median of repeated runs, L2 flushed between them):

  masked linear, x [M, K] times (W ⊙ M)^T with W and scores [N, K], density 0.5 by default:
    triton  maskprune.masked_linear(backend="triton"): the mask prepass (W ⊙ M in x's dtype) + plain
            Triton GEMMs, dS with its fused epilogue; the mask cache is cleared before every call, so the
            time holds one prepass per forward(+backward), as a training step does
    triton-cached  the same with the mask already built (gradient accumulation, evaluation)
    cpp     maskprune.masked_linear(backend="cpp") (maskprune._C: the mask pass + cuBLAS), when built
    torch   maskprune.masked_linear(backend="torch"): the reference, W ⊙ M materialised, autograd
    dense   F.linear on the same shapes (cuBLAS): the limit a fused kernel is measured against
  forward+backward is y = layer(x); y.backward(dY): masked layers compute dX and dS (not dW), the
  dense layer dX and dW, so both run three GEMMs. The threshold is not inside these timings: a
  training step computes it once per optimizer step (maskprune caches it), timed separately:

  threshold, the n_keep-th largest |S| of n float32 scores:
    triton maskprune.kernels.threshold (radix select); cpp torch.ops.maskprune.threshold;
    torch.kthvalue (what the reference backend uses), torch.topk and torch.sort of |S|.

Writes results/bench_kernels/results.json and results.png next to it, and prints a table. Needs a
CUDA GPU (exits with code 2 on a machine without one); the issue's targets on an H100 are checked
and printed at the end: fused fwd+bwd <= 1.10x dense cuBLAS at 4096^3 bf16 and >= 3x faster than the
reference; threshold over 100M scores < 1 ms.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (M, N, K) = (batch, out_features, in_features). The square GEMMs of the issue, then every layer of
# bench_cpu's 784-2048-2048-10 MLP at batch 256 and 4096.
DEFAULT_SHAPES = ("4096x4096x4096,8192x8192x8192,"
                  "256x2048x784,256x2048x2048,256x10x2048,"
                  "4096x2048x784,4096x2048x2048,4096x10x2048")
DEFAULT_THRESHOLD_SIZES = "1000000,10000000,100000000"
TARGET_SHAPE = (4096, 4096, 4096)
TARGETS = {"fwd_bwd_vs_dense_max": 1.10, "fwd_bwd_speedup_vs_torch_min": 3.0, "threshold_100M_ms_max": 1.0}


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'MxNxK,MxNxK' -> [(M, N, K), ...]; argparse turns the ValueError into a usage message."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"a shape is MxNxK with positive integers, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def parse_sizes(text: str) -> list[int]:
    """'1000000,1e7' -> [1000000, 10000000]."""
    try:
        sizes = [int(float(item)) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are comma-separated positive integers, got {text!r}") from None
    if not all(0 < s < 2**31 for s in sizes):
        raise argparse.ArgumentTypeError(f"each size must be in [1, 2^31 - 1], got {text!r}")
    return sizes


def parse_density(text: str) -> float:
    density = float(text)
    if not 0.0 < density <= 1.0:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return density


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Needs a CUDA GPU, and TRITON_INTERPRET unset.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="activation and weight dtype of the masked linear (scores are always fp32)")
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                        help=f"masked linear shapes MxNxK, comma-separated (default {DEFAULT_SHAPES})")
    parser.add_argument("--density", type=parse_density, default=0.5, help="fraction of weights kept")
    parser.add_argument("--threshold-sizes", type=parse_sizes, default=parse_sizes(DEFAULT_THRESHOLD_SIZES),
                        help=f"numbers of scores for the threshold benchmark (default {DEFAULT_THRESHOLD_SIZES})")
    parser.add_argument("--skip-linear", action="store_true", help="skip the masked linear benchmark")
    parser.add_argument("--skip-threshold", action="store_true", help="skip the threshold benchmark")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time per case, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time per case, ms")
    parser.add_argument("--out", default="results/bench_kernels/results.json", help="JSON output path")
    return parser.parse_args(argv)


def require_gpu() -> None:
    """Exit with code 2 and a message saying why, where the benchmark cannot mean anything."""
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is "
              "False); run it on a GPU machine.", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench_kernels.py: TRITON_INTERPRET=1 would time Triton's CPU interpreter; unset it.", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------------
# Masked linear
# --------------------------------------------------------------------------------------------

def masked_backends(device: str) -> list[str]:
    """The masked-linear implementations present on this device, in table order."""
    from maskprune import ops

    available = ops.available_backends(device)
    return [name for name in ("triton", "cpp", "torch") if name in available]


def linear_cases(M: int, N: int, K: int, dtype: torch.dtype, density: float, device: str) -> tuple[dict, dict]:
    """{(impl, pass): (fn, grad_to_none)} for one shape, every fn on the same tensors; and each masked
    backend's forward error relative to the reference's."""
    import maskprune

    gen = torch.Generator(device=device).manual_seed(M * 7919 + N * 31 + K)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=gen)
    weight = (torch.randn(N, K, device=device, dtype=torch.float32, generator=gen) / K**0.5).to(dtype)
    scores = torch.randn(N, K, device=device, dtype=torch.float32, generator=gen)
    grad_out = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
    t = maskprune.threshold(scores, density, backend="torch")
    x_grad = x.clone().requires_grad_()
    scores_grad = scores.clone().requires_grad_()
    weight_grad = weight.clone().requires_grad_()

    cases = {}
    impls = masked_backends(device)
    if "triton" in impls:
        impls = impls[:1] + ["triton-cached"] + impls[1:]
    for impl in impls:
        backend = impl.split("-")[0]

        def fwd(backend=backend, fresh=impl == "triton"):
            if fresh:
                from maskprune.triton_ops import MASK_CACHE
                MASK_CACHE.clear()
            return maskprune.masked_linear(x, weight, scores, t, backend=backend)

        def fwd_bwd(backend=backend, fresh=impl == "triton"):
            if fresh:
                from maskprune.triton_ops import MASK_CACHE
                MASK_CACHE.clear()
            maskprune.masked_linear(x_grad, weight, scores_grad, t, backend=backend).backward(grad_out)

        cases[(impl, "fwd")] = (fwd, None)
        cases[(impl, "fwd+bwd")] = (fwd_bwd, [x_grad, scores_grad])
    cases[("dense", "fwd")] = (lambda: F.linear(x, weight), None)
    cases[("dense", "fwd+bwd")] = (lambda: F.linear(x_grad, weight_grad).backward(grad_out), [x_grad, weight_grad])

    # One correctness look before timing: each backend's Y against the reference's, relative to its scale.
    errors = {}
    expected = maskprune.masked_linear(x, weight, scores, t, backend="torch").float()
    scale = max(expected.abs().max().item(), 1e-30)
    for backend in masked_backends(device):
        actual = cases[(backend, "fwd")][0]().float()
        errors[backend] = (actual - expected).abs().max().item() / scale
    return cases, errors


def bench_linear(args, do_bench: Callable, device: str = "cuda") -> list[dict]:
    """One row per (shape, pass, implementation), with its time relative to dense F.linear."""
    dtype = DTYPES[args.dtype]
    rows = []
    for M, N, K in args.shapes:
        cases, errors = linear_cases(M, N, K, dtype, args.density, device)
        dense = {}
        for (impl, kind), (fn, grads) in cases.items():
            ms = do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=grads, return_mode="median")
            flops = 2 * M * N * K * (3 if kind == "fwd+bwd" else 1)
            row = {"bench": "masked_linear", "pass": kind, "shape": [M, N, K], "dtype": args.dtype, "impl": impl,
                   "ms": ms, "tflops": flops / ms / 1e9, "max_rel_err_fwd": errors.get(impl)}
            rows.append(row)
            if impl == "dense":
                dense[kind] = ms
        for row in rows:
            if row["shape"] == [M, N, K] and row["pass"] in dense:
                row["x_dense"] = row["ms"] / dense[row["pass"]]
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------
# Threshold
# --------------------------------------------------------------------------------------------

def threshold_cases(n: int, density: float, device: str) -> dict:
    """{impl: fn} computing the n_keep-th largest |S| of n float32 scores (or, for sort, all of them)."""
    from maskprune import kernels, ops, reference

    scores = torch.randn(n, device=device, generator=torch.Generator(device=device).manual_seed(n))
    n_keep = reference.n_keep_for(density, n)
    expected = torch.kthvalue(scores.abs().cpu(), n - n_keep + 1).values.item()
    cases = {"triton": lambda: kernels.threshold(scores, n_keep, True)}
    if "cpp" in ops.available_backends(device):
        cases["cpp"] = lambda: torch.ops.maskprune.threshold(scores, density, True)
    cases["torch.kthvalue"] = lambda: torch.kthvalue(scores.abs(), n - n_keep + 1).values
    cases["torch.topk"] = lambda: torch.topk(scores.abs(), n_keep, sorted=False).values.min()
    cases["torch.sort"] = lambda: torch.sort(scores.abs(), descending=True).values[n_keep - 1]
    for impl, fn in cases.items():  # every one must find the same value before its time counts
        got = fn().item()
        if got != expected:
            raise AssertionError(f"threshold over {n} scores: {impl} gave {got!r}, expected {expected!r}")
    return cases


def bench_threshold(args, do_bench: Callable, device: str = "cuda") -> list[dict]:
    """One row per (size, implementation)."""
    rows = []
    for n in args.threshold_sizes:
        for impl, fn in threshold_cases(n, args.density, device).items():
            ms = do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
            rows.append({"bench": "threshold", "n": n, "impl": impl, "ms": ms,
                         "gbytes_per_s": 4 * n / ms / 1e6})  # one read of the scores
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def check_targets(rows: list[dict]) -> dict:
    """The issue's targets, for those this run measured (4096^3 in bf16, threshold over 100M scores)."""
    def ms_of(**match):
        for row in rows:
            if all(row.get(k) == v for k, v in match.items()):
                return row["ms"]
        return None

    at_target = dict(bench="masked_linear", shape=list(TARGET_SHAPE), dtype="bf16")
    at_target["pass"] = "fwd+bwd"
    triton = ms_of(impl="triton", **at_target)
    dense = ms_of(impl="dense", **at_target)
    torch_ref = ms_of(impl="torch", **at_target)
    thr = ms_of(bench="threshold", n=100_000_000, impl="triton")
    out = {}
    if triton and dense:
        ratio = triton / dense
        out["fwd_bwd_vs_dense_4096^3_bf16"] = {"value": ratio, "target": f"<= {TARGETS['fwd_bwd_vs_dense_max']}",
                                               "met": ratio <= TARGETS["fwd_bwd_vs_dense_max"]}
    if triton and torch_ref:
        speedup = torch_ref / triton
        out["fwd_bwd_speedup_vs_torch_4096^3_bf16"] = {
            "value": speedup, "target": f">= {TARGETS['fwd_bwd_speedup_vs_torch_min']}",
            "met": speedup >= TARGETS["fwd_bwd_speedup_vs_torch_min"]}
    if thr:
        out["threshold_100M_ms"] = {"value": thr, "target": f"< {TARGETS['threshold_100M_ms_max']}",
                                    "met": thr < TARGETS["threshold_100M_ms_max"]}
    return out


def print_tables(rows: list[dict]) -> None:
    linear = [r for r in rows if r["bench"] == "masked_linear"]
    if linear:
        print(f"\nmasked linear ({linear[0]['dtype']}; x dense = time / dense F.linear time of the same pass)")
        print(f"{'M x N x K':>20s} {'pass':8s} {'impl':8s} {'ms':>9s} {'TFLOP/s':>8s} {'x dense':>8s} {'err':>8s}")
        for r in linear:
            err = "" if r["max_rel_err_fwd"] is None else f"{r['max_rel_err_fwd']:.1e}"
            print(f"{'x'.join(map(str, r['shape'])):>20s} {r['pass']:8s} {r['impl']:8s} {r['ms']:9.3f} "
                  f"{r['tflops']:8.1f} {r.get('x_dense', float('nan')):8.2f} {err:>8s}")
    thresholds = [r for r in rows if r["bench"] == "threshold"]
    if thresholds:
        print("\nthreshold of float32 |scores| (GB/s = one read of the scores per call)")
        print(f"{'n':>12s} {'impl':16s} {'ms':>9s} {'GB/s':>8s}")
        for r in thresholds:
            print(f"{r['n']:12d} {r['impl']:16s} {r['ms']:9.3f} {r['gbytes_per_s']:8.0f}")


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Two panels: masked linear time relative to dense per shape and pass; threshold time per size."""
    plt = _common.pyplot("bench_kernels")
    if plt is None:
        return False
    fig, (ax_lin, ax_thr) = plt.subplots(1, 2, figsize=(15, 5.5))
    linear = [r for r in rows if r["bench"] == "masked_linear" and r["impl"] != "dense"]
    groups = sorted({(tuple(r["shape"]), r["pass"]) for r in linear}, key=lambda g: (g[1], g[0]))
    impls = sorted({r["impl"] for r in linear}, key=["triton", "cpp", "torch"].index)
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        values = [next((r.get("x_dense", 0) for r in linear if (tuple(r["shape"]), r["pass"], r["impl"]) ==
                        (*g, impl)), 0) for g in groups]
        ax_lin.bar([j + i * width for j in range(len(groups))], values, width, label=impl)
    ax_lin.axhline(1.0, color="black", lw=1, label="dense F.linear")
    ax_lin.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax_lin.set_xticklabels([f"{'x'.join(map(str, s))}\n{p}" for s, p in groups], fontsize=7, rotation=45)
    ax_lin.set_ylabel("time / dense time")
    ax_lin.set_yscale("log")
    ax_lin.set_title(f"masked linear ({rows[0].get('dtype', '')})" if linear else "masked linear (not run)")
    ax_lin.legend()
    thresholds = [r for r in rows if r["bench"] == "threshold"]
    for impl in dict.fromkeys(r["impl"] for r in thresholds):
        pts = sorted((r["n"], r["ms"]) for r in thresholds if r["impl"] == impl)
        ax_thr.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax_thr.set_xscale("log")
    ax_thr.set_yscale("log")
    ax_thr.set_xlabel("number of float32 scores")
    ax_thr.set_ylabel("ms")
    ax_thr.set_title("threshold (n_keep-th largest |S|)")
    if thresholds:
        ax_thr.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def machine() -> dict:
    import triton

    import maskprune

    return {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "maskprune": maskprune.__version__, "python": platform.python_version(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None) -> int:
    args = parse_args(argv)
    require_gpu()
    from triton.testing import do_bench

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 cases: cuBLAS and the kernels both in IEEE fp32
    rows = []
    if not args.skip_linear:
        rows += bench_linear(args, do_bench)
    if not args.skip_threshold:
        rows += bench_threshold(args, do_bench)
    print_tables(rows)
    targets = check_targets(rows)
    if targets:
        print("\ntargets (H100):")
        for name, t in targets.items():
            print(f"  {name:40s} {t['value']:8.3f}  target {t['target']:8s}  {'met' if t['met'] else 'MISSED'}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args), "machine": machine(), "rows": rows, "targets": targets}
    out.write_text(json.dumps(result, indent=2))
    png = out.with_suffix(".png")
    wrote_png = plot(rows, png, f"maskprune kernels on {result['machine']['gpu']}, {result['machine']['date_utc']}")
    print(f"\nwrote {out}" + (f" and {png}" if wrote_png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
