"""Issue 17 integration: every mask policy through convert(), the trainer (hooks, penalty, policy state in
last.pt, resume) and the CLI (--policy, --<policy>-<option> flags)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import maskprune
import maskprune.train as trainer
from maskprune import masks
from maskprune.cli import main
from maskprune.nn import MaskedLinear, mask_stats, masked_layers
from maskprune.train import TrainConfig, train
from train_helpers import train_until_first_checkpoint

TINY = dict(model="lenet300", dataset="mnist", epochs=2, batch_size=64, limit_train=512, device="cpu", threads=1)
OPTS = {"iterand": "period=3", "gem_miner": "freeze_every=1"}
LR = {"supermask": 100.0, "gem_miner": 0.01, "threshold": 0.001}


@pytest.mark.parametrize("policy", masks.ALL_POLICIES)
def test_convert_attaches_one_shared_policy_and_layers_delegate(policy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    maskprune.convert(model, 0.5, policy=policy, weight_init="signed_constant")
    layers = [l for _, l in masked_layers(model)]
    shared = layers[0].mask_policy
    assert all(l.mask_policy is shared for l in layers) and shared.name == policy
    x = torch.randn(4, 6)
    model.eval()
    y = model(x)
    h = torch.relu(x @ shared.effective_weight(layers[0]).T)
    assert torch.allclose(y, h @ shared.effective_weight(layers[1]).T, atol=1e-6)
    stats = mask_stats(model)
    assert stats["layers"][0]["policy"] == policy and 0 < stats["fraction"] <= 1
    assert isinstance(maskprune.to_dense(model)[0], nn.Linear)


def test_convert_checks_policy_options_before_changing_the_model():
    model = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(ValueError, match="option period must be an int >= 1, got 0"):
        maskprune.convert(model, 0.5, policy="iterand", period=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['period'\]"):
        maskprune.convert(model, 0.5, policy="supermask", period=3)
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("policy, value, first", [("threshold", "0.02", 0.02), ("supermask", "-1.5", -1.5),
                                                  ("gem_miner", "half", 0.5)])
def test_the_trainer_passes_a_policys_score_init(policy, value, first):
    """score_init in policy_options (--<policy>-score-init) reaches the policy, not convert's layer initialiser."""
    cfg = TrainConfig(policy=policy, policy_options=f"score_init={value}")
    model = trainer.build_model(cfg, 10, (1, 28, 28))
    scores = [p for n, p in model.named_parameters() if n.endswith("scores")]
    assert scores and all(torch.all(s == first) for s in scores)


def test_policy_options_given_twice_are_refused():
    model = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ValueError, match=r"policy options given twice, in options= and as keywords: \['period'\]"):
        maskprune.convert(model, 0.5, policy="iterand", options={"period": 10}, period=20)
    with pytest.raises(TypeError, match="options must be a dict of policy options, got str"):
        maskprune.convert(model, 0.5, policy="iterand", options="period=10")
    assert type(model[0]) is nn.Linear  # refused before the model changed


@pytest.mark.parametrize("policy", ["supermask", "threshold"])
def test_a_number_as_score_init_is_the_policys_constant(policy):
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    maskprune.convert(model, 0.5, policy=policy, weight_init=None, score_init=0.25)
    assert torch.all(model[0].scores == 0.25)
    with pytest.raises(ValueError, match="score_init must be one of"):  # a policy without a constant init
        maskprune.convert(nn.Sequential(nn.Linear(6, 5)), 0.5, policy="layerwise", score_init=0.25)
    with pytest.raises(ValueError, match="option score_init must be one of uniform, half, keep, got 0.25"):
        maskprune.convert(nn.Sequential(nn.Linear(6, 5)), 0.5, policy="gem_miner", score_init=0.25)



@pytest.mark.parametrize("policy", [p for p in masks.ALL_POLICIES if p != "layerwise"])
def test_train_runs_every_policy(tmp_path, policy):
    cfg = TrainConfig(**TINY, policy=policy, policy_options=OPTS.get(policy, ""), lr=LR.get(policy, 0.1),
                      optimizer="adam" if policy in ("gem_miner", "threshold") else "sgd")
    summary = train(cfg, tmp_path / policy, quiet=True)
    assert summary["policy"] == policy and summary["test_acc_last"] > 0.2
    ckpt = torch.load(tmp_path / policy / "last.pt", weights_only=True)
    assert ckpt["policy"][0]["name"] == policy
    if policy == "iterand":
        assert ckpt["policy"][0]["redraws"] == 2 * (512 // 64) // 3
    if policy == "gem_miner":
        assert summary["kept_fraction"] <= 0.5 + 1e-3


def test_train_adds_gem_miners_l2_gradient_between_backward_and_step(tmp_path, monkeypatch):
    """The trainer calls before_step once per optimizer step, with the scores' gradients present and the step not
    yet taken (gem_miner's 2λp lands in the gradient the optimizer uses)."""
    calls = []
    original = masks.GemMiner.before_step

    def spy(self, layers):
        assert all(layer.scores.grad is not None for layer in layers)
        before = [layer.scores.grad.clone() for layer in layers]
        original(self, layers)
        calls.append(all(torch.allclose(layer.scores.grad, g + 2 * self.l2 * layer.scores.detach())
                         for layer, g in zip(layers, before)))

    monkeypatch.setattr(masks.GemMiner, "before_step", spy)
    cfg = TrainConfig(**TINY, policy="gem_miner", policy_options="l2=0.001", lr=0.01, optimizer="adam")
    train(cfg, tmp_path / "gem", quiet=True)
    assert len(calls) == 2 * (512 // 64) and all(calls)


@pytest.mark.parametrize("policy", ["iterand", "supermask", "gem_miner"])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, policy):
    cfg = TrainConfig(**{**TINY, "epochs": 3}, policy=policy, policy_options=OPTS.get(policy, ""),
                      lr=LR.get(policy, 0.1))
    whole = train(cfg, tmp_path / "whole", quiet=True)
    train_until_first_checkpoint(cfg, tmp_path / "cut", monkeypatch)
    resumed = train(cfg, tmp_path / "cut", resume=str(tmp_path / "cut" / "last.pt"), quiet=True)
    assert resumed["test_acc_last"] == whole["test_acc_last"]
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert str(a["policy"]) == str(b["policy"])


@pytest.mark.parametrize("argv, message", [
    (["--policy", "iterand", "--iterand-period", "0"],
     "--iterand-period: mask policy 'iterand': option period must be an int >= 1, got 0"),
    (["--policy", "iterand", "--supermask-seed", "3"], "--supermask-seed: applies to --policy supermask only"),
    (["--policy", "supermask", "--policy-options", "eval_mask=mean"],
     "--policy-options: mask policy 'supermask': option eval_mask must be one of sample, expected, got 'mean'"),
    (["--policy", "popup"], "--policy: must be one of layerwise, global, supermask"),
])
def test_cli_policy_flags_are_checked(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "run"), "--device", "cpu", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_policy_flags_reach_the_config(tmp_path):
    main(["train", "--out", str(tmp_path / "run"), "--device", "cpu", "--epochs", "1", "--limit-train", "256",
          "--threads", "1", "--quiet", "--policy", "iterand", "--iterand-period", "2", "--iterand-prob", "0.5"])
    text = (tmp_path / "run" / "config.toml").read_text()
    assert 'policy = "iterand"' in text and "period=2" in text and "prob=0.5" in text


def test_policy_state_in_last_pt_is_checked(tmp_path):
    from maskprune.runfiles import RunFileError, read_checkpoint

    train(TrainConfig(**{**TINY, "epochs": 1}, policy="iterand"), tmp_path / "run", quiet=True)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert read_checkpoint(tmp_path / "run" / "last.pt")["policy"][0]["name"] == "iterand"
    ckpt["policy"] = "iterand"
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(RunFileError, match="its 'policy' is not a list of mask-policy states"):
        read_checkpoint(tmp_path / "bad.pt")
    ckpt["policy"] = [{"name": "gem_miner"}]
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(RunFileError, match="its 'policy' state does not fit --policy iterand"):
        train(TrainConfig(**{**TINY, "epochs": 1}, policy="iterand"), tmp_path / "run",
              resume=str(tmp_path / "run" / "last.pt"), quiet=True)
