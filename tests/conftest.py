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


@pytest.fixture(autouse=True)
def no_unseeded_global_rng(monkeypatch):
    """Every random input comes from a seeded generator: a test that draws from torch's or numpy's global RNG
    without seeding it first fails (this torch build seeds the global RNG randomly per process, so such a
    test would see different inputs in every run). Seeding with ``torch.manual_seed`` (e.g. before building
    a tiny model from a config) is allowed: what follows is reproducible."""
    import numpy as np

    seeded = []
    real_seed = torch.manual_seed

    def manual_seed(seed):
        seeded.append(seed)
        return real_seed(seed)

    monkeypatch.setattr(torch, "manual_seed", manual_seed)
    monkeypatch.setattr(torch.random, "manual_seed", manual_seed)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    yield
    if not seeded and not torch.equal(torch.get_rng_state(), torch_state):
        pytest.fail("this test drew from torch's global RNG without seeding it: pass generator=torch.Generator()"
                    ".manual_seed(...) (tests/fasa_cases.py has seeded builders)", pytrace=False)
    after = np.random.get_state()
    if not (np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]):
        pytest.fail("this test drew from numpy's global RNG: use np.random.default_rng(seed)", pytrace=False)
