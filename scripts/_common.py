"""Helpers the experiment scripts share: threads, seeds, the environment record, incremental results.json.

`Results` keeps one run's record ({config, environment, points, ...}) and rewrites
results/<script>/<run>/results.json atomically after every point, so a run that is cut off still
leaves every finished point on disk (status "running"; "done" once finished).
"""
from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import maskprune

REPO = Path(__file__).resolve().parents[1]


def setup_threads(n: int) -> None:
    """Intra-op threads. On a shared CPU one thread is often much faster than several (no OpenMP stalls)."""
    if n > 0:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere, which on Linux is only the
    architecture): step-cost ratios differ between CPU models, so every result names its CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def pyplot(script: str):
    """matplotlib.pyplot on the file-only Agg backend, or None (after saying so on stderr) where matplotlib is not
    installed: a script's results JSON never depends on its plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{script}: matplotlib is not installed; no PNG written (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def environment(device: torch.device | str = "cpu") -> dict:
    """Where and with what the numbers were made."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": str(device), "device_name": name, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "numpy": np.__version__,
        "maskprune": maskprune.__version__,
        "mask_backend": maskprune.ops.resolve_backend("auto", device).name,
        "argv": sys.argv,
    }


def run_dir(script: str, run: str | None, out: str | None) -> Path:
    """results/<script>/<run>/ unless --out names another folder."""
    if out:
        return Path(out)
    run = run or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return REPO / "results" / script / run


class Results:
    """One run's results.json, rewritten after every point."""

    def __init__(self, folder: Path, config: dict, device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "results.json"
        self.t0 = time.perf_counter()
        self.record = {
            "config": config, "environment": environment(device),
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "running", "wall_time_s": 0.0, "points": [],
        }
        self.write()

    @property
    def points(self) -> list[dict]:
        return self.record["points"]

    def add(self, point: dict) -> None:
        self.points.append(point)
        self.write()

    def write(self, status: str | None = None) -> None:
        if status is not None:
            self.record["status"] = status
        self.record["wall_time_s"] = round(time.perf_counter() - self.t0, 2)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, self.path)

    def finish(self, **extra) -> None:
        self.record.update(extra)
        self.record["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.write("done")


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(list(values), dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def grid_search(lrs: list, evaluate, extend: int) -> tuple[float, float, list]:
    """(best validation accuracy, its lr, the lrs tried, sorted): evaluate(lr) -> validation accuracy for each lr
    of the grid; then, while the best lies at an edge (at most `extend` times), one lr more past that edge by the
    grid's own ratio, so that every choice is an interior optimum or says it is not. The best starts as (-1, the
    middle lr): kept if every run diverges (a NaN accuracy never compares greater)."""
    best = (-1.0, lrs[len(lrs) // 2])
    tried: dict[float, float] = {}

    def one(lr: float) -> None:
        nonlocal best
        tried[lr] = evaluate(lr)
        if tried[lr] > best[0]:
            best = (tried[lr], lr)

    for lr in lrs:
        one(lr)
    for _ in range(extend if len(lrs) > 1 else 0):
        ordered = sorted(tried)
        if best[1] == ordered[-1]:
            one(round(best[1] * ordered[-1] / ordered[-2], 10))
        elif best[1] == ordered[0]:
            one(round(best[1] * ordered[0] / ordered[1], 10))
        else:
            break
    return best[0], best[1], sorted(tried)


def parse_list(text: str, kind=float) -> list:
    return [kind(v) for v in str(text).split(",") if v.strip()]


def option_list(parser, flag: str, text: str, kind=float, *, accepted=None, what: str = "value", low=None,
                high=None) -> list:
    """A comma list option, checked: a bad item ends the script through parser.error (exit code 2)
    with a message naming the flag and what it accepts; nothing has run or been written yet."""
    try:
        values = parse_list(text, kind)
    except ValueError:
        parser.error(f"{flag}: a comma list of {kind.__name__} values, got {text!r}")
    for v in values:
        if accepted is not None and v not in accepted:
            parser.error(f"{flag}: unknown {what} {v!r}; accepted: {', '.join(map(str, accepted))}")
        if (low is not None and not v >= low) or (high is not None and not v <= high):
            parser.error(f"{flag}: every value must be in [{low}, {high}], got {v!r}")
    return values


def check_minimum(parser, args, minimums: dict) -> None:
    """Each numeric option named in `minimums` (dest -> least accepted value), or parser.error naming it."""
    for dest, low in minimums.items():
        value = getattr(args, dest)
        if value < low:
            parser.error(f"--{dest.replace('_', '-')}: must be >= {low}, got {value}")


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
        epochs: int, batch_size: int, loss_fn, seed: int, history: list | None = None) -> float:
    """Minibatch training with the trainer's per-step cosine schedule; returns the last epoch's mean loss.

    The order of examples depends only on (seed, epoch), as in maskprune.train. When `history` is a list,
    each epoch's mean training loss is appended to it (a convergence curve; nan once the loss diverged).
    """
    from maskprune.train import lr_factor

    steps_per_epoch = -(-len(x) // batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, 0))
    model.train()
    loss_sum, seen = 0.0, 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        loss_sum, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            if not np.isfinite(loss_sum):
                if history is not None:
                    history.append(float("nan"))
                return float("nan")
        if history is not None:
            history.append(loss_sum / max(seen, 1))
    return loss_sum / max(seen, 1)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 (no weight decay) or Adam at its defaults, the two the grids use."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9) if name == "sgd" else torch.optim.Adam(params, lr=lr)


def fit_policy(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               epochs: int, batch_size: int, seed: int, label: str | None = None,
               on_step: Callable[[torch.nn.Module, int, float], None] | None = None) -> dict:
    """Mask training as maskprune's trainer runs a policy: the per-step cosine schedule, the policy's penalty
    added to the cross-entropy, its gradient, step and epoch hooks, its finalize after the last epoch. Stops before the
    step at a non-finite loss. Returns steps taken, whether it diverged, and the last epoch's mean loss.

    The order of examples depends only on (seed, epoch); with a `label`, a tqdm bar shows each epoch's loss;
    `on_step(model, step, loss)` runs after every step's hooks (a trace; it must not change the model)."""
    import torch.nn.functional as F
    from tqdm import tqdm

    from maskprune import masks
    from maskprune.train import lr_factor

    total = epochs * -(-len(x) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, 0))
    step, diverged, loss_sum = 0, False, 0.0
    model.train()
    epochs_iter = (tqdm(range(epochs), desc=label, leave=False, mininterval=2.0, file=sys.stderr)
                   if label is not None else range(epochs))
    for epoch in epochs_iter:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        loss_sum = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            penalty = masks.policy_penalty(model)
            if penalty is not None:
                loss = loss + penalty
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            masks.before_step_hooks(model)
            optimizer.step()
            scheduler.step()
            step += 1
            masks.step_hooks(model, step)
            loss_value = float(loss.detach())
            loss_sum += loss_value * len(idx)
            if on_step is not None:
                on_step(model, step, loss_value)
        if diverged:
            break
        masks.epoch_hooks(model, epoch + 1)
        if label is not None:
            epochs_iter.set_postfix(loss=f"{loss_sum / len(x):.3f}")
    if label is not None:
        epochs_iter.close()
    masks.finalize_policies(model)
    return {"steps": step, "diverged": diverged, "train_loss": float("nan") if diverged else loss_sum / len(x)}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Top-1 accuracy in eval mode, in batches; leaves the model in train mode."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train()
    return correct / len(x)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])
    model.train()
    return out
