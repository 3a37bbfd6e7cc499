"""The trainer: mask search over a frozen random network (mode="mask") or dense training (mode="dense").

One loop, top to bottom: config, checks, distributed set-up, data, model, optimizer and schedule, resume,
epochs (train, validate, log, checkpoint), final test of the last and the best-validation model.
Runs under `torchrun` as DistributedDataParallel (gloo on CPU, nccl on CUDA); only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import maskprune
from . import data as datasets
from . import masks, models, ops
from .masks import POLICIES
from .nn import SCORE_INITS, WEIGHT_INITS, WEIGHT_MODES, convert, mask_stats
from .seed_ops import SEED_POLICIES
from .runfiles import (RunFileError, _short, check_fits, load_model_state, load_training_state, read_metrics,
                       read_toml)
from .runfiles import read_checkpoint as _read_checkpoint

# The files a run writes into its folder (--overwrite removes exactly these, nothing else).
RUN_FILES = ("config.toml", "metrics.jsonl", "last.pt", "best.pt", "summary.json")


class ConfigError(ValueError):
    """A bad option: names the option (as a CLI flag) and what is accepted."""

    def __init__(self, key: str, message: str):
        super().__init__(f"--{key.replace('_', '-')}: {message}")
        self.key = key


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run after its folder was written; says where it stopped and how to go on.

    ``epoch``: the 1-based epoch that was running (``epochs + 1`` during the final test); ``saved``: how many
    epochs RUN/last.pt holds (0: none, the run cannot be resumed and is started again with --overwrite);
    ``run_dir``; ``command``: the exact ``maskprune`` command that continues (or restarts) it.
    A KeyboardInterrupt, so code that catches Ctrl-C still does.
    """

    def __init__(self, run_dir: Path, epoch: int, epochs: int, saved: int):
        import shlex

        self.run_dir, self.epoch, self.epochs, self.saved = Path(run_dir), epoch, epochs, saved
        where = f"in epoch {epoch} of {epochs}" if epoch <= epochs else "during the final test"
        if saved:
            self.command = f"maskprune train --resume {shlex.quote(str(self.run_dir / 'last.pt'))}"
            message = (f"interrupted {where}; {self.run_dir / 'last.pt'} holds epochs 1-{saved}. "
                       f"Continue with: {self.command}")
        else:
            self.command = (f"maskprune train --config {shlex.quote(str(self.run_dir / 'config.toml'))} "
                            f"--out {shlex.quote(str(self.run_dir))} --overwrite")
            message = (f"interrupted {where}, before any epoch finished: there is no last.pt to resume. "
                       f"Start again with: {self.command}")
        super().__init__(message)


@dataclass
class TrainConfig:
    """Every setting of a run; written to RUN/config.toml. Defaults follow edge-popup's small nets."""

    model: str = "lenet300"
    dataset: str = "mnist"
    mode: str = "mask"                   # "mask": learn scores over frozen weights; "dense": train weights
    density: float = 0.5                 # fraction of weights kept (mask mode)
    policy: str = "layerwise"            # a mask policy of maskprune.masks (layerwise, global, supermask, ...)
    policy_options: str = ""             # the policy's options, "key=value,..." (e.g. "period=300,prob=0.1")
    weight_init: str = "signed_constant"
    generator: str = "philox"            # frozen weights: "philox" (maskprune.rng keyed by seed; tickets) or "torch"
    weights: str = "stored"              # "stored", or "seed": regenerated from the key in every pass, never stored
    score_init: str = "kaiming_uniform"
    scale_fan: bool = True               # weight std as if fan_in were density * fan_in (edge-popup's scaled init)
    width: float = 1.0                   # multiplies every hidden width
    widths: str = ""                     # hidden widths of `mlp`, e.g. "1000,1000"
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"               # "sgd" or "adam"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    amp: bool = True                     # bf16 autocast (CUDA only; ignored on CPU)
    seed: int = 0
    device: str = "auto"                 # "auto", "cpu", "cuda", "cuda:N"
    backend: str = "auto"                # mask-op backend: auto, torch, cpp, triton
    threads: int = 0                     # CPU threads of this process (0 = torch's default)
    limit_train: int = 0                 # use only the first N training examples (0 = all); for tests
    data_root: str = ""                  # dataset cache ("" = $MASKPRUNE_DATA or ~/.cache/maskprune)


CHOICES = {"mode": ("mask", "dense"), "policy": POLICIES, "weight_init": WEIGHT_INITS,
           "score_init": SCORE_INITS, "optimizer": ("sgd", "adam"), "generator": ("philox", "torch"),
           "weights": WEIGHT_MODES}
# Settings a resumed run may change: where and how it computes, not what it computes.
RESUMABLE = ("device", "backend", "threads", "data_root")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks every field before anything is built or written; raises ConfigError naming the option."""
    if isinstance(cfg.widths, (list, tuple)):  # a TOML file may give widths = [1000, 1000]
        cfg.widths = ",".join(str(w) for w in cfg.widths)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        expected = type(f.default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f.name, f"must be {expected.__name__}, got {_short(value)}")
    for key, accepted in CHOICES.items():
        if getattr(cfg, key) not in accepted:
            raise ConfigError(key, f"must be one of {', '.join(accepted)}, got {_short(getattr(cfg, key))}")
    if cfg.model not in models.available():
        raise ConfigError("model", f"must be one of {', '.join(models.available())}, got {_short(cfg.model)}")
    if cfg.dataset not in datasets.DATASETS:
        raise ConfigError("dataset", f"must be one of {', '.join(datasets.DATASETS)}, got {_short(cfg.dataset)}")
    if not (math.isfinite(cfg.density) and 0.0 < cfg.density <= 1.0):
        raise ConfigError("density", f"must be in (0, 1], got {cfg.density}")
    for key in ("epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(key, f"must be >= 1, got {getattr(cfg, key)}")
    for key in ("lr", "width"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) > 0):
            raise ConfigError(key, f"must be a positive number, got {getattr(cfg, key)}")
    for key in ("momentum", "label_smoothing"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(key, f"must be in [0, 1), got {getattr(cfg, key)}")
    for key in ("weight_decay", "warmup_epochs", "threads", "limit_train"):
        if not getattr(cfg, key) >= 0:
            raise ConfigError(key, f"must be >= 0, got {getattr(cfg, key)}")
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum == 0):
        raise ConfigError("nesterov", "needs --optimizer sgd with --momentum > 0")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError("warmup_epochs", f"must be <= --epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    try:
        options = masks.parse_options(cfg.policy, cfg.policy_options)
    except ValueError as err:
        raise ConfigError("policy_options", str(err)) from None
    if options and cfg.mode == "dense":
        raise ConfigError("policy_options", "apply to --mode mask only")
    if cfg.weights == "seed":
        if cfg.mode != "mask" or cfg.generator != "philox":
            raise ConfigError("weights", "seed needs --mode mask and --generator philox (weights regenerated from "
                                         f"their key), got --mode {cfg.mode} --generator {cfg.generator}")
        if cfg.policy not in SEED_POLICIES:
            raise ConfigError("weights", f"seed runs the policies {', '.join(SEED_POLICIES)}, got --policy {cfg.policy}")
    if cfg.widths and cfg.model != "mlp":
        raise ConfigError("widths", f"applies to --model mlp only, got --model {cfg.model}")
    if cfg.widths:
        try:
            if any(int(w) < 1 for w in cfg.widths.split(",")):
                raise ValueError
        except ValueError:
            raise ConfigError("widths", f"must be comma-separated positive integers, got {_short(cfg.widths)}") from None
    try:  # torch.device() raises RuntimeError or ValueError on names it cannot parse
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              "cpu" if cfg.device == "auto" else cfg.device)
    except (RuntimeError, ValueError):
        raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got {_short(cfg.device)}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got {_short(cfg.device)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError("device", f"{cfg.device} does not exist; torch sees {torch.cuda.device_count()} GPU(s)")
    try:
        ops.resolve_backend(cfg.backend, device)
    except ValueError as err:
        raise ConfigError("backend", str(err)) from None
    return cfg


# ----------------------------------------------------------------------------------------------
# Config files (TOML): read with tomllib, written by a flat writer (every value is a scalar)
# ----------------------------------------------------------------------------------------------

def load_config_file(path: str | os.PathLike) -> dict:
    """Reads a --config TOML file (see :func:`maskprune.runfiles.read_toml`); any problem with it is a
    ConfigError naming --config and the file."""
    try:
        return read_toml(path)
    except RunFileError as err:
        raise ConfigError("config", str(err)) from None


def dump_config(cfg: TrainConfig) -> str:
    """The config as TOML, one `key = value` line per field (json.dumps quotes strings as TOML does)."""
    lines = []
    for key, value in dataclasses.asdict(cfg).items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Pieces the loop calls
# ----------------------------------------------------------------------------------------------

def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def policy_options(cfg: TrainConfig) -> dict:
    """The policy's options for convert: cfg.policy_options, plus what the run itself decides unless given
    (the random draws of supermask / iterand keyed by the run's seed, gem_miner's schedule by its epochs)."""
    options = masks.parse_options(cfg.policy, cfg.policy_options)
    if cfg.policy in ("supermask", "iterand"):
        options.setdefault("seed", cfg.seed % 2 ** 32)
    if cfg.policy == "gem_miner":
        options.setdefault("epochs", cfg.epochs)
    return options


def build_model(cfg: TrainConfig, num_classes: int, in_shape: tuple) -> nn.Module:
    """The named network; in mask mode converted to masked layers over frozen random weights."""
    kwargs = {"widths": cfg.widths} if cfg.widths else {}
    try:
        model = models.create(cfg.model, num_classes=num_classes, in_shape=in_shape, width=cfg.width,
                              bias=cfg.mode == "dense", **kwargs)
    except ValueError as err:  # e.g. a conv net too deep for the dataset's image size
        raise ConfigError("model", f"{cfg.model} cannot be built for {cfg.dataset} {tuple(in_shape)}: {err}") from None
    if cfg.mode == "mask":
        convert(model, cfg.density, policy=cfg.policy, weight_init=cfg.weight_init, score_init=cfg.score_init,
                scale_fan=cfg.scale_fan, backend=cfg.backend,
                weight_seed=cfg.seed if cfg.generator == "philox" else None, options=policy_options(cfg),
                weights=cfg.weights)
    return model


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero, per optimizer step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast) -> tuple[float, float]:
    """Mean loss and accuracy over (x, y) in eval mode."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with autocast():
            logits = model(xb).float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train()
    return loss_sum.item() / len(x), correct.item() / len(x)


def kept_fraction(model: nn.Module) -> float:
    try:
        return mask_stats(model)["fraction"]
    except ValueError:  # dense mode: nothing is masked
        return 1.0


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(kept, total) weights of the Linear/Conv layers: the masks' counts in mask mode, all of them in dense mode."""
    try:
        stats = mask_stats(model)
        return stats["kept"], stats["total"]
    except ValueError:
        total = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        return total, total


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A run's last.pt for --resume, loaded without running code (:func:`maskprune.runfiles.read_checkpoint`).

    A missing file is a ConfigError on --resume (saying to use --overwrite when the run stopped before its
    first epoch ended); a malformed one is a :class:`~maskprune.runfiles.RunFileError`.
    """
    path = Path(path)
    if not path.exists():
        if (path.parent / "config.toml").is_file() and path.name == "last.pt":
            raise ConfigError("resume", f"{path} does not exist: the run in {path.parent} stopped before its first "
                                        f"epoch ended, so there is nothing to resume; start it again with "
                                        f"--config {path.parent / 'config.toml'} --out {path.parent} --overwrite")
        raise ConfigError("resume", f"checkpoint {path} does not exist (give RUN/last.pt of a stopped run)")
    return _read_checkpoint(path, kind="last")


def check_resume(checkpoint: dict, cfg: TrainConfig, resume: str, out: Path) -> None:
    """A resumed run continues in the checkpoint's own folder with the settings that made it."""
    if out.resolve() != Path(resume).resolve().parent:
        raise ConfigError("out", f"a resumed run continues in its own folder {Path(resume).parent}, got {out}")
    differ = [k for k, v in checkpoint["config"].items() if k not in RESUMABLE and getattr(cfg, k, v) != v]
    if differ:
        saved = ", ".join(f"{k}={checkpoint['config'][k]!r}" for k in differ)
        raise ConfigError("resume", f"the checkpoint was made with {saved}; resume with the same settings "
                                    f"(only {', '.join(RESUMABLE)} may change)")


def check_out_dir(out: Path, resume: str | None, overwrite: bool) -> None:
    """Refuses a non-empty --out unless resuming or overwriting."""
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} exists and is not a directory")
    if not out.exists():
        # The first folder above that exists must be a writable directory: a probe made and removed there finds
        # out now, before data and model are built (root passes os.access even on /proc).
        parent = next((p for p in out.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir():
            raise ConfigError("out", f"{out} cannot be created: {parent} is not a directory")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".maskprune-probe-", dir=parent))
        except OSError as err:
            raise ConfigError("out", f"{out} cannot be created: {parent} is not writable ({err.strerror})") from None
    if resume is None and not overwrite and out.is_dir() and any(out.iterdir()):
        if (out / "last.pt").is_file():
            hint = f"pass --resume {out / 'last.pt'} to continue it, --overwrite to replace it, or another --out"
        else:  # stopped in its first epoch: nothing to resume yet
            hint = "it holds no last.pt to resume (a run stopped in its first epoch); pass --overwrite to start it " \
                   "again, or another --out"
        raise ConfigError("out", f"{out} is not empty; {hint}")


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file, so a run stopped mid-write never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: str | None = None, overwrite: bool = False,
          quiet: bool = False) -> dict:
    """Runs (or resumes from RUN/last.pt) one training run into `out` and returns its summary."""
    # -- checks: config, output folder, checkpoint; nothing is written before data and model are built too
    cfg = validate(cfg)
    out = Path(out)
    check_out_dir(out, resume, overwrite)
    checkpoint = None
    if resume is not None:
        checkpoint = read_checkpoint(resume)
        check_resume(checkpoint, cfg, resume, out)
        if "generator" not in checkpoint["config"]:  # made before maskprune.rng: its weights came from torch's RNG
            cfg = dataclasses.replace(cfg, generator="torch")
        # the network must fit the checkpoint (checked on the meta device, before anything is allocated), and
        # the run's best.pt, which the final test reads, must be sound too: a resume that fails writes nothing
        check_fits(cfg, checkpoint, resume)
        best_path = Path(resume).parent / "best.pt"
        if not best_path.exists():
            raise RunFileError(best_path, "does not exist: a run folder holds best.pt beside last.pt")
        check_fits(cfg, _read_checkpoint(best_path, kind="best"), best_path)

    # -- distributed: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if distributed and cfg.batch_size % world:
        raise ConfigError("batch_size", f"must be divisible by the number of processes ({world}), "
                                        f"got {cfg.batch_size}")
    device = resolve_device(cfg.device, local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    master = rank == 0

    # -- data, held on the device as tensors (a dataset that cannot be fetched stops here, before any write)
    splits = datasets.load(cfg.dataset, root=cfg.data_root or None).normalize().to(device)
    train_x, train_y = splits.train_x, splits.train_y
    if cfg.limit_train:
        train_x, train_y = train_x[:cfg.limit_train], train_y[:cfg.limit_train]

    # -- model: the same seed gives every rank the same random weights and scores
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, splits.num_classes, splits.in_shape).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else model

    # -- optimizer and per-step schedule
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    if len(train_x) % cfg.batch_size and len(train_x) % cfg.batch_size < world:
        steps_per_epoch -= 1  # a last batch too small to give every rank an example is dropped
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
    use_amp = cfg.amp and device.type == "cuda"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

    # -- resume: weights/scores, optimizer and schedule state, and the run's bookkeeping
    # (each checked to fit the network and optimizer built here, before anything is written)
    start_epoch, best_val, best_epoch, wall = 0, -1.0, 0, 0.0
    kept_lines: list[str] = []
    if checkpoint is not None:
        load_model_state(model, checkpoint, resume)
        load_training_state(optimizer, scheduler, checkpoint, resume)
        if cfg.mode == "mask" and "policy" in checkpoint:  # the policy's own state (IteRand, Gem-Miner, ...)
            try:
                masks.load_policy_state(model, checkpoint["policy"])
            except (ValueError, KeyError, TypeError) as err:
                raise RunFileError(resume, f"its 'policy' state does not fit --policy {cfg.policy}: {err}") from None
        start_epoch, best_val = checkpoint["epoch"] + 1, float(checkpoint["best_val_acc"])
        best_epoch, wall = checkpoint["best_epoch"], float(checkpoint["wall_time"])
        if master:
            # Keep the lines of the epochs the checkpoint holds (a stop between two writes may have left one more);
            # a torn or corrupt line is dropped, with a word.
            metrics = read_metrics(out / "metrics.jsonl")
            kept_lines = [line for line, rec in zip(metrics.lines, metrics.records) if rec["epoch"] <= start_epoch]
            if metrics.dropped and not quiet:
                print(f"maskprune: warning: {out / 'metrics.jsonl'}: dropped {metrics.dropped} unreadable line(s)",
                      file=sys.stderr, flush=True)

    # -- every check has passed: now the run folder is written (by rank 0 only)
    if master:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError("out", f"{out} cannot be created: {err.strerror}") from None
        if overwrite and checkpoint is None:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        (out / "config.toml").write_text(dump_config(cfg))
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept_lines))
        if not quiet:
            kept, total = weight_counts(model)
            print(f"{cfg.mode} {cfg.model} on {cfg.dataset}: {len(train_x)} train / {len(splits.val_y)} val / "
                  f"{len(splits.test_y)} test, {kept:,} of {total:,} weights kept, {device}"
                  f"{f' x{world}' if distributed else ''}, epochs {start_epoch + 1}..{cfg.epochs}", flush=True)

    # -- epochs, then the final test; Ctrl-C from here on says where the run stopped and how to continue
    saved = start_epoch  # epochs that RUN/last.pt holds
    epoch = start_epoch
    try:
        show_bar = master and not quiet and sys.stderr.isatty()
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            # The epoch's order depends only on (seed, epoch): a resumed run sees the same batches.
            generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            order = torch.randperm(len(train_x), generator=generator).to(device)
            # Running sums stay on the device: no host sync per step.
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_bar,
                       leave=False, dynamic_ncols=True)
            for step in bar:
                batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                idx = batch.tensor_split(world)[rank] if distributed else batch
                xb, yb = train_x[idx], train_y[idx]
                with autocast():
                    logits = net(xb)
                # Sum over this rank's share, divided by the whole batch: DDP's gradient mean over ranks then
                # equals the gradient of the batch mean, even when the shares differ in size.
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing, reduction="sum") \
                    * (world / len(batch))
                penalty = masks.policy_penalty(model) if cfg.mode == "mask" else None
                optimizer.zero_grad(set_to_none=True)
                (loss if penalty is None else loss + penalty).backward()
                if cfg.mode == "mask":  # the policy's gradient terms (gem_miner's L2), in place
                    masks.before_step_hooks(model)
                optimizer.step()
                scheduler.step()
                if cfg.mode == "mask":  # the policy's hooks (clamps, redraws, ...), keyed by the global step
                    masks.step_hooks(model, epoch * steps_per_epoch + step + 1)
                loss_sum += loss.detach() * (len(batch) / world)
                correct += (logits.argmax(1) == yb).sum()
                seen += len(yb)
                if show_bar and step % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
            bar.close()
            totals = torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(seen)])
            if distributed:
                dist.all_reduce(totals)
            train_loss, train_acc = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
            if cfg.mode == "mask":
                masks.epoch_hooks(model, epoch + 1)  # e.g. Gem-Miner's freezing, before validation and the save
            train_seconds = time.perf_counter() - t0  # after .item(): the device has finished the epoch
            val_loss, val_acc = evaluate(model, splits.val_x, splits.val_y, 1024, autocast)
            seconds = time.perf_counter() - t0
            wall += seconds
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                      "val_acc": val_acc, "lr": lr, "seconds": seconds, "train_seconds": train_seconds,
                      "kept_fraction": kept_fraction(model)}
            improved = val_acc > best_val
            if improved:
                best_val, best_epoch = val_acc, epoch + 1
            if master:  # metrics, best, last: a run stopped between two writes resumes to the same files
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if improved:
                    save_atomic({"model": model.state_dict(), "epoch": epoch, "val_acc": val_acc,
                                 "config": dataclasses.asdict(cfg)}, out / "best.pt")
                save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch, "best_val_acc": best_val,
                             "best_epoch": best_epoch, "wall_time": wall, "config": dataclasses.asdict(cfg),
                             **({"policy": masks.policy_state(model)} if cfg.mode == "mask" else {})},
                            out / "last.pt")
                saved = epoch + 1
                if not quiet:
                    print(f"epoch {epoch + 1:3d}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                          f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.4g}  {seconds:.1f}s", flush=True)

        # -- final test: the last model, then the best-validation one
        epoch = cfg.epochs  # (reported as "during the final test" if Ctrl-C comes now)
        if cfg.mode == "mask":
            masks.finalize_policies(model)  # e.g. Gem-Miner's rounding (the mask itself does not change)
        _, test_last = evaluate(model, splits.test_x, splits.test_y, 1024, autocast)
        if distributed:
            dist.barrier()  # rank 0 has written best.pt
        load_model_state(model, _read_checkpoint(out / "best.pt", kind="best", map_location=device), out / "best.pt")
        _, test_best = evaluate(model, splits.test_x, splits.test_y, 1024, autocast)
    except KeyboardInterrupt:
        raise TrainingInterrupted(out, epoch + 1, cfg.epochs, saved) from None
    kept, total = weight_counts(model)
    summary = {
        "test_acc_last": test_last, "test_acc_best": test_best, "best_val_acc": best_val,
        "best_epoch": best_epoch, "epochs": cfg.epochs, "mode": cfg.mode, "model": cfg.model,
        "dataset": cfg.dataset, "density": cfg.density if cfg.mode == "mask" else 1.0, "policy": cfg.policy,
        "policy_options": policy_options(cfg) if cfg.mode == "mask" else {},
        "kept_weights": kept, "total_weights": total, "kept_fraction": kept / total,
        "wall_time_s": wall, "seconds_per_epoch": wall / cfg.epochs,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "world_size": world,
        "autocast": "bf16" if use_amp else None,
        "backend": ops.resolve_backend(cfg.backend, device).name if cfg.mode == "mask" else "dense",
        "torch": torch.__version__, "maskprune": maskprune.__version__,
    }
    if master:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if distributed:
        dist.barrier()  # no rank leaves (and may tear the group down) before rank 0 has written
    return summary
