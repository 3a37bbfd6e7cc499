"""CPU benchmark: one mask-training step against a dense training step and a sort-based edge-popup step.

The model is a 784-2048-2048-10 ReLU MLP, batch 256, density 0.5. Every variant runs in this process,
in interleaved rounds, and the medians are reported as ratios to the dense step. The sort-based step
follows allenai/hidden-networks' GetSubnet (sort every layer's |scores| on every forward pass).
Then, per step of the masked MLP, the cost of each extra pass the mask step makes over its scores:
the fused threshold-and-mask pass (with the scores' sign bytes, as the layers run it, and without), the
threshold alone with the previous step's threshold as hint and without it (the full radix select), the
fused mask pass, and the fused score-gradient pass (from the sign bytes, as the layers run it, and from
the scores).
Then one row per mask policy (maskprune.masks): a trainer's step of a lenet300-like MLP (784-300-100-10, batch
128, `--policy-widths` / `--policy-batch`) with that policy (forward, loss + the policy's penalty, backward, SGD
step, the policy's step hooks) over the dense step of the same MLP, measured in the same process in interleaved
rounds (median over rounds). supermask is measured three times: as it runs by default (generator "philox", the
draw fused into the mask pass in C++), with generator "torch", and with "torch" and its uniform draw u made before
the timed step (the draw alone is then the difference). `--profile` prints, per policy, where the step's time goes
(torch.profiler, self CPU time per op).
First, seed mode (issue 18 §3, `--only-seed` for these rows alone): the --widths MLP's training step dense, masked
over stored weights, and masked in seed mode (W regenerated inside the mask and dS passes), in interleaved rounds;
and each variant's peak memory, as the peak RSS of a fresh subprocess over building it and a few steps, above what
that process held before (so no variant's allocator cache counts for another), with its state_dict size.
Writes results/bench_cpu/results.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402

import maskprune  # noqa: E402
from maskprune import masks  # noqa: E402
from maskprune.masks import supermask as supermask_module  # noqa: E402


class SortSubnet(torch.autograd.Function):
    """Edge-popup's GetSubnet: sort |scores| every call, keep the top k, straight-through gradient."""

    @staticmethod
    def forward(ctx, scores, density):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - density) * scores.numel())
        flat = out.flatten()
        flat[idx[:j]] = 0
        flat[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


class SortMaskedLinear(nn.Linear):
    def __init__(self, fan_in, fan_out, density):
        super().__init__(fan_in, fan_out, bias=False)
        self.scores = nn.Parameter(torch.randn_like(self.weight))
        self.weight.requires_grad_(False)
        self.density = density

    def forward(self, x):
        mask = SortSubnet.apply(self.scores.abs(), self.density)
        return F.linear(x, self.weight * mask)


def mlp(widths, linear=nn.Linear):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_step(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def extra_passes(masked: nn.Module, step, repeats: int) -> dict[str, float]:
    """ms per training step, summed over the masked layers, of each pass a mask step adds to dense.

    One more optimizer step first, so that each layer's hint is a real previous-step threshold.
    """
    layers = [m for m in masked.modules() if isinstance(m, maskprune.MaskedLinear)]
    hints = [layer.threshold() for layer in layers]
    step()
    ops = maskprune.ops
    out = {"threshold + mask + sign bytes in one pass, hint = previous step's t (what the layers run)": 0.0,
           "threshold + mask in one pass, hint = previous step's t": 0.0,
           "threshold, hint = previous step's t": 0.0, "threshold, no hint (full radix select)": 0.0,
           "fused mask pass (W ⊙ M)": 0.0, "fused dS pass from the sign bytes (in place; what the layers run)": 0.0,
           "fused dS pass from the scores (in place)": 0.0}
    for layer, hint in zip(layers, hints):
        s, w, d = layer.scores.detach(), layer.weight, layer.density
        t = ops.threshold(s, d, hint=hint)
        grad = torch.randn_like(s)
        out["threshold + mask + sign bytes in one pass, hint = previous step's t (what the layers run)"] += median_ms(
            lambda: torch.ops.maskprune.threshold_and_mask_signs(w, s, d, True, hint), repeats)
        out["threshold + mask in one pass, hint = previous step's t"] += median_ms(
            lambda: torch.ops.maskprune.threshold_and_mask(w, s, d, True, hint), repeats)
        out["threshold, hint = previous step's t"] += median_ms(lambda: ops.threshold(s, d, hint=hint), repeats)
        out["threshold, no hint (full radix select)"] += median_ms(lambda: ops.threshold(s, d), repeats)
        out["fused mask pass (W ⊙ M)"] += median_ms(
            lambda: torch.ops.maskprune.apply_mask(w, s, t, True), repeats)
        # each call gets a fresh copy of the gradient (so values stay normal); the copy is subtracted
        copy_ms = median_ms(lambda: grad.copy_(w), repeats)
        signs = torch.ops.maskprune.threshold_and_mask_signs(w, s, d, True, hint)[2]
        out["fused dS pass from the sign bytes (in place; what the layers run)"] += max(0.0, median_ms(
            lambda: torch.ops.maskprune.score_grad_signs_(grad.copy_(w), w, signs), repeats) - copy_ms)
        out["fused dS pass from the scores (in place)"] += max(0.0, median_ms(
            lambda: torch.ops.maskprune.score_grad_(grad.copy_(w), w, s, True), repeats) - copy_ms)
    return out


# (row name, policy, weight_init, options): every policy once; biprop with constant-magnitude weights (where it is
# the edge-popup op) and with Kaiming-normal ones (its own α·sign(W) path).
POLICY_ROWS = [
    ("layerwise", "layerwise", "signed_constant", {}),
    ("global", "global", "signed_constant", {}),
    ("iterand (period 300: no redraw in the window)", "iterand", "signed_constant", {}),
    ("threshold", "threshold", "kaiming_normal", {}),
    ("gem_miner", "gem_miner", "signed_constant", {}),
    ("signed", "signed", "signed_constant", {}),
    ("biprop (signed-constant weights)", "biprop", "signed_constant", {}),
    ("biprop (kaiming-normal weights)", "biprop", "kaiming_normal", {}),
    ("supermask (philox, the default: draw fused in C++)", "supermask", "signed_constant", {}),
    ("supermask (generator torch)", "supermask", "signed_constant", {"generator": "torch"}),
    ("supermask (u drawn before the step)", "supermask", "signed_constant", {"generator": "torch"}),
]


class PredrawnUniform:
    """Stands in for supermask's uniform_draw with one u per shape drawn beforehand (the draw left out of the
    timed step; the masks then repeat, which changes no cost)."""

    def __init__(self, draw):
        self.draw, self.cache = draw, {}

    def __call__(self, shape, device, **key):
        k = (tuple(shape), str(device))
        if k not in self.cache:
            self.cache[k] = self.draw(shape, device, **key)
        return self.cache[k]


def policy_step(model, x, y):
    """A trainer's step (maskprune.train): loss + the policy's penalty, backward, the policy's gradient hook, SGD,
    its step hook."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    count = [0]

    def step():
        loss = F.cross_entropy(model(x), y)
        penalty = masks.policy_penalty(model)
        opt.zero_grad(set_to_none=True)
        (loss if penalty is None else loss + penalty).backward()
        masks.before_step_hooks(model)
        opt.step()
        count[0] += 1
        masks.step_hooks(model, count[0])

    return step


def policy_rows(widths, batch, density, rounds, steps, profile=False):
    """[{policy, median_ms, dense_ms, ratio_to_dense}]: each policy's step against the dense step, interleaved."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    models = {"dense": mlp(widths, lambda a, b: nn.Linear(a, b, bias=False))}
    for name, policy, init, options in POLICY_ROWS:
        models[name] = maskprune.convert(mlp(widths, lambda a, b: nn.Linear(a, b, bias=False)), density,
                                         policy=policy, weight_init=init, **options)
    predrawn = PredrawnUniform(supermask_module.uniform_draw)
    original_draw = supermask_module.uniform_draw

    def run(name, fn):
        supermask_module.uniform_draw = predrawn if name.startswith("supermask (u drawn") else original_draw
        try:
            fn()
        finally:
            supermask_module.uniform_draw = original_draw

    steps_fn = {name: policy_step(m, x, y) for name, m in models.items()}
    for name, fn in steps_fn.items():  # warm-up (two steps: thresholds and their hints exist)
        run(name, fn)
        run(name, fn)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, fn in steps_fn.items():
            t0 = time.perf_counter()
            run(name, lambda: [fn() for _ in range(steps)])
            times[name].append((time.perf_counter() - t0) / steps)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [{"policy": name, "median_ms": 1e3 * medians[name], "dense_ms": 1e3 * medians["dense"],
             "ratio_to_dense": medians[name] / medians["dense"]} for name in models if name != "dense"]
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        for name, fn in steps_fn.items():
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                run(name, lambda: [fn() for _ in range(10)])
            print(f"--- {name}: self CPU time per op over 10 steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Seed mode (issue 18 §3): frozen weights regenerated inside the passes against stored weights and dense
# ----------------------------------------------------------------------------------------------------------

DEFAULT_OUT = "results/bench_cpu/results.json"
SEED_VARIANTS = ("dense", "mask (stored W)", "mask (seed mode)")


def seed_variant(name: str, widths, density: float) -> nn.Module:
    """One of SEED_VARIANTS: the MLP dense, or masked over signed-constant weights kept or regenerated."""
    torch.manual_seed(0)
    model = mlp(widths, lambda a, b: nn.Linear(a, b, bias=False))
    if name == "dense":
        return model
    return maskprune.convert(model, density, weight_init="signed_constant", scale_fan=True, weight_seed=0,
                             weights="seed" if "seed" in name else "stored")


def seed_memory_child(name: str, widths, batch: int, density: float, steps: int) -> dict:
    """Peak RSS of this (fresh) process over `steps` training steps of the variant, above what it held before the
    variant was built (so the model's live memory counts, its construction's transients do not): run in a
    subprocess per variant, so that no other variant's memory or allocator cache counts. Linux (/proc)."""
    def status_kb(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field} (the memory rows need Linux)")

    def release_freed() -> None:  # hand freed heap back to the OS, so that RSS is what is live
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)

    torch.manual_seed(0)
    x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    release_freed()
    before = status_kb("VmRSS")
    model = seed_variant(name, widths, density)
    release_freed()  # convert's transient copies (the plain layer's weight; in seed mode the dropped W) go
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    step = make_step(model, x, y)
    for _ in range(steps):
        step()
    peak = status_kb("VmHWM")
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"variant": name, "peak_rss_above_start_mb": (peak - before) / 1024, "state_dict_mb": state / 2 ** 20}


def seed_rows(widths, batch: int, density: float, rounds: int, steps: int, threads: int) -> dict:
    """Step time (interleaved rounds, medians, ratios to dense) and peak memory (a subprocess per variant)."""
    import subprocess
    import sys

    torch.manual_seed(0)
    x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    run = {name: make_step(seed_variant(name, widths, density), x, y) for name in SEED_VARIANTS}
    for step in run.values():  # warm-up
        step()
    times = {name: [] for name in SEED_VARIANTS}
    for _ in range(rounds):
        for name, step in run.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t0) / steps)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    memory = []
    for name in SEED_VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--seed-memory-child", name, "--widths", ",".join(map(str, widths)),
                              "--batch", str(batch), "--density", str(density), "--threads", str(threads)],
                             check=True, capture_output=True, text=True).stdout
        memory.append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for name, mem in zip(SEED_VARIANTS, memory):
        rows.append({"variant": name, "median_ms": 1e3 * medians[name], "ratio_to_dense": medians[name] / medians["dense"],
                     "ratio_to_stored": medians[name] / medians["mask (stored W)"], **mem})
    w_mb = sum(a * b for a, b in zip(widths[:-1], widths[1:])) * 4 / 2 ** 20
    return {"widths": widths, "batch": batch, "density": density, "weight_mb": w_mb, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="784,2048,2048,10")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--policy-widths", default="784,300,100,10", help="the MLP of the per-policy rows")
    parser.add_argument("--policy-batch", type=int, default=128)
    parser.add_argument("--policy-rounds", type=int, default=0, help="rounds of the policy rows (0: --rounds)")
    parser.add_argument("--only-policies", action="store_true", help="only the per-policy rows")
    parser.add_argument("--profile", action="store_true", help="print a per-op profile of every policy's step")
    parser.add_argument("--only-seed", action="store_true", help="only the seed-mode rows (seed vs stored W vs dense)")
    parser.add_argument("--seed-memory-child", choices=SEED_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    if args.seed_memory_child:
        print(json.dumps(seed_memory_child(args.seed_memory_child, widths, args.batch, args.density, args.steps + 2)))
        return
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "maskprune": maskprune.__version__,
               "backend": maskprune.ops.available_backends("cpu")[0]}
    seed = None if args.only_policies else seed_rows(widths, args.batch, args.density, args.rounds, args.steps,
                                                     args.threads)
    if seed is not None:
        print(f"seed mode, {args.widths} MLP, batch {args.batch}, W = {seed['weight_mb']:.1f} MB, "
              f"{torch.get_num_threads()} thread(s):")
        print(f"{'variant':20s} {'median ms':>10s} {'x dense':>8s} {'x stored':>9s} {'peak RSS MB':>12s} "
              f"{'state MB':>9s}")
        for r in seed["rows"]:
            print(f"{r['variant']:20s} {r['median_ms']:10.2f} {r['ratio_to_dense']:8.2f} {r['ratio_to_stored']:9.2f} "
                  f"{r['peak_rss_above_start_mb']:12.1f} {r['state_dict_mb']:9.1f}")
    if args.only_seed:  # into seed_mode.json unless --out says otherwise: results.json holds the full run
        out = Path(args.out if args.out != DEFAULT_OUT else Path(DEFAULT_OUT).with_name("seed_mode.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": vars(args), "seed_mode": seed, "machine": machine}, indent=2))
        return
    pwidths = [int(w) for w in args.policy_widths.split(",")]
    prows = policy_rows(pwidths, args.policy_batch, args.density, args.policy_rounds or args.rounds, args.steps,
                        args.profile)
    print(f"per policy, {args.policy_widths} MLP, batch {args.policy_batch}, {torch.get_num_threads()} thread(s):")
    print(f"{'policy':48s} {'median ms':>10s} {'dense ms':>9s} {'x dense':>8s}")
    for r in prows:
        print(f"{r['policy']:48s} {r['median_ms']:10.2f} {r['dense_ms']:9.2f} {r['ratio_to_dense']:8.2f}")
    if args.only_policies:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": vars(args), "policy_rows": prows, "machine": machine},
                                             indent=2))
        return
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, widths[0]), torch.randint(0, widths[-1], (args.batch,))

    dense = mlp(widths, lambda a, b: nn.Linear(a, b, bias=False))  # the same shapes as the masked nets
    masked = maskprune.convert(mlp(widths, lambda a, b: nn.Linear(a, b, bias=False)), args.density,
                               weight_init="signed_constant")
    reference = maskprune.convert(mlp(widths, lambda a, b: nn.Linear(a, b, bias=False)), args.density,
                                  weight_init="signed_constant", backend="torch")
    sort_based = mlp(widths, lambda a, b: SortMaskedLinear(a, b, args.density))
    variants = {"dense": dense, "mask (maskprune auto)": masked, "mask (torch reference)": reference,
                "mask (sort-based edge-popup)": sort_based}
    steps = {name: make_step(m, x, y) for name, m in variants.items()}
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["dense"]
    rows = [{"variant": n, "median_ms": 1e3 * m, "ratio_to_dense": m / base} for n, m in medians.items()]
    print(f"{'variant':32s} {'median ms':>10s} {'x dense':>8s}")
    for r in rows:
        print(f"{r['variant']:32s} {r['median_ms']:10.2f} {r['ratio_to_dense']:8.2f}")
    speedup = medians["mask (sort-based edge-popup)"] / medians["mask (maskprune auto)"]
    print(f"maskprune mask step is {speedup:.1f}x faster than the sort-based step")
    passes = extra_passes(masked, steps["mask (maskprune auto)"], repeats=max(5, args.rounds))
    print("extra passes of the mask step, ms per step (all layers):")
    for name, ms in passes.items():
        print(f"  {name:78s} {ms:8.2f}")
    result = {"config": vars(args), "rows": rows, "speedup_vs_sort": speedup, "extra_passes_ms": passes,
              "policy_rows": prows, "seed_mode": seed, "machine": machine}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
