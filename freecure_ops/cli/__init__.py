"""``freecure``: the command line.

    freecure generate --model PATH_OR_ID --prompt "a photo of sks man with red hair" \\
                      --fd-prompt "a photo of a man with red hair" --parser-weights 79999_iter.pth --out out/
    freecure sweep --model PATH_OR_ID --prompt ... --parser-weights ... --omegas 0,0.5,1,1.5,2 --seeds 0,1,2 \\
                   --out sweeps/red-hair        # pass 1 once per seed, pass 2 per omega: a contact sheet
    freecure bench [benchmark options]          # the FASA benchmark (python -m freecure_ops.bench)
    freecure manifest --identity alice=woman ... --out grid.jsonl      # the paper's evaluation grid
    freecure batch --manifest grid.jsonl --model PATH_OR_ID --out runs/grid  # many jobs; resumable
    freecure eval --results runs/grid --clip PATH_OR_ID --face-model arcface.onnx --reference alice=a.jpg
    freecure demo --model PATH_OR_ID --parser-weights 79999_iter.pth   # a local web page: an omega slider

One module per subcommand (:mod:`.generate`, :mod:`.sweep`, :mod:`.manifest`, :mod:`.batch`, :mod:`.eval`,
:mod:`.demo`: its page is :mod:`freecure_ops.demo`, Gradio imported only when it serves), each
with ``add_arguments(subparsers)`` (argparse only: nothing heavy is imported) and ``run(args) -> exit status``,
over shared modules: :mod:`.errors` (the one-line error), :mod:`.args` (argument types and checks), :mod:`.flags`
(the flag definitions generate, sweep and demo share), :mod:`.two_pass` (pass 1 once, pass 2 per omega: what sweep
and demo share), :mod:`.entry_point` (``--pipeline module:function``: a
personalization pipeline from the user's Python), :mod:`.contact_sheet` (labelled image grids),
:mod:`.weights` (``--model``, ``--parser-weights``, ``--clip``: local paths, or Hub references resolved to the
cache), :mod:`.model_files` (a pipeline folder's configs, read without loading), :mod:`.pipeline` (loading and
running a pipeline). The grid library they drive (manifests, the results folder, the scores) lives below, in
:mod:`freecure_ops.manifest`, :mod:`freecure_ops.grid`, :mod:`freecure_ops.results`,
:mod:`freecure_ops.evaluate`.

``generate`` loads a diffusers SD1.x/SD2.x, SDXL or FLUX pipeline (``--model``: a local folder or a Hub id,
downloaded into the Hugging Face cache unless ``--offline`` / ``HF_HUB_OFFLINE=1``, at ``--revision``, with
``--variant``; :mod:`.weights` resolves it in the checks), runs :class:`freecure_ops.pipeline.freecure.FreeCure` and
writes ``pd.png`` (the FreeCure image), ``fd.png`` (the foundation image), ``mask.png`` (the attribute mask)
and ``freecure.json`` (prompts, attributes, settings, weights, timings) to ``--out``. The PD prompt carries the
identity (e.g. a DreamBooth / textual-inversion token), the FD prompt is the same without it. The mask comes
from ``--mask PNG`` (white = attribute) or from a face parser (``--parser-weights``: a BiSeNet checkpoint file
or Hub file, or a SegFormer model folder or Hub id).

``sweep`` runs pass 1 once per ``--seeds`` value and pass 2 once per (seed, ``--omegas`` value), on ``--model``
or on the pipeline a ``--pipeline module:function`` entry point returns (PhotoMaker, InstantID, ...), and writes
``sweep.png`` (rows = omega, columns = seed, the FD image and its mask at the head of each column), the single
images, ``fd/``, ``mask/`` and ``sweep.json`` (settings, files, timings of every pass).

Every argument is checked before the model (or the parser) is loaded: a bad value, a missing or unreadable
file, an ``--out`` that cannot be written, a device that does not exist. Exit status: 0 on success, 2 for a
usage problem (bad option, missing weights, unknown model family, empty mask, ...), with a one-line
``freecure: error: ...`` message that names the flag. Output files are written atomically.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import ArgumentParser, CLIError

__all__ = ["main", "build_parser"]

#: subcommand -> its module (``bench`` is delegated whole to the benchmark's own parser)
COMMANDS = {"generate": "generate", "sweep": "sweep", "batch": "batch", "eval": "eval", "manifest": "manifest",
            "demo": "demo"}


def _command(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="freecure", description="FreeCure (FASA + APG) for diffusers pipelines.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name in COMMANDS:
        _command(name).add_arguments(sub)
    sub.add_parser("bench", help="the FASA benchmark (all further arguments go to it)", add_help=False)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from ..bench.__main__ import main as bench_main  # lazy: the benchmark pulls in its own deps

        return int(bench_main(argv[1:], prog="freecure bench") or 0)
    args = build_parser().parse_args(argv)
    try:
        return _command(args.command).run(args)
    except CLIError as e:
        print(f"freecure: error: {e}", file=sys.stderr)
        return 2
