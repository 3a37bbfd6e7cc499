"""maskprune.ticket: save/load round trips equal bit for bit, sizes, the byte layout, and bad files."""
import hashlib
import json
import math
import os
import random
import struct
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskprune import models, rng
from maskprune.nn import convert, mask_stats, masked_layers, to_dense
from maskprune.ticket import (MAGIC, VERSION, TicketError, load_ticket, pack_mask, save_ticket, ticket_info,
                              unpack_mask)

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


def seeded(name, in_shape, *, density=0.5, policy="layerwise", weight_init="signed_constant", seed=1234, **kw):
    """A registry model converted to masked layers whose weights come from the counter generator."""
    arch = dict(name=name, num_classes=10, in_shape=in_shape, bias=False, **kw)
    model = models.create(**arch)
    convert(model, density, policy=policy, weight_init=weight_init, scale_fan=True)
    rng.seed_weights(model, seed)
    return model, arch


def train_steps(model, in_shape, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, *in_shape, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def assert_same_network(a, b, in_shape):
    x = torch.randn(32, *in_shape, generator=torch.Generator().manual_seed(1))
    ya, yb = a.eval()(x), b.eval()(x)
    assert torch.equal(ya.view(torch.int32), yb.view(torch.int32))
    da, db = to_dense(a).state_dict(), to_dense(b).state_dict()
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    for (na, la), (nb, lb) in zip(masked_layers(a), masked_layers(b)):
        assert na == nb and torch.equal(la.mask(), lb.mask()) and torch.equal(la.weight, lb.weight)
    assert mask_stats(a)["kept"] == mask_stats(b)["kept"]


# ---------------------------------------------------------------------------------------------
# layout


def test_mask_bit_order():
    mask = torch.zeros(10, dtype=torch.bool)
    mask[0] = mask[9] = mask[3] = True
    assert pack_mask(mask) == bytes([0b00001001, 0b00000010])  # LSB first, row-major, zero padding
    m = torch.rand(7, 5, 3, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(unpack_mask(pack_mask(m), m.shape), m)
    assert len(pack_mask(m)) == math.ceil(m.numel() / 8)


def test_file_layout(tmp_path):
    model, arch = seeded("lenet300", MNIST, width=0.1)
    path = tmp_path / "t.mpt"
    header = save_ticket(model, path, arch=arch, meta={"note": "x"})
    data = path.read_bytes()
    magic, version, header_len, header_sha = struct.unpack_from("<8sIQ32s", data)
    assert (magic, version) == (MAGIC, VERSION)
    header_bytes = data[52:52 + header_len]
    assert hashlib.sha256(header_bytes).digest() == header_sha
    assert json.loads(zlib.decompress(header_bytes)) == header == ticket_info(path)
    payload = data[52 + header_len:]
    assert len(payload) == header["payload"]["nbytes"]
    assert hashlib.sha256(payload).hexdigest() == header["payload"]["sha256"]
    entry = header["layers"][0]
    layer = masked_layers(model)[0][1]
    blob = payload[entry["mask"]["offset"]:entry["mask"]["offset"] + entry["mask"]["nbytes"]]
    assert blob == pack_mask(layer.mask())
    assert entry["weight"] == {"source": "philox4x32-10", "init": "signed_constant", "scale": layer.weight_key.scale,
                               "seed": 1234, "layer": 0, "stream": 0}
    assert header["arch"] == {"kind": "registry", "name": "lenet300",
                              "args": {"num_classes": 10, "in_shape": [1, 28, 28], "bias": False, "width": 0.1}}
    assert header["meta"] == {"note": "x"}


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("name,in_shape,policy,init", [
    ("lenet300", MNIST, "layerwise", "signed_constant"),
    ("lenet300", MNIST, "global", "kaiming_normal"),
    ("conv4", CIFAR, "layerwise", "kaiming_uniform"),
    ("conv4", CIFAR, "global", "signed_constant"),
])
def test_round_trip_trained(tmp_path, name, in_shape, policy, init):
    torch.manual_seed(0)
    model, arch = seeded(name, in_shape, policy=policy, weight_init=init, density=0.3)
    train_steps(model, in_shape)
    path = tmp_path / "t.mpt"
    save_ticket(model, path, arch=arch)
    state = torch.random.get_rng_state()
    loaded = load_ticket(path)
    assert torch.equal(torch.random.get_rng_state(), state)  # loading draws nothing from torch's RNG
    assert not loaded.training
    assert_same_network(model, loaded, in_shape)
    assert {l.mask_policy.name for _, l in masked_layers(loaded)} == {policy}


def test_round_trip_batchnorm_resnet(tmp_path):
    torch.manual_seed(0)
    model, arch = seeded("resnet20", CIFAR, width=0.25, weight_init="kaiming_normal")
    train_steps(model, CIFAR, steps=2)  # BatchNorm running statistics move
    path = tmp_path / "r.mpt"
    save_ticket(model, path, arch=arch)
    header = ticket_info(path)
    assert "bn1.running_mean" in header["tensors"] and "bn1.num_batches_tracked" in header["tensors"]
    assert_same_network(model, load_ticket(path), CIFAR)


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, 16)
        self.out = nn.Linear(16, 10)  # left dense (skip)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.out(torch.relu(self.head(x.flatten(1))))


def test_user_model(tmp_path):
    torch.manual_seed(0)
    model = convert(UserNet(), 0.4, weight_init="signed_constant", skip=["out"])
    rng.seed_weights(model, 7)
    train_steps(model, (3, 8, 8))
    path = tmp_path / "u.mpt"
    save_ticket(model, path)
    assert ticket_info(path)["arch"] == {"kind": "user"}
    with pytest.raises(TicketError, match="holds a user model: pass the constructed network"):
        load_ticket(path)
    torch.manual_seed(99)  # another torch init: the plain layers' weights are overwritten from the ticket
    assert_same_network(model, load_ticket(path, UserNet()), (3, 8, 8))
    fresh = convert(UserNet(), 0.9, skip=["out"])  # an already converted model loads too
    assert_same_network(model, load_ticket(path, fresh), (3, 8, 8))


def test_pretrained_base_weights(tmp_path):
    torch.manual_seed(0)
    base = models.create("lenet300", num_classes=10, in_shape=MNIST, width=0.2, bias=True)
    model = convert(models.create("lenet300", num_classes=10, in_shape=MNIST, width=0.2, bias=True), 0.3)
    model.load_state_dict({**model.state_dict(), **base.state_dict()})  # the "pretrained" weights
    train_steps(model, MNIST)
    arch = dict(name="lenet300", num_classes=10, in_shape=MNIST, width=0.2, bias=True)
    path = tmp_path / "p.mpt"
    header = save_ticket(model, path, arch=arch)
    assert {e["weight"]["source"] for e in header["layers"]} == {"base"}
    with pytest.raises(TicketError, match=r"does not hold the weights of .*pass base_model="):
        load_ticket(path)
    assert_same_network(model, load_ticket(path, base_model=base), MNIST)
    other = models.create("lenet300", num_classes=10, in_shape=MNIST, width=0.2, bias=True)  # other weights
    with pytest.raises(TicketError, match=r"p\.mpt: layer 'layers\.1': the SHA-256 of base_model's weights .* "
                                          r"the ticket's is"):
        load_ticket(path, base_model=other)
    # the user's own pretrained network, passed as the model to load into, holds the base weights
    target = models.create("lenet300", num_classes=10, in_shape=MNIST, width=0.2, bias=True)
    target.load_state_dict(base.state_dict())
    assert_same_network(model, load_ticket(path, target), MNIST)


def test_torch_rng_weights_stored_or_base(tmp_path):
    """Weights drawn by torch's RNG (no weight_key) are hashed (base) or stored with store_weights."""
    torch.manual_seed(0)
    model = convert(models.create("conv2", num_classes=10, in_shape=(3, 8, 8), bias=False), 0.5,
                    weight_init="signed_constant", weight_seed=None)  # None: torch's draw, as before tickets
    train_steps(model, (3, 8, 8))
    arch = dict(name="conv2", num_classes=10, in_shape=(3, 8, 8), bias=False)
    stored = save_ticket(model, tmp_path / "s.mpt", arch=arch, store_weights=True)
    assert {e["weight"]["source"] for e in stored["layers"]} == {"stored"}
    assert_same_network(model, load_ticket(tmp_path / "s.mpt"), (3, 8, 8))
    save_ticket(model, tmp_path / "b.mpt", arch=arch)
    with pytest.raises(TicketError, match="drawn by torch's RNG"):
        load_ticket(tmp_path / "b.mpt")
    assert_same_network(model, load_ticket(tmp_path / "b.mpt", base_model=model), (3, 8, 8))


def test_convert_draws_keyed_weights_by_default(tmp_path):
    """convert(weight_init=...) keys every fused layer's weights (weight_seed="auto", reproducible under
    torch.manual_seed); an explicit weight_seed gives the same weights in another model; None keeps torch's draw."""
    def build(**kw):
        return convert(models.create("lenet300", num_classes=10, in_shape=MNIST, width=0.2, bias=False), 0.5,
                       weight_init="kaiming_uniform", **kw)
    torch.manual_seed(3)
    a = build()
    torch.manual_seed(3)
    b = build()
    assert all(getattr(l, "weight_key", None) is not None for _, l in masked_layers(a))
    assert all(torch.equal(x.weight, y.weight) for (_, x), (_, y) in zip(masked_layers(a), masked_layers(b)))
    c, d = build(weight_seed=7), build(weight_seed=7)
    assert all(torch.equal(x.weight, y.weight) for (_, x), (_, y) in zip(masked_layers(c), masked_layers(d)))
    assert all(getattr(l, "weight_key", None) is None for _, l in masked_layers(build(weight_seed=None)))
    for bad in (-1, 2 ** 64, 1.5, True, "seed"):
        with pytest.raises(ValueError, match="weight_seed must be 'auto', None or an int in"):
            build(weight_seed=bad)


def test_model_attribute_arch(tmp_path):
    model, arch = seeded("conv2", (3, 8, 8))
    model.maskprune_arch = arch
    assert ticket_info_after(save_ticket, model, tmp_path)["arch"]["name"] == "conv2"


def ticket_info_after(save, model, tmp_path):
    save(model, tmp_path / "a.mpt")
    return ticket_info(tmp_path / "a.mpt")


# ---------------------------------------------------------------------------------------------
# sizes


def dense_bytes(name, in_shape, bias):
    model = models.create(name, num_classes=10, in_shape=in_shape, bias=bias)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("name,in_shape", [("lenet300", MNIST), ("conv4", CIFAR)])
def test_size_at_most_a_thirtieth(tmp_path, name, in_shape):
    model, arch = seeded(name, in_shape)
    path = tmp_path / "t.mpt"
    save_ticket(model, path, arch=arch)
    size = path.stat().st_size
    # the dense network with the masked one's layers (no biases), and with biases (as trained dense)
    for bias in (False, True):
        ratio = dense_bytes(name, in_shape, bias) / size
        print(f"{name}: ticket {size} B, dense float32 state_dict (bias={bias}) 1/{ratio:.2f}")
        assert ratio >= 30


def test_sizes_of_every_model(tmp_path):
    """The ratio for each registered model (MLPs on MNIST, conv nets and ResNets on CIFAR). These tickets
    hash torch-initialised weights ("base"): the same bytes as a keyed ticket up to ~80 header bytes per layer."""
    torch.manual_seed(0)
    for name in models.available():
        in_shape = MNIST if name in ("lenet300", "mlp") else CIFAR
        model = convert(models.create(name, num_classes=10, in_shape=in_shape, bias=False), 0.5)
        path = tmp_path / f"{name}.mpt"
        save_ticket(model, path, arch=dict(name=name, num_classes=10, in_shape=in_shape, bias=False))
        ratio = dense_bytes(name, in_shape, False) / path.stat().st_size
        print(f"{name}: 1/{ratio:.2f}")
        assert ratio > 20  # resnet20 (1/25.5): its BatchNorm statistics are stored as float32


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def small_ticket(tmp_path):
    model, arch = seeded("mlp", (1, 4, 4), widths="12,8")
    path = tmp_path / "small.mpt"
    save_ticket(model, path, arch=arch)
    return path, model


def rewrite(path, data):
    path.write_bytes(data)
    return path


def test_truncated(small_ticket):
    path, _ = small_ticket
    data = path.read_bytes()
    for cut, what in ((5, "is not a maskprune ticket"), (30, "is truncated"), (60, "is truncated or corrupted"),
                      (len(data) - 1, "is truncated: the payload has")):
        rewrite(path, data[:cut])
        with pytest.raises(TicketError, match=what) as err:
            load_ticket(path)
        assert str(path) in str(err.value)


def test_corrupted(small_ticket):
    path, _ = small_ticket
    data = bytearray(path.read_bytes())
    flipped = bytearray(data)
    flipped[-3] ^= 0x10
    with pytest.raises(TicketError, match="is corrupted: the payload's SHA-256 does not match"):
        load_ticket(rewrite(path, bytes(flipped)))
    flipped = bytearray(data)
    flipped[60] ^= 0x01
    with pytest.raises(TicketError, match="is corrupted: the header's SHA-256 does not match"):
        load_ticket(rewrite(path, bytes(flipped)))
    with pytest.raises(TicketError, match="followed by extra bytes"):
        load_ticket(rewrite(path, bytes(data) + b"\0"))


def test_wrong_magic_and_version(small_ticket, tmp_path):
    path, _ = small_ticket
    data = path.read_bytes()
    with pytest.raises(TicketError, match=r"is not a maskprune ticket \(does not start with b'MPTICKET'\)"):
        load_ticket(rewrite(path, b"PK\x03\x04" + data[4:]))
    with pytest.raises(TicketError, match="has format version 2; this maskprune reads version 1"):
        load_ticket(rewrite(path, data[:8] + struct.pack("<I", 2) + data[12:]))
    with pytest.raises(TicketError, match="does not exist"):
        load_ticket(tmp_path / "missing.mpt")


def test_other_architecture(small_ticket, tmp_path):
    path, _ = small_ticket
    with pytest.raises(TicketError, match=r"small\.mpt: is for another architecture: its layer 'layers\.3' .* "
                                          r"with weight shape \(8, 12\), the model's .* with \(9, 12\)"):
        load_ticket(path, models.create("mlp", num_classes=10, in_shape=(1, 4, 4), widths="12,9", bias=False))
    with pytest.raises(TicketError, match=r"its layer 'layers\.1' is \{'type': 'Linear', 'bias': False\}"):
        load_ticket(path, models.create("mlp", num_classes=10, in_shape=(1, 4, 4), widths="12,8", bias=True))
    with pytest.raises(TicketError, match="is for another architecture: the model has no nn.Linear/nn.Conv2d"):
        load_ticket(path, models.create("conv2", num_classes=10, in_shape=(1, 4, 4)))
    with pytest.raises(TicketError, match="is for another architecture: its masked layers are"):
        load_ticket(path, convert(models.create("conv2", num_classes=10, in_shape=(1, 4, 4)), 0.5))


def test_header_of_the_right_hash_but_wrong_content(small_ticket):
    """A hand-made header that passes the checksums but names a missing model or breaks the schema."""
    path, _ = small_ticket
    data = path.read_bytes()
    header_len = struct.unpack_from("<Q", data, 12)[0]
    header, payload = json.loads(zlib.decompress(data[52:52 + header_len])), data[52 + header_len:]

    def write(h):
        hb = zlib.compress(json.dumps(h).encode())
        return rewrite(path, struct.pack("<8sIQ32s", MAGIC, VERSION, len(hb), hashlib.sha256(hb).digest()) + hb
                       + payload)

    with pytest.raises(TicketError, match="its architecture 'nosuchnet' .* cannot be built here"):
        load_ticket(write({**header, "arch": {**header["arch"], "name": "nosuchnet"}}))
    with pytest.raises(TicketError, match="has a malformed header"):
        load_ticket(write({**header, "layers": "oops"}))
    hb = json.dumps(header).encode()  # not compressed
    rewrite(path, struct.pack("<8sIQ32s", MAGIC, VERSION, len(hb), hashlib.sha256(hb).digest()) + hb + payload)
    with pytest.raises(TicketError, match="has a malformed header \\(error"):
        load_ticket(path)
    bad_layer = {**header["layers"][0], "mask": {"offset": 10 ** 9, "nbytes": 4}}
    with pytest.raises(TicketError, match="lies outside the payload"):
        load_ticket(write({**header, "layers": [bad_layer, *header["layers"][1:]]}))
    other_key = {**header["layers"][0], "weight": {**header["layers"][0]["weight"], "seed": 1}}
    with pytest.raises(TicketError, match="SHA-256 of the generator's weights .*a generator that differs"):
        load_ticket(write({**header, "layers": [other_key, *header["layers"][1:]]}))


def test_nothing_written_on_failure(small_ticket, tmp_path):
    path, model = small_ticket
    before = path.read_bytes()
    layer = masked_layers(model)[0][1]
    with torch.no_grad():
        layer.weight[0, 0] += 1.0  # no longer what its key generates
    with pytest.raises(ValueError, match="no longer equals what its weight_key"):
        save_ticket(model, path, arch=None)
    with pytest.raises(ValueError, match="arch .* does not build"):
        save_ticket(model, tmp_path / "new.mpt", arch={"name": "mlp", "num_classes": 0, "in_shape": (1, 4, 4)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.mpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ValueError, match="no masked layers"):
        save_ticket(nn.Linear(2, 2), tmp_path / "x.mpt")


def test_fuzz_only_ticket_errors(small_ticket):
    """Random truncations and bit flips (fixed seed): every one is a TicketError, never another exception."""
    path, _ = small_ticket
    data = path.read_bytes()
    rnd = random.Random(0)
    for trial in range(300):
        mutated = bytearray(data)
        if trial % 3 == 0:
            mutated = mutated[:rnd.randrange(len(data))]
        else:
            for _ in range(rnd.randint(1, 4)):
                pos = rnd.randrange(len(mutated))
                mutated[pos] ^= 1 << rnd.randrange(8)
        if bytes(mutated) == data:
            continue
        with pytest.raises(TicketError):
            load_ticket(rewrite(path, bytes(mutated)))


def test_ties_and_empty_layers(tmp_path):
    """Masks that are not n_keep(density) of a layer (ties at t all kept; a global mask leaving a layer
    empty) come back bit for bit: the loaded density is the one that keeps exactly the stored count."""
    for policy in ("layerwise", "global"):
        model, arch = seeded("mlp", (1, 4, 4), widths="12,8", policy=policy)
        layers = [l for _, l in masked_layers(model)]
        with torch.no_grad():
            layers[0].scores.fill_(1.0)      # all tied: every weight kept
            layers[1].scores.uniform_(0, 1)
            layers[1].scores[:3] = 2.0       # three rows tie at the top
            layers[2].scores.fill_(0.01 if policy == "global" else 0.5)  # global: this layer keeps nothing
        kept = [int(l.mask().sum()) for l in layers]
        path = tmp_path / f"{policy}.mpt"
        save_ticket(model, path, arch=arch)
        loaded = load_ticket(path)
        assert [int(l.mask().sum()) for _, l in masked_layers(loaded)] == kept
        assert_same_network(model, loaded, (1, 4, 4))


def test_sizes_script_runs():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "ticket_sizes.py"
    proc = subprocess.run([sys.executable, str(script), "--models", "lenet300", "--check", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = proc.stdout.splitlines()[-1]
    assert row.startswith("| lenet300 | 1x28x28 | 266,200 |") and row.endswith("| True |")


def test_bad_arguments(small_ticket):
    path, _ = small_ticket
    with pytest.raises(TypeError, match="model must be a torch.nn.Module or None, got str"):
        load_ticket(path, "lenet300")
    with pytest.raises(TypeError, match="base_model must be a torch.nn.Module or None"):
        load_ticket(path, base_model=3)
    with pytest.raises(ValueError, match="backend"):
        load_ticket(path, backend="fortran")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        save_ticket({}, path)


# ---------------------------------------------------------------------------------------------
# run folders: export_run / evaluate_ticket (what `maskprune export` and `maskprune eval FILE` call)


@pytest.mark.parametrize("keyed", [False, True])
def test_export_and_evaluate_run(tmp_path, keyed):
    """A tiny MNIST run's ticket tests to the run's summary accuracy exactly (CPU). keyed=True: the trainer's
    default generator (maskprune.rng, keys stored); False: --generator torch (weights stored)."""
    from maskprune import data as datasets
    from maskprune import train as train_mod
    from maskprune.ticket import evaluate_ticket, export_run

    try:
        datasets.load("mnist")
    except datasets.DatasetUnavailable:
        pytest.skip("MNIST is not cached here")
    cfg = train_mod.TrainConfig(model="lenet300", dataset="mnist", epochs=1, batch_size=64, limit_train=512,
                                device="cpu", threads=1, generator="philox" if keyed else "torch")
    summary = train_mod.train(cfg, tmp_path / "run", quiet=True)
    header = export_run(tmp_path / "run", tmp_path / "run.mpt")
    assert {e["weight"]["source"] for e in header["layers"]} == ({"philox4x32-10"} if keyed else {"stored"})
    result = evaluate_ticket(tmp_path / "run.mpt")
    assert result["test_acc"] == summary["test_acc_best"] == result["run_summary"]["test_acc_best"]
    size = (tmp_path / "run.mpt").stat().st_size
    assert (size * 30 <= 266_200 * 4) == keyed
    with pytest.raises(TicketError, match="names no dataset in its meta"):
        model, arch = seeded("mlp", (1, 4, 4), widths="4")
        save_ticket(model, tmp_path / "plain.mpt", arch=arch)
        evaluate_ticket(tmp_path / "plain.mpt")
