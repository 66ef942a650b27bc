"""Test setup. Without CUDA, Triton kernels run in the CPU interpreter, which must be switched on before
triton is first imported, so this happens here, ahead of every project import."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Test tensors are tiny: intra-op threading costs more than it saves (tiny diffusers models run about
    10x faster on one thread here). Restored at the end of the session."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
