"""The `maskprune` command: parses and validates, then calls the trainer, the evaluator or the data fetcher.

Bad input ends with exit code 2 and one line on stderr naming the flag (or config key, or file) and what is
accepted; nothing is written before every check has passed. Every file read from a run folder goes through
maskprune.runfiles (no code runs from a checkpoint). Ctrl-C ends with exit code 130 and one line saying where the
run stopped and the command that continues it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from . import data as datasets
from . import __version__, masks, models, ops
from .runfiles import RunFileError
from .ticket import TicketError
from .train import (CHOICES, ConfigError, TrainConfig, TrainingInterrupted, load_config_file, read_checkpoint, train,
                    validate)

HELP = {
    "model": "network name: " + ", ".join(models.available()),
    "dataset": ", ".join(datasets.DATASETS),
    "mode": "mask (learn scores over frozen random weights) or dense (train the weights)",
    "density": "fraction of weights kept, in (0, 1]",
    "policy": "mask policy: " + ", ".join(masks.ALL_POLICIES) + " (its options: the --<policy>-<option> flags)",
    "policy_options": "the policy's options as key=value,... (the --<policy>-<option> flags add to them)",
    "weight_init": "frozen random weights: " + ", ".join(CHOICES["weight_init"]),
    "generator": "draws the frozen weights: philox (maskprune.rng, keyed by --seed; exportable as a ticket) or torch",
    "weights": "stored (the frozen weights kept in memory) or seed (regenerated from their key inside every pass: "
               "no weight memory, bit-for-bit the same run; top-k policies)",
    "score_init": "initial scores: " + ", ".join(CHOICES["score_init"]),
    "scale_fan": "weight std as if the fan-in were density * fan-in",
    "width": "multiplies every hidden width", "widths": "hidden widths of the mlp model, e.g. 1000,1000",
    "epochs": "passes over the training set", "batch_size": "examples per optimizer step (over all processes)",
    "optimizer": "sgd or adam", "lr": "peak learning rate (cosine decay to 0 per step)",
    "momentum": "SGD momentum, in [0, 1)", "weight_decay": "L2 penalty on the trained tensors (scores in mask mode)",
    "label_smoothing": "cross-entropy label smoothing, in [0, 1)",
    "nesterov": "Nesterov momentum (sgd)", "warmup_epochs": "linear warm-up epochs before the cosine",
    "amp": "bf16 autocast on CUDA (never on CPU)", "seed": "weights, scores and batch order; CPU runs repeat",
    "device": "auto, cpu, cuda or cuda:N", "backend": "mask-op backend: auto, " + ", ".join(ops.BACKENDS),
    "threads": "CPU threads of this process (0 = torch's default)",
    "limit_train": "train on the first N training examples only (0 = all)",
    "data_root": "dataset cache (default: $MASKPRUNE_DATA or ~/.cache/maskprune)",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str):  # noqa: D102
        fail(message)


def fail(message: str, code: int = 2):
    print(f"maskprune: error: {message}", file=sys.stderr)
    sys.exit(code)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are None so that given flags override the config file."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        help_text = HELP.get(f.name, "") + f" (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option of each mask policy, --<policy>-<option> (e.g. --iterand-period 300); the value is
    read as make_policy reads it (a number, True/False, None, or a word) and checked when the config is built."""
    for name in masks.POLICY_CLASSES:
        for option, spec in masks.policy_options(name).items():
            flag = f"--{name.replace('_', '-')}-{option.replace('_', '-')}"
            parser.add_argument(flag, dest=f"policy_flag:{name}:{option}", default=None, metavar="VALUE",
                                help=f"{spec.help}; {spec.accepted} (default: {spec.default!r}; --policy {name})")


def _policy_flags(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """{policy: {option: raw value}} of the --<policy>-<option> flags given."""
    given: dict[str, dict[str, str]] = {}
    for dest, value in vars(args).items():
        if dest.startswith("policy_flag:") and value is not None:
            _, name, option = dest.split(":")
            given.setdefault(name, {})[option] = value
    return given


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maskprune", description="Mask training over frozen random networks (edge-popup).")
    parser.add_argument("--version", action="version", version=f"maskprune {__version__}",
                        help="print maskprune's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p_train = sub.add_parser("train", help="learn masks (or train densely) on a dataset")
    _add_config_flags(p_train)
    _add_policy_flags(p_train)
    p_train.add_argument("--config", help="TOML file of options; flags override it")
    p_train.add_argument("--out", help="run folder (default: runs/<model>-<dataset>-<mode>)")
    p_train.add_argument("--resume", metavar="RUN/last.pt",
                         help="continue a stopped run (its settings are the defaults; --out defaults to RUN)")
    p_train.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    p_train.add_argument("--quiet", action="store_true",
                         help="print nothing on success: hides the progress bar, the start line, the per-epoch "
                              "lines and the final summary (summary.json and metrics.jsonl are still written)")

    p_eval = sub.add_parser("eval", help="re-evaluate a saved run (or an exported ticket) on its validation and "
                                         "test sets")
    p_eval.add_argument("run_dir", help="a run folder written by `maskprune train` (holds config.toml), or a ticket "
                                        "file written by `maskprune export`")
    p_eval.add_argument("--device", help="where to evaluate (default: the run's device, or cpu without a GPU)")

    p_export = sub.add_parser("export", help="write a mask run's ticket: generator keys + 1-bit masks (README: Tickets)")
    p_export.add_argument("run_dir", help="a mask-mode run folder written by `maskprune train`")
    p_export.add_argument("--best", action="store_true", help="export best.pt (default: last.pt, the final model)")
    p_export.add_argument("--out", required=True, help="the ticket file to write, e.g. run.mpt")

    p_data = sub.add_parser("datasets", help="list datasets; `datasets fetch NAME` fetches and verifies one")
    p_data.add_argument("action", nargs="?", choices=["list", "fetch"], default="list",
                        help="list (default): which datasets are in the cache; fetch: download and verify NAME")
    p_data.add_argument("name", nargs="?", help="the dataset to fetch: " + ", ".join(datasets.DATASETS))

    p_demo = sub.add_parser("demo", help="mask vs dense lenet300 on MNIST, with a table and a plot")
    p_demo.add_argument("--epochs", type=int, default=10, help="epochs of each of the two runs (default: 10)")
    p_demo.add_argument("--out", default="runs/demo", help="folder of the two runs and the plot (default: runs/demo)")
    p_demo.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the resumed checkpoint's settings, then the --config file, then the flags given."""
    try:
        values = dict(read_checkpoint(args.resume)["config"]) if args.resume else {}
    except RunFileError as err:
        raise ConfigError("resume", str(err)) from None
    values.update(load_config_file(args.config) if args.config else {})
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
    flags = _policy_flags(args)
    if flags:
        policy = values.get("policy", TrainConfig.policy)
        for name, options in flags.items():
            option = next(iter(options))
            flag = f"--{name.replace('_', '-')}-{option.replace('_', '-')}"
            if name != policy:
                raise ConfigError(flag.lstrip("-").replace("-", "_"), f"applies to --policy {name} only, "
                                                                      f"the run uses --policy {policy}")
        try:
            merged = masks.parse_options(policy, values.get("policy_options", ""))
        except ValueError as err:
            raise ConfigError("policy_options", str(err)) from None
        for option, raw in flags[policy].items():
            flag = f"{policy}_{option}"
            try:
                merged.update(masks.parse_options(policy, f"{option}={raw}"))
            except ValueError as err:
                raise ConfigError(flag, str(err)) from None
        values["policy_options"] = masks.format_options(merged)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return validate(TrainConfig(**{k: v for k, v in values.items() if k in known}))


def cmd_train(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    if args.resume:
        out = args.out or str(Path(args.resume).parent)
    else:
        out = args.out or f"runs/{cfg.model}-{cfg.dataset}-{cfg.mode}"
    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone prints
        print(json.dumps(summary, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_run

    run = Path(args.run_dir)
    if run.is_file():  # an exported ticket
        from .ticket import evaluate_ticket

        print(json.dumps(evaluate_ticket(run, device=args.device or "cpu"), indent=2))
        return
    if not (run / "config.toml").is_file():
        fail(f"run_dir: {run} holds no config.toml (not a maskprune run folder)")
    if args.device is not None:
        try:
            validate(TrainConfig(device=args.device))
        except ConfigError as err:
            fail(str(err))
    print(json.dumps(evaluate_run(run, device=args.device), indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    from .ticket import export_run

    run, out = Path(args.run_dir), Path(args.out)
    if not (run / "config.toml").is_file():
        fail(f"run_dir: {run} holds no config.toml (not a maskprune run folder)")
    if out.is_dir():
        fail(f"--out: {out} is a directory; give a file name such as run.mpt")
    if not out.parent.is_dir():
        fail(f"--out: folder {out.parent} does not exist")
    try:
        header = export_run(run, out, which="best" if args.best else "last")
    except (TicketError, RunFileError):
        raise  # main prints them
    except ValueError as err:  # a dense run, a policy or layer a ticket cannot hold
        fail(str(err).replace("\n", " "))
    layers = header["layers"]
    print(json.dumps({"ticket": str(out), "bytes": out.stat().st_size, "layers": len(layers),
                      "kept": sum(e["kept"] for e in layers), "total": sum(math.prod(e["shape"]) for e in layers),
                      "weights": sorted({e["weight"]["source"] for e in layers})}, indent=2))


def cmd_datasets(args: argparse.Namespace) -> None:
    if args.action == "fetch":
        if args.name not in datasets.DATASETS:
            fail(f"datasets fetch: NAME must be one of {', '.join(datasets.DATASETS)}, got {args.name!r}")
        print(datasets.fetch(args.name))
        return
    for row in datasets.status():
        print(f"{row['name']:15s} {'present' if row['present'] else 'absent ':8s} {row['source']}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    if args.epochs < 1:
        fail(f"--epochs must be >= 1, got {args.epochs}")
    run_demo(Path(args.out), epochs=args.epochs, quiet=args.quiet)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "datasets": cmd_datasets,
                "demo": cmd_demo}
    try:
        commands[args.command](args)
    except (ConfigError, RunFileError, TicketError) as err:
        fail(str(err).replace("\n", " "))
    except (datasets.DatasetUnavailable, datasets.ChecksumError) as err:
        fail(str(err).replace("\n", " "))
    except TrainingInterrupted as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"maskprune: {err}", file=sys.stderr, flush=True)
        sys.exit(130)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            where = " before the run folder was written" if args.command == "train" else ""
            print(f"maskprune: interrupted{where}", file=sys.stderr, flush=True)
        sys.exit(130)
    except OSError as err:  # a disk that filled up, a folder removed under the run
        fail(f"{err.filename + ': ' if err.filename else ''}{err.strerror or err}")


if __name__ == "__main__":
    main()
