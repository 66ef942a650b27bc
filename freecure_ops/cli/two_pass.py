"""Pass 1 once, pass 2 at any omega, as ``sweep`` and ``demo`` run them: their shared checks of ``--model`` /
``--pipeline`` / the mask source (before anything loads), the loading of the two pipelines (``--model`` runs
pass 1, a ``--pipeline module:function`` pipeline pass 2: :mod:`.entry_point`), and :class:`TwoPass`, which
runs each pass with the commands' one-line errors. One place, so that the demo's image at an omega is the
sweep's (and ``generate``'s) at the same settings, and both refuse a problem in the same words."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from .args import (check_attribute_words, check_backend_device, check_mask_source, pick_device, torch_dtype)
from .errors import CLIError, flag_message
from .pipeline import load_parser, load_pipeline, show_warnings
from .weights import resolve_run_weights

__all__ = ["Plan", "require_model_or_pipeline", "check_pipeline_args", "load_pipelines", "TwoPass", "omega_text"]


@dataclass(frozen=True)
class Plan:
    """What the checks found: the mask array (None: a parser makes it), the resolved weights, the entry point,
    the device and dtype of --model (None without it)."""

    mask: object
    model: object
    parser: object
    entry: object
    device: object
    dtype: object


def omega_text(w: float) -> str:
    """An omega as a file name and label: the shortest text that reads back as the same float (1.0 -> "1")."""
    text = repr(float(w))
    return text[:-2] if text.endswith(".0") else text


def require_model_or_pipeline(args) -> None:
    if args.model is None and args.pipeline is None:
        raise CLIError("give --model (a pipeline folder or Hub id) or --pipeline module:function (or both)")


def check_pipeline_args(args, prompt: str | None) -> Plan:
    """The checks after the numbers: flags that need ``--model``, ``--pd-kwargs``, the mask source (and, for a
    parsed mask, an attribute word in ``prompt``; None: no prompt yet, the demo checks each one the page
    sends), the entry point, the device; Hub references resolve last (they may download). Raises CLIError."""
    from .entry_point import load_entry_point, reserved_pd_kwargs_problem

    if args.model is None:  # the entry point loads its own pipeline: these would do nothing
        for flag in ("revision", "variant", "device", "dtype"):
            if getattr(args, flag) is not None:
                raise CLIError(f"--{flag} applies to --model; the --pipeline function (without --model) chooses its "
                               "pipeline's weights, device and dtype")
    problem = reserved_pd_kwargs_problem(args.pd_kwargs or {})
    if problem:
        raise CLIError(f"--pd-kwargs {problem}")
    mask = check_mask_source(args)
    if mask is None and prompt is not None:
        check_attribute_words(prompt)
    entry = None if args.pipeline is None else load_entry_point(args.pipeline)
    device = dtype = None
    if args.model is not None:
        device = pick_device(args.device)
        check_backend_device(args.backend, device)
        dtype = torch_dtype(args.dtype, device)
    model, parser = resolve_run_weights(args)
    return Plan(mask=mask, model=model, parser=parser, entry=entry, device=device, dtype=dtype)


def load_pipelines(args, plan: Plan):
    """Load: ``(foundation pipeline, pass-2 pipeline, pass-2 kwargs, device, dtype)``."""
    from .entry_point import call_entry_point, pass2_pipeline_problem, unnamed_kwargs

    base = None if plan.model is None else load_pipeline(plan.model, plan.device, plan.dtype)
    pd_pipe, pd_kwargs = base, {}
    if plan.entry is not None:
        pd_pipe, pd_kwargs = call_entry_point(plan.entry, base)
    fd_pipe = base if base is not None else pd_pipe
    problem = pass2_pipeline_problem(fd_pipe, pd_pipe)
    if problem:
        raise CLIError(f"--pipeline {args.pipeline}: {problem}")
    for source, kwargs in ((f"--pipeline {args.pipeline}", pd_kwargs), ("--pd-kwargs", args.pd_kwargs or {})):
        unnamed, strict = unnamed_kwargs(pd_pipe, kwargs)
        what = f"{source}: {type(pd_pipe).__name__}.__call__ takes no {', '.join(unnamed)}"
        if unnamed and strict:
            raise CLIError(what)
        if unnamed:  # a typo would change nothing, silently: say so before anything runs
            print(f"freecure: warning: {what} by name (it takes **kwargs, and may ignore them)", file=sys.stderr)
    pd_kwargs = {**pd_kwargs, **(args.pd_kwargs or {})}  # the command line has the last word
    device, dtype = plan.device, plan.dtype
    if base is None:  # the function placed its pipeline: FASA runs where it is
        import torch

        from ..adapters.discovery import resolve_model

        denoiser, _ = resolve_model(fd_pipe)
        device, dtype = torch.device(fd_pipe.device), denoiser.dtype
        check_backend_device(args.backend, device)
    if args.quiet:
        for pipe in {id(fd_pipe): fd_pipe, id(pd_pipe): pd_pipe}.values():
            pipe.set_progress_bar_config(disable=True)
    return fd_pipe, pd_pipe, pd_kwargs, device, dtype


def _step_callback(pipe, on_step):
    """``on_step(step, total)`` as the pipeline's ``callback_on_step_end`` (None where its ``__call__`` names
    none: a personalization pipeline may not; the caller then sees whole passes only)."""
    import inspect

    if on_step is None:
        return None
    try:
        if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
            return None
    except (TypeError, ValueError):
        return None

    def callback(p, step, timestep, kwargs):
        on_step(step + 1, getattr(p, "num_timesteps", None))
        return kwargs  # unchanged: the images are the ones a run without the callback makes

    return callback


class TwoPass:
    """The loaded pipelines, the face parser and :class:`~freecure_ops.pipeline.freecure.FreeCure` of a sweep or
    a demo: :meth:`foundation` (pass 1) and :meth:`pass2` (FASA at one omega, from a foundation), each raising
    the commands' one-line :class:`~.errors.CLIError`."""

    def __init__(self, args, plan: Plan):
        from ..pipeline.apg import default_guidance_scale
        from ..pipeline.freecure import FreeCure

        t0 = time.perf_counter()
        self.fd_pipe, self.pd_pipe, self.pd_kwargs, self.device, self.dtype = load_pipelines(args, plan)
        parser = None if plan.parser is None else load_parser(plan.parser, self.device,
                                                               offline=args.offline or None)
        self.blame = f"--model {args.model}" if args.model is not None else f"--pipeline {args.pipeline}"
        try:
            self.fc = FreeCure(self.fd_pipe, parser, layers=args.layers, style_fidelity=args.style_fidelity,
                               mode=args.mode, backend=args.backend, empty_mask=args.empty_mask,
                               fd_reuse=args.fd_reuse)
        except (TypeError, ValueError) as e:
            raise CLIError(f"{self.blame}: {flag_message(str(e))}") from e
        self.pass2_blame = f"--pipeline {args.pipeline}" if args.pipeline is not None else \
            "--pd-kwargs" if args.pd_kwargs else self.blame
        self.default_guidance = default_guidance_scale(self.fd_pipe)
        self.height, self.width = args.height, args.width
        self.mask = None
        if plan.mask is not None:
            import torch

            self.mask = torch.from_numpy(plan.mask)
        self.load_s = time.perf_counter() - t0

    def common(self, steps: int, guidance_scale: float | None, negative_prompt: str | None) -> dict:
        """Pass 1's pipeline arguments besides the prompt; one guidance scale for both passes, said explicitly (a
        personalization pipeline's default may differ)."""
        gs = guidance_scale if guidance_scale is not None else self.default_guidance
        out = dict(num_inference_steps=steps, guidance_scale=gs)
        for key, value in (("negative_prompt", negative_prompt), ("height", self.height), ("width", self.width)):
            if value is not None:
                out[key] = value
        return out

    @staticmethod
    def pass2_common(common: dict) -> dict:
        """Pass 2's share of :meth:`common` (``Foundation.run`` adds the steps, the size and the noise)."""
        return {k: v for k, v in common.items() if k in ("guidance_scale", "negative_prompt")}

    def foundation(self, fd_prompt: str, prompt: str, seed: int, common: dict, *, seed_flag: str, on_step=None,
                   warn=None):
        """Pass 1 (FD image, mask, FD keys/values); its attributes are read from the PD ``prompt``, as
        ``generate`` does. ``on_step(step, total)``: progress, where the pipeline can report it; ``warn``: where
        FreeCure's warnings go, as one line each (default: stderr)."""
        from ..pipeline.freecure import EmptyMaskError, FreeCureWarning

        extra = {}
        callback = _step_callback(self.fd_pipe, on_step)
        if callback is not None:
            extra["callback_on_step_end"] = callback
        with show_warnings(FreeCureWarning, warn):
            try:
                return self.fc.foundation(fd_prompt, seed=seed, mask=self.mask, attribute_prompt=prompt,
                                          output_type="pil", **common, **extra)
            except EmptyMaskError as e:
                raise CLIError(f"{seed_flag} {seed}: {flag_message(str(e))}") from e
            except (TypeError, ValueError) as e:
                raise CLIError(f"{self.blame}: {flag_message(str(e))}") from e

    def pass2(self, found, prompt: str, omega: float, seed: int, common: dict, *, on_step=None):
        """Pass 2 at ``omega`` from ``found``: ``(the PD image, seconds)``."""
        extra = {}
        callback = _step_callback(self.pd_pipe, on_step)
        if callback is not None and "callback_on_step_end" not in self.pd_kwargs:  # the user's own wins
            extra["callback_on_step_end"] = callback
        t0 = time.perf_counter()
        try:
            out = found.run(self.pd_pipe, prompt=prompt, omega=omega, output_type="pil", **self.pass2_common(common),
                            **self.pd_kwargs, **extra)
        except (TypeError, ValueError) as e:  # the pass-2 pipeline or its arguments do not fit
            raise CLIError(f"{self.pass2_blame}: pass 2 (seed {seed}, omega {omega_text(omega)}): "
                           f"{flag_message(str(e))}") from e
        return out.images[0], time.perf_counter() - t0
