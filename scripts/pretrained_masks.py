"""The `threshold` mask policy over a pretrained network: a mask learned for a new task over frozen weights.

Question (issue 17): a dense lenet300 trained on MNIST is frozen, and only a 1-bit-per-weight mask
M = 1[S > τ] is learned for Fashion-MNIST over it (the `threshold` policy: Piggyback, Mallya et al. 2018;
Zhao et al. 2020). How does that compare with training the dense network on Fashion-MNIST, and with a mask of
the same size over frozen random weights?

Arms, all lenet300 without biases (784-300-100-10, 266,200 weights), all trained on Fashion-MNIST for the same
--epochs with batch --batch-size, the per-step cosine schedule of maskprune.train and no weight decay:

  pretrained_threshold  lenet300 trained densely on MNIST (its own lr, chosen on MNIST validation), then
                        convert(model, 1.0, policy="threshold") keeping those weights (weight_init=None);
                        scores start at the policy's 1e-2 > τ = 5e-3, so training starts from the whole MNIST net.
  dense_fashion         lenet300 trained densely on Fashion-MNIST from scratch (torch's default init).
  random_threshold      the same threshold policy over frozen signed-constant weights with edge-popup's fan
                        scaling; the scores start with a random fraction f of the weights above τ (score 1e-2,
                        the rest at 0 = τ - 5e-3), f = the mean kept fraction of pretrained_threshold's final
                        runs, so both masks start (c) / end (a) at the same size; training then moves it.
  random_layerwise      edge-popup's layer-wise top-k over the same kind of random weights, density f (exact).

Head (--head): "masked" (default) masks the output layer like the others in every masked arm, adding no
trainable classifier: the pretrained arm reuses MNIST's 10 output units for the 10 Fashion classes by index (an
arbitrary assignment the mask has to undo) and every masked arm stores exactly one bit per weight per task.
"fresh" (Piggyback's choice) leaves the output layer unmasked in every masked arm alike and trains a new dense
one (seeded default init) with the mask, in the same optimizer: 100x10 float32 weights more per task.

Optimizer and learning rate: each arm searches SGD (momentum 0.9) and Adam (--optimizers all, the default; "arm"
searches only the arm's first optimizer in GRIDS, as the first runs did), each over a grid of three lrs spanning
10x, on its task's validation split (seed 0); a best value at an edge of a grid extends it by one step on that side
(at most --grid-extend times), whether the choice stayed at an edge is recorded, and the (optimizer, lr) with the
best validation accuracy runs the final seeds. The MNIST backbone is trained with SGD, its lr chosen the same way.
The final runs use seeds --seeds (for the pretrained arm, seed s also pretrains its own MNIST backbone). A final
run whose (arm, seed, optimizer, lr, setting) equals a selection run is not repeated (training is deterministic):
it is marked reused.

Storage per task: a mask is 1 bit per weight (its entropy H(f) bits per weight is the bound for a compressed
one); dense weights are 32 bits each. The masked arms share a frozen backbone across tasks: the float32 MNIST
weights (pretrained) or a 64-bit seed that regenerates the random weights (maskprune tickets).

Writes results/pretrained_masks/<run>/results.json (rewritten after every run) and pretrained_masks.png.

    python scripts/pretrained_masks.py --quick             # smoke run, < 1 min on one CPU core
    nice -n 5 python scripts/pretrained_masks.py --threads 1 --run cpu-10ep
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Results, accuracy, fit_policy, grid_search, make_optimizer, mean_std, option_list,  # noqa: E402
                     pyplot, run_dir, seed_everything, setup_threads)

import maskprune  # noqa: E402
from maskprune import data, models  # noqa: E402

ARMS = ("pretrained_threshold", "dense_fashion", "random_threshold", "random_layerwise")
MASKED_ARMS = ("pretrained_threshold", "random_threshold", "random_layerwise")
# {optimizer: lr grid} per arm, the arm's own optimizer first (--optimizers arm searches only that one): SGD with
# momentum 0.9 for dense training and the top-k rule (edge-popup's 0.1 in the middle), Adam for the thresholded raw
# scores (Piggyback trains its masks with Adam). The second grids are those policy_sweep found interior on lenet300.
GRIDS = {
    "pretrain_mnist": {"sgd": (0.01, 0.03, 0.1)},
    "dense_fashion": {"sgd": (0.01, 0.03, 0.1), "adam": (0.0003, 0.001, 0.003)},
    "pretrained_threshold": {"adam": (0.0003, 0.001, 0.003), "sgd": (0.03, 0.1, 0.3)},
    "random_threshold": {"adam": (0.0003, 0.001, 0.003), "sgd": (0.03, 0.1, 0.3)},
    "random_layerwise": {"sgd": (0.03, 0.1, 0.3), "adam": (0.0003, 0.001, 0.003)},
}
OPTIMIZER_SEARCH = ("all", "arm")
TAU, KEPT_SCORE, DROPPED_SCORE = 5e-3, 1e-2, 0.0  # the threshold policy's τ and defaults (maskprune.masks.threshold)
FLOAT_BITS, SEED_BITS = 32, 64
HEAD = "layers.5"  # lenet300's output Linear (Flatten, Linear, ReLU, Linear, ReLU, Linear)
HEADS = ("masked", "fresh")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 600 training images, 2 epochs of batch 64, 1 seed, 2 lrs per grid")
    p.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)} (random_* need pretrained_threshold)")
    p.add_argument("--head", default="masked", choices=HEADS,
                   help="masked: the output layer is masked like the others; fresh: every masked arm leaves it "
                        "unmasked and trains a new dense output layer (float32 weights per task) with its mask")
    p.add_argument("--optimizers", default="all", choices=OPTIMIZER_SEARCH,
                   help="all: every arm searches SGD and Adam and keeps the better on validation; arm: only the "
                        "arm's own optimizer (SGD for dense training and layerwise, Adam for threshold)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10, help="the budget of every arm on Fashion-MNIST")
    p.add_argument("--pretrain-epochs", type=int, default=10, help="dense MNIST training of the backbone")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-limit", type=int, default=0, help="training examples used (0 = all)")
    p.add_argument("--val-limit", type=int, default=0, help="validation examples used for the lr choice (0 = all)")
    p.add_argument("--test-limit", type=int, default=0, help="test examples used (0 = all)")
    p.add_argument("--grid-extend", type=int, default=2,
                   help="times an lr grid is extended by one step when its best value is at an edge")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = leave torch's default)")
    p.add_argument("--run", default=None, help="run name (default: UTC time)")
    p.add_argument("--out", default=None, help="output folder (default results/pretrained_masks/<run>)")
    args = p.parse_args(argv)
    args.arms = option_list(p, "--arms", args.arms, str, accepted=ARMS, what="arm")
    args.seeds = option_list(p, "--seeds", args.seeds, int, low=0, high=2 ** 31)
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if any(a.startswith("random_") for a in args.arms) and "pretrained_threshold" not in args.arms:
        p.error("--arms: random_threshold and random_layerwise take their kept fraction from pretrained_threshold; "
                "include it")
    for flag in ("epochs", "pretrain_epochs", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    for flag in ("train_limit", "val_limit", "test_limit", "grid_extend"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')}: must be >= 0, got {getattr(args, flag)}")
    if args.quick:
        args.seeds, args.epochs, args.pretrain_epochs, args.batch_size = [0], 2, 2, 64
        args.train_limit, args.val_limit, args.test_limit, args.grid_extend = 600, 500, 1000, 1
    return args


def search_grids(args, arm: str) -> dict[str, tuple]:
    """{optimizer: lrs} the arm searches: both optimizers or its own (--optimizers), two lrs each with --quick."""
    grids = GRIDS[arm] if args.optimizers == "all" else dict(list(GRIDS[arm].items())[:1])
    return {opt: lrs[1:] if args.quick else lrs for opt, lrs in grids.items()}


def _limit(x, y, n):
    return (x, y) if not n else (x[:n], y[:n])


def _lenet(splits) -> torch.nn.Module:
    return models.create("lenet300", num_classes=splits.num_classes, in_shape=splits.in_shape, bias=False)


def fit(model, params, optimizer_name: str, lr: float, splits, seed: int, epochs: int, args, label: str) -> dict:
    """Minibatch training (cosine schedule per step, the policies' hooks); stops at a non-finite loss."""
    optimizer = make_optimizer(optimizer_name, params, lr)
    x, y = _limit(splits.train_x, splits.train_y, args.train_limit)
    t0 = time.perf_counter()
    run = fit_policy(model, optimizer, x, y, epochs=epochs, batch_size=args.batch_size, seed=seed, label=label)
    val_x, val_y = _limit(splits.val_x, splits.val_y, args.val_limit)
    test_x, test_y = _limit(splits.test_x, splits.test_y, args.test_limit)
    return {"val_acc": float("nan") if run["diverged"] else accuracy(model, val_x, val_y),
            "test_acc": float("nan") if run["diverged"] else accuracy(model, test_x, test_y),
            "train_loss": run["train_loss"], "steps": run["steps"],
            "train_seconds": round(time.perf_counter() - t0, 2), "diverged": run["diverged"]}


def _entropy_bits(f: float) -> float:
    return 0.0 if f <= 0 or f >= 1 else -(f * math.log2(f) + (1 - f) * math.log2(1 - f))


def mask_record(model) -> dict:
    """Kept fraction overall and per layer, and the mask's size: 1 bit per weight, and its entropy bound."""
    stats = maskprune.mask_stats(model)
    return {"kept_fraction": stats["fraction"], "kept": stats["kept"], "weights": stats["total"],
            "layer_fractions": [round(r["fraction"], 6) for r in stats["layers"]],
            "mask_bits": stats["total"],
            "mask_entropy_bits": round(sum(r["total"] * _entropy_bits(r["fraction"]) for r in stats["layers"]))}


class Experiment:
    """The datasets, the pretrained backbones (one per seed, cached) and the runs, written to Results."""

    def __init__(self, args, results: Results):
        self.args, self.results = args, results
        self.mnist = data.load("mnist").normalize()
        self.fashion = data.load("fashion-mnist").normalize()
        self.backbones: dict[int, dict] = {}  # seed -> state_dict of the dense MNIST lenet300
        self.pretrain: tuple[str, float] | None = None  # the backbone's (optimizer, lr)
        self.target: float | None = None  # pretrained_threshold's mean final kept fraction
        self.cache: dict[tuple, dict] = {}  # (arm, seed, optimizer, lr) of selection runs -> result

    # -- one run of each arm -------------------------------------------------------------------
    def run(self, arm: str, seed: int, optimizer_name: str, lr: float) -> dict:
        key = (arm, seed, optimizer_name, lr)
        if key in self.cache:
            return {**self.cache[key], "reused": True}
        args = self.args
        label = f"{arm} s{seed} {optimizer_name} lr={lr:g}"
        seed_everything(seed)
        if arm == "pretrain_mnist":
            model = _lenet(self.mnist)
            out = fit(model, list(model.parameters()), optimizer_name, lr, self.mnist, seed, args.pretrain_epochs,
                      args, label)
            out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
            return out
        if arm == "dense_fashion":
            model = _lenet(self.fashion)
            out = fit(model, list(model.parameters()), optimizer_name, lr, self.fashion, seed, args.epochs, args,
                      label)
            n = sum(p.numel() for p in model.parameters())
            return {**out, "kept_fraction": 1.0, "weights": n, "task_bits": FLOAT_BITS * n,
                    "shared_bits": 0}
        model = _lenet(self.fashion)
        extra = {}
        skip = [HEAD] if args.head == "fresh" else []
        if arm == "pretrained_threshold":
            model.load_state_dict(self.backbone(seed))
            maskprune.convert(model, 1.0, policy="threshold", tau=TAU, skip=skip)  # scores start at 1e-2
            self.fresh_head(model, seed)
            extra["fashion_acc_before"] = accuracy(model, *_limit(self.fashion.test_x, self.fashion.test_y,
                                                                  args.test_limit))
            shared = FLOAT_BITS * sum(t.masker.scores.numel() for t in maskprune.masked_tensors(model))
        elif arm == "random_threshold":
            maskprune.convert(model, self.target, policy="threshold", tau=TAU, skip=skip,
                              weight_init="signed_constant", scale_fan=True, weight_seed=seed)
            gen = torch.Generator().manual_seed(seed * 7919 + 17)
            with torch.no_grad():
                for t in maskprune.masked_tensors(model):
                    keep = torch.rand(t.masker.scores.shape, generator=gen) < self.target
                    t.masker.scores.copy_(torch.where(keep, KEPT_SCORE, DROPPED_SCORE))
            extra["initial_kept_fraction"] = maskprune.mask_stats(model)["fraction"]
            shared = SEED_BITS
        else:  # random_layerwise
            maskprune.convert(model, self.target, weight_init="signed_constant", scale_fan=True, weight_seed=seed,
                              skip=skip)
            shared = SEED_BITS
        head = self.fresh_head(model, seed) if arm != "pretrained_threshold" else model.get_submodule(HEAD)
        layers = [t.masker for t in maskprune.masked_tensors(model)]
        params = [m.scores for m in layers] + ([head.weight] if args.head == "fresh" else [])
        out = fit(model, params, optimizer_name, lr, self.fashion, seed, args.epochs, args, label)
        rec = mask_record(model)
        head_bits = FLOAT_BITS * head.weight.numel() if args.head == "fresh" else 0
        return {**out, **extra, **rec, "head_bits": head_bits, "task_bits": rec["mask_bits"] + head_bits,
                "shared_bits": shared}

    def fresh_head(self, model, seed: int):
        """--head fresh: the unmasked output layer gets a new trainable init (seeded); returns the head module."""
        head = model.get_submodule(HEAD)
        if self.args.head == "fresh":
            with torch.random.fork_rng():
                torch.manual_seed(seed * 7919 + 29)
                head.reset_parameters()
            head.weight.requires_grad_(True)
        return head

    def backbone(self, seed: int) -> dict:
        if seed not in self.backbones:
            optimizer_name, lr = self.pretrain
            out = self.run("pretrain_mnist", seed, optimizer_name, lr)
            self.backbones[seed] = out.pop("state")
            self.results.record["pretrain"].append({"seed": seed, "optimizer": optimizer_name, "lr": lr, **out})
            self.results.write()
            tqdm.write(f"[pretrain] mnist seed {seed} {optimizer_name} lr={lr:g} test {out['test_acc']:.4f}")
        return self.backbones[seed]

    # -- the optimizer and lr choice ------------------------------------------------------------
    def select(self, arm: str) -> tuple[str, float]:
        """The (optimizer, lr) with the best validation accuracy (seed 0), each optimizer's grid extended at an edge;
        every grid searched is recorded in lr_choice, the winner marked chosen."""
        choices = []
        for optimizer_name, lrs in search_grids(self.args, arm).items():
            def one(lr: float, optimizer_name=optimizer_name) -> float:
                out = self.run(arm, 0, optimizer_name, lr)
                if arm == "pretrain_mnist":  # seed 0's backbone at this lr
                    self.backbones.setdefault(-1, {})[(optimizer_name, lr)] = out.pop("state")
                self.cache[(arm, 0, optimizer_name, lr)] = out
                self.results.record["selection"].append(
                    {"arm": arm, "seed": 0, "optimizer": optimizer_name, "lr": lr, **out})
                self.results.write()
                tqdm.write(f"[select] {arm} {optimizer_name} lr={lr:g} val {out['val_acc']:.4f}")
                return out["val_acc"]

            val, lr, ordered = grid_search(list(lrs), one, self.args.grid_extend)
            choices.append({"arm": arm, "optimizer": optimizer_name, "lr": lr, "val_acc": val, "grid": ordered,
                            "at_edge": lr in (ordered[0], ordered[-1])})
        best = max(choices, key=lambda c: c["val_acc"])  # the first optimizer wins a tie
        for c in choices:
            self.results.record["lr_choice"].append({**c, "chosen": c is best})
        if arm == "pretrain_mnist":  # seed 0's backbone is the selection run at the chosen (optimizer, lr)
            self.pretrain = (best["optimizer"], best["lr"])
            self.backbones[0] = self.backbones.pop(-1)[self.pretrain]
            out = dict(self.cache[(arm, 0, *self.pretrain)])
            self.results.record["pretrain"].append(
                {"seed": 0, "optimizer": best["optimizer"], "lr": best["lr"], **out, "reused": True})
            self.results.write()
        return best["optimizer"], best["lr"]

    def finals(self, arm: str, optimizer_name: str, lr: float) -> None:
        for seed in self.args.seeds:
            out = self.run(arm, seed, optimizer_name, lr)
            self.results.add({"arm": arm, "seed": seed, "optimizer": optimizer_name, "lr": lr, **out})
            tqdm.write(f"{arm} seed={seed} {optimizer_name} lr={lr:g} test {out['test_acc']:.4f} "
                       f"kept {out.get('kept_fraction', 1.0):.4f} ({out['train_seconds']:.1f}s)")


def summarize(record: dict) -> list[dict]:
    rows = []
    for arm in record["config"]["arms"]:
        pts = [p for p in record["points"] if p["arm"] == arm]
        if not pts:
            continue
        acc_m, acc_s = mean_std(p["test_acc"] for p in pts)
        kept_m, kept_s = mean_std(p["kept_fraction"] for p in pts)
        row = {"arm": arm, "optimizer": pts[0]["optimizer"], "lr": pts[0]["lr"], "seeds": len(pts),
               "test_acc_mean": acc_m, "test_acc_std": acc_s,
               "kept_fraction_mean": kept_m, "kept_fraction_std": kept_s, "task_bits": pts[0]["task_bits"],
               "shared_bits": pts[0]["shared_bits"], "weights": pts[0]["weights"]}
        if "mask_entropy_bits" in pts[0]:
            row["mask_entropy_bits_mean"] = mean_std(p["mask_entropy_bits"] for p in pts)[0]
        if "initial_kept_fraction" in pts[0]:
            row["initial_kept_fraction_mean"] = mean_std(p["initial_kept_fraction"] for p in pts)[0]
        if "fashion_acc_before" in pts[0]:
            row["fashion_acc_before_mean"] = mean_std(p["fashion_acc_before"] for p in pts)[0]
        rows.append(row)
    return rows


def plot(record: dict, path: Path) -> None:
    plt = pyplot("pretrained_masks")
    if plt is None:
        return
    rows = record["summary"]
    names = ["\n".join([*r["arm"].split("_"), f"({r['optimizer']})"]) for r in rows]  # arm, one word a line
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = ["C0" if r["arm"] in MASKED_ARMS else "C3" for r in rows]
    ax1.bar(names, [100 * r["test_acc_mean"] for r in rows], yerr=[100 * r["test_acc_std"] for r in rows],
            capsize=4, color=colors)
    for i, r in enumerate(rows):
        ax1.text(i, 100 * (r["test_acc_mean"] + r["test_acc_std"]) + 0.5,
                 f"{100 * r['test_acc_mean']:.2f}%\nkept {r['kept_fraction_mean']:.3f}", ha="center", va="bottom",
                 fontsize=8)
    lo = min(100 * r["test_acc_mean"] for r in rows)
    ax1.set_ylim(max(0, lo - 10), 102)
    ax1.set_ylabel("Fashion-MNIST test accuracy (%)")
    cfg = record["config"]
    ax1.set_title(f"lenet300, {cfg['epochs']} epochs, mean ± std over seeds {cfg['seeds']}", fontsize=9)
    ax1.tick_params(axis="x", labelsize=8)
    ax2.bar(names, [r["task_bits"] / 8 / 1024 for r in rows], color=colors,
            label="per task: 1 bit / 32 bits per weight")
    ent = [r.get("mask_entropy_bits_mean", r["task_bits"]) / 8 / 1024 for r in rows]
    ax2.scatter(range(len(rows)), ent, color="k", zorder=3, marker="_", s=400, label="entropy bound of the mask")
    ax2.set_yscale("log")
    ax2.set_ylabel("storage per task (KiB)")
    ax2.set_title("mask (1 bit/weight) vs float32 weights; shared backbone not counted", fontsize=9)
    ax2.legend(fontsize=8)
    ax2.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_threads(args.threads)
    folder = run_dir("pretrained_masks", args.run, args.out)
    config = {k: v for k, v in vars(args).items() if k not in ("run", "out")}
    config.update(model="lenet300", bias=False, head=args.head,
                  tau=TAU, score_init=KEPT_SCORE, weight_decay=0.0, momentum=0.9,
                  grids={a: {opt: list(lrs) for opt, lrs in search_grids(args, a).items()}
                         for a in ("pretrain_mnist", *args.arms)})
    results = Results(folder, config)
    results.record.update(selection=[], lr_choice=[], pretrain=[])
    exp = Experiment(args, results)
    if "pretrained_threshold" in args.arms:
        exp.select("pretrain_mnist")
        for seed in args.seeds:
            exp.backbone(seed)
    for arm in [a for a in ARMS if a in args.arms]:
        if arm.startswith("random_") and exp.target is None:
            kept = [p["kept_fraction"] for p in results.points if p["arm"] == "pretrained_threshold"]
            exp.target = mean_std(kept)[0]
            results.record["target_kept_fraction"] = exp.target
            tqdm.write(f"random arms keep the fraction {exp.target:.4f} (pretrained_threshold's mean)")
        exp.finals(arm, *exp.select(arm))
    results.record["summary"] = summarize(results.record)
    plot(results.record, folder / "pretrained_masks.png")
    results.finish()
    for r in results.record["summary"]:
        print(f"{r['arm']:22s} test {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} %  "
              f"kept {r['kept_fraction_mean']:.4f}  {r['task_bits']:,} bits/task  {r['optimizer']} lr {r['lr']:g}")
    print(f"wrote {folder / 'results.json'} and {folder / 'pretrained_masks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
