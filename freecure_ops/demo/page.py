"""The Gradio page of ``freecure demo`` over a :class:`~.session.DemoSession` (which does the work; this module
only lays it out and wires the events).

Offline by construction: analytics off, system fonts (no Google Fonts request), no share link, no server-side
rendering. One pipeline serves every tab, so every run goes through one queue (``concurrency_id``) and the
session's lock: a moved slider waits for the run before it, and only its last value runs."""
from __future__ import annotations

import os
import secrets

from ..cli.errors import CLIError
from ..cli.two_pass import omega_text
from .session import DemoSession, PageInputs

__all__ = ["build_page", "serve", "OMEGA_MAX", "OMEGA_STEP"]

#: the slider's range and step: the paper's omegas lie well inside [0, 5]; 0.05 is finer than one can see
OMEGA_MAX, OMEGA_STEP = 5.0, 0.05
#: pixels: PD and FD side by side fit a laptop screen whatever the model's size (scaled to fit, never cropped)
IMAGE_HEIGHT, HISTORY_HEIGHT = 512, 240
#: small images (a 512 px SD1.5 run, the tests' 16 px one) fill their panel too, so PD and FD compare at one scale
_CSS = "#pd-image img, #fd-image img {width: 100%; height: 100%; object-fit: contain}"

_INTRO = ("Pass 1 (the foundation: FD image, attribute mask, the FD keys/values FASA reads) runs when the "
          "foundation prompt, the attribute words, seed, steps, guidance scale or negative prompt change. "
          "**Moving omega reruns pass 2 only**, from the held foundation. Field labels name the command-line flags; "
          "a bad value is refused with the command line's message.")


def _attributes_text(session: DemoSession, prompt: str) -> str:
    words = session.attributes_in(prompt)
    from ..pipeline.attributes import DEFAULT_VOCABULARY

    if not words:
        known = ", ".join(DEFAULT_VOCABULARY.attributes)
        return f"Attribute words found: none (FreeCure knows {known})"
    found = ", ".join(f"**{w}**" for w in words)
    if session.parsed_mask:
        return f"Attribute words found: {found} (the parser masks these in the FD image)"
    return f"Attribute words found: {found} (the mask is the --mask file, not these words)"


def build_page(session: DemoSession):
    """The page (a ``gr.Blocks``), not yet launched."""
    import gradio as gr

    a = session.args
    omega0 = session.preset_omega if a.omega is None else a.omega
    lo, hi = min(0.0, omega0), max(OMEGA_MAX, omega0)
    with gr.Blocks(title="FreeCure demo", analytics_enabled=False) as page:
        gr.Markdown(f"## FreeCure demo\n{session.label}\n\n{_INTRO}")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt (--prompt)", value=a.prompt or "", lines=2, elem_id="prompt",
                                    placeholder="a photo of sks man with red hair")
                words = ", ".join(session.identity_words) or "none"
                fd_prompt = gr.Textbox(label="Foundation prompt (--fd-prompt)", value=a.fd_prompt or "", lines=2,
                                       elem_id="fd-prompt",
                                       info=f"empty: the prompt without the identity words ({words})")
                attributes = gr.Markdown(elem_id="attributes")
                with gr.Row():
                    seed = gr.Number(label="Seed (--seed)", value=a.seed, precision=0, elem_id="seed")
                    steps = gr.Number(label="Steps (--steps)", value=a.steps, precision=0, elem_id="steps")
                with gr.Accordion("Guidance scale, negative prompt", open=False):
                    guidance = gr.Number(label="Guidance scale (--guidance-scale)", elem_id="guidance-scale",
                                         value=session.default_guidance if a.guidance_scale is None
                                         else a.guidance_scale)
                    negative = gr.Textbox(label="Negative prompt (--negative-prompt)", value=a.negative_prompt or "",
                                          elem_id="negative-prompt")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    new_seed = gr.Button("New seed", elem_id="new-seed")
            with gr.Column(scale=3):
                omega = gr.Slider(lo, hi, value=omega0, step=OMEGA_STEP, label="omega (--omega)", elem_id="omega",
                                  info="FASA strength; moving it reruns pass 2 only, from the held foundation")
                status = gr.Markdown("Press Generate.", elem_id="status")
                with gr.Row():
                    pd_image = gr.Image(label="PD (FreeCure)", type="pil", format="png", interactive=False,
                                        height=IMAGE_HEIGHT, elem_id="pd-image")
                    fd_image = gr.Image(label="FD (foundation)", type="pil", format="png", interactive=False,
                                        height=IMAGE_HEIGHT, elem_id="fd-image")
                with gr.Row(equal_height=True):
                    show_mask = gr.Checkbox(value=True, label="Show the attribute mask over the FD image",
                                            elem_id="show-mask")
                    pass1_runs = gr.Number(label="Pass 1 runs", value=0, precision=0, interactive=False,
                                           elem_id="pass1-runs")
                    pass2_runs = gr.Number(label="Pass 2 runs", value=0, precision=0, interactive=False,
                                           elem_id="pass2-runs")
                history = gr.Gallery(label="This foundation at the omegas tried (click one to enlarge)", columns=8,
                                     height=HISTORY_HEIGHT, object_fit="contain", format="png", interactive=False,
                                     elem_id="history")

        fields = [prompt, fd_prompt, negative, seed, steps, guidance, omega, show_mask]
        outputs = [pd_image, fd_image, status, pass1_runs, pass2_runs, history]

        def run(p, fd, neg, sd, st, gs, w, show, progress=gr.Progress()):
            try:
                result = session.run(PageInputs(prompt=p, fd_prompt=fd, negative_prompt=neg, seed=sd, steps=st,
                                                guidance_scale=gs, omega=w),
                                     progress=lambda text, fraction: progress(fraction, desc=text))
            except CLIError as e:  # the command line's one line, as the page's error
                raise gr.Error(str(e), print_exception=False) from None
            for text in result.warnings:
                gr.Warning(text)
            return (gr.Image(result.pd_image, label=f"PD (FreeCure, omega {omega_text(result.omega)})"),
                    result.fd_overlay if show else result.fd_image, result.summary(), result.pass1_runs,
                    result.pass2_runs, [(img, f"omega {omega_text(w)}") for w, img in result.history])

        def moved(p, fd, neg, sd, st, gs, w, show, progress=gr.Progress()):
            if not session.holds_foundation:  # nothing to rerun pass 2 from yet: Generate first
                return tuple(gr.skip() for _ in outputs)
            return run(p, fd, neg, sd, st, gs, w, show, progress=progress)

        def describe(p):
            derived = session.derived_fd_prompt(p)
            return _attributes_text(session, p), gr.Textbox(placeholder=derived or None)

        # one queue for every run (one pipeline): a click waits for a slider run and the reverse
        generate.click(run, fields, outputs, concurrency_id="pipeline")
        prompt.submit(run, fields, outputs, concurrency_id="pipeline")
        fd_prompt.submit(run, fields, outputs, concurrency_id="pipeline")
        omega.change(moved, fields, outputs, concurrency_id="pipeline", trigger_mode="always_last")
        new_seed.click(lambda: secrets.randbelow(2 ** 32), None, seed, queue=False).then(
            run, fields, outputs, concurrency_id="pipeline")
        prompt.change(describe, prompt, [attributes, fd_prompt], queue=False, trigger_mode="always_last")
        page.load(describe, prompt, [attributes, fd_prompt], queue=False)
        show_mask.change(session.fd_view, show_mask, fd_image, queue=False)
    return page


def serve(session: DemoSession, *, host: str = "127.0.0.1", port: int | None = None, quiet: bool = False) -> None:
    """Build the page and serve it until Ctrl-C (or the process is stopped)."""
    # The page must work on a closed network: no telemetry or version check (read by Gradio at call time too)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    page = build_page(session)
    page.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: nothing fetched
    _, url, _ = page.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
                            quiet=True, prevent_thread_lock=True, ssr_mode=False, theme=theme, css=_CSS)
    print(f"freecure: the demo page is at {url} (Ctrl-C stops it)", flush=True)
    if not quiet:
        print(f"freecure: {session.label}", flush=True)
    page.block_thread()
