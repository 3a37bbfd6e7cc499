"""Ticket sizes against the dense float32 state_dict, for every registered model (the README's table).

Each model is built for MNIST (1, 28, 28) if it is an MLP and for CIFAR-10 (3, 32, 32) otherwise,
converted at density 0.5 with bias=False (edge-popup's masked networks), its weights drawn by
maskprune.rng (so the ticket holds keys, not weights), saved with save_ticket and, with --check,
loaded back and compared bit for bit.

    python3 scripts/ticket_sizes.py --threads 1 [--models lenet300,conv4] [--check]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from maskprune import models, rng
from maskprune.nn import convert, masked_layers
from maskprune.ticket import load_ticket, save_ticket

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


def dense_bytes(name: str, in_shape: tuple, bias: bool) -> int:
    model = models.create(name, num_classes=10, in_shape=in_shape, bias=bias)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def measure(name: str, folder: Path, check: bool) -> dict:
    in_shape = MNIST if name in ("lenet300", "mlp") else CIFAR
    arch = dict(name=name, num_classes=10, in_shape=in_shape, bias=False)
    model = convert(models.create(**arch), 0.5, weight_init="signed_constant", scale_fan=True)
    rng.seed_weights(model, 0)
    path = folder / f"{name}.mpt"
    t0 = time.perf_counter()
    header = save_ticket(model, path, arch=arch)
    save_s = time.perf_counter() - t0
    row = {"model": name, "in_shape": in_shape, "masked_weights": sum(l.weight.numel() for _, l in masked_layers(model)),
           "ticket_bytes": path.stat().st_size, "header_bytes": path.stat().st_size - 52 - header["payload"]["nbytes"],
           "dense_bytes": dense_bytes(name, in_shape, False), "dense_bias_bytes": dense_bytes(name, in_shape, True),
           "save_s": save_s}
    if check:
        t0 = time.perf_counter()
        loaded = load_ticket(path)
        row["load_s"] = time.perf_counter() - t0
        x = torch.randn(8, *in_shape)
        row["bit_equal"] = bool(torch.equal(model.eval()(x), loaded(x)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(models.available()), help="comma-separated registry names")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--check", action="store_true", help="also load each ticket and compare the forward")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(models.available()))
    if unknown:
        parser.error(f"--models: unknown {unknown}; available: {', '.join(models.available())}")
    print("| model | input | masked weights | ticket | of which header | dense fp32 state_dict | ratio "
          "| ratio vs dense with biases |" + (" load s | bit-equal |" if args.check else ""))
    print("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---|" if args.check else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = measure(name, Path(tmp), args.check)
            line = (f"| {r['model']} | {'x'.join(map(str, r['in_shape']))} | {r['masked_weights']:,} | "
                    f"{r['ticket_bytes']:,} B | {r['header_bytes']:,} B | {r['dense_bytes']:,} B | "
                    f"1/{r['dense_bytes'] / r['ticket_bytes']:.1f} | 1/{r['dense_bias_bytes'] / r['ticket_bytes']:.1f} |")
            if args.check:
                line += f" {r['load_s']:.1f} | {r['bit_equal']} |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
