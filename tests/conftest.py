"""Chooses Triton's interpreter before anything imports triton or maskprune: without a CUDA GPU, the
Triton kernels (backend="triton") run on CPU tensors under TRITON_INTERPRET=1, as CI tests them."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def keep_threads():
    """Runs set torch's thread count (--threads); give the next test the count this one started with."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
