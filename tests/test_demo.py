"""`make demo` end to end on a small slice of MNIST: the table, the curves PNG and demo.json."""
from __future__ import annotations

import dataclasses
import json

from maskprune import cli
from maskprune import data as datasets



def test_demo_prints_table_and_writes_png(tmp_path, capsys, monkeypatch):
    full = datasets.load("mnist")
    small = dataclasses.replace(full, **{k: getattr(full, k)[:600] for k in
                                         ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")})
    monkeypatch.setattr(datasets, "load", lambda name, root=None: small)
    cli.main(["demo", "--epochs", "2", "--out", str(tmp_path / "demo"), "--quiet"])
    out = capsys.readouterr().out
    table = out[out.index("lenet300 / MNIST"):].splitlines()
    assert table[1].startswith("mask (density 0.5)") and table[2].startswith("dense")
    assert "133,100 / 266,200" in table[1] and "266,200 / 266,200" in table[2]
    png = (tmp_path / "demo" / "val_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    summaries = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert {s["mode"] for s in summaries.values()} == {"mask", "dense"}
    assert all(s["epochs"] == 2 and s["threads"] == 1 for s in summaries.values())
    # a second demo replaces the first one's runs
    cli.main(["demo", "--epochs", "1", "--out", str(tmp_path / "demo"), "--quiet"])
    assert len((tmp_path / "demo" / "mask" / "metrics.jsonl").read_text().splitlines()) == 1


def test_demo_without_matplotlib_prints_the_table_and_a_note(tmp_path, capsys, monkeypatch):
    """An installed wheel without matplotlib: the table is printed, the plot replaced by a one-line note."""
    import builtins

    full = datasets.load("mnist")
    small = dataclasses.replace(full, **{k: getattr(full, k)[:300] for k in
                                         ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")})
    monkeypatch.setattr(datasets, "load", lambda name, root=None: small)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    cli.main(["demo", "--epochs", "1", "--out", str(tmp_path / "demo"), "--quiet"])
    out = capsys.readouterr().out
    assert "lenet300 / MNIST" in out and "no plot: matplotlib is not installed" in out
    assert not (tmp_path / "demo" / "val_curves.png").exists()
    assert (tmp_path / "demo" / "demo.json").is_file()
