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
