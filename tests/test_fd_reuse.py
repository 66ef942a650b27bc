"""FD key/value reuse in FreeCure (pass 1 records the FD keys/values FASA reads, pass 2 runs the PD rows alone)
on tiny SD1.5-, SDXL- and FLUX-style pipelines: half the batch in pass 2, the same images as the recomputing
path, a record holding only the masked keys, host placement equal to device placement, "off" as before."""
from __future__ import annotations

import pytest
import torch

from freecure_ops.adapters import fd_reuse as fdr
from freecure_ops.adapters.discovery import resolve_model
from freecure_ops.pipeline.freecure import FreeCure
from tiny_pipes import BUILDERS, IMAGE, FakeParser

PD = "a photo of sks man with red hair"
FD = "a photo of man with red hair"
COMMON = dict(num_inference_steps=2, height=IMAGE, width=IMAGE)
TOL = 2e-5


@pytest.fixture(scope="module")
def pipes():
    return {}


def get(pipes, family):
    if family not in pipes:
        pipes[family] = BUILDERS[family]()
    return pipes[family]


class BatchSpy:
    """Batch sizes of the denoiser's forwards, per FreeCure stage (the progress-bar label)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.sizes: dict = {}
        model, _ = resolve_model(pipe)
        self._h = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        desc = getattr(self.pipe, "_progress_bar_config", {}).get("desc", "")
        self.sizes.setdefault(desc, set()).add(int(x.shape[0]))

    def stage(self, word):
        return set().union(*[v for k, v in self.sizes.items() if word in k])

    def remove(self):
        self._h.remove()


@pytest.fixture
def record_spy(monkeypatch):
    """Sizes of each FdRecord before and after compaction, and its kept keys per entry."""
    seen = []
    orig = fdr.FdRecord.compact

    def compact(self, mask, mode="bias", max_value=None):
        before = self.nbytes()
        orig(self, mask, mode, max_value)
        seen.append(dict(before=before, after=self.nbytes(),
                         keys={key: (e[0].shape[2], e[2]) for key, e in self.entries.items()}, mask=mask))
    monkeypatch.setattr(fdr.FdRecord, "compact", compact)
    return seen


@pytest.mark.parametrize("family", ("sd1", "sdxl", "flux"))
def test_reuse_halves_the_batch_and_matches_recomputing(pipes, family, record_spy):
    pipe = get(pipes, family)
    outs, spies = {}, {}
    for choice in ("off", "device", "host"):
        spy = BatchSpy(pipe)
        try:
            fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, fd_reuse=choice)
            outs[choice] = fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
        finally:
            spy.remove()
        spies[choice] = spy
    off, dev, host = outs["off"], outs["device"], outs["host"]
    assert off.fd_reuse["choice"] == "off" and dev.fd_reuse["choice"] == "device" \
        and host.fd_reuse["choice"] == "host"
    # pass 1 is untouched by recording; pass 2 with reuse calls the model with half the batch
    assert torch.equal(dev.fd_images, off.fd_images) and torch.equal(host.fd_images, off.fd_images)
    full = spies["off"].stage("pass 2")
    assert full == ({4} if family != "flux" else {2})
    for choice in ("device", "host"):
        assert spies[choice].stage("pass 2") == {b // 2 for b in full}
        assert spies[choice].stage("pass 1") == spies["off"].stage("pass 1")
    # the PD image equals the recomputing path within the kernel's tolerance; host == device exactly
    assert (dev.images - off.images).abs().max().item() <= TOL
    assert torch.equal(host.images, dev.images)
    # the record held the estimate before compaction and only the masked keys after it
    assert len(record_spy) == 2
    for rec, out in zip(record_spy, (dev, host)):
        assert rec["before"] == out.fd_reuse["estimate_bytes"] > 0
        assert rec["after"] == out.fd_reuse["bytes"] == rec["before"] // 2  # hair covers the top half
        for (layer, step, uncond, call), (kept, grid) in rec["keys"].items():
            assert not uncond  # style_fidelity=1: only the conditional half is recorded
            assert kept == grid[0] * grid[1] // 2
    # FASA still acts
    assert (dev.images - dev.fd_images).abs().max().item() > 1e-3


def test_off_is_todays_behaviour(pipes):
    """fd_reuse="off" runs PD and FD in one batch; a given mask (no pass 1) is the same path."""
    pipe = get(pipes, "sd1")
    fc = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, fd_reuse="off")
    out = fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
    again = FreeCure(pipe, layers="all", omega=2.0)(PD, fd_prompt=FD, seed=0, mask=out.mask, output_type="pt",
                                                   **COMMON)
    assert again.fd_reuse["choice"] == "off" and "mask given" in again.fd_reuse["reason"]
    assert torch.equal(again.images, out.images)


@pytest.mark.parametrize("family", ("sd1", "sdxl"))
def test_style_fidelity_blend_records_both_halves(pipes, family, record_spy):
    pipe = get(pipes, family)
    res = {c: FreeCure(pipe, FakeParser(), layers="all", omega=2.0, style_fidelity=0.4, fd_reuse=c)(
        PD, fd_prompt=FD, seed=2, output_type="pt", guidance_scale=5.0, **COMMON) for c in ("off", "device")}
    assert (res["off"].images - res["device"].images).abs().max().item() <= TOL
    assert {key[2] for key in record_spy[0]["keys"]} == {True, False}


def test_apg_per_pair_masks_and_embeddings_with_reuse(pipes):
    """APG on the reused pass 2; two PD/FD pairs with different masks; PD/FD given as embeddings (pd=/fd=)."""
    pipe = get(pipes, "sd1")

    class TwoMasks(FakeParser):
        def __call__(self, image):
            self.hair_rows = 0.25 if len(self.calls) % 2 else 0.5
            return super().__call__(image)

    def enc(text):
        pe, ne = pipe.encode_prompt(text, "cpu", 1, True)
        return {"prompt_embeds": pe, "negative_prompt_embeds": ne}

    pd = {k: torch.cat([a, a]) for k, a in enc(PD).items()}
    fd = {k: torch.cat([a, a]) for k, a in enc(FD).items()}
    res = {}
    for c in ("off", "device"):
        fc = FreeCure(pipe, TwoMasks(), layers="all", omega=2.0, fd_reuse=c)
        res[c] = fc(pd=pd, fd=fd, attribute_prompt=PD, seed=4, output_type="pt", apg=True,
                    apg_template=["a photo of sks man"] * 2, **COMMON)
    assert res["device"].fd_reuse["choice"] == "device" and res["device"].mask.shape[0] == 2
    assert not torch.equal(res["device"].mask[0], res["device"].mask[1])
    assert (res["off"].images - res["device"].images).abs().max().item() <= TOL


def test_auto_placement_and_estimate(pipes):
    pipe = get(pipes, "sd1")
    fc = FreeCure(pipe, FakeParser(), layers="all", fd_reuse="auto", fd_reuse_budget=0)
    out = fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
    assert out.fd_reuse["choice"] == "off" and "budget" in out.fd_reuse["reason"] and "bytes" not in out.fd_reuse
    fc = FreeCure(pipe, FakeParser(), layers="all", fd_reuse_budget=1 << 30)
    info = fc.plan_fd_reuse(1, IMAGE, IMAGE, 2, cfg=True)
    assert info["choice"] == "device"
    # layers x steps x tokens x channels x 2 x bytes (fp32), conditional half of one image: the tiny SD1 UNet
    # has 3 blocks at 8x8 tokens x 16 channels (down 0, up 1) and the mid block at 4x4 x 32; 2 steps
    assert [b.attn.inner_dim for b in fc_blocks(pipe)] == [16, 32, 16, 16]
    assert info["estimate_bytes"] == (3 * 64 * 16 + 16 * 32) * 2 * 2 * 4 == 57344
    assert fdr.choose_placement("auto", 10, torch.device("cpu"), device_budget=5) == "off"
    assert fdr.choose_placement("auto", 10, torch.device("cpu"), device_budget=10) == "device"
    with pytest.raises(ValueError, match="fd_reuse"):
        FreeCure(pipe, layers="all", fd_reuse="gpu")
    with pytest.raises(ValueError, match="fd_reuse_budget"):
        FreeCure(pipe, layers="all", fd_reuse_budget=-1)


def fc_blocks(pipe):
    from freecure_ops.adapters.discovery import find_self_attention_blocks

    return find_self_attention_blocks(pipe)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_packed_fd_keys_are_the_same_math_and_the_text_prefix_is_never_read(backend):
    """The compacted record: live FD keys gathered by fd_index[:, :nnz], their values as the mask over the
    packed keys; FLUX's n_txt prefix rows of k_f/v_f (zeros in the record) are never read (NaN here)."""
    from freecure_ops import fasa_attention, prepare_fasa_mask

    torch.manual_seed(0)
    b, h, t, n, d = 2, 2, 5, 16, 16
    q, kp, vp, kf, vf = (torch.randn(b, h, t + n, d) for _ in range(5))
    m = torch.zeros(b, n)
    m[0, :8], m[1, 3:6] = 1.0, 0.5
    pm = prepare_fasa_mask(m)
    nnz = int(pm.fd_count.max())
    idx = pm.fd_index[:, :nnz].long()
    nan = torch.full((b, h, t, d), float("nan"))
    gather = (lambda x: torch.stack([x[i, :, t:].index_select(1, idx[i]) for i in range(b)]))
    kpk, vpk = torch.cat([nan, gather(kf)], 2), torch.cat([nan, gather(vf)], 2)
    packed = prepare_fasa_mask(pm.fd_value[:, :nnz].contiguous())
    ref = fasa_attention(q, kp, kf, vp, vf, pm, 1.5, n_txt=t, backend=backend)
    got = fasa_attention(q, kp, kpk, vp, vpk, packed, 1.5, n_txt=t, backend=backend)
    assert torch.isfinite(got).all() and (ref - got).abs().max().item() <= 1e-5


def test_reuse_with_a_subset_of_layers_and_steps(pipes, record_spy):
    """Only FASA layers and FASA steps are recorded, and the replay still equals the recomputing path."""
    pipe = get(pipes, "sd1")
    call = dict(num_inference_steps=3, height=IMAGE, width=IMAGE)
    res = {c: FreeCure(pipe, FakeParser(), layers=[1, 2], steps=[1], omega=2.0, fd_reuse=c)(
        PD, fd_prompt=FD, seed=0, output_type="pt", **call) for c in ("off", "device")}
    assert (res["off"].images - res["device"].images).abs().max().item() <= TOL
    keys = record_spy[0]["keys"]
    assert {key[1] for key in keys} == {1} and len({key[0] for key in keys}) == 2 and {key[3] for key in keys} == {0}


@pytest.mark.parametrize("case", ("scale", "empty"))
def test_reuse_in_scale_mode_and_with_an_empty_mask(pipes, case, record_spy):
    """"scale" mode excludes no key: the record keeps every key; an empty mask (empty_mask="warn") keeps one
    excluded key per grid and gives plain attention, as the recomputing path does."""
    from freecure_ops.pipeline.freecure import FreeCureWarning

    pipe = get(pipes, "sd1")
    kw = dict(mode="scale") if case == "scale" else dict(empty_mask="warn")
    parser = FakeParser() if case == "scale" else FakeParser(hair_rows=0.0)
    res = {}
    for c in ("off", "device"):
        fc = FreeCure(pipe, parser, layers="all", omega=2.0, fd_reuse=c, **kw)
        if case == "empty":
            with pytest.warns(FreeCureWarning, match="empty"):
                res[c] = fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
        else:
            res[c] = fc(PD, fd_prompt=FD, seed=0, output_type="pt", **COMMON)
    assert (res["off"].images - res["device"].images).abs().max().item() <= TOL
    rec = record_spy[0]
    if case == "scale":
        assert rec["after"] == rec["before"]
    else:
        assert all(kept == 1 for kept, _ in rec["keys"].values())


def test_flux_true_cfg_replays_each_call_of_a_step(pipes, record_spy):
    """FLUX's true CFG calls the transformer twice a step (positive, then negative prompt): each pass-2 call
    reads what the same call of pass 1 recorded, so reuse equals recomputing."""
    pipe = get(pipes, "flux")
    call = dict(COMMON, negative_prompt="glasses", true_cfg_scale=4.0)
    res = {c: FreeCure(pipe, FakeParser(), layers="all", omega=2.0, fd_reuse=c)(
        PD, fd_prompt=FD, seed=0, output_type="pt", **call) for c in ("off", "device")}
    assert (res["off"].images - res["device"].images).abs().max().item() <= TOL
    keys = record_spy[0]["keys"]
    assert {key[3] for key in keys} == {0, 1}  # two calls per (layer, step)
    assert record_spy[0]["before"] == res["device"].fd_reuse["estimate_bytes"]  # the estimate counts both


class _InfuseNetLike:
    """The part of InfiniteYou's ``FluxInfuseNetPipeline.__call__`` (bytedance/InfiniteYou aaa6ea5,
    pipelines/pipeline_flux_infusenet.py) the estimate reads: ``true_guidance_scale`` (default 1.0), and a second
    transformer call per step whenever a negative prompt (text, or both negative embeddings) is given."""

    def __call__(self, prompt=None, negative_prompt=None, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, true_guidance_scale=1.0, **kwargs):
        raise AssertionError("the estimate reads the signature only")


@pytest.mark.parametrize("pipeline, call, calls", [
    ("flux", {}, 1),
    ("flux", {"negative_prompt": "blur"}, 1),  # diffusers: true_cfg_scale defaults to 1.0
    ("flux", {"negative_prompt": "blur", "true_cfg_scale": 4.0}, 2),
    ("flux", {"negative_prompt_embeds": 1, "true_cfg_scale": 4.0}, 1),  # without pooled ones: no true CFG
    ("flux", {"negative_prompt_embeds": 1, "negative_pooled_prompt_embeds": 1, "true_cfg_scale": 4.0}, 2),
    ("infusenet", {"negative_prompt": "blur"}, 2),  # InfiniteYou: a negative prompt is enough, even at 1.0
    ("infusenet", {"negative_prompt": "blur", "true_guidance_scale": 1.0}, 2),
    ("infusenet", {"true_guidance_scale": 4.0}, 1),
    ("sd1", {"negative_prompt": "blur", "true_cfg_scale": 4.0}, 1),
])
def test_model_calls_per_step_follow_each_pipelines_true_cfg_rule(pipes, pipeline, call, calls):
    """FD reuse's size estimate counts the transformer calls per step as each pipeline makes them (the record
    itself counts them as they come: an estimate at half undersizes the placement choice)."""
    from freecure_ops.pipeline.freecure import _model_calls_per_step

    pipe = _InfuseNetLike() if pipeline == "infusenet" else get(pipes, pipeline)
    family = "sd1" if pipeline == "sd1" else "flux"
    assert _model_calls_per_step(pipe, family, call) == calls


@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "LCMScheduler"])
def test_stochastic_samplers_are_seeded_and_replayed(pipes, scheduler):
    """The per-step noise comes from the seed, one generator per image, alike in both passes: the same seed
    gives the same images whatever torch's global RNG holds, and reuse equals recomputing."""
    import diffusers

    pipe = BUILDERS["sd1"]()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    outs = {}
    for c, global_seed in (("off", 1), ("off", 2), ("device", 3)):
        torch.manual_seed(global_seed)
        outs[c, global_seed] = FreeCure(pipe, FakeParser(), layers="all", omega=2.0, fd_reuse=c)(
            PD, fd_prompt=FD, seed=0, output_type="pt", num_inference_steps=3, height=IMAGE, width=IMAGE)
    a, b, r = outs["off", 1], outs["off", 2], outs["device", 3]
    assert torch.equal(a.images, b.images) and torch.equal(a.fd_images, b.fd_images)
    assert (a.images - r.images).abs().max().item() <= TOL
    other = FreeCure(pipe, FakeParser(), layers="all", omega=2.0)(
        PD, fd_prompt=FD, seed=5, output_type="pt", num_inference_steps=3, height=IMAGE, width=IMAGE)
    assert not torch.equal(other.fd_images, a.fd_images)


@pytest.mark.parametrize("scheduler,config,steps", [
    ("PNDMScheduler", dict(skip_prk_steps=True), None),        # N + 1 loop iterations
    ("PNDMScheduler", dict(skip_prk_steps=True), [0, 5, 9]),   # step 5 exists (the 6th iteration), 9 does not
    ("HeunDiscreteScheduler", {}, None),                       # 2N - 1
    ("KDPM2DiscreteScheduler", {}, [1, 8, 9]),                 # 9 exists, not 10
])
def test_the_estimate_counts_the_loop_iterations_the_scheduler_runs(pipes, record_spy, scheduler, config, steps):
    """The record holds one entry per FASA layer and loop iteration (the scheduler's, not num_inference_steps x
    order): the estimate made before pass 1 is exactly what pass 1 records."""
    import diffusers

    pipe = BUILDERS["sd1"]()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **config)
    fc = FreeCure(pipe, FakeParser(), layers="all", steps=steps, fd_reuse="device")
    iterations = []
    out = fc(PD, fd_prompt=FD, seed=0, output_type="pt", num_inference_steps=5, height=IMAGE, width=IMAGE,
             callback_on_step_end=lambda p, i, t, kw: iterations.append(i) or kw)
    n_iter = len(iterations) // 2                               # pass 1 and pass 2
    assert n_iter == (6 if scheduler == "PNDMScheduler" else 9)
    assert {key[1] for key in record_spy[0]["keys"]} == {i for i in range(n_iter) if steps is None or i in steps}
    assert record_spy[0]["before"] == out.fd_reuse["estimate_bytes"] > 0


def test_the_estimate_follows_a_custom_schedule(pipes, record_spy):
    """FLUX (a flow-matching scheduler with dynamic shifting) with custom sigmas: 3 iterations, whatever
    num_inference_steps says."""
    fc = FreeCure(get(pipes, "flux"), FakeParser(), layers="all", fd_reuse="device")
    out = fc(PD, fd_prompt=FD, seed=0, output_type="pt", sigmas=[1.0, 0.6, 0.3], **COMMON)
    assert {key[1] for key in record_spy[0]["keys"]} == {0, 1, 2}
    assert record_spy[0]["before"] == out.fd_reuse["estimate_bytes"] > 0
