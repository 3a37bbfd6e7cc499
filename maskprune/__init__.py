"""maskprune: find accurate subnetworks inside frozen random networks by learning scores."""
from __future__ import annotations

__version__ = "0.1.0"

import os
from typing import TYPE_CHECKING

from . import data, ops, rng, seed_ops
from .nn import ConvertSummary, MaskedConv2d, MaskedLinear, convert, mask_stats, masked_tensors, to_dense
from .ops import apply_mask, global_threshold, masked_linear, threshold
from .runfiles import RunFileError
from .ticket import TicketError, load_ticket, save_ticket

if TYPE_CHECKING:
    import torch

    from .train import TrainConfig


def load_run(run_dir: str | os.PathLike, which: str = "best",
             device: str | torch.device = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """``(model, config)`` of a saved run folder, ready for eval; see :func:`maskprune.evaluate.load_run`.
    Files are read without running code; a bad one raises :class:`RunFileError` naming it."""
    from .evaluate import load_run as _load_run  # imports the trainer: only when asked for

    return _load_run(run_dir, which=which, device=device)


__all__ = ["data", "ops", "threshold", "global_threshold", "apply_mask", "masked_linear", "MaskedLinear", "MaskedConv2d",
           "convert", "mask_stats", "masked_tensors", "ConvertSummary", "to_dense", "load_run", "RunFileError",
           "rng", "seed_ops", "save_ticket", "load_ticket", "TicketError", "__version__"]
