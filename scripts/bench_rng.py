"""CPU benchmark of maskprune.rng's backends (issue 18 §1), on one thread by default.

1. The counter-based weight generator: the C++ kernel (backend "cpp") against the torch integer-op
   reference, for a 784x300 and a 1M-element weight, every init (median of interleaved repeats).
2. A LeNet-300-100 training step (batch 128, SGD) with a dense model, and with the supermask policy
   drawing its masks with generator "torch", and with generator "philox": the fused C++ draw (what a CPU
   float32 layer runs), u from the C++ kernel then the mask in torch ops, and u from the torch reference.
Prints a markdown table and writes --json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from maskprune import models, rng
from maskprune.masks import supermask
from maskprune.nn import convert, masked_layers


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def generator_rows(repeats: int) -> list:
    rows = []
    for shape in ((300, 784), (1 << 20,)):
        for init in rng.DISTRIBUTIONS:
            row = {"shape": list(shape), "init": init}
            for backend in ("reference", "cpp"):
                row[backend] = median_time(lambda: rng.counter_weights(shape, init, 0.05, seed=1, layer=2,
                                                                       backend=backend), repeats)
            row["speedup"] = row["reference"] / row["cpp"]
            rows.append(row)
    return rows


class StepRunner:
    """One SGD training step of a LeNet-300-100 (dense, or supermask with a generator)."""

    def __init__(self, variant: str, batch: int) -> None:
        torch.manual_seed(0)
        self.model = models.create("lenet300", num_classes=10, in_shape=(1, 28, 28), bias=True)
        self.policy = None
        if variant != "dense":
            generator = "torch" if variant == "supermask-torch" else "philox"
            convert(self.model, 0.5, policy="supermask", generator=generator)
            self.policy = next(layer for _, layer in masked_layers(self.model)).mask_policy
        self.backend = variant.split(":")[1] if ":" in variant else "auto"
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 1, 28, 28, generator=g)
        self.y = torch.randint(0, 10, (batch,), generator=g)
        self.step_count = 0

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.step_count += 1
        if self.policy is not None:
            self.policy.after_step(None, self.step_count)


def step_rows(batch: int, repeats: int, rounds: int) -> list:
    variants = ["dense", "supermask-torch", "supermask-philox:fused", "supermask-philox:cpp",
                "supermask-philox:reference"]
    runners = {v: StepRunner(v, batch) for v in variants}
    original = supermask.uniform_draw
    times = {v: [] for v in variants}
    fused = supermask._FUSED_OP
    for _ in range(rounds):  # interleaved: background load hits every variant alike
        for v in variants:
            backend = runners[v].backend
            # "fused": the C++ one-pass training draw (FusedPhiloxMask); the others draw u, then mask in torch
            supermask._FUSED_OP = fused and backend == "fused"
            if backend != "fused":
                supermask.uniform_draw = lambda *a, _b=backend, **k: original(*a, **k, backend=_b)
            try:
                times[v].append(median_time(runners[v], repeats, warmup=1))
            finally:
                supermask.uniform_draw = original
                supermask._FUSED_OP = fused
    dense = statistics.median(times["dense"])
    return [{"variant": v, "step_s": statistics.median(t), "vs_dense": statistics.median(t) / dense}
            for v, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--skip-generator", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "torch": torch.__version__, "cpp": sorted(rng.CPP_DEVICE_TYPES)}
    if not args.skip_generator:
        result["generator"] = generator_rows(args.repeats)
        print("| weight | init | reference (ms) | C++ (ms) | speed-up |\n|---|---|---|---|---|")
        for r in result["generator"]:
            print(f"| {'x'.join(map(str, r['shape']))} | {r['init']} | {r['reference'] * 1e3:.2f} | "
                  f"{r['cpp'] * 1e3:.3f} | {r['speedup']:.0f}x |")
    if not args.skip_steps:
        result["steps"] = step_rows(args.batch, args.repeats, args.rounds)
        print(f"\n| LeNet-300-100 step (batch {args.batch}) | ms | vs dense |\n|---|---|---|")
        for r in result["steps"]:
            print(f"| {r['variant']} | {r['step_s'] * 1e3:.2f} | {r['vs_dense']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
