"""Test set-up. TRITON_INTERPRET is read when Triton kernels are decorated, so it is set here,
before anything imports sparse_attn: without a GPU the `triton` backend then runs on CPU tensors
in the interpreter; with one, the compiled kernels are what the GPU tests run (and the
interpreter tests skip, saying so)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False  # references are exact fp32
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

