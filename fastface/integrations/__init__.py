"""Using fastface's identity attention and hooks inside another framework's UNet (diffusers, without importing it).

A foreign UNet gets the same hook points as ours once each cross-attention layer carries an
:class:`~fastface.models.attention.IdentityAttention`; then ``fastface.attach`` works on it unchanged, given a
:class:`~fastface.hooks.CallSpec` that says where its forward takes its inputs. For diffusers'
``UNet2DConditionModel``, :class:`DiffusersIdentityProcessor` is an attention processor (an ``nn.Module``, so it
and its hook points are registered under the layer: ``<layer>.processor.ip.probs``) that computes SDXL attention as
diffusers' ``AttnProcessor2_0`` does plus the decoupled identity branch, reading ``id_tokens`` / ``id_scale`` from
``cross_attention_kwargs``; :data:`DIFFUSERS_ID_SPEC` is the matching call spec.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from fastface.hooks import CallSpec
from fastface.models.attention import IdentityAttention, attention, merge_heads, split_heads

logger = logging.getLogger(__name__)

__all__ = ["DIFFUSERS_ID_SPEC", "DIFFUSERS_UNET", "DiffusersIdentityProcessor", "install_diffusers_identity"]

# diffusers' UNet2DConditionModel with its own IP-Adapter (the drop-in, fastface.integrations.diffusers):
# unet(sample, timestep, encoder_hidden_states, added_cond_kwargs={"image_embeds": [...], ...}).
DIFFUSERS_UNET = CallSpec(
    x="sample",
    t="timestep",
    text=("encoder_hidden_states", "added_cond_kwargs.text_embeds"),
    id=("added_cond_kwargs.image_embeds",),
    batch=("added_cond_kwargs.time_ids", "timestep_cond"),
)

# unet(sample, timestep, encoder_hidden_states, added_cond_kwargs={...}, cross_attention_kwargs={"id_tokens": ...})
DIFFUSERS_ID_SPEC = CallSpec(
    x="sample",
    t="timestep",
    text=("encoder_hidden_states", "added_cond_kwargs.text_embeds"),
    id=("cross_attention_kwargs.id_tokens",),
    batch=("added_cond_kwargs.time_ids", "cross_attention_kwargs.id_scale", "timestep_cond"),
)


class DiffusersIdentityProcessor(nn.Module):
    """A diffusers attention processor for SDXL cross-attention with fastface's decoupled identity branch ``ip``.

    Text attention as ``AttnProcessor2_0`` computes it for SDXL's transformer blocks (no masks, norms or residual
    inside the attention); the identity branch and its hook points are :class:`IdentityAttention`'s.
    """

    def __init__(self, ip: IdentityAttention) -> None:
        super().__init__()
        self.ip = ip

    def __call__(  # diffusers calls processors directly, not through nn.Module.__call__
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        id_tokens: torch.Tensor | None = None,
        id_scale: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or getattr(attn, "spatial_norm", None) is not None or attn.residual_connection:
            raise ValueError("DiffusersIdentityProcessor supports SDXL cross-attention only (no masks or norms)")
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = split_heads(attn.to_q(hidden_states), attn.heads)  # [B, H, N, d]
        o = attention(q, split_heads(attn.to_k(ctx), attn.heads), split_heads(attn.to_v(ctx), attn.heads))
        if id_tokens is not None:
            b = hidden_states.shape[0]
            if id_scale is not None and not torch.is_tensor(id_scale):
                id_scale = torch.full((b,), float(id_scale), dtype=q.dtype, device=q.device)
            elif id_scale is not None:
                id_scale = id_scale.to(device=q.device, dtype=q.dtype).reshape(-1).expand(b)
            o = self.ip(q, o, id_tokens, id_scale)
        out = attn.to_out[0](merge_heads(o))
        return attn.to_out[1](out) / attn.rescale_output_factor


def install_diffusers_identity(unet: nn.Module, weights: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """Give every cross-attention layer of a diffusers UNet a :class:`DiffusersIdentityProcessor`.

    ``weights`` maps the checkpoint index i (odd, diffusers' ``attn_processors`` order, as IP-Adapter files index
    layers) to ``(to_k_ip.weight, to_v_ip.weight)``. Returns the processor names that were replaced. The original
    processors come back with ``unet.set_default_attn_processor()`` or by saving ``unet.attn_processors`` first.
    """
    procs = dict(unet.attn_processors)
    names = list(procs)
    modules = dict(unet.named_modules())
    replaced = []
    for i, name in enumerate(names):
        if not name.endswith("attn2.processor"):
            continue
        if i not in weights:
            raise ValueError(f"no identity weights for layer {i} ({name}); expected every odd index 1..{len(names) - 1}")
        attn = modules[name.removesuffix(".processor")]
        k, v = weights[i]
        dim, ctx_dim = k.shape
        ip = IdentityAttention(dim, ctx_dim, attn.heads, dim // attn.heads).to(device=k.device, dtype=k.dtype)
        ip.to_k_ip.weight.data.copy_(k)
        ip.to_v_ip.weight.data.copy_(v)
        procs[name] = DiffusersIdentityProcessor(ip)
        replaced.append(name)
    unet.set_attn_processor(procs)
    logger.debug("installed %d identity processors", len(replaced))
    return replaced
