"""maskprune.rng: Philox4x32-10 against its published answers, an independent scalar version and Triton's
tl.philox; the weights' exact formulas, moments and scales (those of maskprune.nn.init)."""
import math

import pytest
import torch
import torch.nn as nn

import maskprune
from maskprune import models, rng
from maskprune.nn import convert, masked_layers
from maskprune.nn.init import _relu_std

# Random123's tests/kat_vectors for philox4x32 10 (counter, key, output).
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_scalar(counter, key, rounds=10):
    """Philox4x32 on Python ints, written from the paper (full 64-bit products), for comparison."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
    return c0, c1, c2, c3


@pytest.mark.parametrize("counter,key,expected", KATS)
def test_known_answers(counter, key, expected):
    out = rng.philox4x32(counter, key)
    assert tuple(int(w) for w in out) == expected
    assert philox_scalar(counter, key) == expected


def test_vectorised_equals_scalar_on_random_counters():
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2 ** 32, (6, 200), generator=g, dtype=torch.int64)
    for j in range(0, 200, 50):  # one key per batch of counters
        key = (int(words[4, j]), int(words[5, j]))
        out = torch.stack(rng.philox4x32(tuple(words[:4, j:j + 50]), key))
        for i in range(50):
            assert tuple(out[:, i].tolist()) == philox_scalar(tuple(words[:4, j + i].tolist()), key)


def test_counter_and_key_layout():
    """counter = (i lo, i hi, layer, stream), key = (seed lo, seed hi), as the module doc says."""
    seed, layer, stream = 0x0123456789ABCDEF, 77, 5
    start = (1 << 32) - 2  # crosses into the high word of the element index
    out = torch.stack(rng.random_words(start, 4, seed=seed, layer=layer, stream=stream))
    for j in range(4):
        i = start + j
        expect = philox_scalar((i & 0xFFFFFFFF, i >> 32, layer, stream), (seed & 0xFFFFFFFF, seed >> 32))
        assert tuple(out[:, j].tolist()) == expect


def test_triton_philox_gives_the_same_words():
    """Triton's tl.philox(seed, i_lo, i_hi, layer, stream) (on CUDA, or the interpreter on CPU)."""
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def words_kernel(out_ptr, seed, layer, stream, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        zero = offs.to(tl.uint32) * 0
        c0, c1, c2, c3 = tl.philox(seed, offs.to(tl.uint32), zero, zero + layer, zero + stream)
        m = offs < n
        tl.store(out_ptr + offs * 4, c0.to(tl.int32, bitcast=True), mask=m)
        tl.store(out_ptr + offs * 4 + 1, c1.to(tl.int32, bitcast=True), mask=m)
        tl.store(out_ptr + offs * 4 + 2, c2.to(tl.int32, bitcast=True), mask=m)
        tl.store(out_ptr + offs * 4 + 3, c3.to(tl.int32, bitcast=True), mask=m)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, seed, layer, stream = 1000, 0x123456789ABCDEF, 7, 3
    out = torch.zeros(n * 4, dtype=torch.int32, device=device)
    words_kernel[(triton.cdiv(n, 256),)](out, seed, layer, stream, n, BLOCK=256)
    ref = torch.stack(rng.random_words(0, n, seed=seed, layer=layer, stream=stream), 1).reshape(-1)
    assert torch.equal(out.cpu().to(torch.int64) & 0xFFFFFFFF, ref)


@pytest.mark.parametrize("init", rng.WEIGHT_INITS)
def test_repeatable_and_chunk_independent(init, monkeypatch):
    # the reference backend, whose chunking _CHUNK sets (the kernels are compared with it in test_rng_backends)
    a = rng.counter_weights((300, 70), init, 0.1, seed=3, layer=2, backend="reference")
    b = rng.counter_weights((300, 70), init, 0.1, seed=3, layer=2, backend="reference")
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    monkeypatch.setattr(rng, "_CHUNK", 4096 + 3)  # other chunk boundaries: each element stands alone
    c = rng.counter_weights((300, 70), init, 0.1, seed=3, layer=2, backend="reference")
    assert torch.equal(a.view(torch.int32), c.view(torch.int32))
    for other in (dict(seed=4, layer=2), dict(seed=3, layer=1), dict(seed=3, layer=2, stream=1)):
        d = rng.counter_weights((300, 70), init, 0.1, **other)
        assert (d != a).float().mean() > 0.4


def test_exact_formulas():
    x0, x1 = (w.tolist() for w in rng.random_words(0, 64, seed=11, layer=4, words=2))
    scale = float(torch.tensor(0.37, dtype=torch.float32))
    sc = rng.counter_weights((64,), "signed_constant", 0.37, seed=11, layer=4).tolist()
    assert sc == [scale if w < 2 ** 31 else -scale for w in x0]
    ku = rng.counter_weights((64,), "kaiming_uniform", 0.37, seed=11, layer=4)
    expect = torch.tensor([(w >> 8) - 2 ** 23 for w in x0], dtype=torch.float32) * (scale * 2 ** -23)
    assert torch.equal(ku, expect)
    u = rng.uniform((64,), seed=11, layer=4)
    assert u.tolist() == [(w >> 8) * 2.0 ** -24 for w in x0]


def test_uniform_and_signed_constant_moments():
    n = 1 << 18
    u = rng.uniform((n,), seed=1, layer=0)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 2e-3 and abs(float(u.var()) - 1 / 12) < 2e-3
    sc = rng.counter_weights((n,), "signed_constant", 0.25, seed=1, layer=0)
    assert set(sc.unique().tolist()) == {-0.25, 0.25}
    assert abs(float((sc > 0).float().mean()) - 0.5) < 2e-3


def test_kaiming_uniform_moments():
    n, bound = 1 << 18, 0.3
    w = rng.counter_weights((n,), "kaiming_uniform", bound, seed=2, layer=1).double()
    bound32 = float(torch.tensor(bound, dtype=torch.float32))
    assert -bound32 <= float(w.min()) and float(w.max()) < bound32
    assert abs(float(w.mean())) < 2e-3 * bound and abs(float(w.var()) / (bound ** 2 / 3) - 1) < 1e-2


def test_kaiming_normal_moments_and_python_math():
    n, std = 1 << 18, 0.05
    w = rng.counter_weights((n,), "kaiming_normal", std, seed=5, layer=9).double() / std
    assert abs(float(w.mean())) < 5e-3 and abs(float(w.std()) - 1) < 5e-3
    assert abs(float((w ** 4).mean()) - 3) < 0.08            # the normal's kurtosis
    assert abs(float((w.abs() < 1).double().mean()) - 0.6827) < 3e-3
    assert float(w.abs().max()) <= 5.9
    # Against Python's own math (another libm path): the float32 results agree to the bit.
    m = 1 << 15
    z = rng.counter_weights((m,), "kaiming_normal", 1.0, seed=5, layer=9)
    x0, x1 = (t.tolist() for t in rng.random_words(0, m, seed=5, layer=9, words=2))
    ref = torch.tensor([math.sqrt(-2 * math.log(((a >> 8) + 0.5) * 2.0 ** -24)) * math.cos(2 * math.pi * (b >> 8) * 2.0 ** -24)
                        for a, b in zip(x0, x1)], dtype=torch.float64).to(torch.float32)
    ulps = (z.view(torch.int32).long() - ref.view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 1 and int((ulps != 0).sum()) <= 2  # measured: 0 of 2^20


@pytest.mark.parametrize("shape", [(300, 784), (64, 3, 3, 3)])
@pytest.mark.parametrize("density,scale_fan", [(1.0, False), (0.3, True)])
def test_init_weight_counter_matches_init_scales(shape, density, scale_fan):
    weight = torch.empty(shape)
    std = _relu_std(weight, density, scale_fan)
    for init, scale in (("signed_constant", std), ("kaiming_normal", std), ("kaiming_uniform", math.sqrt(3) * std)):
        key = rng.init_weight_counter(weight, init, seed=1, layer=0, density=density, scale_fan=scale_fan)
        assert key.scale == float(torch.tensor(scale, dtype=torch.float32))
        assert torch.equal(weight, key.generate(shape))
        if init == "signed_constant":  # the same ±std values maskprune.nn.init.init_weight writes
            ref = torch.empty(shape)
            maskprune.nn.init_weight(ref, init, density=density, scale_fan=scale_fan)
            assert torch.equal(weight.abs().unique(), ref.abs().unique())


def test_seed_weights_keys_each_masked_layer():
    model = models.create("conv2", num_classes=10, in_shape=(3, 8, 8), bias=False)
    convert(model, 0.5, weight_init="kaiming_uniform", scale_fan=True)
    rng.seed_weights(model, 2 ** 40 + 5)
    for index, (_, layer) in enumerate(masked_layers(model)):
        key = layer.weight_key
        assert (key.seed, key.layer, key.stream, key.init) == (2 ** 40 + 5, index, 0, "kaiming_uniform")
        assert torch.equal(layer.weight, key.generate(layer.weight.shape))
    plain = nn.Sequential(nn.Linear(4, 3))
    before = plain[0].weight.clone()
    convert(plain, 0.5)  # weight_init=None: pretrained weights stay, no key
    rng.seed_weights(plain, 1)
    assert torch.equal(plain[0].weight, before) and not hasattr(plain[0], "weight_key")


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=-1, layer=0), "seed must be an int in \\[0, 2\\^64\\)"),
    (dict(seed=2 ** 64, layer=0), "seed"),
    (dict(seed=0, layer=2 ** 32), "layer must be an int in \\[0, 2\\^32\\)"),
    (dict(seed=0, layer=0, density=0.0), "density must be a float in \\(0, 1\\]"),
    (dict(seed=1.5, layer=0), "seed"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rng.init_weight_counter(torch.empty(3, 4), "signed_constant", **kwargs)


def test_bad_init_and_scale():
    with pytest.raises(ValueError, match="init must be one of"):
        rng.counter_weights((3,), "xavier", 1.0, seed=0, layer=0)
    with pytest.raises(ValueError, match="scale must be"):
        rng.counter_weights((3,), "signed_constant", float("nan"), seed=0, layer=0)
