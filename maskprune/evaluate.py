"""A saved run folder back in Python: :func:`load_run` rebuilds the network from config.toml and a checkpoint,
:func:`evaluate_run` re-tests each checkpoint. Both read the folder only through :mod:`maskprune.runfiles`:
no file of a (shared) run folder can run code, and every malformed one is a RunFileError naming it."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from . import data as datasets
from .runfiles import RunFileError, check_fits, load_model_state, read_checkpoint, read_run_config
from .train import TrainConfig, build_model, evaluate, kept_fraction, resolve_device

__all__ = ["load_run", "evaluate_run"]


def _build(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The run's network with its random init; the caller's RNG state is left as it was."""
    info = datasets.DATASETS[cfg.dataset]
    with torch.random.fork_rng(devices=[]):
        return build_model(cfg, info.num_classes, info.in_shape).to(device)


def load_run(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu"
             ) -> tuple[torch.nn.Module, TrainConfig]:
    """The network of a run folder that ``maskprune train`` (or :func:`maskprune.train.train`) wrote.

    Args:
        run_dir: the run folder (holds config.toml, best.pt, last.pt).
        which: "best" (the best-validation epoch's weights) or "last" (the last finished epoch's).
        device: where the model goes ("cpu", "cuda", "cuda:1", a torch.device).

    Returns:
        ``(model, config)``: the network rebuilt from config.toml (masked layers in mask mode) with the
        checkpoint's weights and scores, in eval mode; and the run's :class:`~maskprune.train.TrainConfig`.
        Inputs are normalized as in training: ``maskprune.data.load(config.dataset).normalize()``.

    Raises:
        ValueError: ``which`` is not "best" or "last".
        maskprune.RunFileError: config.toml or the checkpoint is missing, malformed, does not fit the network,
            or may carry code (checkpoints are read with ``weights_only=True``).
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    dev = torch.device(device)
    cfg = read_run_config(run_dir, device=str(dev))
    path = Path(run_dir) / f"{which}.pt"
    checkpoint = read_checkpoint(path, kind=which, map_location=dev)
    check_fits(cfg, checkpoint, path)  # before the network is allocated
    model = _build(cfg, dev)
    load_model_state(model, checkpoint, path)
    return model.eval(), cfg


def evaluate_run(run: str | os.PathLike, device: str | None = None) -> dict:
    """Validation and test accuracy of RUN/last.pt and RUN/best.pt, in fp32.

    Both checkpoints are read and checked before anything is evaluated. Raises
    :class:`~maskprune.runfiles.RunFileError` for a bad config.toml or checkpoint, or a run folder with neither.
    """
    cfg = read_run_config(run, device=device)
    dev = resolve_device(cfg.device, 0)
    checkpoints = {}
    for name in ("last", "best"):
        path = Path(run) / f"{name}.pt"
        if path.exists():
            checkpoints[name] = (path, read_checkpoint(path, kind=name, map_location=dev))
            check_fits(cfg, checkpoints[name][1], path)
    if not checkpoints:
        raise RunFileError(Path(run), "holds neither last.pt nor best.pt: the run stopped before its first epoch "
                                      "ended; nothing to evaluate")
    model = _build(cfg, dev)
    splits = datasets.load(cfg.dataset, root=cfg.data_root or None).normalize().to(dev)
    result = {"run": str(run), "device": str(dev)}
    for name, (path, checkpoint) in checkpoints.items():
        load_model_state(model, checkpoint, path)
        _, val_acc = evaluate(model, splits.val_x, splits.val_y, 1024, contextlib.nullcontext)
        _, test_acc = evaluate(model, splits.test_x, splits.test_y, 1024, contextlib.nullcontext)
        result[name] = {"epoch": checkpoint["epoch"] + 1, "val_acc": val_acc, "test_acc": test_acc,
                        "kept_fraction": kept_fraction(model)}
    return result
