"""``freecure demo``: a local web page (Gradio) for tuning one portrait by hand.

    pip install -e ".[demo]"
    freecure demo --model DIR_OR_HUB_ID --parser-weights 79999_iter.pth     # then open http://127.0.0.1:7860

The page takes a prompt, a foundation prompt (derived from the prompt by leaving out ``--identity-words``;
editable), seed, steps, guidance scale, negative prompt and an omega slider, and shows the attribute words it
finds, the PD (FreeCure) image beside the FD image with the attribute mask over it, and the omegas tried on the
held foundation. Pass 1 reruns only when something it depends on changes; moving omega reruns pass 2 alone
(:class:`~freecure_ops.demo.session.DemoSession`). The flags are ``sweep``'s (``--model`` and/or ``--pipeline
module:function``, ``--pd-kwargs``, the mask source, the FASA settings, device and dtype), checked the same way
before anything loads; ``--prompt``, ``--fd-prompt``, ``--negative-prompt``, ``--seed``, ``--steps``,
``--guidance-scale`` and ``--omega`` only fill the page's fields, which are checked by the same checks on
every request (a problem is the command line's one-line message, shown on the page). ``--host`` defaults to
127.0.0.1: this machine only. Gradio is an optional extra; without it this is one line and exit status 2."""
from __future__ import annotations

from .args import check_run_settings, seed_problem
from .errors import CLIError
from .flags import (MASK_WITH_FOUNDATION, add_device_arguments, add_fasa_arguments, add_fd_reuse_argument,
                    add_mask_arguments, add_pipeline_arguments, add_prompt_arguments, add_sampling_arguments)
from .two_pass import check_pipeline_args, require_model_or_pipeline

__all__ = ["add_arguments", "check_demo_args", "load_session", "run", "gradio_problem"]

def add_arguments(sub) -> None:
    d = sub.add_parser("demo", help="a local web page: prompt, seed, an omega slider that reruns pass 2 only",
                       description="A local web page (Gradio) on a diffusers pipeline: pass 1 once per prompt and "
                                   "seed, pass 2 whenever omega moves; PD and FD side by side, the mask over FD.")
    add_pipeline_arguments(d)
    add_prompt_arguments(d, required=False)
    add_mask_arguments(d, mask_effect=MASK_WITH_FOUNDATION)
    d.add_argument("--omega", type=float, help="the slider's first value (default: the model family's preset)")
    add_fasa_arguments(d)
    add_fd_reuse_argument(d, choices=("auto", "device", "host"))
    add_sampling_arguments(d)
    d.add_argument("--seed", type=int, default=0, help="the first seed on the page")
    add_device_arguments(d, what=" of --model")
    d.add_argument("--host", default="127.0.0.1",
                   help="address to serve the page on (default: 127.0.0.1, this machine only; 0.0.0.0: every "
                        "interface, anyone who can reach it can run the model)")
    d.add_argument("--port", type=int, help="port (default: 7860, or the next free one)")
    d.add_argument("--quiet", action="store_true", help="no progress bars or library notes in the terminal")


def gradio_problem() -> str | None:
    """Why the page cannot be served here (None: Gradio is installed). Found without importing it (seconds)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        return 'freecure demo needs Gradio, an optional extra: pip install -e ".[demo]" (or pip install "gradio>=6")'
    return None


def _address_problem(host: str, port: int | None) -> str | None:
    """Whether the page can listen on ``host:port`` (``port`` None: any port Gradio may pick), tried before the
    model loads (minutes) rather than after."""
    import socket

    if port is not None and not 1 <= port <= 65535:
        return f"--port must be in 1..65535, got {port}"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        return f"--host {host}: not an address of this machine ({getattr(e, 'strerror', None) or e})"
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as e:
            if port is not None and e.errno in (98, 48, 10048):  # EADDRINUSE (Linux, macOS, Windows)
                return f"--port {port}: already in use on {host} (another server listens there; pick another --port)"
            return f"--host {host}: cannot listen there ({e.strerror or e})"
    return None


def check_demo_args(args):
    """Every check before anything loads (sweep's, with the page's first values as flags). Raises CLIError."""
    require_model_or_pipeline(args)
    check_run_settings(args)
    problem = seed_problem("--seed", args.seed)
    if problem:
        raise CLIError(problem)
    problem = _address_problem(args.host, args.port)
    if problem:
        raise CLIError(problem)
    return check_pipeline_args(args, args.prompt)


def load_session(args, plan=None):
    """The :class:`~freecure_ops.demo.session.DemoSession` of these arguments: checked (unless ``plan``, what
    :func:`check_demo_args` returned, is given), the pipelines loaded."""
    from ..demo.session import DemoSession
    from .two_pass import TwoPass

    plan = check_demo_args(args) if plan is None else plan
    runner = TwoPass(args, plan)
    where = f"{runner.device}, {str(runner.dtype).replace('torch.', '')}"
    model = args.model if args.model is not None else args.pipeline
    if args.model is not None and args.pipeline is not None:
        model = f"{args.model}, pass 2 on {args.pipeline}"
    mask = f"--mask {args.mask}" if args.mask is not None else f"parsed from the FD image ({args.parser_weights})"
    label = f"{model} ({runner.fc.family}, {where}); attribute mask: {mask}"
    return DemoSession(runner, args, identity_words=args.identity_words, label=label)


def run(args) -> int:
    from .pipeline import quiet_libraries

    problem = gradio_problem()
    if problem:
        raise CLIError(problem)
    plan = check_demo_args(args)
    with quiet_libraries(args.quiet):
        session = load_session(args, plan)
        from ..demo.page import serve

        try:
            serve(session, host=args.host, port=args.port, quiet=args.quiet)
        finally:
            session.release()
    return 0
