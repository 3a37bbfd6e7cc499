"""Trainer benchmark: seconds per epoch of mask training against dense training, through maskprune.train.

Both modes run the same model, data and batch size in this process, in alternating rounds (dense, mask,
dense, mask, ...), and the medians of the per-epoch train seconds (from each run's metrics.jsonl) are
reported with their ratio. Writes results/bench_epoch/results.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from maskprune.train import TrainConfig, train  # noqa: E402

MODES = ("dense", "mask")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="lenet300")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run")
    p.add_argument("--rounds", type=int, default=3, help="runs per mode, alternating")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit-train", type=int, default=0, help="training examples (0 = all)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--out", default="results/bench_epoch/results.json")
    args = p.parse_args(argv)
    _common.check_minimum(p, args, {"epochs": 1, "rounds": 1, "batch_size": 1, "limit_train": 0, "threads": 0})
    return args


def epoch_seconds(mode: str, args, seed: int) -> tuple[list[float], float]:
    """(train seconds of each epoch, final validation accuracy) of one run of the trainer."""
    cfg = TrainConfig(model=args.model, dataset=args.dataset, mode=mode, epochs=args.epochs,
                      batch_size=args.batch_size, seed=seed, device="cpu", threads=args.threads,
                      limit_train=args.limit_train)
    with tempfile.TemporaryDirectory(prefix="bench_epoch-") as tmp:
        train(cfg, Path(tmp) / "run", quiet=True)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["train_seconds"] for r in rows], rows[-1]["val_acc"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    _common.setup_threads(args.threads)
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    val_acc: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            s, acc = epoch_seconds(mode, args, seed=r)
            seconds[mode] += s
            val_acc[mode].append(acc)
            print(f"round {r} {mode:5s}: " + ", ".join(f"{x:.3f}" for x in s) + f" s per epoch, val acc {acc:.4f}",
                  flush=True)
    medians = {m: statistics.median(seconds[m]) for m in MODES}
    ratio = medians["mask"] / medians["dense"]
    print(f"median train seconds per epoch: dense {medians['dense']:.3f}, mask {medians['mask']:.3f} "
          f"-> mask / dense = {ratio:.2f}")
    result = {"config": vars(args), "epoch_train_seconds": seconds, "median_s": medians, "mask_over_dense": ratio,
              "val_acc": val_acc, "environment": _common.environment("cpu"), "threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
