"""The whole GPU check as one prepared command (`make gpu-check OUT=DIR`): build, GPU tests, benchmark, training.

The GPU machine is lent for minutes at a time, has no package registry and cannot download anything, so
every step here uses only what the working tree and the machine's python3 already hold:

  1. env        nvidia-smi, python/torch/triton/CUDA/nvcc versions, the git commit         -> env.json
  2. build      maskprune._C with its CUDA part, in place, for the local GPU's arch only,
                with every core (MAX_JOBS)                                                 -> build.log
  3. tests      tests/test_ops_cuda.py, tests/kernels/ (on CUDA, not the interpreter), the
                CUDA cases of tests/test_ops.py, tests/test_nn.py, seed mode and the policies' Triton
                passes (tests/test_seed_mode.py, tests/test_policy_triton.py); no -x                   -> tests.xml, tests.log
  4. train      lenet300 on MNIST, 2 epochs on CUDA: masks with each backend, and dense    -> train.json
  5. bench      scripts/bench_kernels.py on a reduced grid                                 -> bench.json, bench.png
  and summary.json: each step's status, exit code, seconds, and the headline numbers.

That is at most 8 files, each well under 16 MB. Steps share one wall-clock budget (--budget-s, 480 s by
default, the issue's 8 minutes); each step gets a timeout from what is left, a step that fails or times
out is recorded and the next one still runs, so that one failure never hides the others.

MNIST comes with the working tree: `make gpu-data` copies the verified MNIST file into .gpu-data/ (ignored
by git), which the device call carries. GPU_CHECK_DRY_RUN=1 (or --dry-run) runs the CPU side of every step
on a machine without a GPU (no build, test collection only, a short CPU training run, no benchmark) and
writes the same files: tests/test_gpu_check.py checks that.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("env.json", "build.log", "tests.xml", "tests.log", "train.json", "bench.json", "bench.png", "summary.json")
# The GPU tests: the CUDA file, the kernel tests, and the CUDA parameters of test_ops.py (ids "cuda-<backend>").
TEST_PATHS = ("tests/test_ops_cuda.py", "tests/kernels", "tests/test_ops.py", "tests/test_nn.py",
              "tests/test_seed_mode.py", "tests/test_policy_triton.py", "tests/test_policy_cuda.py")
TEST_SELECTION = "cuda or not test_ops"
TRAIN_BACKENDS = ("triton", "cpp", "torch")
BENCH_ARGS = ("--shapes", "4096x4096x4096,8192x8192x8192,256x2048x784,4096x2048x784,4096x2048x2048",
              "--threshold-sizes", "1000000,10000000,100000000", "--warmup", "10", "--rep", "40")
# Seconds each step may take at most, and what is kept back for the steps after it.
STEP_LIMITS = {"build": 200, "tests": 200, "train": 150, "bench": 180}
MAX_FILE_BYTES = 16 * 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for the (at most 8) result files; created if absent")
    p.add_argument("--prepare-data", action="store_true",
                   help="copy the verified MNIST file into --data-root (run here, before the GPU call) and stop")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all steps, seconds")
    p.add_argument("--data-root", default=str(ROOT / ".gpu-data"),
                   help="dataset cache holding mnist/mnist.pkl.gz (make gpu-data fills .gpu-data)")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                   help="CPU side only, for machines without a GPU (also GPU_CHECK_DRY_RUN=1)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each training run")
    args = p.parse_args(argv)
    if not args.prepare_data and not args.out:
        p.error("--out is required (the folder for the result files)")
    if not args.budget_s > 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


class Budget:
    """One wall-clock budget shared by the steps; each step's timeout is what is left, capped by its limit."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def timeout(self, step: str, reserve: float = 0.0) -> float:
        left = self.deadline - time.monotonic() - reserve
        return max(5.0, min(STEP_LIMITS.get(step, left), left))


def run(cmd: list[str], log, timeout: float, env: dict | None = None) -> tuple[int | str, float]:
    """Runs cmd from the repo root, appending its output to `log`; returns (exit code or "timeout", seconds)."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, **(env or {})})
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.monotonic() - t0
    log.write(f"# exit {rc} after {seconds:.1f} s\n\n")
    log.flush()
    return rc, seconds


def capture(cmd: list[str]) -> str:
    """A command's output, or why it could not run."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable: {err}"


def step_env(out: Path) -> dict:
    import torch

    info = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "git_commit": capture(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
            "nvcc": capture(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else "not found",
            "nvidia_smi": capture(["nvidia-smi"]) if shutil.which("nvidia-smi") else "not found"}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as err:
        info["triton"] = f"unavailable: {err}"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    (out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    return {"status": "ok", "gpu": info.get("gpu"), "torch": info["torch"], "triton": info["triton"]}


def step_build(out: Path, budget: Budget, dry_run: bool) -> dict:
    """maskprune._C in place (no pip: nothing can be fetched), CUDA for the local arch only."""
    with open(out / "build.log", "w") as log:
        if dry_run:
            log.write("dry run: no build; checking the installed extension imports\n")
            rc, seconds = run([sys.executable, "-c", "import maskprune._C, maskprune.kernels"], log, 120)
            return {"status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": seconds, "dry_run": True}
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        arch = f"{major}.{minor}{'a' if major == 9 else ''}"  # sm_90a: Hopper-only instructions allowed
        env = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 8)}
        # Editable, offline (the machine has pip, setuptools and wheel but no registry): maps maskprune.kernels
        # to kernels/ as a normal install does, and puts the built _C beside the sources.
        rc, seconds = run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                           "-e", "."], log, budget.timeout("build", reserve=240), env)
        if rc == 0:
            rc, _ = run([sys.executable, "-c", "import maskprune._C, torch; print('CUDA kernel registered for "
                         "maskprune::threshold:', torch._C._dispatch_has_kernel_for_dispatch_key("
                         "'maskprune::threshold', 'CUDA'))"], log, 60)
        return {"status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": seconds, "arch": arch}


def junit_counts(path: Path) -> dict:
    """tests/failures/errors/skipped summed over the JUnit file's suites (empty when it is missing)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    totals["failed_tests"] = failed[:200]
    return totals


def step_tests(out: Path, budget: Budget, dry_run: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *TEST_PATHS, "-k", TEST_SELECTION,
           f"--junitxml={out / 'tests.xml'}"]
    if dry_run:
        cmd.append("--collect-only")
    elif importlib.util.find_spec("xdist") is not None:  # the GPU machine has pytest-xdist: 8 workers, one GPU
        cmd += ["-n", "8"]
    with open(out / "tests.log", "w") as log:
        rc, seconds = run(cmd, log, budget.timeout("tests", reserve=200))
    if not (out / "tests.xml").is_file():
        (out / "tests.xml").write_text(f'<testsuites><testsuite name="gpu-check" tests="0" errors="1">'
                                       f'<error message="pytest ended with {rc} before writing JUnit XML"/>'
                                       f'</testsuite></testsuites>\n')
    counts = junit_counts(out / "tests.xml")
    ok = rc == 0 or (dry_run and rc == 5)  # 5: nothing ran (collect-only)
    return {"status": "ok" if ok else "failed", "rc": rc, "seconds": seconds, **counts}


def step_train(out: Path, budget: Budget, args: argparse.Namespace) -> dict:
    """lenet300 on MNIST: a mask run per backend and a dense run, each into a scratch folder."""
    device = "cpu" if args.dry_run else "cuda"
    backends = ("torch", "cpp") if args.dry_run else TRAIN_BACKENDS
    extra = ["--limit-train", "512", "--threads", "1"] if args.dry_run else []
    data_root = args.data_root if Path(args.data_root, "mnist").is_dir() or not args.dry_run else ""
    scratch = out / ".runs"
    runs = [(f"mask-{b}", ["--mode", "mask", "--backend", b]) for b in backends] + [("dense", ["--mode", "dense"])]
    results, log_lines = {}, []
    for name, flags in runs:
        cmd = [sys.executable, "-m", "maskprune", "train", "--model", "lenet300", "--dataset", "mnist",
               "--epochs", str(args.epochs), "--device", device, "--out", str(scratch / name), "--overwrite",
               "--quiet", *flags, *extra] + (["--data-root", data_root] if data_root else [])
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=budget.timeout("train", reserve=120) / 2)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            rc, output = "timeout", str(err)
        entry = {"command": " ".join(cmd), "rc": rc, "seconds": time.monotonic() - t0}
        summary = scratch / name / "summary.json"
        if rc == 0 and summary.is_file():
            entry["summary"] = json.loads(summary.read_text())
            entry["metrics"] = [json.loads(line) for line in (scratch / name / "metrics.jsonl").read_text().splitlines()]
        else:
            entry["output_tail"] = output[-4000:]
        results[name] = entry
        log_lines.append(f"{name}: rc {rc}")
    dense = results.get("dense", {}).get("summary")
    for name, entry in results.items():  # the target: a mask epoch <= 1.2x the dense epoch
        if dense and "summary" in entry and name != "dense":
            entry["epoch_time_vs_dense"] = entry["summary"]["seconds_per_epoch"] / dense["seconds_per_epoch"]
    (out / "train.json").write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    failed = [n for n, e in results.items() if e["rc"] != 0]
    return {"status": "ok" if not failed else "failed", "failed": failed,
            "test_acc": {n: e["summary"]["test_acc_last"] for n, e in results.items() if "summary" in e},
            "epoch_time_vs_dense": {n: round(e["epoch_time_vs_dense"], 3)
                                    for n, e in results.items() if "epoch_time_vs_dense" in e}}


def step_bench(out: Path, budget: Budget, dry_run: bool) -> dict:
    if dry_run:
        (out / "bench.json").write_text(json.dumps({"skipped": "dry run: bench_kernels.py needs a CUDA GPU",
                                                    "args": list(BENCH_ARGS)}, indent=2) + "\n")
        return {"status": "skipped", "reason": "dry run"}
    with open(out / "bench.log", "w") as log:
        rc, seconds = run([sys.executable, "scripts/bench_kernels.py", *BENCH_ARGS, "--out", str(out / "bench.json")],
                          log, budget.timeout("bench"))
    tail = (out / "bench.log").read_text()[-6000:]
    (out / "bench.log").unlink()
    if not (out / "bench.json").is_file():
        (out / "bench.json").write_text(json.dumps({"rc": rc, "output_tail": tail}, indent=2) + "\n")
    else:  # keep the printed table beside the numbers
        data = json.loads((out / "bench.json").read_text())
        data["printed"] = tail
        (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    return {"status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": seconds}


def prepare_data(data_root: Path) -> Path:
    """Copies the checksum-verified MNIST file (fetched into the cache if needed) to DATA_ROOT/mnist/."""
    from maskprune import data

    source = data.fetch("mnist")  # verifies the sha256
    dest = data_root / "mnist"
    dest.mkdir(parents=True, exist_ok=True)
    for spec in data.DATASETS["mnist"].files:
        shutil.copyfile(source / spec.name, dest / spec.name)
    return dest


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare_data:
        print(f"gpu_check: MNIST ready in {prepare_data(Path(args.data_root))}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA GPU here; use GPU_CHECK_DRY_RUN=1 for the CPU side", file=sys.stderr)
            return 2
        if not Path(args.data_root, "mnist", "mnist.pkl.gz").is_file():
            print(f"gpu_check: {args.data_root}/mnist/mnist.pkl.gz is missing: run `make gpu-data` and carry "
                  ".gpu-data to the GPU machine", file=sys.stderr)
            return 2
    budget = Budget(args.budget_s)
    t0 = time.monotonic()
    summary = {"dry_run": args.dry_run, "budget_s": args.budget_s, "steps": {}}
    steps = [("env", lambda: step_env(out)), ("build", lambda: step_build(out, budget, args.dry_run)),
             ("tests", lambda: step_tests(out, budget, args.dry_run)), ("train", lambda: step_train(out, budget, args)),
             ("bench", lambda: step_bench(out, budget, args.dry_run))]
    for name, step in steps:
        print(f"gpu_check: {name} ...", flush=True)
        try:
            result = step()
        except Exception as err:  # a broken step is recorded; the next one still runs
            result = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        summary["steps"][name] = result
        print(f"gpu_check: {name}: {json.dumps(result)[:600]}", flush=True)
    summary["seconds"] = time.monotonic() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for path in out.iterdir():  # the device tool brings back files of at most 16 MB
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            path.write_text(path.read_text(errors="replace")[-MAX_FILE_BYTES // 2:])
    bad = [n for n, r in summary["steps"].items() if r["status"] not in ("ok", "skipped")]
    print(f"gpu_check: done in {summary['seconds']:.0f} s; " + (f"failed: {', '.join(bad)}" if bad else "all steps ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
