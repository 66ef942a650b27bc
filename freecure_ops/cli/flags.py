"""The flag definitions ``generate``, ``sweep`` and ``demo`` share (argparse only: nothing heavy is imported), each
group defined once so that the commands spell, default and explain a flag alike. Their checks are in
:mod:`.args`."""
from __future__ import annotations

from .args import (DEFAULT_IDENTITY_WORDS, DTYPES, add_weights_arguments, identity_words_arg, json_object_arg,
                   layers_arg, user_path)

__all__ = ["add_pipeline_arguments", "add_prompt_arguments", "fd_prompt_of", "add_mask_arguments",
           "MASK_WITH_FOUNDATION", "add_fasa_arguments", "add_fd_reuse_argument", "add_sampling_arguments",
           "add_device_arguments", "add_output_arguments"]


def add_pipeline_arguments(g) -> None:
    """``--model`` (optional here) and the rest of :func:`~.args.add_weights_arguments`, ``--pipeline`` and
    ``--pd-kwargs``: pass 1 on ``--model``, pass 2 on a pipeline of the user's (``sweep``, ``demo``)."""
    add_weights_arguments(g, required=False, extra_help="; optional with --pipeline (then it runs pass 1 and is "
                                                        "handed to the function)")
    g.add_argument("--pipeline", metavar="MODULE:FUNCTION",
                   help="pass 2's pipeline from your Python: MODULE (imported from the current folder, or a .py "
                        "path) FUNCTION(base) gets the --model pipeline (None without --model) and returns a "
                        "diffusers pipeline, or (pipeline, dict of pass-2 arguments); without --model it runs "
                        "both passes")
    g.add_argument("--pd-kwargs", type=json_object_arg, metavar="JSON",
                   help="extra pass-2 pipeline arguments as a JSON object, e.g. '{\"start_merge_step\": 10}'")


#: what ``--mask`` does where pass 1 always runs (its keys/values are what pass 2 reads)
MASK_WITH_FOUNDATION = "skips the parser (pass 1 still runs: pass 2 reads its keys/values)"


def add_prompt_arguments(g, required: bool = True) -> None:
    """``--prompt``, ``--fd-prompt``, ``--identity-words``, ``--negative-prompt`` (``required=False``: the demo,
    where they only fill the page's fields)."""
    g.add_argument("--prompt", required=required, help="PD prompt (with the identity, e.g. a DreamBooth token)")
    g.add_argument("--fd-prompt", help="FD prompt (the same without the identity); default: --prompt without the "
                                       "--identity-words")
    g.add_argument("--identity-words", type=identity_words_arg, default=DEFAULT_IDENTITY_WORDS, metavar="W,W,...",
                   help=f"the identity's trigger words, left out of --prompt to make the default --fd-prompt "
                        f"(default: {','.join(DEFAULT_IDENTITY_WORDS)}; '' for none: the FD prompt is then --prompt)")
    g.add_argument("--negative-prompt", help="negative prompt for both branches")


def fd_prompt_of(prompt: str, fd_prompt: str | None, identity_words) -> str:
    """The FD prompt a command runs: ``--fd-prompt`` as given, else ``prompt`` without the identity words (the
    prompt itself when that leaves nothing)."""
    from ..pipeline.prompts import foundation_prompt  # the package imports diffusers: not while building flags

    if fd_prompt:
        return fd_prompt
    return foundation_prompt(prompt, identity_words) or prompt


def add_mask_arguments(g, mask_effect: str = "skips pass 1") -> None:
    """Where the attribute mask comes from: ``--mask`` or ``--parser-weights`` (+ ``--parser-revision``), and
    ``--empty-mask``."""
    src = g.add_mutually_exclusive_group()
    src.add_argument("--mask", type=user_path, help=f"attribute mask PNG (white = attribute); {mask_effect}")
    src.add_argument("--parser-weights", help="face parser: a BiSeNet checkpoint (79999_iter.pth, or a Hub file "
                                              "org/name/79999_iter.pth), or a SegFormer model (folder or Hub id)")
    g.add_argument("--parser-revision", help="Hub revision of --parser-weights (branch, tag or commit)")
    g.add_argument("--empty-mask", choices=("error", "warn"), default="error",
                   help="what to do when parsing finds no attribute pixel")


def add_fasa_arguments(g) -> None:
    """How FASA runs, omega aside (``generate`` takes one, ``sweep`` a list)."""
    g.add_argument("--layers", type=layers_arg, help="'all' or block indices, e.g. 50,51,52 (default: preset)")
    g.add_argument("--style-fidelity", type=float, default=1.0,
                   help="blend of the unconditional PD row: (1 - sf) * FASA + sf * plain, in [0, 1]")
    g.add_argument("--mode", choices=("bias", "scale"), default="bias")
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")


def add_fd_reuse_argument(g, choices=("auto", "device", "host", "off")) -> None:
    """``--fd-reuse`` (``sweep`` cannot turn it off: its pass 2 runs from the record)."""
    g.add_argument("--fd-reuse", choices=choices, default="auto",
                   help="keep pass 1's FD keys/values for pass 2, which then runs the PD rows alone: on the device, "
                        "in pinned host memory" + (", or off (recompute)" if "off" in choices else "")
                        + "; auto: the device when it fits, else host" + (", else off" if "off" in choices else ""))


def add_sampling_arguments(g) -> None:
    """``--steps``, ``--guidance-scale``, ``--height``, ``--width``."""
    g.add_argument("--steps", type=int, default=30, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, help="default: the pipeline's")
    g.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the pipeline's)")


def add_device_arguments(g, what: str = "") -> None:
    """``--device``, ``--dtype``."""
    g.add_argument("--device", help=f"cpu, cuda or cuda:N{what} (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=tuple(DTYPES), help=f"default: fp16 on cuda, fp32 on cpu{what}")


def add_output_arguments(g) -> None:
    """``--out``, ``--quiet``."""
    g.add_argument("--out", required=True, type=user_path, help="output folder (created; checked before any work)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
