"""Trace supermask runs of policy_sweep.py: how each layer's scores move, to see why a seed or an lr fails.

Each (seed, optimizer, lr) trains exactly as `policy_sweep.py` would (its train_one, so the same weights, scores,
batches and masks), and every --every steps records the last steps' mean loss and, per masked layer, the expected
density E[σ(S)] and the fraction of scores still undecided (σ(S) in [0.02, 0.98]: a score outside it draws the
same bit almost every step, so that weight has stopped being searched). At the end: validation accuracy with the
sampled evaluation mask (the policy's default, what the sweep reports) and with the expected mask 1[σ(S) > 0.5],
to tell a bad draw at evaluation from a bad set of scores.

    python scripts/supermask_trace.py --task conv4-fashion --density 0.1 --seeds 0,2 --lrs sgd=30,100 \\
        --run conv4-fashion-1epoch-10pct -- --epochs 1

Flags after `--` go to policy_sweep.py's parser (--epochs, --train-limit, --weight-init, ...). Writes
results/supermask_trace/<run>/results.json and trace.png (loss, and the undecided fraction of the first and the
last masked layer, against the step).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import policy_sweep  # noqa: E402
from _common import Results, accuracy, check_minimum, option_list, pyplot, run_dir, setup_threads  # noqa: E402

from maskprune import data, masks  # noqa: E402
from maskprune.nn import masked_layers  # noqa: E402

UNDECIDED = (0.02, 0.98)  # σ(S) inside this range: the weight's bit still changes between draws


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(this script's flags, policy_sweep's flags for the runs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    own_argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="conv4-fashion", choices=sorted(policy_sweep.TASKS))
    p.add_argument("--density", type=float, default=0.1, help="the initial expected density, in (0, 1)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each >= 0")
    p.add_argument("--lrs", default="sgd=100",
                   help="OPTIMIZER=LR,...: the runs' optimizer (sgd or adam) and learning rates, each in [1e-8, 1e4]")
    p.add_argument("--every", type=int, default=20, help="record every this many steps (>= 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run", default=None, help="results/supermask_trace/<run>/ (default: a timestamp)")
    p.add_argument("--out", default=None, help="write here instead of results/supermask_trace/<run>/")
    args = p.parse_args(own_argv)
    if not 0 < args.density < 1:
        p.error(f"--density: must be in (0, 1), got {args.density}")
    check_minimum(p, args, {"every": 1})
    args.seeds = option_list(p, "--seeds", args.seeds, int, low=0)
    optimizer, sep, lrs = args.lrs.partition("=")
    if not sep or optimizer not in ("sgd", "adam"):
        p.error(f"--lrs: expected OPTIMIZER=LR,... with OPTIMIZER sgd or adam, got {args.lrs!r}")
    args.optimizer = optimizer
    args.lrs = option_list(p, "--lrs", lrs, float, low=1e-8, high=1e4)  # policy_sweep's --grid bounds
    sweep = policy_sweep.parse_args(["--tasks", args.task, "--policies", "supermask", *sweep_argv])
    return args, sweep


def layer_state(model: torch.nn.Module) -> list[dict]:
    """Per masked layer: E[σ(S)] and the undecided fraction of its scores."""
    out = []
    for name, layer in masked_layers(model):
        p = torch.sigmoid(layer.scores.detach().float())
        undecided = ((p >= UNDECIDED[0]) & (p <= UNDECIDED[1])).float().mean()
        out.append({"layer": name, "weights": p.numel(), "expected_density": round(float(p.mean()), 4),
                    "undecided": round(float(undecided), 4)})
    return out


def trace_run(task: str, density: float, seed: int, optimizer: str, lr: float, splits, sweep, every: int) -> dict:
    """One supermask run as policy_sweep trains it, with its trace and both evaluation masks."""
    trace, losses, last = [], [], {}

    def on_step(model, step, loss):
        losses.append(loss)
        last["model"] = model
        if step % every == 0:
            trace.append({"step": step, "loss": round(sum(losses[-every:]) / len(losses[-every:]), 4),
                          "layers": layer_state(model)})

    result = policy_sweep.train_one(task, "supermask", density, seed, optimizer, lr, splits, sweep, on_step=on_step)
    point = {"task": task, "density": density, "seed": seed, "optimizer": optimizer, "lr": lr, **result}
    if result["diverged"]:  # as the sweep scores a diverged run: no accuracy (and no model if no step was taken)
        return {**point, "val_acc_expected_mask": float("nan"),
                "final_layers": layer_state(last["model"]) if last else [], "trace": trace}
    model = last["model"]
    (policy, _), = masks.policy_groups(model)
    val_x, val_y = policy_sweep._limit(splits.val_x, splits.val_y, sweep.val_limit)
    sweep_eval_mask, policy.eval_mask = policy.eval_mask, "expected"
    val_expected = accuracy(model, val_x, val_y)
    policy.eval_mask = sweep_eval_mask
    return {**point, "val_acc_expected_mask": val_expected, "final_layers": layer_state(model), "trace": trace}


def plot(points: list[dict], path: Path) -> None:
    """Loss, and the undecided fraction of the first and the last masked layer (the smallest ones, which decide
    first; the big middle layers stay undecided), against the step, one colour per run."""
    plt = pyplot("supermask_trace")
    if plt is None:
        return
    fig, (ax_loss, ax_open) = plt.subplots(1, 2, figsize=(11, 4))
    for i, point in enumerate(points):
        label = f"seed {point['seed']} {point['optimizer']} {point['lr']:g} (val {100 * point['val_acc']:.1f}%)"
        steps = [t["step"] for t in point["trace"]]
        ax_loss.plot(steps, [t["loss"] for t in point["trace"]], color=f"C{i}", label=label)
        for which, style in ((0, "-"), (-1, "--")):
            ax_open.plot(steps, [t["layers"][which]["undecided"] for t in point["trace"]], style, color=f"C{i}")
    ax_loss.set(xlabel="step", ylabel="training loss (mean over the interval)")
    ax_open.set(xlabel="step", ylabel="undecided scores, σ(S) in [0.02, 0.98]", ylim=(0, 1),
                title="solid: first masked layer, dashed: last")
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args, sweep = parse_args(argv)
    setup_threads(args.threads)
    folder = run_dir("supermask_trace", args.run, args.out)
    config = {k: v for k, v in vars(args).items() if k not in ("run", "out")}
    config["sweep"] = {k: v for k, v in vars(sweep).items() if k in ("epochs", "batch_size", "train_limit",
                                                                      "val_limit", "test_limit", "weight_init",
                                                                      "scale_fan", "score_init", "policy_options")}
    results = Results(folder, config)
    _, dataset = policy_sweep.TASKS[args.task]
    splits = data.load(dataset).normalize()
    for seed in args.seeds:
        for lr in args.lrs:
            point = trace_run(args.task, args.density, seed, args.optimizer, lr, splits, sweep, args.every)
            results.add(point)
            print(f"seed {seed} {args.optimizer} lr={lr:g}: val {point['val_acc']:.4f} (expected mask "
                  f"{point['val_acc_expected_mask']:.4f}), test {point['test_acc']:.4f}, undecided at the end "
                  + " ".join(f"{l['undecided']:.2f}" for l in point["final_layers"]), flush=True)
    results.write("done")
    plot(results.points, folder / "trace.png")
    print(f"wrote {folder / 'results.json'} and {folder / 'trace.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
