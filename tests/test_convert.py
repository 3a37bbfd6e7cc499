"""convert() on every kind of weight-bearing module: the output depends on every score tensor, train and eval
mode agree (PyTorch's fused attention fast paths included), to_dense gives the same network, and mask_stats
counts the masks the forward applies. Plus the summary, skip / include, and bad input."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from maskprune.nn import (MaskedConv2d, MaskedLinear, WeightMask, convert, mask_stats, masked_layers, masked_tensors,
                          to_dense)

DENSITY = 0.5


def n_keep(density: float, n: int) -> int:
    return min(max(math.floor(density * n + 0.5), 1), n)


# --------------------------------------------------------------------------------------------
# The models: each a factory and an input; all dropout 0 so that train and eval mode compute the same
# --------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class CrossAttention(nn.Module):
    """kdim / vdim != embed_dim: separate q/k/v projection weights."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=batch_first)

    def forward(self, x):
        q, k, v = x
        return self.attn(q, k, v, need_weights=True)[0]


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        tgt, memory = x
        return self.layer(tgt, memory)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


class TinyViT(nn.Module):
    """Patch embedding (Conv2d) + class token + positional embedding + TransformerEncoder + head."""

    def __init__(self, image: int = 8, patch: int = 4, dim: int = 8, classes: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


def _seq(batch_first: bool, n: int = 2, length: int = 5, dim: int = 8) -> torch.Tensor:
    return torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)


def _encoder_layer(batch_first, norm_first=False):
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), lambda: torch.randn(4, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 3, bias=False)),
               lambda: torch.randn(2, 3, 9)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)),
               lambda: torch.randn(2, 3, 6, 6)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.ReLU(), nn.Conv3d(3, 2, 2)),
               lambda: torch.randn(2, 2, 4, 4, 4)),
    "conv_transpose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.ReLU(),
                                               nn.ConvTranspose2d(4, 2, 2)),
                         lambda: torch.randn(2, 3, 4, 4)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 3)), lambda: torch.randint(0, 12, (3, 5))),
    "mha_packed_batch_first": (lambda: SelfAttention(True), lambda: _seq(True)),
    "mha_packed_seq_first": (lambda: SelfAttention(False), lambda: _seq(False)),
    "mha_no_bias_bias_kv": (lambda: SelfAttention(True, bias=False, add_bias_kv=True), lambda: _seq(True)),
    "mha_kdim_vdim_batch_first": (lambda: CrossAttention(True),
                                  lambda: (torch.randn(2, 4, 8), torch.randn(2, 5, 5), torch.randn(2, 5, 6))),
    "mha_kdim_vdim_seq_first": (lambda: CrossAttention(False),
                                lambda: (torch.randn(4, 2, 8), torch.randn(5, 2, 5), torch.randn(5, 2, 6))),
    "encoder_layer_batch_first": (lambda: _encoder_layer(True), lambda: _seq(True)),
    "encoder_layer_seq_first": (lambda: _encoder_layer(False), lambda: _seq(False)),
    "encoder_layer_norm_first": (lambda: _encoder_layer(True, norm_first=True), lambda: _seq(True)),
    "transformer_encoder": (lambda: nn.TransformerEncoder(_encoder_layer(True), 2, enable_nested_tensor=False),
                            lambda: _seq(True)),
    "decoder_layer": (Decoder, lambda: (_seq(True, length=4), _seq(True))),
    "vit": (TinyViT, lambda: torch.randn(2, 3, 8, 8)),
    "lstm": (Recurrent, lambda: torch.randn(2, 5, 4)),
}


def _run(model, x):
    return model(x) if isinstance(x, torch.Tensor) else model(x)


def build(case: str, density: float = DENSITY, **kw):
    factory, make_input = CASES[case]
    torch.manual_seed(0)
    model = factory()
    x = make_input()
    return model, convert(model, density, **kw), x


def train_steps(model, x, steps: int = 3) -> list[torch.Tensor]:
    """A few SGD steps on the scores; returns each score tensor's gradient at the first step."""
    scores = [t.masker.scores for t in masked_tensors(model)]
    before = [s.detach().clone() for s in scores]
    opt = torch.optim.SGD(scores, lr=0.5)
    first = None
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        _run(model, x).square().mean().backward()
        if first is None:
            first = [None if s.grad is None else s.grad.clone() for s in scores]
        opt.step()
    for t, b, s in zip(masked_tensors(model), before, scores):
        assert not torch.equal(b, s.detach()), f"{t.name}: scores did not change in training"
    return first


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# (a)-(d) for every supported module type
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_converted_model_is_the_masked_network(case):
    model, converted, x = build(case)
    assert converted is model
    tensors = masked_tensors(model)
    assert tensors, case
    # only the scores learn
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(t.masker.scores) for t in tensors}

    # (a) the output depends on every score tensor, and training changes every one of them
    grads = train_steps(model, x)
    for t, g in zip(tensors, grads):
        assert g is not None and float(g.abs().sum()) > 0, f"{case}: {t.name} got no gradient"

    # (b) train and eval mode agree (dropout 0); eval under no_grad is where the fused fast paths run
    with torch.no_grad():
        model.train()
        y_train = _run(model, x)
        model.eval()
        y_eval = _run(model, x)
    y_eval_grad = _run(model, x)  # eval with autograd on: the slow path
    torch.testing.assert_close(y_eval, y_train, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_eval_grad.detach(), y_train, rtol=1e-5, atol=1e-5)

    # (c) to_dense is the same network, in both modes, made of plain modules
    dense = to_dense(model)
    assert not masked_tensors(dense) and not hasattr(dense, "maskprune_summary")
    assert not any(parametrize.is_parametrized(m) for m in dense.modules())
    assert not any(isinstance(m, (MaskedLinear, MaskedConv2d, WeightMask)) for m in dense.modules())
    assert not any(p.requires_grad for p in dense.parameters())
    with torch.no_grad():
        dense.eval()
        torch.testing.assert_close(_run(dense, x), y_eval, rtol=1e-5, atol=1e-5)
        dense.train()
        torch.testing.assert_close(_run(dense, x), y_train, rtol=1e-5, atol=1e-5)

    # (d) mask_stats counts the masks the forward applies: W_eff = W ⊙ M, kept = |M|
    stats = mask_stats(model)
    assert [row["tensor"] for row in stats["layers"]] == [t.name for t in tensors]
    with torch.no_grad():
        for t, row in zip(tensors, stats["layers"]):
            mask = t.masker.mask()
            raw = t.module.weight if t.mechanism != "WeightMask" else t.module.parametrizations[t.attr].original
            torch.testing.assert_close(t.effective_weight(), raw * mask, rtol=0, atol=0)
            assert row["kept"] == int(mask.sum()) == n_keep(DENSITY, raw.numel()), t.name
            assert row["total"] == raw.numel()
    assert stats["kept"] == sum(r["kept"] for r in stats["layers"])


EXPECTED_MASKED = {
    "linear": {"0.weight": "MaskedLinear", "2.weight": "MaskedLinear"},
    "conv2d": {"0.weight": "MaskedConv2d", "3.weight": "MaskedLinear"},
    "conv1d": {"0.weight": "WeightMask", "2.weight": "WeightMask"},
    "embedding": {"0.weight": "WeightMask", "1.weight": "MaskedLinear"},
    "mha_packed_batch_first": {"attn.in_proj_weight": "WeightMask", "attn.out_proj.weight": "WeightMask"},
    "mha_kdim_vdim_seq_first": {"attn.q_proj_weight": "WeightMask", "attn.k_proj_weight": "WeightMask",
                                "attn.v_proj_weight": "WeightMask", "attn.out_proj.weight": "WeightMask"},
    "encoder_layer_batch_first": {"self_attn.in_proj_weight": "WeightMask", "self_attn.out_proj.weight": "WeightMask",
                                  "linear1.weight": "WeightMask", "linear2.weight": "WeightMask"},
    "decoder_layer": {"layer.self_attn.in_proj_weight": "WeightMask", "layer.self_attn.out_proj.weight": "WeightMask",
                      "layer.multihead_attn.in_proj_weight": "WeightMask",
                      "layer.multihead_attn.out_proj.weight": "WeightMask",
                      "layer.linear1.weight": "MaskedLinear", "layer.linear2.weight": "MaskedLinear"},
}


@pytest.mark.parametrize("case", EXPECTED_MASKED)
def test_summary_lists_each_masked_tensor_and_its_mechanism(case):
    model, _, _ = build(case)
    summary = model.maskprune_summary
    assert {name: mech for name, _, mech in summary.masked} == EXPECTED_MASKED[case]
    assert [(t.name, t.mechanism) for t in masked_tensors(model)] == [(n, m) for n, _, m in summary.masked]


def test_summary_says_what_was_left_and_why():
    model, _, _ = build("vit")
    summary = model.maskprune_summary
    left = {name: reason for name, _, reason in summary.left}
    assert left["cls_token"].startswith("not a weight") and left["pos_embed"].startswith("not a weight")
    assert left["norm.weight"].startswith("norm affine weight") and "include" in left["norm.weight"]
    assert left["encoder.layers.0.norm1.weight"].startswith("norm affine weight")
    assert left["head.bias"] == "bias" and left["encoder.layers.1.self_attn.in_proj_bias"] == "bias"
    masked = {name for name, _, _ in summary.masked}
    assert {"patch_embed.weight", "head.weight", "encoder.layers.1.self_attn.in_proj_weight",
            "encoder.layers.1.linear2.weight"} <= masked
    # every parameter of the model is accounted for, once
    assert len(masked) + len(left) == len(list(TinyViT().parameters()))
    line = summary.line()
    assert line.startswith(f"maskprune.convert: masked {len(masked)} weight tensors")
    assert "norm affine weight" in line and "bias" in line and "not a weight" in line
    text = str(summary)
    assert "left unmasked:" in text and "cls_token" in text


def test_convert_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="maskprune"):
        build("encoder_layer_batch_first")
    lines = [r.getMessage() for r in caplog.records if r.name == "maskprune"]
    assert len(lines) == 1 and "masked 4 weight tensors" in lines[0] and "maskprune_summary" in lines[0]


# --------------------------------------------------------------------------------------------
# The fast paths: they run in eval mode, and they compute the masked network
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,fast_op", [("mha_packed_batch_first", "_native_multi_head_attention"),
                                          ("encoder_layer_batch_first", "_transformer_encoder_layer_fwd")])
def test_fused_fast_path_runs_and_sees_masked_weights(case, fast_op, monkeypatch):
    model, _, x = build(case)
    y_train = _run(model, x).detach()
    calls = []
    real = getattr(torch, fast_op)
    monkeypatch.setattr(torch, fast_op, lambda *a, **k: calls.append(1) or real(*a, **k))
    model.eval()
    with torch.no_grad():
        y_eval = _run(model, x)
    assert calls, f"torch.{fast_op} was not used: this test no longer covers the fast path"
    torch.testing.assert_close(y_eval, y_train, rtol=1e-5, atol=1e-5)
    # and the masked network is not the dense one (issue 15, item 2: eval gave the unmasked layer)
    torch.manual_seed(0)
    unmasked = CASES[case][0]().eval()
    with torch.no_grad():
        assert (_run(unmasked, x) - y_eval).abs().max() > 1e-2


def test_mha_output_depends_on_scores():
    """Issue 15, item 1: after convert, attention's output carried no gradient to any score."""
    model, _, x = build("mha_packed_seq_first")
    assert model(x).requires_grad


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_transformer_encoder_with_padding_mask_nested_fast_path(monkeypatch):
    """TransformerEncoder's nested-tensor path (eval, a key padding mask): the unpadded positions are the
    masked network's (PyTorch zeroes the padded ones on that path, as it does for a dense model)."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(_encoder_layer(True), 2)  # enable_nested_tensor=True
    convert(model, 0.4)
    x = _seq(True, n=2, length=5)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    y_train = model(x, src_key_padding_mask=pad).detach()
    calls = []
    real = torch._nested_tensor_from_mask
    monkeypatch.setattr(torch, "_nested_tensor_from_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.eval()
    with torch.no_grad():
        y_eval = model(x, src_key_padding_mask=pad)
    assert calls, "the nested-tensor path did not run: this test no longer covers it"
    with torch.no_grad():
        y_dense = to_dense(model).eval()(x, src_key_padding_mask=pad)
    keep = ~pad
    torch.testing.assert_close(y_eval[keep], y_train[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_dense, y_eval, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# policy, state_dict, deepcopy, options
# --------------------------------------------------------------------------------------------

def test_global_policy_covers_parametrized_tensors():
    model, _, x = build("vit", density=0.3, policy="global")
    tensors = masked_tensors(model)
    assert {t.mechanism for t in tensors} == {"MaskedConv2d", "MaskedLinear", "WeightMask"}
    policies = {id(t.masker.mask_policy) for t in tensors}
    assert len(policies) == 1
    train_steps(model, x, steps=2)
    stats = mask_stats(model)
    assert stats["kept"] == n_keep(0.3, stats["total"])
    assert {row["policy"] for row in stats["layers"]} == {"global"}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(to_dense(model).eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_deepcopy():
    a, _, x = build("vit")
    train_steps(a, x, steps=2)
    b, _, _ = build("vit")
    b.load_state_dict(a.state_dict())
    assert "encoder.layers.0.self_attn.parametrizations.in_proj_weight.0.scores" in a.state_dict()
    c = copy.deepcopy(a)
    for m in (a, b, c):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        torch.testing.assert_close(c(x), a(x), rtol=0, atol=0)


def test_fused_false_puts_every_weight_through_the_parametrization():
    model, _, x = build("conv2d", fused=False)
    assert not masked_layers(model)
    assert {t.mechanism for t in masked_tensors(model)} == {"WeightMask"}
    assert type(model[0]) is not MaskedConv2d and isinstance(model[0], nn.Conv2d)


def test_weight_init_reinitialises_parametrized_weights():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Conv1d(16, 8, 3)), 0.5, weight_init="signed_constant", scale_fan=True)
    raw = model[0].parametrizations.weight.original
    std = math.sqrt(2.0 / (16 * 3 * 0.5))
    torch.testing.assert_close(raw.abs(), torch.full_like(raw, std))


def test_user_subclass_of_linear_keeps_its_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = convert(nn.Sequential(Scaled(4, 3)), 1.0)  # density 1: the same function
    assert isinstance(model[0], Scaled) and model.maskprune_summary.masked[0][2] == "WeightMask"
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), 2 * nn.functional.linear(x, model[0].weight, model[0].bias))


def test_tied_weights_are_left_and_reported():
    emb, out = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    out.weight = emb.weight
    model = convert(nn.Sequential(emb, nn.Linear(4, 4), out), 0.5)
    left = {name: reason for name, _, reason in model.maskprune_summary.left}
    assert left["0.weight"].startswith("tied") and "2.weight" in left["0.weight"]
    assert [name for name, _, _ in model.maskprune_summary.masked] == ["1.weight"]


# --------------------------------------------------------------------------------------------
# skip / include
# --------------------------------------------------------------------------------------------

def test_skip_names_a_subtree_a_parameter_or_a_type():
    model, _, _ = build("vit", skip=["encoder.layers.0", "head.weight", nn.Conv2d])
    masked = {name for name, _, _ in model.maskprune_summary.masked}
    left = {name: reason for name, _, reason in model.maskprune_summary.left}
    assert not any(n.startswith("encoder.layers.0.") for n in masked)
    assert left["encoder.layers.0.linear1.weight"] == "skip" and left["head.weight"] == "skip"
    assert left["patch_embed.weight"] == "skip" and type(model.head) is nn.Linear
    assert "encoder.layers.1.linear1.weight" in masked


def test_include_restricts_and_can_name_norms_and_parameters():
    model, _, _ = build("vit", include=["encoder.layers.1", nn.LayerNorm, "cls_token"])
    masked = {name for name, _, _ in model.maskprune_summary.masked}
    assert "cls_token" in masked and "norm.weight" in masked and "encoder.layers.0.norm1.weight" in masked
    assert "encoder.layers.1.self_attn.in_proj_weight" in masked
    assert "encoder.layers.0.linear1.weight" not in masked and "head.weight" not in masked
    assert "pos_embed" not in masked
    left = {name: reason for name, _, reason in model.maskprune_summary.left}
    assert left["head.weight"] == "not in include"
    # a subtree named in include keeps its norm gains dense
    model, _, x = build("vit", include=["encoder"])
    masked = {name for name, _, _ in model.maskprune_summary.masked}
    assert "encoder.layers.0.norm1.weight" not in masked and "encoder.layers.0.linear1.weight" in masked
    train_steps(model, x, steps=1)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(skip=["nope"]), ValueError, r"skip names modules, parameters or module types .* \['nope'\]"),
    (dict(include=["encoder.layers.7"]), ValueError, r"include names .* \['encoder.layers.7'\]"),
    (dict(include=nn.Conv3d), ValueError, r"include names .*\['Conv3d'\]"),
    (dict(skip=[int]), TypeError, "skip types must be nn.Module subclasses"),
    (dict(include=[3]), TypeError, "include entries must be str"),
    (dict(skip=3), TypeError, "skip must be a module name"),
    (dict(include=["norm"], weight_init="signed_constant"), ValueError,
     r"weight_init='signed_constant' needs weights of 2 or more dimensions.*norm.weight"),
    (dict(skip=[""]), ValueError, "nothing to convert"),
    (dict(score_init="zeros"), ValueError, "score_init"),
    (dict(policy="random"), ValueError, "policy"),
])
def test_bad_arguments_raise_with_a_clear_message(kwargs, exc, match):
    torch.manual_seed(0)
    with pytest.raises(exc, match=match):
        convert(TinyViT(), 0.5, **kwargs)


def test_converting_twice_raises_and_names_the_masked_tensors():
    model, _, _ = build("encoder_layer_batch_first")
    with pytest.raises(ValueError, match=r"already converted.*self_attn.in_proj_weight.*to_dense"):
        convert(model, 0.5)
    dense = to_dense(model)
    convert(dense, 0.5)  # a plain copy converts again
    assert len(masked_tensors(dense)) == 4


@pytest.mark.parametrize("make,x", [
    (lambda: nn.MultiheadAttention(8, 2), torch.randn(5, 2, 8)),
    (lambda: _encoder_layer(True), torch.randn(2, 5, 8)),
    (lambda: nn.Linear(8, 3), torch.randn(2, 8)),
], ids=["mha", "encoder_layer", "linear"])
def test_root_module_is_converted_in_place(make, x):
    """Issue 15's own example: convert(nn.MultiheadAttention(...)) itself, not a model around it."""
    torch.manual_seed(0)
    model = make()
    assert convert(model, 0.5) is model
    run = (lambda m: m(x, x, x)[0]) if isinstance(model, nn.MultiheadAttention) else (lambda m: m(x))
    y = run(model)
    assert y.requires_grad
    y.square().sum().backward()
    assert all(float(t.masker.scores.grad.abs().sum()) > 0 for t in masked_tensors(model))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(model), y.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run(to_dense(model).eval()), y.detach(), rtol=1e-5, atol=1e-5)


def test_module_used_twice_is_left_and_reported():
    shared = nn.Linear(4, 4)
    model = convert(nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2)), 0.5)
    left = {name: reason for name, _, reason in model.maskprune_summary.left}
    assert left["0.weight"].startswith("tied") and "2.weight" in left["0.weight"]
    assert [name for name, _, _ in model.maskprune_summary.masked] == ["3.weight"]
    assert model[0] is model[2] and type(model[0]) is nn.Linear
