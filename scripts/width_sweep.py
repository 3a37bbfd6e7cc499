"""Weight subnetworks vs neuron subnetworks vs random features, against width (Malach et al., ICML 2020).

One-hidden-layer ReLU networks x -> width -> out, at each width and seed, four methods:

  dense    all weights trained (Adam), PyTorch's default init, biases.
  weight   edge-popup: frozen random weights (signed constant by default), scores on every weight of
           both layers, top-`density` kept per layer (maskprune.convert), SGD on the scores.
  neuron   frozen random weights, one score per hidden neuron, top-`density` neurons kept
           (maskprune.neuron.NeuronMask), SGD on the scores.
  rf       random features: the first layer frozen at the same random init, the output layer trained (Adam).

Tasks: MNIST and Fashion-MNIST (test accuracy) and the synthetic single ReLU neuron
y = ReLU(<w*, x>), x ~ N(0, I_d), |w*| = 1 (test MSE; predicting the mean scores Var(y) = 1/2 - 1/(2 pi)),
which random features need exponentially many features in d to fit (Yehudai & Shamir 2019).
The paper predicts: weight subnetworks approach dense as width grows; neuron subnetworks stay at or
below random features.

Writes results/width_sweep/<run>/results.json (after every point) and width_sweep.png.
"""
from __future__ import annotations

import argparse
import math
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
from maskprune import data as datasets  # noqa: E402
from maskprune.neuron import neuron_stats, neuron_subnetwork_mlp  # noqa: E402
from maskprune.nn import init_weight  # noqa: E402

METHODS = ("dense", "weight", "neuron", "rf")
TASKS = ("mnist", "fashion-mnist", "synthetic")
LABELS = {"dense": "dense (trained)", "weight": "weight subnetwork (edge-popup)",
          "neuron": "neuron subnetwork", "rf": "random features"}
SYNTH_VAR = 0.5 - 1.0 / (2.0 * math.pi)  # Var(ReLU(g)), g ~ N(0, 1): the MSE of predicting the mean


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (CI smoke run, < 3 min on CPU)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--widths", default="64,128,256,512,1024,2048",
                   help="hidden widths (the issue's grid is 64..8192; the default is what fits a 2-core CPU budget)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=2, help="epochs on MNIST / Fashion-MNIST")
    p.add_argument("--train-limit", type=int, default=20000, help="training examples used (0 = all)")
    p.add_argument("--test-limit", type=int, default=0, help="test examples used (0 = all 10k)")
    p.add_argument("--synth-dim", type=int, default=100)
    p.add_argument("--synth-train", type=int, default=20000)
    p.add_argument("--synth-test", type=int, default=5000)
    p.add_argument("--synth-epochs", type=int, default=10)
    p.add_argument("--density", type=float, default=0.5, help="fraction kept by weight and neuron subnetworks")
    p.add_argument("--weight-init", default="signed_constant", choices=maskprune.nn.WEIGHT_INITS,
                   help="frozen random weights of the weight/neuron subnetworks and random features")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--mask-lr", type=float, default=0.1, help="SGD (momentum 0.9, cosine) on scores")
    p.add_argument("--mask-wd", type=float, default=5e-4)
    p.add_argument("--adam-lr", type=float, default=1e-3, help="Adam (cosine) for dense and random features")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = leave torch's default)")
    p.add_argument("--run", default=None, help="run name (default: UTC time)")
    p.add_argument("--out", default=None, help="output folder (default results/width_sweep/<run>)")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.seeds, args.epochs = "16,64", "0,1", 1
        args.train_limit, args.test_limit = 1000, 1000
        args.synth_dim, args.synth_train, args.synth_test, args.synth_epochs = 20, 1000, 500, 3
        args.run = args.run or "quick"
    args.tasks = _common.option_list(p, "--tasks", args.tasks, str, accepted=TASKS, what="task")
    args.methods = _common.option_list(p, "--methods", args.methods, str, accepted=METHODS, what="method")
    args.widths = _common.option_list(p, "--widths", args.widths, int, low=1)
    args.seeds = _common.option_list(p, "--seeds", args.seeds, int, low=0)
    _common.check_minimum(p, args, {"epochs": 1, "synth_epochs": 1, "batch_size": 1, "synth_dim": 1,
                                    "synth_train": 1, "synth_test": 1, "train_limit": 0, "test_limit": 0,
                                    "threads": 0})
    if not 0.0 < args.density <= 1.0:
        p.error(f"--density: must be in (0, 1], got {args.density}")
    return args


# ---------------------------------------------------------------------------------------------
# data

def load_task(task: str, args) -> dict:
    """{'train': (x, y), 'test': (x, y), 'in': d, 'out': k, 'kind': 'class'|'regress'}."""
    if task == "synthetic":
        g = torch.Generator().manual_seed(12345)  # the task is fixed; seeds vary the networks
        d = args.synth_dim
        w_star = torch.randn(d, generator=g)
        w_star /= w_star.norm()
        def sample(n):
            x = torch.randn(n, d, generator=g)
            return x, torch.relu(x @ w_star).unsqueeze(1)
        return {"train": sample(args.synth_train), "test": sample(args.synth_test), "in": d, "out": 1,
                "kind": "regress"}
    splits = datasets.load(task).normalize()
    tx, ty = splits.train_x.flatten(1), splits.train_y
    if args.train_limit:
        tx, ty = tx[:args.train_limit], ty[:args.train_limit]
    ex, ey = splits.test_x.flatten(1), splits.test_y
    if args.test_limit:
        ex, ey = ex[:args.test_limit], ey[:args.test_limit]
    return {"train": (tx, ty), "test": (ex, ey), "in": tx.shape[1], "out": splits.num_classes, "kind": "class"}


# ---------------------------------------------------------------------------------------------
# the four methods

def build(method: str, d_in: int, width: int, d_out: int, args) -> tuple[nn.Module, torch.optim.Optimizer]:
    if method == "dense":
        model = nn.Sequential(nn.Flatten(), nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, d_out))
        opt = torch.optim.Adam(model.parameters(), lr=args.adam_lr)
    elif method == "rf":
        hidden = nn.Linear(d_in, width, bias=False)
        init_weight(hidden.weight, args.weight_init)
        hidden.weight.requires_grad_(False)
        model = nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), nn.Linear(width, d_out))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.adam_lr)
    elif method == "weight":
        model = nn.Sequential(nn.Flatten(), nn.Linear(d_in, width, bias=False), nn.ReLU(),
                              nn.Linear(width, d_out, bias=False))
        maskprune.convert(model, args.density, weight_init=args.weight_init)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.mask_lr, momentum=0.9,
                              weight_decay=args.mask_wd)
    else:
        model = neuron_subnetwork_mlp(d_in, width, d_out, density=args.density, weight_init=args.weight_init)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.mask_lr, momentum=0.9,
                              weight_decay=args.mask_wd)
    return model, opt


def run_point(task: str, tdata: dict, method: str, width: int, seed: int, args) -> dict:
    _common.seed_everything(seed)
    model, opt = build(method, tdata["in"], width, tdata["out"], args)
    regress = tdata["kind"] == "regress"
    loss_fn = F.mse_loss if regress else F.cross_entropy
    epochs = args.synth_epochs if regress else args.epochs
    t0 = time.perf_counter()
    train_loss = _common.fit(model, opt, *tdata["train"], epochs=epochs, batch_size=args.batch_size,
                             loss_fn=loss_fn, seed=seed)
    ex, ey = tdata["test"]
    out = _common.predict(model, ex)
    point = {"task": task, "method": method, "width": width, "seed": seed, "epochs": epochs,
             "train_loss": train_loss}
    if regress:
        mse = F.mse_loss(out, ey).item()
        point.update(metric="test_mse", value=mse, test_mse=mse, test_mse_over_var=mse / SYNTH_VAR)
    else:
        acc = (out.argmax(1) == ey).float().mean().item()
        point.update(metric="test_acc", value=acc, test_acc=acc)
    params = list(model.parameters())
    point["trainable"] = sum(p.numel() for p in params if p.requires_grad)
    point["frozen_weights"] = sum(p.numel() for p in params if not p.requires_grad)
    if method == "weight":
        point["kept_fraction"] = maskprune.mask_stats(model)["fraction"]
    elif method == "neuron":
        point["kept_fraction"] = neuron_stats(model)["fraction"]
    point["wall_s"] = round(time.perf_counter() - t0, 3)
    return point


# ---------------------------------------------------------------------------------------------
# summary and plot

def summarize(points: list[dict]) -> list[dict]:
    """Mean/std/min/max over seeds per (task, method, width)."""
    groups: dict[tuple, list[float]] = {}
    for p in points:
        groups.setdefault((p["task"], p["method"], p["width"]), []).append(p["value"])
    rows = []
    for (task, method, width), values in sorted(groups.items(), key=lambda kv: (TASKS.index(kv[0][0]),
                                                                                 METHODS.index(kv[0][1]), kv[0][2])):
        finite = [v for v in values if math.isfinite(v)]
        mean, std = _common.mean_std(finite) if finite else (float("nan"), float("nan"))
        rows.append({"task": task, "method": method, "width": width, "n_seeds": len(values), "mean": mean,
                     "std": std, "min": min(finite, default=float("nan")), "max": max(finite, default=float("nan"))})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in METHODS:
            rs = sorted((r for r in rows if r["task"] == task and r["method"] == method), key=lambda r: r["width"])
            if not rs:
                continue
            w = [r["width"] for r in rs]
            m = [r["mean"] for r in rs]
            line, = ax.plot(w, m, marker="o", label=LABELS[method])
            ax.fill_between(w, [r["min"] for r in rs], [r["max"] for r in rs], color=line.get_color(), alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden width")
        if task == "synthetic":
            ax.set_yscale("log")
            mean_line = ax.axhline(SYNTH_VAR, color="gray", ls="--", lw=1, label="predict the mean")
            ax.legend(handles=[mean_line], fontsize=8, loc="lower left")
            ax.set_ylabel("test MSE (lower is better)")
            ax.set_title("single ReLU neuron, x ~ N(0, I)")
        else:
            ax.set_ylabel("test accuracy")
            ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("one-hidden-layer random ReLU networks: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> Path:
    args = parse_args(argv)
    _common.setup_threads(args.threads)
    folder = _common.run_dir("width_sweep", args.run, args.out)
    config = {k: v for k, v in vars(args).items()}
    config["issue_grid"] = {"widths": [2 ** k for k in range(6, 14)], "seeds": 3}
    results = _common.Results(folder, config)
    tdata = {task: load_task(task, args) for task in args.tasks}
    grid = [(seed, task, width, method) for seed in args.seeds for task in args.tasks for width in args.widths
            for method in args.methods]
    # seeds outermost: a run cut off early still has whole curves, with fewer seeds
    for seed, task, width, method in tqdm(grid, desc="width_sweep", dynamic_ncols=True, mininterval=5):
        point = run_point(task, tdata[task], method, width, seed, args)
        results.add(point)
        tqdm.write(f"{task:14s} {method:7s} width {width:5d} seed {seed}  {point['metric']} {point['value']:.4f}"
                   f"  ({point['wall_s']:.1f}s)")
        if len(results.points) % len(args.methods) == 0:
            results.record["summary"] = summarize(results.points)
            plot(results.record["summary"], folder / "width_sweep.png")
    results.record["summary"] = summarize(results.points)
    plot(results.record["summary"], folder / "width_sweep.png")
    results.finish()
    print(f"wrote {results.path} and {folder / 'width_sweep.png'}")
    return folder


if __name__ == "__main__":
    main()
