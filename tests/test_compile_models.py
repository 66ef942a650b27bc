"""torch.compile of tiny SD1.5-, SDXL- and FLUX-shaped models carrying FASA: no graph break, compiled models
accepted by install_fasa and FreeCure (keeping FD reuse, in foundations too, and APG), the same images as
eager, and no recompilation on a second generation.

Compiles use the "aot_eager" backend (dynamo + AOTAutograd: everything that can break a graph, recompile or
disagree with the op's fake implementation), fullgraph=True; Inductor on CPU costs minutes per tiny model
(measured: 169 s for the first FreeCure call on the SD1.5-style pipeline, then 0.16 s a call, no
recompilation, max |diff| 1.7e-6 against eager) and is not part of the suite. Recompilations are counted
with torch._dynamo's counters.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from freecure_ops.adapters import install_fasa
from freecure_ops.pipeline import FreeCure
from test_adapters_helpers import flux_inputs, random_mask, run, tiny_flux, tiny_sd15, tiny_sdxl, unet_inputs
from tiny_pipes import BUILDERS, IMAGE, FakeParser

PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"
COMMON = dict(num_inference_steps=2, height=IMAGE, width=IMAGE)


def compile_denoiser(pipe):
    attr = "transformer" if hasattr(pipe, "transformer") else "unet"
    setattr(pipe, attr, torch.compile(getattr(pipe, attr), backend="aot_eager", fullgraph=True))
    return getattr(pipe, attr)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


# ---- explain: one graph, no break -----------------------------------------------------------------------------

BARE = {
    "sd15": (tiny_sd15, lambda m: unet_inputs(m, 4, 8, 6), dict(layout="cfg")),
    "sdxl": (tiny_sdxl, lambda m: unet_inputs(m, 4, 8, 6), dict(layout="cfg")),
    "flux": (tiny_flux, lambda m: flux_inputs(2, 4, 6), dict(layout="plain", grid=(4, 6))),
}


@pytest.mark.parametrize("family", sorted(BARE))
def test_explain_model_with_fasa_reports_no_graph_break(family):
    build, make_inputs, extra = BARE[family]
    model = build()
    kw = make_inputs(model)
    with install_fasa(model, random_mask((8, 8)), layers="all", **extra) as handle:
        assert handle.controller.active
        torch._dynamo.reset()
        with torch.no_grad():
            ex = torch._dynamo.explain(model)(**kw)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons


def test_compiled_bare_flux_without_grid_says_what_to_pass():
    model = tiny_flux()
    kw = flux_inputs(2, 4, 6)
    with install_fasa(model, random_mask((8, 8)), layers="all", layout="plain"):
        eager = run(model, kw)          # eager: the grid is read from img_ids (a bare model's fallback)
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"grid=\(h, w\)"):
            with torch.no_grad():
                torch.compile(model, backend="aot_eager", fullgraph=True)(**kw)
    with install_fasa(model, random_mask((8, 8)), layers="all", layout="plain", grid=(4, 6)):
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend="aot_eager", fullgraph=True)(**kw).sample
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


# ---- FreeCure and install_fasa on compiled pipelines ------------------------------------------------------------

def uncompile(pipe):
    attr = "transformer" if hasattr(pipe, "transformer") else "unet"
    setattr(pipe, attr, getattr(pipe, attr)._orig_mod)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_freecure_on_a_compiled_pipeline_keeps_fd_reuse_matches_eager_and_never_recompiles(family):
    """A compiled model keeps FD reuse ("auto" picks the device, as eager): pass 1 runs the FD rows alone and
    pass 2 the PD rows alone, each one graph (fullgraph=True: no break), the same images as the eager
    reusing path, and a second generation compiles nothing."""
    pipe = BUILDERS[family]()
    eager = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, fd_reuse="device")(PD, fd_prompt=FD, seed=0,
                                                                                   output_type="pt", **COMMON)
    recompute = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, fd_reuse="off")(PD, fd_prompt=FD, seed=0,
                                                                                     output_type="pt", **COMMON)
    rows = []

    def count_rows(module, args, kwargs):
        rows.append((args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))).shape[0])

    denoiser = pipe.transformer if family == "flux" else pipe.unet
    with denoiser.register_forward_pre_hook(count_rows, with_kwargs=True):
        pipe(PD, num_inference_steps=2, height=IMAGE, width=IMAGE, output_type="pt")   # one plain branch
    plain_rows, rows[:] = sum(rows), []
    wrapper = compile_denoiser(pipe)
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)   # accepted: the denoiser is an OptimizedModule
    counting = wrapper.register_forward_pre_hook(count_rows, with_kwargs=True)
    torch._dynamo.reset()
    counters.clear()
    first = fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
    counting.remove()
    assert first.fd_reuse["choice"] == "device" and first.fd_reuse["bytes"] > 0
    assert sum(rows) == 2 * plain_rows  # 2 branch-passes: FD rows in pass 1, PD rows in pass 2 (not 3 or 4)
    n_graphs = graphs()
    assert n_graphs == 2  # pass 1 (FD rows, recording) and pass 2 (PD rows, replaying)
    second = fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
    assert graphs() == n_graphs, "the second generation recompiled"
    for out in (first, second):
        torch.testing.assert_close(out.images, eager.images, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.fd_images, eager.fd_images, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.images, recompute.images, rtol=0, atol=2e-5)
    assert not torch.allclose(first.images, first.fd_images)
    # FreeCure removed FASA again: the model inside is stock, the wrapper carries no hook of ours
    inner = wrapper._orig_mod
    assert not hasattr(inner, "_freecure_fasa_handle")
    assert not wrapper._forward_pre_hooks and not wrapper._forward_hooks
    assert not any(type(p).__name__.startswith("Fasa") for p in inner.attn_processors.values())


@pytest.mark.parametrize("mode", ["bias", "scale"])
def test_compiled_fd_reuse_with_both_guidance_halves_and_per_image_masks(mode):
    """style_fidelity < 1 (the unconditional PD rows read the record too), two images with their own masks,
    both modes ("scale" keeps every key): the compiled reusing path equals the eager one."""
    pipe = BUILDERS["sdxl"]()
    prompts = [PD, "a photo of sks woman with red hair"]
    call = dict(fd_prompt=[FD, "a photo of woman with red hair"], seed=0, output_type="pt", **COMMON)
    settings = dict(layers="all", omega=2.0, style_fidelity=0.5, mode=mode)
    eager = FreeCure(pipe, FakeParser(), fd_reuse="device", **settings)(prompts, **call)
    compile_denoiser(pipe)
    torch._dynamo.reset()
    counters.clear()
    out = FreeCure(pipe, FakeParser(), **settings)(prompts, **call)
    assert out.fd_reuse["choice"] == "device" and graphs() == 2
    torch.testing.assert_close(out.images, eager.images, rtol=0, atol=1e-6)


def test_a_foundation_moves_between_eager_and_compiled_pipelines():
    """Recorded eagerly and replayed compiled, recorded compiled and replayed eagerly: the same image."""
    pipe = BUILDERS["sdxl"]()
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)
    eager_found = fc.foundation(FD, seed=0, **COMMON)
    eager = eager_found.run(pipe, prompt=PD, output_type="pt").images
    compile_denoiser(pipe)
    torch._dynamo.reset()
    counters.clear()
    replayed = eager_found.run(pipe, prompt=PD, output_type="pt").images
    compiled_found = fc.foundation(FD, seed=0, **COMMON)
    assert graphs() == 2
    uncompile(pipe)
    from_compiled = compiled_found.run(pipe, prompt=PD, output_type="pt").images
    torch.testing.assert_close(replayed, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_compiled, eager, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=2 * IMAGE, width=2 * IMAGE), "pass 2 runs the model on a 16x16 grid but the foundation pass ran 8x8"),
    (dict(prompt=[PD, PD]), "batch holds 4 rows"),
])
def test_a_compiled_pass_2_that_does_not_match_is_refused_in_one_line(kwargs, match):
    """The checks the eager path makes at each layer run in the compiled wrapper's eager hook, so a mismatch is
    the same ValueError, raised before the compiled call (not a dynamo error from inside the trace)."""
    pipe = BUILDERS["sdxl"]()
    found = FreeCure(pipe, FakeParser(), layers="all", omega=2.0).foundation(FD, seed=0, **COMMON)
    compile_denoiser(pipe)
    torch._dynamo.reset()
    kw = {"prompt": PD, "output_type": "latent", "num_inference_steps": 2, "height": IMAGE, "width": IMAGE, **kwargs}
    with found.apply(pipe), pytest.raises(ValueError, match=match):
        pipe(**kw, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_apg_on_a_compiled_pipeline_compiles_once_and_matches_eager(family):
    """APG's inversion and re-denoising call the compiled model once per step with the same shapes: one more
    graph in the first generation (FASA is removed by then), none in the second."""
    pipe = BUILDERS[family]()
    common = dict(COMMON, num_inference_steps=4)
    eager = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)(PD, fd_prompt=FD, seed=0, apg=True,
                                                                  output_type="pt", **common)
    compile_denoiser(pipe)
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)
    torch._dynamo.reset()
    counters.clear()
    first = fc(PD, fd_prompt=FD, seed=0, apg=True, output_type="pt", **common)
    assert graphs() == 3  # pass 1, pass 2, APG
    second = fc(PD, fd_prompt=FD, seed=0, apg=True, output_type="pt", **common)
    assert graphs() == 3, "the second generation recompiled"
    for out in (first, second):
        torch.testing.assert_close(out.images, eager.images, rtol=0, atol=1e-6)


def test_install_fasa_accepts_compiled_models_and_pipelines():
    pipe = BUILDERS["sd1"]()
    wrapper = compile_denoiser(pipe)
    for target in (pipe, wrapper):
        with install_fasa(target, random_mask((8, 8)), layers="all", layout="cfg") as handle:
            assert handle.model is wrapper._orig_mod
            assert len(wrapper._forward_pre_hooks) == 1        # the eager bookkeeping before each compiled call
        assert not wrapper._forward_pre_hooks and not handle.model._forward_pre_hooks


def test_gating_by_step_when_the_model_is_compiled_after_install():
    """Compiled after install: the hooks are traced, so the gate comes from the scheduler's own step() calls
    (outside the compiled region). Two variants (FASA on / off), none added by a second generation."""
    pipe = BUILDERS["sd1"]()
    mask = random_mask((IMAGE, IMAGE))
    call = dict(prompt=["a photo of person", "a photo of man"], num_inference_steps=3, guidance_scale=5.0,
                height=IMAGE, width=IMAGE, output_type="pt")
    stock = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with install_fasa(pipe, mask, layers="all", steps={1}, omega=3.0):
        eager = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        compile_denoiser(pipe)
        torch._dynamo.reset()
        counters.clear()
        first = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        assert graphs() == 2
        second = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        assert graphs() == 2
    assert not torch.allclose(eager, stock)
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, eager, rtol=0, atol=1e-6)


def test_compiling_after_a_foundation_is_applied_is_refused_when_the_loop_starts():
    """Compiled after apply: no eager hooks around the compiled call carry the record's bookkeeping, so the
    run is refused in one line at set_timesteps, before any forward (not a dynamo error from the trace)."""
    pipe = BUILDERS["sd1"]()
    found = FreeCure(pipe, FakeParser(), layers="all", omega=2.0).foundation(FD, seed=0, **COMMON)
    with found.apply(pipe):
        compile_denoiser(pipe)
        with pytest.raises(ValueError, match="compiled after FASA was installed"):
            pipe(PD, latents=found.latents, output_type="latent", **COMMON)


# ---- omega sweeps and eager fallbacks (issue 25, items 3 and 6) --------------------------------------------------

OMEGAS = [2.0, 0.0, 0.25, 0.5, 1.0, 1.5, 3.0, -1.0, 4.0, 8.0]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_compiled_omega_sweep_compiles_two_graphs_and_matches_eager(family):
    """One foundation, pass 2 at 10 omegas on one compiled pipeline: omega is data the graph reads (c56a596
    guarded on it as a constant: one graph per omega, then FailOnRecompileLimitHit). 2 graphs in all (pass 1
    recording, pass 2 replaying), every image equal to eager."""
    pipe = BUILDERS[family]()
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)
    found = fc.foundation(FD, seed=0, **COMMON)
    eager = [found.run(pipe, prompt=PD, omega=w, output_type="pt").images for w in OMEGAS]
    assert (eager[0] - eager[1]).abs().max() > 1e-3                  # omega matters
    compile_denoiser(pipe)
    torch._dynamo.reset()
    counters.clear()
    compiled_found = fc.foundation(FD, seed=0, **COMMON)
    outs = [compiled_found.run(pipe, prompt=PD, omega=w, output_type="pt").images for w in OMEGAS]
    assert graphs() == 2
    for w, out, ref in zip(OMEGAS, outs, eager):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6, msg=f"omega={w}")


def test_a_compiled_install_fasa_sweeps_omega_without_recompiling():
    """The recomputing path (install_fasa on the pipeline, PD and FD rows in one batch): a new handle per
    omega, one graph for FASA on."""
    pipe = BUILDERS["sd1"]()
    mask = random_mask((IMAGE, IMAGE))
    call = dict(prompt=["a photo of person", "a photo of man"], num_inference_steps=2, guidance_scale=5.0,
                height=IMAGE, width=IMAGE, output_type="pt")
    eager = {}
    for w in OMEGAS[:4]:
        with install_fasa(pipe, mask, layers="all", omega=w):
            eager[w] = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    compile_denoiser(pipe)
    torch._dynamo.reset()
    counters.clear()
    for w in OMEGAS[:4]:
        with install_fasa(pipe, mask, layers="all", omega=w):
            out = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        torch.testing.assert_close(out, eager[w], rtol=0, atol=1e-6)
    assert graphs() == 1


@pytest.fixture
def recompile_limit_1():
    old = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 1
    torch._dynamo.reset()
    yield
    torch._dynamo.config.recompile_limit = old
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_an_eager_fallback_past_the_recompile_limit_gives_the_eager_images(family, recompile_limit_1):
    """Past the recompile limit (no fullgraph) dynamo runs the model's frame eagerly inside the compiled
    wrapper, whose eager hooks still run: the record's bookkeeping must count each call once (c56a596 counted
    it twice and failed with "pass 2 calls the model 2 times ... FLUX true CFG"). Pass 2 here is the
    recompile past the limit of 1; so is a second image size."""
    pipe = BUILDERS[family]()
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)
    sizes = [dict(COMMON), dict(COMMON, height=2 * IMAGE, width=2 * IMAGE)]
    eager = [fc.foundation(FD, seed=0, **kw).run(pipe, prompt=PD, omega=w, output_type="pt").images
             for kw in sizes for w in (1.0, 3.0)]
    attr = "transformer" if family == "flux" else "unet"
    setattr(pipe, attr, torch.compile(getattr(pipe, attr), backend="aot_eager"))
    outs = [fc.foundation(FD, seed=0, **kw).run(pipe, prompt=PD, omega=w, output_type="pt").images
            for kw in sizes for w in (1.0, 3.0)]
    for out, ref in zip(outs, eager):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_the_staged_keys_values_are_dropped_when_a_compiled_forward_ends(monkeypatch):
    """FLUX pass 2 stages padded copies of the recorded keys/values for each compiled forward: none of them
    outlives its forward (c56a596 kept the last step's until release())."""
    import gc
    import weakref

    from freecure_ops.adapters import fd_reuse

    staged = []
    orig = fd_reuse.FdRecord.stage

    def stage(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        staged.extend(weakref.ref(t) for k, v, _ in self._staged.values() for t in (k, v))
    monkeypatch.setattr(fd_reuse.FdRecord, "stage", stage)
    pipe = BUILDERS["flux"]()
    compile_denoiser(pipe)
    torch._dynamo.reset()
    found = FreeCure(pipe, FakeParser(), layers="all", omega=2.0).foundation(FD, seed=0, **COMMON)
    found.run(pipe, prompt=PD, output_type="pt")
    gc.collect()
    assert staged and all(ref() is None for ref in staged)
    assert len(found.record) > 0                                     # the record itself is kept
