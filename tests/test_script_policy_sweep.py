"""scripts/policy_sweep.py --quick runs end to end (< 1 min on one core) and writes a complete results.json
and a PNG; bad flags stop it with exit code 2 and a message naming the flag."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "policy_sweep.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy_sweep")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_every_policy_density_and_seed_is_there(quick_run):
    record = json.loads((quick_run / "results.json").read_text())
    assert record["status"] == "done" and record["wall_time_s"] > 0
    cfg = record["config"]
    assert cfg["quick"] is True and cfg["tasks"] == ["lenet300-mnist"] and cfg["densities"] == [0.1, 0.5]
    assert cfg["score_init"] == "kaiming_uniform"  # edge-popup's scores unless --score-init says otherwise
    assert set(cfg["policies"]) == {"layerwise", "global", "supermask", "biprop", "signed", "iterand", "gem_miner",
                                    "threshold"}
    keys = {(p["task"], p["policy"], p["density"], p["seed"]) for p in record["points"]}
    assert keys == {("lenet300-mnist", pol, d, 0) for pol in cfg["policies"] for d in cfg["densities"]}
    for p in record["points"]:
        assert 0.0 <= p["test_acc"] <= 1.0 and 0.0 < p["kept_fraction"] <= 1.0 and p["steps"] == 20
        if p["policy"] in ("layerwise", "global", "biprop", "signed", "iterand"):
            assert abs(p["kept_fraction"] - p["density"]) < 1e-3
    # the lr of each policy (and gem_miner's λ, searched with it) is the grid point with the best validation accuracy
    assert cfg["gem_l2"] == [1e-8, 1e-5]
    for policy in cfg["policies"]:
        tried_all = [s for s in record["selection"] if s["policy"] == policy]
        l2s = cfg["gem_l2"] if policy == "gem_miner" else [None]
        assert [s.get("l2") for s in tried_all] == [l2 for l2 in l2s for s in tried_all if s.get("l2") == l2]
        for l2 in l2s:
            tried = [s for s in tried_all if s.get("l2") == l2]
            (grid,) = cfg["grids"][policy].values()  # one optimizer per policy by default
            lrs = [s["lr"] for s in tried]
            assert lrs[:len(grid)] == grid and len(lrs) <= len(grid) + cfg["grid_extend"]
            # every extension step continues the grid's own ratio past the edge that was then the best
            for i in range(len(grid), len(lrs)):
                best_so_far = max(tried[:i], key=lambda s: s["val_acc"])["lr"]
                ordered = sorted(lrs[:i])
                assert best_so_far in (ordered[0], ordered[-1])
                expected = (best_so_far * ordered[-1] / ordered[-2] if best_so_far == ordered[-1]
                            else best_so_far * ordered[0] / ordered[1])
                assert lrs[i] == pytest.approx(expected)
            choice = next(c for c in record["lr_choice"] if c["policy"] == policy and c.get("l2") == l2)
            assert choice["grid"] == sorted(lrs) and choice["at_edge"] == (choice["lr"] in (min(lrs), max(lrs)))
        best = max(tried_all, key=lambda s: s["val_acc"])
        chosen = {(p["optimizer"], p["lr"], p.get("l2")) for p in record["points"] if p["policy"] == policy}
        assert chosen == {(best["optimizer"], best["lr"], best.get("l2"))}
    # even this tiny budget learns with the top-k rules at density 0.5 (chance: 0.10)
    layerwise = next(p for p in record["points"] if p["policy"] == "layerwise" and p["density"] == 0.5)
    assert layerwise["test_acc"] > 0.4
    assert (quick_run / "policy_sweep.png").stat().st_size > 10_000
    # table.md: a row per policy, a column per density, each cell the points' mean test accuracy and their lr
    table = (quick_run / "table.md").read_text().splitlines()
    assert "| policy | density 0.1 | density 0.5 |" in table
    row = next(line for line in table if line.startswith("| `layerwise` |"))
    assert f"{100 * layerwise['test_acc']:.2f} ± 0.00 ({layerwise['optimizer']} {layerwise['lr']:.3g})" in row
    assert len([line for line in table if line.startswith("| `")]) == len(record["config"]["policies"])


def test_dense_anchor_trains_the_weights_once_per_seed(tmp_path):
    """--policies dense: the same network with its weights trained, its lr chosen on validation from its own grid,
    one point per seed at density 1 whatever --densities says."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--policies", "dense", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["grids"]["dense"] == {"sgd": [0.03, 0.1]}  # --quick: the default grid's upper two
    (point,) = record["points"]
    assert point["policy"] == "dense" and point["density"] == 1.0 and point["kept_fraction"] == 1.0
    assert point["steps"] == 20
    best = max(record["selection"], key=lambda s: s["val_acc"])
    assert point["lr"] == best["lr"]
    assert point["test_acc"] > 0.5  # 20 steps of dense SGD on 600 MNIST images: 0.69 here (chance 0.10)


def test_select_seeds_scores_each_lr_by_the_mean_over_seeds(tmp_path):
    """--select-seeds 2: every lr of the grid runs seeds 0 and 1, and the lr chosen is the best mean validation
    accuracy (the lr_choice records that mean), not seed 0's alone."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--policies", "layerwise", "--select-seeds", "2",
                           "--grid", "layerwise=0.1,0.3", "--grid-extend", "0", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    runs = {(s["lr"], s["seed"]): s["val_acc"] for s in record["selection"]}
    assert sorted(runs) == [(0.1, 0), (0.1, 1), (0.3, 0), (0.3, 1)]
    means = {lr: (runs[(lr, 0)] + runs[(lr, 1)]) / 2 for lr in (0.1, 0.3)}
    (choice,) = record["lr_choice"]
    assert choice["lr"] == max(means, key=means.get) and choice["val_acc"] == pytest.approx(max(means.values()))
    assert {p["lr"] for p in record["points"]} == {choice["lr"]}
    # the final point at the selection density (--quick: 0.5, seed 0) is its selection run, not trained again
    (again,) = [p for p in record["points"] if p["density"] == 0.5]
    assert again.get("reused") and again["val_acc"] == runs[(choice["lr"], 0)]
    assert not any(p.get("reused") for p in record["points"] if p["density"] != 0.5)
    bad = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--select-seeds", "0", "--out", str(tmp_path / "x")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--select-seeds: must be >= 1, got 0" in bad.stderr


def test_optimizer_flag_switches_the_dense_anchor_to_adam(tmp_path):
    """--optimizer dense=adam with a --grid of its own: the config records Adam and the lrs, and the run learns."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--policies", "dense", "--optimizer", "dense=adam",
                           "--grid", "dense=0.001,0.003", "--grid-extend", "0", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["grids"]["dense"] == {"adam": [0.001, 0.003]}
    assert sorted((s["optimizer"], s["lr"]) for s in record["selection"]) == [("adam", 0.001), ("adam", 0.003)]
    (point,) = record["points"]
    assert point["test_acc"] > 0.5  # 20 Adam steps on 600 MNIST images (chance 0.10)


def test_weight_init_flag_sets_the_frozen_weights(quick_run, tmp_path):
    """Over signed-constant weights (the default) biprop's α·sign(W) is W, so biprop gives layerwise's digits; over
    --weight-init kaiming_normal it does not, and the config records the init."""
    def accuracies(record, policy):
        return [(p["density"], p["val_acc"], p["test_acc"]) for p in record["points"] if p["policy"] == policy]

    default = json.loads((quick_run / "results.json").read_text())
    assert default["config"]["weight_init"] == "signed_constant"
    assert accuracies(default, "biprop") == accuracies(default, "layerwise")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--policies", "layerwise,biprop", "--weight-init",
                           "kaiming_normal", "--grid-extend", "0", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["weight_init"] == "kaiming_normal"
    assert accuracies(record, "biprop") != accuracies(record, "layerwise")


def test_select_per_density_chooses_each_densitys_lr_there(tmp_path):
    """--select-per-density: each lr grid is searched at every density (seed 0), and each density's runs use the
    best lr found at that density; the dense anchor still chooses once."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--policies", "layerwise,dense",
                           "--select-per-density", "--grid-extend", "0", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["select_per_density"] is True
    densities = record["config"]["densities"]
    tried = [s for s in record["selection"] if s["policy"] == "layerwise"]
    assert sorted((s["density"], s["lr"]) for s in tried) == sorted(
        (d, lr) for d in densities for lr in record["config"]["grids"]["layerwise"]["sgd"])
    for density in densities:
        here = [s for s in tried if s["density"] == density]
        best = max(here, key=lambda s: s["val_acc"])
        (choice,) = [c for c in record["lr_choice"] if c["policy"] == "layerwise" and c["density"] == density]
        assert choice["lr"] == best["lr"]
        assert {p["lr"] for p in record["points"] if p["policy"] == "layerwise" and p["density"] == density} == {
            best["lr"]}
    assert len([c for c in record["lr_choice"] if c["policy"] == "dense"]) == 1


def test_optimizer_flag_searches_two_optimizers_and_keeps_the_best(tmp_path):
    """--optimizer layerwise=sgd,adam: both grids are searched on validation, the final runs use the (optimizer,
    lr) of the best validation accuracy, and every record names its optimizer."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--policies", "layerwise",
                           "--optimizer", "layerwise=sgd,adam", "--grid", "layerwise:adam=1e-4,1e-3",
                           "--grid-extend", "0", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["grids"]["layerwise"] == {"sgd": [0.1, 0.3], "adam": [0.0001, 0.001]}
    tried = sorted((s["optimizer"], s["lr"]) for s in record["selection"])
    assert tried == [("adam", 0.0001), ("adam", 0.001), ("sgd", 0.1), ("sgd", 0.3)]
    best = max(record["selection"], key=lambda s: s["val_acc"])
    assert {c["optimizer"] for c in record["lr_choice"]} == {"sgd", "adam"}
    assert {(p["optimizer"], p["lr"]) for p in record["points"]} == {(best["optimizer"], best["lr"])}


def test_optimizer_all_searches_each_policys_default_grids():
    """all=sgd,adam: every policy searches both its default grids, SGD's first; a policy named on its own
    overrides all; without --optimizer each searches its first grid only."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import policy_sweep
    finally:
        sys.path.remove(str(SCRIPT.parent))
    args = policy_sweep.parse_args(["--optimizer", "all=sgd,adam", "--optimizer", "signed=adam"])
    grids = {p: policy_sweep.search_grids(p, args) for p in policy_sweep.GRIDS}
    assert list(grids["layerwise"]) == ["sgd", "adam"] and list(grids["dense"]) == ["sgd", "adam"]
    assert all(list(grids[p]) == ["sgd", "adam"] for p in policy_sweep.GRIDS if p != "signed")
    assert grids["supermask"]["adam"] == [0.03, 0.1, 0.3] and grids["gem_miner"]["sgd"] == [1.0, 3.0, 10.0]
    assert list(grids["signed"]) == ["adam"]
    default = policy_sweep.parse_args([])
    assert {p: list(policy_sweep.search_grids(p, default)) for p in ("supermask", "gem_miner", "threshold")} == {
        "supermask": ["sgd"], "gem_miner": ["adam"], "threshold": ["adam"]}


@pytest.mark.parametrize("flag, value, message", [
    ("--optimizer", "dense=rmsprop", "--optimizer: unknown optimizer 'rmsprop'"),
    ("--optimizer", "popup=adam", "--optimizer: unknown policy 'popup'"),
    ("--policies", "layerwise,popup", "--policies: unknown policy 'popup'"),
    ("--densities", "0.5,2", r"--densities: every value must be in \[0.0001, 1.0\], got 2.0"),
    ("--epochs", "0", "--epochs: must be >= 1, got 0"),
    ("--select-density", "0", r"--select-density: must be in \(0, 1\], got 0.0"),
    ("--grid", "popup=0.1,0.3", "--grid: unknown policy 'popup'"),
    ("--grid", "supermask:adam=0.1,0.3", "--grid: supermask does not search 'adam'"),
    ("--grid", "gem_miner=0.1,x", "--grid: a comma list of float values"),
    ("--gem-l2", "1e-5,2", r"--gem-l2: every value must be in \[0.0, 1.0\], got 2.0"),
    ("--policy-options", "supermask=bogus=1", r"--policy-options supermask: .*unknown option\(s\) \['bogus'\]"),
    ("--policy-options", "popup=a=1", "--policy-options: unknown policy 'popup'"),
    ("--score-init", "normal", "argument --score-init: invalid choice: 'normal'"),
    ("--weight-init", "xavier", "argument --weight-init: invalid choice: 'xavier'"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, flag, value, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), flag, value, "--out", str(tmp_path / "x")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    import re
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "x").exists()


def test_combine_merges_runs_and_relabels(quick_run, tmp_path):
    """--combine trains nothing: a later file replaces an earlier one's (task, policy) rows, @LABEL renames."""
    src = quick_run / "results.json"
    out = tmp_path / "combined"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--combine", str(src), f"{src}@again", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    original = json.loads(src.read_text())
    assert record["config"]["policies"] == [*original["config"]["policies"], "again"]
    assert len(record["points"]) == 2 * len(original["points"])  # one task: every point once more, as "again"
    again = [p for p in record["points"] if p["policy"] == "again"]
    assert {p["source"] for p in again} == {str(src)} and len(again) == len(original["points"])
    assert (out / "policy_sweep.png").stat().st_size > 10_000
    # {policy} in a label stands for each point's own policy: a many-policy file relabelled row by row
    out2 = tmp_path / "combined-policy-label"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--combine", str(src), f"{src}@{{policy}}-again", "--out",
                           str(out2)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    relabelled = json.loads((out2 / "results.json").read_text())
    policies = original["config"]["policies"]
    assert relabelled["config"]["policies"] == [*policies, *(f"{p}-again" for p in policies)]
    assert sorted(p["policy"] for p in relabelled["points"] if p["policy"].endswith("-again")) == sorted(
        f"{p['policy']}-again" for p in original["points"])
    bad = subprocess.run([sys.executable, str(SCRIPT), "--combine", str(tmp_path / "none.json"), "--out",
                          str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--combine" in bad.stderr and "is not a policy_sweep results.json" in bad.stderr


def _per_density_record(optimizer: str, val_by_density: dict[float, float], select_per_density: bool = True) -> dict:
    """A minimal policy_sweep results.json of one layerwise run per density (seed 0) plus the dense anchor."""
    points = [{"task": "lenet300-mnist", "policy": "layerwise", "density": d, "seed": 0, "optimizer": optimizer,
               "lr": 0.1, "val_acc": v, "test_acc": v, "kept_fraction": d} for d, v in val_by_density.items()]
    points.append({"task": "lenet300-mnist", "policy": "dense", "density": 1.0, "seed": 0, "optimizer": optimizer,
                   "lr": 0.1, "val_acc": 0.98, "test_acc": 0.98, "kept_fraction": 1.0})
    choices = [{"task": "lenet300-mnist", "policy": "layerwise", "optimizer": optimizer, "density": d, "lr": 0.1,
                "val_acc": v} for d, v in val_by_density.items()]
    choices.append({"task": "lenet300-mnist", "policy": "dense", "optimizer": optimizer, "density": 0.1, "lr": 0.1,
                    "val_acc": 0.98 if optimizer == "sgd" else 0.985})
    return {"config": {"epochs": 10, "select_per_density": select_per_density}, "points": points,
            "lr_choice": choices}


def test_combine_best_keeps_each_density_from_the_run_that_won_on_validation(tmp_path):
    """--combine-best: two runs of one policy (SGD, Adam), each searched per density; at every density the points of
    the run whose lr choice scored higher on validation are kept (a tie keeps the earlier file), the dense anchor by
    its one choice."""
    sgd, adam = tmp_path / "sgd.json", tmp_path / "adam.json"
    sgd.write_text(json.dumps(_per_density_record("sgd", {0.05: 0.97, 0.1: 0.975, 0.5: 0.980})))
    adam.write_text(json.dumps(_per_density_record("adam", {0.05: 0.975, 0.1: 0.975, 0.5: 0.978})))
    out = tmp_path / "best"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--combine", str(sgd), str(adam), "--combine-best",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    chosen = {(p["policy"], p["density"]): p["optimizer"] for p in record["points"]}
    assert chosen == {("layerwise", 0.05): "adam", ("layerwise", 0.1): "sgd", ("layerwise", 0.5): "sgd",
                      ("dense", 1.0): "adam"}
    assert record["config"]["best_on_validation"] is True
    assert record["config"]["combined"][1]["densities_taken"] == ["lenet300-mnist/layerwise@0.05",
                                                                  "lenet300-mnist/dense@1"]
    layerwise_row = next(line for line in (out / "table.md").read_text().splitlines() if "`layerwise`" in line)
    assert layerwise_row == ("| `layerwise` | 97.50 ± 0.00 (adam 0.1) | 97.50 ± 0.00 (sgd 0.1) "
                             "| 98.00 ± 0.00 (sgd 0.1) |  |")  # no layerwise point at density 1
    # a label renames the rows and keeps the choice: each labelled row is scored by its own policy's lr choices
    labelled = subprocess.run([sys.executable, str(SCRIPT), "--combine", f"{sgd}@{{policy}}-kn",
                               f"{adam}@{{policy}}-kn", "--combine-best", "--out", str(tmp_path / "labelled")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    relabelled = json.loads((tmp_path / "labelled" / "results.json").read_text())["points"]
    assert {(p["policy"], p["density"]): p["optimizer"] for p in relabelled} == {
        (f"{policy}-kn", density): optimizer for (policy, density), optimizer in chosen.items()}
    # without --combine-best the later file replaces the whole row
    plain = subprocess.run([sys.executable, str(SCRIPT), "--combine", str(sgd), str(adam), "--out",
                            str(tmp_path / "plain")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert {p["optimizer"] for p in json.loads((tmp_path / "plain" / "results.json").read_text())["points"]} == {"adam"}
    # a run whose lr was chosen at one density has no per-density validation to compare: refused, by name
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_per_density_record("sgd", {0.05: 0.97}, select_per_density=False)))
    bad = subprocess.run([sys.executable, str(SCRIPT), "--combine", str(one), str(adam), "--combine-best", "--out",
                          str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--combine-best" in bad.stderr and "--select-per-density" in bad.stderr
    alone = subprocess.run([sys.executable, str(SCRIPT), "--combine-best"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert alone.returncode == 2 and "--combine-best: only with --combine" in alone.stderr


def test_grid_search_extends_at_an_edge_and_keeps_the_middle_when_all_diverge():
    """scripts/_common.grid_search, the lr choice both policy_sweep and pretrained_masks use."""
    sys.path.insert(0, str(REPO / "scripts"))
    from _common import grid_search

    peak = lambda lr: 1 - abs(lr - 2.0) / 10  # noqa: E731  (an accuracy, best at 2: past the grid's upper edge)
    assert grid_search([0.25, 0.5, 1.0], peak, extend=2) == (1.0, 2.0, [0.25, 0.5, 1.0, 2.0, 4.0])
    assert grid_search([0.25, 0.5, 1.0], peak, extend=1) == (1.0, 2.0, [0.25, 0.5, 1.0, 2.0])
    assert grid_search([1.0, 2.0, 4.0], peak, extend=2) == (1.0, 2.0, [1.0, 2.0, 4.0])  # interior: no more runs
    assert grid_search([4.0, 8.0], peak, extend=1) == (1.0, 2.0, [2.0, 4.0, 8.0])  # extended below
    val, lr, tried = grid_search([0.1, 0.3, 1.0], lambda lr: float("nan"), extend=2)
    assert (val, lr, tried) == (-1.0, 0.3, [0.1, 0.3, 1.0])


def test_pyplot_gives_agg_or_says_why_there_is_no_png(monkeypatch, capsys):
    """scripts/_common.pyplot, every script's plot import: Agg pyplot, or None and one stderr line naming the script
    when matplotlib cannot be imported (the results JSON is written either way)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from _common import pyplot

    plt = pyplot("policy_sweep")
    assert plt is not None and plt.get_backend().lower() == "agg"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert pyplot("policy_sweep") is None
    assert "policy_sweep: matplotlib is not installed; no PNG written" in capsys.readouterr().err


def test_grid_without_an_optimizer_is_refused_where_a_policy_searches_two(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--optimizer", "layerwise=sgd,adam",
                           "--grid", "layerwise=0.1,0.3", "--out", str(tmp_path / "x")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--grid: layerwise searches sgd and adam; name one, e.g. layerwise:sgd=LR,..." in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()
