#!/usr/bin/env python
"""Mutation probe: does the test suite catch small deliberate bugs?

    python tests/mutation_probe.py              # every mutant, 2 at a time; prints killed/survived
    python tests/mutation_probe.py --list       # the mutants and the tests each one runs
    python tests/mutation_probe.py --only NAME [--only NAME ...] [-j 1] [--keep]

Not part of the default pytest run (pytest collects ``test_*.py`` only) and not run by CI: run it after
changing the kernel, the backends, the validation, the adapters, the pipeline or the CLI, and keep MUTANTS
below current (a mutant whose text no longer exists is reported as STALE: update its text, don't drop it).

How it works. The working tree (tracked and untracked, not ignored files) is copied to a scratch folder per
worker, and pytest runs from the scratch root with it first on ``PYTHONPATH``: ``freecure_ops`` is then the
scratch copy's, and its finder (freecure_ops/subpackages.py) takes ``freecure_ops.kernels`` / ``.adapters`` /
``.bench`` from the folders beside it, the scratch copy's too (checked before every run: the probe refuses to
run if ``freecure_ops.kernels.fasa_fwd`` resolves elsewhere). For each mutant one text replacement is applied
to the scratch copy, the mutant's tests run with ``-x``, and the file is restored. The unmutated selection must pass first (baseline), so a kill is the mutant's doing.

Each mutant: (name, file, [(old, new), ...] alternatives (the first ``old`` found is replaced, every
occurrence), tests, description, equivalent). ``equivalent``: None, or why the mutant cannot be told
apart by any test that runs here (it is then expected to survive, and reported as EQUIVALENT).
A mutant whose selected tests all skip is reported as UNTESTED: the mutants that drop an alignment hint are
seen only by tests/test_kernel_compile.py (the interpreter computes the same answer with or without a hint; a
*wrong* hint, a stride that is not a multiple of ALIGN, gives wrong addresses there too, since the hint is the
arithmetic (s // ALIGN) * ALIGN), which skips on a Triton wheel without NVIDIA's ptxas.
Exit status: 0 when every non-equivalent mutant is killed and none is stale or untested, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    alternatives: tuple  # ((old, new), ...): the first old text present is replaced (all its occurrences)
    tests: tuple         # pytest arguments (files or node ids), relative to the repo root
    description: str
    equivalent: str | None = None


KERNEL_TESTS = ("tests/test_numerics_floor.py", "tests/test_fasa_kernel.py", "tests/test_fasa_identities.py")
BACKEND_TESTS = ("tests/test_fasa_identities.py", "tests/test_numerics_floor.py", "tests/test_fasa_kernel.py")
VALIDATION_TESTS = ("tests/test_fasa_validation.py",)
ADAPTER_TESTS = ("tests/test_knobs.py", "tests/test_adapters_unet.py", "tests/test_adapters_flux.py")
PIPELINE_TESTS = ("tests/test_knobs.py", "tests/test_freecure_pipeline.py")
CLI_TESTS = ("tests/test_knobs.py", "tests/test_cli.py")
ORACLE_TESTS = ("tests/test_oracle.py",)
MASK_TESTS = ("tests/test_fasa_mask.py",)
PACKED_TESTS = ("tests/test_fasa_mask.py", "tests/test_fasa_kernel.py")
COMPILE_TESTS = ("tests/test_kernel_compile.py",)  # offline sm_90 compile: ~45 s per changed kernel, no GPU

K = "kernels/fasa_fwd.py"
# The packed FD loop's partial (last) tile: its gathers and its exclusion of the padding past the live keys.
_PACKED_TAIL = "BINARY, MIXED_TXT, True, DOT_DTYPE, IEEE, EMPTY_ROWS, RAW_MAX)"
MUTANTS = [
    # ---- the kernel and its launcher ---------------------------------------------------------------------
    Mutant("kernel-fp16-accumulation", K,
           (("    return tl.dot(a, b)\n", "    return tl.dot(a, b, out_dtype=tl.float16)\n"),),
           KERNEL_TESTS, "fp16/bf16 tl.dot accumulates in fp16 (out_dtype=tl.float16)"),
    Mutant("kernel-no-rescale-acc", K,
           (("acc0 = acc0 * alpha[:, None] + ", "acc0 = acc0 + "),),
           KERNEL_TESTS, "online softmax: the accumulator is not rescaled when the running max grows"),
    Mutant("kernel-no-rescale-l", K,
           (("l_i = l_i * alpha + tl.sum(p, 1)", "l_i = l_i + tl.sum(p, 1)"),),
           KERNEL_TESTS, "online softmax: the row sum is not rescaled when the running max grows"),
    Mutant("kernel-log2e-truncated", K,
           (("LOG2E = 1.4426950408889634", "LOG2E = 1.4427"),),
           KERNEL_TESTS, "log2(e) truncated to 5 digits (a 3e-6 relative error in every logit)"),
    Mutant("kernel-lse-natural-log", K,
           (("* 0.6931471805599453", "* 0.6931"),),
           ("tests/test_fasa_kernel.py::test_lse_matches_reference", "tests/test_fasa_kernel.py"),
           "LSE converted back from log2 with a truncated ln(2)"),
    Mutant("kernel-omega-not-log2", K,
           (('omega if mode == "scale" else omega * LOG2E', 'omega if mode == "scale" else omega'),),
           KERNEL_TESTS, "bias-mode omega passed in the natural-log domain to a log2-domain kernel"),
    Mutant("kernel-text-rows-see-fd", K,
           (("qk = tl.where((offs_m >= N_TXT)[:, None], qk, float(\"-inf\"))",
             "qk = tl.where((offs_m >= 0)[:, None], qk, float(\"-inf\"))"),),
           KERNEL_TESTS, "FLUX: PD text query rows attend to FD image keys"),
    Mutant("kernel-pd-tail-unmasked", K,
           (('qk = tl.where((cols < NP)[None, :], qk, float("-inf"))', "qk = qk"),
            ('qk = tl.where(ok[None, :], qk, float("-inf"))\n        acc0', "qk = qk\n        acc0")),
           KERNEL_TESTS, "the padding past the last PD key is attended (zero keys, zero values)"),
    Mutant("kernel-bias-no-exclusion", K,
           (("qk = tl.where((mvals > 0)[None, :], qk + (omega * mvals)[None, :], float(\"-inf\"))",
             "qk = qk + (omega * mvals)[None, :]"),
            ("qk = tl.where(live[None, :], qk + (omega * vals)[None, :], float(\"-inf\"))",
             "qk = qk + (omega * vals)[None, :]"),
            ("qk = tl.where(live[None, :], qk, float(\"-inf\"))", "qk = qk")),
           KERNEL_TESTS, "bias mode: the padding past the live keys (zero K/V) is attended instead of excluded"),
    Mutant("kernel-scale-mode-as-bias", K,
           (("SCALE_MODE=(mode == \"scale\")", "SCALE_MODE=False"), ("SCALE_MODE=mode == \"scale\"", "SCALE_MODE=False")),
           KERNEL_TESTS, "\"scale\" mode computed as \"bias\" mode"),
    Mutant("kernel-excluded-tiles-loaded", K,
           (("skip_tiles = mode == \"bias\" and mask is not None", "skip_tiles = False"),
            ("packed = mode == \"bias\" and mask is not None", "packed = False")),
           KERNEL_TESTS, "bias mode walks every FD key instead of the live ones (excluded K/V are read)"),
    Mutant("kernel-bf16-dots-as-fp16", K,
           (("torch.bfloat16: tl.bfloat16", "torch.bfloat16: tl.float16"),),
           ("tests/test_numerics_floor.py",),
           "compiled path: bf16 inputs dotted as fp16 (the CPU interpreter upcasts bf16, so only the launch "
           "arguments show it here; on a GPU the bf16 range test overflows)"),
    Mutant("kernel-fp32-tf32", K,
           (("IEEE=(q.dtype == torch.float32)", "IEEE=False"), ("IEEE=q.dtype == torch.float32", "IEEE=False")),
           ("tests/test_numerics_floor.py",), "fp32 dots in TF32 on the compiled path"),
    Mutant("kernel-no-normalization", K,
           (("acc0 / l_i[:, None]", "acc0"), ("acc0 / l_div[:, None]", "acc0")),
           KERNEL_TESTS, "output not divided by the softmax row sum"),

    # ---- the packed "bias"-mode FD loop, the alignment hints, the tile table -----------------------------
    Mutant("kernel-packed-visits-all-tiles", K,
           (("n_full = tl.where(has_img_rows, n_live // BLOCK_N, 0)",
             "n_full = tl.where(has_img_rows, n_img // BLOCK_N, 0)"),),
           MASK_TESTS, "packed loop runs Nimg // BLOCK_N full tiles, not nnz // BLOCK_N (wasted work the "
           "visited count shows, and unchecked gathers of the padding)"),
    Mutant("kernel-text-blocks-visit-fd", K,
           (("n_full = tl.where(has_img_rows, n_live // BLOCK_N, 0)", "n_full = n_live // BLOCK_N"),),
           MASK_TESTS, "FLUX: query blocks made only of text rows still walk the FD keys (right answer, wasted "
           "work)"),
    Mutant("kernel-packed-no-row-mask", K,
           ((_PACKED_TAIL, _PACKED_TAIL.replace("True", "False")),),
           PACKED_TESTS, "packed loop: the partial tile's K/V rows gathered with no row mask and its padding not "
           "excluded (CHECK_N False: the padding lanes load FD key 0, excluded or not, and 0 * NaN reaches the "
           "output)"),
    Mutant("kernel-packed-tail-dropped", K,
           (("        if has_tail:  #", "        if has_tail & False:  #"),),
           PACKED_TESTS, "packed loop: the partial tile of live keys is never run (the last nnz % BLOCK_N keys "
           "are dropped)"),
    Mutant("kernel-binary-bias-of-row-0", K,
           (("bias = omega * tl.load(val_base)", "bias = omega * tl.load(FD_VALUE)"),),
           ("tests/test_fasa_kernel.py",), "binary loop: every batch entry takes mask row 0's value"),
    Mutant("kernel-binary-ignored", K,
           (("BINARY=packed and binary,", "BINARY=False,"),),
           ("tests/test_fasa_kernel.py",), "the launcher never takes the binary loop"),
    Mutant("kernel-split-empty-rows-unguarded", K,
           (('m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)', "m_ref = m_new"),),
           ("tests/test_fasa_kernel.py",), "split-KV: FLUX text rows' FD part computes exp2(-inf + inf) = NaN"),
    Mutant("kernel-split-empty-part-divides-by-0", K,
           (("l_div = tl.where(l_i > 0, l_i, 1.0)", "l_div = l_i"),),
           ("tests/test_fasa_kernel.py",), "split-KV: an FD part with no key writes 0 / 0 (NaN) as its output"),
    Mutant("kernel-split-merge-drops-fd", K,
           (("o = (o0 * (w0 / total)[:, None] + o1 * (w1 / total)[:, None])", "o = o0 * (w0 / total)[:, None]"),),
           ("tests/test_fasa_kernel.py",), "split-KV: the merge leaves out the FD part"),
    Mutant("kernel-packed-prefetch-current-tile", K,
           (("nxt = (t + 1) * BLOCK_N + offs_n", "nxt = t * BLOCK_N + offs_n"),),
           PACKED_TESTS, "packed loop: the index prefetch reads the current tile, not the next (tile 0 twice, "
           "the last tile never)"),
    Mutant("kernel-mask-row-stride-ignored", K,
           (("row_stride = 0 if mask is None or mask.rows.shape[0] == 1 else mask.rows.stride(0)",
             "row_stride = 0"),),
           PACKED_TESTS, "[B, Nimg] masks: every batch entry reads mask row 0 (sm_b = 0)"),
    Mutant("kernel-fd-count-stride-ignored", K,
           (("row_stride, 0 if row_stride == 0 else 1,", "row_stride, 0,"),),
           PACKED_TESTS, "[B, Nimg] masks: every batch entry takes row 0's live-key count (sc_b = 0)"),
    Mutant("kernel-fd-value-ignored", K,
           (("tl.fma(qk, sc, (omega * vals)[None, :])", "tl.fma(qk, sc, omega)"),),
           PACKED_TESTS, "packed loop: the bias is omega * 1 for every live key instead of omega * m"),
    Mutant("kernel-aligned-no-multiply", K,
           (("return (stride // ALIGN) * ALIGN", "return stride // ALIGN"),),
           KERNEL_TESTS, "_aligned drops the multiplication: every aligned stride divided by ALIGN"),
    Mutant("kernel-vector-elems-strides-unchecked", K,
           (("if sd != 1 or (sb | sh | sn) % vec or t.data_ptr() % 16:", "if sd != 1 or t.data_ptr() % 16:"),),
           ("tests/test_fasa_kernel.py::test_token_stride_not_a_multiple_of_8_takes_the_unaligned_path",
            "tests/test_kernel_compile.py"),
           "vector_elems claims 16-byte rows without checking the batch/head/token strides (the hint is "
           "arithmetic, (s // ALIGN) * ALIGN, so the interpreter computes wrong addresses for rows 67 elements "
           "apart at head dim 64)"),
    Mutant("kernel-vector-elems-never-aligned", K,
           (("    return vec\n", "    return 1\n"),),
           COMPILE_TESTS, "vector_elems never proves alignment (right answers, scalar 2-byte loads: only the "
           "offline compile test can see it)"),
    Mutant("kernel-align-hint-dropped", K,
           (("    if ALIGN > 1:\n", "    if ALIGN > 1000:\n"),),
           COMPILE_TESTS, "the kernel ignores ALIGN: head strides of 40/72 elements not proven 16-byte aligned "
           "(right answers, scalar loads: only the offline compile test can see it)"),
    Mutant("kernel-tile-config-grid-rule-inverted", K,
           (("if _cdiv(n_q, 128) * heads * batch < 2 * sm_count:",
             "if _cdiv(n_q, 128) * heads * batch >= 2 * sm_count:"),),
           COMPILE_TESTS, "tile table: 64-row query tiles for large grids, 128-row tiles for small ones",
           equivalent="performance only: both configs are correct and, per the offline compile test, neither "
           "spills nor exceeds shared memory at any compile case; the lost waves on small grids show only "
           "in GPU timings (bench/gpu_check.sh)"),
    Mutant("kernel-raw-max-for-any-scale", K,
           (("RAW_MAX=scale > 0,", "RAW_MAX=True,"),),
           ("tests/test_fasa_kernel.py::test_non_positive_scale",),
           "the running max taken on raw scores and the scale folded into the exp for a scale <= 0 too (a "
           "negative scale reverses the order: the max is the smallest logit, and the exp overflows)"),
    Mutant("kernel-text-select-dropped", K,
           (("MIXED_TXT=n_txt % bm != 0,", "MIXED_TXT=False,"),),
           KERNEL_TESTS, "FLUX: the per-element text select compiled out even where a query tile holds text and "
           "image rows (text rows attend to FD image keys)"),
    Mutant("kernel-pd-tail-v-unmasked", K,
           (("                                           svp_n, svp_d, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, True,",
             "                                           svp_n, svp_d, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, False,"),),
           ("tests/test_fasa_kernel.py::test_no_read_outside_any_input",),
           "the last PD tile loads V rows past the last PD key (weights 0, values outside the tensor)"),
    Mutant("interpreter-int-of-one-element-array", "kernels/interpreter_compat.py",
           (("int(self.handle.data.reshape(-1)[0])", "int(self.handle.data)"),),
           ("tests/test_fasa_kernel.py::test_interpreter_converts_one_element_scalars_under_any_numpy",),
           "the interpreter shim converts like Triton 3.6 (fails under numpy >= 2.4)"),
    Mutant("torch-backend-under-autocast", "freecure_ops/torch_attend.py",
           (('    if device_type in ("cpu", "cuda"):\n        return torch.autocast(device_type, enabled=False)\n',
             '    if False:\n        return torch.autocast(device_type, enabled=False)\n'),),
           ("tests/test_op_registration.py",),
           "the torch backend (and the backward) run under the caller's autocast: SDPA in bf16"),
    Mutant("validation-grad-omega-detached", "freecure_ops/validation.py",
           (("        if value.requires_grad:  # .item() would drop the graph without a word",
             "        if False:  # .item() would drop the graph without a word"),),
           VALIDATION_TESTS, "a 0-dim omega that requires grad is silently detached by .item()"),
    Mutant("api-transforms-unchecked", "freecure_ops/api.py",
           (("        _check_transforms((q, k_p, k_f, v_p, v_f), backend)", "        pass"),),
           ("tests/test_op_registration.py",),
           "torch.func transforms and dual tensors reach the op (dropped tangents, internal errors)"),
    Mutant("validation-omega-times-mask-unchecked", "freecure_ops/validation.py",
           (("    if max_value is not None and abs(omega) * max_value > F32_SAFE:",
             "    if False:"),),
           VALIDATION_TESTS, "omega * max(mask) beyond float32 reaches the kernel (NaN output)"),
    Mutant("adapters-caller-unchecked", "adapters/controller.py",
           (("        if self._owner is not None:\n            self._check_caller()", "        pass"),),
           ("tests/test_adapters_pipeline.py",),
           "a pipeline sharing the model (or num_images_per_prompt > 1) is paired from the installed "
           "pipeline's stale state"),
    Mutant("adapters-mask-checked-after-float32", "adapters/options.py",
           (("    max_value = check_mask_values(mask)\n    return mask.to(torch.float32), max_value",
             "    mask = mask.to(torch.float32)\n    return mask, check_mask_values(mask)"),),
           ("tests/test_adapters_errors.py",),
           "the adapters check a float64 mask after rounding it to float32 (1e-50 becomes 'excluded')"),
    Mutant("adapters-omega-times-mask-unchecked", "adapters/install.py",
           (("    check_omega_times_mask(omega, mask_max)  #", "    pass  #"),),
           ("tests/test_adapters_errors.py",),
           "install_fasa takes omega * max(mask) beyond float32 (NaN images)"),
    Mutant("mask-check-reads-vmap-wrapper", "freecure_ops/fasa_mask.py",
           (("    mask = _functorch_values(mask)\n", ""),), ("tests/test_op_registration.py",),
           "the value check reads a vmapped mask's BatchedTensor (no storage: vmap with a per-sample float mask "
           "fails)"),
    Mutant("adapters-unet-processor-stock-on-flux", "adapters/install.py",
           (('    if block_kind != "unet":\n        return "sdpa" if kind is _flux_attn_processor_type() '
             'and kind is not None else None\n', ""),), ("tests/test_diffusers_interplay.py",),
           "a UNet stock processor set on a FLUX layer is reclaimed by FASA's FLUX processor instead of warned "
           "about"),
    Mutant("adapters-caller-refused-while-inactive", "adapters/controller.py",
           (("        if owner is None or caller is owner or not self._acts_at(self.step):",
             "        if owner is None or caller is owner:"),), ("tests/test_adapters_pipeline.py",),
           "a direct model call is refused although FASA is disabled (its rows are the stock model's)"),
    Mutant("adapters-repeated-prompts-refused-while-inactive", "adapters/controller.py",
           (("per_prompt > 1 and self._acts_from(self.step):", "per_prompt > 1:"),),
           ("tests/test_adapters_pipeline.py",),
           "num_images_per_prompt > 1 is refused although FASA acts in no step of the call"),
    # ---- the GPU run's tools --------------------------------------------------------------------------------
    Mutant("bench-rounds-case-major", "bench/runner.py",
           (("    rounds = headline + [c for c in configs if c not in headline]\n", "    rounds = configs\n"),),
           ("tests/test_bench.py",),
           "the benchmark runs case by case: a run cut short lacks later models at the headline masks"),
    Mutant("sweep-compiles-per-case", "bench/tile_sweep.py",
           (("            key = (case.head_dim, case.n_txt > 0, cfg)", "            key = (case.name, cfg)"),),
           ("tests/test_bench.py",),
           "the sweep's precompile repeats kernels that cases of one head dim share"),

    # ---- the prepared mask ------------------------------------------------------------------------------
    Mutant("prepare-float-mask-always-binary", "freecure_ops/fasa_mask.py",
           (("return top, not any_other", "return top, True"),),
           ("tests/test_fasa_kernel.py::test_prepared_mask_records_binary",),
           "a float mask with unequal live values is recorded binary (the kernel would use one value per row)"),
    Mutant("pack-unstable-order", "freecure_ops/fasa_mask.py",
           (("dim=1, stable=True)", "dim=1, stable=False)"),),
           MASK_TESTS, "pack_live_keys: live keys first but not in key order (unstable sort)"),
    Mutant("pack-wrong-count", "freecure_ops/fasa_mask.py",
           (("live.sum(dim=1).to(torch.int32)", "(live.sum(dim=1) - 1).clamp(min=0).to(torch.int32)"),),
           MASK_TESTS, "pack_live_keys: the live-key count is one short (the last live key is dropped)"),
    Mutant("prepare-mask-view", "freecure_ops/fasa_mask.py",
           (("mask.detach().to(dtype, copy=True)", "mask.detach().to(dtype)"),),
           MASK_TESTS, "prepare_fasa_mask keeps a view of a float32 user mask instead of a copy"),
    Mutant("prepared-parts-handed-out", "freecure_ops/fasa_mask.py",
           (("return self._parts.fd_value.clone()", "return self._parts.fd_value"),),
           ("tests/test_fasa_mask.py::test_prepared_mask_part_edits_by_any_means_change_nothing",),
           "FasaMask.fd_value hands out the mask's own tensor: a write to it splits the cached torch bias from "
           "what the kernel reads"),
    Mutant("validation-prepared-rows-unchecked", "freecure_ops/validation.py",
           (("if mask.n_img != n_img or mask.n_rows not in (1, batch):", "if mask.n_img != n_img:"),),
           MASK_TESTS + VALIDATION_TESTS, "a prepared mask whose row count is neither 1 nor B is not refused"),
    Mutant("validation-prepared-device-unchecked", "freecure_ops/validation.py",
           (("\n        if mask.device != device:\n", "\n        if False:\n"),),
           MASK_TESTS + VALIDATION_TESTS, "a prepared mask on another device than q is not refused"),

    # ---- the torch backend ------------------------------------------------------------------------------
    Mutant("torch-omega-ignored", "freecure_ops/torch_keys.py",
           (("    column = omega * fd_value[:, :n_slots].to(dtype)", "    column = fd_value[:, :n_slots].to(dtype)"),),
           BACKEND_TESTS, "torch backend, bias mode: omega dropped from the live FD keys' bias (gathered and folded)"),
    Mutant("torch-pad-logit-finite-small", "freecure_ops/torch_keys.py",
           (("PAD_LOGIT = -1e30", "PAD_LOGIT = -1e3"),), ("tests/test_torch_keys.py",),
           "torch backend: padding slots of per-row masks get weight where every real logit is very negative"),
    Mutant("torch-padding-values-kept", "freecure_ops/torch_keys.py",
           (("    return out if keep is None else torch.where(keep, out, t.new_zeros(()))", "    return out"),),
           ("tests/test_torch_keys.py",),
           "torch backend: padding slots keep the V they read (NaN from an excluded key: 0 * NaN)"),
    Mutant("torch-prepared-bias-key-omega", "freecure_ops/torch_keys.py",
           (('mask.cached(("bias", n_p, omega, dtype)', 'mask.cached(("bias", n_p, dtype)'),),
           ("tests/test_prepared_cache.py",),
           "torch backend: a prepared mask's cached bias ignores omega (a later call gets the earlier omega)"),
    Mutant("torch-prepared-index-key-ntxt", "freecure_ops/torch_keys.py",
           (('mask.cached(("gather", n_txt)', 'mask.cached(("gather",)'),), ("tests/test_prepared_cache.py",),
           "torch backend: a prepared mask's cached gather index ignores n_txt (reads FD text keys)"),
    Mutant("torch-prepared-omega-ignored", "freecure_ops/torch_keys.py",
           (("    column = omega * fd_value[:, :n_slots].to(dtype)", "    column = fd_value[:, :n_slots].to(dtype)"),),
           ("tests/test_prepared_cache.py",), "torch backend, prepared mask: omega dropped from the cached bias"),
    Mutant("torch-prepared-padding-kept", "freecure_ops/torch_keys.py",
           (("    return out if keep is None else torch.where(keep, out, t.new_zeros(()))", "    return out"),),
           ("tests/test_prepared_cache.py",),
           "torch backend, prepared mask: padding slots keep the K/V they read (NaN from an excluded key)"),
    Mutant("torch-joint-view-any-storage", "freecure_ops/torch_keys.py",
           (("    if t_f.untyped_storage().data_ptr() != t_p.untyped_storage().data_ptr():", "    if False:"),),
           ("tests/test_prepared_cache.py",),
           "torch backend: PD and FD rows in two storages that sit side by side are joined into one view"),
    Mutant("torch-joint-view-any-batch", "freecure_ops/torch_keys.py",
           (("    if t_p.shape[0] != 1 or t_p.stride()[1:] != t_f.stride()[1:]:",
             "    if t_p.stride()[1:] != t_f.stride()[1:]:"),), ("tests/test_prepared_cache.py",),
           "torch backend: PD and FD rows of B > 1 joined as if each FD row followed its PD row"),
    Mutant("op-route-vmap-gathers", "freecure_ops/op.py",
           (('    Route("torch",  ANY,     "bias",  True,      torch_dense,',
             '    Route("torch",  ANY,     "bias",  True,      torch_gathered,'),),
           ("tests/test_op_dispatch.py",),
           "the dispatch table sends vmapped 'bias' calls to the gather, which reads the live count on the host"),
    Mutant("torch-text-rows-see-fd", "freecure_ops/torch_attend.py",
           (("txt, txt_lse = attend(q[:, :, :n_txt], k[:, :, :n_p], v[:, :, :n_p], pd_bias",
             "txt, txt_lse = attend(q[:, :, :n_txt], k, v, bias"),),
           BACKEND_TESTS, "torch backend, FLUX: text query rows attend to FD image keys"),

    # ---- validation -------------------------------------------------------------------------------------
    Mutant("validation-no-device-check", "freecure_ops/validation.py",
           (("        if t.device != q.device:\n", "        if False:\n"),),
           VALIDATION_TESTS, "tensors on different devices are not refused"),
    Mutant("validation-no-ntxt-np-check", "freecure_ops/validation.py",
           ((" or n_txt > n_q or n_txt > n_p:", " or n_txt > n_q:"),),
           VALIDATION_TESTS, "n_txt > Np is not refused"),
    Mutant("validation-default-scale", "freecure_ops/validation.py",
           (("scale = head_dim ** -0.5", "scale = (head_dim + 1) ** -0.5"),),
           ("tests/test_fasa_kernel.py", "tests/test_fasa_identities.py"),
           "the default scale is wrong (the oracle has its own: a shared bug would pass unseen)"),
    Mutant("validation-negative-mask-allowed", "freecure_ops/fasa_mask.py",
           (("(mask < 0)", "(mask < -1)"),), VALIDATION_TESTS + MASK_TESTS, "negative mask values above -1 pass"),
    Mutant("validation-omega-inf-allowed", "freecure_ops/validation.py",
           (("    if not math.isfinite(value):\n", "    if False:\n"),), VALIDATION_TESTS,
           "non-finite omega/scale are not refused"),
    # mask=None is read by the kernel (HAS_MASK=False) and by the torch backend (live_column, mask_rows); validation's
    # mask_as_rows, which this mutant used to change, is called by nothing since the FasaMask rewrite.
    Mutant("kernel-mask-none-not-ones", K,
           (("tl.fma(qk, sc, omega)", "tl.fma(qk, sc, 2.0 * omega)"),),
           ("tests/test_fasa_kernel.py", "tests/test_fasa_identities.py"),
           "kernel: mask=None read as all 2 instead of all ones (the oracle reads None on its own)"),
    Mutant("torch-mask-none-not-ones", "freecure_ops/torch_keys.py",  # the forward's "bias" paths
           (("return torch.full((1, n_img), omega,", "return torch.full((1, n_img), 2 * omega,"),),
           ("tests/test_fasa_identities.py", "tests/test_fasa_kernel.py"),
           "torch backend: mask=None read as all 2 instead of all ones"),

    # ---- the oracle itself ------------------------------------------------------------------------------
    Mutant("oracle-default-scale", "freecure_ops/reference.py",
           (("scale = 1.0 / math.sqrt(d)", "scale = 1.0 / math.sqrt(d + 1)"),), ORACLE_TESTS,
           "the oracle's default scale is wrong"),
    Mutant("oracle-mask-none", "freecure_ops/reference.py",
           (("        m[:, n_txt:] = 1.0\n", "        m[:, n_txt:] = 0.5\n"),), ORACLE_TESTS,
           "the oracle reads mask=None as 0.5"),

    # ---- adapters ---------------------------------------------------------------------------------------
    Mutant("adapters-style-fidelity-swapped", "adapters/attend.py",
           (("res = (1.0 - sf) * res + sf * out[pd]", "res = sf * res + (1.0 - sf) * out[pd]"),),
           ADAPTER_TESTS, "style-fidelity blend with its two weights swapped"),
    Mutant("adapters-fasa-on-cross-attn1", "adapters/unet_processor.py",
           (("use_fasa = ctl.active and encoder_hidden_states is None", "use_fasa = ctl.active"),),
           ADAPTER_TESTS, "FASA applied on an attn1 that is cross-attention (only_cross_attention blocks)"),
    Mutant("adapters-omega-ignored", "adapters/attend.py",
           (("mask, ctl.omega,", "mask, 1.0,"),), ADAPTER_TESTS, "the adapters pass omega=1.0 to the op"),
    Mutant("adapters-uncond-cond-swapped", "adapters/controller.py",
           (("return [(0, n, True), (2 * n, n, False)]", "return [(0, n, False), (2 * n, n, True)]"),),
           ADAPTER_TESTS, "cfg layout: style fidelity applied to the conditional PD rows"),
    Mutant("masks-column-major", "freecure_ops/masks.py",
           (("return out.reshape(*mask.shape[:-2], h * w)",
             "return out.transpose(-1, -2).reshape(*mask.shape[:-2], h * w)"),),
           ("tests/test_adapters_helpers.py", "tests/test_adapters_unet.py"),
           "mask tokens flattened column-major instead of row-major (y * W + x)"),

    # ---- the FreeCure pipeline --------------------------------------------------------------------------
    Mutant("freecure-omega-1", "freecure_ops/pipeline/freecure.py",
           (("install_fasa(pipe, mask, self.omega,", "install_fasa(pipe, mask, 1.0,"),
            ("install_fasa(self.pipe, mask, self.omega,", "install_fasa(self.pipe, mask, 1.0,")), PIPELINE_TESTS,
           "FreeCure passes omega=1.0 instead of its own"),
    Mutant("freecure-mode-ignored", "freecure_ops/pipeline/freecure.py",
           (("mode=self.mode, backend=self.backend", 'mode="bias", backend=self.backend'),), PIPELINE_TESTS,
           "FreeCure ignores mode"),
    Mutant("freecure-style-fidelity-ignored", "freecure_ops/pipeline/freecure.py",
           (("style_fidelity=self.style_fidelity, layout=layout", "style_fidelity=1.0, layout=layout"),),
           PIPELINE_TESTS, "FreeCure ignores style_fidelity"),
    Mutant("freecure-fd-latents-differ", "freecure_ops/pipeline/freecure.py",
           (("latents=torch.cat([latents, latents])", "latents=torch.cat([latents, -latents])"),),
           PIPELINE_TESTS, "pass 2's FD rows start from other noise than pass 1"),

    Mutant("freecure-reuse-estimate-counts-n-steps", "freecure_ops/pipeline/freecure.py",
           (("        total_steps = loop_iterations(pipe.scheduler, num_inference_steps, timesteps=timesteps, "
             "sigmas=sigmas)",
             "        total_steps = num_inference_steps * int(getattr(pipe.scheduler, 'order', 1) or 1)"),),
           ("tests/test_fd_reuse.py",),
           "the FD-reuse estimate counts num_inference_steps x order, not the scheduler's loop iterations"),
    Mutant("freecure-empty-mask-called-a-no-op-in-scale-mode", "freecure_ops/pipeline/freecure.py",
           (('        if self.mode == "bias":\n            msg = f"{which} {cause}, so FASA has nothing to do',
             '        if True:\n            msg = f"{which} {cause}, so FASA has nothing to do'),),
           ("tests/test_freecure_pipeline.py",),
           "an empty mask in 'scale' mode is reported as 'FASA has nothing to do' (it still attends every FD key)"),
    # ---- the CLI ----------------------------------------------------------------------------------------
    Mutant("cli-omega-ignored", "freecure_ops/cli/generate.py",
           (("omega=args.omega,", "omega=None,"),), CLI_TESTS, "the CLI ignores --omega"),
    Mutant("cli-mode-ignored", "freecure_ops/cli/generate.py",
           (("mode=args.mode,", 'mode="bias",'),), CLI_TESTS, "the CLI ignores --mode"),
    Mutant("cli-style-fidelity-ignored", "freecure_ops/cli/generate.py",
           (("style_fidelity=args.style_fidelity,", "style_fidelity=1.0,"),), CLI_TESTS,
           "the CLI ignores --style-fidelity"),
    Mutant("cli-backend-ignored", "freecure_ops/cli/generate.py",
           (("backend=args.backend,", 'backend="auto",'),), CLI_TESTS, "the CLI ignores --backend"),
]


# ---------------------------------------------------------------------------------------------------------------


def _files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                         capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def make_scratch(root: Path) -> Path:
    """A copy of the working tree under ``root`` whose ``freecure_ops`` package is importable as installed."""
    dst = root / "repo"
    for rel in _files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    return dst


def _env(scratch: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(scratch) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("FASA_TOL_LOG", None)
    return env


def check_imports(scratch: Path) -> None:
    code = ("import sys, freecure_ops, freecure_ops.kernels.fasa_fwd, freecure_ops.adapters.attend, freecure_ops.cli;"
            "print('\\n'.join(sys.modules[m].__file__ for m in ('freecure_ops', 'freecure_ops.kernels.fasa_fwd',"
            "'freecure_ops.adapters.attend', 'freecure_ops.cli')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=_env(scratch), capture_output=True, text=True)
    paths = res.stdout.split()
    if res.returncode != 0 or len(paths) != 4 or not all(Path(p).resolve().is_relative_to(scratch.resolve())
                                                         for p in paths):
        raise SystemExit(f"mutation_probe: the scratch copy {scratch} is not what Python imports:\n"
                         f"{res.stdout}{res.stderr}")


def run_tests(scratch: Path, tests, timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout', seconds, last output lines)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rN",
           *dict.fromkeys(tests)]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=scratch, env=_env(scratch), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-3:])
    return ("pass" if res.returncode == 0 else "fail"), time.perf_counter() - t0, tail


def apply(scratch: Path, m: Mutant) -> str | None:
    """Apply the mutant in place; returns the original text (None when no alternative applies: stale)."""
    path = scratch / m.file
    text = path.read_text()
    for old, new in m.alternatives:
        if old in text:
            path.write_text(text.replace(old, new))
            return text
    return None


def probe(m: Mutant, scratch: Path, timeout: float) -> dict:
    original = apply(scratch, m)
    if original is None:
        return dict(mutant=m, status="STALE", seconds=0.0, tail="no alternative's old text is in " + m.file)
    try:
        outcome, secs, tail = run_tests(scratch, m.tests, timeout)
    finally:
        (scratch / m.file).write_text(original)
    if outcome == "pass" and " passed" not in tail:
        status = "UNTESTED"  # every selected test skipped (e.g. the compile test on a Triton without ptxas)
    elif outcome == "pass":
        status = "EQUIVALENT" if m.equivalent else "SURVIVED"
    else:
        status = "KILLED" + (" (timeout)" if outcome == "timeout" else "")
    return dict(mutant=m, status=status, seconds=secs, tail=tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this mutant (repeatable; a prefix selects every mutant it starts)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant before it counts as killed")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folders")
    args = ap.parse_args(argv)

    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "duplicate mutant names"
    chosen = [m for m in MUTANTS if not args.only or any(m.name.startswith(o) for o in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.file:32s} {m.description}" + (f"  [equivalent: {m.equivalent}]"
                                                                     if m.equivalent else ""))
            print(f"{'':36s} tests: {' '.join(m.tests)}")
        return 0
    if not chosen:
        print(f"mutation_probe: no mutant matches {args.only}; see --list", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="fasa-mutants-"))
    jobs = max(1, min(args.jobs, len(chosen)))
    scratches = [make_scratch(tmp / f"w{i}") for i in range(jobs)]
    for s in scratches:
        check_imports(s)
    print(f"mutation_probe: {len(chosen)} mutants, {jobs} worker(s), scratch {tmp}", flush=True)

    baseline = sorted({t.split("::")[0] for m in chosen for t in m.tests})
    outcome, secs, tail = run_tests(scratches[0], baseline, args.timeout * 2)
    if outcome != "pass":
        print(f"mutation_probe: the unmutated tests fail ({outcome}); fix them first:\n{tail}", file=sys.stderr)
        return 2
    print(f"baseline: {len(baseline)} test files pass unmutated ({secs:.0f} s)", flush=True)

    free = list(scratches)
    import threading

    lock = threading.Lock()

    def work(m):
        with lock:
            s = free.pop()
        try:
            r = probe(m, s, args.timeout)
        finally:
            with lock:
                free.append(s)
        line = f"{r['status']:11s} {m.name:36s} {r['seconds']:6.1f} s  {m.description}"
        if r["status"] in ("SURVIVED", "STALE", "UNTESTED"):
            line += f"\n{'':12s}{r['tail']}"
        print(line, flush=True)
        return r

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(work, chosen))

    counts = {}
    for r in results:
        key = r["status"].split()[0]
        counts[key] = counts.get(key, 0) + 1
    print("\nsummary: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())))
    bad = [r["mutant"].name for r in results if r["status"] in ("SURVIVED", "STALE", "UNTESTED")]
    if bad:
        print("not killed: " + ", ".join(bad))
    if args.keep:
        print(f"scratch kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
