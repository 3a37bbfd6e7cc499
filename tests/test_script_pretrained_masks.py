"""scripts/pretrained_masks.py --quick runs end to end (about 20 s on one idle core) and writes a complete
results.json and a PNG; bad flags stop it with exit code 2 and a message naming the flag, before anything runs."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "pretrained_masks.py"
ARMS = ["pretrained_threshold", "dense_fashion", "random_threshold", "random_layerwise"]
N_WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10  # lenet300 without biases


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained_masks")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "pretrained_masks.png").stat().st_size > 10_000
    return json.loads((out / "results.json").read_text())


def test_every_arm_ran_with_its_chosen_lr(record):
    assert record["status"] == "done" and record["wall_time_s"] > 0
    cfg = record["config"]
    assert cfg["quick"] is True and cfg["arms"] == ARMS and cfg["seeds"] == [0] and cfg["bias"] is False
    assert [(p["arm"], p["seed"]) for p in record["points"]] == [(a, 0) for a in ARMS]
    steps = -(-cfg["train_limit"] // cfg["batch_size"]) * cfg["epochs"]
    for p in record["points"]:
        assert 0.0 <= p["test_acc"] <= 1.0 and p["steps"] == steps and not p["diverged"]
    # per arm, each optimizer's lr is the best on validation among its tried ones (a best at an edge extended the
    # grid once), and the chosen (optimizer, lr) is the best of all the arm's selection runs
    for choice in record["lr_choice"]:
        arm, opt = choice["arm"], choice["optimizer"]
        tried = [s for s in record["selection"] if (s["arm"], s["optimizer"]) == (arm, opt)]
        assert sorted(s["lr"] for s in tried) == choice["grid"]
        assert choice["lr"] == max(tried, key=lambda s: s["val_acc"])["lr"]
        base = cfg["grids"][arm][opt]
        assert set(base) <= set(choice["grid"]) and len(choice["grid"]) <= len(base) + cfg["grid_extend"]
        if len(choice["grid"]) == len(base):
            assert not choice["at_edge"]
        if choice["chosen"]:
            every = [s for s in record["selection"] if s["arm"] == arm]
            assert choice["val_acc"] == max(s["val_acc"] for s in every)
            if arm != "pretrain_mnist":
                assert {(p["optimizer"], p["lr"]) for p in record["points"] if p["arm"] == arm} == {(opt, choice["lr"])}
    for arm in ["pretrain_mnist", *ARMS]:
        searched = [c["optimizer"] for c in record["lr_choice"] if c["arm"] == arm]
        assert searched == list(cfg["grids"][arm])
        assert sum(c["chosen"] for c in record["lr_choice"] if c["arm"] == arm) == 1
    assert list(cfg["grids"]["pretrain_mnist"]) == ["sgd"]  # the backbone is trained with SGD only
    assert set(cfg["grids"]["dense_fashion"]) == {"sgd", "adam"}  # --optimizers all (the default) searches both
    assert {c["arm"] for c in record["lr_choice"]} == {"pretrain_mnist", *ARMS}
    # seed 0's final run is its selection run at the chosen lr (deterministic training), reused
    assert all(p.get("reused") for p in record["points"])
    assert record["pretrain"][0]["seed"] == 0 and record["pretrain"][0]["test_acc"] > 0.3


def test_kept_fractions_and_bits(record):
    pts = {p["arm"]: p for p in record["points"]}
    target = record["target_kept_fraction"]
    assert target == pts["pretrained_threshold"]["kept_fraction"]
    assert 0.0 < target <= 1.0
    # the top-k arm keeps (a)'s fraction exactly (up to rounding per layer); the threshold arm starts there
    assert abs(pts["random_layerwise"]["kept_fraction"] - target) < 1e-3
    assert abs(pts["random_threshold"]["initial_kept_fraction"] - target) < 0.01
    for arm in ("pretrained_threshold", "random_threshold", "random_layerwise"):
        p = pts[arm]
        assert p["weights"] == N_WEIGHTS and p["task_bits"] == p["mask_bits"] == N_WEIGHTS
        assert 0 < p["mask_entropy_bits"] <= N_WEIGHTS and len(p["layer_fractions"]) == 3
        assert p["kept"] == round(p["kept_fraction"] * N_WEIGHTS)
    assert pts["pretrained_threshold"]["shared_bits"] == 32 * N_WEIGHTS
    assert pts["random_threshold"]["shared_bits"] == pts["random_layerwise"]["shared_bits"] == 64
    assert pts["dense_fashion"]["task_bits"] == 32 * N_WEIGHTS and pts["dense_fashion"]["kept_fraction"] == 1.0
    summary = {r["arm"]: r for r in record["summary"]}
    assert list(summary) == ARMS
    for arm, r in summary.items():
        assert r["test_acc_mean"] == pts[arm]["test_acc"] and r["test_acc_std"] == 0.0 and r["seeds"] == 1
    # even this tiny budget learns Fashion-MNIST densely and with a top-k mask (chance: 0.10)
    assert summary["dense_fashion"]["test_acc_mean"] > 0.4 and summary["random_layerwise"]["test_acc_mean"] > 0.4


@pytest.mark.parametrize("flag, value, message", [
    ("--arms", "dense_fashion,popup", "--arms: unknown arm 'popup'"),
    ("--arms", "random_layerwise", "--arms: random_threshold and random_layerwise take their kept fraction"),
    ("--epochs", "0", "--epochs: must be >= 1, got 0"),
    ("--grid-extend", "-1", "--grid-extend: must be >= 0, got -1"),
    ("--optimizers", "both", "--optimizers: invalid choice: 'both'"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, flag, value, message):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import pretrained_masks
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with pytest.raises(SystemExit) as stop:
        pretrained_masks.parse_args([flag, value, "--out", str(tmp_path / "x")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "x").exists()


def test_fresh_head_trains_a_dense_output_layer_in_every_masked_arm(tmp_path):
    out = tmp_path / "fresh"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--head", "fresh", "--arms",
                           "pretrained_threshold,random_layerwise", "--optimizers", "arm", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["head"] == "fresh"
    # --optimizers arm: each arm searches only its own optimizer (Adam for threshold, SGD for layerwise)
    assert {c["arm"]: c["optimizer"] for c in record["lr_choice"]} == {
        "pretrain_mnist": "sgd", "pretrained_threshold": "adam", "random_layerwise": "sgd"}
    masked = 784 * 300 + 300 * 100
    for p in record["points"]:
        assert p["weights"] == masked and len(p["layer_fractions"]) == 2 and p["head_bits"] == 32 * 100 * 10
        assert p["task_bits"] == masked + 32 * 100 * 10
    pts = {p["arm"]: p for p in record["points"]}
    assert abs(pts["random_layerwise"]["kept_fraction"] - pts["pretrained_threshold"]["kept_fraction"]) < 1e-3
    assert pts["random_layerwise"]["test_acc"] > 0.4
