"""What every subcommand reports a usage problem with: one line ``freecure: error: ...`` naming the flag,
exit status 2. Standard library only (imported before anything heavy)."""
from __future__ import annotations

import argparse
import re

__all__ = ["CLIError", "ArgumentParser", "flag_message"]


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``freecure: error: argument --omega: ...``), exit status 2."""

    def error(self, message):
        self.exit(2, f"freecure: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


#: Python argument names (as library messages spell them) -> the CLI flag
FLAGS = {"omega": "--omega", "layers": "--layers", "style_fidelity": "--style-fidelity", "mode": "--mode",
         "backend": "--backend", "empty_mask": "--empty-mask", "gamma": "--gamma", "height": "--height",
         "width": "--width", "guidance_scale": "--guidance-scale", "num_inference_steps": "--steps",
         "apg_template": "--apg-template", "seed": "--seed", "mask": "--mask", "fd_reuse": "--fd-reuse"}


def flag_message(text: str) -> str:
    """Rewrite a library message for the CLI user: ``layers='all'`` -> ``--layers all``, ``layers=None`` ->
    ``no --layers``, a leading ``layers ...`` -> ``--layers ...``."""
    names = "|".join(sorted(FLAGS, key=len, reverse=True))

    def repl(m):
        flag, value = FLAGS[m.group(1)], m.group(2).strip("'\"")
        return f"no {flag}" if value == "None" else f"{flag} {value}"

    text = re.sub(rf"\b({names})=('[^']*'|\"[^\"]*\"|[^\s,;:)]+)", repl, text)
    return re.sub(rf"^({names})\b", lambda m: FLAGS[m.group(1)], text)
