"""scripts/supermask_trace.py: a traced run is the run policy_sweep.py makes (tracing changes nothing), its trace
and both evaluation masks are recorded, and bad flags stop it with exit code 2 naming the flag."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "supermask_trace.py"
SWEEP_FLAGS = ["--epochs", "2", "--batch-size", "64", "--train-limit", "640", "--val-limit", "500",
               "--test-limit", "500"]


def _import_scripts():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import policy_sweep
        import supermask_trace
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return policy_sweep, supermask_trace


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("supermask_trace")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--task", "lenet300-mnist", "--density", "0.1", "--seeds",
                           "0,1", "--lrs", "sgd=100", "--every", "4", "--out", str(out), "--", *SWEEP_FLAGS],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "trace.png").stat().st_size > 0
    return json.loads((out / "results.json").read_text())


def test_trace_is_recorded_every_n_steps_for_every_layer(record):
    assert record["status"] == "done" and [p["seed"] for p in record["points"]] == [0, 1]
    for point in record["points"]:
        assert point["steps"] == 20  # 640 images / 64 per batch x 2 epochs
        assert [t["step"] for t in point["trace"]] == [4, 8, 12, 16, 20]
        for entry in point["trace"] + [{"layers": point["final_layers"], "loss": 1.0}]:
            assert entry["loss"] > 0 and [l["layer"] for l in entry["layers"]] == ["layers.1", "layers.3", "layers.5"]
            for layer in entry["layers"]:
                assert 0 < layer["expected_density"] < 1 and 0 <= layer["undecided"] <= 1
        assert [l["weights"] for l in point["final_layers"]] == [784 * 300, 300 * 100, 100 * 10]
        assert 0 <= point["val_acc_expected_mask"] <= 1


def test_a_traced_run_is_the_sweep_run(record):
    """The trace only reads the model: the sweep's own train_one at the same flags gives the same accuracies."""
    policy_sweep, supermask_trace = _import_scripts()
    from maskprune import data
    sweep = policy_sweep.parse_args(["--tasks", "lenet300-mnist", "--policies", "supermask", *SWEEP_FLAGS])
    torch.set_num_threads(supermask_trace.parse_args([])[0].threads)  # the traced runs' count: sums depend on it
    splits = data.load("mnist").normalize()
    plain = policy_sweep.train_one("lenet300-mnist", "supermask", 0.1, 0, "sgd", 100.0, splits, sweep)
    traced = record["points"][0]
    assert (traced["val_acc"], traced["test_acc"], traced["kept_fraction"]) == \
        (plain["val_acc"], plain["test_acc"], plain["kept_fraction"])
    assert record["points"][1]["val_acc"] != traced["val_acc"] or \
        record["points"][1]["final_layers"] != traced["final_layers"]  # another seed, another run


def test_a_run_diverging_before_its_first_step_is_recorded_not_a_crash(monkeypatch):
    """fit_policy stops at a non-finite loss before stepping; the trace then has no model to read and says so."""
    policy_sweep, supermask_trace = _import_scripts()
    diverged = {"val_acc": float("nan"), "test_acc": float("nan"), "kept_fraction": 0.1, "steps": 0,
                "train_seconds": 0.0, "diverged": True}
    monkeypatch.setattr(policy_sweep, "train_one", lambda *args, **kwargs: dict(diverged))
    point = supermask_trace.trace_run("lenet300-mnist", 0.1, 0, "sgd", 100.0, None, None, every=4)
    assert point["diverged"] and point["steps"] == 0 and point["trace"] == [] and point["final_layers"] == []
    assert math.isnan(point["val_acc_expected_mask"])  # as the sweep's val_acc


@pytest.mark.parametrize("argv, message", [
    (["--density", "1"], "--density: must be in \\(0, 1\\), got 1.0"),
    (["--every", "0"], "--every: must be >= 1, got 0"),
    (["--lrs", "rmsprop=1"], "--lrs: expected OPTIMIZER=LR"),
    (["--lrs", "sgd=0"], "--lrs: every value must be in \\[1e-08, 10000.0\\], got 0.0"),
    (["--lrs", "adam=1e5"], "--lrs: every value must be in \\[1e-08, 10000.0\\], got 100000.0"),
    (["--seeds", "a"], "--seeds: a comma list of int values"),
    (["--", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, argv, message):
    _, supermask_trace = _import_scripts()
    with pytest.raises(SystemExit) as stop:
        supermask_trace.main(["--out", str(tmp_path / "x"), *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "x").exists()
