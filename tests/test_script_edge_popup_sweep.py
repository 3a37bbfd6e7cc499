"""scripts/edge_popup_sweep.py --quick runs end to end: trainer runs for lenet300, conv4, global top-k, JSON + PNG."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "edge_popup_sweep.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("edge_popup_sweep")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_writes_results_and_png(quick_run):
    record = json.loads((quick_run / "results.json").read_text())
    assert record["status"] == "done" and record["wall_time_s"] > 0
    assert record["environment"]["device"] == "cpu" and record["environment"]["torch"]
    assert record["config"]["quick"] is True
    assert (quick_run / "edge_popup_sweep.png").stat().st_size > 10_000


def test_grid_points(quick_run):
    record = json.loads((quick_run / "results.json").read_text())
    cfg = record["config"]
    pts = record["points"]
    lenet_mask = {(p["density"], p["init"], p["width"], p["seed"]) for p in pts
                  if p["net"] == "lenet300" and p["mode"] == "mask" and p["policy"] == "layerwise"}
    assert lenet_mask == {(d, i, w, s) for d in cfg["densities"] for i in cfg["inits"] for w in cfg["widths"]
                          for s in cfg["seeds"]}
    assert {p["net"] for p in pts if p["mode"] == "dense"} == {"lenet300", "conv4"}
    assert {p["density"] for p in pts if p["policy"] == "global"} == set(cfg["global_densities"])
    for p in pts:
        assert 0 <= p["test_acc"] <= 1 and "seed" in p
        if p["mode"] == "mask":
            assert p["kept_weights"] / p["total_weights"] == pytest.approx(p["density"], abs=0.01)
        else:
            assert p["kept_weights"] == p["total_weights"]
    assert all(p["via"] == "maskprune.train.train" for p in pts if p["net"] == "lenet300")
    rows = record["summary"]
    assert all(r["gap_to_dense"] is not None for r in rows)


def test_combine_merges_runs_counting_a_point_once(quick_run, tmp_path):
    """--combine over the same run twice gives the run's own summary (each point counted once)."""
    src = str(quick_run / "results.json")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--combine", src, src, "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    combined = json.loads((tmp_path / "combined.json").read_text())
    record = json.loads((quick_run / "results.json").read_text())
    assert combined["points"] == len(record["points"]) and combined["summary"] == record["summary"]
    assert (tmp_path / "combined.png").stat().st_size > 10_000
    proc = subprocess.run([sys.executable, str(SCRIPT), "--combine", str(tmp_path / "nope.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--combine: no such results.json" in proc.stderr


def test_combine_keeps_only_the_nets_asked_for(quick_run, tmp_path):
    """--nets with --combine merges one net's points out of runs that hold both nets."""
    src = str(quick_run / "results.json")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--combine", src, "--nets", "conv4", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    combined = json.loads((tmp_path / "combined.json").read_text())
    record = json.loads((quick_run / "results.json").read_text())
    assert combined["nets"] == ["conv4"] and {r["net"] for r in combined["summary"]} == {"conv4"}
    assert combined["points"] == sum(p["net"] == "conv4" for p in record["points"]) > 0
    assert combined["summary"] == [r for r in record["summary"] if r["net"] == "conv4"]
    lenet_only = tmp_path / "lenet_only.json"
    lenet_only.write_text(json.dumps({"points": [p for p in record["points"] if p["net"] == "lenet300"]}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--combine", str(lenet_only), "--nets", "conv4", "--out",
                           str(tmp_path / "empty")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--combine: the runs hold no points of --nets conv4" in proc.stderr
    assert not (tmp_path / "empty" / "combined.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--nets", "resnet50"], "--nets: unknown net"),
    (["--inits", "zeros"], "--inits: unknown weight init"),
    (["--conv-inits", "signed_constant,xavier"], "--conv-inits: unknown weight init"),
    (["--densities", "0.5,1.5"], "--densities: every value must be in"),
    (["--seeds", "a"], "--seeds: a comma list of int values"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--conv-train-limit", "-1"], "--conv-train-limit: must be >= 0"),  # 0 means all images
    (["--conv-test-limit", "-5"], "--conv-test-limit: must be >= 0"),
])
def test_bad_options_exit_2_naming_them(argv, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_no_dense_grid_has_only_masks_and_summarizes_and_plots(tmp_path):
    """--no-dense leaves the dense baselines to another run: the grid has mask points only, and a run's own
    summary (gap_to_dense None) and plot still work."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import edge_popup_sweep as sweep
    finally:
        sys.path.pop(0)
    args = sweep.parse_args(["--nets", "conv4", "--no-dense", "--conv-widths", "2", "--conv-densities", "0.1,0.9",
                             "--conv-inits", "signed_constant"])
    pts = sweep.grid(args)
    assert [(p["mode"], p["density"], p["width"]) for p in pts] == [("mask", 0.1, 2.0), ("mask", 0.9, 2.0)]
    assert any(p["mode"] == "dense" for p in sweep.grid(sweep.parse_args(["--nets", "conv4"])))
    for p, acc in zip(pts, (0.8, 0.9)):
        p.update(test_acc=acc, kept_weights=1, total_weights=2)
    rows = sweep.summarize(pts)
    assert [r["gap_to_dense"] for r in rows] == [None, None]
    sweep.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000
