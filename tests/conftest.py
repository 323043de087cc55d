"""Test set-up. TRITON_INTERPRET is read when Triton kernels are decorated, so it is set here,
before anything imports sparse_attn: the `triton` backend then runs on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False  # references are exact fp32
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
