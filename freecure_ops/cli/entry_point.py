"""``--pipeline module:function``: a personalization pipeline (PhotoMaker, InstantID, a LoRA'd SDXL, ...)
built by a few lines of the user's own Python, for the commands that run FASA on it.

``module`` is imported as ``python -m`` would (the current folder first), or is a ``.py`` file path;
``function`` is called with one argument, the pipeline ``--model`` loaded (on ``--device`` in ``--dtype``,
so that ``PhotoMakerStableDiffusionXLPipeline.from_pipe(base)`` shares its weights), or None without
``--model``; a function of no parameters is called with none. It returns a diffusers pipeline, or
``(pipeline, dict)``: the dict holds pass-2 keyword arguments that need Python objects (``input_id_images``,
``image_embeds``, a ControlNet ``image``). Everything that can go wrong is one :class:`~.errors.CLIError`
naming ``--pipeline``: the import and the function's signature before any model loads, the call and what it
returned after."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import CLIError

__all__ = ["EntryPoint", "load_entry_point", "call_entry_point", "reserved_pd_kwargs_problem", "pass2_pipeline_problem",
           "unnamed_kwargs"]

#: pass-2 arguments the command sets from its own flags or the foundation (a dict must not set them twice)
RESERVED = ("prompt", "negative_prompt", "guidance_scale", "num_inference_steps", "height", "width", "latents",
            "generator", "output_type", "return_dict")


@dataclass(frozen=True)
class EntryPoint:
    spec: str
    function: object
    takes_base: bool


def _one_line(e: BaseException) -> str:
    """``Type: message`` of an exception raised in the user's code, with where (file:line) it was raised."""
    text = " ".join(str(e).split()) or "(no message)"
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {text}{where}"


def _import(spec: str, module: str):
    if module.endswith(".py") or os.sep in module or "/" in module:  # a file, e.g. ./my_photomaker.py
        path = Path(module).expanduser()
        if not path.is_file():
            raise CLIError(f"--pipeline {spec}: no such file {path}")
        name = f"freecure_entry_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = mod  # dataclasses and pickling look the module up by name
        try:
            loader_spec.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001  (the user's module may raise anything)
            sys.modules.pop(name, None)
            raise CLIError(f"--pipeline {spec}: importing {path} failed: {_one_line(e)}") from e
        return mod
    if os.getcwd() not in sys.path and "" not in sys.path:  # `freecure` is a script: cwd is not on the path
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module + ".").startswith(e.name + "."):  # the module itself (or its package), not one it imports
            raise CLIError(f"--pipeline {spec}: no module named {module!r} (looked in the current folder "
                           f"{os.getcwd()} and on sys.path; or give a file: path/to/file.py:function)") from e
        raise CLIError(f"--pipeline {spec}: importing {module} failed: {_one_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"--pipeline {spec}: importing {module} failed: {_one_line(e)}") from e


def load_entry_point(spec: str) -> EntryPoint:
    """Import ``module:function`` and check that the function can be called as documented (before any model
    loads)."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name or not all(p.isidentifier() for p in name.split(".")):
        raise CLIError(f"--pipeline {spec}: expected module:function (e.g. my_photomaker:load, or "
                       "path/to/file.py:load)")
    obj = _import(spec, module)
    for part in name.split("."):  # module:Class.method works too
        if not hasattr(obj, part):
            raise CLIError(f"--pipeline {spec}: {module} has no {name}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"--pipeline {spec}: {name} is a {type(obj).__name__}, not a function")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: call it with the base pipeline
        return EntryPoint(spec, obj, True)
    for args in ((None,), ()):  # one argument (the --model pipeline) preferred; none also works
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return EntryPoint(spec, obj, bool(args))
    raise CLIError(f"--pipeline {spec}: {name}{sig} must take one argument (the --model pipeline, or None without "
                   "--model) or none")


def reserved_pd_kwargs_problem(kwargs: Mapping) -> str | None:
    """A pass-2 argument that a flag or the foundation sets already (None: none)."""
    taken = [k for k in kwargs if k in RESERVED]
    if taken:
        return (f"sets {', '.join(taken)}, which the command sets (from --prompt, --negative-prompt, "
                "--guidance-scale, --steps, --height, --width, and the foundation's noise)")
    return None


def call_entry_point(entry: EntryPoint, base):
    """Call it and check what it returned: ``(pipeline, pass-2 kwargs dict)``."""
    from diffusers import DiffusionPipeline

    try:
        out = entry.function(base) if entry.takes_base else entry.function()
    except Exception as e:  # noqa: BLE001  (the user's code may raise anything: one line, with where)
        raise CLIError(f"--pipeline {entry.spec} raised {_one_line(e)}") from e
    kwargs = {}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        out, kwargs = out
    if not isinstance(out, DiffusionPipeline):
        hint = "; without --model its argument is None: load the pipeline in the function, or give --model" \
            if out is None and base is None and entry.takes_base else ""
        raise CLIError(f"--pipeline {entry.spec} returned a {type(out).__name__}, not a diffusers pipeline (a "
                       f"DiffusionPipeline, or (pipeline, dict of pass-2 arguments)){hint}")
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise CLIError(f"--pipeline {entry.spec} returned pass-2 arguments with non-string keys: {bad!r}")
    problem = reserved_pd_kwargs_problem(kwargs)
    if problem:
        raise CLIError(f"--pipeline {entry.spec}: its pass-2 arguments {problem}")
    return out, dict(kwargs)


def pass2_pipeline_problem(foundation_pipe, pipe) -> str | None:
    """Why ``pipe`` cannot run pass 2 from a foundation ``foundation_pipe`` recorded (None: it can), found
    before pass 1 runs rather than at the first FASA layer: its family, its self-attention layers (names and
    heads), its model's dtype and device, and a ``__call__`` that takes ``latents=`` (the foundation's noise)."""
    from ..adapters.discovery import find_self_attention_blocks, resolve_model
    from ..pipeline.apg import pipeline_family

    try:
        family = pipeline_family(pipe)
    except TypeError as e:
        return str(e)
    name = type(pipe).__name__
    base_family = pipeline_family(foundation_pipe)
    if family != base_family:
        return (f"{name} holds a {family} model, --model a {base_family} model: FASA reads keys/values of one "
                "architecture")
    if pipe is not foundation_pipe:
        heads = [(b.name, int(b.attn.heads), int(b.attn.inner_dim)) for b in find_self_attention_blocks(pipe)]
        base = [(b.name, int(b.attn.heads), int(b.attn.inner_dim)) for b in find_self_attention_blocks(foundation_pipe)]
        if heads != base:
            return f"{name}'s self-attention layers differ from --model's: the architectures differ"
        (denoiser, _), (base_denoiser, _) = resolve_model(pipe), resolve_model(foundation_pipe)
        if denoiser.dtype != base_denoiser.dtype:
            return f"its model is in {denoiser.dtype}, --model's in {base_denoiser.dtype}: use one --dtype for both"
        if denoiser.device != base_denoiser.device:
            return (f"its model is on {denoiser.device}, --model's on {base_denoiser.device}: put it on the base "
                    "pipeline's device (base.device)")
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return None
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "latents" not in params and not takes_any:
        return f"{name}.__call__ takes no latents=, so pass 2 cannot start from the foundation's noise"
    return None


def unnamed_kwargs(pipe, kwargs: Mapping) -> tuple[list[str], bool]:
    """The keys of ``kwargs`` that ``pipe.__call__`` does not name, and whether it would refuse them (False:
    it takes ``**kwargs``, and may ignore them: diffusers' stock pipelines do, silently)."""
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return [], False
    strict = not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return [k for k in kwargs if k not in params], strict
