"""The flag definitions ``generate`` and ``sweep`` share (argparse only: nothing heavy is imported), each group
defined once so that the two commands spell, default and explain a flag alike. Their checks are in
:mod:`.args`."""
from __future__ import annotations

from .args import DTYPES, layers_arg, user_path

__all__ = ["add_prompt_arguments", "add_mask_arguments", "add_fasa_arguments", "add_fd_reuse_argument",
           "add_sampling_arguments", "add_device_arguments", "add_output_arguments"]


def add_prompt_arguments(g) -> None:
    """``--prompt``, ``--fd-prompt``, ``--negative-prompt``."""
    g.add_argument("--prompt", required=True, help="PD prompt (with the identity, e.g. a DreamBooth token)")
    g.add_argument("--fd-prompt", help="FD prompt (the same without the identity); default: --prompt")
    g.add_argument("--negative-prompt", help="negative prompt for both branches")


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
