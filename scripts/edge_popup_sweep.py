"""Edge-popup sweep: density x frozen-weight init x width, against the dense-trained same network.

Edge-popup (Ramanujan et al., CVPR 2020) finds: accuracy peaks at intermediate density (~0.3-0.5),
signed-constant weights are at least as good as Kaiming normal, and wider networks close the gap to
dense training. This script measures those on LeNet-300-100 / MNIST and Conv4 / Fashion-MNIST, plus
layer-wise against global top-k at three densities.

LeNet-300-100 runs go through the trainer (maskprune.train.train), one run folder per point in a
temporary directory, their summary.json copied into results.json. Conv4 points use the trainer's own
pieces (build_model, lr_factor, the same SGD settings) with a fixed test subset, because the trainer
always evaluates the full validation and test sets (about 2 minutes per Conv4 run on one CPU core).

Writes results/edge_popup_sweep/<run>/results.json (after every point) and edge_popup_sweep.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import maskprune  # noqa: E402
from maskprune import data as datasets  # noqa: E402
from maskprune.train import TrainConfig, build_model, train  # noqa: E402

DENSITIES = (0.01, 0.03, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9)
INITS = ("signed_constant", "kaiming_normal", "kaiming_uniform")
NETS = {"lenet300": "mnist", "conv4": "fashion-mnist"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (CI smoke run, < 3 min on CPU)")
    g = p.add_argument_group("lenet300 on MNIST (through maskprune.train)")
    g.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    g.add_argument("--inits", default=",".join(INITS))
    g.add_argument("--widths", default="1,2")
    g.add_argument("--seeds", default="0,1")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--train-limit", type=int, default=20000, help="first N training examples (0 = all 50k)")
    g.add_argument("--global-densities", default="0.05,0.3,0.7",
                   help="densities where global top-k is run too (signed_constant, every width)")
    g = p.add_argument_group("conv4 on Fashion-MNIST (trainer pieces, test subset)")
    g.add_argument("--conv-densities", default="0.05,0.1,0.3,0.5,0.7,0.9")
    g.add_argument("--conv-inits", default="signed_constant,kaiming_normal")
    g.add_argument("--conv-widths", default="1")
    g.add_argument("--conv-seeds", default="0")
    g.add_argument("--conv-epochs", type=int, default=1)
    g.add_argument("--conv-train-limit", type=int, default=8192, help="first N training images (0 = all 54k)")
    g.add_argument("--conv-test-limit", type=int, default=2000, help="first N test images (0 = all 10k)")
    g.add_argument("--conv-global-densities", default="", help="densities with global top-k for conv4 too")
    g = p.add_argument_group("optimisation (edge-popup's small-network settings)")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.1, help="SGD lr on the scores (momentum 0.9, cosine)")
    g.add_argument("--dense-optimizer", default="adam", choices=("adam", "sgd"),
                   help="optimiser of the dense-trained baselines (Adam converges in the short CPU budget)")
    g.add_argument("--dense-lr", type=float, default=1e-3)
    g.add_argument("--dense-weight-decay", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--nets", default="lenet300,conv4", help="nets to run (with --combine: nets whose points to merge)")
    p.add_argument("--no-dense", action="store_true",
                   help="train masks only: the dense-trained baselines come from another run, merged with --combine "
                        "(a conv4 dense run at width 2 costs about 27 min on one core)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = leave torch's default)")
    p.add_argument("--run", default=None, help="run name (default: UTC time)")
    p.add_argument("--out", default=None, help="output folder (default results/edge_popup_sweep/<run>)")
    p.add_argument("--combine", nargs="+", metavar="RESULTS_JSON", default=None,
                   help="train nothing: merge the points of these runs (a point in several runs counts once) "
                        "into combined.json and combined.png under --out or results/edge_popup_sweep/<run>")
    args = p.parse_args(argv)
    if args.combine:
        missing = [f for f in args.combine if not Path(f).is_file()]
        if missing:
            p.error(f"--combine: no such results.json: {', '.join(missing)}")
    if args.quick:
        args.densities, args.inits, args.widths, args.seeds = "0.05,0.5", "signed_constant,kaiming_normal", "1", "0"
        args.epochs, args.train_limit, args.global_densities = 1, 2000, "0.05"
        args.conv_densities, args.conv_inits, args.conv_widths, args.conv_seeds = "0.5", "signed_constant", "1", "0"
        args.conv_epochs, args.conv_train_limit, args.conv_test_limit = 1, 256, 256
        args.run = args.run or "quick"
    for key in ("densities", "global_densities", "conv_densities", "conv_global_densities"):
        setattr(args, key, _common.option_list(p, "--" + key.replace("_", "-"), getattr(args, key), float,
                                               low=1e-9, high=1.0))
    for key in ("widths", "conv_widths"):
        setattr(args, key, _common.option_list(p, "--" + key.replace("_", "-"), getattr(args, key), float, low=1e-9))
    for key in ("seeds", "conv_seeds"):
        setattr(args, key, _common.option_list(p, "--" + key.replace("_", "-"), getattr(args, key), int, low=0))
    for key in ("inits", "conv_inits"):
        setattr(args, key, _common.option_list(p, "--" + key.replace("_", "-"), getattr(args, key), str,
                                               accepted=INITS, what="weight init"))
    args.nets = _common.option_list(p, "--nets", args.nets, str, accepted=NETS, what="net")
    _common.check_minimum(p, args, {"epochs": 1, "conv_epochs": 1, "batch_size": 1, "train_limit": 0,
                                    "conv_train_limit": 0, "conv_test_limit": 0, "threads": 0})
    return args


# ---------------------------------------------------------------------------------------------
# the grid: (net, mode, policy, density, init, width, seed), in the order it runs

def grid(args) -> list[dict]:
    def net_points(net, densities, inits, widths, global_densities, seed):
        pts = [] if args.no_dense else [dict(net=net, mode="dense", policy="-", density=1.0, init="-", width=w,
                                             seed=seed) for w in widths]
        pts += [dict(net=net, mode="mask", policy="layerwise", density=d, init=i, width=w, seed=seed)
                for d in densities for i in inits for w in widths]
        pts += [dict(net=net, mode="mask", policy="global", density=d, init="signed_constant", width=w, seed=seed)
                for d in global_densities for w in widths]
        return pts

    def lenet(seed):
        return net_points("lenet300", args.densities, args.inits, args.widths, args.global_densities, seed)

    def conv(seed):
        return net_points("conv4", args.conv_densities, args.conv_inits, args.conv_widths, args.conv_global_densities,
                          seed)

    # first seed of each net first, so a run cut off early still covers both networks
    out = []
    lenet_seeds = args.seeds if "lenet300" in args.nets else []
    conv_seeds = args.conv_seeds if "conv4" in args.nets else []
    if lenet_seeds:
        out += lenet(lenet_seeds[0])
    if conv_seeds:
        out += conv(conv_seeds[0])
    for s in lenet_seeds[1:]:
        out += lenet(s)
    for s in conv_seeds[1:]:
        out += conv(s)
    return out


def config_for(pt: dict, args) -> TrainConfig:
    mask = pt["mode"] == "mask"
    return TrainConfig(
        model=pt["net"], dataset=NETS[pt["net"]], mode=pt["mode"], density=pt["density"] if mask else 0.5,
        policy=pt["policy"] if mask else "layerwise", weight_init=pt["init"] if mask else "signed_constant",
        width=float(pt["width"]), epochs=args.epochs if pt["net"] == "lenet300" else args.conv_epochs,
        batch_size=args.batch_size, optimizer="sgd" if mask else args.dense_optimizer,
        lr=args.lr if mask else args.dense_lr, weight_decay=args.weight_decay if mask else args.dense_weight_decay,
        seed=pt["seed"], device="cpu",
        limit_train=args.train_limit if pt["net"] == "lenet300" else args.conv_train_limit)


def run_lenet(pt: dict, args) -> dict:
    """One point through the trainer; its summary.json and per-epoch metrics go into the point."""
    cfg = config_for(pt, args)
    with tempfile.TemporaryDirectory(prefix="edge_popup_sweep-") as tmp:
        summary = train(cfg, Path(tmp) / "run", quiet=True)
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return {**pt, "test_acc": summary["test_acc_last"], "test_acc_best_val": summary["test_acc_best"],
            "best_val_acc": summary["best_val_acc"], "kept_weights": summary["kept_weights"],
            "total_weights": summary["total_weights"], "train_wall_s": summary["wall_time_s"],
            "epochs": cfg.epochs, "train_examples": cfg.limit_train or 50000, "test_examples": 10000,
            "train_loss": metrics[-1]["train_loss"], "via": "maskprune.train.train"}


_CONV_DATA: dict = {}


def run_conv(pt: dict, args) -> dict:
    """One Conv4 point: the trainer's model and optimiser settings, a fixed test subset."""
    from maskprune.train import evaluate

    cfg = config_for(pt, args)
    if cfg.dataset not in _CONV_DATA:
        _CONV_DATA[cfg.dataset] = datasets.load(cfg.dataset).normalize()
    splits = _CONV_DATA[cfg.dataset]
    tx, ty = splits.train_x[:cfg.limit_train or None], splits.train_y[:cfg.limit_train or None]  # 0 = all
    ex, ey = splits.test_x[:args.conv_test_limit or None], splits.test_y[:args.conv_test_limit or None]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, splits.num_classes, splits.in_shape)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":  # as maskprune.train builds it
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    train_loss = _common.fit(model, opt, tx, ty, epochs=cfg.epochs, batch_size=cfg.batch_size,
                             loss_fn=F.cross_entropy, seed=cfg.seed)
    train_wall = time.perf_counter() - t0
    _, acc = evaluate(model, ex, ey, 500, lambda: torch.autocast("cpu", enabled=False))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    kept = maskprune.mask_stats(model)["kept"] if cfg.mode == "mask" else total
    return {**pt, "test_acc": acc, "kept_weights": kept, "total_weights": total, "train_wall_s": train_wall,
            "epochs": cfg.epochs, "train_examples": len(tx), "test_examples": len(ex), "train_loss": train_loss,
            "via": "trainer pieces (build_model, fit with lr_factor), test subset"}


# ---------------------------------------------------------------------------------------------
# summary, plot

def summarize(points: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["net"], p["mode"], p["policy"], p["init"], p["width"], p["density"]), []).append(p)
    rows = []
    for (net, mode, policy, init, width, density), ps in groups.items():
        accs = [p["test_acc"] for p in ps]
        mean, std = _common.mean_std(accs)
        rows.append({"net": net, "mode": mode, "policy": policy, "init": init, "width": width, "density": density,
                     "n_seeds": len(ps), "test_acc_mean": mean, "test_acc_std": std,
                     "kept_weights": ps[0]["kept_weights"], "total_weights": ps[0]["total_weights"]})
    for r in rows:  # gap to the dense-trained same network (same width)
        dense = [d for d in rows if d["net"] == r["net"] and d["mode"] == "dense" and d["width"] == r["width"]]
        r["gap_to_dense"] = r["test_acc_mean"] - dense[0]["test_acc_mean"] if dense else None
    rows.sort(key=lambda r: (list(NETS).index(r["net"]), r["mode"] != "dense", r["policy"], r["init"], r["width"],
                             r["density"]))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = _common.pyplot("edge_popup_sweep")
    if plt is None:
        return

    nets = [n for n in NETS if any(r["net"] == n for r in rows)]
    if not nets:
        return
    colors = {"signed_constant": "C0", "kaiming_normal": "C1", "kaiming_uniform": "C2"}
    styles = {1.0: "-", 2.0: "--"}
    # one panel per net, then a zoom on density >= 0.1 where the low densities squash the scale, then global
    def spread(net, min_density):
        accs = [r["test_acc_mean"] for r in rows if r["net"] == net and r["density"] >= min_density]
        return max(accs) - min(accs) if accs else 0.0

    panels = []
    for net in nets:
        panels.append((net, 0.0))
        if 0 < spread(net, 0.1) < spread(net, 0.0) / 5:
            panels.append((net, 0.1))
    has_global = any(r["policy"] == "global" for r in rows)
    total = len(panels) + has_global  # the layer-wise vs global panel only when there is a global run
    ncols = 2 if total in (2, 4) else min(total, 3)
    nrows = -(-total // ncols)
    fig, grid_axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 4.3 * nrows), squeeze=False)
    flat = list(grid_axes.flat)
    for ax in flat[total:]:
        ax.set_visible(False)
    axes = [flat[:total]]
    for ax, (net, min_density) in zip(axes[0], panels):
        for r in rows:
            if r["net"] == net and r["mode"] == "dense":
                ax.axhline(r["test_acc_mean"], color="k", ls=styles.get(r["width"], ":"), lw=1,
                           label=f"dense trained, width {r['width']:g}")
        for init in INITS:
            for width in sorted({r["width"] for r in rows if r["net"] == net}):
                rs = sorted((r for r in rows if r["net"] == net and r["mode"] == "mask" and r["policy"] == "layerwise"
                             and r["init"] == init and r["width"] == width and r["density"] >= min_density),
                            key=lambda r: r["density"])
                if not rs:
                    continue
                d = [r["density"] for r in rs]
                m = [r["test_acc_mean"] for r in rs]
                s = [r["test_acc_std"] for r in rs]
                ax.errorbar(d, m, yerr=s, color=colors[init], ls=styles.get(width, ":"), marker="o", ms=3,
                            capsize=2, label=f"{init}, width {width:g}")
        ticks = [d for d in DENSITIES if d >= min_density]
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{d:g}" for d in ticks])
        ax.minorticks_off()
        ax.set_xlabel("density (fraction of weights kept)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{net} on {NETS[net]}" + (f", density >= {min_density:g}" if min_density else ""))
        ax.grid(alpha=0.3)
        if not min_density:
            ax.legend(fontsize=7)
    if has_global:
        ax = axes[0][-1]
        for (net, width), marker in zip([(n, w) for n in nets for w in sorted({r["width"] for r in rows if r["net"] == n})],
                                        "osD^v<>"):
            for policy, color in (("layerwise", "C0"), ("global", "C3")):
                glob_d = {r["density"] for r in rows if r["net"] == net and r["width"] == width and r["policy"] == "global"}
                rs = sorted((r for r in rows if r["net"] == net and r["width"] == width and r["policy"] == policy
                             and r["init"] == "signed_constant" and r["density"] in glob_d), key=lambda r: r["density"])
                if rs:
                    ax.plot([r["density"] for r in rs], [r["test_acc_mean"] for r in rs], color=color, marker=marker,
                            ls="-" if width == 1 else "--", label=f"{net} w{width:g} {policy}")
        ax.set_xscale("log")
        ax.set_xticks(DENSITIES, [f"{d:g}" for d in DENSITIES])
        ax.minorticks_off()
        ax.set_xlabel("density")
        ax.set_ylabel("test accuracy")
        ax.set_title("layer-wise vs global top-k (signed constant)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def combine(files: list[str], folder: Path, nets: list[str] | None = None) -> Path:
    """One summary and figure over several runs (e.g. a grid run by parts, or more seeds added later),
    keeping only the points of `nets` (None: all), so one net's seeds can be merged out of mixed runs."""
    points: dict[tuple, dict] = {}
    for f in files:
        for pt in json.loads(Path(f).read_text())["points"]:
            if nets is not None and pt["net"] not in nets:
                continue
            key = tuple(pt[k] for k in ("net", "mode", "policy", "density", "init", "width", "seed"))
            points.setdefault(key, pt)
    if not points:
        sys.exit(f"--combine: the runs hold no points of --nets {','.join(nets or [])}")
    rows = summarize(list(points.values()))
    folder.mkdir(parents=True, exist_ok=True)
    merged_nets = sorted({p["net"] for p in points.values()})
    (folder / "combined.json").write_text(json.dumps({"sources": files, "nets": merged_nets, "points": len(points),
                                                      "summary": rows}, indent=1))
    plot(rows, folder / "combined.png")
    print(f"wrote {folder / 'combined.json'} and {folder / 'combined.png'} ({len(points)} points)")
    return folder


def main(argv=None) -> Path:
    args = parse_args(argv)
    folder = _common.run_dir("edge_popup_sweep", args.run, args.out)
    if args.combine:
        return combine(args.combine, folder, args.nets)
    _common.setup_threads(args.threads)
    config = dict(vars(args))
    config["issue_grid"] = {"densities": list(DENSITIES), "inits": list(INITS), "widths": [1, 2],
                            "nets": dict(NETS), "global_vs_layerwise_densities": 3}
    config["trainer_defaults"] = {k: v for k, v in dataclasses.asdict(TrainConfig()).items()
                                  if k in ("score_init", "scale_fan", "momentum", "optimizer", "warmup_epochs")}
    results = _common.Results(folder, config)
    points = grid(args)
    for pt in tqdm(points, desc="edge_popup_sweep", dynamic_ncols=True, mininterval=5):
        t0 = time.perf_counter()
        out = run_lenet(pt, args) if pt["net"] == "lenet300" else run_conv(pt, args)
        out["wall_s"] = round(time.perf_counter() - t0, 3)
        results.add(out)
        tqdm.write(f"{pt['net']:8s} {pt['mode']:5s} {pt['policy']:9s} {pt['init']:15s} w{pt['width']:g} "
                   f"d={pt['density']:<5g} seed {pt['seed']}  test acc {out['test_acc']:.4f}  ({out['wall_s']:.1f}s)")
        if pt["net"] == "conv4" or len(results.points) % 8 == 0:
            results.record["summary"] = summarize(results.points)
            plot(results.record["summary"], folder / "edge_popup_sweep.png")
    results.record["summary"] = summarize(results.points)
    plot(results.record["summary"], folder / "edge_popup_sweep.png")
    results.finish()
    print(f"wrote {results.path} and {folder / 'edge_popup_sweep.png'}")
    return folder


if __name__ == "__main__":
    main()
