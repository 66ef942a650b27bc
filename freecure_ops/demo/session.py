"""What the demo page holds and does, without Gradio: :class:`DemoSession`.

It owns the loaded pipelines (a :class:`~freecure_ops.cli.two_pass.TwoPass`, as ``freecure sweep`` loads them)
and the foundation of the last pass 1, keyed by everything pass 1 depends on: the foundation prompt, the
attribute words of the prompt (they choose the parsed mask), seed, steps, guidance scale and negative prompt
(model, size, mask source and the FASA settings are fixed for the server's life). :meth:`DemoSession.run` takes
what the page sends (:class:`PageInputs`), checks it with the command line's checks (a problem is the CLI's
one-line :class:`~freecure_ops.cli.errors.CLIError`, before any work), reruns pass 1 only when its key changed,
then runs pass 2 at the omega asked, from the held foundation: moving omega alone never reruns pass 1. An
omega already made from the held foundation (with the same prompt) is shown again without running anything:
its image would be the same. The images are those ``freecure sweep`` / ``generate`` make at the same settings.

One session per server, shared by the page's tabs (one pipeline, one foundation in memory); a lock runs one
request at a time."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from ..cli.args import check_attribute_words, check_sampling_flags, seed_problem
from ..cli.errors import CLIError
from ..cli.two_pass import omega_text
from ..cli.flags import fd_prompt_of

__all__ = ["PageInputs", "DemoResult", "DemoSession", "HISTORY_MAX"]

#: images of the omegas tried kept per foundation (a person compares a handful; each is one decoded image)
HISTORY_MAX = 32

#: ``progress(text, fraction in [0, 1])``
Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class PageInputs:
    """The fields a person edits on the page, as sent: text as typed (an empty foundation prompt: derived from
    the prompt; an empty negative prompt: none), numbers None where a box was left empty (guidance scale None:
    the pipeline's default)."""

    prompt: str
    fd_prompt: str = ""
    negative_prompt: str = ""
    seed: Any = 0
    steps: Any = 30
    guidance_scale: Any = None
    omega: Any = None


@dataclass(frozen=True)
class _Pass1Key:
    """Everything pass 1 depends on that the page can change (field names are the page's words)."""

    foundation_prompt: str
    attribute_words: tuple | None  # None: the mask is a file, the words choose nothing
    seed: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None

    def changes(self, old: "_Pass1Key") -> str:
        """What differs from ``old``, in the page's words ("seed 3 -> 4, negative prompt changed")."""
        out = []
        for f in fields(self):
            a, b = getattr(old, f.name), getattr(self, f.name)
            if a != b:
                name = f.name.replace("_", " ")
                out.append(f"{name} changed" if isinstance(b, str) or b is None or isinstance(a, str)
                           else f"{name} {_show(a)} -> {_show(b)}")
        return ", ".join(out)


def _show(v) -> str:
    return ", ".join(v) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)


@dataclass
class DemoResult:
    """One request's outcome: the images, what ran and how long it took, the counters the page shows."""

    pd_image: Any
    fd_image: Any
    fd_overlay: Any
    prompt: str
    fd_prompt: str
    attributes: list
    omega: float
    pass1_ran: bool
    pass1_reason: str          # why pass 1 ran (or "" when the held foundation served)
    pass1_s: float             # the held foundation's pass 1 and mask, seconds
    pass2_ran: bool            # False: this omega's image came from the history
    pass2_s: float
    pass1_runs: int
    pass2_runs: int
    history: list = field(default_factory=list)   # [(omega, PD image)], by omega
    warnings: list = field(default_factory=list)

    def summary(self) -> str:
        """What happened, in a few lines of Markdown (the page's status)."""
        w = omega_text(self.omega)
        if self.pass1_ran:
            first = (f"**Pass 1 (foundation) ran** ({self.pass1_reason}): {self.pass1_s:.2f} s. "
                     f"**Pass 2** at omega = {w}: {self.pass2_s:.2f} s.")
        elif self.pass2_ran:
            first = (f"**Pass 2 only** at omega = {w}: {self.pass2_s:.2f} s, from the held foundation "
                     "(pass 1 not rerun).")
        else:
            first = (f"omega = {w} was made from the held foundation before: shown again, no pass ran "
                     f"(it took {self.pass2_s:.2f} s).")
        return (f"{first}\n\nPass 1 has run {self.pass1_runs} time{'s' * (self.pass1_runs != 1)}, pass 2 "
                f"{self.pass2_runs} time{'s' * (self.pass2_runs != 1)}. Foundation prompt: \"{self.fd_prompt}\".")


def _whole(flag: str, value) -> int:
    """A page number box as the command line's int flag reads it (argparse's words)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise CLIError(f"argument {flag}: expected one argument")
    if isinstance(value, bool):
        raise CLIError(f"argument {flag}: invalid int value: {str(value)!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise CLIError(f"argument {flag}: invalid int value: {str(value)!r}")
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CLIError(f"argument {flag}: invalid int value: {str(value)!r}") from None


def _real(flag: str, value) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise CLIError(f"argument {flag}: expected one argument")
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise CLIError(f"argument {flag}: invalid float value: {str(value)!r}") from None


@dataclass(frozen=True)
class _Checked:
    prompt: str
    fd_prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance_scale: float
    omega: float
    attributes: list


class DemoSession:
    """The page's state and its two passes (see the module docstring). ``runner``: the loaded
    :class:`~freecure_ops.cli.two_pass.TwoPass`; ``args``: the ``freecure demo`` arguments (the page's first
    values, and the server-wide settings the checks read: ``--style-fidelity``, the mask source);
    ``identity_words``: the words a derived foundation prompt leaves out; ``label``: what the page says it
    runs."""

    def __init__(self, runner, args, *, identity_words=(), label: str = ""):
        from ..adapters.presets import PRESETS

        self.runner = runner
        self.args = args
        self.identity_words = tuple(identity_words)
        self.label = label
        self.preset_omega = PRESETS[runner.fc.family].omega
        self.parsed_mask = runner.mask is None
        self._lock = threading.RLock()  # release() runs inside run() too
        self._found = None
        self._overlay = None
        self._key: _Pass1Key | None = None
        self._pass1_s = 0.0
        self._history: dict = {}     # omega -> (PD image, seconds), for _history_prompt
        self._history_prompt = None
        self.pass1_runs = 0
        self.pass2_runs = 0

    # -- what the page shows before anything runs ------------------------------------------------------------
    @property
    def default_guidance(self) -> float:
        return float(self.runner.default_guidance)

    def derived_fd_prompt(self, prompt: str) -> str:
        """The foundation prompt the page uses when its box is empty: the prompt without the identity words
        (the prompt itself when that leaves nothing)."""
        return fd_prompt_of((prompt or "").strip(), None, self.identity_words)

    def attributes_in(self, prompt: str) -> list:
        """The attribute words FreeCure finds in ``prompt`` (what a parsed mask covers)."""
        from ..pipeline.attributes import find_attributes

        return find_attributes((prompt or "").strip(), self.runner.fc.vocabulary)

    @property
    def holds_foundation(self) -> bool:
        return self._found is not None

    def fd_view(self, show_mask: bool):
        """The held foundation's FD image, with its mask over it or plain (None before the first pass 1)."""
        if self._found is None:
            return None
        return self._overlay if show_mask else self._found.images[0]

    # -- checks ------------------------------------------------------------------------------------------------
    def check(self, inputs: PageInputs) -> _Checked:
        """The page's values, checked as the command line checks its flags (CLIError, the CLI's words)."""
        import argparse

        prompt = (inputs.prompt or "").strip()
        steps = _whole("--steps", inputs.steps)
        seed = _whole("--seed", inputs.seed)
        omega = _real("--omega", inputs.omega)
        gs = None if inputs.guidance_scale is None or str(inputs.guidance_scale).strip() == "" \
            else _real("--guidance-scale", inputs.guidance_scale)
        check_sampling_flags(argparse.Namespace(steps=steps, omega=omega, guidance_scale=gs,
                                                style_fidelity=self.args.style_fidelity))
        problem = seed_problem("--seed", seed)
        if problem:
            raise CLIError(problem)
        if self.parsed_mask:
            check_attribute_words(prompt)
        fd_prompt = (inputs.fd_prompt or "").strip() or self.derived_fd_prompt(prompt)
        negative = (inputs.negative_prompt or "").strip() or None
        return _Checked(prompt=prompt, fd_prompt=fd_prompt, negative_prompt=negative, seed=seed, steps=steps,
                        guidance_scale=self.default_guidance if gs is None else gs, omega=omega,
                        attributes=self.attributes_in(prompt))

    # -- the passes --------------------------------------------------------------------------------------------
    def run(self, inputs: PageInputs, progress: Progress | None = None) -> DemoResult:
        """Check, rerun pass 1 if what it depends on changed, run pass 2 at ``inputs.omega`` (or show the image
        this foundation made at that omega before). Raises CLIError for bad input, before any work."""
        c = self.check(inputs)
        report = progress or (lambda text, fraction: None)
        with self._lock:
            key = _Pass1Key(c.fd_prompt, tuple(c.attributes) if self.parsed_mask else None, c.seed, c.steps,
                            float(c.guidance_scale), c.negative_prompt)
            common = self.runner.common(c.steps, c.guidance_scale, c.negative_prompt)
            warnings: list = []
            reason = ""
            if self._found is None:  # the first request, or the last pass 1 failed
                reason = "the first foundation" if self.pass1_runs == 0 else "no foundation was held"
            elif key != self._key:
                reason = key.changes(self._key)
            if reason:
                self._pass1(c, key, common, report, warnings)
            if c.prompt != self._history_prompt:  # pass 2 reads the PD prompt: other images, another history
                self._history, self._history_prompt = {}, c.prompt
            cached = self._history.get(c.omega)
            if cached is not None:
                image, seconds = cached
                self._history[c.omega] = self._history.pop(c.omega)  # most recently used last
            else:
                text = f"pass 2 at omega={omega_text(c.omega)}"
                start = 0.5 if reason else 0.0  # with pass 1 before it, pass 2 fills the bar's second half
                report(text, start)
                image, seconds = self.runner.pass2(self._found, c.prompt, c.omega, c.seed, common,
                                                   on_step=self._stepper(report, text, start, 1.0 - start))
                self.pass2_runs += 1
                self._history[c.omega] = (image, seconds)
                while len(self._history) > HISTORY_MAX:
                    self._history.pop(next(iter(self._history)))
            report("done", 1.0)
            return DemoResult(pd_image=image, fd_image=self._found.images[0], fd_overlay=self._overlay,
                              prompt=c.prompt, fd_prompt=c.fd_prompt, attributes=c.attributes, omega=c.omega,
                              pass1_ran=bool(reason), pass1_reason=reason, pass1_s=self._pass1_s,
                              pass2_ran=cached is None, pass2_s=seconds, pass1_runs=self.pass1_runs,
                              pass2_runs=self.pass2_runs, history=sorted(
                                  ((w, img) for w, (img, _) in self._history.items()), key=lambda t: t[0]),
                              warnings=warnings)

    def _pass1(self, c: _Checked, key: _Pass1Key, common: dict, report: Progress, warnings: list) -> None:
        from ..cli.contact_sheet import foundation_overlay

        self.release()  # the record is the big allocation: never two at once
        report("pass 1 (foundation)", 0.0)
        found = self.runner.foundation(c.fd_prompt, c.prompt, c.seed, common, seed_flag="--seed",
                                       on_step=self._stepper(report, "pass 1 (foundation)", 0.0, 0.5),
                                       warn=warnings.append)
        self.pass1_runs += 1
        self._found, self._key = found, key
        self._overlay = foundation_overlay(found)
        self._pass1_s = sum(found.timings.get(k, 0.0) for k in ("pass1", "mask"))
        self._history, self._history_prompt = {}, c.prompt

    @staticmethod
    def _stepper(report: Progress, text: str, start: float, span: float):
        """``on_step(step, total)`` -> ``report``, the pass filling ``span`` of the bar from ``start``."""
        def on_step(step, total):
            if total:
                report(f"{text}: step {step}/{total}", start + span * min(1.0, step / total))

        return on_step

    def release(self) -> None:
        """Drop the held foundation (and its record) and the history."""
        with self._lock:
            if self._found is not None:
                self._found.release()
            self._found, self._key, self._overlay, self._history, self._history_prompt = None, None, None, {}, None
