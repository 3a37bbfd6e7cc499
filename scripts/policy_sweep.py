"""Every mask policy (maskprune.masks) on the same networks, densities, seeds and budget: one comparison.

Tasks: lenet300 on MNIST and conv4 on Fashion-MNIST. For each (task, policy) the learning rate is chosen on the
validation split from the policy's small grid (seed 0, or the mean of --select-seeds seeds; density
--select-density; for gem_miner together with its L2 weight λ from --gem-l2, the knob that sets its sparsity, as
its configs set it per target), then every density x seed runs with it (--select-per-density: each density's lr
chosen at that density); a final run equal to a selection run is not trained again (training is deterministic)
and is marked reused; test accuracy of the final model is reported (gem_miner after its rounding, supermask
with its evaluation mask). Every run: frozen signed-constant weights (--weight-init: Kaiming normal or uniform
instead) with edge-popup's fan scaling (--no-scale-fan: scaled for the full fan-in), batch 128, --epochs epochs
(one budget for all), cosine schedule, no weight decay, the policy's default options (or --policy-options) except
iterand's period (--iterand-period) and gem_miner's schedule (epochs = --epochs, a freezing every max(1,
--epochs // 10) epochs, about nine in any budget: with 10 epochs their 8-epoch period would freeze once) and its L2
weight (searched from --gem-l2).

Writes results/policy_sweep/<run>/results.json (every selection run and point, rewritten after each), table.md
(the test accuracies as Markdown, with each cell's optimizer and lr) and policy_sweep.png (test accuracy against
the measured kept fraction per task, mean and spread over seeds: the density asked for is a constraint for the
top-k rules, a target for gem_miner and an initial value for supermask and threshold, which learn theirs).

`--policies ...,dense` adds the anchor: the same network (no biases, PyTorch's default init) with its weights
trained, SGD with momentum 0.9, its lr chosen on validation from its own grid like every policy; one run per seed
(density 1), the budget, schedule and data of the mask runs.

    python scripts/policy_sweep.py --quick          # smoke run, < 1 min on one CPU core
    python scripts/policy_sweep.py --run full-cpu   # the full comparison (hours on CPU)
    python scripts/policy_sweep.py --combine A/results.json B/results.json@supermask+dws --run all
                                                    # one table and plot from several runs (no training)
    python scripts/policy_sweep.py --combine SGD/results.json ADAM/results.json --combine-best --run best
                                                    # per density, the run that won on validation
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Results, accuracy, fit_policy, grid_search, make_optimizer, mean_std, option_list,  # noqa: E402
                     pyplot, run_dir, seed_everything, setup_threads)

import maskprune  # noqa: E402
from maskprune import data, masks, models  # noqa: E402
from maskprune.nn import masked_layers  # noqa: E402
from maskprune.nn.init import SCORE_INITS, WEIGHT_INITS  # noqa: E402

TASKS = {"lenet300-mnist": ("lenet300", "mnist"), "conv4-fashion": ("conv4", "fashion-mnist")}
POLICIES = ("layerwise", "global", "supermask", "biprop", "signed", "iterand", "gem_miner", "threshold")
DENSE = "dense"  # the anchor: the same network with its weights trained (not in the default --policies)
# Learning-rate grids per policy and optimizer; the first optimizer listed is the one a policy searches by default.
# Every policy has an SGD (momentum 0.9) and an Adam grid. First: SGD for the top-k rules (edge-popup's 0.1 in the
# middle) and the dense anchor, SGD at Zhou et al.'s lr-100 scale for supermask, Adam for the [0, 1] and thresholded
# scores. The second grid is searched only when asked (--optimizer POLICY=sgd,adam or all=sgd,adam): on conv4 /
# Fashion-MNIST Adam at ~1e-4 beat every SGD lr for the top-k rules and Adam beat SGD for the dense network, so a
# fair comparison searches both. The second grids are those the lenet300 / MNIST table searched: Adam at 0.03-0.3 for
# supermask's logits (on MNIST 0.1 learns, 0.01 barely moves them in 300 steps), SGD at 1-10 for gem_miner's [0, 1]
# scores (their gradients are small), SGD at the top-k rules' scale for threshold.
GRIDS = {
    "layerwise": {"sgd": (0.03, 0.1, 0.3), "adam": (3e-5, 1e-4, 3e-4)},
    "global": {"sgd": (0.03, 0.1, 0.3), "adam": (3e-5, 1e-4, 3e-4)},
    "supermask": {"sgd": (30.0, 100.0, 300.0), "adam": (0.03, 0.1, 0.3)},
    "biprop": {"sgd": (0.03, 0.1, 0.3), "adam": (3e-5, 1e-4, 3e-4)},
    "signed": {"sgd": (0.03, 0.1, 0.3), "adam": (3e-5, 1e-4, 3e-4)},
    "iterand": {"sgd": (0.03, 0.1, 0.3), "adam": (3e-5, 1e-4, 3e-4)},
    "gem_miner": {"adam": (0.003, 0.01, 0.03), "sgd": (1.0, 3.0, 10.0)},
    "threshold": {"adam": (0.0003, 0.001, 0.003), "sgd": (0.03, 0.1, 0.3)},
    DENSE: {"sgd": (0.01, 0.03, 0.1), "adam": (0.0003, 0.001, 0.003)},
}
OPTIMIZERS = ("sgd", "adam")


def search_grids(policy: str, args) -> dict[str, list[float]]:
    """{optimizer: lr grid} the policy's lr is chosen from: each optimizer parse_args resolved for it, with
    --grid's lrs or the default grid (its two upper values under --quick)."""
    grids = {}
    for name in args.optimizer[policy]:
        lrs = args.grid.get((policy, name)) or GRIDS[policy][name]
        grids[name] = list(lrs[1:] if args.quick and (policy, name) not in args.grid else lrs)
    return grids


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--combine", nargs="+", metavar="RESULTS_JSON[@LABEL]",
                   help="train nothing: merge these runs' points (a later file replaces an earlier one's task and "
                        "policy rows; @LABEL shows a file's points under that name, where {policy} stands for each "
                        "point's policy: @{policy}-adam) into one results.json and PNG")
    p.add_argument("--combine-best", action="store_true",
                   help="with --combine: where files give the same (task, policy) row, keep at each density the "
                        "points of the file whose lr choice at that density scored higher on validation (each file "
                        "run with --select-per-density), e.g. one SGD and one Adam run: the optimizer chosen per "
                        "density, as one run with --optimizer POLICY=sgd,adam would choose it")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: lenet300/MNIST, 600 images, 2 epochs of batch 64, densities 0.1,0.5, 1 seed, "
                        "2 lrs per grid")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"of {', '.join(TASKS)}")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"of {', '.join(POLICIES)}, and {DENSE} (the weights trained: the anchor)")
    p.add_argument("--densities", default="0.05,0.1,0.3,0.5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10, help="the budget of every run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-limit", type=int, default=0, help="training examples used (0 = all)")
    p.add_argument("--val-limit", type=int, default=0, help="validation examples used for the lr choice (0 = all)")
    p.add_argument("--test-limit", type=int, default=0, help="test examples used (0 = all)")
    p.add_argument("--grid-extend", type=int, default=2,
                   help="times the lr grid is extended by one step when its best value is at an edge")
    p.add_argument("--select-density", type=float, default=0.1, help="density at which each lr grid is searched")
    p.add_argument("--select-seeds", type=int, default=1,
                   help="seeds 0..N-1 whose mean validation accuracy scores each lr of a grid (1: seed 0 alone; "
                        "more guards against an lr that one seed survives and others do not, at N times the cost)")
    p.add_argument("--select-per-density", action="store_true",
                   help="search each lr grid at every density of --densities and run each density at its own lr "
                        "(instead of one lr per policy and optimizer, chosen at --select-density; 4x the "
                        "selection runs with four densities)")
    p.add_argument("--grid", action="append", default=[], metavar="POLICY[:OPT]=LR,LR,...",
                   help="replace one policy's lr grid (repeatable), e.g. gem_miner=0.1,0.3,1; name the optimizer "
                        "where the policy searches two, e.g. layerwise:adam=1e-4,3e-4")
    p.add_argument("--optimizer", action="append", default=[], metavar="POLICY=OPT[,OPT]",
                   help="the optimizer(s) of sgd, adam whose lr grids a policy searches (repeatable), e.g. "
                        "layerwise=sgd,adam: the best (optimizer, lr) on validation wins; all=sgd,adam: every "
                        "policy searches both of its default grids")
    p.add_argument("--iterand-period", type=int, default=300, help="IteRand's K (optimizer steps between redraws)")
    p.add_argument("--scale-fan", action=argparse.BooleanOptionalAction, default=True,
                   help="edge-popup's fan scaling of the weights for the density (off: scaled for the full fan-in, "
                        "e.g. for supermask's dynamic_scaling, which rescales by the kept fraction itself)")
    p.add_argument("--weight-init", default="signed_constant", choices=WEIGHT_INITS,
                   help="the frozen random weights of every mask run: edge-popup's signed constant, or Kaiming "
                        "normal / uniform (where biprop's α·sign(W) differs from edge-popup's W)")
    p.add_argument("--score-init", default="kaiming_uniform", choices=SCORE_INITS,
                   help="the layers' initial scores (policies that set their own, supermask, gem_miner, threshold, "
                        "keep theirs); 'uniform' gives every layer scores of one scale, which `global` needs on conv4")
    p.add_argument("--policy-options", action="append", default=[], metavar="POLICY=KEY=VALUE,...",
                   help="options of one policy for every run (repeatable), e.g. supermask=dynamic_scaling=True")
    p.add_argument("--gem-l2", default="1e-8,1e-6,1e-5,1e-4",
                   help="gem_miner's λ grid, searched with its lr grid on validation (1e-8: their ResNet-20 value)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = leave torch's default)")
    p.add_argument("--run", default=None, help="run name (default: UTC time)")
    p.add_argument("--out", default=None, help="output folder (default results/policy_sweep/<run>)")
    args = p.parse_args(argv)
    args.tasks = option_list(p, "--tasks", args.tasks, str, accepted=TASKS, what="task")
    args.policies = option_list(p, "--policies", args.policies, str, accepted=(*POLICIES, DENSE), what="policy")
    args.densities = option_list(p, "--densities", args.densities, float, low=1e-4, high=1.0)
    args.seeds = option_list(p, "--seeds", args.seeds, int, low=0, high=2 ** 31)
    # every policy's optimizers, resolved once: its first grid's optimizer, or all=..., or its own --optimizer entry,
    # which wins over all=
    named, every = {}, None
    for item in args.optimizer:
        policy, _, names = item.partition("=")
        if policy != "all" and policy not in GRIDS:
            p.error(f"--optimizer: unknown policy {policy!r} in {item!r}; accepted: all, {', '.join(GRIDS)}")
        chosen = option_list(p, "--optimizer", names, str, accepted=OPTIMIZERS, what="optimizer")
        if policy == "all":
            every = chosen
        else:
            named[policy] = chosen
    optimizers = {policy: named.get(policy) or [o for o in every or () if o in grid] or [next(iter(grid))]
                  for policy, grid in GRIDS.items()}
    args.optimizer = optimizers
    grids = {}
    for item in args.grid:
        target, _, lrs = item.partition("=")
        policy, _, name = target.partition(":")
        if policy not in GRIDS:
            p.error(f"--grid: unknown policy {policy!r} in {item!r}; accepted: {', '.join(GRIDS)}")
        searched = optimizers[policy]
        if not name:
            if len(searched) > 1:
                p.error(f"--grid: {policy} searches {' and '.join(searched)}; name one, e.g. "
                        f"{policy}:{searched[0]}=LR,...")
            name = searched[0]
        if name not in searched:
            p.error(f"--grid: {policy} does not search {name!r} (it searches {', '.join(searched)}; see --optimizer)")
        grids[(policy, name)] = option_list(p, "--grid", lrs, float, low=1e-8, high=1e4)
    args.grid = grids
    options = {}
    for item in args.policy_options:
        policy, _, text = item.partition("=")
        if policy not in POLICIES:
            p.error(f"--policy-options: unknown policy {policy!r} in {item!r}; accepted: {', '.join(POLICIES)}")
        try:
            options[policy] = masks.parse_options(policy, text)
        except ValueError as e:
            p.error(f"--policy-options {policy}: {e}")
    args.policy_options = options
    for flag in ("epochs", "batch_size", "iterand_period", "select_seeds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    for flag in ("train_limit", "val_limit", "test_limit"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')}: must be >= 0, got {getattr(args, flag)}")
    if not 0 < args.select_density <= 1:
        p.error(f"--select-density: must be in (0, 1], got {args.select_density}")
    args.gem_l2 = option_list(p, "--gem-l2", args.gem_l2, float, low=0.0, high=1.0)
    if args.combine_best and not args.combine:
        p.error("--combine-best: only with --combine")
    if args.quick:
        args.tasks, args.densities, args.seeds, args.epochs = ["lenet300-mnist"], [0.1, 0.5], [0], 2
        args.train_limit, args.val_limit, args.test_limit, args.iterand_period = 600, 500, 1000, 5
        args.select_density, args.batch_size, args.gem_l2 = 0.5, 64, [1e-8, 1e-5]
    return args


def _limit(x, y, n):
    return (x, y) if not n else (x[:n], y[:n])


def train_one(task: str, policy_name: str, density: float, seed: int, optimizer_name: str, lr: float, splits, args,
              l2: float | None = None, on_step=None) -> dict:
    """One mask-training run (gem_miner with L2 weight `l2`) with optimizer `optimizer_name` at `lr`; returns val
    and test accuracy, kept fraction and seconds (`on_step`: fit_policy's per-step trace)."""
    arch, _ = TASKS[task]
    seed_everything(seed)
    model = models.create(arch, num_classes=splits.num_classes, in_shape=splits.in_shape, bias=False)
    if policy_name == DENSE:
        return _train_dense(model, seed, optimizer_name, lr, splits, args)
    maskprune.convert(model, density, weight_init=args.weight_init, scale_fan=args.scale_fan,
                      score_init=args.score_init)
    layers = [layer for _, layer in masked_layers(model)]
    options = {}
    if policy_name == "iterand":
        options = {"period": args.iterand_period, "seed": seed}
    elif policy_name == "gem_miner":
        options = {"epochs": args.epochs, "freeze_every": max(1, args.epochs // 10)}
        if l2 is not None:
            options["l2"] = l2
    elif policy_name == "supermask":
        options = {"seed": seed}
    policy = masks.make_policy(policy_name, layers, density, **{**options, **args.policy_options.get(policy_name, {})})
    masks.attach(model, policy)
    optimizer = make_optimizer(optimizer_name, [layer.scores for layer in layers], lr)
    x, y = _limit(splits.train_x, splits.train_y, args.train_limit)
    t0 = time.perf_counter()
    run = fit_policy(model, optimizer, x, y, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                     on_step=on_step)
    diverged, step = run["diverged"], run["steps"]
    seconds = time.perf_counter() - t0

    val_x, val_y = _limit(splits.val_x, splits.val_y, args.val_limit)
    test_x, test_y = _limit(splits.test_x, splits.test_y, args.test_limit)
    kept = sum(int((policy.mask(layer) != 0).sum()) for layer in layers)
    total_weights = sum(layer.scores.numel() for layer in layers)
    return {"val_acc": float("nan") if diverged else accuracy(model, val_x, val_y),
            "test_acc": float("nan") if diverged else accuracy(model, test_x, test_y),
            "kept_fraction": kept / total_weights, "steps": step, "train_seconds": round(seconds, 2),
            "diverged": diverged}


def _train_dense(model: torch.nn.Module, seed: int, optimizer_name: str, lr: float, splits, args) -> dict:
    """The anchor run: `model`'s weights trained with the mask runs' budget, schedule and batch order."""
    optimizer = make_optimizer(optimizer_name, model.parameters(), lr)
    x, y = _limit(splits.train_x, splits.train_y, args.train_limit)
    t0 = time.perf_counter()
    run = fit_policy(model, optimizer, x, y, epochs=args.epochs, batch_size=args.batch_size, seed=seed)
    seconds = time.perf_counter() - t0
    val_x, val_y = _limit(splits.val_x, splits.val_y, args.val_limit)
    test_x, test_y = _limit(splits.test_x, splits.test_y, args.test_limit)
    diverged = run["diverged"]
    return {"val_acc": float("nan") if diverged else accuracy(model, val_x, val_y),
            "test_acc": float("nan") if diverged else accuracy(model, test_x, test_y),
            "kept_fraction": 1.0, "steps": run["steps"], "train_seconds": round(seconds, 2), "diverged": diverged}


def plot(record: dict, path: Path) -> None:
    plt = pyplot("policy_sweep")
    if plt is None:
        return
    tasks = record["config"]["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    # tab20 and a marker per ten rows: more than ten rows (a combined file) stay told apart
    colors, markers = plt.get_cmap("tab20").colors, "osD^v"
    for ax, task in zip(axes[0], tasks):
        for index, policy in enumerate(record["config"]["policies"]):
            pts = [p for p in record["points"] if p["task"] == task and p["policy"] == policy]
            densities = sorted({p["density"] for p in pts})
            if not densities:
                continue
            # x: the kept fraction measured after training (supermask, gem_miner and threshold learn theirs)
            kept = [mean_std(p["kept_fraction"] for p in pts if p["density"] == d)[0] for d in densities]
            stats = [mean_std(p["test_acc"] for p in pts if p["density"] == d) for d in densities]
            means = [100 * m for m, _ in stats]
            spreads = [100 * s for _, s in stats]
            ax.errorbar(kept, means, yerr=spreads, marker=markers[index // 10 % len(markers)], capsize=3, label=policy,
                        color=colors[2 * (index % 10) + index // 10 % 2])
        ax.set_xscale("log")
        ax.set_xlabel("fraction of weights kept (measured)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{task}: {record['config']['epochs']} epoch(s), seeds {record['config']['seeds']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(record: dict) -> str:
    """The record as Markdown, one table per task: a row per policy, a column per density, each cell the test
    accuracy % (mean ± std over seeds) with the optimizer, lr (and λ) its points ran with, and the kept fraction
    where it differs from the density asked for (the policies that learn theirs): what README tables copy."""
    lines = []
    for task in record["config"]["tasks"]:
        pts = [p for p in record["points"] if p["task"] == task]
        densities = sorted({p["density"] for p in pts})
        lines += [f"### {task}", "", "| policy | " + " | ".join(f"density {d:g}" for d in densities) + " |",
                  "|---|" + "---|" * len(densities)]
        for policy in record["config"]["policies"]:
            row = [p for p in pts if p["policy"] == policy]
            if not row:
                continue
            cells = []
            for d in densities:
                at = [p for p in row if p["density"] == d]
                if not at:
                    cells.append("")
                    continue
                mean, std = mean_std(100 * p["test_acc"] for p in at)
                runs = sorted({f"{p.get('optimizer', '?')} {p['lr']:.3g}{_l2_text(p.get('l2'))}" for p in at})
                kept = mean_std(p["kept_fraction"] for p in at)[0]
                kept_text = f", kept {kept:.3f}" if abs(kept - d) > 0.005 else ""
                cells.append(f"{mean:.2f} ± {std:.2f} ({'; '.join(runs)}{kept_text})")
            lines.append(f"| `{policy}` | " + " | ".join(cells) + " |")
        seeds = sorted({p["seed"] for p in pts})
        lines += ["", f"Test accuracy %, mean ± std over seeds {seeds}; {record['config']['epochs']} epoch(s).", ""]
    return "\n".join(lines)


def train_cached(runs: dict, task: str, policy: str, density: float, seed: int, optimizer: str, lr: float, splits,
                 args, l2: float | None = None) -> dict:
    """train_one, run once per (task, policy, density, seed, optimizer, lr, λ): training is deterministic, so a final
    run equal to a selection run returns that run's result, marked reused, instead of training again."""
    key = (task, policy, density, seed, optimizer, lr, l2)
    if key in runs:
        return {**runs[key], "reused": True}
    runs[key] = train_one(task, policy, density, seed, optimizer, lr, splits, args, l2)
    return runs[key]


def _l2_text(l2: float | None) -> str:
    return "" if l2 is None else f" l2={l2:g}"


def choose_lr(task: str, policy: str, optimizer: str, l2: float | None, lrs: list, splits, args, results,
              density: float, runs: dict) -> tuple:
    """(val_acc, optimizer, lr, l2): the policy's lr for `optimizer` chosen on validation (the mean over seeds
    0..--select-seeds-1, at `density`) from its grid, extended at an edge (at most --grid-extend times), so every
    lr is an interior optimum or says it is not."""
    def evaluate(lr: float) -> float:
        vals = []
        for seed in range(args.select_seeds):
            run = train_cached(runs, task, policy, density, seed, optimizer, lr, splits, args, l2)
            results.record["selection"].append({"task": task, "policy": policy, "optimizer": optimizer, "lr": lr,
                                                "density": density, "seed": seed,
                                                **({} if l2 is None else {"l2": l2}), **run})
            results.write()
            print(f"[select] {task} {policy} d={density:g} {optimizer} lr={lr:g}{_l2_text(l2)} seed {seed} "
                  f"val {run['val_acc']:.4f}", flush=True)
            vals.append(run["val_acc"])
        return sum(vals) / len(vals)  # NaN if any seed diverged: such an lr is never chosen over a finite one

    # a one-value grid is no choice: nothing runs for it
    val, lr, ordered = grid_search(lrs, evaluate, args.grid_extend) if len(lrs) > 1 else (-1.0, lrs[0], [])
    results.record.setdefault("lr_choice", []).append(
        {"task": task, "policy": policy, "optimizer": optimizer, "density": density, "lr": lr, "val_acc": val,
         "grid": ordered, "at_edge": len(ordered) > 1 and lr in (ordered[0], ordered[-1]),
         **({} if l2 is None else {"l2": l2})})
    return val, optimizer, lr, l2


def _validation_at(record: dict, path: str) -> dict[tuple[str, str, float], float]:
    """{(task, policy, density): the best validation accuracy of the run's lr choices there} for --combine-best; a
    point of density 1 (the dense anchor) takes its policy's one choice, a mask policy needs per-density choices."""
    scores: dict[tuple[str, str, float], float] = {}
    for choice in record.get("lr_choice", []):
        task, policy = choice["task"], choice["policy"]
        if policy == DENSE:
            at = 1.0
        elif record["config"].get("select_per_density"):
            at = choice["density"]
        else:
            raise SystemExit(f"policy_sweep: --combine-best: {path} chose {policy}'s lr at one density for all; "
                             f"compare runs made with --select-per-density")
        scores[(task, policy, at)] = max(scores.get((task, policy, at), -1.0), choice["val_acc"])
    return scores


def combine(items: list[str], folder: Path, best: bool = False) -> dict:
    """One record (results.json + PNG in `folder`) from several runs' results.json: "PATH" or "PATH@LABEL" (the
    file's points shown as policy LABEL, where "{policy}" in it stands for each point's own policy, so that a
    many-policy file can be relabelled, e.g. @{policy}-adam); a later file replaces the (task, policy) rows of an
    earlier one, or with `best` (--combine-best) replaces them density by density where its lr choice there scored
    higher on validation (a tie keeps the earlier file)."""
    rows: dict[tuple[str, str], dict[float, list[dict]]] = {}  # (task, shown policy) -> density -> points
    chosen_on: dict[tuple[str, str, float], float] = {}  # (task, shown policy, density) -> its lr choice's validation
    sources, epochs = [], set()
    for item in items:
        path, _, label = item.partition("@")
        try:
            record = json.loads(Path(path).read_text())
            points, epochs_of = record["points"], record["config"]["epochs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"policy_sweep: --combine: {path} is not a policy_sweep results.json ({e})")
        epochs.add(epochs_of)
        validation = _validation_at(record, path) if best else {}
        new: dict[tuple[str, str], dict[float, list[dict]]] = {}
        own: dict[tuple[str, str], set[str]] = {}  # shown row -> the policies the file ran under that name
        for point in points:
            name = label.replace("{policy}", point["policy"]) if label else point["policy"]
            new.setdefault((point["task"], name), {}).setdefault(point["density"], []).append(
                {**point, "policy": name, "source": path})
            own.setdefault((point["task"], name), set()).add(point["policy"])
        taken = []
        for (task, name), by_density in new.items():
            if not best:  # the whole row goes: its densities need not match
                rows[(task, name)] = {}
            row = rows.setdefault((task, name), {})
            for density, group in by_density.items():
                score = max(validation.get((task, policy, density), -1.0) for policy in own[(task, name)])
                if not best or density not in row or score > chosen_on[(task, name, density)]:
                    row[density], chosen_on[(task, name, density)] = group, score
                    taken.append((task, name, density))
        sources.append({"path": path, "label": label or None,
                        "rows": list(dict.fromkeys(f"{t}/{n}" for t, n, _ in taken)),
                        **({"densities_taken": [f"{t}/{n}@{d:g}" for t, n, d in taken]} if best else {})})
    points = [point for row in rows.values() for group in row.values() for point in group]
    config = {"tasks": list(dict.fromkeys(t for t, _ in rows)), "policies": list(dict.fromkeys(n for _, n in rows)),
              "epochs": epochs.pop() if len(epochs) == 1 else "mixed", "seeds": sorted({p["seed"] for p in points}),
              "combined": sources, **({"best_on_validation": True} if best else {})}
    record = {"config": config, "status": "done", "points": points}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(record, indent=1))
    (folder / "table.md").write_text(table(record))
    plot(record, folder / "policy_sweep.png")
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = run_dir("policy_sweep", args.run, args.out)
    if args.combine:
        combine(args.combine, folder, best=args.combine_best)
        print(f"wrote {folder / 'results.json'}, {folder / 'table.md'} and {folder / 'policy_sweep.png'}")
        return 0
    setup_threads(args.threads)
    config = {k: v for k, v in vars(args).items() if k not in ("run", "out")}
    config["grid"] = {f"{p}:{o}": lrs for (p, o), lrs in args.grid.items()}
    config["grids"] = {p: search_grids(p, args) for p in args.policies}
    results = Results(folder, config)
    results.record["selection"] = []
    runs: dict = {}  # every finished run, for train_cached
    for task in args.tasks:
        _, dataset = TASKS[task]
        splits = data.load(dataset).normalize()
        for policy in args.policies:
            densities = [1.0] if policy == DENSE else args.densities
            per_density = args.select_per_density and policy != DENSE
            best = {}  # selection density -> the best (val, optimizer, lr, λ) on validation there
            for at in (densities if per_density else [args.select_density]):
                choices = [choose_lr(task, policy, optimizer, l2, lrs, splits, args, results, at, runs)
                           for optimizer, lrs in config["grids"][policy].items()
                           for l2 in (args.gem_l2 if policy == "gem_miner" else [None])]
                best[at] = max(choices, key=lambda c: c[0])
            for density in densities:
                _, optimizer, lr, l2 = best[density if per_density else args.select_density]
                for seed in args.seeds:
                    run = train_cached(runs, task, policy, density, seed, optimizer, lr, splits, args, l2)
                    results.add({"task": task, "policy": policy, "density": density, "seed": seed,
                                 "optimizer": optimizer, "lr": lr, **({} if l2 is None else {"l2": l2}), **run})
                    print(f"{task} {policy} d={density:g} seed={seed} {optimizer} lr={lr:g}{_l2_text(l2)} "
                          f"test {run['test_acc']:.4f} kept {run['kept_fraction']:.3f} "
                          f"({run['train_seconds']:.1f}s)", flush=True)
    plot(results.record, folder / "policy_sweep.png")
    (folder / "table.md").write_text(table(results.record))
    results.finish()
    print(f"wrote {folder / 'results.json'}, {folder / 'table.md'} and {folder / 'policy_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
