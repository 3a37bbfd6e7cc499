"""Tests of maskprune.runfiles and its callers: run files cannot run code (a pickle that tries is refused at every
site that reads a checkpoint: `maskprune eval`, `train --resume`, evaluate_run, load_run, the trainer's final test),
malformed files are RunFileError from the API and one line with exit code 2 from the CLI, nothing is written by a
failed eval or resume; load_run; Ctrl-C; impossible --out; --version and help texts; rank-0-only summary; no .lock
left by a failed download."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tokenize
from pathlib import Path

import pytest
import torch

import maskprune
from maskprune import cli, runfiles
from maskprune import data as datasets
from maskprune import train as trainer
from maskprune.evaluate import evaluate_run
from maskprune.runfiles import RunFileError, read_checkpoint, read_metrics, read_run_config, read_toml
from maskprune.train import ConfigError, TrainConfig, TrainingInterrupted, train
from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="lenet300", dataset="mnist", epochs=2, batch_size=64, limit_train=256, device="cpu", threads=1)
REAL_LOAD = datasets.load


@pytest.fixture(scope="module")
def mnist_subset() -> datasets.Splits:
    full = REAL_LOAD("mnist")
    cut = {k: getattr(full, k)[:n] for k, n in (("train_x", 512), ("train_y", 512), ("val_x", 500),
                                                   ("val_y", 500), ("test_x", 500), ("test_y", 500))}
    return dataclasses.replace(full, **cut)


@pytest.fixture(autouse=True)
def small_data(monkeypatch, mnist_subset):
    monkeypatch.setattr(datasets, "load", lambda name, root=None: mnist_subset)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mnist_subset) -> tuple[Path, dict]:
    """A finished two-epoch run (made once), with its summary; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets, "load", lambda name, root=None: mnist_subset)
        summary = train(TrainConfig(**TINY), out, quiet=True)
    return out, summary


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished_run[0], tmp_path / "run"))


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("maskprune: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


# -- pickles that try to run code -------------------------------------------------------------------------------

class SystemCall:
    """Unpickling this runs `touch MARKER` (os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class ExecCall:
    """Unpickling this runs Python (builtins.exec) that writes MARKER."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def evil_files(marker: Path):
    """(name, bytes) of files that run code when unpickled naively: torch's zip format, its legacy format, raw pickle."""
    out = {}
    for label, payload in (("system", SystemCall(marker)), ("exec", ExecCall(marker))):
        for fmt, new_zip in (("zip", True), ("legacy", False)):
            path = marker.parent / f"evil-{label}-{fmt}.pt"
            torch.save({"model": payload, "epoch": 0, "config": {}}, path, _use_new_zipfile_serialization=new_zip)
            out[f"{label}-{fmt}"] = path.read_bytes()
        out[f"{label}-raw-pickle"] = pickle.dumps({"model": payload})
    return out


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


def test_a_naive_load_would_run_the_code(tmp_path, marker):
    """The payloads are real: torch.load(weights_only=False) runs them (so the refusals below mean something)."""
    for name, raw in evil_files(marker).items():
        if "raw-pickle" in name:
            continue
        (tmp_path / "x.pt").write_bytes(raw)
        torch.load(tmp_path / "x.pt", weights_only=False)
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("which", ["best.pt", "last.pt"])
def test_code_carrying_checkpoint_is_refused_at_every_site(run, marker, capsys, which):
    before_marker = marker.exists()
    for name, raw in evil_files(marker).items():
        (run / which).write_bytes(raw)
        before = snapshot(run)
        # the CLI: eval, and train --resume (which reads both last.pt and best.pt before anything)
        code, out, err = run_cli(["eval", str(run)], capsys)
        one_line_error(code, err, str(run / which))
        assert out == ""
        code, out, err = run_cli(["train", "--resume", str(run / "last.pt"), "--quiet"], capsys)
        one_line_error(code, err, str(run / which))
        # the API
        with pytest.raises(RunFileError) as info:
            evaluate_run(run)
        assert info.value.path == run / which
        with pytest.raises(RunFileError):
            maskprune.load_run(run, which=which[:-3])
        with pytest.raises(RunFileError):
            train(TrainConfig(**TINY), run, resume=str(run / "last.pt"), quiet=True)
        with pytest.raises(RunFileError):
            read_checkpoint(run / which)
        assert snapshot(run) == before, name  # a failed eval or resume writes nothing
        assert not marker.exists(), f"{name}: the pickle's code ran"
    assert not before_marker
    code, _, err = run_cli(["eval", str(run)], capsys)
    (run / which).write_bytes(evil_files(marker)["system-zip"])
    code, _, err = run_cli(["eval", str(run)], capsys)
    one_line_error(code, err, "refused", "posix.system", "may carry code", "weights_only=False")


def test_the_trainers_final_test_reads_best_pt_safely(run, marker, monkeypatch):
    """The final test of a run reloads best.pt: one replaced during training is refused, its code never runs."""
    real_save = trainer.save_atomic

    def save_then_replace(obj, path):
        real_save(obj, path)
        if path.name == "last.pt" and obj["epoch"] == 1:
            (path.parent / "best.pt").write_bytes(evil_files(marker)["system-zip"])
    monkeypatch.setattr(trainer, "save_atomic", save_then_replace)
    with pytest.raises(RunFileError, match="best.pt: refused"):
        train(TrainConfig(**TINY), run, overwrite=True, quiet=True)
    assert not marker.exists()


def test_cli_in_a_fresh_process_refuses_a_code_carrying_best_pt(run, marker):
    """The real `maskprune eval` (python -m maskprune): exit code 2, one line, the marker never written."""
    (run / "best.pt").write_bytes(evil_files(marker)["system-zip"])
    proc = subprocess.run([sys.executable, "-m", "maskprune", "eval", str(run)], capture_output=True, text=True,
                          timeout=300, cwd=run.parent)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "refused" in proc.stderr, proc.stderr
    assert not marker.exists()


def test_no_weights_only_false_in_the_package():
    """Every torch.load of the package, kernels and scripts loads weights only."""
    offenders, loads = [], []
    for folder in ("maskprune", "kernels", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            # in code, not in a message's text (runfiles' re-save advice quotes it for the user to run by hand)
            tokens = [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(text).readline)
                      if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)]
            for i in range(len(tokens) - 2):
                if tokens[i][1] == "weights_only" and tokens[i + 1][1] == "=" and tokens[i + 2][1] != "True":
                    offenders.append(f"{path.relative_to(ROOT)}: weights_only={tokens[i + 2][1]}")
            if re.search(r"weights_only\s*=\s*False", text) and path.name != "runfiles.py":
                offenders.append(str(path.relative_to(ROOT)))
            for match in re.finditer(r"torch\.load\(", text):
                line = text[text.rfind("\n", 0, match.start()) + 1:match.start()]
                if line.count('"') % 2:  # inside a string: runfiles' re-save advice, checked by tokens above
                    continue
                call = text[match.start():text.find(")", match.start()) + 1]
                loads.append((str(path.relative_to(ROOT)), call))
    assert offenders == []
    # the package itself: run files through runfiles.read_checkpoint, the dataset cache in data.py
    package_loads = {p for p, _ in loads if p.startswith("maskprune/")}
    assert package_loads <= {"maskprune/runfiles.py", "maskprune/data.py"}, package_loads
    assert all("weights_only=True" in call for _, call in loads), loads


# -- checkpoints: format and structure --------------------------------------------------------------------------

def test_checkpoints_are_weights_only_files(run):
    for name in ("last.pt", "best.pt"):
        plain = torch.load(run / name, weights_only=True)  # torch >= 2.6's default; no allow-list needed
        checked = read_checkpoint(run / name, kind=name[:-3])
        kind = name[:-3]
        assert checked.keys() == plain.keys() == {*runfiles.CHECKPOINT_KINDS[kind], *runfiles.OPTIONAL_KEYS[kind]}
    assert read_checkpoint(run / "best.pt")["epoch"] in (0, 1)  # kind=None takes either


def test_to_plain_resaves_a_trusted_old_style_checkpoint(run, tmp_path):
    """The re-save the refusal message gives: an object the weights-only load refuses becomes plain data."""
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["config"] = TrainConfig(**ckpt["config"])  # e.g. a config saved as the dataclass
    ckpt["model"] = {k: torch.nn.Parameter(v, requires_grad=False) for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(RunFileError, match="refused: it asks to run or build .*TrainConfig"):
        read_checkpoint(tmp_path / "old.pt")
    torch.save(runfiles.to_plain(torch.load(tmp_path / "old.pt", weights_only=False)), tmp_path / "old.pt")
    assert read_checkpoint(tmp_path / "old.pt", kind="best")["config"] == dataclasses.asdict(TrainConfig(**TINY))
    with pytest.raises(TypeError, match="cannot make .*lock plain"):
        runfiles.to_plain({"x": threading.Lock()})


def _mutate(ckpt: dict, key: str, value) -> dict:
    out = dict(ckpt)
    parts = key.split(".", 1)
    if len(parts) == 2:
        out[parts[0]] = _mutate(ckpt[parts[0]], parts[1], value)
    elif value is KeyError:
        del out[key]
    else:
        out[key] = value
    return out


def first(d: dict) -> str:
    return next(iter(d))


MALFORMED_LAST = [
    ("model", [1, 2], "its 'model' is an array, not a non-empty dict of tensors"),
    ("model", {}, "not a non-empty dict of tensors"),
    ("epoch", "1", "its 'epoch' must be an integer >= 0, got '1'"),
    ("epoch", True, "its 'epoch' must be an integer >= 0, got True"),
    ("epoch", -1, "its 'epoch' must be an integer >= 0, got -1"),
    ("epoch", KeyError, "is not a maskprune last.pt: it lacks epoch"),
    ("optimizer", KeyError, "is a best.pt (weights only): resume from the run's last.pt"),
    ("scheduler", KeyError, "is not a maskprune last.pt: it lacks scheduler"),
    ("best_val_acc", float("nan"), "its 'best_val_acc' must be a number in [-1, 1], got nan"),
    ("best_epoch", 99, "its 'best_epoch' must be an integer in [0, epoch + 1], got 99"),
    ("wall_time", -3.0, "its 'wall_time' must be a number >= 0"),
    ("config", "lenet300", "its 'config' is a string, not a dict of settings"),
    ("config.density", "half", "its config: 'density' must be a float, got a string 'half'"),
    ("config.epochs", 2.0, "its config: 'epochs' must be an integer, got a float 2.0"),
    ("config.learning_rate", 0.1, "its config holds an unknown setting 'learning_rate'"),
    ("optimizer", {"state": []}, "its 'optimizer' is not an optimizer state"),
    ("scheduler", [1], "its 'scheduler' is not a learning-rate schedule state"),
]


@pytest.mark.parametrize("key, value, message", MALFORMED_LAST, ids=[f"{k}={v!r}" for k, v, _ in MALFORMED_LAST])
def test_malformed_last_pt(run, capsys, key, value, message):
    ckpt = torch.load(run / "last.pt", weights_only=True)
    torch.save(_mutate(ckpt, key, value), run / "last.pt")
    before = snapshot(run)
    with pytest.raises(RunFileError) as info:
        read_checkpoint(run / "last.pt", kind="last")
    assert str(info.value) == f"{run / 'last.pt'}: " + str(info.value.reason) and message in str(info.value)
    code, out, err = run_cli(["train", "--resume", str(run / "last.pt")], capsys)
    one_line_error(code, err, "--resume: ", message)
    if key != "optimizer":  # (without its optimizer it is read as a best.pt, which eval accepts)
        code, out, err = run_cli(["eval", str(run)], capsys)
        one_line_error(code, err, str(run / "last.pt"), message)
    assert snapshot(run) == before


MISFIT = [  # well-formed files that do not fit the run: caught before any tensor is loaded or written
    ("model", lambda m: {**m, "extra.scores": torch.zeros(2)}, "does not fit the network its config describes "
                                                              "(has unknown extra.scores)"),
    ("model", lambda m: {k: v for k, v in list(m.items())[1:]}, "does not fit the network its config describes (lacks"),
    ("model", lambda m: {k: (v[:1] if i == 0 else v) for i, (k, v) in enumerate(m.items())}, "the network's is"),
    ("model", lambda m: {k: v.long() for k, v in m.items()}, "has the wrong dtype"),
    ("optimizer", lambda o: {**o, "param_groups": o["param_groups"] * 2}, "different number of parameter groups"),
    ("optimizer", lambda o: {**o, "param_groups": [{**o["param_groups"][0], "lr": "fast"}]},
     "its optimizer setting 'lr' is 'fast'"),
    ("optimizer", lambda o: {**o, "param_groups": [{**o["param_groups"][0], "params": [0, 0, 99]}]},
     "lists other parameters than the run's network has"),
    ("optimizer", lambda o: {**o, "state": {0: {"momentum_buffer": torch.zeros(3)}}},
     "its optimizer state 'momentum_buffer' of parameter 0 does not fit it"),
    ("optimizer", lambda o: {**o, "state": {77: {}}}, "an entry 77 for no parameter"),
    ("scheduler", lambda s: {**s, "base_lrs": [0.1, 0.2, 0.3]}, "its schedule state 'base_lrs'"),
    ("scheduler", lambda s: {**s, "last_epoch": "x"}, "its schedule state 'last_epoch' is 'x'"),
]


@pytest.mark.parametrize("key, change, message", MISFIT, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(MISFIT)])
def test_checkpoint_that_does_not_fit_the_run(run, capsys, key, change, message):
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt[key] = change(ckpt[key])
    torch.save(ckpt, run / "last.pt")
    before = snapshot(run)
    code, out, err = run_cli(["train", "--resume", str(run / "last.pt"), "--quiet"], capsys)
    one_line_error(code, err, str(run / "last.pt"), message)
    with pytest.raises(RunFileError, match=re.escape(message)):
        train(TrainConfig(**TINY), run, resume=str(run / "last.pt"), quiet=True)
    if key == "model":
        with pytest.raises(RunFileError, match=re.escape(message)):
            maskprune.load_run(run, which="last")
        code, out, err = run_cli(["eval", str(run)], capsys)
        one_line_error(code, err, message)
    assert snapshot(run) == before


def test_config_asking_for_a_huge_network_is_refused_before_allocating(run, capsys):
    """A run folder whose config asks for a 10^7-wide network: refused by the shape check on the meta device."""
    text = (run / "config.toml").read_text().replace("width = 1.0", "width = 30000.0")
    (run / "config.toml").write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(RunFileError, match=r"best.pt: does not fit the network its config describes .*the network's "
                                           r"is \[9000000, 784\]"):
        maskprune.load_run(run)
    code, _, err = run_cli(["eval", str(run)], capsys)
    one_line_error(code, err, "does not fit the network")
    assert time.perf_counter() - t0 < 20


def test_torn_and_foreign_checkpoints(run, capsys):
    raw = (run / "last.pt").read_bytes()
    cases = {"torn": raw[:len(raw) // 2], "empty": b"", "text": b"hello", "json": b'{"model": {}}',
             "zip of nothing": b"PK\x05\x06" + bytes(18)}
    for name, data in cases.items():
        (run / "last.pt").write_bytes(data)
        with pytest.raises(RunFileError, match="last.pt: is not a readable checkpoint"):
            read_checkpoint(run / "last.pt")
        code, out, err = run_cli(["eval", str(run)], capsys)
        one_line_error(code, err, "last.pt: is not a readable checkpoint")
    (run / "last.pt").unlink()
    (run / "last.pt").mkdir()
    with pytest.raises(RunFileError, match="last.pt: is not a file"):
        read_checkpoint(run / "last.pt")
    with pytest.raises(ValueError, match="kind must be None, 'last' or 'best'"):
        read_checkpoint(run / "best.pt", kind="final")


# -- config.toml ------------------------------------------------------------------------------------------------

BAD_TOML = [
    (b"density = \xff\xfe\n", "is not UTF-8 text (byte 10)"),
    (b"density = 0.5\n" + b"# " + b"x" * (1 << 20) + b"\n", "is larger than 1024 KiB"),
    (b"widths = " + b"[" * 5000 + b"]" * 5000 + b"\n", "is not valid TOML"),
    (b"a = {" * 3000 + b"}" * 3000, "is not valid TOML"),
    (b"density = [0.5]\n", "key 'density' must be a float, got an array [0.5]"),
    (b"density = {x = 1}\n", "key 'density' must be a float, got a table"),
    (b"epochs = 1979-05-27\n", "key 'epochs' must be an integer, got date"),
    (b"epochs = 1.5\n", "key 'epochs' must be an integer, got a float 1.5"),
    (b"amp = 1\n", "key 'amp' must be a boolean, got an integer 1"),
    (b"model = 3\n", "key 'model' must be a string, got an integer 3"),
    (b"widths = [1, \"2\"]\n", "key 'widths' must be a string"),
    (b"limit-train = 5\nlimit_train = 6\n", "key 'limit_train' is given twice"),
    (b"[train]\ndensity = 0.5\n", "unknown key 'train'"),
    (b"model = \"" + b"x" * 5000 + b"\"\nwho = 1\n", "unknown key 'who'"),
    (b"density = = 3\n", "is not valid TOML"),
]


@pytest.mark.parametrize("raw, message", BAD_TOML, ids=[m[:30] for _, m in BAD_TOML])
def test_bad_config_toml(tmp_path, capsys, raw, message):
    path = tmp_path / "c.toml"
    path.write_bytes(raw)
    with pytest.raises(RunFileError, match=re.escape(message)) as info:
        read_toml(path)
    assert info.value.path == path and len(str(info.value).splitlines()) == 1 and len(str(info.value)) < 700
    code, _, err = run_cli(["train", "--config", str(path), "--out", str(tmp_path / "out")], capsys)
    one_line_error(code, err, "--config: ", message)
    assert not (tmp_path / "out").exists()


def test_bad_config_toml_in_a_run_folder(run, capsys):
    (run / "config.toml").write_text((run / "config.toml").read_text().replace("density = 0.5", "density = 5.0"))
    with pytest.raises(RunFileError, match=r"config.toml: --density: must be in \(0, 1\], got 5.0"):
        read_run_config(run)
    code, out, err = run_cli(["eval", str(run)], capsys)
    one_line_error(code, err, "config.toml: --density: must be in (0, 1]")
    (run / "config.toml").write_bytes(b"\x00\x01binary")
    with pytest.raises(RunFileError, match="config.toml: is not valid TOML"):
        maskprune.load_run(run)
    code, out, err = run_cli(["eval", str(run), "--device", "tpu"], capsys)
    one_line_error(code, err, "--device: must be auto, cpu, cuda or cuda:N, got 'tpu'")


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as info:
        trainer.validate(TrainConfig(model="x" * 10_000))
    assert len(str(info.value)) < 300 and "..." in str(info.value)


# -- metrics.jsonl ----------------------------------------------------------------------------------------------

def test_metrics_reader_drops_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"epoch": 1, "val_acc": 0.5}), json.dumps({"epoch": 2, "val_acc": 0.6})]
    path.write_bytes("\n".join(good).encode() + b"\n{\"epoch\": 3, \"val\n\xff\xfe\n[1, 2]\n{\"epoch\": \"4\"}\n"
                     + b"[" * 100_000 + b"\n{\"epoch\": true}\n\n")
    metrics = read_metrics(path)
    assert metrics.lines == good and [r["epoch"] for r in metrics.records] == [1, 2] and metrics.dropped == 6
    assert read_metrics(tmp_path / "absent.jsonl") == ([], [], 0)
    with open(path, "wb") as fh:
        fh.truncate(runfiles.METRICS_MAX_BYTES + 1)
    with pytest.raises(RunFileError, match="metrics.jsonl: is larger than 65536 KiB"):
        read_metrics(path)


def test_resume_over_a_corrupt_metrics_line(run, capsys, finished_run):
    """A kill mid-write tore the last line and a byte flipped in another: resume drops both, says so, goes on."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_bytes(lines[0].encode() + b"\n" + lines[1][:7].encode() + b"\xff\n")
    code, out, err = run_cli(["train", "--resume", str(run / "last.pt")], capsys)
    assert code == 0, err
    assert err.strip() == f"maskprune: warning: {run / 'metrics.jsonl'}: dropped 1 unreadable line(s)"
    assert (run / "metrics.jsonl").read_text().splitlines() == lines[:1]  # epoch 2's line was the torn one
    assert json.loads((run / "summary.json").read_text())["test_acc_best"] == finished_run[1]["test_acc_best"]


# -- load_run ---------------------------------------------------------------------------------------------------

def test_load_run_matches_evaluate_run(run, mnist_subset):
    result = evaluate_run(run)
    rng = torch.get_rng_state()
    for which in ("best", "last"):
        model, cfg = maskprune.load_run(run, which=which)
        assert isinstance(cfg, TrainConfig) and cfg.model == "lenet300" and cfg.epochs == 2
        assert not model.training and torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
        splits = mnist_subset.normalize()
        with torch.no_grad():
            acc = (model(splits.test_x).argmax(1) == splits.test_y).sum().item() / len(splits.test_y)
        assert math.isclose(acc, result[which]["test_acc"], abs_tol=1e-9), which
        assert maskprune.mask_stats(model)["fraction"] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="which must be 'best' or 'last', got 'first'"):
        maskprune.load_run(run, which="first")
    with pytest.raises(RunFileError, match="config.toml: does not exist"):
        maskprune.load_run(run / "nope")
    (run / "last.pt").unlink()
    with pytest.raises(RunFileError, match="last.pt: does not exist"):
        maskprune.load_run(run, which="last")
    assert "load_run" in maskprune.__all__ and "RunFileError" in maskprune.__all__
    assert issubclass(maskprune.RunFileError, ValueError) and maskprune.load_run.__doc__


def test_eval_of_a_run_stopped_in_epoch_1(run, capsys):
    (run / "last.pt").unlink()
    (run / "best.pt").unlink()
    code, out, err = run_cli(["eval", str(run)], capsys)
    one_line_error(code, err, "holds neither last.pt nor best.pt")


# -- Ctrl-C ------------------------------------------------------------------------------------------------------

def interrupt_at(monkeypatch, n: int) -> None:
    """Ctrl-C during the Nth validation pass (i.e. in epoch N, after its training steps)."""
    real = trainer.evaluate
    calls = {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(trainer, "evaluate", evaluate)


def test_ctrl_c_prints_where_and_the_resume_command(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run dir"
    interrupt_at(monkeypatch, 2)
    code, stdout, err = run_cli(["train", "--model", "lenet300", "--epochs", "3", "--batch-size", "64",
                                 "--limit-train", "256", "--device", "cpu", "--threads", "1", "--out", str(out),
                                 "--quiet"], capsys)
    assert code == 130 and stdout == "" and "Traceback" not in err
    command = f"maskprune train --resume {shlex.quote(str(out / 'last.pt'))}"
    assert err.splitlines() == [f"maskprune: interrupted in epoch 2 of 3; {out / 'last.pt'} holds epochs 1-1. "
                                f"Continue with: {command}"]
    monkeypatch.undo()
    monkeypatch.setattr(datasets, "load", lambda name, root=None: REAL_LOAD("mnist"))
    code, stdout, err = run_cli(shlex.split(command)[1:] + ["--quiet"], capsys)  # the printed command works
    assert code == 0, err
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl").records] == [1, 2, 3]


def test_ctrl_c_in_epoch_1_says_to_overwrite_and_that_works(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 1)
    with pytest.raises(TrainingInterrupted) as info:
        train(TrainConfig(**TINY), out, quiet=True)
    assert isinstance(info.value, KeyboardInterrupt) and info.value.saved == 0 and info.value.epoch == 1
    assert "before any epoch finished: there is no last.pt to resume" in str(info.value)
    assert not (out / "last.pt").exists()
    monkeypatch.undo()
    monkeypatch.setattr(datasets, "load", lambda name, root=None: REAL_LOAD("mnist"))
    # what a user then tries: --resume, and the same command again: both point at --overwrite
    code, _, err = run_cli(["train", "--resume", str(out / "last.pt")], capsys)
    one_line_error(code, err, "stopped before its first epoch ended", "--overwrite")
    code, _, err = run_cli(["train", *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in TINY.items()), []),
                            "--out", str(out)], capsys)
    one_line_error(code, err, "holds no last.pt to resume", "--overwrite")
    code, _, err = run_cli(shlex.split(info.value.command)[1:] + ["--quiet"], capsys)
    assert code == 0, err
    assert (out / "last.pt").is_file()


def test_ctrl_c_during_the_final_test(tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 3)  # epochs 1 and 2 validate, then the final test's first pass
    with pytest.raises(TrainingInterrupted, match="interrupted during the final test; .* holds epochs 1-2"):
        train(TrainConfig(**TINY), tmp_path / "run", quiet=True)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_real_sigint_in_a_fresh_process(tmp_path):
    """SIGINT to `python -m maskprune train` once epoch 1 is saved: exit code 130, one line, no traceback."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "maskprune", "train", "--model", "lenet300", "--epochs", "500",
                             "--batch-size", "64", "--limit-train", "64", "--device", "cpu", "--threads", "1",
                             "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Ctrl-C's default action in the child: a shell that starts a command in the background
                            # (`make test &`) sets SIGINT to ignored, the child inherits that, and Python then installs
                            # no KeyboardInterrupt handler (the run would finish and exit 0)
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (out / "last.pt").exists(), proc.stderr.read() if proc.poll() is not None else "no last.pt in time"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert re.fullmatch(rf"maskprune: interrupted in epoch \d+ of 500; .* holds epochs 1-\d+\. Continue with: "
                        rf"maskprune train --resume {re.escape(str(out / 'last.pt'))}", lines[0]), lines[0]
    read_checkpoint(out / "last.pt", kind="last")  # what it left is sound


# -- --out, --version, help, rank 0, .lock --------------------------------------------------------------------------

def test_impossible_out(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, needle in (("/proc/x", "/proc is not writable"), (str(tmp_path / "file" / "run"), "is not a directory"),
                        (str(tmp_path / "file" / "a" / "b"), "is not a directory")):
        code, stdout, err = run_cli(["train", "--model", "lenet300", "--device", "cpu", "--out", out], capsys)
        one_line_error(code, err, f"--out: {out} cannot be created", needle)
        assert stdout == ""
    assert not Path("/proc/x").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unwritable_out_parent(tmp_path, capsys, monkeypatch):
    """A folder the process may not write (simulated: root may write anywhere): refused before the data loads."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(trainer.tempfile, "mkdtemp", refuse)
    code, _, err = run_cli(["train", "--device", "cpu", "--out", str(tmp_path / "new")], capsys)
    one_line_error(code, err, "--out: ", "is not writable (Permission denied)")


def test_version(capsys):
    code, out, err = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"maskprune {maskprune.__version__}"


def test_every_flag_has_help():
    parser = cli.build_parser()
    missing = []

    def walk(p, prefix):
        for action in p._actions:
            if isinstance(action, type(parser._subparsers._group_actions[0])):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}")
                continue
            text = re.sub(r"\s*\(default: .*\)$", "", action.help or "")
            if len(text) < 8:
                missing.append(f"{prefix} {'/'.join(action.option_strings) or action.dest}")
    walk(parser, "maskprune")
    assert missing == []
    quiet = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == "quiet")
    assert "final summary" in quiet.help and "progress bar" in quiet.help


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_only_rank_0_prints_the_summary(tmp_path, capsys, monkeypatch, rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(cli, "train", lambda cfg, out, **kw: {"test_acc_best": 0.5})
    code, out, _ = run_cli(["train", "--device", "cpu", "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and (json.loads(out) == {"test_acc_best": 0.5} if printed else out == "")


def test_failed_download_leaves_no_lock(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "load", REAL_LOAD)
    monkeypatch.setenv("MASKPRUNE_DATA", str(tmp_path))

    def offline(info, tmp):
        raise datasets.DatasetUnavailable("cifar10: no network")
    monkeypatch.setitem(datasets._FETCHERS, "cifar10", offline)
    code, _, err = run_cli(["datasets", "fetch", "cifar10"], capsys)
    one_line_error(code, err, "no network")
    assert not (tmp_path / "cifar10" / ".lock").exists()
    assert list((tmp_path / "cifar10").iterdir()) == []


def test_lock_excludes_and_is_removed(tmp_path):
    """Threads (separate open file descriptions: flock excludes them) add one to a counter under the lock; the
    file is removed by each holder and recreated by the next, and no update is lost."""
    counter = tmp_path / "n"
    counter.write_text("0")
    inside = []

    def bump():
        for _ in range(15):
            with datasets._locked(tmp_path):
                inside.append(1)
                assert len(inside) == 1, "two holders at once"
                value = int(counter.read_text())
                time.sleep(0.0005)
                counter.write_text(str(value + 1))
                inside.pop()
    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.read_text() == "60" and not (tmp_path / ".lock").exists()


# -- the dataset cache ------------------------------------------------------------------------------------------

def fake_decoded(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {"scale": 255.0}
    for split in ("train", "val", "test"):
        out[f"{split}_x"] = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
        out[f"{split}_y"] = torch.randint(0, 10, (n,), generator=g)
    return out


def test_bad_dataset_cache_is_rebuilt(tmp_path, monkeypatch, marker):
    info = datasets.DATASETS["mnist"]
    good = fake_decoded()
    decodes = []
    monkeypatch.setitem(datasets._DECODERS, "mnist", lambda folder, i: decodes.append(1) or good)
    first_ = datasets._decoded(info, tmp_path, ["h"])
    cache = next(tmp_path.glob("tensors-*.pt"))
    assert len(decodes) == 1 and datasets._decoded(info, tmp_path, ["h"])["scale"] == 255.0 and len(decodes) == 1
    bad = {
        "labels out of range": {**good, "val_y": good["val_y"] + 10},
        "negative label": {**good, "test_y": good["test_y"] - 20},
        "wrong image shape": {**good, "train_x": good["train_x"].reshape(4, 28, 28, 1)},
        "lengths differ": {**good, "train_y": good["train_y"][:3]},
        "zero scale": {**good, "scale": 0.0},
        "inf scale": {**good, "scale": float("inf")},
        "float images": {**good, "val_x": good["val_x"].float()},
        "empty split": {**good, "test_x": good["test_x"][:0], "test_y": good["test_y"][:0]},
        "not a dict": [1, 2, 3],
    }
    for name, data in bad.items():
        torch.save(data, cache)
        got = datasets._decoded(info, tmp_path, ["h"])
        assert all(torch.equal(got[k], good[k]) for k in good if k != "scale"), name
    assert len(decodes) == 1 + len(bad)
    for name, raw in evil_files(marker).items():
        cache.write_bytes(raw)
        datasets._decoded(info, tmp_path, ["h"])
        assert not marker.exists(), name
    assert torch.equal(first_["train_x"], good["train_x"])
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".verified.json").write_bytes(b"[" * 100_000)
    assert datasets._read_json(tmp_path / ".verified.json") == {}
