"""One denoising step end to end (GPU only): the full-size SDXL UNet, and the FLUX.1-dev transformer at full
width with fewer blocks, random weights built directly on the GPU. Three variants per model:

- ``stock``: the unmodified model on the dual batch (PD and FD rows), i.e. FreeCure's batch without FASA;
- ``fasa``: ``freecure_ops.adapters.install_fasa`` on the preset layers (Triton kernel);
- ``eager``: the same adapters with the attention computed the authors' way (``fasa_reference``: eager,
  materialized scores), i.e. the structure of the reference code.

FLUX is measured at (1 double + 2 single) and (2 double + 4 single) blocks; the full 19 + 38 estimate is
``t(1,2) + 18 * (t(2,4) - t(1,2))`` (the blocks' cost is linear in their count; embedders counted once).
Needs CUDA and ``freecure_ops.adapters.install_fasa``; otherwise it says why and returns nothing.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from . import measure
from .masks import parsing_map

SDXL_BATCH = 4          # CFG layout [PD_u, FD_u, PD_c, FD_c]
FLUX_BATCH = 2          # FLUX-dev, no CFG: [PD, FD]
E2E_TIMING = {"warmup_ms": 50.0, "rep_ms": 300.0}
E2E_TIMING_QUICK = {"warmup_ms": 10.0, "rep_ms": 60.0}
MASK_COVERAGE = 0.25


# ------------------------------------------------------------------------------------------ models, inputs
def build_unet(config: dict, device, dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        model = UNet2DConditionModel(**config)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def unet_inputs(config: dict, batch: int, latent_hw: tuple, device, dtype, seq: int = 77) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    h, w = latent_hw
    kw = dict(generator=gen, device=device, dtype=dtype)
    inputs = {"sample": torch.randn(batch, config.get("in_channels", 4), h, w, **kw),
              "timestep": torch.tensor(500, device=device),
              "encoder_hidden_states": torch.randn(batch, seq, config["cross_attention_dim"], **kw)}
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text_dim, **kw),
                                       "time_ids": torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]] * batch,
                                                                device=device, dtype=dtype)}
    return inputs


def build_flux(config: dict, device, dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**config)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def flux_inputs(config: dict, batch: int, grid: tuple, n_txt: int, device, dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    kw = dict(generator=gen, device=device, dtype=dtype)
    h, w = grid
    img_ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    img_ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    img_ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    inputs = {"hidden_states": torch.randn(batch, h * w, config["in_channels"], **kw),
              "encoder_hidden_states": torch.randn(batch, n_txt, config["joint_attention_dim"], **kw),
              "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], **kw),
              "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
              "img_ids": img_ids.reshape(h * w, 3),
              "txt_ids": torch.zeros(n_txt, 3, device=device, dtype=dtype),
              "return_dict": False}
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return inputs


def step_fn(model, inputs: dict):
    def fn():
        with torch.no_grad():  # as diffusers pipelines do (inference_mode tensors break version-checked caches)
            out = model(**inputs)
        return out[0] if isinstance(out, tuple) else out.sample
    return fn


# ---------------------------------------------------------------------------------------- FASA variants
@contextlib.contextmanager
def eager_attention():
    """Route the adapters' ``fasa_attention`` calls to ``fasa_reference`` (eager, materialized scores) by
    rebinding the name in every loaded ``freecure_ops.adapters`` module (and the package itself). Yields a
    one-element list counting the calls that went through, so that a caller can tell whether it reached."""
    import freecure_ops
    from freecure_ops import FasaMask, api, fasa_reference

    calls = [0]

    def eager(q, k_p, k_f, v_p, v_f, mask=None, omega=1.0, *, scale=None, mode="bias", n_txt=0, backend="auto",
              return_lse=False):
        calls[0] += 1
        if isinstance(mask, FasaMask):  # the adapters hand over prepared masks; the authors' code had raw ones
            mask = mask.rows if mask.n_rows == q.shape[0] else mask.rows[0]
        return fasa_reference(q, k_p, k_f, v_p, v_f, mask, omega, scale=scale, mode=mode, n_txt=n_txt,
                              return_lse=return_lse)

    original, saved = api.fasa_attention, []
    targets = [freecure_ops, api] + [m for n, m in list(sys.modules.items())
                                      if n.startswith("freecure_ops.adapters") and m is not None]
    for mod in targets:
        if getattr(mod, "fasa_attention", None) is original:
            saved.append((mod, mod.fasa_attention))
            mod.fasa_attention = eager
    try:
        yield calls
    finally:
        for mod, fn in saved:
            mod.fasa_attention = fn


def _install(install_fasa, model, mask, *, layout):
    """Install FASA on the preset layers; fall back to every layer when the (block-reduced) model has no
    preset layers. Returns (handle, note)."""
    note = []
    kwargs = dict(layout=layout)
    try:
        handle = install_fasa(model, mask, **kwargs)
    except (ValueError, IndexError, KeyError) as e:
        handle = install_fasa(model, mask, layers="all", **kwargs)
        note.append(f"preset layers refused ({type(e).__name__}: {str(e)[:80]}); FASA on all layers")
    return handle, "; ".join(note)


def _variants(model, inputs, mask, layout, install_fasa, device, timing, log, model_name):
    """Rows for stock / fasa / eager on one model."""
    rows = []
    fn = step_fn(model, inputs)

    def measure_one(variant, note=""):
        try:
            peak = measure.peak_extra_mib(fn, device)
            ms = measure.time_ms(fn, device, **timing)
            out = fn()
            finite = bool(torch.isfinite(out).all())
            rows.append({"variant": variant, "ms": ms, "peak_mib": peak,
                         "note": note + ("" if finite else "; NON-FINITE OUTPUT")})
        except Exception as e:
            rows.append({"variant": variant, "ms": None, "peak_mib": None,
                         "note": f"error: {type(e).__name__}: {str(e)[:160]}"})
            log(f"# e2e {model_name} {variant}: {rows[-1]['note']}")

    measure_one("stock", "stock processors, dual batch")
    handle, note = _install(install_fasa, model, mask, layout=layout)
    try:
        measure_one("fasa", "install_fasa, backend=auto" + (f"; {note}" if note else ""))
    finally:
        handle.remove()
    handle, note = _install(install_fasa, model, mask, layout=layout)
    try:
        with eager_attention() as calls:
            fn()
            if calls[0] == 0:
                rows.append({"variant": "eager", "ms": None, "peak_mib": None,
                             "note": "the adapters' attention call could not be redirected to fasa_reference"})
            else:
                measure_one("eager", "install_fasa + fasa_reference in FASA layers" + (f"; {note}" if note else ""))
    finally:
        handle.remove()
    return rows


# ------------------------------------------------------------------------------ whole FreeCure generation
class _RowCounter:
    """Rows the denoiser processes over a generation (batch size summed over its forwards)."""

    def __init__(self, pipe):
        from freecure_ops.adapters.discovery import resolve_model

        self.rows = 0
        model, _ = resolve_model(pipe)
        self._h = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows += int(x.shape[0])

    def remove(self):
        self._h.remove()


def whole_generation(pipe, parser, prompt: str, fd_prompt: str, call: dict, *, device="cuda", fc_kwargs=None,
                     variants=("authors", "recompute", "reuse")) -> list:
    """One whole FreeCure generation (``call``: pipeline kwargs such as ``num_inference_steps``, ``height``,
    ``seed``...) three ways, timed once each after one warm-up run:

    - ``authors``: the reference code's structure: pass 1 runs PD and FD as one batch (the PD image is thrown
      away), the parser, pass 2 runs PD and FD as one batch with FASA computed eagerly (``fasa_reference``);
    - ``recompute``: ``FreeCure(fd_reuse="off")``: pass 1 FD only, pass 2 PD and FD with the fused op;
    - ``reuse``: ``FreeCure(fd_reuse="auto")``: pass 1 FD only (recording), pass 2 the PD rows alone.

    Rows: ``variant``, ``s`` (wall seconds), ``branch_passes`` (denoiser rows over the generation divided by
    one branch's rows: 4 / 3 / 2), ``peak_mib`` (CUDA only), ``fd_reuse`` (the choice)."""
    import time

    from freecure_ops.pipeline.freecure import FreeCure

    device = torch.device(device)
    call = dict(call)
    seed = call.pop("seed", 0)
    fc_kwargs = dict(fc_kwargs or {})

    def authors():
        fc = FreeCure(pipe, parser, fd_reuse="off", **fc_kwargs)
        n_lat = fc.initial_latents(1, *fc._size(call), torch.Generator().manual_seed(seed))
        fd_pt = pipe([prompt, fd_prompt], latents=torch.cat([n_lat, n_lat]), output_type="pt", **call).images[1:]
        mask, _ = fc.mask_from_fd(fd_pt, [fc._attributes({"prompt": prompt}, None, 1)[0]])
        with eager_attention():
            return fc(prompt, fd_prompt=fd_prompt, mask=mask, seed=seed, output_type="pt", **call)

    def ours(choice):
        return lambda: FreeCure(pipe, parser, fd_reuse=choice, **fc_kwargs)(prompt, fd_prompt=fd_prompt, seed=seed,
                                                                            output_type="pt", **call)

    runs = {"authors": authors, "recompute": ours("off"), "reuse": ours("auto")}
    plain = _RowCounter(pipe)
    try:
        pipe(fd_prompt, latents=None, generator=torch.Generator().manual_seed(seed), output_type="pt", **call)
    finally:
        plain.remove()
    rows = []
    for variant in variants:
        fn = runs[variant]
        fn()  # warm-up (compilation of kernels, caches)
        counter = _RowCounter(pipe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            counter.remove()
        rows.append({"variant": variant, "s": time.perf_counter() - t0,
                     "branch_passes": counter.rows / plain.rows,
                     "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                     "fd_reuse": (out.fd_reuse or {}).get("choice")})
    return rows


def why_not(device) -> str | None:
    """None when the end-to-end step can run, else the reason."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "it needs CUDA (full-size SDXL UNet, FLUX-width transformer)"
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        return f"diffusers is not importable ({e})"
    try:
        from freecure_ops.adapters import install_fasa  # noqa: F401
    except ImportError as e:
        return f"freecure_ops.adapters.install_fasa is not importable yet ({e})"
    return None


def run_e2e(out_dir, log=print, quick: bool = False, device="cuda") -> list:
    """Measure the end-to-end step; writes e2e.csv and e2e.txt under ``out_dir``; returns the rows."""
    reason = why_not(device)
    if reason:
        log(f"# end-to-end denoising step skipped: {reason}")
        return []
    import diffusers
    import triton
    from freecure_ops.adapters import install_fasa

    from .configs import FLUX_DEV, FLUX_GRID, FLUX_TEXT_TOKENS, SDXL_UNET

    diffusers.utils.logging.set_verbosity_error()  # no dtype-cast warnings for random-weight models
    device = torch.device(device)
    timing = E2E_TIMING_QUICK if quick else E2E_TIMING
    env = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
           "diffusers": diffusers.__version__}
    rows = []

    def add(model_name, blocks, dtype, new_rows):
        stock = next((r["ms"] for r in new_rows if r["variant"] == "stock" and r["ms"]), None)
        for r in new_rows:
            r.update(env, model=model_name, blocks=blocks, dtype=str(dtype).replace("torch.", ""),
                     x_stock=(r["ms"] / stock) if (stock and r["ms"]) else None)
            rows.append(r)
        _write(rows, Path(out_dir), lambda _: None)  # after every model: a time limit keeps what was measured

    # SDXL at 1024 px: latent 128 x 128, CFG batch of 4, fp16.
    try:
        dtype = torch.float16
        unet = build_unet(SDXL_UNET, device, dtype)
        mask = parsing_map(128, 128, MASK_COVERAGE) == 17
        inputs = unet_inputs(SDXL_UNET, SDXL_BATCH, (128, 128), device, dtype)
        add("sdxl", "all 70", dtype, _variants(unet, inputs, mask.to(device), "cfg", install_fasa, device, timing,
                                             log, "sdxl"))
        del unet, inputs
    except Exception as e:
        log(f"# e2e sdxl failed: {type(e).__name__}: {e}")
    torch.cuda.empty_cache()

    # FLUX.1-dev at 1024 px: 512 text + 64 x 64 image tokens, batch [PD, FD], bf16, full width, fewer blocks.
    try:
        dtype = torch.bfloat16
        mask = (parsing_map(*FLUX_GRID, MASK_COVERAGE) == 17).to(device)
        per = {}
        for n_double, n_single in ((1, 2), (2, 4)):
            cfg = {**FLUX_DEV, "num_layers": n_double, "num_single_layers": n_single}
            model = build_flux(cfg, device, dtype)
            inputs = flux_inputs(cfg, FLUX_BATCH, FLUX_GRID, FLUX_TEXT_TOKENS, device, dtype)
            got = _variants(model, inputs, mask, "plain", install_fasa, device, timing, log, "flux")
            per[(n_double, n_single)] = {r["variant"]: r for r in got}
            add("flux", f"{n_double}+{n_single}", dtype, got)
            del model, inputs
            torch.cuda.empty_cache()
        est = []
        for variant in ("stock", "fasa", "eager"):
            a, b = per[(1, 2)].get(variant), per[(2, 4)].get(variant)
            if a and b and a["ms"] and b["ms"]:
                est.append({"variant": variant, "ms": a["ms"] + 18 * (b["ms"] - a["ms"]), "peak_mib": None,
                            "note": "estimate for 19+38 blocks: t(1,2) + 18*(t(2,4) - t(1,2))"})
        add("flux", "19+38 (est.)", dtype, est)
    except Exception as e:
        log(f"# e2e flux failed: {type(e).__name__}: {e}")

    _write(rows, Path(out_dir), log)
    return rows


E2E_COLUMNS = ["device", "torch", "triton", "diffusers", "model", "blocks", "dtype", "variant", "ms", "peak_mib",
               "x_stock", "note"]


def _write(rows: list, out_dir: Path, log) -> None:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "e2e.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=E2E_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in E2E_COLUMNS})
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    lines = ["model  blocks        dtype     variant  ms/step   peak MiB  x stock  note"]
    for r in rows:
        lines.append(f"{r['model']:<6} {r['blocks']:<13} {r['dtype']:<9} {r['variant']:<8} "
                     f"{fmt(r['ms'], '{:.2f}'):<9} {fmt(r['peak_mib'], '{:.0f}'):<9} {fmt(r['x_stock'], '{:.2f}'):<8} "
                     f"{r['note']}")
    text = "\n".join(lines)
    (out_dir / "e2e.txt").write_text(text + "\n")
    log("\n# end-to-end: one denoising step\n" + text)


def main(argv=None) -> int:
    """``python -m bench.e2e [--out DIR] [--quick]``: the end-to-end step alone."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=main.__doc__)
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/<device>/")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    from .report import device_slug

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = args.out or Path(__file__).resolve().parent / "results" / device_slug(name)
    rows = run_e2e(out, log=lambda s: print(s, flush=True), quick=args.quick)
    return 1 if any(r["ms"] is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
