"""FASA processor for ``attn1`` of SD1.x/SD2.x/SDXL UNet transformer blocks.

It is the stock processor it replaces line for line: diffusers' ``AttnProcessor2_0`` (``kind="sdpa"``),
``FusedAttnProcessor2_0`` (``kind="fused"``) or the legacy ``AttnProcessor`` (``kind="legacy"``: baddbmm,
softmax, bmm, honouring ``attn.scale``, ``upcast_attention`` and ``upcast_softmax``), except that while FASA
is active the PD rows of the attention result are replaced by :func:`.attend.overwrite_pd_rows`. So the FD
rows (and every row while FASA is inactive) are bit-identical to the replaced processor's.
Like the stock SDPA processors the "sdpa"/"fused" kinds use SDPA's default scale ``head_dim ** -0.5``
(``attn.scale`` is the same value for every SD/SDXL layer; the stock SDPA processors ignore it); the
"legacy" kind passes ``attn.scale`` to FASA as the legacy processor uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.utils import deprecate

from .attend import overwrite_pd_rows, record_fd_rows, replay_pd_rows
from .controller import FasaController


class _Inactive:
    """The controller of a processor built without one: FASA never runs (the stock processor's behaviour)."""

    active = False
    fd_role = None


INACTIVE = _Inactive()


class FasaAttnProcessor:
    """Self-attention processor with FASA on PD rows. State lives in the shared ``controller``.

    ``FasaAttnProcessor()`` with no controller is the stock processor of its ``kind`` (diffusers re-creates
    ``type(processor)()`` for self-attention layers when it loads IP-Adapter weights; the installation then
    puts its own processor back, see :meth:`.install.FasaHandle.reclaim`)."""

    KINDS = ("sdpa", "fused", "legacy")

    def __init__(self, controller: FasaController | None = None, name: str = "", kind: str = "sdpa"):
        self.controller = INACTIVE if controller is None else controller
        self.name = name
        self.set_kind(kind)

    def set_kind(self, kind: str) -> None:
        """Follow the stock processor this one stands in for ("sdpa", "fused" or "legacy")."""
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.fused = kind == "fused"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecation_message = (
                "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise "
                "an error in the future. `scale` should directly be passed while calling the underlying pipeline "
                "component i.e., via `cross_attention_kwargs`."
            )
            deprecate("scale", "1.0.0", deprecation_message)
        ctl = self.controller
        # FASA is for self-attention only: a cross-attention attn1 (only_cross_attention blocks) stays stock.
        use_fasa = ctl.active and encoder_hidden_states is None
        if self.kind == "legacy":
            return self._legacy(attn, hidden_states, encoder_hidden_states, attention_mask, temb, use_fasa)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            if use_fasa:
                raise ValueError(f"attention_mask is not supported on a FASA self-attention layer ({self.name})")
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if self.fused and encoder_hidden_states is None:
            qkv = attn.to_qkv(hidden_states)
            split_size = qkv.shape[-1] // 3
            query, key, value = qkv.split(split_size, dim=-1)
        elif self.fused:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            query = attn.to_q(hidden_states)
            kv = attn.to_kv(encoder_hidden_states)
            split_size = kv.shape[-1] // 2
            key, value = kv.split(split_size, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        role = ctl.fd_role if use_fasa else None
        if use_fasa:
            grid = (height, width) if input_ndim == 4 else ctl.unet_grid(query.shape[2], self.name)
        if role == "replay":
            # PD rows only (FD reuse): stock attention only where the result keeps it
            hidden_states = replay_pd_rows(ctl, query, key, value, lambda rows: F.scaled_dot_product_attention(
                query[rows], key[rows], value[rows], dropout_p=0.0, is_causal=False), grid, 0, self.name)
        else:
            # the output of sdp = (batch, num_heads, seq_len, head_dim)
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        if use_fasa and role != "replay":
            if role == "record":
                record_fd_rows(ctl, key, value, grid, 0, self.name)
            else:
                hidden_states = overwrite_pd_rows(ctl, query, key, value, hidden_states, grid, 0, self.name)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states

    def _legacy(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, use_fasa):
        """diffusers' ``AttnProcessor.__call__`` line for line, plus the PD-row overwrite."""
        ctl = self.controller
        residual = hidden_states

        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None and use_fasa:
            raise ValueError(f"attention_mask is not supported on a FASA self-attention layer ({self.name})")
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        hidden_states = torch.bmm(attention_probs, value)
        if use_fasa:
            # head_to_batch_dim / bmm give contiguous [B * H, N, D]: views as [B, H, N, D], no copies
            heads = attn.heads
            as4 = (lambda t: t.view(batch_size, heads, t.shape[1], t.shape[2]))
            grid = (height, width) if input_ndim == 4 else ctl.unet_grid(query.shape[1], self.name)
            if ctl.fd_role == "record":
                record_fd_rows(ctl, as4(key), as4(value), grid, 0, self.name)
                out4 = as4(hidden_states)
            elif ctl.fd_role == "replay":
                stock4 = as4(hidden_states)
                out4 = replay_pd_rows(ctl, as4(query), as4(key), as4(value), lambda rows: stock4[rows], grid, 0,
                                      self.name, scale=attn.scale)
            else:
                out4 = overwrite_pd_rows(ctl, as4(query), as4(key), as4(value), as4(hidden_states), grid, 0,
                                         self.name, scale=attn.scale)
            hidden_states = out4.reshape(batch_size * heads, out4.shape[2], out4.shape[3])
        hidden_states = attn.batch_to_head_dim(hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states
