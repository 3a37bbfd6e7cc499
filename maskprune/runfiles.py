"""Readers of the files a run folder holds, safe on files from anyone: one reader per file kind.

Run folders are shared (a colleague's ``best.pt``, a checkpoint from a paper's release), so nothing read from one
may run code, crash with a traceback, hang, or leave a half-written folder behind. Every reader here turns every
malformed input into :class:`RunFileError`, which names the file and says what to do; the ``maskprune`` command
prints it as one line with exit code 2.

=================  ===================================================================================
file               how it is read
=================  ===================================================================================
``last.pt``        :func:`read_checkpoint`: ``torch.load(weights_only=True)`` (tensors and plain
``best.pt``        containers only: a pickle naming any other global is refused before it runs), then
                   every key and type checked; :func:`load_model_state` / :func:`load_training_state`
                   check shapes against the live network and optimizer before loading.
``config.toml``    :func:`read_toml` / :func:`read_run_config`: at most 1 MiB, strict UTF-8, ``tomllib``,
                   known keys only, each value of its field's type, then the trainer's range checks.
``metrics.jsonl``  :func:`read_metrics`: at most 64 MiB; a line that is not a JSON object with an integer
                   ``epoch`` (a line torn by a kill, a flipped byte) is dropped and counted, never fatal.
=================  ===================================================================================

The dataset cache (``tensors-<key>.pt``) is read in :mod:`maskprune.data` with ``weights_only=True`` too; a bad
cache is rebuilt from the verified source files, never an error.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = ["RunFileError", "read_checkpoint", "read_toml", "read_run_config", "read_metrics", "Metrics",
           "check_fits", "load_model_state", "load_training_state", "to_plain", "CHECKPOINT_KINDS"]

CONFIG_MAX_BYTES = 1 << 20     # a run's config.toml is ~600 bytes
METRICS_MAX_BYTES = 64 << 20   # a 1000-epoch run writes ~300 KB
_SHORT = 60                    # longest value quoted in a message

# The keys (and their checks) of each checkpoint kind the trainer writes.
CHECKPOINT_KINDS = {
    "best": ("model", "epoch", "val_acc", "config"),
    "last": ("model", "optimizer", "scheduler", "epoch", "best_val_acc", "best_epoch", "wall_time", "config"),
}
# Keys a checkpoint may hold besides those: the mask policies' state (maskprune.masks.policy_state), which a
# mask run's last.pt carries since issue 17 (older last.pt files have none; their runs used layer-wise or global
# top-k, which keep no state).
OPTIONAL_KEYS = {"best": (), "last": ("policy",)}

RESAVE = ("python -c \"import torch, maskprune.runfiles as r; p = '{path}'; "
          "torch.save(r.to_plain(torch.load(p, weights_only=False)), p)\"")


class RunFileError(ValueError):
    """A file of a run folder that cannot be used: missing, unreadable, malformed, or possibly carrying code.

    ``path`` is the file; the message (``str(err)``) starts with it and says what is wrong and what to do.
    Raised by every reader in :mod:`maskprune.runfiles`, by :func:`maskprune.load_run`,
    :func:`maskprune.evaluate.evaluate_run` and by :func:`maskprune.train.train` on ``resume=``.
    """

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = Path(path)
        self.reason = message
        super().__init__(f"{path}: {message}")


def _short(value: Any) -> str:
    """repr(value) cut to one short line, for messages."""
    text = repr(value) if not isinstance(value, str) or len(value) <= _SHORT else repr(value[:_SHORT]) + "..."
    text = text.replace("\n", "\\n")
    return text if len(text) <= _SHORT + 2 else text[:_SHORT] + "..."


def _type_name(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a float"}.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------------------------
# Checkpoints: last.pt, best.pt
# ----------------------------------------------------------------------------------------------

def _refused_global(err: BaseException) -> str | None:
    """The global a weights-only load refused ("posix.system"), or None when the error is of another kind."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_quantized


def _check_config(path: Path, config: Any) -> None:
    """A checkpoint's config: the TrainConfig fields it was made with, each of its field's type."""
    from .train import TrainConfig

    if not isinstance(config, dict):
        raise RunFileError(path, f"its 'config' is {_type_name(config)}, not a dict of settings")
    fields = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    for key, value in config.items():
        if key not in fields:
            raise RunFileError(path, f"its config holds an unknown setting {_short(key)} (a newer maskprune's "
                                     "checkpoint, or not a maskprune checkpoint)")
        _check_field(path, key, value, fields[key], where="its config: ")


def _check_field(path: Path, key: str, value: Any, expected: type, where: str) -> None:
    ok = isinstance(value, expected) and (expected is not int or not isinstance(value, bool))
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "widths" and isinstance(value, list):  # TOML may give widths = [1000, 1000]
        ok = len(value) <= 64 and all(isinstance(w, int) and not isinstance(w, bool) for w in value)
    if not ok:
        raise RunFileError(path, f"{where}{key!r} must be {_type_name(expected())}, got {_type_name(value)} "
                                 f"{_short(value)}")


def _check_checkpoint(path: Path, ckpt: Any, kind: str | None) -> str:
    """Checks the keys and types of a loaded checkpoint; returns its kind ("last" or "best")."""
    if not isinstance(ckpt, dict) or not all(isinstance(k, str) for k in ckpt):
        raise RunFileError(path, f"holds {_type_name(ckpt)}, not a maskprune checkpoint (a dict of the run's state)")
    found = "last" if "optimizer" in ckpt else "best"
    if kind == "last" and found == "best":
        raise RunFileError(path, "is a best.pt (weights only): resume from the run's last.pt")
    kind = kind or found
    missing = [k for k in CHECKPOINT_KINDS[kind] if k not in ckpt]
    if missing:
        raise RunFileError(path, f"is not a maskprune {kind}.pt: it lacks {', '.join(missing)}")
    model = ckpt["model"]
    if not isinstance(model, dict) or not model:
        raise RunFileError(path, f"its 'model' is {_type_name(model)}, not a non-empty dict of tensors")
    for name, tensor in model.items():
        if not isinstance(name, str) or not _is_tensor(tensor):
            raise RunFileError(path, f"its 'model' maps {_short(name)} to {_type_name(tensor)}, not a dense tensor")
    epoch = ckpt["epoch"]
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch < 10**7):
        raise RunFileError(path, f"its 'epoch' must be an integer >= 0, got {_short(epoch)}")
    _check_config(path, ckpt["config"])
    if kind == "best":
        if not (_number(ckpt["val_acc"]) and 0 <= ckpt["val_acc"] <= 1):
            raise RunFileError(path, f"its 'val_acc' must be a number in [0, 1], got {_short(ckpt['val_acc'])}")
        return kind
    if not (_number(ckpt["best_val_acc"]) and -1 <= ckpt["best_val_acc"] <= 1):
        raise RunFileError(path, f"its 'best_val_acc' must be a number in [-1, 1], got {_short(ckpt['best_val_acc'])}")
    best_epoch = ckpt["best_epoch"]
    if not (isinstance(best_epoch, int) and not isinstance(best_epoch, bool) and 0 <= best_epoch <= epoch + 1):
        raise RunFileError(path, f"its 'best_epoch' must be an integer in [0, epoch + 1], got {_short(best_epoch)}")
    if not (_number(ckpt["wall_time"]) and ckpt["wall_time"] >= 0):
        raise RunFileError(path, f"its 'wall_time' must be a number >= 0, got {_short(ckpt['wall_time'])}")
    opt = ckpt["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) for g in opt["param_groups"])):
        raise RunFileError(path, "its 'optimizer' is not an optimizer state (a dict of 'state' and 'param_groups')")
    if not isinstance(ckpt["scheduler"], dict) or not all(isinstance(k, str) for k in ckpt["scheduler"]):
        raise RunFileError(path, "its 'scheduler' is not a learning-rate schedule state (a dict)")
    policy = ckpt.get("policy", [])
    if not (isinstance(policy, list) and all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in policy)):
        raise RunFileError(path, "its 'policy' is not a list of mask-policy states (dicts with a 'name')")
    return kind


def read_checkpoint(path: str | os.PathLike, kind: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """A run's ``last.pt`` or ``best.pt``, loaded without running code and checked key by key.

    ``kind``: "last" (needs the optimizer and schedule state, for resuming), "best", or None (either).
    The load is ``torch.load(weights_only=True)``: tensors, numbers, strings and plain containers only; a pickle
    that names any other global (``os.system``, a class) is refused before anything runs, with the way to
    re-save a trusted file. Raises :class:`RunFileError` for a missing, torn, foreign or malformed file.
    """
    if kind not in (None, *CHECKPOINT_KINDS):
        raise ValueError(f"kind must be None, 'last' or 'best', got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise RunFileError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        name = _refused_global(err)
        if name is not None:
            raise RunFileError(path, f"refused: it asks to run or build {name}, which a checkpoint never needs, so it "
                                     "may carry code and was not loaded. If you made it and trust it, re-save its "
                                     f"tensors in a trusted environment: {RESAVE.format(path=path)}") from None
        raise RunFileError(path, f"is not a readable checkpoint (torn, corrupt or not a torch file): "
                                 f"{_first_line(err)}") from None
    except OSError as err:
        raise RunFileError(path, f"cannot be read ({err.strerror or _first_line(err)})") from None
    except Exception as err:  # a torn zip, a flipped byte: torch raises many kinds  # noqa: BLE001
        raise RunFileError(path, f"is not a readable checkpoint (torn, corrupt or not a torch file): "
                                 f"{type(err).__name__}: {_first_line(err)}") from None
    _check_checkpoint(path, ckpt, kind)
    return ckpt


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _check_fit(path: Path, own: dict, saved: dict) -> None:
    """Every tensor name and shape of OWN (the network's state dict, real or on the meta device) is in SAVED."""
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    wrong = [f"{k} is {list(saved[k].shape)}, the network's is {list(v.shape)}"
             for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    bad_dtype = [k for k, v in own.items() if k in saved and v.is_floating_point() != saved[k].is_floating_point()]
    if missing or extra or wrong or bad_dtype:
        what = "; ".join(filter(None, [
            f"lacks {', '.join(missing[:3])}" if missing else "", f"has unknown {', '.join(extra[:3])}" if extra else "",
            wrong[0] if wrong else "", f"{bad_dtype[0]} has the wrong dtype" if bad_dtype else ""]))
        raise RunFileError(path, f"does not fit the network its config describes ({what})")


def check_fits(cfg, ckpt: dict, path: str | os.PathLike) -> None:
    """Checks that CKPT's tensors have the names and shapes of the network CFG describes, building that network
    on the meta device (no memory): a config asking for a huge network is refused before anything is allocated,
    since a network that fits the checkpoint is no larger than the file."""
    from . import data as datasets
    from .train import ConfigError, build_model

    info = datasets.DATASETS[cfg.dataset]
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            own = build_model(cfg, info.num_classes, info.in_shape).state_dict()
    except ConfigError as err:
        raise RunFileError(path, f"its config describes no network: {err}") from None
    _check_fit(Path(path), own, ckpt["model"])


def load_model_state(model: torch.nn.Module, ckpt: dict, path: str | os.PathLike) -> None:
    """Loads a checked checkpoint's weights into MODEL, after checking every name and shape fits it."""
    path = Path(path)
    _check_fit(path, model.state_dict(), ckpt["model"])
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError) as err:
        raise RunFileError(path, f"does not fit the network its config describes: {_first_line(err)}") from None


def _like(saved: Any, fresh: Any, depth: int = 0) -> bool:
    """Whether SAVED has the shape of FRESH (a value of the live object's own state): same kind of value,
    same length of lists, same tensor shape. Numbers may be int or float; None matches None or a bool."""
    if depth > 8:
        return False
    if fresh is None:
        return saved is None or isinstance(saved, bool)
    if isinstance(fresh, bool):
        return isinstance(saved, bool)
    if isinstance(fresh, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(fresh, torch.Tensor):
        return _is_tensor(saved) and saved.shape == fresh.shape
    if isinstance(fresh, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(fresh) and all(
            _like(s, f, depth + 1) for s, f in zip(saved, fresh))
    return type(saved) is type(fresh) and saved == fresh


def load_training_state(optimizer: torch.optim.Optimizer, scheduler: Any, ckpt: dict,
                        path: str | os.PathLike) -> None:
    """Loads a checked last.pt's optimizer and schedule state, after checking that they fit the live ones
    (same parameter groups, state tensors of the parameters' shapes, settings of the same types)."""
    path = Path(path)
    fresh_opt, saved_opt = optimizer.state_dict(), ckpt["optimizer"]
    if len(saved_opt["param_groups"]) != len(fresh_opt["param_groups"]):
        raise RunFileError(path, "its optimizer state has a different number of parameter groups than the run's")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for saved_group, fresh_group in zip(saved_opt["param_groups"], fresh_opt["param_groups"]):
        for key, fresh in fresh_group.items():
            if key not in saved_group and key != "params":
                continue  # a setting newer than the checkpoint keeps its default
            if not _like(saved_group.get(key), fresh) and key != "params":
                raise RunFileError(path, f"its optimizer setting {key!r} is {_short(saved_group[key])}, which does "
                                         "not fit the run's optimizer")
        ids = saved_group.get("params")
        if not (isinstance(ids, list) and len(ids) == len(fresh_group["params"])
                and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(params) for i in ids)):
            raise RunFileError(path, "its optimizer state lists other parameters than the run's network has")
    for key, state in saved_opt["state"].items():
        if not (isinstance(key, int) and 0 <= key < len(params) and isinstance(state, dict)):
            raise RunFileError(path, f"its optimizer state has an entry {_short(key)} for no parameter of the run")
        for name, value in state.items():
            ok = isinstance(name, str) and (
                value is None or _number(value)
                or (_is_tensor(value) and (value.dim() == 0 or value.shape == params[key].shape)))
            if not ok:
                raise RunFileError(path, f"its optimizer state {_short(name)} of parameter {key} does not fit it")
    fresh_sched, saved_sched = scheduler.state_dict(), ckpt["scheduler"]
    kept = {}
    for key, fresh in fresh_sched.items():
        if key not in saved_sched:
            continue
        if not _like(saved_sched[key], fresh):
            raise RunFileError(path, f"its schedule state {key!r} is {_short(saved_sched[key])}, which does not "
                                     "fit the run's schedule")
        kept[key] = saved_sched[key]
    try:
        optimizer.load_state_dict(saved_opt)
        scheduler.load_state_dict(kept)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise RunFileError(path, f"its optimizer state does not fit the run: {_first_line(err)}") from None


def to_plain(obj: Any, _depth: int = 0) -> Any:
    """OBJ as tensors and plain containers only (dataclasses as dicts, numpy scalars as numbers), so that
    ``torch.save(to_plain(obj), path)`` writes a file ``read_checkpoint`` accepts. For re-saving a trusted old
    checkpoint; raises TypeError naming anything that cannot be made plain."""
    if _depth > 64:
        raise TypeError("nested more than 64 levels deep")
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if type(obj) is not torch.Tensor else obj
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj), _depth + 1)
    if isinstance(obj, dict):
        return {to_plain(k, _depth + 1): to_plain(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v, _depth + 1) for v in obj) if type(obj) in (list, tuple) else \
            [to_plain(v, _depth + 1) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return to_plain(obj.item(), _depth + 1)
    raise TypeError(f"cannot make {type(obj).__module__}.{type(obj).__qualname__} plain")


# ----------------------------------------------------------------------------------------------
# config.toml
# ----------------------------------------------------------------------------------------------

def _read_capped(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise RunFileError(path, f"cannot be read ({err.strerror or _first_line(err)})") from None
    if len(data) > limit:
        raise RunFileError(path, f"is larger than {limit // 1024} KiB, far more than maskprune writes; not read")
    return data


def read_toml(path: str | os.PathLike) -> dict:
    """A config TOML file as a dict of TrainConfig field names (``-`` read as ``_``) to values of each field's type.

    At most 1 MiB of strict UTF-8; a syntax error, an unknown or repeated key, or a value of the wrong type
    (a table, an array, a date, a string for a number) is a :class:`RunFileError` naming the file and the key.
    Ranges are checked later, by :func:`maskprune.train.validate`.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from .train import TrainConfig

    path = Path(path)
    data = _read_capped(path, CONFIG_MAX_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunFileError(path, f"is not UTF-8 text (byte {err.start}), so not a config file") from None
    try:
        raw = tomllib.loads(text)
    except (ValueError, RecursionError, MemoryError) as err:
        raise RunFileError(path, f"is not valid TOML: {_first_line(err)}") from None
    fields = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    values: dict = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise RunFileError(path, f"unknown key {_short(key)}; accepted keys: {', '.join(sorted(fields))}")
        if name in values:
            raise RunFileError(path, f"key {name!r} is given twice (as {name!r} and {name.replace('_', '-')!r})")
        _check_field(path, name, value, fields[name], where="key ")
        values[name] = value
    return values


def read_run_config(run_dir: str | os.PathLike, device: str | None = None):
    """RUN_DIR/config.toml as a checked TrainConfig (ranges included); DEVICE, when given, replaces the run's.

    Raises :class:`RunFileError` for a missing or bad file; a bad DEVICE stays a ``ConfigError`` naming --device.
    """
    from .train import ConfigError, TrainConfig, validate

    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise RunFileError(path, "does not exist: not a maskprune run folder")
    values = read_toml(path)
    values.setdefault("generator", "torch")  # runs made before maskprune.rng drew their weights with torch's RNG
    cfg = TrainConfig(**values)
    saved_device = cfg.device
    cfg.device = "cpu"
    try:
        cfg = validate(cfg)
    except ConfigError as err:
        raise RunFileError(path, str(err)) from None
    if device is not None:
        cfg.device = device
    elif saved_device != "cpu" and torch.cuda.is_available():
        cfg.device = saved_device  # a run made on a GPU is checked on the CPU when this machine has none
    return validate(cfg)


# ----------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------

class Metrics(NamedTuple):
    """metrics.jsonl as read: the readable lines (text as written) with their records, and how many were not."""
    lines: list[str]
    records: list[dict]
    dropped: int


def read_metrics(path: str | os.PathLike) -> Metrics:
    """The per-epoch records of a metrics.jsonl; a missing file is empty.

    A line that is not UTF-8, not JSON, too deeply nested, or not an object with an integer ``epoch`` >= 1 is
    dropped and counted (a kill mid-write tears the last line). A file over 64 MiB is a :class:`RunFileError`.
    """
    path = Path(path)
    if not path.exists():
        return Metrics([], [], 0)
    data = _read_capped(path, METRICS_MAX_BYTES)
    lines, records, dropped = [], [], 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except (ValueError, RecursionError):
            dropped += 1
            continue
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1):
            dropped += 1
            continue
        lines.append(line)
        records.append(record)
    return Metrics(lines, records, dropped)
