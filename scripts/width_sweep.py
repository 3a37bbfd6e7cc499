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

`--mode theorem` (issue 16) tests Malach et al.'s two claims as stated, with a tuned search for every method:

  "First, we show that a ReLU network of arbitrary depth l can be approximated by finding a
  weight-subnetwork of a random network of depth 2l and sufficient width." (Malach et al. 2020, Sec. 1)

Depth counts weight layers, as in the paper's F(x) = W_l s(... s(W_1 x)) and in maskprune.construct: the
target is a depth-l = 2 network x -> width -> out (one hidden layer); a random network of depth 2l = 4 is
x -> width -> width -> width -> out (three hidden layers, all of the sweep's width). Methods, all bias-free
(the theorem's networks have no biases, so none of the methods has any):

  dense        depth 2, all weights trained, SGD (momentum 0.9, weight decay --mask-wd, cosine)
  dense_adam   depth 2, all weights trained, Adam (cosine), the family the legacy sweep used
  rf           random features, depth 2: first layer frozen at the random init, output layer trained (SGD)
  rf_adam      the same with Adam
  weight_2l    weight subnetwork (edge-popup scores, top --density per layer) of a random DEPTH-4 network:
               the theorem's setting
  weight_l     weight subnetwork of a random depth-2 network: the edge-popup comparison, NOT covered by the
               theorem (a random network of the target's own depth)
  neuron       neuron subnetwork, depth 2 (one score per hidden neuron): the paper's second claim, stated for
               depth-two networks, compares neuron subnetworks with random features

Frozen random weights are --weight-init (theorem mode default kaiming_uniform: i.i.d. U[-a, a], the theorem's
U[-1, 1] up to one positive factor per layer, which for bias-free ReLU networks scales the output only);
masks use edge-popup's density-scaled fan. Every method is searched at every width over its learning-rate
grid (--score-lrs for weight_2l/weight_l/neuron, --sgd-lrs for dense/rf, --adam-lrs for dense_adam/rf_adam)
with --search-seed, the lr with the best VALIDATION accuracy (maskprune.data's val split, never test) is
kept, and the other --seeds are trained at that lr. Each point records method, width, depth, seed, lr and
grid, epochs, train loss, val and test accuracy and, for the masks, the fraction of each layer's mask bits
that changed from the initial mask. `--convergence-epochs E1,E2` then trains every method at the largest
width on all training data for E1 and for E2 epochs at its chosen lr, recording the train loss of every
epoch, to show whether the ranking of methods changes between the two budgets. `--estimate` times a few
steps of every (method, width) and prints the run's expected cost without running it; `--combine` merges
the results.json of runs made in parallel (e.g. weight_2l in one process, the rest in another).
"""
from __future__ import annotations

import argparse
import json
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
from maskprune.neuron import NeuronMask, neuron_stats, neuron_subnetwork_mlp  # noqa: E402
from maskprune.nn import init_weight, masked_layers  # noqa: E402

METHODS = ("dense", "weight", "neuron", "rf")
TASKS = ("mnist", "fashion-mnist", "synthetic")
LABELS = {"dense": "dense (trained)", "weight": "weight subnetwork (edge-popup)",
          "neuron": "neuron subnetwork", "rf": "random features"}
SYNTH_VAR = 0.5 - 1.0 / (2.0 * math.pi)  # Var(ReLU(g)), g ~ N(0, 1): the MSE of predicting the mean

MODES = ("legacy", "theorem")
THEOREM_METHODS = ("dense", "dense_adam", "rf", "rf_adam", "weight_2l", "weight_l", "neuron")
THEOREM_TASKS = ("mnist", "fashion-mnist")
THEOREM_LABELS = {
    "dense": "dense, depth 2 (SGD)", "dense_adam": "dense, depth 2 (Adam)",
    "rf": "random features, depth 2 (SGD)", "rf_adam": "random features, depth 2 (Adam)",
    "weight_2l": "weight subnetwork, random depth 4 = 2l (theorem)",
    "weight_l": "weight subnetwork, random depth 2 = l (edge-popup; not the theorem)",
    "neuron": "neuron subnetwork, depth 2"}
THEOREM_DEPTH = {m: (4 if m == "weight_2l" else 2) for m in THEOREM_METHODS}   # weight layers
OPTIMIZER = {"dense": "sgd", "dense_adam": "adam", "rf": "sgd", "rf_adam": "adam", "weight_2l": "sgd",
             "weight_l": "sgd", "neuron": "sgd"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (CI smoke run, < 3 min on CPU)")
    p.add_argument("--mode", default="legacy", choices=MODES,
                   help="legacy: the first sweep (fixed lrs, depth 1 hidden layer); theorem: issue 16's tuned "
                        "sweep of the theorem's setting (see the module docstring)")
    p.add_argument("--tasks", default=None, help=f"legacy: {','.join(TASKS)}; theorem: of {','.join(THEOREM_TASKS)} "
                   "(default: all legacy tasks / mnist)")
    p.add_argument("--methods", default=None, help=f"legacy: of {','.join(METHODS)}; theorem: of "
                   f"{','.join(THEOREM_METHODS)} (default: all of the mode's)")
    p.add_argument("--widths", default=None,
                   help="hidden widths (default legacy 64..2048, theorem 64..4096; the issue's grid is 64..4096/8192)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=2, help="epochs on MNIST / Fashion-MNIST")
    p.add_argument("--train-limit", type=int, default=20000, help="training examples used (0 = all)")
    p.add_argument("--val-limit", type=int, default=0, help="theorem: validation examples used (0 = all 10k)")
    p.add_argument("--score-lrs", default="0.1,0.3,1,3,10",
                   help="theorem: SGD lr grid of the scores (weight_2l, weight_l, neuron)")
    p.add_argument("--sgd-lrs", default="0.0003,0.001,0.003,0.01,0.03,0.1,0.3",
                   help="theorem: SGD lr grid of dense and rf (wide: SGD on random features diverges above ~1/width)")
    p.add_argument("--adam-lrs", default="0.0001,0.0003,0.001,0.003,0.01",
                   help="theorem: Adam lr grid of dense_adam and rf_adam")
    p.add_argument("--search-seed", type=int, default=0,
                   help="theorem: the seed of the lr search (its run at the chosen lr is one of --seeds when listed)")
    p.add_argument("--convergence-epochs", default="",
                   help="theorem: two (or more) epoch budgets, e.g. 3,6: every method at the largest width, all "
                        "training data, its chosen lr, train loss per epoch ('' = none)")
    p.add_argument("--convergence-width", type=int, default=0,
                   help="theorem: width of the convergence runs (0 = the largest of --widths)")
    p.add_argument("--convergence-only", action="store_true",
                   help="theorem: no search; only the convergence runs, at the lrs chosen in --lr-from")
    p.add_argument("--lr-from", default=None, metavar="JSON,JSON",
                   help="theorem, with --convergence-only: results.json files whose searches chose the lrs")
    p.add_argument("--convergence-train-limit", type=int, default=0, help="theorem: training examples of the "
                   "convergence runs (0 = all)")
    p.add_argument("--estimate", action="store_true",
                   help="theorem: time --estimate-steps steps of each (method, width), print the run's expected "
                        "cost on this machine, and exit without writing anything")
    p.add_argument("--estimate-steps", type=int, default=8)
    p.add_argument("--combine", default=None, metavar="JSON,JSON",
                   help="theorem: merge the results.json of runs made in parallel into --run, then exit")
    p.add_argument("--test-limit", type=int, default=0, help="test examples used (0 = all 10k)")
    p.add_argument("--synth-dim", type=int, default=100)
    p.add_argument("--synth-train", type=int, default=20000)
    p.add_argument("--synth-test", type=int, default=5000)
    p.add_argument("--synth-epochs", type=int, default=10)
    p.add_argument("--density", type=float, default=0.5, help="fraction kept by weight and neuron subnetworks")
    p.add_argument("--weight-init", default=None, choices=maskprune.nn.WEIGHT_INITS,
                   help="frozen random weights of the weight/neuron subnetworks and random features "
                        "(default: legacy signed_constant, theorem kaiming_uniform)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--mask-lr", type=float, default=0.1, help="SGD (momentum 0.9, cosine) on scores")
    p.add_argument("--mask-wd", type=float, default=5e-4)
    p.add_argument("--adam-lr", type=float, default=1e-3, help="Adam (cosine) for dense and random features")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = leave torch's default)")
    p.add_argument("--run", default=None, help="run name (default: UTC time)")
    p.add_argument("--out", default=None, help="output folder (default results/width_sweep/<run>)")
    args = p.parse_args(argv)
    theorem = args.mode == "theorem"
    if args.tasks is None:
        args.tasks = "mnist" if theorem else ",".join(TASKS)
    if args.methods is None:
        args.methods = ",".join(THEOREM_METHODS if theorem else METHODS)
    if args.widths is None:
        args.widths = "64,128,256,512,1024,2048,4096" if theorem else "64,128,256,512,1024,2048"
    if args.weight_init is None:
        args.weight_init = "kaiming_uniform" if theorem else "signed_constant"
    if args.quick:
        args.widths, args.seeds, args.epochs = ("16,32", "0,1", 1) if theorem else ("16,64", "0,1", 1)
        args.train_limit, args.test_limit = 1000, 1000
        args.synth_dim, args.synth_train, args.synth_test, args.synth_epochs = 20, 1000, 500, 3
        if theorem:
            args.val_limit, args.convergence_train_limit = 500, 1000
            args.score_lrs, args.sgd_lrs, args.adam_lrs = "0.3,3", "0.01,0.1", "0.001,0.01"
            args.convergence_epochs = args.convergence_epochs or "1,2"
        args.run = args.run or "quick"
    if theorem:
        args.tasks = _common.option_list(p, "--tasks", args.tasks, str, accepted=THEOREM_TASKS, what="task "
                                         "(theorem mode)")
        args.methods = _common.option_list(p, "--methods", args.methods, str, accepted=THEOREM_METHODS,
                                           what="method (theorem mode)")
    else:
        args.tasks = _common.option_list(p, "--tasks", args.tasks, str, accepted=TASKS, what="task")
        args.methods = _common.option_list(p, "--methods", args.methods, str, accepted=METHODS, what="method")
    args.widths = _common.option_list(p, "--widths", args.widths, int, low=1)
    args.seeds = _common.option_list(p, "--seeds", args.seeds, int, low=0)
    for flag in ("--score-lrs", "--sgd-lrs", "--adam-lrs"):
        dest = flag[2:].replace("-", "_")
        values = _common.option_list(p, flag, getattr(args, dest), float, low=1e-12, high=1e3)
        if not values:
            p.error(f"{flag}: at least one learning rate, got {getattr(args, dest)!r}")
        setattr(args, dest, values)
    args.convergence_epochs = _common.option_list(p, "--convergence-epochs", args.convergence_epochs, int, low=1)
    if len(args.convergence_epochs) == 1:
        p.error("--convergence-epochs: give at least two budgets (the ranking is compared between them), "
                f"got {args.convergence_epochs}")
    _common.check_minimum(p, args, {"epochs": 1, "synth_epochs": 1, "batch_size": 1, "synth_dim": 1,
                                    "synth_train": 1, "synth_test": 1, "train_limit": 0, "test_limit": 0,
                                    "val_limit": 0, "convergence_train_limit": 0, "search_seed": 0,
                                    "convergence_width": 0,
                                    "estimate_steps": 1, "threads": 0})
    if not 0.0 < args.density <= 1.0:
        p.error(f"--density: must be in (0, 1], got {args.density}")
    if not theorem:
        for flag, value in (("--estimate", args.estimate), ("--combine", args.combine),
                            ("--convergence-epochs", args.convergence_epochs)):
            if value:
                p.error(f"{flag}: only with --mode theorem")
    for flag in ("--combine", "--lr-from"):
        dest = flag[2:].replace("-", "_")
        if getattr(args, dest) is not None:
            files = [Path(f) for f in str(getattr(args, dest)).split(",") if f.strip()]
            missing = [str(f) for f in files if not f.is_file()]
            if not files or missing:
                p.error(f"{flag}: a comma list of existing results.json files; missing: "
                        f"{missing or getattr(args, dest)!r}")
            setattr(args, dest, [str(f) for f in files])
    if args.convergence_only and (not args.lr_from or not args.convergence_epochs):
        p.error("--convergence-only: needs --lr-from (the runs whose searches chose the lrs) and --convergence-epochs")
    if args.lr_from and not args.convergence_only:
        p.error("--lr-from: only with --convergence-only")
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
    plt = _common.pyplot("width_sweep")
    if plt is None:
        return

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


# ---------------------------------------------------------------------------------------------
# theorem mode (issue 16): the theorem's depths, a tuned lr per method and width, chosen on validation

def load_theorem_task(task: str, args) -> dict:
    """Train (first --train-limit), all train (for the convergence runs), val and test, flattened."""
    splits = datasets.load(task).normalize()
    tx, ty = splits.train_x.flatten(1), splits.train_y
    vx, vy = splits.val_x.flatten(1), splits.val_y
    ex, ey = splits.test_x.flatten(1), splits.test_y
    cx, cy = tx, ty
    if args.convergence_train_limit:
        cx, cy = tx[:args.convergence_train_limit], ty[:args.convergence_train_limit]
    if args.train_limit:
        tx, ty = tx[:args.train_limit], ty[:args.train_limit]
    if args.val_limit:
        vx, vy = vx[:args.val_limit], vy[:args.val_limit]
    if args.test_limit:
        ex, ey = ex[:args.test_limit], ey[:args.test_limit]
    return {"train": (tx, ty), "all_train": (cx, cy), "val": (vx, vy), "test": (ex, ey), "in": tx.shape[1],
            "out": splits.num_classes}


def _mlp(dims: list[int]) -> nn.Sequential:
    """Flatten, then bias-free Linear layers with ReLU between them (PyTorch's default init)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def lr_grid(method: str, args) -> list[float]:
    if OPTIMIZER[method] == "adam":
        return list(args.adam_lrs)
    return list(args.score_lrs if method in ("weight_2l", "weight_l", "neuron") else args.sgd_lrs)


def build_theorem(method: str, d_in: int, width: int, d_out: int, lr: float,
                  args) -> tuple[nn.Module, torch.optim.Optimizer]:
    """One of THEOREM_METHODS, bias-free, with its optimiser at learning rate `lr`."""
    if method in ("dense", "dense_adam"):
        model = _mlp([d_in, width, d_out])
    elif method in ("rf", "rf_adam"):
        model = _mlp([d_in, width, d_out])
        init_weight(model[1].weight, args.weight_init)
        model[1].weight.requires_grad_(False)
    elif method in ("weight_l", "weight_2l"):
        dims = [d_in, width, d_out] if method == "weight_l" else [d_in, width, width, width, d_out]
        model = _mlp(dims)
        maskprune.convert(model, args.density, weight_init=args.weight_init, scale_fan=True)
    elif method == "neuron":
        model = neuron_subnetwork_mlp(d_in, width, d_out, density=args.density, weight_init=args.weight_init)
    else:
        raise ValueError(f"unknown theorem-mode method {method!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if OPTIMIZER[method] == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.mask_wd)
    return model, opt


@torch.no_grad()
def mask_snapshot(model: nn.Module) -> list[torch.Tensor]:
    """The current keep-masks: every masked layer's (weight subnetworks) or every NeuronMask's."""
    layers = [layer for _, layer in masked_layers(model)]
    if layers:
        return [layer.mask().clone() for layer in layers]
    return [m.mask().clone() for m in model.modules() if isinstance(m, NeuronMask)]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (_common.predict(model, x).argmax(1) == y).float().mean().item()


def run_theorem_point(task: str, tdata: dict, method: str, width: int, seed: int, lr: float, args, *,
                      role: str, epochs: int, train_key: str = "train") -> dict:
    """Trains one (method, width, seed, lr) and returns its record (val and test accuracy, mask change...)."""
    _common.seed_everything(seed)
    model, opt = build_theorem(method, tdata["in"], width, tdata["out"], lr, args)
    before = mask_snapshot(model) if method in ("weight_2l", "weight_l", "neuron") else []
    t0 = time.perf_counter()
    history: list[float] = []
    x, y = tdata[train_key]
    train_loss = _common.fit(model, opt, x, y, epochs=epochs, batch_size=args.batch_size,
                             loss_fn=F.cross_entropy, seed=seed, history=history)
    point = {"task": task, "method": method, "label": THEOREM_LABELS[method], "width": width,
             "depth": THEOREM_DEPTH[method], "seed": seed, "role": role, "optimizer": OPTIMIZER[method],
             "lr": lr, "lr_grid": lr_grid(method, args), "epochs": epochs, "train_examples": len(x),
             "biases": False, "train_loss": train_loss, "train_loss_history": history,
             "val_acc": accuracy(model, *tdata["val"]), "test_acc": accuracy(model, *tdata["test"])}
    point["metric"], point["value"] = "test_acc", point["test_acc"]
    params = list(model.parameters())
    point["trainable"] = sum(p.numel() for p in params if p.requires_grad)
    point["frozen_weights"] = sum(p.numel() for p in params if not p.requires_grad)
    if before:
        after = mask_snapshot(model)
        point["mask_changed"] = [float((a != b).float().mean()) for a, b in zip(before, after)]
        point["kept_fraction"] = (maskprune.mask_stats(model)["fraction"] if method != "neuron"
                                  else neuron_stats(model)["fraction"])
    point["wall_s"] = round(time.perf_counter() - t0, 3)
    return point


def chosen_search_point(points: list[dict], task: str, method: str, width: int, args) -> dict:
    """The lr search's choice for (task, method, width) among `points`; the whole grid must have been searched."""
    search = [p for p in points if p["task"] == task and p["method"] == method and p["width"] == width
              and p["role"] == "search"]
    missing = sorted(set(lr_grid(method, args)) - {p["lr"] for p in search})
    if missing:
        raise SystemExit(f"convergence: the lr search of {method} at width {width} ({task}) lacks lrs {missing}; "
                         "run the sweep at that width first (or pass its results.json to --lr-from)")
    return choose_lr(search)


def _finite(v) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else -1.0


def choose_lr(search: list[dict]) -> dict:
    """The search point with the best validation accuracy (a diverged run counts as -1; ties: smaller lr)."""
    return max(sorted(search, key=lambda q: q["lr"]), key=lambda q: _finite(q["val_acc"]))


def summarize_theorem(points: list[dict]) -> list[dict]:
    """Per (task, method, width): the chosen lr (and whether it sits at the grid's edge), the search's
    validation accuracies, and mean/std/min/max over the seeds at the chosen lr."""
    rows = []
    keys = sorted({(p["task"], p["method"], p["width"]) for p in points if p["role"] in ("search", "seed")},
                  key=lambda k: (k[0], THEOREM_METHODS.index(k[1]), k[2]))
    for task, method, width in keys:
        sel = [p for p in points if (p["task"], p["method"], p["width"]) == (task, method, width)]
        search = sorted((p for p in sel if p["role"] == "search"), key=lambda p: p["lr"])
        chosen = [p for p in sel if p.get("chosen")]
        if not chosen:
            continue
        lr = chosen[0]["lr"]
        grid = sorted(chosen[0]["lr_grid"])
        test = [p["test_acc"] for p in chosen]
        mean, std = _common.mean_std(test)
        row = {"task": task, "method": method, "label": THEOREM_LABELS[method], "width": width,
               "depth": THEOREM_DEPTH[method], "optimizer": OPTIMIZER[method], "lr_grid": grid, "chosen_lr": lr,
               "chosen_at_edge": "low" if lr == grid[0] else "high" if lr == grid[-1] else None,
               "search_val_acc": {str(p["lr"]): p["val_acc"] for p in search},
               "search_test_acc": {str(p["lr"]): p["test_acc"] for p in search},
               "seeds": sorted(p["seed"] for p in chosen), "n_seeds": len(chosen), "mean": mean, "std": std,
               "min": min(test), "max": max(test), "val_mean": _common.mean_std([p["val_acc"] for p in chosen])[0],
               "train_loss_mean": _common.mean_std([p["train_loss"] for p in chosen])[0],
               "epochs": chosen[0]["epochs"], "train_examples": chosen[0]["train_examples"]}
        if "mask_changed" in chosen[0]:
            row["mask_changed_mean"] = [sum(c) / len(c) for c in zip(*(p["mask_changed"] for p in chosen))]
        rows.append(row)
    return rows


def summarize_convergence(points: list[dict]) -> dict:
    """Per task and budget: every method's final train loss and test accuracy, the ranking by train loss,
    and whether the rankings of consecutive budgets differ."""
    out = {}
    for task in sorted({p["task"] for p in points if p["role"] == "convergence"}):
        widths = sorted({p["width"] for p in points if p["role"] == "convergence" and p["task"] == task})
        per_width = {w: _convergence_at([p for p in points if p["role"] == "convergence" and p["task"] == task
                                         and p["width"] == w]) for w in widths}
        out[task] = dict(per_width[widths[-1]], width=widths[-1],
                         other_widths={str(w): per_width[w] for w in widths[:-1]})
    return out


def _convergence_at(conv: list[dict]) -> dict:
    """The convergence summary of one task and width (see summarize_convergence)."""
    budgets = sorted({p["epochs"] for p in conv})
    per_budget = {}
    for e in budgets:
        sel = [p for p in conv if p["epochs"] == e]
        per_budget[str(e)] = {
            "width": sel[0]["width"],
            "methods": {p["method"]: {"lr": p["lr"], "train_loss": p["train_loss"], "val_acc": p["val_acc"],
                                      "test_acc": p["test_acc"], "history": p["train_loss_history"]}
                        for p in sel},
            "rank_by_train_loss": [p["method"] for p in sorted(
                sel, key=lambda p: p["train_loss"] if math.isfinite(p["train_loss"]) else math.inf)],
            "rank_by_test_acc": [p["method"] for p in sorted(sel, key=lambda p: -_finite(p["test_acc"]))]}
    changes = []
    for a, b in zip(budgets, budgets[1:]):
        ra, rb = per_budget[str(a)], per_budget[str(b)]
        common = [m for m in ra["rank_by_train_loss"] if m in rb["rank_by_train_loss"]]
        changes.append({"from": a, "to": b,
                        "train_loss_ranking_changed": [m for m in ra["rank_by_train_loss"] if m in common]
                        != [m for m in rb["rank_by_train_loss"] if m in common],
                        "test_acc_ranking_changed": [m for m in ra["rank_by_test_acc"] if m in common]
                        != [m for m in rb["rank_by_test_acc"] if m in common]})
    return {"budgets": per_budget, "ranking_changes": changes}


def plot_theorem(record: dict, path: Path) -> None:
    plt = _common.pyplot("width_sweep")
    if plt is None:
        return

    rows = record.get("summary", [])
    conv = record.get("convergence", {})
    tasks = sorted({r["task"] for r in rows} | set(conv))
    if not tasks:
        return
    fig, axes = plt.subplots(len(tasks), 4, figsize=(22, 4.8 * len(tasks)), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(THEOREM_METHODS)}
    styles = {m: ("--" if OPTIMIZER[m] == "adam" else "-") for m in THEOREM_METHODS}
    for row_axes, task in zip(axes, tasks):
        ax_acc, ax_lr, ax_mask, ax_conv = row_axes
        for method in THEOREM_METHODS:
            rs = sorted((r for r in rows if r["task"] == task and r["method"] == method), key=lambda r: r["width"])
            if not rs:
                continue
            w = [r["width"] for r in rs]
            line, = ax_acc.plot(w, [100 * r["mean"] for r in rs], marker="o", ls=styles[method],
                                color=colors[method], label=THEOREM_LABELS[method])
            ax_acc.fill_between(w, [100 * r["min"] for r in rs], [100 * r["max"] for r in rs],
                                color=colors[method], alpha=0.15)
            ax_lr.plot(w, [r["chosen_lr"] for r in rs], marker="o", ls=styles[method], color=colors[method],
                       label=method)
            if "mask_changed_mean" in rs[0]:
                n_layers = len(rs[0]["mask_changed_mean"])
                for i in range(n_layers):
                    ax_mask.plot(w, [100 * r["mask_changed_mean"][i] for r in rs], color=colors[method],
                                 marker="os^v"[i % 4], ls=["-", "--", ":", "-."][i % 4],
                                 label=f"{method} layer {i + 1}" if method != "neuron" else "neuron (hidden)")
        for ax in (ax_acc, ax_lr, ax_mask):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("hidden width")
            ax.grid(alpha=0.3)
        ax_acc.set_ylabel("test accuracy (%), lr chosen on validation")
        ax_acc.set_title(f"{task}: mean over seeds at the chosen lr (band min..max)")
        ax_acc.set_ylim(bottom=max(0, min([100 * r["min"] for r in rows if r["task"] == task] + [100]) - 2))
        ax_acc.legend(fontsize=7, loc="lower right")
        ax_lr.set_yscale("log")
        ax_lr.set_ylabel("chosen learning rate")
        ax_lr.set_title("lr chosen on validation (solid SGD, dashed Adam)")
        ax_lr.legend(fontsize=7)
        ax_mask.set_ylabel("mask bits changed from init (%)")
        ax_mask.set_title("fraction of each layer's mask that moved")
        ax_mask.legend(fontsize=6)
        c = conv.get(task)
        if c:
            budgets = sorted(c["budgets"], key=int)
            for bi, b in enumerate(budgets):
                for method, m in c["budgets"][b]["methods"].items():
                    hist = m["history"]
                    ax_conv.plot(range(1, len(hist) + 1), hist, color=colors[method],
                                 ls=["-", "--", ":"][bi % 3], marker="o", ms=3,
                                 label=f"{method}, {b} epochs" if True else None)
            ax_conv.set_yscale("log")
            ax_conv.set_xlabel("epoch")
            ax_conv.set_ylabel("train loss (epoch mean)")
            width = c["budgets"][budgets[0]]["width"]
            ax_conv.set_title(f"width {width}, all training data: budgets {', '.join(budgets)} epochs")
            ax_conv.grid(alpha=0.3, which="both")
            ax_conv.legend(fontsize=6, ncol=2)
        else:
            ax_conv.set_axis_off()
    fig.suptitle("Malach et al. 2020 as stated: weight subnetworks of a random depth-2l network (l = 2), "
                 "every method tuned per width on validation, no biases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _refresh(results: "_common.Results", folder: Path) -> None:
    results.record["summary"] = summarize_theorem(results.points)
    results.record["convergence"] = summarize_convergence(results.points)
    results.write()
    plot_theorem(results.record, folder / "width_sweep.png")


def estimate_theorem(args, tdata: dict) -> dict:
    """Times `--estimate-steps` steps of every (method, width) and extrapolates the whole run's cost."""
    rows, total = [], 0.0
    steps_per_epoch = -(-len(tdata["train"][0]) // args.batch_size)
    conv_steps = sum(args.convergence_epochs) * -(-len(tdata["all_train"][0]) // args.batch_size)
    x, y = tdata["train"]
    for method in args.methods:
        for width in args.widths:
            _common.seed_everything(0)
            model, opt = build_theorem(method, tdata["in"], width, tdata["out"], lr_grid(method, args)[0], args)
            idx = torch.arange(args.batch_size) % len(x)
            def step():
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            step()  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.estimate_steps):
                step()
            per_step = (time.perf_counter() - t0) / args.estimate_steps
            runs = len(lr_grid(method, args)) + len([s for s in args.seeds if s != args.search_seed])
            steps = runs * args.epochs * steps_per_epoch + (conv_steps if width == max(args.widths) else 0)
            rows.append({"method": method, "width": width, "s_per_step": per_step, "runs": runs,
                         "expected_s": per_step * steps * len(args.tasks)})
            total += rows[-1]["expected_s"]
            print(f"{method:10s} width {width:5d}: {1000 * per_step:8.1f} ms/step, {runs} runs -> "
                  f"{rows[-1]['expected_s'] / 60:6.1f} min", flush=True)
    print(f"expected total on this machine now: {total / 60:.1f} min (one thread; evaluation not included)")
    return {"rows": rows, "total_s": total}


def main_theorem(args) -> Path:
    folder = _common.run_dir("width_sweep", args.run, args.out)
    if args.combine:
        records = [json.loads(Path(f).read_text()) for f in args.combine]
        config = dict(records[0]["config"], combined_from=args.combine, run=args.run)
        results = _common.Results(folder, config)
        results.record["environment"] = records[0]["environment"]
        results.record["parts"] = [{"file": f, "config": r["config"], "wall_time_s": r.get("wall_time_s"),
                                    "status": r.get("status")} for f, r in zip(args.combine, records)]
        # a later file's lr search for a (task, method, width) replaces an earlier file's (e.g. a rerun with a wider
        # grid); convergence runs are kept from every file (they are told apart by width)
        keep: dict[tuple, int] = {}
        for i, r in enumerate(records):
            for p in r["points"]:
                if p["role"] in ("search", "seed"):
                    keep[(p["task"], p["method"], p["width"])] = i
        replaced = set()
        for i, r in enumerate(records):
            for p in r["points"]:
                key = (p["task"], p["method"], p["width"])
                if p["role"] in ("search", "seed") and keep[key] != i:
                    replaced.add((args.combine[i], *key))
                    continue
                results.record["points"].append(p)
        results.record["replaced_searches"] = sorted(list(k) for k in replaced)
        _refresh(results, folder)
        results.finish(wall_time_parts_s=sum(r.get("wall_time_s", 0.0) for r in records))
        print(f"wrote {results.path} and {folder / 'width_sweep.png'} ({len(results.points)} points)")
        return folder
    tdata = {task: load_theorem_task(task, args) for task in args.tasks}
    if args.estimate:
        for task in args.tasks:
            estimate_theorem(args, tdata[task])
        return folder
    config = dict(vars(args), issue_grid={"widths": [2 ** k for k in range(6, 13)], "seeds": 3})
    results = _common.Results(folder, config)
    extra_seeds = [s for s in args.seeds if s != args.search_seed]
    searched = results.points
    if args.convergence_only:
        searched = [p for f in args.lr_from for p in json.loads(Path(f).read_text())["points"]]
        results.record["lr_from"] = args.lr_from
    for task in args.tasks:
        for width in ([] if args.convergence_only else args.widths):
            for method in args.methods:
                search = []
                for lr in lr_grid(method, args):
                    point = run_theorem_point(task, tdata[task], method, width, args.search_seed, lr, args,
                                              role="search", epochs=args.epochs)
                    point["chosen"] = False
                    search.append(point)
                    results.add(point)
                    print(f"{task} {method:10s} width {width:5d} lr {lr:<8g} seed {args.search_seed}: val "
                          f"{100 * point['val_acc']:.2f} test {100 * point['test_acc']:.2f} loss "
                          f"{point['train_loss']:.4f} ({point['wall_s']:.1f}s)", flush=True)
                best = choose_lr(search)
                best["chosen"] = args.search_seed in args.seeds
                for seed in extra_seeds:
                    point = run_theorem_point(task, tdata[task], method, width, seed, best["lr"], args,
                                              role="seed", epochs=args.epochs)
                    point["chosen"] = True
                    results.add(point)
                    print(f"{task} {method:10s} width {width:5d} lr {best['lr']:<8g} seed {seed}: val "
                          f"{100 * point['val_acc']:.2f} test {100 * point['test_acc']:.2f} "
                          f"({point['wall_s']:.1f}s)", flush=True)
                _refresh(results, folder)
        if args.convergence_epochs:
            width = args.convergence_width or max(args.widths)
            for method in args.methods:
                best = chosen_search_point(searched, task, method, width, args)
                for epochs in args.convergence_epochs:
                    point = run_theorem_point(task, tdata[task], method, width, args.search_seed, best["lr"], args,
                                              role="convergence", epochs=epochs, train_key="all_train")
                    results.add(point)
                    print(f"{task} convergence {method:10s} width {width} {epochs} epochs lr {best['lr']:g}: "
                          f"losses {' '.join(f'{v:.4f}' for v in point['train_loss_history'])} test "
                          f"{100 * point['test_acc']:.2f} ({point['wall_s']:.1f}s)", flush=True)
                    _refresh(results, folder)
    _refresh(results, folder)
    results.finish()
    print(f"wrote {results.path} and {folder / 'width_sweep.png'}")
    return folder


def main(argv=None) -> Path:
    args = parse_args(argv)
    _common.setup_threads(args.threads)
    if args.mode == "theorem":
        return main_theorem(args)
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
