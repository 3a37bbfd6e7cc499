"""Re-evaluation of a saved run folder: rebuild the network from config.toml, load each checkpoint, test."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import data as datasets
from .train import TrainConfig, build_model, evaluate, kept_fraction, load_config_file, resolve_device, validate


def evaluate_run(run: Path, device: str | None = None) -> dict:
    """Validation and test accuracy of RUN/last.pt and RUN/best.pt, in fp32."""
    cfg = TrainConfig(**load_config_file(Path(run) / "config.toml"))
    if device is not None:
        cfg.device = device
    elif cfg.device != "cpu" and not torch.cuda.is_available():
        cfg.device = "cpu"  # a run made on a GPU can be checked on a machine without one
    cfg = validate(cfg)
    dev = resolve_device(cfg.device, 0)
    splits = datasets.load(cfg.dataset, root=cfg.data_root or None).normalize().to(dev)
    model = build_model(cfg, splits.num_classes, splits.in_shape).to(dev)
    result = {"run": str(run), "device": str(dev)}
    for name in ("last", "best"):
        path = Path(run) / f"{name}.pt"
        if not path.is_file():
            continue
        checkpoint = torch.load(path, map_location=dev, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        _, val_acc = evaluate(model, splits.val_x, splits.val_y, 1024, contextlib.nullcontext)
        _, test_acc = evaluate(model, splits.test_x, splits.test_y, 1024, contextlib.nullcontext)
        result[name] = {"epoch": checkpoint["epoch"] + 1, "val_acc": val_acc, "test_acc": test_acc,
                        "kept_fraction": kept_fraction(model)}
    return result
