"""Argument types and checks shared by the subcommands: each runs before any model loads and raises
:class:`~freecure_ops.cli.errors.CLIError` naming the flag (or returns the problem, for callers that name
the manifest line instead)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..outputs import output_dir_problem
from .errors import CLIError
from .model_files import model_path_problem

__all__ = ["DTYPES", "add_weights_arguments", "user_path", "layers_arg", "identity_words_arg", "DEFAULT_IDENTITY_WORDS", "number_list_arg", "json_object_arg",
           "fraction_arg", "check_finite",
           "real_problem", "read_mask_png", "parser_weights_problem", "parser_weights_error", "pick_device",
           "interpreting", "torch_dtype", "apg_steps_problem", "check_run_flags", "check_run_settings",
           "check_sampling_flags", "check_attribute_words", "seed_problem", "check_mask_source", "check_backend_device"]

#: --dtype choices -> torch dtype names
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_weights_arguments(g, required: bool = True, extra_help: str = "") -> None:
    """``--model``, ``--revision``, ``--variant``, ``--offline`` (generate, batch and sweep)."""
    g.add_argument("--model", required=required,
                   help="diffusers pipeline: a local folder, or a Hugging Face Hub id (downloaded into the Hugging "
                        "Face cache on first use), e.g. stabilityai/stable-diffusion-xl-base-1.0" + extra_help)
    g.add_argument("--revision", help="Hub revision of --model: branch, tag or commit (default: main)")
    g.add_argument("--variant", help="weights variant, e.g. fp16 (files named *.fp16.*)")
    g.add_argument("--offline", action="store_true",
                   help="download nothing: Hub references come from the Hugging Face cache (as HF_HUB_OFFLINE=1)")


def user_path(text: str) -> Path:
    """A path flag: ``~`` expanded as the shell would (``--out=~/x`` reaches us unexpanded)."""
    return Path(text).expanduser()


def layers_arg(text: str):
    """``--layers``: ``all`` or comma-separated block indices."""
    if text == "all":
        return "all"
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be 'all' or comma-separated block indices, got {text!r}")


def number_list_arg(kind):
    """A comma-separated list of ``kind`` (float: ``--omegas 0.5,1,1.5``; int: ``--seeds 0,1,2``), given order
    kept; an empty list or a repeated value is refused (two cells of a sweep would be one file)."""
    what = "numbers" if kind is float else "integers"

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",")]
        if not any(items):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got an empty list")
        try:
            values = [kind(t) for t in items if t]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"{', '.join(map(str, repeated))} given twice in {text!r}")
        return values

    return parse


def json_object_arg(text: str) -> dict:
    """A JSON object (``--pd-kwargs '{"start_merge_step": 10}'``)."""
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{\"name\": value, ...}}, got {text!r}")
    return value


#: the identity trigger words the command line leaves out of --prompt for the default --fd-prompt: DreamBooth's
#: usual token and PhotoMaker's trigger word
DEFAULT_IDENTITY_WORDS = ("sks", "img")


def identity_words_arg(text: str) -> tuple:
    """``--identity-words``: comma-separated words ('' for none)."""
    from ..pipeline.prompts import identity_words_problem

    words = tuple(w.strip() for w in text.split(",") if w.strip())
    problem = identity_words_problem(words)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return words


def fraction_arg(text: str) -> float:
    """A number in (0, 1] (``--gamma``)."""
    v = float(text)
    if not 0.0 < v <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def check_finite(flag: str, value, lo=None, hi=None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
        raise CLIError(f"{flag} must be a finite number{rng}, got {value}")
    problem = real_problem(flag, value)
    if problem:
        raise CLIError(problem)


def real_problem(name: str, value) -> str | None:
    """The op's rule for a scalar (finite, within float32 range: the kernel computes in float32), checked
    here so that 1e308 is refused before any model loads rather than at the first FASA call."""
    from ..validation import check_real

    try:
        check_real(name, value)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def apg_steps_problem(steps: int, gamma: float) -> str | None:
    """Why APG cannot run ``steps`` x ``gamma`` (None: it can): it inverts and denoises ``int(gamma * steps)``
    steps, and zero of them would fail after the model loads and pass 1 has run."""
    from ..pipeline.apg import apg_steps

    if apg_steps(steps, gamma) == 0:
        return f"runs int(gamma * steps) = int({gamma} * {steps}) = 0 APG steps"
    return None


def read_mask_png(path: Path):
    """``--mask`` file -> float32 numpy ``[H, W]`` in [0, 1] (white = attribute; the rule of
    :func:`freecure_ops.masks.image_mask`, which the Python API applies to PIL masks too). Raises CLIError
    naming ``--mask`` for a missing, empty, truncated or undecodable file."""
    from PIL import Image

    from ..masks import image_mask

    if not path.is_file():
        raise CLIError(f"--mask {path}: no such file")
    try:
        with Image.open(path) as im:
            return image_mask(im)
    except Exception as e:  # noqa: BLE001  (PIL raises UnidentifiedImageError, OSError, SyntaxError, ...)
        detail = " ".join(str(e).split()) or type(e).__name__
        raise CLIError(f"--mask {path}: not a readable image (empty, truncated or not PNG/JPEG/...): {detail}") from e


def parser_weights_problem(path: Path) -> str | None:
    """What is wrong with ``--parser-weights`` as a file, from its first bytes (None: it may be a checkpoint;
    loading it decides). A text file would otherwise reach torch.load and be blamed on pickled objects."""
    if not path.is_file():
        return "no such file (a BiSeNet checkpoint such as 79999_iter.pth, or a Hub file org/name/79999_iter.pth)"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"not readable ({e.strerror or e})"
    if path.suffix.lower() == ".safetensors":
        return None
    if not head:
        return "not a PyTorch checkpoint (the file is empty)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip archive; a legacy pickle
        return None
    return f"not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle; it starts with {head!r})"


def parser_weights_error(path, e: Exception) -> CLIError:
    """A parser checkpoint that failed to load, as one line (torch's own detail spans many lines)."""
    text = " ".join(str(e).split()).removeprefix("path: ")
    text = text.split(" Detail: ")[0]
    return CLIError(f"--parser-weights {path}: {text}")


def interpreting() -> bool:
    """Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1, as the tests set)."""
    from ..kernels import interpreting as triton_interpreting

    return triton_interpreting()


def pick_device(text: str | None):
    """``--device`` -> a torch device that exists here (default: cuda when available, else cpu)."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {text}: not a device (use cpu, cuda or cuda:N)") from e
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available) or not is_available():
        raise CLIError(f"--device {text}: no {device.type} device is available here"
                       + (" (this torch has no CUDA, or no GPU is visible)" if device.type == "cuda" else ""))
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise CLIError(f"--device {text}: there are only {count()} {device.type} devices (0..{count() - 1})")
    return device


def torch_dtype(name: str | None, device):
    """``--dtype`` (None: fp16 on cuda, fp32 elsewhere) -> the torch dtype."""
    import torch

    return getattr(torch, DTYPES[name or ("fp16" if device.type == "cuda" else "fp32")])


def empty_mask_effect(mode: str) -> str:
    """What FASA does with an empty attribute mask, in the words of ``--mode``: nothing in "bias" mode (every
    FD key excluded: plain self-attention), while "scale" mode still attends every FD key with logit 0."""
    if mode == "bias":
        return "FASA would change nothing"
    return "--mode scale would still attend every FD key (logit omega * 0 * s = 0), guided by no attribute"


def check_run_flags(args) -> None:
    """The checks ``generate``, ``sweep`` and ``batch`` share, before anything loads (each adds its own): the
    output folder, then :func:`check_run_settings`."""
    problem = output_dir_problem(args.out)
    if problem:
        raise CLIError(f"--out {args.out}: {problem}")
    check_run_settings(args)


def check_sampling_flags(args) -> None:
    """The numbers of a run: ``--steps``, ``--omega``, ``--style-fidelity``, ``--guidance-scale`` (the demo page
    checks what a person types with this too, so the page and the command line refuse alike)."""
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    check_finite("--omega", getattr(args, "omega", None))
    check_finite("--style-fidelity", args.style_fidelity, 0.0, 1.0)
    check_finite("--guidance-scale", args.guidance_scale, 0.0)


def check_run_settings(args) -> None:
    """The checks of a run that needs no output folder (``demo`` has none): :func:`check_sampling_flags`, the
    model reference, the size's multiple of 8 (the model's own multiple is checked once its config is read)
    and a parser revision without parser weights. (``sweep`` has no ``--omega``, and ``--model`` is optional
    there.)"""
    check_sampling_flags(args)
    problem = None if args.model is None else model_path_problem(args.model)
    if problem:
        raise CLIError(f"--model {args.model}: {problem}")
    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and (v <= 0 or v % 8):
            raise CLIError(f"{flag} must be a positive multiple of 8 (pixels), got {v}")
    if args.parser_revision is not None and args.parser_weights is None:
        raise CLIError("--parser-revision is only used with --parser-weights")


def check_attribute_words(prompt: str) -> None:
    """A parsed mask needs an attribute named in the prompt; without one there would be nothing to sweep (or to
    tune on the demo page)."""
    from ..pipeline.attributes import DEFAULT_VOCABULARY, find_attributes

    if not find_attributes(prompt):
        known = ", ".join(DEFAULT_VOCABULARY.attributes)
        raise CLIError(f"--prompt names none of the attributes FreeCure knows ({known}): FASA would have nothing to "
                       "do at any omega; name one (e.g. 'red hair') or give --mask")


def seed_problem(flag: str, seed: int) -> str | None:
    """A seed torch cannot take (None: it can)."""
    if not -2 ** 63 <= seed < 2 ** 64:
        return f"{flag} must fit a 64-bit integer, got {seed}"
    return None


def check_mask_source(args):
    """``--mask`` (read, and refused when empty unless ``--empty-mask warn``) or ``--parser-weights``, one of
    them required: returns the mask as a float32 array, or None when a parser makes it."""
    if args.mask is None:
        if args.parser_weights is None:
            raise CLIError("give --mask PNG or --parser-weights PTH (the face parser that finds the attributes)")
        return None
    mask = read_mask_png(args.mask)
    if not (mask > 0).any():
        what = f"--mask {args.mask}: the mask is empty (all black / fully transparent: no attribute pixel)"
        if args.empty_mask == "error":
            raise CLIError(f"{what}; {empty_mask_effect(args.mode)}. Pass --empty-mask warn to run anyway")
        print(f"freecure: warning: {what}; {empty_mask_effect(args.mode)}", file=sys.stderr)
    return mask


def check_backend_device(backend: str, device) -> None:
    """``--backend triton`` needs a CUDA device (or the CPU interpreter the tests switch on)."""
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise CLIError(f"--backend triton needs a CUDA --device (got {device}); use --backend torch or auto")
