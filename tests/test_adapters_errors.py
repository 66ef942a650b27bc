"""Bad input raises TypeError/ValueError naming the argument, before the model is touched; batch/layout problems
raise a clear error at the first FASA layer and leave the handle usable."""
from __future__ import annotations

import pytest
import torch

from freecure_ops.adapters import install_fasa
from test_adapters_helpers import random_mask, run, tiny_sd15, unet_inputs  # noqa: F401

GOOD = torch.ones(8, 8, dtype=torch.bool)


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15()


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), object(), "unet"])
def test_unknown_model(model):
    with pytest.raises(TypeError, match="^model must be"):
        install_fasa(model, GOOD)


@pytest.mark.parametrize("kwargs,err,name", [
    (dict(mask=[[1.0]]), TypeError, "mask"),
    (dict(mask=torch.ones(8)), ValueError, "mask"),
    (dict(mask=torch.ones(1, 2, 8, 8)), ValueError, "mask"),
    (dict(mask=torch.ones(0, 8)), ValueError, "mask"),
    (dict(mask=torch.ones(8, 8, dtype=torch.int64)), TypeError, "mask"),
    (dict(mask=-torch.ones(8, 8)), ValueError, "mask"),
    (dict(mask=torch.full((8, 8), float("nan"))), ValueError, "mask"),
    (dict(omega="1.5"), TypeError, "omega"),
    (dict(omega=True), TypeError, "omega"),
    (dict(omega=float("inf")), ValueError, "omega"),
    (dict(layers="some"), ValueError, "layers"),
    (dict(layers=[0, 99]), ValueError, "layers"),
    (dict(layers=[1.5]), TypeError, "layers"),
    (dict(layers=[]), ValueError, "layers"),
    (dict(layers=3), TypeError, "layers"),
    (dict(steps=3), TypeError, "steps"),
    (dict(steps=[-1]), ValueError, "steps"),
    (dict(steps=["a"]), TypeError, "steps"),
    (dict(style_fidelity=1.5), ValueError, "style_fidelity"),
    (dict(style_fidelity="1"), TypeError, "style_fidelity"),
    (dict(layout="batch"), ValueError, "layout"),
    (dict(mode="add"), ValueError, "mode"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(force="yes"), TypeError, "force"),
])
def test_bad_arguments_raise_before_anything_runs(unet, kwargs, err, name):
    before = dict(unet.attn_processors)
    hooks = dict(unet._forward_pre_hooks)
    args = dict(mask=GOOD, layers="all", layout="cfg")
    args.update(kwargs)
    with pytest.raises(err, match=f"^{name}"):
        install_fasa(unet, **args)
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert dict(unet._forward_pre_hooks) == hooks and not hasattr(unet, "_freecure_fasa_handle")


@pytest.mark.parametrize("layout,batch,mask,match", [
    ("cfg", 2, GOOD, "layout='cfg'"),
    ("cfg", 6, GOOD, "layout='cfg'"),
    ("plain", 3, GOOD, "layout='plain'"),
    ("cfg", 8, torch.ones(3, 8, 8), "3 per-pair masks .* 2 PD/FD pairs"),
    ("plain", 2, torch.ones(2, 8, 8), "2 per-pair masks .* 1 PD/FD pairs"),
])
def test_batch_that_does_not_fit_the_layout(unet, layout, batch, mask, match):
    kw = unet_inputs(unet, 4 if layout == "cfg" else 2, 4, 4)
    with install_fasa(unet, mask if mask.dim() == 2 else torch.ones(8, 8), layers=[0], layout=layout) as handle:
        want = run(unet, kw)                                   # a batch that fits
        handle.set_mask(mask)
        with pytest.raises(ValueError, match=match):
            run(unet, unet_inputs(unet, batch, 4, 4))
        handle.set_mask(GOOD)
        handle.reset()
        assert torch.equal(run(unet, kw), want)                # still usable after the error


def test_handle_setters_check_their_input(unet):
    with install_fasa(unet, GOOD, layers=[0], layout="cfg") as handle:
        with pytest.raises(TypeError, match="^enabled"):
            handle.enabled = 1
        with pytest.raises(ValueError, match="^mask"):
            handle.set_mask(torch.ones(3))
        assert handle.enabled and "1 layers" in repr(handle)
    assert "removed" in repr(handle)


def test_attention_mask_on_an_active_fasa_layer_is_refused(unet):
    from freecure_ops.adapters import find_self_attention_blocks

    attn = find_self_attention_blocks(unet)[0].attn
    x = torch.randn(4, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with install_fasa(unet, random_mask((4, 4)), layers=[0], layout="cfg") as handle:
        run(unet, unet_inputs(unet, 4, 4, 4))                  # sets the grid and activates the step
        assert handle.controller.active
        with pytest.raises(ValueError, match="attention_mask"):
            attn(x, attention_mask=torch.ones(4, 16))


def test_numpy_integers_are_layer_and_step_indices(unet):
    import numpy as np

    with install_fasa(unet, random_mask((8, 8)), layers=np.arange(0, 2), layout="cfg") as h:
        assert h.layers == (0, 1)
    with pytest.raises(TypeError, match="layers must hold ints"):
        install_fasa(unet, random_mask((8, 8)), layers=[np.bool_(True)], layout="cfg")


_TINY = torch.full((8, 8), 1e-50, dtype=torch.float64)


@pytest.mark.parametrize("mask", [
    _TINY,                                                      # 1e-50 would round to 0 (excluded) in float32
    torch.full((8, 8), 1e39, dtype=torch.float64),              # beyond float32
    torch.full((8, 8), -1.0), torch.full((8, 8), float("inf")),
    torch.ones(8, 8, requires_grad=True),
    torch.ones(8, 8, dtype=torch.int64),
    torch.ones(8, 8).to(getattr(torch, "float8_e4m3fn", torch.int8)),  # a float dtype the op does not take
    torch.full((8, 8), 1e-30, dtype=torch.float64),            # fine in float32: both take it
    torch.ones(8, 8, dtype=torch.bfloat16),
])
def test_install_refuses_exactly_the_masks_the_op_refuses(unet, mask):
    from freecure_ops import fasa_attention

    q, kf = torch.ones(1, 1, 4, 8), torch.ones(1, 1, 64, 8)
    try:
        fasa_attention(q, q, kf, q, kf, mask.reshape(-1), 1.0)
        op_error = None
    except (TypeError, ValueError) as e:
        op_error = type(e)
    before = dict(unet.attn_processors)
    if op_error is None:
        install_fasa(unet, mask, layers=[0], layout="cfg").remove()
    else:
        with pytest.raises(op_error, match="^mask"):
            install_fasa(unet, mask, layers=[0], layout="cfg").remove()
        with install_fasa(unet, GOOD, layers=[0], layout="cfg") as handle:
            with pytest.raises(op_error, match="^mask"):
                handle.set_mask(mask)
    assert all(unet.attn_processors[k] is v for k, v in before.items())


def test_omega_times_mask_beyond_float32_is_refused_at_install_and_set_mask(unet):
    big = torch.full((8, 8), 1e10)
    before = dict(unet.attn_processors)
    with pytest.raises(ValueError, match="^omega \\* max\\(mask\\)"):
        install_fasa(unet, big, omega=1e30, layers=[0], layout="cfg").remove()
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    with install_fasa(unet, GOOD, omega=1e30, layers=[0], layout="cfg") as handle:
        with pytest.raises(ValueError, match="^omega \\* max\\(mask\\)"):
            handle.set_mask(big)
        handle.set_mask(torch.full((8, 8), 1e3))               # 1e33: within float32 range
        # the prepared masks carry the bound, so the op checks it in every call too (omega set behind the handle)
        handle.controller.omega = 1e37
        with pytest.raises(ValueError, match="^omega \\* max\\(mask\\)"):
            run(unet, unet_inputs(unet, 4, 4, 4))
