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


# ---------------------------------------------------------------------------------------------
# --mode theorem (issue 16): tuned lr per method and width, chosen on validation; depth-4 weight subnetworks

@pytest.fixture(scope="module")
def theorem_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("width_sweep_theorem")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mode", "theorem", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_theorem_mode_searches_every_lr_and_keeps_the_best_on_validation(theorem_run):
    record = json.loads((theorem_run / "results.json").read_text())
    assert record["status"] == "done"
    cfg = record["config"]
    assert cfg["mode"] == "theorem" and cfg["widths"] == [16, 32] and cfg["seeds"] == [0, 1]
    assert set(cfg["methods"]) == {"dense", "dense_adam", "rf", "rf_adam", "weight_2l", "weight_l", "neuron"}
    grids = {"sgd": cfg["sgd_lrs"], "adam": cfg["adam_lrs"], "score": cfg["score_lrs"]}
    depth = {"weight_2l": 4}
    for method in cfg["methods"]:
        for width in cfg["widths"]:
            pts = [p for p in record["points"] if p["method"] == method and p["width"] == width
                   and p["role"] != "convergence"]
            search = [p for p in pts if p["role"] == "search"]
            kind = "score" if method in ("weight_2l", "weight_l", "neuron") else p_opt(method)
            assert sorted(p["lr"] for p in search) == sorted(grids[kind])
            assert all(p["seed"] == cfg["search_seed"] for p in search)
            best = max(sorted(search, key=lambda p: p["lr"]), key=lambda p: p["val_acc"])
            chosen = [p for p in pts if p.get("chosen")]
            assert {p["seed"] for p in chosen} == {0, 1} and {p["lr"] for p in chosen} == {best["lr"]}
            for p in pts:
                assert p["depth"] == depth.get(method, 2) and p["biases"] is False
                assert 0 <= p["val_acc"] <= 1 and 0 <= p["test_acc"] <= 1 and p["lr"] in p["lr_grid"]
                assert len(p["train_loss_history"]) == p["epochs"] == cfg["epochs"]
                if method in ("weight_2l", "weight_l", "neuron"):
                    layers = {"weight_2l": 4, "weight_l": 2, "neuron": 1}[method]
                    assert len(p["mask_changed"]) == layers and all(0 <= c <= 1 for c in p["mask_changed"])
                    assert p["kept_fraction"] == pytest.approx(cfg["density"], abs=0.05)
                else:
                    assert "mask_changed" not in p
            row = next(r for r in record["summary"] if r["method"] == method and r["width"] == width)
            assert row["chosen_lr"] == best["lr"] and row["n_seeds"] == 2
            assert row["chosen_at_edge"] in ("low", "high", None)
    assert (theorem_run / "width_sweep.png").stat().st_size > 10_000


def p_opt(method):
    return "adam" if method.endswith("_adam") else "sgd"


def test_theorem_mode_convergence_runs_both_budgets_at_the_largest_width(theorem_run):
    record = json.loads((theorem_run / "results.json").read_text())
    conv = [p for p in record["points"] if p["role"] == "convergence"]
    cfg = record["config"]
    assert {(p["method"], p["epochs"]) for p in conv} == {(m, e) for m in cfg["methods"] for e in (1, 2)}
    assert all(p["width"] == 32 and p["train_examples"] == 1000 for p in conv)
    assert all(len(p["train_loss_history"]) == p["epochs"] for p in conv)
    summary = record["convergence"]["mnist"]
    assert set(summary["budgets"]) == {"1", "2"}
    assert sorted(summary["budgets"]["2"]["rank_by_train_loss"]) == sorted(cfg["methods"])
    assert summary["ranking_changes"][0]["from"] == 1 and summary["ranking_changes"][0]["to"] == 2


def test_theorem_mode_convergence_only_reuses_the_chosen_lrs(theorem_run, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mode", "theorem", "--quick", "--methods", "dense,weight_2l",
                           "--convergence-only", "--lr-from", str(theorem_run / "results.json"),
                           "--convergence-width", "16", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    earlier = json.loads((theorem_run / "results.json").read_text())
    assert {p["role"] for p in record["points"]} == {"convergence"}
    for p in record["points"]:
        assert p["width"] == 16
        row = next(r for r in earlier["summary"] if r["method"] == p["method"] and r["width"] == 16)
        assert p["lr"] == row["chosen_lr"]


@pytest.mark.parametrize("argv, message", [
    (["--mode", "theorem", "--tasks", "synthetic"], "--tasks: unknown task (theorem mode) 'synthetic'"),
    (["--mode", "theorem", "--methods", "weight"], "--methods: unknown method (theorem mode) 'weight'"),
    (["--mode", "theorem", "--score-lrs", "0.1,0"], "--score-lrs: every value must be in"),
    (["--mode", "theorem", "--adam-lrs", ""], "--adam-lrs: at least one learning rate"),
    (["--mode", "theorem", "--convergence-epochs", "3"], "--convergence-epochs: give at least two budgets"),
    (["--mode", "theorem", "--convergence-epochs", "3,x"], "--convergence-epochs: a comma list of int values"),
    (["--mode", "theorem", "--convergence-only"], "--convergence-only: needs --lr-from"),
    (["--mode", "theorem", "--convergence-only", "--convergence-epochs", "1,2", "--lr-from", "/nonexistent.json"],
     "--lr-from: a comma list of existing results.json files"),
    (["--mode", "theorem", "--val-limit", "-1"], "--val-limit: must be >= 0"),
    (["--estimate"], "--estimate: only with --mode theorem"),
    (["--mode", "nope"], "--mode: invalid choice"),
])
def test_theorem_mode_bad_options_exit_2_naming_the_flag(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv, "--out", str(tmp_path / "never")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "never").exists()


def test_theorem_mode_combine_lets_a_later_search_replace_an_earlier_one(theorem_run, tmp_path):
    """--combine: a later file's lr search for a (task, method, width) replaces an earlier file's."""
    first = json.loads((theorem_run / "results.json").read_text())
    later = dict(first, points=[dict(p, lr_grid=p["lr_grid"] + [9.0]) for p in first["points"]
                                if p["method"] == "neuron" and p["width"] == 16 and p["role"] != "convergence"])
    later_file = tmp_path / "later.json"
    later_file.write_text(json.dumps(later))
    out = tmp_path / "combined"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mode", "theorem", "--combine",
                           f"{theorem_run / 'results.json'},{later_file}", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    neuron16 = [p for p in record["points"] if p["method"] == "neuron" and p["width"] == 16 and p["role"] != "convergence"]
    assert neuron16 and all(9.0 in p["lr_grid"] for p in neuron16)
    assert len(record["points"]) == len(first["points"])
    assert record["convergence"]["mnist"]["width"] == 32 and record["status"] == "done"
