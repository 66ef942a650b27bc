"""The diffusers pipeline as ``generate`` and ``batch`` use it: loading it (and the face parser) from what
:mod:`.weights` resolved, keeping the libraries quiet, the settings that actually ran, saving the attribute mask."""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..outputs import atomic_write
from .errors import CLIError, flag_message

__all__ = ["load_pipeline", "load_parser", "quiet_libraries", "show_warnings", "effective_settings", "save_mask",
           "library_versions"]


def load_pipeline(model, device, dtype):
    """``DiffusionPipeline.from_pretrained`` of the resolved ``--model`` (:class:`~.weights.Weights`: a local
    folder, or the snapshot folder of a Hub id that the checks resolved) on ``device``; CLIError naming
    ``--model`` when it cannot load."""
    from diffusers import DiffusionPipeline

    kwargs = {} if model.variant is None else {"variant": model.variant}
    try:
        # dtype=: diffusers >= 0.42 (the floor) takes it and deprecates torch_dtype
        pipe = DiffusionPipeline.from_pretrained(str(model.path), local_files_only=True, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:  # EnvironmentError, missing files, a variant it does not have
        where = f"the Hugging Face cache ({model.path})" if model.hub else "the folder"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"--model {model.spec}: could not load the pipeline weights from {where}: {first}") from e
    return pipe.to(device)


def load_parser(parser, device, offline=None):
    """The face parser of the resolved ``--parser-weights`` (:class:`~.weights.Weights`) on ``device``
    (:func:`freecure_ops.pipeline.parsers.load_face_parser`: a checkpoint file -> BiSeNet, a model -> SegFormer;
    a Hub SegFormer id loads at the commit the checks found). CLIError naming ``--parser-weights``."""
    from ..pipeline.parsers import load_face_parser
    from .args import parser_weights_error

    if parser.hub and parser.path.is_dir():  # a SegFormer id: its weights come now, at the checked commit
        spec, revision = parser.spec, parser.commit
    else:
        spec, revision = str(parser.path), None
    try:
        return load_face_parser(spec, revision=revision, offline=offline, device=device)
    except (ValueError, OSError) as e:
        raise parser_weights_error(parser.spec, e) from e


@contextmanager
def quiet_libraries(quiet: bool):
    """--quiet: no loading bars or notes from diffusers / transformers; their settings are restored after."""
    if not quiet:
        yield
        return
    libs = []
    try:
        from diffusers.utils import logging as d_log

        libs.append(d_log)
    except ImportError:  # freecure eval needs transformers only
        pass
    try:
        from transformers.utils import logging as t_log

        libs.append(t_log)
    except ImportError:  # pragma: no cover
        pass
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    for lib in libs:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    from huggingface_hub import utils as hf_utils  # download bars (a Hub model's weights)

    hub_bars = not hf_utils.are_progress_bars_disabled()
    hf_utils.disable_progress_bars()
    try:
        yield
    finally:
        for lib, (level, bars) in zip(libs, saved):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()
        if hub_bars:
            hf_utils.enable_progress_bars()


@contextmanager
def show_warnings(category, sink=None):
    """Warnings of ``category`` (e.g. FreeCureWarning) inside the block as ``freecure: warning: ...`` lines, in
    the flags' words, every time (a sweep's second seed warns too); ``sink(text)``: where the text goes
    instead (the demo page shows it)."""
    def show(message, category, filename, lineno, file=None, line=None):
        if sink is not None:
            sink(flag_message(str(message)))
        else:
            print(f"freecure: warning: {flag_message(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", category)
        old_show, warnings.showwarning = warnings.showwarning, show
        try:
            yield
        finally:
            warnings.showwarning = old_show


def effective_settings(fc, pipe, args, device, dtype, call) -> dict:
    """What actually ran: preset values filled in, the resolved backend, the pipeline's defaults."""
    from ..adapters.discovery import find_self_attention_blocks
    from ..adapters.presets import PRESETS, preset_blocks
    from ..pipeline.apg import default_guidance_scale

    blocks = find_self_attention_blocks(pipe)
    if args.layers is None:
        layers = list(preset_blocks(fc.family, blocks))
    elif args.layers == "all":
        layers = [b.index for b in blocks]
    else:
        layers = list(args.layers)
    height, width = fc._size({k: call[k] for k in ("height", "width") if k in call})
    gs = call.get("guidance_scale", default_guidance_scale(pipe))
    return dict(omega=PRESETS[fc.family].omega if args.omega is None else args.omega,
                omega_source="preset" if args.omega is None else "--omega",
                layers=layers, layers_source="preset" if args.layers is None else "--layers",
                mode=args.mode, backend=("triton" if device.type == "cuda" else "torch") if args.backend == "auto"
                else args.backend, style_fidelity=args.style_fidelity, guidance_scale=float(gs),
                height=height, width=width, empty_mask=args.empty_mask)


def save_mask(mask, path: Path) -> None:
    """The attribute mask as an 8-bit PNG (brightest = 255), written atomically."""
    import numpy as np
    from PIL import Image

    m = mask.detach().float().cpu()
    if m.dim() == 3:
        m = m[0]
    m = (m / m.max()).nan_to_num(0.0) if float(m.max()) > 0 else m
    img = Image.fromarray((m.clamp(0, 1).numpy() * 255).round().astype(np.uint8), mode="L")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def library_versions() -> dict:
    """The versions a run's JSON records (None for a library that is not installed)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("freecure-ops", "torch", "diffusers", "transformers", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
