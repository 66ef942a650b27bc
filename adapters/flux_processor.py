"""FASA processor for the joint attention of FLUX double- and single-stream blocks.

It is diffusers' ``FluxAttnProcessor`` line for line (fused or separate projections, QK-norm, text/image
concat, RoPE, the process-wide attention backend for the stock attention, output projections), except that
while FASA is active the PD rows of the attention result are replaced by
:func:`.attend.overwrite_pd_rows`. The joint sequence
is ``[text, image]``; the kernel's ``n_txt`` variant keeps FD out of everything but the image-image block.
Single-stream blocks get the text length from the transformer pre-hook.

This module needs diffusers' FLUX pieces (``attention_dispatch``, diffusers >= 0.35): nothing imports it
until a FLUX model gets FASA, so SD/SDXL work without them.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn  # diffusers >= 0.35; imported lazily
from diffusers.models.embeddings import apply_rotary_emb

from .attend import overwrite_pd_rows, record_fd_rows, replay_pd_rows
from .controller import FasaController
from .unet_processor import INACTIVE


def _qkv_projections(attn, hidden_states, encoder_hidden_states=None):
    """diffusers' ``_get_qkv_projections`` of transformer_flux.py."""
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        encoder_query = encoder_key = encoder_value = (None,)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            encoder_query, encoder_key, encoder_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, encoder_query, encoder_key, encoder_value
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    encoder_query = encoder_key = encoder_value = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        encoder_query = attn.add_q_proj(encoder_hidden_states)
        encoder_key = attn.add_k_proj(encoder_hidden_states)
        encoder_value = attn.add_v_proj(encoder_hidden_states)
    return query, key, value, encoder_query, encoder_key, encoder_value


class FasaFluxAttnProcessor:
    """Joint-attention processor with FASA on PD rows. State lives in the shared ``controller``; without one
    (``FasaFluxAttnProcessor()``, as diffusers re-creates processors) it is the stock ``FluxAttnProcessor``."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, controller: FasaController | None = None, name: str = ""):
        self.controller = INACTIVE if controller is None else controller
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        ctl = self.controller
        use_fasa = ctl.active
        if use_fasa and attention_mask is not None:
            raise ValueError(f"attention_mask is not supported on a FASA self-attention layer ({self.name})")
        if use_fasa and self._parallel_config is not None:
            raise ValueError(f"context parallelism is not supported on a FASA layer ({self.name})")

        query, key, value, encoder_query, encoder_key, encoder_value = _qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        role = ctl.fd_role if use_fasa else None
        if use_fasa:
            if encoder_hidden_states is not None:
                n_txt = encoder_hidden_states.shape[1]
            elif ctl.n_txt is not None:
                n_txt = ctl.n_txt
            else:
                raise ValueError(f"FASA at {self.name} needs the text length: call the transformer itself")
            grid = ctl.flux_grid(query.shape[1] - n_txt, self.name)
        if role == "replay":
            # PD rows only (FD reuse): stock attention only where the result keeps it
            def stock(rows):
                return dispatch_attention_fn(query[rows], key[rows], value[rows], attn_mask=None,
                                             backend=self._attention_backend,
                                             parallel_config=self._parallel_config).transpose(1, 2)

            hidden_states = replay_pd_rows(ctl, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                           stock, grid, n_txt, self.name).transpose(1, 2)
        else:
            hidden_states = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        if role == "record":
            record_fd_rows(ctl, key.transpose(1, 2), value.transpose(1, 2), grid, n_txt, self.name)
        elif use_fasa and role is None:
            hidden_states = overwrite_pd_rows(ctl, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                              hidden_states.transpose(1, 2), grid, n_txt, self.name).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states

