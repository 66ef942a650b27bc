"""Overwrite the PD rows of a stock self-attention result with FASA. No math of its own beyond the
style-fidelity blend.

The processors first make the stock attention call over the whole batch, exactly as the stock processor
does, so FD rows are bit-identical to the stock model's (attention kernels choose their tiling by batch size,
so a call over the FD rows alone is not bit-identical). Then the PD rows of that result are replaced by
``fasa_attention`` with each PD row's FD partner's keys/values; the discarded plain PD results double as the
plain term of the style-fidelity blend of the unconditional PD rows.
"""
from __future__ import annotations

import torch

from freecure_ops import fasa_attention
from freecure_ops.fasa_mask import FasaMask, fold_omega

from .controller import FasaController


def omega_and_mask(ctl: FasaController, mask: FasaMask) -> tuple[float, FasaMask]:
    """``(omega, mask)`` for ``fasa_attention``: the controller's float in eager calls; in a compiled forward
    without autograd, omega as data the graph reads (``ctl.omega_data`` folded into the mask, omega 1), so an
    omega sweep reuses one graph instead of recompiling per value. With autograd the float stays (the fold is
    forward-only; a new omega then recompiles)."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return 1.0, fold_omega(mask, ctl.omega_data.to(mask.device))
    return ctl.omega, mask


def overwrite_pd_rows(ctl: FasaController, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      mask_hw: tuple[int, int], n_txt: int, layer: str, scale: float | None = None) -> torch.Tensor:
    """``q, k, v``: ``[B, H, N, D]`` views (sliced per row block, never copied); ``out``: the stock attention
    result as a ``[B, H, N, D]`` view, written in place (cloned first when autograd tracks it). ``scale``: the
    softmax scale (None: ``D ** -0.5``). Returns out."""
    plan = ctl.plan(q.shape[0], layer)
    mask = ctl.mask_for(mask_hw[0], mask_hw[1], q.device, plan[0][1], layer)
    if out.requires_grad:
        out = out.clone()
    for start, n, uncond in plan:
        sf = ctl.style_fidelity if uncond else 0.0
        if sf == 1.0:  # unconditional PD rows keep plain self-attention
            continue
        pd, fd = slice(start, start + n), slice(start + n, start + 2 * n)
        omega, omega_mask = omega_and_mask(ctl, mask)
        res = fasa_attention(q[pd], k[pd], k[fd], v[pd], v[fd], omega_mask, omega, scale=scale, mode=ctl.mode,
                             n_txt=n_txt, backend=ctl.backend)
        if sf > 0.0:
            res = (1.0 - sf) * res + sf * out[pd]
        out[pd] = res
    return out


def half_plan(ctl: FasaController, batch: int) -> list[tuple[int, int, bool]]:
    """``(start, n, is_uncond)`` per guidance half of pass 1's batch of FD rows: ``[uncond_1..n, cond_1..n]``
    under CFG, else the whole batch."""
    if ctl.row_layout("pass 1") == "cfg":
        n = batch // 2
        return [(0, n, True), (n, n, False)]
    return [(0, batch, ctl.call_uncond)]


def record_fd_rows(ctl: FasaController, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], n_txt: int,
                   layer: str) -> None:
    """Pass 1 (FD rows only): keep the image keys/values ``[n, H, Nimg, D]`` of the guidance halves whose PD
    rows will get FASA in pass 2."""
    rec = ctl.fd_record
    compiling = torch.compiler.is_compiling()
    if not compiling:
        rec.note_grid(ctl.latent_hw)
    for start, n, uncond in half_plan(ctl, k.shape[0]):
        if uncond not in rec.halves:
            continue
        rows = slice(start, start + n)
        if compiling:  # filed under the step by the compiled wrapper's eager hook (FdRecord.flush)
            rec.stash(layer, uncond, k[rows, :, n_txt:], v[rows, :, n_txt:], grid)
        else:
            rec.put(layer, ctl.step, uncond, k[rows, :, n_txt:], v[rows, :, n_txt:], grid)


def replay_pd_rows(ctl: FasaController, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stock,
                   grid: tuple[int, int], n_txt: int, layer: str, scale: float | None = None) -> torch.Tensor:
    """Pass 2 with FD reuse: the batch holds the PD rows only, of this pipeline or of another one running the
    same architecture: n rows without a CFG batch, 2n (``[uncond, cond]``) with one, as the pipeline (or the
    layout given for a bare model) says; never guessed from the batch size. Each half gets FASA against the FD
    keys/values recorded in pass 1; ``stock(rows)`` (the stock attention of those rows, ``[n, H, N, D]``) is
    computed only where the result keeps it: unconditional rows with ``style_fidelity > 0``. Returns
    ``[B, H, N, D]``."""
    rec = ctl.fd_record
    parts = []
    for start, n, uncond in rec.replay_plan(q.shape[0], layer, ctl.row_layout(layer), ctl.call_uncond):
        rows = slice(start, start + n)
        sf = ctl.style_fidelity if uncond else 0.0
        if sf == 1.0:
            parts.append(stock(rows))
            continue
        if torch.compiler.is_compiling() or rec.is_staged:
            # put in place by the compiled wrapper's eager hook (FdRecord.stage); also read by the model's frame
            # when dynamo runs it eagerly (past its recompile limit), so each call is counted once
            k_f, v_f, mask = rec.staged(layer, uncond)
        else:
            k_f, v_f, mask = rec.get(layer, ctl.step, uncond, n_txt, q.device, grid)
        omega, mask = omega_and_mask(ctl, mask)
        res = fasa_attention(q[rows], k[rows], k_f, v[rows], v_f, mask, omega, scale=scale, mode=ctl.mode,
                             n_txt=n_txt, backend=ctl.backend)
        if sf > 0.0:
            res = (1.0 - sf) * res + sf * stock(rows)
        parts.append(res)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
