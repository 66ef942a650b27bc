"""Step counting the way the denoising loop counts: one step per ``scheduler.step()`` call.

Every diffusers pipeline calls ``scheduler.set_timesteps`` (or ``retrieve_timesteps``, which calls it) once
before its loop and ``scheduler.step`` exactly once per loop iteration, for every scheduler (second-order
ones such as Heun and K-DPM2 included: their internal half steps are loop iterations too, each with its own
progress-bar tick and step-callback index). So the index of the current iteration is the number of
``step()`` calls since the last ``set_timesteps``. :class:`SchedulerStepCounter` wraps those two methods on
the scheduler *instance* (the class is untouched; ``inspect.signature`` still sees the originals, which the
pipelines read to find optional arguments such as ``eta``) and counts in Python: no timestep is read, so no
device-to-host sync happens per forward, and the count is right where the timesteps repeat or rise
(``KDPM2AncestralDiscreteScheduler`` emits ``666.0001, 666.0, 332.99997, 333.0, ...``).
"""
from __future__ import annotations

import copy
import functools


class SchedulerStepCounter:
    """``count``: completed loop iterations (``step()`` calls) since the last ``set_timesteps`` (or
    :meth:`restart`). Attach to one scheduler at a time; :meth:`detach` restores it. ``on_change``: called
    (no arguments) after every ``set_timesteps``/``step`` it counts, outside the model's forward."""

    def __init__(self, on_change=None):
        self.on_change = on_change
        self.count = 0
        self.scheduler = None
        self._wrappers = {}   # method name -> (wrapper, whether the instance had its own attribute before)
        self._live = False

    def restart(self) -> None:
        self.count = 0

    def _on_set_timesteps(self) -> None:
        self.count = 0

    def _on_step(self) -> None:
        self.count += 1

    def attach(self, scheduler) -> None:
        """Count ``scheduler``'s loop (detaching from the previous one). The count restarts at 0."""
        if scheduler is self.scheduler and self._live:
            return
        self.detach()
        for name, after in (("set_timesteps", self._on_set_timesteps), ("step", self._on_step)):
            original = getattr(scheduler, name, None)
            if not callable(original):
                raise TypeError(f"scheduler must have set_timesteps() and step() methods (a diffusers scheduler), "
                                f"got {type(scheduler).__name__}")
            had_own = name in vars(scheduler)
            wrapper = self._wrap(scheduler, original, after)
            setattr(scheduler, name, wrapper)
            self._wrappers[name] = (wrapper, original, had_own)
        self.scheduler = scheduler
        self._live = True
        self.count = 0

    def _wrap(self, scheduler, original, after):
        return _CountingMethod(self, scheduler, original, after)

    def detach(self) -> None:
        """Put the scheduler's methods back (when someone wrapped them after us, ours turns into a pass-through)."""
        sched = self.scheduler
        self._live = False
        if sched is not None:
            for name, (wrapper, original, had_own) in self._wrappers.items():
                if vars(sched).get(name) is wrapper:
                    if had_own:
                        setattr(sched, name, original)
                    else:
                        delattr(sched, name)
        self._wrappers = {}
        self.scheduler = None


class _CountingMethod:
    """``scheduler.set_timesteps`` / ``scheduler.step`` while counted: the original, then the counter. A deep
    copy of the scheduler (as users and pipelines make) gets the original method of the copy, not this
    wrapper, which would drive the original scheduler and this counter."""

    def __init__(self, counter, scheduler, original, after):
        self._counter, self._scheduler, self._original, self._after = counter, scheduler, original, after
        functools.update_wrapper(self, original)  # __wrapped__: inspect.signature sees the original's

    def __call__(self, *args, **kwargs):
        out = self._original(*args, **kwargs)
        counter = self._counter
        if counter._live and counter.scheduler is self._scheduler:
            self._after()
            if counter.on_change is not None:
                counter.on_change()
        return out

    def __deepcopy__(self, memo):
        return copy.deepcopy(self._original, memo)  # a bound method: re-bound to the copy of its scheduler


def loop_iterations(scheduler, num_inference_steps: int | None = None, *, timesteps=None, sigmas=None) -> int:
    """How many iterations a pipeline's denoising loop runs over ``scheduler`` for this schedule: the length
    of its ``timesteps`` after ``set_timesteps`` (what the loop enumerates; N + 1 for PNDM with
    ``skip_prk_steps``, 2N - 1 for Heun and K-DPM2). Asked of a deep copy on the CPU, so the scheduler (and
    a step counter attached to it) sees nothing. ``timesteps`` / ``sigmas``: a custom schedule, as passed to
    the pipeline."""
    sched = copy.deepcopy(scheduler)
    kwargs = {"num_inference_steps": num_inference_steps} if timesteps is None and sigmas is None else {}
    if timesteps is not None:
        kwargs["timesteps"] = timesteps
    if sigmas is not None:
        kwargs["sigmas"] = sigmas
    if getattr(sched.config, "use_dynamic_shifting", False):
        kwargs["mu"] = 1.0  # required by flow-matching schedulers with dynamic shifting; it moves no count
    sched.set_timesteps(device="cpu", **kwargs)
    return len(sched.timesteps)
