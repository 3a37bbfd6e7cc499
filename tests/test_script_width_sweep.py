"""scripts/width_sweep.py --quick runs end to end and writes a complete results.json and a PNG."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "width_sweep.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("width_sweep")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_writes_results_and_png(quick_run):
    record = json.loads((quick_run / "results.json").read_text())
    assert record["status"] == "done"
    assert record["wall_time_s"] > 0
    env = record["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["maskprune"]
    cfg = record["config"]
    assert cfg["quick"] is True and cfg["widths"] == [16, 64] and cfg["seeds"] == [0, 1]
    assert (quick_run / "width_sweep.png").stat().st_size > 10_000


def test_every_point_is_there_with_its_seed(quick_run):
    record = json.loads((quick_run / "results.json").read_text())
    cfg = record["config"]
    keys = {(p["task"], p["method"], p["width"], p["seed"]) for p in record["points"]}
    expected = {(t, m, w, s) for t in cfg["tasks"] for m in cfg["methods"] for w in cfg["widths"] for s in cfg["seeds"]}
    assert keys == expected and len(record["points"]) == len(expected)
    for p in record["points"]:
        if p["task"] == "synthetic":
            assert p["metric"] == "test_mse" and p["value"] >= 0
        else:
            assert p["metric"] == "test_acc" and 0 <= p["value"] <= 1
        if p["method"] in ("weight", "neuron"):
            assert p["kept_fraction"] == pytest.approx(cfg["density"], abs=0.02)
        if p["method"] == "rf":  # only the output layer learns
            assert p["trainable"] == p["width"] * (10 if p["task"] != "synthetic" else 1) + \
                (10 if p["task"] != "synthetic" else 1)
    assert {(r["task"], r["method"], r["width"]) for r in record["summary"]} == {k[:3] for k in keys}
    assert all(r["n_seeds"] == 2 for r in record["summary"])


def test_rejects_unknown_task():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--tasks", "cifar"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown task" in proc.stderr


def test_rejects_unknown_method():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--methods", "dense,lottery"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--methods: unknown method" in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--widths", "64,0"], "--widths: every value must be in"),
    (["--seeds", "1.5"], "--seeds: a comma list of int values"),
    (["--density", "0"], "--density: must be in (0, 1]"),
    (["--train-limit", "-5"], "--train-limit: must be >= 0"),
])
def test_bad_numbers_exit_2_naming_the_flag(argv, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
