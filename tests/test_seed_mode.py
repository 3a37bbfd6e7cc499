"""Seed mode (issue 18 §3): frozen weights regenerated inside the passes instead of stored.

Every backend of the seed ops (C++ on CPU, Triton under TRITON_INTERPRET=1, the torch reference; C++ and Triton
on CUDA when there is a GPU) against the stored-weight ops over W = key.generate(): bit for bit for
signed_constant and kaiming_uniform on every backend, and for kaiming_normal on the C++ and reference backends
(the Triton interpreter's numpy log/cos has matched too, 0 of 2^18 in tests/test_rng_backends.py; CUDA's may be
1 ulp off, allowed below). Then the layers: convert(weights="seed") trains bit for bit as weights="stored", keeps
no weight tensor, and refuses what it cannot do with a message naming the argument.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import maskprune
from maskprune import models, ops, rng, seed_ops
from maskprune import nn as mnn

INITS = ("signed_constant", "kaiming_uniform", "kaiming_normal")


def _cases():
    cases = [pytest.param("torch", "cpu")]
    cases.append(pytest.param("cpp", "cpu", marks=pytest.mark.skipif(
        not seed_ops._cpp_has_seed_ops(), reason="maskprune._C is not built with the seed-mode ops")))
    interp = os.environ.get("TRITON_INTERPRET") == "1" and "triton" in ops.BACKENDS
    cases.append(pytest.param("triton", "cpu", marks=pytest.mark.skipif(
        not interp, reason="triton does not import, or TRITON_INTERPRET is not 1 (tests/conftest.py sets it "
                           "when there is no GPU)")))
    for backend in ("cpp", "triton"):
        runs = torch.cuda.is_available() and backend in ops.available_backends("cuda")
        cases.append(pytest.param(backend, "cuda", marks=pytest.mark.skipif(
            not runs, reason="needs a CUDA GPU" if not torch.cuda.is_available()
            else f"backend {backend} does not run on CUDA here")))
    return cases


CASES = _cases()


def _key(init="signed_constant", layer=3, seed=123456789012, scale=0.0625):
    return rng.WeightKey(init=init, scale=scale, seed=seed, layer=layer)


def _assert_bits(got: torch.Tensor, ref: torch.Tensor, init: str, device: str) -> None:
    got, ref = got.cpu(), ref.cpu()
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if init == "kaiming_normal" and device == "cuda":  # libdevice's log/cos: 1 float32 ulp allowed
        torch.testing.assert_close(got, ref, rtol=2 ** -22, atol=0)
        return
    assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), \
        f"{int((got != ref).sum())} of {ref.numel()} differ"


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("shape", [(1, 1), (7,), (37, 53), (5, 3, 3, 3), (3, 1031)])
@pytest.mark.parametrize("abs_scores", [True, False])
def test_mask_and_grad_equal_the_stored_weight_ops(backend, device, init, shape, abs_scores):
    torch.manual_seed(hash((init, shape, abs_scores)) % 2 ** 31)
    key = _key(init, layer=len(shape))
    scores = torch.randn(shape, device=device)
    t = ops.threshold(scores, 0.3, abs_scores=abs_scores, backend="torch")
    weight = key.generate(shape, device=device, backend="reference")
    ref = maskprune.reference.apply_mask(weight, scores, t, abs_scores)
    _assert_bits(seed_ops.seed_masked_weight(scores, t, key, abs_scores=abs_scores, backend=backend), ref, init, device)
    g = torch.randn(shape, device=device)
    sign = torch.sign(scores) if abs_scores else torch.ones_like(scores)
    _assert_bits(seed_ops.seed_score_grad(g, scores, key, abs_scores=abs_scores, backend=backend), sign * (weight * g),
                 init, device)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_out_dtypes_are_the_float32_values_cast(backend, device, dtype):
    key = _key("kaiming_uniform")
    scores = torch.randn(19, 23, device=device)
    t = torch.tensor(0.4, device=device)
    want = seed_ops.seed_masked_weight(scores, t, key, backend="torch").to(dtype)
    got = seed_ops.seed_masked_weight(scores, t, key, dtype=dtype, backend=backend)
    _assert_bits(got, want, "kaiming_uniform", device)


@pytest.mark.parametrize("backend,device", CASES)
def test_non_contiguous_scores_and_gradient(backend, device):
    key = _key("signed_constant")
    scores = torch.randn(40, 30, device=device).t()  # (30, 40), column-major
    g = torch.randn(40, 30, device=device).t()
    t = torch.tensor(0.5, device=device)
    ref_w = key.generate((30, 40), device=device, backend="reference")
    _assert_bits(seed_ops.seed_masked_weight(scores, t, key, backend=backend),
                 maskprune.reference.apply_mask(ref_w, scores.contiguous(), t, True), "signed_constant", device)
    _assert_bits(seed_ops.seed_score_grad(g, scores, key, backend=backend), torch.sign(scores) * (ref_w * g),
                 "signed_constant", device)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_seed_masked_linear_equals_masked_linear(backend, device, x_dtype, with_bias):
    """Forward, dX, dS and d(bias) against ops.masked_linear over the stored weight (same backend family): bit for
    bit on the C++ backend (the same GEMM calls); to the dtype's GEMM tolerance elsewhere."""
    torch.manual_seed(1)
    key = _key("kaiming_normal" if backend == "cpp" else "kaiming_uniform", layer=0)
    weight = key.generate((37, 53), device=device, backend="reference")
    s1 = torch.randn(37, 53, device=device, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_()
    x1 = torch.randn(4, 3, 53, device=device, dtype=x_dtype, requires_grad=True)  # 3-D input
    x2 = x1.detach().clone().requires_grad_()
    b1 = torch.randn(37, device=device, requires_grad=True) if with_bias else None
    b2 = b1.detach().clone().requires_grad_() if with_bias else None
    t = ops.threshold(s1, 0.25)
    stored_backend = "cpp" if backend == "cpp" else "torch"
    y1 = ops.masked_linear(x1, weight, s1, t, b1, backend=stored_backend)
    y2 = seed_ops.seed_masked_linear(x2, s2, t, key, b2, backend=backend)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    pairs = [(y2, y1), (x2.grad, x1.grad), (s2.grad, s1.grad)] + ([(b2.grad, b1.grad)] if with_bias else [])
    for got, want in pairs:
        assert got.dtype == want.dtype
        if backend == "cpp" and device == "cpu":
            assert torch.equal(got, want)
        else:
            tol = dict(rtol=2e-2, atol=2e-2) if x_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.skipif(not seed_ops._cpp_has_seed_ops(), reason="maskprune._C is not built with the seed-mode ops")
@pytest.mark.parametrize("args,kwargs", [
    ((torch.randn(5, 7), torch.tensor(0.3), True, "signed_constant", 0.5, 3, 1), {"dtype": torch.bfloat16}),
    ((torch.randn(3, 2, 3, 3), torch.tensor(0.1), False, "kaiming_normal", 0.05, -2, 7), {}),
    ((torch.randn(1031), torch.tensor(0.0), True, "kaiming_uniform", 0.1, 2 ** 40, 2 ** 32 - 1),
     {"dtype": torch.float64}),
])
def test_opcheck_seed_apply_mask(args, kwargs):
    torch.library.opcheck(torch.ops.maskprune.seed_apply_mask.default, args, kwargs)


@pytest.mark.skipif(not seed_ops._cpp_has_seed_ops(), reason="maskprune._C is not built with the seed-mode ops")
@pytest.mark.parametrize("abs_scores", [True, False])
def test_opcheck_seed_score_grad(abs_scores):
    torch.library.opcheck(torch.ops.maskprune.seed_score_grad_.default,
                          (torch.randn(9, 11), torch.randn(9, 11), abs_scores, "kaiming_normal", 0.5, 2 ** 40, 7))


@pytest.mark.skipif(not seed_ops._cpp_has_seed_ops(), reason="maskprune._C is not built with the seed-mode ops")
@pytest.mark.parametrize("call,exc,match", [
    (lambda: torch.ops.maskprune.seed_apply_mask(torch.randn(3, dtype=torch.float64), torch.tensor(0.0), True,
                                                 "signed_constant", 1.0, 0, 0), TypeError, "scores must be float32"),
    (lambda: torch.ops.maskprune.seed_apply_mask(torch.randn(3), torch.zeros(2), True, "signed_constant", 1.0, 0, 0),
     ValueError, "t must be a 0-d tensor"),
    (lambda: torch.ops.maskprune.seed_apply_mask(torch.randn(3), torch.tensor(0.0), True, "uniform", 1.0, 0, 0),
     ValueError, r"init must be one of \(signed_constant, kaiming_normal, kaiming_uniform\), got 'uniform'"),
    (lambda: torch.ops.maskprune.seed_apply_mask(torch.randn(3), torch.tensor(0.0), True, "signed_constant", -1.0, 0,
                                                 0), ValueError, "scale must be a finite float32"),
    (lambda: torch.ops.maskprune.seed_apply_mask(torch.randn(3), torch.tensor(0.0), True, "signed_constant", 1.0, 0,
                                                 2 ** 32), ValueError, r"layer must be in \[0, 2\^32\)"),
    (lambda: torch.ops.maskprune.seed_score_grad_(torch.randn(3, dtype=torch.float64), torch.randn(3), True,
                                                  "signed_constant", 1.0, 0, 0), TypeError, "grad_weight must be float32"),
    (lambda: torch.ops.maskprune.seed_score_grad_(torch.randn(4, 3).t(), torch.randn(3, 4), True, "signed_constant",
                                                  1.0, 0, 0), ValueError, "grad_weight must be contiguous"),
    (lambda: torch.ops.maskprune.seed_score_grad_(torch.randn(4), torch.randn(3), True, "signed_constant", 1.0, 0, 0),
     ValueError, "grad_weight must have the scores' shape"),
])
def test_raw_ops_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: seed_ops.seed_apply_mask(torch.randn(3, 4), 0.1, key=("signed_constant", 1.0)), TypeError,
     "key must be a maskprune.rng.WeightKey"),
    (lambda: seed_ops.seed_apply_mask(torch.randn(3, 4), 0.1, rng.WeightKey("uniform", 1.0, 0, 0)), ValueError,
     "key.init must be one of"),
    (lambda: seed_ops.seed_apply_mask(torch.randn(3, 4), 0.1, rng.WeightKey("signed_constant", 1.0, 0, 0, stream=2)),
     ValueError, "key must be a weight key"),
    (lambda: seed_ops.seed_apply_mask(torch.randn(3, 4, dtype=torch.float64), 0.1, _key()), TypeError, "scores"),
    (lambda: seed_ops.seed_apply_mask(torch.randn(3, 4), torch.zeros(2), _key()), ValueError, "t must be a 0-d"),
    (lambda: seed_ops.seed_apply_mask(torch.randn(3, 4), 0.1, _key(), dtype=torch.int32), TypeError, "dtype must be"),
    (lambda: seed_ops.seed_apply_mask(torch.randn(3, 4), 0.1, _key(), backend="numpy"), ValueError,
     "backend must be one of"),
    (lambda: seed_ops.seed_masked_linear(torch.randn(2, 5), torch.randn(3, 4), 0.1, _key()), ValueError,
     "x's last dimension must equal in_features=4"),
    (lambda: seed_ops.seed_masked_linear(torch.randn(2, 4), torch.randn(3, 4, 2), 0.1, _key()), ValueError,
     "scores must be 2-D"),
    (lambda: seed_ops.seed_score_grad(torch.randn(3, 5), torch.randn(3, 4), _key()), ValueError,
     "grad_weight must have the scores' shape"),
])
def test_python_ops_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available(),
                    reason="checks the refusal where Triton cannot run: this machine runs it (GPU or interpreter)")
def test_triton_backend_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="backend 'triton' is not available on cpu"):
        seed_ops.seed_apply_mask(torch.randn(3, 4), 0.1, _key(), backend="triton")


# ---------------------------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------------------------

def _model(name: str, weights: str, policy: str = "layerwise", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    in_shape = (1, 28, 28) if name in ("lenet300", "mlp") else (3, 16, 16)
    extra = {"widths": (24, 16)} if name == "mlp" else {}
    model = models.create(name, num_classes=10, in_shape=in_shape, width=0.25 if name == "conv4" else 1.0,
                          bias=False, **extra)
    return mnn.convert(model, 0.3, policy=policy, weight_init=kw.pop("weight_init", "signed_constant"),
                       scale_fan=True, weight_seed=kw.pop("weight_seed", 7), weights=weights, **kw)


@pytest.mark.parametrize("name", ["mlp", "conv4"])
@pytest.mark.parametrize("policy", ["layerwise", "global"])
@pytest.mark.parametrize("weight_init", ["signed_constant", "kaiming_normal"])
def test_seed_mode_trains_bit_for_bit_as_stored(name, policy, weight_init):
    stored, seeded = (_model(name, w, policy, weight_init=weight_init) for w in ("stored", "seed"))
    in_shape = (1, 28, 28) if name == "mlp" else (3, 16, 16)
    torch.manual_seed(1)
    x, y = torch.randn(8, *in_shape), torch.randint(0, 10, (8,))
    params = [[p for p in m.parameters() if p.requires_grad] for m in (stored, seeded)]
    opts = [torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4) for p in params]
    for _ in range(3):
        for model, opt in zip((stored, seeded), opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(*params))
    with torch.no_grad():
        assert torch.equal(stored(x), seeded(x))
    dense = [mnn.to_dense(m).state_dict() for m in (stored, seeded)]
    assert dense[0].keys() == dense[1].keys() and all(torch.equal(dense[0][k], dense[1][k]) for k in dense[0])


def test_seed_mode_keeps_no_weight_tensor():
    stored, seeded = _model("conv4", "stored"), _model("conv4", "seed")
    layers = mnn.masked_layers(seeded)
    assert layers and all(isinstance(l, (mnn.SeedMaskedLinear, mnn.SeedMaskedConv2d)) for _, l in layers)
    assert not any(k.endswith(".weight") for k in seeded.state_dict())
    assert all("weight" not in dict(l.named_parameters(recurse=False)) for _, l in layers)
    n_stored = sum(v.numel() for v in stored.state_dict().values())
    n_seed = sum(v.numel() for v in seeded.state_dict().values())
    assert n_seed * 2 == n_stored  # scores only: W was the other half
    for (_, a), (_, b) in zip(mnn.masked_layers(stored), layers):
        assert torch.equal(a.weight, b.weight)  # the property regenerates it
    assert "SeedMaskedConv2d" in seeded.maskprune_summary.line() and "weights=seed" in repr(seeded)


def test_seed_mode_ticket_equals_stored_mode_ticket(tmp_path):
    stored, seeded = _model("mlp", "stored"), _model("mlp", "seed")
    maskprune.save_ticket(stored, tmp_path / "a.ticket")
    maskprune.save_ticket(seeded, tmp_path / "b.ticket")
    assert (tmp_path / "a.ticket").read_bytes() == (tmp_path / "b.ticket").read_bytes()


def test_to_seed_mode_refuses_a_changed_weight_and_pretrained_weights():
    model = _model("mlp", "stored")
    _, layer = mnn.masked_layers(model)[0]
    with torch.no_grad():
        layer.weight[0, 0] *= -1
    with pytest.raises(ValueError, match="no longer equals what its weight_key regenerates"):
        mnn.to_seed_mode(layer)
    plain = mnn.convert(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), 0.5)
    with pytest.raises(ValueError, match="layer has no weight_key"):
        mnn.to_seed_mode(plain[1])
    with pytest.raises(TypeError, match="layer must be a MaskedLinear or MaskedConv2d"):
        mnn.to_seed_mode(torch.nn.Linear(3, 2))


@pytest.mark.parametrize("kw,match", [
    (dict(weights="lazy"), r"weights must be one of \('stored', 'seed'\), got 'lazy'"),
    (dict(weights="seed", weight_init=None), "weights='seed' needs weights that can be regenerated"),
    (dict(weights="seed", weight_seed=None), "weights='seed' needs weights that can be regenerated"),
    (dict(weights="seed", policy="supermask"), r"weights='seed' runs the policies \('layerwise', 'global'\)"),
    (dict(weights="seed", fused=False), "weights='seed' needs fused=True"),
])
def test_convert_refuses_bad_weights_settings(kw, match):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    kw.setdefault("weight_init", "signed_constant")
    kw.setdefault("weight_seed", 3)
    with pytest.raises(ValueError, match=match):
        mnn.convert(model, 0.5, **kw)
    assert type(model[0]) is torch.nn.Linear  # nothing changed


def test_seed_layer_refuses_a_policy_it_cannot_run():
    model = _model("mlp", "seed")
    _, layer = mnn.masked_layers(model)[0]
    layer.mask_policy = maskprune.masks.make_policy("supermask", [layer], 0.5)
    with pytest.raises(ValueError, match="mask policy 'supermask' cannot run on a seed-mode layer"):
        layer(torch.randn(2, layer.in_features))


# ---------------------------------------------------------------------------------------------------------
# The trainer, the CLI and tickets
# ---------------------------------------------------------------------------------------------------------

TINY = dict(model="lenet300", dataset="mnist", epochs=2, batch_size=64, limit_train=512, device="cpu", threads=1,
            density=0.3)


@pytest.mark.parametrize("policy", ["layerwise", "global"])
def test_train_seed_equals_stored_and_resumes(tmp_path, monkeypatch, policy):
    from maskprune.train import TrainConfig, train
    from train_helpers import train_until_first_checkpoint

    stored = train(TrainConfig(**TINY, policy=policy), tmp_path / "stored", quiet=True)
    cfg = TrainConfig(**TINY, policy=policy, weights="seed")
    seeded = train(cfg, tmp_path / "seed", quiet=True)
    for key in ("test_acc_last", "test_acc_best", "val_acc_best", "final_train_loss"):
        if key in stored:
            assert stored[key] == seeded[key], key
    last = torch.load(tmp_path / "seed" / "last.pt", weights_only=True)
    assert not any(k.endswith(".weight") for k in last["model"]) and last["config"]["weights"] == "seed"
    ref = torch.load(tmp_path / "stored" / "last.pt", weights_only=True)
    assert all(torch.equal(v, ref["model"][k]) for k, v in last["model"].items())

    train_until_first_checkpoint(cfg, tmp_path / "cut", monkeypatch)
    resumed = train(cfg, tmp_path / "cut", resume=str(tmp_path / "cut" / "last.pt"), quiet=True)
    assert resumed["test_acc_last"] == seeded["test_acc_last"]


@pytest.mark.parametrize("flags,match", [
    (["--weights", "lazy"], r"--weights: must be one of stored, seed, got 'lazy'"),
    (["--weights", "seed", "--generator", "torch"], "--weights: seed needs --mode mask and --generator philox"),
    (["--weights", "seed", "--mode", "dense"], "--weights: seed needs --mode mask"),
    (["--weights", "seed", "--policy", "supermask"], "--weights: seed runs the policies layerwise, global"),
])
def test_cli_refuses_bad_weights_flags(tmp_path, capsys, flags, match):
    from cli_helpers import run_cli

    code, _, err = run_cli(["train", "--epochs", "1", "--limit-train", "64", "--out", str(tmp_path / "r"), *flags],
                           capsys)
    assert code == 2 and __import__("re").search(match, err), err
    assert not (tmp_path / "r").exists()


def test_load_ticket_in_seed_mode(tmp_path):
    model = _model("conv4", "stored")
    maskprune.save_ticket(model, tmp_path / "t.ticket")
    stored = maskprune.load_ticket(tmp_path / "t.ticket")
    seeded = maskprune.load_ticket(tmp_path / "t.ticket", weights="seed")
    assert all(isinstance(l, (mnn.SeedMaskedLinear, mnn.SeedMaskedConv2d)) for _, l in mnn.masked_layers(seeded))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(stored(x), seeded(x))
    with pytest.raises(ValueError, match=r"weights must be one of \('stored', 'seed'\), got 'none'"):
        maskprune.load_ticket(tmp_path / "t.ticket", weights="none")


@pytest.mark.skipif(not seed_ops._cpp_has_seed_ops(), reason="maskprune._C is not built with the seed-mode ops")
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_opcheck_seed_linear_score_grad(x_dtype):
    x = torch.randn(2, 3, 11, dtype=x_dtype)
    torch.library.opcheck(torch.ops.maskprune.seed_linear_score_grad.default,
                          (torch.randn(2, 3, 9, dtype=x_dtype), x, torch.randn(9, 11), True, "signed_constant", 0.5,
                           3, 1))


@pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available())
                    or "triton" not in ops.BACKENDS,
                    reason="needs Triton: a CUDA GPU, or TRITON_INTERPRET=1 (tests/conftest.py sets it without one)")
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("split_m", [1, 3])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("abs_scores", [True, False])
def test_triton_dS_gemm_regenerates_w_in_its_epilogue(init, split_m, x_dtype, abs_scores):
    """The dYᵀX GEMM with W regenerated in the epilogue equals the same GEMM reading the stored W, bit for bit
    (same accumulation; W the same float32 values), on odd shapes, with and without the split-M reduction."""
    from maskprune.kernels import masked_matmul as mm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(split_m)
    key = _key(init, layer=5)
    n, k, m = 37, 53, 70
    scores = torch.randn(n, k, device=device)
    g, x = torch.randn(m, n, device=device, dtype=x_dtype), torch.randn(m, k, device=device, dtype=x_dtype)
    weight = key.generate((n, k), device=device)
    want = mm.masked_linear_grad_scores(g, x, weight, scores, abs_scores, split_m=split_m)
    got = mm.seed_linear_grad_scores(g, x, scores, key, abs_scores, split_m=split_m)
    if init == "kaiming_normal" and device == "cuda":
        torch.testing.assert_close(got, want, rtol=2 ** -22, atol=0)
    else:
        assert torch.equal(got, want)
