"""No device-to-host sync in any forward of a model carrying FASA (what rules out CUDA graphs and stalls the
GPU): every op that hands device data to the host (``.item()``, ``bool(t)``, ``torch.equal``, ...) goes
through ``aten._local_scalar_dense`` / ``aten.is_nonzero`` / ``aten.equal``; a dispatch mode counts them while
the denoiser's forward runs, on CPU (where the same ops are the ones that sync on CUDA)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import freecure_ops.adapters.attend as attend_mod
from freecure_ops.adapters import install_fasa
from freecure_ops.adapters.discovery import resolve_model
from test_adapters_helpers import flux_inputs, random_mask, run, tiny_flux
from tiny_pipes import BUILDERS, IMAGE

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.allclose.default}


class SyncSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.inside = False
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside and func in SYNC_OPS:
            self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


def _watch(model, spy):
    """Switch the spy on around the model's forward (before install_fasa's own pre-hook runs)."""
    pre = model.register_forward_pre_hook(lambda *a: setattr(spy, "inside", True), prepend=True)
    post = model.register_forward_hook(lambda *a: setattr(spy, "inside", False))
    return pre, post


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_pipeline_forwards_with_fasa_never_sync(family, monkeypatch):
    pipe = BUILDERS[family]()
    model, _ = resolve_model(pipe)
    calls = []
    real = attend_mod.fasa_attention
    monkeypatch.setattr(attend_mod, "fasa_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    spy = SyncSpy()
    hooks = _watch(model, spy)
    try:
        with install_fasa(pipe, random_mask((IMAGE, IMAGE)).float() * 0.7, layers="all"):
            with spy:
                pipe(["a photo of person", "a photo of man"], num_inference_steps=2, height=IMAGE, width=IMAGE,
                     output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    assert calls, "FASA never ran"
    assert spy.hits == []


def test_the_spy_sees_a_sync():
    """The bare FLUX transformer without grid= falls back to reading img_ids on the host: the spy catches it."""
    model = tiny_flux()
    spy = SyncSpy()
    hooks = _watch(model, spy)
    with install_fasa(model, random_mask((8, 8)), layers="all", layout="plain"), spy:
        run(model, flux_inputs(2, 4, 6))
    for h in hooks:
        h.remove()
    assert spy.hits
