"""Chooses Triton's interpreter before anything imports triton or maskprune: without a CUDA GPU, the
Triton kernels (backend="triton") run on CPU tensors under TRITON_INTERPRET=1, as CI tests them."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
