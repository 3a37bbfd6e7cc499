"""Kernel tests run on a CUDA GPU when there is one, else on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are decorated (when maskprune.kernels is imported):
tests/conftest.py sets it on machines without a CUDA GPU, before any test module is imported. If
maskprune.kernels was somehow imported earlier without the interpreter, the session stops with a
message saying what to do.
"""
import os
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
HALF_SKIP_REASON = "needs a CUDA GPU: the Triton interpreter mishandles bf16/fp16"

_utils = sys.modules.get("maskprune.kernels._utils")
if _utils is not None and _utils.INTERPRET != INTERPRET:
    raise pytest.UsageError(
        "maskprune.kernels was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
        "run pytest with TRITON_INTERPRET=1 in the environment (or set it in tests/conftest.py)")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def require_dtype():
    """Call with a dtype: skips (with the reason printed by -ra) where that dtype is not tested."""
    def check(dtype: torch.dtype) -> None:
        if dtype in (torch.float16, torch.bfloat16) and DEVICE != "cuda":
            pytest.skip(HALF_SKIP_REASON)
    return check


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
