"""Keep FASA working through what diffusers does to a model that carries it.

* ``set_attn_processor`` (and so ``fuse_qkv_projections`` / ``unfuse_qkv_projections``, IP-Adapter loading and
  unloading, which go through it): afterwards the installation reclaims its layers
  (:meth:`.install.FasaHandle.reclaim`): a re-created FASA processor (diffusers builds ``type(proc)()`` for
  self-attention layers when it loads IP-Adapter weights) or a stock self-attention processor is replaced by
  the installed FASA processor again (``remove()`` restores the stock one); anything else is warned about at
  once.
* ``set_attention_slice`` (the pipelines' ``enable_attention_slicing`` / ``disable_attention_slicing``): the
  attention modules set their processors directly; the same reclaim follows (sliced processors on FASA
  layers are warned about at once, the stock one that ``disable_attention_slicing`` sets is taken back).
* ``set_default_attn_processor``: diffusers refuses processor classes it does not know with a bare ValueError;
  it reads ``attn_processors`` (below), so it sees the stock processors FASA stands in for, and FASA stays.
* IP-Adapter weights on a FLUX model whose FASA layers the IP-Adapter processors would replace (the
  double-stream blocks): refused with a one-line error before anything changes (at the pipeline's
  ``load_ip_adapter`` when install_fasa was given the pipeline, else at the model's
  ``_load_ip_adapter_weights``).
* ``attn_processors`` (the model's view of its processors, read by callers and by diffusers' own fuse / unfuse
  and IP-Adapter code): a FASA layer reports the stock processor FASA stands in for, i.e. what was set there
  (``set_attn_processor(model.attn_processors)`` then keeps FASA; a caller who just set ``AttnProcessor()``
  reads it back). FASA itself is the attention module's ``.processor`` and the handle's ``layer_names``.
* FLUX pipelines: the image grid FASA needs is recorded from the ``(h, w)`` the pipeline passes to its
  ``_prepare_latent_image_ids`` (pure Python, no host sync).

All of these are instance-level wrappers (:mod:`.patching`), undone by ``remove()``.
"""
from __future__ import annotations

from .patching import InstancePatch


def _reclaim_after(handle, source: str):
    def factory(original):
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            handle.reclaim(source)
            return out
        return wrapper
    return factory


def _flux_ip_adapter_conflicts(handle) -> list[str]:
    """FASA layers that diffusers' FLUX IP-Adapter processors would replace (the double-stream blocks)."""
    return [block.name for block, _, _ in handle._installed if block.kind == "flux_double"]


def _refuse_flux_ip_adapter(handle):
    def factory(original):
        def wrapper(*args, **kwargs):
            conflicts = _flux_ip_adapter_conflicts(handle)
            if conflicts:
                raise ValueError(f"IP-Adapter on FLUX replaces the joint attention of the double-stream blocks, where "
                                 f"FASA is installed ({len(conflicts)} layers, e.g. {conflicts[0]}): install FASA on "
                                 "single-stream blocks only (the default preset) or call handle.remove() first")
            return original(*args, **kwargs)
        return wrapper
    return factory


def _record_flux_grid(controller):
    def factory(original):
        def wrapper(*args, **kwargs):
            # FluxPipeline & co: _prepare_latent_image_ids(batch_size, height, width, device, dtype), where height
            # and width are the image-token grid (latent size / 2)
            h = kwargs["height"] if "height" in kwargs else args[1]
            w = kwargs["width"] if "width" in kwargs else args[2]
            controller.pipeline_grid = (int(h), int(w))
            return original(*args, **kwargs)
        return wrapper
    return factory


def _report_stock_processor(handle, attn):
    def factory(original):
        def wrapper(return_deprecated_lora: bool = False):
            if not return_deprecated_lora:
                for block, stock, ours in handle._installed:
                    if block.attn is attn and attn.processor is ours:
                        return stock
            return original(return_deprecated_lora)
        return wrapper
    return factory


def follow(handle, pipe=None) -> list[InstancePatch]:
    """Install the wrappers for ``handle``'s model (and ``pipe``, the pipeline install_fasa was given, if any)."""
    model = handle.model
    patches = [InstancePatch(model, "set_attn_processor", _reclaim_after(handle, "set_attn_processor"))]
    patches += [InstancePatch(block.attn, "get_processor", _report_stock_processor(handle, block.attn))
                for block, _, _ in handle._installed if callable(getattr(block.attn, "get_processor", None))]
    if callable(getattr(model, "set_attention_slice", None)):  # (enable|disable)_attention_slicing: the
        # Attention modules set their processors themselves, past set_attn_processor
        patches.append(InstancePatch(model, "set_attention_slice", _reclaim_after(handle, "set_attention_slice")))
    if handle.family == "flux":
        if callable(getattr(model, "_load_ip_adapter_weights", None)):
            patches.append(InstancePatch(model, "_load_ip_adapter_weights", _refuse_flux_ip_adapter(handle)))
        if pipe is not None and callable(getattr(pipe, "load_ip_adapter", None)):
            patches.append(InstancePatch(pipe, "load_ip_adapter", _refuse_flux_ip_adapter(handle)))
        if pipe is not None and callable(getattr(pipe, "_prepare_latent_image_ids", None)):
            patches.append(InstancePatch(pipe, "_prepare_latent_image_ids", _record_flux_grid(handle.controller)))
    return patches
