"""End-to-end measurements. ``python -m freecure_ops.bench.e2e [--device cuda|cpu] [--what step,generation]``.

**generation** (CPU or CUDA): whole FreeCure generations on an SD1.5-shaped ``StableDiffusionPipeline`` with
random weights (:func:`build_sd15_pipeline`; CUDA: SD1.5's widths at 512 px, fp16; CPU: a quarter of the widths
at 256 px, fp32, so that a run takes minutes on 2 shared cores), three ways with the same seed, steps and mask
(:func:`whole_generation`): ``authors`` (two full dual-batch passes, FASA computed eagerly the authors' way: 4
branch-passes), ``recompute`` (``FreeCure(fd_reuse="off")``: 3) and ``reuse`` (``fd_reuse="device"``: 2). It
reports median wall seconds, the ratios to ``reuse``, the seconds spent in the denoiser, and the branch-passes
counted from the denoiser's forward batch sizes; ``e2e_generation.csv`` / ``.txt``.

**step** (CUDA only): one denoising step: the full-size SDXL UNet, and the FLUX.1-dev transformer at full
width with fewer blocks, random weights built directly on the GPU. Three variants per model:

- ``stock``: the unmodified model on the dual batch (PD and FD rows), i.e. FreeCure's batch without FASA;
- ``fasa``: ``freecure_ops.adapters.install_fasa`` on the preset layers (Triton kernel);
- ``eager``: the same adapters with the attention computed the authors' way (:func:`authors_fasa`: eager,
  materialized scores, input-dtype softmax), i.e. the structure of the reference code.

FLUX is measured at (1 double + 2 single) and (2 double + 4 single) blocks; the full 19 + 38 estimate is
``t(1,2) + 18 * (t(2,4) - t(1,2))`` (the blocks' cost is linear in their count; embedders counted once).
Needs CUDA and ``freecure_ops.adapters.install_fasa``; otherwise it says why and returns nothing.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
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
def authors_fasa(q, k_p, k_f, v_p, v_f, mask, omega, *, scale=None, n_txt=0):
    """FASA the way the authors' released code computes it (``attn_batch``; the ``authors`` provider of
    ``bench/providers.py``): PD and FD scores by einsum in the input dtype, the FD scores biased by
    ``omega * m`` and -inf outside the mask (and, FLUX, for text query rows and FD text keys), one softmax over
    ``[PD, FD]`` in the input dtype, einsum with ``[V_p; V_f]``. ``mask``: ``[Nimg]`` or ``[B, Nimg]`` (bias
    mode only)."""
    b, _, n_q, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    m = mask.to(q.dtype).reshape(-1, mask.shape[-1])                        # [R, Nimg], R = 1 or B
    bias = torch.where(m > 0, omega * m, torch.full_like(m, float("-inf")))
    if n_txt:  # FD text keys are never attended
        bias = torch.cat([torch.full_like(bias[:, :1], float("-inf")).expand(-1, n_txt), bias], dim=1)
    bias = bias[:, None, None, :]                                           # [R, 1, 1, Nf]
    if n_txt:  # text query rows see no FD key
        rows = (torch.arange(n_q, device=q.device) < n_txt)[:, None]
        bias = bias.masked_fill(rows, float("-inf"))
    s_p = torch.einsum("bhqd,bhkd->bhqk", q, k_p) * scale
    s_f = torch.einsum("bhqd,bhkd->bhqk", q, k_f) * scale + bias
    probs = torch.cat([s_p, s_f], dim=-1).softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, torch.cat([v_p, v_f], dim=2))


@contextlib.contextmanager
def eager_attention(impl: str = "authors"):
    """Route the adapters' ``fasa_attention`` calls to eager attention with materialized scores, by rebinding
    the name in every loaded ``freecure_ops.adapters`` module (and the package itself): ``impl="authors"``
    (default) the authors' math (:func:`authors_fasa`, input-dtype softmax; calls it cannot express, "scale"
    mode or ``return_lse``, go to ``fasa_reference``), ``impl="reference"`` ``fasa_reference`` (float32
    softmax, checks). Yields a one-element list counting the calls that went through, so that a caller can tell
    whether it reached."""
    import freecure_ops
    from freecure_ops import FasaMask, api, fasa_reference

    if impl not in ("authors", "reference"):
        raise ValueError(f"impl must be 'authors' or 'reference', got {impl!r}")
    calls = [0]

    def eager(q, k_p, k_f, v_p, v_f, mask=None, omega=1.0, *, scale=None, mode="bias", n_txt=0, backend="auto",
              return_lse=False):
        calls[0] += 1
        if isinstance(mask, FasaMask):  # the adapters hand over prepared masks; the authors' code had raw ones
            mask = mask.rows if mask.n_rows == q.shape[0] else mask.rows[0]
        if impl == "authors" and mode == "bias" and not return_lse and mask is not None:
            return authors_fasa(q, k_p, k_f, v_p, v_f, mask, float(omega), scale=scale, n_txt=n_txt)
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
                             "note": "the adapters' attention call could not be redirected to eager attention"})
            else:
                measure_one("eager", "install_fasa + the authors' eager FASA in FASA layers"
                            + (f"; {note}" if note else ""))
    finally:
        handle.remove()
    return rows


# ------------------------------------------------------------------------------ whole FreeCure generation
class _RowCounter:
    """What the denoiser does over a generation: forwards, rows (batch size summed over its forwards) and the
    time spent inside its forwards (CPU: wall clock between its pre- and post-hook; CUDA: events recorded there,
    read after the caller's final synchronize)."""

    def __init__(self, pipe):
        from freecure_ops.adapters.discovery import resolve_model

        self.rows = self.forwards = 0
        self._wall = 0.0
        self._events = []
        self._t0 = None
        model, _ = resolve_model(pipe)
        self._cuda = next(model.parameters()).device.type == "cuda"
        self._h = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                   model.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows += int(x.shape[0])
        self.forwards += 1
        if self._cuda:
            self._events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self._events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        if self._cuda:
            self._events[-1][1].record()
        else:
            self._wall += time.perf_counter() - self._t0

    def seconds(self) -> float:
        """Seconds inside the denoiser's forwards (CUDA: call after synchronizing)."""
        if self._cuda:
            return sum(a.elapsed_time(b) for a, b in self._events) / 1e3
        return self._wall

    def remove(self):
        for h in self._h:
            h.remove()


class SyntheticParser:
    """A face-parser stand-in for benchmarks with random weights: the label map does not depend on the image,
    only on its size (``bench.masks.parsing_map``: a hair-like region, label 17, covering ``coverage`` of the
    pixels), so that every variant gets the same mask. Its cost (a cached lookup) is negligible, as a real
    parser's single forward per image is next to a generation's."""

    def __init__(self, coverage: float = 0.25, seed: int = 0):
        self.coverage, self.seed = coverage, seed
        self._cache = {}

    def __call__(self, image):
        h, w = image.shape[-2:]
        if (h, w) not in self._cache:
            self._cache[(h, w)] = parsing_map(h, w, self.coverage, self.seed)
        return self._cache[(h, w)].clone()


VARIANTS = ("authors", "recompute", "reuse")
EXPECTED_BRANCH_PASSES = {"authors": 4, "recompute": 3, "reuse": 2}


def whole_generation(pipe, parser, prompt: str, fd_prompt: str, call: dict, *, device="cuda", fc_kwargs=None,
                     variants=VARIANTS, repeats: int = 1, warmup: int = 1, log=None) -> list:
    """One whole FreeCure generation (``call``: pipeline kwargs such as ``num_inference_steps``, ``height``,
    ``seed``...) three ways:

    - ``authors``: the reference code's structure: pass 1 runs PD and FD as one batch (the PD image is thrown
      away), the parser, pass 2 runs PD and FD as one batch with FASA computed the authors' way (eager einsum
      and softmax, :func:`eager_attention`): 4 branch-passes;
    - ``recompute``: ``FreeCure(fd_reuse="off")``: pass 1 FD only, pass 2 PD and FD with the library's op: 3;
    - ``reuse``: ``FreeCure(fd_reuse="device")``: pass 1 FD only (recording), pass 2 the PD rows alone: 2.

    ``warmup`` untimed rounds, then ``repeats`` timed rounds; each round runs every variant once, interleaved
    (authors, recompute, reuse, authors, ...) so that a drift in the machine's load hits all alike.

    Rows: ``variant``, ``s`` (median wall seconds), ``s_runs`` (every timed run), ``denoiser_s`` (median
    seconds inside the denoiser's forwards), ``denoiser_share``, ``branch_passes`` (denoiser rows over the
    generation divided by the rows of one plain single-branch generation, counted by a forward pre-hook in
    every timed run; the row holds the first count and ``counts_agree`` whether every run counted the same),
    ``forwards`` and ``rows`` (of the denoiser, one run), ``peak_mib`` (CUDA only), ``fd_reuse`` (the choice
    FreeCure reported), ``cpu_s`` (median process CPU seconds, all threads: less sensitive than the wall
    clock to other processes on a shared CPU), ``pd`` (the PD image of the last run, ``[1, 3, H, W]`` float
    in [0, 1]), ``mask`` (the attribute mask used), ``plain_pd`` (the PD prompt's image without FreeCure, in
    the first row only)."""
    from freecure_ops.pipeline.freecure import FreeCure, step_generators

    device = torch.device(device)
    call = dict(call)
    seed = call.pop("seed", 0)
    fc_kwargs = dict(fc_kwargs or {})
    log = log or (lambda s: None)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {VARIANTS}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")

    def authors():
        fc = FreeCure(pipe, parser, fd_reuse="off", **fc_kwargs)
        lat, seeds = fc.noise(1, *fc._size(call), seed=seed)
        both = pipe([prompt, fd_prompt], latents=torch.cat([lat, lat]), generator=step_generators(seeds + seeds),
                    output_type="pt", **call).images
        mask, _ = fc.mask_from_fd(both[1:], [fc._attributes({"prompt": prompt}, None, 1)[0]])
        with eager_attention() as calls:
            out = fc(prompt, fd_prompt=fd_prompt, mask=mask, seed=seed, output_type="pt", **call)
        if calls[0] == 0:
            raise RuntimeError("authors: no FASA call reached the eager attention")
        return out

    def ours(choice):
        return lambda: FreeCure(pipe, parser, fd_reuse=choice, **fc_kwargs)(prompt, fd_prompt=fd_prompt, seed=seed,
                                                                            output_type="pt", **call)

    runs = {"authors": authors, "recompute": ours("off"), "reuse": ours("device")}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # One plain single-branch generation (PD prompt, no FreeCure): the unit of the branch-pass count, and the
    # image FASA must move the PD image away from.
    plain = _RowCounter(pipe)
    try:
        fc = FreeCure(pipe, parser, **fc_kwargs)
        lat, seeds = fc.noise(1, *fc._size(call), seed=seed)
        plain_pd = pipe(prompt, latents=lat, generator=step_generators(seeds), output_type="pt", **call).images
    finally:
        plain.remove()
    if plain.rows == 0:
        raise RuntimeError("the denoiser's forward pre-hook saw no rows: cannot count branch-passes")

    for r in range(warmup):
        for variant in variants:
            log(f"# e2e warm-up {r + 1}/{warmup}: {variant}")
            runs[variant]()
    got = {v: {"s": [], "cpu": [], "den": [], "bp": [], "fw": [], "rows": [], "peak": []} for v in variants}
    last = {}
    for r in range(repeats):
        for variant in variants:
            counter = _RowCounter(pipe)
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                out = runs[variant]()
                sync()
                s, cpu = time.perf_counter() - t0, time.process_time() - c0
            finally:
                counter.remove()
            g = got[variant]
            g["s"].append(s)
            g["cpu"].append(cpu)
            g["den"].append(counter.seconds())
            g["bp"].append(counter.rows / plain.rows)
            g["fw"].append(counter.forwards)
            g["rows"].append(counter.rows)
            g["peak"].append(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None)
            last[variant] = out
            log(f"# e2e run {r + 1}/{repeats}: {variant} {s:.2f} s ({counter.seconds():.2f} s in the denoiser, "
                f"{counter.rows / plain.rows:g} branch-passes)")
    rows = []
    for variant in variants:
        g, out = got[variant], last[variant]
        s, den = statistics.median(g["s"]), statistics.median(g["den"])
        rows.append({"variant": variant, "s": s, "s_runs": g["s"], "cpu_s": statistics.median(g["cpu"]),
                     "denoiser_s": den,
                     "denoiser_share": den / s if s > 0 else None,
                     "branch_passes": g["bp"][0], "counts_agree": len(set(g["bp"])) == 1,
                     "forwards": g["fw"][0], "rows": g["rows"][0],
                     "peak_mib": max(g["peak"]) if device.type == "cuda" else None,
                     "fd_reuse": (out.fd_reuse or {}).get("choice"),
                     "pd": out.images[:1].detach().float().cpu(), "mask": out.mask,
                     "plain_pd": plain_pd[:1].detach().float().cpu() if not rows else None})
    return rows


# ------------------------------------------------------------------------ the benchmark's SD1.5-style pipeline
# Widths of SD1.5's UNet and a reduced variant with the same shape: 4 stages, 2 resnets + 2 transformer blocks
# per stage (16 self-attention layers, so the SD1.x preset blocks 10..15 apply as on the real model), SD1.5's
# head dims 40 / 80 / 160 (fewer heads), cross-attention from 768-wide text states over 77 tokens.
SD15_WIDTHS = (320, 640, 1280, 1280)
SD15_HEADS = 8
CPU_WIDTHS = (80, 160, 320, 320)   # a quarter of SD1.5's widths, 2 heads: head dims 40 / 80 / 160
CPU_HEADS = 2
TEXT_WORDS = ("a", "photo", "of", "person", "man", "woman", "sks", "with", "red", "blue", "hair", "eyes", "and",
              "glasses", "smiling", "wearing", "hat", "the")
PROMPT = "a photo of sks man with red hair"
FD_PROMPT = "a photo of a man with red hair"


def word_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer over an in-memory vocabulary of :data:`TEXT_WORDS` (no download). The tests' tiny
    pipelines use it too."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for w in TEXT_WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        for p in parts:
            vocab.setdefault(p, len(vocab))
        piece = parts[0]
        for nxt in parts[1:]:
            if (piece, nxt) not in merges:
                merges.append((piece, nxt))
            piece += nxt
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_sd15_pipeline(widths=CPU_WIDTHS, heads=CPU_HEADS, *, device="cpu", dtype=torch.float32, seed=0):
    """A StableDiffusionPipeline with random weights built offline: the UNet is SD1.5's architecture
    (``bench.configs.SD15_UNET``) at ``widths`` / ``heads``; the text encoder (one CLIP layer, 768 wide, 77
    tokens) and the VAE (4 stages of 16 channels: 8x down-sampling like SD's) are small, as the denoiser
    dominates a generation (the benchmark reports its share). DDIM as SD1.5 ships."""
    import math

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .configs import SD15_UNET

    tok = word_tokenizer()
    torch.manual_seed(seed)
    groups = math.gcd(32, *widths)
    with torch.device(device):
        unet = UNet2DConditionModel(**dict(SD15_UNET, block_out_channels=tuple(widths), attention_head_dim=heads,
                                           norm_num_groups=groups))
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=SD15_UNET["cross_attention_dim"],
                                            intermediate_size=1024, num_hidden_layers=1, num_attention_heads=12,
                                            max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                            pad_token_id=1))
        vae = AutoencoderKL(block_out_channels=(16,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for m in (unet, text, vae):
        m.eval().requires_grad_(False)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def machine_info(device) -> dict:
    """The machine and library versions of a run (CPU model, cores, threads; GPU name on CUDA)."""
    import os
    import platform

    import diffusers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    device = torch.device(device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu": cpu, "cores": cores, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


GEN_COLUMNS = ["device", "cpu", "cores", "threads", "python", "torch", "diffusers", "transformers", "model", "image",
               "latent", "dtype", "steps", "fasa_layers", "mask_coverage", "warmup", "repeats", "variant",
               "s", "s_runs", "x_reuse", "cpu_s", "cpu_x_reuse", "denoiser_s", "denoiser_share", "branch_passes",
               "counts_agree",
               "forwards", "rows", "fd_reuse", "pd_max_diff_vs_reuse", "peak_mib"]


def run_generation(out_dir, *, device="cpu", widths=None, heads=None, image=None, steps=None, repeats=None,
                   warmup=None, dtype=None, log=print) -> list:
    """Whole FreeCure generations three ways (:func:`whole_generation`) on :func:`build_sd15_pipeline`, written
    to ``out_dir/e2e_generation.csv`` and ``.txt``. Defaults: CPU: the quarter-width SD1.5-shaped UNet at
    256 px, 3 steps, 9 timed rounds (other jobs on a shared CPU slow single runs 5-25x), no warm-up round
    (the plain generation before the rounds runs the denoiser first, nothing compiles on CPU, and a warm-up
    round would cost as much as a timed one), fp32; CUDA: SD1.5's
    widths at 512 px, 20 steps, 5 rounds after 1 warm-up round (Triton compiles there), fp16. Returns the rows
    (without images)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    widths = tuple(widths or (SD15_WIDTHS if cuda else CPU_WIDTHS))
    heads = heads or (SD15_HEADS if cuda else CPU_HEADS)
    image = image or (512 if cuda else 256)
    steps = steps or (20 if cuda else 3)
    repeats = repeats or (5 if cuda else 9)
    warmup = (1 if cuda else 0) if warmup is None else warmup
    dtype = dtype or (torch.float16 if cuda else torch.float32)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    info = machine_info(device)
    t0 = time.perf_counter()
    pipe = build_sd15_pipeline(widths, heads, device=device, dtype=dtype)
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    model = (f"SD1.5 UNet{' (full widths)' if widths == SD15_WIDTHS else ''} widths {','.join(map(str, widths))} "
             f"x{heads} heads, {n_params / 1e6:.0f}M params")
    log(f"# e2e generation: {model}, {image} px, {steps} steps, {warmup} warm-up + {repeats} timed rounds on "
        f"{info['device']} ({info['cpu']}, {info['cores']} cores); built in {time.perf_counter() - t0:.1f} s")
    rows = whole_generation(pipe, SyntheticParser(0.25), PROMPT, FD_PROMPT,
                            dict(num_inference_steps=steps, height=image, width=image, seed=0), device=device,
                            repeats=repeats, warmup=warmup, log=log)
    reuse = next(r for r in rows if r["variant"] == "reuse")
    from freecure_ops.adapters.presets import PRESETS

    preset = PRESETS["sd1"]
    fasa_layers = f"SD1.x preset: {preset.description.split(' (')[0]}, omega {preset.omega}"
    out = []
    for r in rows:
        mask = r["mask"]
        out.append({**info, "model": model, "image": image, "latent": image // pipe.vae_scale_factor,
                    "dtype": str(dtype).replace("torch.", ""), "steps": steps, "fasa_layers": fasa_layers,
                    "mask_coverage": float((mask > 0).float().mean()) if mask is not None else None,
                    "warmup": warmup, "repeats": repeats,
                    **{k: r[k] for k in ("variant", "s", "cpu_s", "denoiser_s", "denoiser_share", "branch_passes",
                                         "counts_agree", "forwards", "rows", "fd_reuse", "peak_mib")},
                    "s_runs": " ".join(f"{x:.3f}" for x in r["s_runs"]),
                    "x_reuse": r["s"] / reuse["s"], "cpu_x_reuse": r["cpu_s"] / reuse["cpu_s"],
                    "pd_max_diff_vs_reuse": float((r["pd"] - reuse["pd"]).abs().max())})
    write_generation(out, Path(out_dir), log)
    return out


def _write_csv(path: Path, rows: list, columns) -> None:
    """``rows`` as CSV with ``columns`` (None written as an empty cell), the folder created."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def write_generation(rows: list, out_dir: Path, log=print) -> None:
    _write_csv(out_dir / "e2e_generation.csv", rows, GEN_COLUMNS)
    r0 = rows[0]
    runs_w = max(8, *(len(r["s_runs"]) for r in rows))
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    lines = [f"# whole FreeCure generation, three ways (python -m freecure_ops.bench.e2e)",
             f"machine: {r0['device']}; CPU {r0['cpu']}, {r0['cores']} cores, {r0['threads']} torch threads",
             f"versions: python {r0['python']}, torch {r0['torch']}, diffusers {r0['diffusers']}"
             + (f", transformers {r0['transformers']}" if r0.get("transformers") else ""),
             f"model: {r0['model']}, random weights; {r0['image']} px (latent {r0['latent']}), {r0['dtype']}, "
             f"{r0['steps']} DDIM steps, CFG; FASA on the {r0['fasa_layers']}; mask coverage "
             f"{fmt(r0['mask_coverage'], '{:.0%}')}",
             f"timing: median of {r0['repeats']} interleaved rounds after {r0['warmup']} warm-up round(s); "
             "wall seconds of the whole generation (text encoding, both passes, parser, VAE decodes)",
             "",
             f"variant    branch-passes  s (median)  {'runs (s)':<{runs_w}} x reuse  cpu s    denoiser s  share  "
             "fd_reuse  PD max diff vs reuse"]
    for r in rows:
        lines.append(f"{r['variant']:<10} {fmt(r['branch_passes'], '{:g}'):<14} {fmt(r['s'], '{:.2f}'):<11} "
                     f"{r['s_runs']:<{runs_w}} {fmt(r['x_reuse'], '{:.2f}'):<8} {fmt(r['cpu_s'], '{:.1f}'):<8} "
                     f"{fmt(r['denoiser_s'], '{:.2f}'):<11} "
                     f"{fmt(r['denoiser_share'], '{:.0%}'):<6} {str(r['fd_reuse']):<9} "
                     f"{fmt(r['pd_max_diff_vs_reuse'], '{:.1e}')}")
    by = {r["variant"]: r for r in rows}
    if "reuse" in by:
        ratios = [f"{v}/reuse = {by[v]['s'] / by['reuse']['s']:.2f}" for v in ("authors", "recompute") if v in by]
        cpu = [f"{v}/reuse = {by[v]['cpu_s'] / by['reuse']['cpu_s']:.2f}" for v in ("authors", "recompute") if v in by]
        lines += ["", "ratios (median wall time): " + ", ".join(ratios),
                  "for reference, ratios of median process CPU seconds: " + ", ".join(cpu)]
    if not all(r["counts_agree"] for r in rows):
        lines.append("WARNING: the branch-pass count differed between runs of a variant")
    text = "\n".join(lines)
    (out_dir / "e2e_generation.txt").write_text(text + "\n")
    log("\n" + text)


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
    _write_csv(out_dir / "e2e.csv", rows, E2E_COLUMNS)
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
    """``python -m freecure_ops.bench.e2e [--device cuda|cpu] [--out DIR] [--quick] [--what step,generation]``:
    the end-to-end measurements. ``step`` (CUDA only): one denoising step of the full-size SDXL UNet and the
    FLUX-width transformer, stock / fasa / eager (e2e.csv, e2e.txt). ``generation``: whole FreeCure generations
    on an SD1.5-shaped pipeline with random weights, authors / recompute / reuse, wall time, ratios and
    counted branch-passes (e2e_generation.csv, e2e_generation.txt)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m freecure_ops.bench.e2e", description=main.__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda (default when CUDA exists) or cpu")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/<device>/ (cpu: bench/results/cpu/)")
    ap.add_argument("--quick", action="store_true", help="shorter timings; generation: fewer steps and rounds")
    ap.add_argument("--what", default="step,generation", help="comma list of step, generation")
    ap.add_argument("--widths", default=None, help="generation: UNet block widths, e.g. 320,640,1280,1280")
    ap.add_argument("--heads", type=int, default=None, help="generation: attention heads (SD1.5: 8)")
    ap.add_argument("--image", type=int, default=None, help="generation: image side in pixels (multiple of 64)")
    ap.add_argument("--steps", type=int, default=None, help="generation: denoising steps")
    ap.add_argument("--repeats", type=int, default=None, help="generation: timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="generation: untimed rounds first (default: CUDA 1, CPU 0)")
    args = ap.parse_args(argv)
    what = {w.strip() for w in args.what.split(",") if w.strip()}
    if not what or what - {"step", "generation"}:
        ap.error(f"--what takes step and/or generation, got {args.what!r}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        ap.error(f"--device must be cuda or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here (use --device cpu)")
    if args.image is not None and (args.image < 64 or args.image % 64):
        ap.error("--image must be a multiple of 64 (8x VAE down-sampling, 3 UNet down-samplings)")
    widths = None
    if args.widths:
        try:
            widths = tuple(int(w) for w in args.widths.split(","))
        except ValueError:
            ap.error(f"--widths takes 4 integers, got {args.widths!r}")
        if len(widths) != 4:
            ap.error(f"--widths takes 4 integers (SD1.5's 4 stages), got {args.widths!r}")
    from .report import device_slug

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = args.out or Path(__file__).resolve().parent / "results" / device_slug(name)
    say = lambda s: print(s, flush=True)  # noqa: E731
    rc = 0
    if "step" in what:
        rows = run_e2e(out, log=say, quick=args.quick, device=device)
        rc |= any(r["ms"] is None for r in rows)
    if "generation" in what:
        quick = dict(steps=8, repeats=2) if (args.quick and device.type == "cuda") else \
            dict(steps=2, repeats=1) if args.quick else {}
        rows = run_generation(out, device=device, widths=widths, heads=args.heads, image=args.image,
                              steps=args.steps or quick.get("steps"), repeats=args.repeats or quick.get("repeats"),
                              warmup=args.warmup, log=say)
        bad = [r["variant"] for r in rows
               if r["branch_passes"] != EXPECTED_BRANCH_PASSES[r["variant"]] or not r["counts_agree"]]
        if bad:
            say(f"# e2e generation: unexpected branch-pass counts for {bad}")
            rc = 1
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
