"""Forward pre-hooks on the UNet / FLUX transformer: they start the controller's forward (step index from the
scheduler's loop, layout of the call) and give it the latent grid and, for FLUX, the text length.

They read shapes and Python state only: no device-to-host sync (the timestep is never read; the FLUX grid is
the one the pipeline passed to ``_prepare_latent_image_ids``, or ``grid=`` given to ``install_fasa``; only a
bare FLUX transformer with neither falls back to reading ``img_ids``, one host sync per forward).

Under ``torch.compile`` the model's hooks are traced into its graph. There they skip the bookkeeping (which
attaches step counters and reads pipeline properties: eager work) and read the gate the controller decided
outside the compiled region (:class:`.controller.FasaController`); a compiled model's ``OptimizedModule``
wrapper gets :func:`eager_pre_hook` and :func:`eager_post_hook`, which do the bookkeeping eagerly around the
compiled call (with FD reuse: staging the recorded keys/values, filing the new ones).
"""
from __future__ import annotations

import torch


def _arg(args, kwargs, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _start(ctl) -> bool:
    """Whether FASA runs in this forward: decided here when eager, read from the controller when traced."""
    if torch.compiler.is_compiling():
        return ctl.active
    return ctl.begin_forward()


def _call_grid(ctl, family: str, args, kwargs) -> tuple[tuple[int, int] | None, int]:
    """(grid, text tokens) of a model call, from shapes and Python state: the UNet's latent size, or FLUX's
    image-token grid (given at install or by the pipeline; None when neither told it) and text length."""
    if family == "flux":
        text = _arg(args, kwargs, 1, "encoder_hidden_states")
        n_txt = int(text.shape[1]) if isinstance(text, torch.Tensor) else 0
        return (ctl.grid if ctl.grid is not None else ctl.pipeline_grid), n_txt
    sample = _arg(args, kwargs, 0, "sample")
    return (int(sample.shape[-2]), int(sample.shape[-1])), 0


def eager_pre_hook(ctl, family: str):
    """For the ``OptimizedModule`` of a compiled model: runs eagerly before each compiled forward. Starts the
    controller's forward; in pass 2 of FD reuse it puts the recorded keys/values of this step in place."""
    def hook(module, args, kwargs):
        if not ctl.begin_forward() or ctl.fd_role != "replay":
            return
        x = _arg(args, kwargs, 0, "hidden_states" if family == "flux" else "sample")
        grid, n_txt = _call_grid(ctl, family, args, kwargs)
        ctl.fd_record.stage(ctl.step, int(x.shape[0]), ctl.row_layout("the model"), ctl.call_uncond, grid, n_txt,
                            x.device, ctl.style_fidelity)
    return hook


def eager_post_hook(ctl, family: str):
    """For the ``OptimizedModule`` of a compiled model: runs eagerly after each compiled forward. In pass 1 of
    FD reuse it files the keys/values the layers stashed under the step; in pass 2 it drops what was staged."""
    def hook(module, args, kwargs, output):
        if ctl.fd_role == "record":
            ctl.fd_record.flush(ctl.step, _call_grid(ctl, family, args, kwargs)[0])
        elif ctl.fd_role == "replay":
            ctl.fd_record.unstage()
    return hook


def unet_pre_hook(ctl):
    def hook(module, args, kwargs):
        sample = _arg(args, kwargs, 0, "sample")
        if _start(ctl) and sample is not None:
            ctl.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
    return hook


def grid_from_img_ids(img_ids) -> tuple[tuple[int, int] | None, str | None]:
    """``((h, w), None)`` when ``img_ids`` (``[N, 3]``, rows ``(0, y, x)``) form a row-major ``h x w`` grid
    from 0, else ``(None, reason)``. Reads the ids on the host (a sync): the fallback for a bare transformer."""
    if not isinstance(img_ids, torch.Tensor):
        return None, "img_ids were not passed to the transformer"
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    if ids.dim() != 2 or ids.shape[-1] < 3 or ids.shape[0] == 0:
        return None, f"img_ids must have shape [N, 3], got {tuple(img_ids.shape)}"
    ids = ids.detach().to("cpu", torch.float64)
    rows, cols = ids[:, 1], ids[:, 2]
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    index = torch.arange(ids.shape[0], dtype=torch.float64)
    if ids.shape[0] != h * w or not torch.equal(rows, torch.div(index, w, rounding_mode="floor")) \
            or not torch.equal(cols, torch.remainder(index, w)):
        return None, "img_ids do not describe one row-major image grid starting at 0 (FASA needs it to place the mask)"
    return (h, w), None


COMPILED_FLUX_NEEDS_GRID = ("a compiled FLUX transformer called without its pipeline needs the image grid: pass "
                            "grid=(h, w) (latent height and width / 2) to install_fasa")


def flux_pre_hook(ctl):
    def hook(module, args, kwargs):
        if not _start(ctl):
            return
        text = _arg(args, kwargs, 1, "encoder_hidden_states")
        ctl.n_txt = int(text.shape[1]) if isinstance(text, torch.Tensor) else None
        grid = ctl.grid if ctl.grid is not None else ctl.pipeline_grid
        if grid is not None:
            ctl.latent_hw, ctl.grid_error = grid, None
        elif torch.compiler.is_compiling():
            ctl.latent_hw, ctl.grid_error = None, COMPILED_FLUX_NEEDS_GRID
        else:
            ctl.latent_hw, ctl.grid_error = grid_from_img_ids(_arg(args, kwargs, 4, "img_ids"))
    return hook
