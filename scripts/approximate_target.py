"""Malach et al.'s main theorem measured: a random depth-2l network contains a subnetwork approximating a depth-l target.

Targets are dense-trained, bias-free ReLU MLPs on MNIST: l=2 (784-500-10, the target of Pensia et al. 2020) and
l=3 (784-300-100-10). For each target and random width k (every target layer d -> n becomes d -> k d -> n in the
random network, weights i.i.d. U[-1, 1]):

(i)  construction: Malach's constructive pruning (maskprune.construct, methods "single" and "greedy"), no
     gradient training; max/mean |f_sub - f_target| over the test logits, prediction agreement and test accuracy,
     and the width needed for a given eps against the eps^-2 form of the paper's bound;
(ii) learned pruning: edge-popup masks (maskprune.convert, layer-wise top-k) over the same random weights, each
     layer multiplied by a positive constant (Kaiming scale for the kept fraction; ReLU is positively homogeneous,
     so the subnetworks are the same functions up to one positive output factor), trained on the target's
     logits (MSE distillation) and, separately, on the labels (cross-entropy).

The theorem (Malach, Yehudai, Shalev-Shwartz and Shamir, ICML 2020; the abstract: "for every bounded distribution
and every target network with bounded weights, a sufficiently over-parameterized neural network with random
weights contains a subnetwork with roughly the same accuracy as the target network, without any further
training"; the introduction: "a ReLU network of arbitrary depth l can be approximated by finding a
weight-subnetwork of a random network of depth 2l and sufficient width") assumes:

  * bias-free ReLU targets of depth l with bounded weights (we read "bounded" as spectral norm ||W_i||_2 <= 1 per
    layer, which also bounds every entry by 1; the paper's exact norm condition is not quoted here);
  * inputs in the unit ball, ||x|| <= 1;
  * random weights i.i.d. U[-1, 1];
  * and its eps is uniform over those inputs: sup_x |G~(x) - F(x)| <= eps, with probability >= 1 - delta, for a
    width polynomial in d, n, l, 1/eps and log(1/delta).

`--setting logits` (the default, the first run) measures the construction on unnormalised-scale MNIST logits, which
meets none of the first two assumptions. `--setting theorem` meets them: every input (train, val, test) is divided
by R = the largest input norm of the three splits, the target's first layer is multiplied by R (the same
function of the original image), and each layer is divided by max(1, ||W_i||_2) (a positive factor on the output,
predictions unchanged); the random weights are U[-1, 1] (variants single:1 and greedy:1), and the reported eps is
the theorem's quantity on the test set: max over test inputs and outputs of |f_sub(x) - f_target(x)|
(`max_abs_err`; `rel_max_err` divides it by max |f_target| over the test inputs). No learned masks there.

Exponents: `fitted_exponent_*` and `local_exponents_*` are MEASURED (slopes b of log k against log 1/eps from the
seed-averaged errors). PAPER_EPS_EXPONENT = 2 is ASSUMED, our reading of the proof's eps-box argument (one random
pair (u, v) must land in a box of side ~eps), not a statement of the paper, which gives a polynomial in 1/eps.

Writes results/approximate_target/<run>/results.json and results/approximate_target/<run>/approximate_target.png.
`--quick` is a reduced run (<= 3 minutes on a CPU) that tests/test_script_approximate_target.py runs. The full
mode's grid is sized for a 2-core CPU shared with other jobs (about an hour): construction k in {2,...,64} with
3 seeds (greedy: 1 seed), learned masks for 2 epochs at k in {1, 6} with 1 seed (more with --learn-seeds, and
--resume adds points to a finished run); widen it with the flags on a bigger machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import maskprune  # noqa: E402
from maskprune import construct, data, models  # noqa: E402
from maskprune.nn import convert, mask_stats  # noqa: E402

TARGETS = {"l2": (500,), "l3": (300, 100)}        # hidden widths of the targets (depth l = len + 1)
PAPER_EPS_EXPONENT = 2.0   # ASSUMED: our reading of the proof's eps-box argument (width ∝ eps^-2), not the paper's statement
SETTINGS = ("logits", "theorem")
EXPONENT_LABELS = {
    "fitted_exponent_max": "measured: least-squares slope of log k against log(1/max err)",
    "fitted_exponent_mean": "measured: least-squares slope of log k against log(1/mean err)",
    "local_exponents_max": "measured: slope between consecutive widths (max err)",
    "local_exponents_mean": "measured: slope between consecutive widths (mean err)",
    "paper_eps_exponent": "assumed: 2, our reading of the proof's eps-box argument, not the paper's statement "
                          "(the theorem gives width polynomial in 1/eps)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced grid and data (<= 3 min on CPU); for tests")
    p.add_argument("--out", default="results/approximate_target", help="parent folder of the run folder")
    p.add_argument("--setting", default="logits", choices=SETTINGS,
                   help="logits: the first run's setting (MNIST logits, standardised inputs); theorem: inputs scaled "
                        "into the unit ball, target layers rescaled to spectral norm <= 1, U[-1, 1] random weights, "
                        "eps = max over test inputs of |f_sub - f_target| (see the docstring)")
    p.add_argument("--run", default=None, help="run folder name (default: 'quick' or 'full')")
    p.add_argument("--targets", default=None, help="comma list of l2,l3")
    p.add_argument("--seeds", default=None, help="comma list of random-network seeds for the construction")
    p.add_argument("--target-epochs", type=int, default=None)
    p.add_argument("--construct-widths", default=None, help="comma list of k for the construction")
    p.add_argument("--variants", default=None,
                   help="construction variants METHOD:SCALE (method of maskprune.construct.METHODS; scale 1 = the "
                        "paper's U[-1, 1], 'matched' = U[-a_i, a_i] with a_i^2 = max |W_i|); default logits: "
                        "single:1,single:matched,greedy:matched; theorem: single:1,greedy:1")
    p.add_argument("--greedy-seeds", default=None, help="seeds for the greedy variants (default: --seeds)")
    p.add_argument("--learn-targets", default=None, help="targets for learned pruning (comma list; '' = none)")
    p.add_argument("--learn-widths", default=None, help="comma list of k for learned pruning")
    p.add_argument("--learn-widths-l3", default=None, help="k for learned pruning of the l3 target "
                   "(default: --learn-widths)")
    p.add_argument("--learn-seeds", default=None, help="comma list of seeds for learned pruning")
    p.add_argument("--learn-epochs", type=int, default=None)
    p.add_argument("--learn-objectives", default="distill,labels")
    p.add_argument("--density", type=float, default=0.5, help="kept fraction of the learned masks")
    p.add_argument("--lr", type=float, default=0.1, help="SGD lr of the scores (momentum 0.9, cosine)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit-train", type=int, default=None, help="use the first N training images (0 = all)")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images (0 = all)")
    p.add_argument("--eps", default=None, help="errors eps for the width-needed analysis (default logits: "
                   "0.5,1,2,4 logit errors; theorem: 0.5,0.25,0.1,0.05, relative to max |f_target|)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-bar", action="store_true", help="disable tqdm bars")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN: keep the points of its results.json, reuse its saved targets, run the rest")
    p.add_argument("--replot", default=None, metavar="RESULTS_JSON",
                   help="recompute the analysis and the PNG of an earlier run from its results.json, then exit")
    args = p.parse_args(argv)
    quick = args.quick
    theorem = args.setting == "theorem"
    defaults = dict(
        variants="single:1,greedy:1" if theorem else "single:1,single:matched,greedy:matched",
        eps="0.5,0.25,0.1,0.05" if theorem else "0.5,1,2,4",
        targets="l2,l3", seeds="0,1,2" if not quick else "0", greedy_seeds="0",
        target_epochs=3 if not quick else 1,
        construct_widths="2,4,8,16,32,64" if not quick else "2,8",
        learn_targets="" if theorem else "l2,l3" if not quick else "l2", learn_widths="1,6" if not quick else "1",
        learn_seeds="0", learn_epochs=2 if not quick else 1,
        limit_train=0 if not quick else 2000, limit_test=0 if not quick else 2000,
        run=("theorem" if theorem else "full") if not quick else ("quick-theorem" if theorem else "quick"),
        learn_widths_l3=None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_args(p, args)
    return args


OBJECTIVES = ("distill", "labels")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rejects bad options before any work, with argparse's exit code 2 and the flag in the message."""
    for flag, key in (("--targets", "targets"), ("--learn-targets", "learn_targets")):
        _common.option_list(p, flag, getattr(args, key), str, accepted=tuple(TARGETS), what="target")
    _common.option_list(p, "--learn-objectives", args.learn_objectives, str, accepted=OBJECTIVES, what="objective")
    for variant in names(args.variants):
        try:
            parse_variant(variant)
        except SystemExit as err:
            p.error(str(err))
    for flag, key in (("--seeds", "seeds"), ("--greedy-seeds", "greedy_seeds"), ("--learn-seeds", "learn_seeds")):
        _common.option_list(p, flag, getattr(args, key), int, low=0)
    for flag, key in (("--construct-widths", "construct_widths"), ("--learn-widths", "learn_widths"),
                      ("--learn-widths-l3", "learn_widths_l3")):
        if getattr(args, key):
            _common.option_list(p, flag, getattr(args, key), int, low=1)
    _common.check_minimum(p, args, {"target_epochs": 1, "learn_epochs": 1, "batch_size": 1, "limit_train": 0,
                                    "limit_test": 0, "threads": 0})
    if not 0.0 < args.density <= 1.0:
        p.error(f"--density: must be in (0, 1], got {args.density}")
    if args.setting == "theorem" and names(args.learn_targets):
        p.error("--learn-targets: learned masks are not run with --setting theorem (construction only); got "
                f"{args.learn_targets!r}")
    if not args.lr > 0.0:
        p.error(f"--lr: must be > 0, got {args.lr}")
    if not _common.option_list(p, "--eps", args.eps, float, low=1e-12):
        p.error(f"--eps: at least one positive number, got {args.eps!r}")


def parse_variant(text: str) -> tuple[str, float | str]:
    method, _, scale = text.partition(":")
    if method not in construct.METHODS:
        raise SystemExit(f"--variants: unknown method {method!r} in {text!r}; methods: {construct.METHODS}")
    if scale in ("", "1"):
        return method, 1.0
    if scale == "matched":
        return method, "matched"
    try:
        return method, float(scale)
    except ValueError:
        raise SystemExit(f"--variants: scale must be a number or 'matched', got {text!r}") from None


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "maskprune": maskprune.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------
# targets


def train_target(name: str, splits: data.Splits, epochs: int, seed: int, batch_size: int, bar: bool) -> tuple:
    """A dense, bias-free ReLU MLP trained with Adam (lr 1e-3, cosine) on the training split."""
    torch.manual_seed(seed)
    model = models.create("mlp", num_classes=10, in_shape=(1, 28, 28), bias=False, widths=list(TARGETS[name]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * math.ceil(len(splits.train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        it = data.iterate_batches(splits.train_x, splits.train_y, batch_size, shuffle=True, generator=gen)
        for xb, yb in tqdm(it, total=math.ceil(len(splits.train_x) / batch_size), disable=not bar, leave=False,
                           desc=f"target {name} epoch {epoch + 1}/{epochs}"):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    wall = time.perf_counter() - t0
    model.eval()
    return model, wall


@torch.no_grad()
def logits_of(fn, x: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def compare(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> dict:
    """Approximation error, agreement with the target's predictions and accuracy of logits `out`."""
    diff = (out - ref).abs()
    return {"max_abs_err": float(diff.max()), "mean_abs_err": float(diff.mean()),
            "agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
            "test_acc": float((out.argmax(1) == y).float().mean())}


@torch.no_grad()
def theorem_target(layers: list[nn.Linear], input_scale: float) -> tuple[nn.Sequential, dict]:
    """The target in the theorem's setting: a bias-free ReLU MLP on inputs x / input_scale (unit ball) whose
    layers have spectral norm <= 1.

    The first layer is multiplied by input_scale (so it computes the same pre-activations from x / R as the
    original from x), then each layer i is divided by s_i = max(1, ||W_i||_2). ReLU is positively homogeneous
    and there are no biases, so the result is the original target times 1 / prod(s_i): the same predictions.
    """
    mods: list[nn.Module] = [nn.Flatten()]
    norms_before, norms_after, factor = [], [], 1.0
    for i, layer in enumerate(layers):
        w = layer.weight.detach().clone().to(torch.float32)
        if i == 0:
            w = w * input_scale
        norm = float(torch.linalg.matrix_norm(w, ord=2))
        s_i = max(1.0, norm)
        w = w / s_i
        factor /= s_i
        norms_before.append(norm)
        norms_after.append(float(torch.linalg.matrix_norm(w, ord=2)))
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.copy_(w)
        lin.weight.requires_grad_(False)
        mods.append(lin)
        if i < len(layers) - 1:
            mods.append(nn.ReLU())
    info = {"input_scale": input_scale, "spectral_norms_before": norms_before, "spectral_norms_after": norms_after,
            "output_factor": factor, "weight_abs_max_rescaled": [float(m.weight.abs().max()) for m in mods
                                                                 if isinstance(m, nn.Linear)]}
    return nn.Sequential(*mods).eval(), info


# ---------------------------------------------------------------------------------------------------------------
# (ii) learned pruning over the same random network


def random_mlp(dims: list[int], width: int, seed: int, density: float) -> nn.Sequential:
    """The random depth-2l network of `construct` for this seed, each layer rescaled to Kaiming scale."""
    gen = torch.Generator().manual_seed(seed)
    ws = construct.random_network_weights(dims, width, generator=gen)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, w in enumerate(ws):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            # U[-1, 1] has variance 1/3; Kaiming (ReLU) for fan-in * density kept inputs wants 2 / (fan_in * density)
            lin.weight.copy_(w * math.sqrt(6.0 / (w.shape[1] * density)))
        layers.append(lin)
        if i < len(ws) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def learn_mask(model: nn.Module, objective: str, train_x, train_y, teacher_train: torch.Tensor,
               args, seed: int, desc: str, bar: bool) -> float:
    """Edge-popup: SGD on the scores (momentum 0.9, wd 5e-4, cosine), MSE on the target's logits or CE on labels."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    n = len(train_x)
    steps_per_epoch = math.ceil(n / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.learn_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(args.learn_epochs):
        order = torch.randperm(n, generator=gen)
        bar_it = tqdm(range(steps_per_epoch), disable=not bar, leave=False,
                      desc=f"{desc} epoch {epoch + 1}/{args.learn_epochs}")
        for step in bar_it:
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            out = model(train_x[idx])
            if objective == "distill":
                loss = F.mse_loss(out, teacher_train[idx])
            else:
                loss = F.cross_entropy(out, train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar_it.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# width needed for eps


def width_needed(points: list[dict], eps_list: list[float], key: str) -> list[dict]:
    """Smallest k (log-log interpolated, seed-averaged error) whose error `key` is <= eps, per eps."""
    ks = sorted({p["width"] for p in points})
    err = [sum(p[key] for p in points if p["width"] == k) / sum(1 for p in points if p["width"] == k) for k in ks]
    rows = []
    for eps in eps_list:
        k_needed = None
        for i, (k, e) in enumerate(zip(ks, err)):
            if e <= eps:
                if i == 0:
                    k_needed = float(k)
                else:
                    k0, e0 = ks[i - 1], err[i - 1]
                    if e0 > e > 0:
                        t = (math.log(e0) - math.log(eps)) / (math.log(e0) - math.log(e))
                        k_needed = math.exp(math.log(k0) + t * (math.log(k) - math.log(k0)))
                    else:
                        k_needed = float(k)
                break
        rows.append({"eps": eps, "width_needed": k_needed})
    return rows


def local_exponents(points: list[dict], key: str) -> list[dict]:
    """Between consecutive widths: b = Δ log k / Δ log(1/err) (the bound's form predicts b = 2)."""
    ks = sorted({p["width"] for p in points})
    err = [sum(p[key] for p in points if p["width"] == k) / sum(1 for p in points if p["width"] == k) for k in ks]
    rows = []
    for (k0, e0), (k1, e1) in zip(zip(ks, err), zip(ks[1:], err[1:])):
        b = math.log(k1 / k0) / math.log(e0 / e1) if e0 > e1 > 0 else None
        rows.append({"from_width": k0, "to_width": k1, "err_from": e0, "err_to": e1, "exponent": b})
    return rows


def analyse(results: dict, eps_list: list[float]) -> None:
    """Fills results["width_needed"]: width needed per eps, fitted and local exponents, per target and variant."""
    results["width_needed"] = {}
    results["exponent_labels"] = EXPONENT_LABELS
    theorem = results.get("config", {}).get("setting") == "theorem"
    key_max = "rel_max_err" if theorem else "max_abs_err"   # theorem: eps relative to max |f_target| (scale-free)
    key_mean = "rel_mean_err" if theorem else "mean_abs_err"
    for tname in results["targets"]:
        variants = sorted({p["variant"] for p in results["points"] if p["target"] == tname and p["kind"] == "construct"})
        for variant in variants:
            pts = [p for p in results["points"] if p["target"] == tname and p["kind"] == "construct"
                   and p["variant"] == variant]
            results["width_needed"][f"{tname}/{variant}"] = {
                "eps_key": key_max,
                "max_abs_err": width_needed(pts, eps_list, key_max),
                "mean_abs_err": width_needed(pts, [e / 10 for e in eps_list], key_mean),
                "fitted_exponent_max": fit_exponent(pts, "max_abs_err"),
                "fitted_exponent_mean": fit_exponent(pts, "mean_abs_err"),
                "local_exponents_max": local_exponents(pts, "max_abs_err"),
                "local_exponents_mean": local_exponents(pts, "mean_abs_err")}


def fit_exponent(points: list[dict], key: str) -> float | None:
    """Least-squares slope b of log k = a + b log(1/err) over the seed-averaged errors (the bound's form: b = 2)."""
    ks = sorted({p["width"] for p in points})
    xs, ys = [], []
    for k in ks:
        vals = [p[key] for p in points if p["width"] == k]
        e = sum(vals) / len(vals)
        if e > 0:
            xs.append(math.log(1 / e))
            ys.append(math.log(k))
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else None


# ---------------------------------------------------------------------------------------------------------------
# plot


def plot(results: dict, path: Path) -> None:
    plt = _common.pyplot("approximate_target")
    if plt is None:
        return
    from matplotlib.ticker import FuncFormatter, NullFormatter

    tnames = list(results["targets"])
    fig, axes = plt.subplots(len(tnames), 3, figsize=(17, 4.6 * len(tnames)), squeeze=False)
    variants = sorted({(p["kind"], p["variant"]) for p in results["points"]}, key=lambda kv: (kv[0], kv[1]))
    colors = {kv: f"C{i}" for i, kv in enumerate(variants)}
    labels = {"distill": "edge-popup, distill logits (MSE)", "labels": "edge-popup, labels (CE)"}

    def label_of(kind, variant):
        if kind == "learned":
            return labels.get(variant, f"edge-popup, {variant}")
        method, _, scale = variant.partition(":")
        return f"construction {method} ({'U[-1,1]' if scale in ('', '1', '1.0') else scale + ' scale'})"

    def mean_by(sel, key, metric):
        xs = sorted({p[key] for p in sel})
        return xs, [sum(p[metric] for p in sel if p[key] == x) / sum(1 for p in sel if p[key] == x) for x in xs]

    for row, tname in enumerate(tnames):
        target = results["targets"][tname]
        pts = [p for p in results["points"] if p["target"] == tname]
        for col, metric in enumerate(("test_acc", "agreement")):
            ax = axes[row][col]
            for kind, variant in variants:
                sel = [p for p in pts if p["kind"] == kind and p["variant"] == variant]
                if not sel:
                    continue
                marker = "o" if kind == "construct" else "^"
                xs, mean = mean_by(sel, "random_weights", metric)
                # plotted as error rates on a log axis: 100 - accuracy, 100 - agreement
                ax.scatter([p["random_weights"] for p in sel], [100 * (1 - p[metric]) for p in sel],
                           color=colors[(kind, variant)], marker=marker, alpha=0.35, s=18)
                ax.plot(xs, [100 * (1 - m) for m in mean], color=colors[(kind, variant)], marker=marker,
                        label=label_of(kind, variant))
            if metric == "test_acc":
                err = 100 * (1 - target["test_acc"])
                ax.axhline(err, color="k", ls="--", lw=1, label=f"target {100 - err:.2f}% acc")
                ax.axhline(err + 0.5, color="k", ls=":", lw=1, label="target - 0.5 points")
            ax.axvline(8.34e6, color="gray", ls="-.", lw=1, label="8.34M (Pensia et al.)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("weights of the random depth-2l network")
            ax.set_ylabel("test error (%) = 100 - accuracy" if metric == "test_acc"
                          else "disagreement with the target (%)")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "1235" else ""))
            ax.set_title(f"{tname}: target {target['arch']}: "
                         f"{'test error' if metric == 'test_acc' else 'disagreement with target'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
        ax = axes[row][2]
        if not any(p["kind"] == "construct" for p in pts):
            ax.set_axis_off()
            continue
        for kind, variant in variants:
            sel = [p for p in pts if p["kind"] == kind == "construct" and p["variant"] == variant]
            if not sel:
                continue
            for key, ls in (("max_abs_err", "-"), ("mean_abs_err", "--")):
                ks, m = mean_by(sel, "width", key)
                ax.plot(ks, m, color=colors[(kind, variant)], ls=ls, marker="o",
                        label=f"{label_of(kind, variant)}: {key.split('_')[0]}")
            if variant.startswith("single"):
                ks, m = mean_by(sel, "width", "max_abs_err")
                ax.plot(ks, [m[-1] * (k / ks[-1]) ** (-1 / PAPER_EPS_EXPONENT) for k in ks],
                        color=colors[(kind, variant)], ls=":", lw=1)
        ax.plot([], [], color="k", ls=":", lw=1, label="assumed eps ∝ k^-1/2, our reading (through the last point)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("k (random neurons per target input unit)")
        ax.set_ylabel("|f_sub - f_target| over the test inputs")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "125" else ""))
        ax.set_title(f"{tname}: construction error vs width (solid max, dashed mean)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle("Malach et al. 2020: subnetworks of a random depth-2l network approximating a depth-l MNIST target")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        results = json.loads(path.read_text())
        analyse(results, [float(e) for e in results["config"]["eps"].split(",")])
        path.write_text(json.dumps(results, indent=1))
        plot(results, path.parent / "approximate_target.png")
        print(f"rewrote {path} and {path.parent / 'approximate_target.png'}")
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    bar = not args.no_bar and sys.stderr.isatty()
    run_dir = Path(args.out) / args.run
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    splits = data.load("mnist").normalize()
    train_x, train_y = splits.train_x.flatten(1), splits.train_y
    test_x, test_y = splits.test_x.flatten(1), splits.test_y
    if args.limit_train:
        train_x, train_y = train_x[:args.limit_train], train_y[:args.limit_train]
    if args.limit_test:
        test_x, test_y = test_x[:args.limit_test], test_y[:args.limit_test]
    train_split = data.Splits(train_x, train_y, splits.val_x, splits.val_y, test_x, test_y, 10, (1, 28, 28),
                              "mnist", True)
    theorem = args.setting == "theorem"
    # theorem setting: one constant R brings every input of the three splits into the unit ball
    input_scale = float(max(t.flatten(1).norm(dim=1).max() for t in (splits.train_x, splits.val_x, splits.test_x)))

    results = {"config": vars(args), "device": "cpu", "versions": versions(), "targets": {}, "points": [],
               "width_needed": {}, "paper_eps_exponent": PAPER_EPS_EXPONENT}
    out_json = run_dir / "results.json"
    done = set()
    if args.resume and out_json.is_file():
        previous = json.loads(out_json.read_text())
        results["targets"], results["points"] = previous["targets"], previous["points"]
        results["resumed"] = previous.get("resumed", 0) + 1
        results["wall_time_earlier_invocations_s"] = (previous.get("wall_time_earlier_invocations_s", 0.0)
                                                      + previous.get("wall_time_s", 0.0))
        done = {(p["target"], p["kind"], p["variant"], p["width"], p["seed"]) for p in results["points"]}
        print(f"resuming {out_json}: {len(done)} points done", flush=True)

    def save():
        results["wall_time_s"] = time.perf_counter() - t_start  # this invocation; earlier ones (--resume) apart
        out_json.write_text(json.dumps(results, indent=1))

    eps_list = [float(e) for e in args.eps.split(",")]
    learn_targets = names(args.learn_targets)
    for tname in names(args.targets):
        target_file = run_dir / f"target_{tname}.pt"
        if args.resume and target_file.is_file():
            target = models.create("mlp", num_classes=10, in_shape=(1, 28, 28), bias=False, widths=list(TARGETS[tname]))
            target.load_state_dict(torch.load(target_file, weights_only=True))
            target.eval()
            t_wall = results["targets"].get(tname, {}).get("train_wall_s", float("nan"))
        else:
            target, t_wall = train_target(tname, train_split, args.target_epochs, seed=0, batch_size=128, bar=bar)
            torch.save(target.state_dict(), target_file)
        layers = construct.target_layers(target)
        dims = [layers[0].in_features] + [l.out_features for l in layers]
        ref_test = logits_of(target, test_x)
        eval_x = test_x
        theorem_info = {}
        if theorem:
            target_fn, theorem_info = theorem_target(layers, input_scale)
            layers = construct.target_layers(target_fn)
            eval_x = test_x / input_scale
            ref_test = logits_of(target_fn, eval_x)
            theorem_info["test_input_norm_max"] = float(eval_x.norm(dim=1).max())
            theorem_info["target_abs_max_on_test"] = float(ref_test.abs().max())
        if tname in results["targets"]:  # resumed: the retrained (or reloaded) target must be the same network
            before = results["targets"][tname]["test_acc"]
            now = float((ref_test.argmax(1) == test_y).float().mean())
            if abs(before - now) > 1e-9:
                raise SystemExit(f"--resume: target {tname} now has test acc {now} instead of {before}")
        tinfo = {"arch": "-".join(map(str, dims)), "depth": len(layers), "weights": sum(l.weight.numel() for l in layers),
                 "test_acc": float((ref_test.argmax(1) == test_y).float().mean()), "train_wall_s": t_wall,
                 "epochs": args.target_epochs, "seed": 0, "logit_abs_mean": float(ref_test.abs().mean()),
                 "logit_abs_max": float(ref_test.abs().max()),
                 "weight_abs_max": [float(l.weight.detach().abs().max()) for l in layers],
                 "setting": args.setting, **theorem_info}
        results["targets"][tname] = tinfo
        print(f"[target {tname}] {tinfo['arch']}: test acc {100 * tinfo['test_acc']:.2f}% ({t_wall:.0f}s)", flush=True)
        save()

        # (i) construction
        grid = [(v, k, s) for v in names(args.variants) for k in ints(args.construct_widths)
                for s in ints(args.greedy_seeds if v.startswith("greedy") else args.seeds)]
        for variant, k, seed in tqdm(grid, desc=f"construct {tname}", disable=not bar):
            method, scale = parse_variant(variant)
            if (tname, "construct", variant, k, seed) in done:
                continue
            t0 = time.perf_counter()
            c = construct.construct_subnetwork(layers, k, method=method, scale=scale,
                                               generator=torch.Generator().manual_seed(seed))
            build = time.perf_counter() - t0
            out = logits_of(c.forward_sparse, eval_x)
            point = {"target": tname, "kind": "construct", "variant": variant, "method": method, "scale": scale,
                     "width": k, "seed": seed,
                     "random_weights": c.random_weights, "kept_weights": c.kept_weights,
                     "wall_time_s": time.perf_counter() - t0, "build_time_s": build, "device": "cpu",
                     "weight_error": c.weight_error, "setting": args.setting, **compare(out, ref_test, test_y)}
            point["rel_max_err"] = point["max_abs_err"] / float(ref_test.abs().max())
            point["rel_mean_err"] = point["mean_abs_err"] / float(ref_test.abs().max())
            results["points"].append(point)
            print(f"[construct {tname} {variant} k={k} seed={seed}] {c.random_weights / 1e6:.2f}M random, "
                  f"{c.kept_weights / 1e3:.0f}k kept: acc {100 * point['test_acc']:.2f}% agree "
                  f"{100 * point['agreement']:.2f}% max err {point['max_abs_err']:.3f} mean err "
                  f"{point['mean_abs_err']:.4f} ({point['wall_time_s']:.1f}s)", flush=True)
            del c
            save()
        analyse(results, eps_list)
        save()

        plot(results, run_dir / "approximate_target.png")

        # (ii) learned pruning
        if tname not in learn_targets:
            continue
        teacher_train = logits_of(target, train_x)
        widths = args.learn_widths_l3 if tname == "l3" and args.learn_widths_l3 else args.learn_widths
        grid = [(k, s, o) for k in ints(widths) for s in ints(args.learn_seeds)
                for o in names(args.learn_objectives)]
        for k, seed, objective in grid:
            if (tname, "learned", objective, k, seed) in done:
                continue
            torch.manual_seed(seed)
            model = random_mlp(dims, k, seed, args.density)
            convert(model, args.density, weight_init=None)
            total = mask_stats(model)["total"]
            wall = learn_mask(model, objective, train_x, train_y, teacher_train, args, seed,
                              f"learn {tname} k={k} {objective}", bar)
            out = logits_of(model, test_x)
            stats = mask_stats(model)
            point = {"target": tname, "kind": "learned", "variant": objective, "width": k, "seed": seed,
                     "random_weights": total, "kept_weights": stats["kept"], "density": args.density,
                     "epochs": args.learn_epochs, "wall_time_s": wall, "device": "cpu", **compare(out, ref_test, test_y)}
            results["points"].append(point)
            print(f"[learned {tname} {objective} k={k} seed={seed}] {total / 1e6:.2f}M random: acc "
                  f"{100 * point['test_acc']:.2f}% agree {100 * point['agreement']:.2f}% max err "
                  f"{point['max_abs_err']:.3f} mean err {point['mean_abs_err']:.4f} ({wall:.0f}s)", flush=True)
            del model
            save()
            plot(results, run_dir / "approximate_target.png")

    save()
    plot(results, run_dir / "approximate_target.png")
    print(f"wrote {out_json} and {run_dir / 'approximate_target.png'} in {time.perf_counter() - t_start:.0f}s")
    return results


if __name__ == "__main__":
    main()
