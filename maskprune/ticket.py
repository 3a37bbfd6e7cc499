"""Tickets: a found subnetwork saved as generator keys + masks packed 1 bit per weight.

A strong lottery ticket needs no trained weights: the frozen random weights come back from their
generator key (maskprune.rng), so a ticket keeps per masked layer only the key and the mask, plus
every tensor that is not regenerated (biases, BatchNorm statistics, unmasked layers). For lenet300
and conv4 that is about 1/32 of the float32 state_dict.

File layout, version 1 (all integers little-endian):

    offset  size  field
    0       8     magic b"MPTICKET"
    8       4     version, uint32 (= 1)
    12      8     header length H, uint64
    20      32    SHA-256 of the header bytes
    52      H     header: UTF-8 JSON (below), zlib-compressed (RFC 1950, Python's zlib.compress)
    52+H    P     payload: the raw blobs, at the offsets the header gives (relative to 52+H)

The header SHA-256 is over the H stored (compressed) bytes. The header holds "payload": {"nbytes": P, "sha256": hex}, so every byte of the file is checked. Its
other fields: "arch" ({"kind": "registry", "name", "args"} to rebuild with maskprune.models.create,
or {"kind": "user"} when the loader must pass the constructed model), "policy" ("layerwise" or
"global") and "global_density", "layers" (one entry per masked layer in module order: name, type,
weight shape and constructor settings, density, kept count, weight_init, score_init, scale_fan,
abs_scores, "weight" = how to get the frozen weight back, weight dtype and SHA-256, and the mask
blob), "tensors" (name -> dtype, shape, blob) and "meta" (free JSON from the writer).

A blob is {"offset", "nbytes"} into the payload; tensors are stored C-contiguous in their dtype's
little-endian bytes. A mask of n weights is ceil(n / 8) bytes: weight i (row-major flat index into
the weight) is bit (i mod 8) of byte (i div 8), least significant bit first (numpy's
packbits(bitorder="little")); the padding bits of the last byte are 0.

Where a layer's frozen weight comes from ("weight"."source"):
  "philox4x32-10"  regenerated from its WeightKey (seed, layer, stream, init, scale); layers whose
                   weights were drawn by maskprune.rng (`layer.weight_key`, set by rng.seed_weights).
  "base"           not in the ticket: pretrained weights (weight_init=None) or weights drawn by torch's
                   RNG. Loading takes them from the base model passed and checks their SHA-256.
  "stored"         the float weight itself, in "tensors" (save_ticket(..., store_weights=True) for such
                   layers): self-contained but 32 bits per weight again.
Every source is checked against the weight SHA-256 on load.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import torch
import torch.nn as nn

from . import masks, models, ops, rng
from .nn import convert, masked_layers
from .nn.layers import MaskedConv2d, MaskedLinear, to_seed_mode

__all__ = ["TicketError", "save_ticket", "load_ticket", "ticket_info", "export_run", "evaluate_ticket", "MAGIC", "VERSION", "pack_mask",
           "unpack_mask", "weight_sha256"]

MAGIC = b"MPTICKET"
VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ32s")  # magic, version, header length, header SHA-256: 52 bytes
_MAX_HEADER = 1 << 28
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
           "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_CONV_FIELDS = ("stride", "padding", "dilation", "groups", "padding_mode")


class TicketError(ValueError):
    """A ticket file that cannot be read or does not fit the model: names the file and what is wrong."""

    def __init__(self, path, message: str):
        super().__init__(f"ticket {path}: {message}")
        self.path = str(path)


# ---------------------------------------------------------------------------------------------
# bytes of tensors and masks


def _to_bytes(t: torch.Tensor) -> bytes:
    """A tensor's C-contiguous little-endian bytes."""
    if sys.byteorder != "little":  # every platform torch ships for; kept explicit
        raise NotImplementedError("tickets are written on little-endian hosts only")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def weight_sha256(weight: torch.Tensor) -> str:
    """Hex SHA-256 of a weight's C-contiguous little-endian bytes in its own dtype."""
    return hashlib.sha256(_to_bytes(weight)).hexdigest()


def pack_mask(mask: torch.Tensor) -> bytes:
    """A boolean mask as ceil(n/8) bytes: flat index i -> bit (i % 8) of byte i // 8 (LSB first)."""
    bits = mask.detach().to("cpu").reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (bits.view(-1, 8) * weights).sum(1, dtype=torch.int64).to(torch.uint8).numpy().tobytes()


def unpack_mask(data: bytes, shape) -> torch.Tensor:
    """The boolean mask of `shape` that pack_mask wrote into `data`."""
    n = math.prod(shape)
    packed = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    bits = (packed.view(-1, 1) >> torch.arange(8)) & 1
    return bits.reshape(-1)[:n].bool().reshape(tuple(shape))


# ---------------------------------------------------------------------------------------------
# writing


def _layer_config(layer: nn.Module) -> dict:
    if isinstance(layer, MaskedConv2d):
        config = {f: getattr(layer, f) for f in _CONV_FIELDS}
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        return {"type": "Conv2d", **config, "bias": layer.bias is not None}
    return {"type": "Linear", "bias": layer.bias is not None}


def _plain_config(module: nn.Module) -> dict:
    """_layer_config of an unconverted nn.Linear / nn.Conv2d, to compare a user's model with a ticket."""
    if isinstance(module, nn.Conv2d):
        config = {f: getattr(module, f) for f in _CONV_FIELDS}
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        return {"type": "Conv2d", **config, "bias": module.bias is not None}
    return {"type": "Linear", "bias": module.bias is not None}


def _policy_of(layers: list) -> tuple[str, float | None]:
    policies = {id(layer.mask_policy): layer.mask_policy for _, layer in layers}
    if all(p is masks.LAYERWISE for p in policies.values()):
        return "layerwise", None
    if len(policies) == 1:
        (policy,) = policies.values()
        if isinstance(policy, masks.GlobalTopK) and {id(l) for l in policy.layers} == {id(l) for _, l in layers}:
            return "global", policy.density
    raise ValueError("model: save_ticket supports the layer-wise policy or one global policy over all masked "
                     f"layers, got policies {sorted(p.name for p in policies.values())}")


def _check_arch(arch, layers: list) -> dict:
    """The registry architecture {"name", "num_classes", "in_shape", ...}: checked to build the same layers."""
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"arch must be a dict with the model's registry name and create() arguments, "
                         f"e.g. {{'name': 'lenet300', 'num_classes': 10, 'in_shape': (1, 28, 28)}}, got {arch!r}")
    args = {k: v for k, v in arch.items() if k != "name"}
    if "in_shape" in args:
        args["in_shape"] = tuple(args["in_shape"])
    try:
        with torch.random.fork_rng(devices=[]):
            built = models.create(arch["name"], **args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"arch {arch!r} does not build: {err}") from None
    for name, layer in layers:
        try:
            module = built.get_submodule(name)
        except AttributeError:
            module = None
        if (not isinstance(module, (nn.Linear, nn.Conv2d)) or tuple(module.weight.shape) != tuple(layer.weight.shape)
                or _plain_config(module) != _layer_config(layer)):
            raise ValueError(f"arch {arch!r} builds another network than model: its {name!r} is not a "
                             f"{_layer_config(layer)['type']} of weight shape {tuple(layer.weight.shape)}")
    return {"kind": "registry", "name": arch["name"],
            "args": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}}


@torch.no_grad()
def save_ticket(model: nn.Module, path: str | os.PathLike, *, arch: dict | None = None,
                store_weights: bool = False, meta: dict | None = None) -> dict:
    """Writes the ticket of a converted `model` to `path` (atomically); returns its header.

    `arch` is the registry name and `models.create` arguments ({"name": "conv4", "num_classes": 10,
    "in_shape": (3, 32, 32), "bias": False}); without it the model's `maskprune_arch` attribute is
    used, and without that the ticket is a user-model ticket that loads into a model the caller
    constructs. Layers whose weights have a generator key (rng.seed_weights) store the key; others
    store their SHA-256 only and need the base model on load, unless `store_weights` stores them.
    `meta` is any JSON-serialisable dict kept in the header (e.g. the run's config and accuracy).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = masked_layers(model)
    if not layers:
        raise ValueError("model has no masked layers (run maskprune.convert first)")
    for name, layer in layers:
        if not isinstance(layer, (MaskedLinear, MaskedConv2d)):
            raise ValueError(f"model: layer {name!r} is a {type(layer).__name__}; tickets hold MaskedLinear and "
                             "MaskedConv2d layers only")
    policy, global_density = _policy_of(layers)
    arch = arch if arch is not None else getattr(model, "maskprune_arch", None)
    arch_entry = _check_arch(arch, layers) if arch is not None else {"kind": "user"}
    try:
        meta_json = json.loads(json.dumps(meta if meta is not None else {}, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta must be JSON-serialisable, got {err}") from None

    blobs: list[bytes] = []
    offset = 0

    def add_blob(data: bytes) -> dict:
        nonlocal offset
        blobs.append(data)
        entry = {"offset": offset, "nbytes": len(data)}
        offset += len(data)
        return entry

    tensors: dict[str, dict] = {}

    def add_tensor(name: str, t: torch.Tensor) -> None:
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"model: tensor {name!r} has dtype {t.dtype}, not one a ticket stores "
                             f"({', '.join(_DTYPES)})")
        tensors[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), **add_blob(_to_bytes(t))}

    layer_entries, regenerated = [], set()
    for name, layer in layers:
        weight = layer.weight.detach()
        if weight.dtype not in _DTYPE_NAMES:
            raise ValueError(f"model: layer {name!r} has weight dtype {weight.dtype}")
        key = getattr(layer, "weight_key", None)
        if key is not None:
            regen = key.generate(weight.shape).to(weight.dtype)
            if not torch.equal(regen, weight.cpu()):
                raise ValueError(f"model: layer {name!r}'s weight no longer equals what its weight_key "
                                 f"{key} generates (changed after seeding?); reseed it or drop the key")
            source = {"source": key.generator, "init": key.init, "scale": key.scale, "seed": key.seed,
                      "layer": key.layer, "stream": key.stream}
        elif store_weights:
            add_tensor(f"{name}.weight", weight)
            source = {"source": "stored"}
        else:
            source = {"source": "base"}
        mask = layer.mask()
        layer_entries.append({
            "name": name, **_layer_config(layer), "shape": list(weight.shape), "density": layer.density,
            "kept": int(mask.sum()), "weight_init": layer.weight_init, "score_init": layer.score_init,
            "scale_fan": layer.scale_fan, "abs_scores": layer.abs_scores, "weight": source,
            "weight_dtype": _DTYPE_NAMES[weight.dtype], "weight_sha256": weight_sha256(weight),
            "mask": add_blob(pack_mask(mask))})
        regenerated.update({f"{name}.weight", f"{name}.scores"})
    for name, t in model.state_dict().items():
        if name not in regenerated:
            add_tensor(name, t)

    payload = b"".join(blobs)
    header = {"format": "maskprune-ticket", "arch": arch_entry, "policy": policy, "global_density": global_density,
              "layers": layer_entries, "tensors": tensors, "meta": meta_json,
              "payload": {"nbytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}}
    header_bytes = zlib.compress(json.dumps(header, separators=(",", ":"), allow_nan=False).encode(), 9)
    preamble = _PREAMBLE.pack(MAGIC, VERSION, len(header_bytes), hashlib.sha256(header_bytes).digest())
    _write_atomic(Path(path), preamble + header_bytes + payload)
    return header


def _write_atomic(path: Path, data: bytes) -> None:
    """Writes through a temporary file in the same folder and os.replace: never a torn ticket."""
    if path.is_dir():
        raise ValueError(f"path {path} is a directory; give a file name such as ticket.mpt")
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------------------------
# reading


def _read(path) -> tuple[dict, memoryview]:
    """(header, payload) of a ticket file, every byte checked; TicketError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise TicketError(path, "does not exist or is not a file")
    data = path.read_bytes()
    if len(data) < 12 or data[:8] != MAGIC:
        raise TicketError(path, f"is not a maskprune ticket (does not start with {MAGIC!r})")
    version = struct.unpack_from("<I", data, 8)[0]
    if version != VERSION:
        raise TicketError(path, f"has format version {version}; this maskprune reads version {VERSION}")
    if len(data) < _PREAMBLE.size:
        raise TicketError(path, f"is truncated: {len(data)} bytes, shorter than the {_PREAMBLE.size}-byte preamble")
    _, _, header_len, header_sha = _PREAMBLE.unpack_from(data)
    end = _PREAMBLE.size + header_len
    if header_len > _MAX_HEADER or end > len(data):
        raise TicketError(path, f"is truncated or corrupted: the header claims {header_len} bytes, the file has "
                                f"{len(data) - _PREAMBLE.size} after the preamble")
    header_bytes = data[_PREAMBLE.size:end]
    if hashlib.sha256(header_bytes).digest() != header_sha:
        raise TicketError(path, "is corrupted: the header's SHA-256 does not match")
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(header_bytes, _MAX_HEADER)
        if not inflate.eof or inflate.unconsumed_tail or inflate.unused_data:
            raise ValueError("the compressed header is incomplete, too large or followed by other bytes")
        header = json.loads(text)
        payload_info = header["payload"]
        nbytes, sha = int(payload_info["nbytes"]), str(payload_info["sha256"])
    except (ValueError, KeyError, TypeError, zlib.error) as err:
        raise TicketError(path, f"has a malformed header ({type(err).__name__}: {err})") from None
    payload = memoryview(data)[end:]
    if len(payload) != nbytes:
        what = "truncated" if len(payload) < nbytes else "followed by extra bytes"
        raise TicketError(path, f"is {what}: the payload has {len(payload)} bytes, the header says {nbytes}")
    if hashlib.sha256(payload).hexdigest() != sha:
        raise TicketError(path, "is corrupted: the payload's SHA-256 does not match")
    return header, payload


def _blob(path, payload: memoryview, entry: dict, what: str) -> bytes:
    offset, nbytes = entry["offset"], entry["nbytes"]
    if not (isinstance(offset, int) and isinstance(nbytes, int) and 0 <= offset and 0 <= nbytes
            and offset + nbytes <= len(payload)):
        raise TicketError(path, f"has a malformed header: {what} lies outside the payload")
    return bytes(payload[offset:offset + nbytes])


def _tensor(path, payload: memoryview, name: str, entry: dict) -> torch.Tensor:
    dtype = _DTYPES.get(entry["dtype"])
    shape = entry["shape"]
    if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise TicketError(path, f"has a malformed header: tensor {name!r} has dtype {entry['dtype']!r} "
                                f"and shape {shape!r}")
    data = _blob(path, payload, entry, f"tensor {name!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != math.prod(shape) * itemsize:
        raise TicketError(path, f"has a malformed header: tensor {name!r} of shape {shape} has {len(data)} bytes")
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def ticket_info(path: str | os.PathLike) -> dict:
    """The header of a ticket (architecture, layers, kept counts, meta) after checking the whole file."""
    return _read(path)[0]


def _registry_model(path, arch: dict) -> nn.Module:
    args = dict(arch["args"])
    if "in_shape" in args:
        args["in_shape"] = tuple(args["in_shape"])
    try:
        with torch.random.fork_rng(devices=[]):  # loading a ticket leaves the caller's RNG stream alone
            return models.create(arch["name"], **args)
    except (TypeError, ValueError) as err:
        raise TicketError(path, f"its architecture {arch['name']!r} {args} cannot be built here: {err}") from None


def _prepare(path, model: nn.Module, header: dict) -> list:
    """Converts `model` (plain or already masked) to the ticket's masked layers; returns [(name, layer)]."""
    entries = header["layers"]
    names = [e["name"] for e in entries]
    present = masked_layers(model)
    if present:
        if [n for n, _ in present] != names:
            raise TicketError(path, f"is for another architecture: its masked layers are {names}, the model's are "
                                    f"{[n for n, _ in present]}")
        for entry, (name, layer) in zip(entries, present):
            if not isinstance(layer, (MaskedLinear, MaskedConv2d)):
                raise TicketError(path, f"does not fit the model: {name!r} is a {type(layer).__name__}")
            _check_layer(path, entry, tuple(layer.weight.shape), _layer_config(layer))
        return present
    modules = dict(model.named_modules())
    for entry in entries:
        module = modules.get(entry["name"])
        if type(module) not in (nn.Linear, nn.Conv2d):
            raise TicketError(path, f"is for another architecture: the model has no nn.Linear/nn.Conv2d "
                                    f"{entry['name']!r} (found {type(module).__name__})")
        _check_layer(path, entry, tuple(module.weight.shape), _plain_config(module))
    first = entries[0]
    density = header["global_density"] if header["policy"] == "global" else first["density"]
    kw = dict(policy=header["policy"], weight_init=None, score_init=first["score_init"], scale_fan=first["scale_fan"],
              abs_scores=first["abs_scores"])
    if "include" in inspect.signature(convert).parameters:  # mask exactly the ticket's layers, nothing else
        convert(model, density, include=names, **kw)
    else:
        skip = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in set(names)]
        convert(model, density, skip=skip, **kw)
    return masked_layers(model)


def _check_layer(path, entry: dict, shape: tuple, config: dict) -> None:
    want = {k: entry[k] for k in config}
    if tuple(entry["shape"]) != shape or want != config:
        raise TicketError(path, f"is for another architecture: its layer {entry['name']!r} is {want} with weight "
                                f"shape {tuple(entry['shape'])}, the model's is {config} with {shape}")


def _density_for(kept: int, total: int, density: float) -> float:
    """A density whose n_keep = clamp(floor(d * total + 1/2), 1, total) (ops.threshold) is `kept`:
    the layer's own when it gives `kept`, else the nearest that does."""
    n_keep = lambda d: min(max(math.floor(d * total + 0.5), 1), total)
    if n_keep(density) == kept:
        return density
    for d in (kept / total, (kept + 0.25) / total, (kept - 0.25) / total):
        if 0.0 < d <= 1.0 and n_keep(d) == kept:
            return d
    raise AssertionError(f"no density keeps {kept} of {total}")


def _base_weight(path, name: str, base_model: nn.Module | None, layer: nn.Module) -> torch.Tensor:
    if base_model is None:
        return layer.weight
    try:
        module = base_model.get_submodule(name)
    except AttributeError:
        module = None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TicketError(path, f"layer {name!r} needs its base weights, but base_model has no {name}.weight")
    return weight


@torch.no_grad()
def load_ticket(path: str | os.PathLike, model: nn.Module | None = None, *, base_model: nn.Module | None = None,
                backend: str = "auto", weights: str = "stored") -> nn.Module:
    """The ticket's masked network, in eval mode, its forward equal to the saved one bit for bit on CPU.

    weights="seed" loads the layers whose weights have a generator key in seed mode (maskprune.nn.to_seed_mode:
    no weight tensor; W regenerated inside each pass; tickets hold the top-k policies, which seed mode runs).

    A registry ticket rebuilds its model (maskprune.models); a user-model ticket loads into `model`,
    the caller's freshly constructed network (plain or converted; converted here if plain), which
    a registry ticket also accepts. Frozen weights are regenerated from their keys; layers without
    a key ("base": pretrained, or drawn by torch's RNG) take theirs from `base_model` (default:
    `model` itself), checked against the ticket's SHA-256. Each layer's scores become its mask as
    1.0 / 0.0 with a density keeping exactly that many, so `mask()` is the stored mask bit for bit.
    Raises TicketError (a ValueError) naming the file and what is wrong; `model` may then be
    partly converted.
    """
    for arg, value in (("model", model), ("base_model", base_model)):
        if value is not None and not isinstance(value, nn.Module):
            raise TypeError(f"{arg} must be a torch.nn.Module or None, got {type(value).__name__}")
    ops.check_backend_name(backend)
    if weights not in ("stored", "seed"):
        raise ValueError(f"weights must be one of ('stored', 'seed'), got {weights!r}")
    header, payload = _read(path)
    try:
        with torch.random.fork_rng(devices=[]):  # convert draws scores: leave the caller's RNG stream alone
            loaded = _load(path, header, payload, model, base_model, backend)
    except TicketError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:  # a header of the right hash
        raise TicketError(path, f"has a malformed header ({type(err).__name__}: {err})") from None
    if weights == "seed":
        for _, layer in masked_layers(loaded):
            if getattr(layer, "weight_key", None) is not None:
                to_seed_mode(layer)
    return loaded


def _load(path, header: dict, payload: memoryview, model, base_model, backend) -> nn.Module:
    arch, entries = header["arch"], header["layers"]
    if not entries:
        raise TicketError(path, "has no masked layers")
    model_given = model is not None
    if model is None:
        if arch["kind"] != "registry":
            raise TicketError(path, "holds a user model: pass the constructed network as load_ticket(path, model)")
        model = _registry_model(path, arch)
    needs_base = [e["name"] for e in entries if e["weight"]["source"] == "base"]
    if needs_base and base_model is None and not model_given:
        raise TicketError(path, f"does not hold the weights of {needs_base} (pretrained, or drawn by torch's RNG "
                                "before maskprune's generator): pass base_model=, the network they were found in")
    layers = _prepare(path, model, header)  # a plain model's own weights stay: they are its base weights

    layer_objs = []
    for entry, (name, layer) in zip(entries, layers):
        src = entry["weight"]
        dtype = _DTYPES.get(entry["weight_dtype"])
        if layer.weight.dtype != dtype:
            raise TicketError(path, f"layer {name!r} has weight dtype {entry['weight_dtype']}, the model's is "
                                    f"{_DTYPE_NAMES.get(layer.weight.dtype, layer.weight.dtype)}")
        if src["source"] == rng.GENERATOR:
            key = rng.WeightKey(init=src["init"], scale=float(src["scale"]), seed=src["seed"], layer=src["layer"],
                                stream=src["stream"])
            weight = key.generate(layer.weight.shape).to(dtype)
            what = f"the generator's weights ({key})"
        elif src["source"] == "stored":
            weight = _tensor(path, payload, f"{name}.weight", header["tensors"][f"{name}.weight"])
            key, what = None, "the stored weights"
        elif src["source"] == "base":
            weight = _base_weight(path, name, base_model, layer)
            key, what = None, ("base_model's weights" if base_model is not None else "the model's own weights")
        else:
            raise TicketError(path, f"layer {name!r} has an unknown weight source {src['source']!r}")
        if tuple(weight.shape) != tuple(layer.weight.shape) or weight.dtype != dtype:
            raise TicketError(path, f"layer {name!r}: {what} have shape {tuple(weight.shape)} / {weight.dtype}, "
                                    f"the ticket's {tuple(layer.weight.shape)} / {dtype}")
        digest = weight_sha256(weight)
        if digest != entry["weight_sha256"]:
            hint = (" (pass base_model=, the network the ticket was found in)" if src["source"] == "base"
                    else " (a generator that differs from the one that wrote the ticket)")
            raise TicketError(path, f"layer {name!r}: the SHA-256 of {what} is {digest[:16]}…, the ticket's is "
                                    f"{entry['weight_sha256'][:16]}…{hint}")
        layer.weight.copy_(weight)
        if key is not None:
            layer.weight_key = key
        elif "weight_key" in layer.__dict__:
            del layer.weight_key

        mask_bytes = _blob(path, payload, entry["mask"], f"the mask of {name!r}")
        n = layer.weight.numel()
        if len(mask_bytes) != (n + 7) // 8:
            raise TicketError(path, f"the mask of {name!r} has {len(mask_bytes)} bytes, {n} weights need {(n + 7) // 8}")
        mask = unpack_mask(mask_bytes, layer.weight.shape)
        kept = int(mask.sum())
        if kept != entry["kept"]:
            raise TicketError(path, f"the mask of {name!r} keeps {kept} weights, the header says {entry['kept']}")
        layer.scores.copy_(mask.to(layer.scores.dtype))
        layer.weight_init, layer.score_init = entry["weight_init"], entry["score_init"]
        layer.scale_fan, layer.abs_scores, layer.backend = entry["scale_fan"], entry["abs_scores"], backend
        layer_objs.append((name, layer, mask, kept))

    if header["policy"] == "global":
        total = sum(l.weight.numel() for _, l, _, _ in layer_objs)
        kept_all = sum(k for *_, k in layer_objs)
        if kept_all == 0:
            raise TicketError(path, "keeps no weight at all")
        density = _density_for(kept_all, total, header["global_density"])
        policy = masks.GlobalTopK([l for _, l, _, _ in layer_objs], density, abs_scores=entries[0]["abs_scores"],
                                  backend=backend)
        for entry, (_, layer, _, _) in zip(entries, layer_objs):
            layer.density, layer.mask_policy = entry["density"], policy
    else:
        for entry, (name, layer, _, kept) in zip(entries, layer_objs):
            if kept == 0:
                raise TicketError(path, f"the layer-wise mask of {name!r} keeps no weight")
            layer.density = _density_for(kept, layer.weight.numel(), entry["density"])
            layer.mask_policy = masks.LAYERWISE

    _load_tensors(path, header, payload, model, {n for n, *_ in layer_objs})
    for name, layer, mask, _ in layer_objs:
        if not torch.equal(layer.mask().cpu(), mask):  # the threshold reproduces the stored mask, or nothing loads
            raise TicketError(path, f"the mask of {name!r} could not be reproduced by the layer's top-k")
    return model.eval()


def _load_tensors(path, header: dict, payload: memoryview, model: nn.Module, layer_names: set) -> None:
    state = model.state_dict()
    regenerated = {f"{n}.{p}" for n in layer_names for p in ("weight", "scores")}
    stored = {k for k in header["tensors"] if k not in regenerated}
    expected = set(state) - regenerated
    if stored != expected:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise TicketError(path, f"is for another architecture: the model's tensors {missing[:5]} are not in the "
                                f"ticket, the ticket's {extra[:5]} are not in the model")
    for name in sorted(stored):
        t = _tensor(path, payload, name, header["tensors"][name])
        if tuple(t.shape) != tuple(state[name].shape) or t.dtype != state[name].dtype:
            raise TicketError(path, f"is for another architecture: tensor {name!r} is {tuple(t.shape)} {t.dtype} "
                                    f"in the ticket, {tuple(state[name].shape)} {state[name].dtype} in the model")
        state[name].copy_(t)


# ---------------------------------------------------------------------------------------------
# run folders (what `maskprune export` and `maskprune eval FILE` call)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, which: str = "best",
               store_weights: bool | None = None) -> dict:
    """Writes the ticket of a mask-mode run folder's best.pt (or last.pt) to `out`; returns its header.

    The run's config and summary go into the header's meta, so evaluate_ticket needs nothing else.
    `store_weights=None` stores the weights of layers without a generator key (runs made before
    maskprune.rng drew the weights), keeping the ticket self-contained; False stores only their hash.
    """
    import dataclasses

    from . import data as datasets
    from .evaluate import load_run

    model, cfg = load_run(run_dir, which, device="cpu")
    if cfg.mode != "mask":
        raise ValueError(f"run_dir: {run_dir} is a dense run (mode={cfg.mode!r}); only mask runs have tickets")
    info = datasets.DATASETS[cfg.dataset]
    arch = {"name": cfg.model, "num_classes": info.num_classes, "in_shape": list(info.in_shape), "width": cfg.width,
            "bias": False, **({"widths": cfg.widths} if cfg.widths else {})}  # as train.build_model builds it
    keyless = [n for n, layer in masked_layers(model) if getattr(layer, "weight_key", None) is None]
    if store_weights is None:
        store_weights = bool(keyless)
    meta = {"run": str(run_dir), "which": which, "config": dataclasses.asdict(cfg)}
    summary_path = Path(run_dir) / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
            meta["summary"] = {k: summary[k] for k in ("test_acc_best", "test_acc_last", "best_epoch")
                               if k in summary}
        except (ValueError, TypeError, OSError):
            pass  # the ticket does not need it
    return save_ticket(model, out, arch=arch, store_weights=store_weights, meta=meta)


def evaluate_ticket(path: str | os.PathLike, *, device: str = "cpu", data_root: str | None = None) -> dict:
    """Validation and test accuracy of an exported ticket on its run's dataset (from the header's meta), fp32."""
    import contextlib

    from . import data as datasets
    from .train import evaluate

    header = ticket_info(path)
    config = header.get("meta", {}).get("config")
    if not isinstance(config, dict) or config.get("dataset") not in datasets.DATASETS:
        raise TicketError(path, "names no dataset in its meta (not written by export_run); evaluate it yourself "
                                "with load_ticket")
    dev = torch.device(device)
    model = load_ticket(path).to(dev)
    splits = datasets.load(config["dataset"], root=data_root or config.get("data_root") or None).normalize().to(dev)
    _, val_acc = evaluate(model, splits.val_x, splits.val_y, 1024, contextlib.nullcontext)
    _, test_acc = evaluate(model, splits.test_x, splits.test_y, 1024, contextlib.nullcontext)
    return {"ticket": str(path), "dataset": config["dataset"], "val_acc": val_acc, "test_acc": test_acc,
            "run_summary": header["meta"].get("summary")}
