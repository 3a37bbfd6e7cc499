"""One policy_sweep run (lenet300/MNIST, layerwise, density 0.1, seed 0, SGD lr 0.1, 10 epochs) under a variant:
default (C++ backend), torchdraw (frozen weights from torch's RNG, weight_seed=None, as before tickets),
torchbackend (the pure-torch reference ops). MASKPRUNE_NO_AVX512=1 with the default variant turns the AVX-512
passes off. Run from the repository root:

    for v in default torchdraw torchbackend; do python <this file> $v; done
    MASKPRUNE_NO_AVX512=1 python <this file> default
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO / "scripts"), str(REPO)]
import maskprune  # noqa: E402
import policy_sweep  # noqa: E402
from maskprune import data  # noqa: E402

variant = sys.argv[1]
convert = maskprune.convert


def convert_variant(model, density, **kw):
    if variant == "torchdraw":
        kw["weight_seed"] = None
    elif variant == "torchbackend":
        kw["backend"] = "torch"
    return convert(model, density, **kw)


policy_sweep.maskprune.convert = convert_variant
args = policy_sweep.parse_args(["--tasks", "lenet300-mnist", "--policies", "layerwise", "--threads", "1"])
policy_sweep.setup_threads(1)
splits = data.load("mnist").normalize()
print(variant, json.dumps(policy_sweep.train_one("lenet300-mnist", "layerwise", 0.1, 0, "sgd", 0.1, splits, args)))
