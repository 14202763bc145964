"""PuLID for SDXL (Guo et al. 2024, "PuLID: Pure and Lightning ID Customization via Contrastive Alignment"), v1 and v1.1.

Reads the released files and computes what ToTheBeginning/PuLID computes (``pulid/encoders.py``,
``encoders_transformer.py``, ``attention_processor.py::IDAttnProcessor2_0``):

* ``pulid_v1.bin`` (flat torch pickle, fp32): ``id_adapter.*`` = :class:`IDEncoder` (10 tokens: 5 from the 1280-d
  ``id_cond`` + one per EVA layer) and ``id_adapter_attn_layers.{i}.id_to_k/id_to_v.weight`` for the odd (cross-
  attention) indices ``i`` of ``unet.attention_layers()``.
* ``pulid_v1.1.safetensors`` (fp16): ``id_adapter.*`` = :class:`IDFormer` (32 tokens; several reference images are
  concatenated along tokens) and the same attention keys.
* The ComfyUI conversion (``image_proj.*`` + ``ip_adapter.{i}.to_k_ip/to_v_ip.weight``, v1 only) is accepted too.

The identity attention (:class:`PuLIDAttention`, an :class:`~fastface.models.attention.IdentityAttention`) appends
``num_zero`` zero tokens (zero keys and values: each adds ``exp(0)`` to the softmax denominator only) and combines the
text output ``O_t`` and identity output ``O_id`` per upstream's module switches:

* ``plain``:    ``O = O_t + s·O_id``
* ``ortho``:    ``P = (Σ_n O_t⊙O_id / Σ_n O_t⊙O_t)⊙O_t`` (sums over the spatial axis, per channel),
  ``O = O_t + s·(O_id − P)``
* ``ortho_v2``: ``O = O_t + s·(O_id + (a − 1)·P)`` with ``a`` the head-averaged mass of an **unscaled** softmax
  ``softmax(Q K_idᵀ)`` (zero tokens in the denominator) on the first 5 identity tokens.

The two ortho variants run in fp32 and cast back, as upstream; the identity K/V projections are kept in fp32 by default
(upstream never casts them to the UNet's fp16) and their outputs are cast to the query dtype.

FastFace's AM on PuLID: the ``probs`` hook point carries the softmax map of the **identity tokens only** (v1: all 10,
v1.1: all 32), ``[B, H, N, T]``, normalised with the zero tokens in the denominator. The zero tokens are not
exposed: their values are zero, so no transform of their columns could change the output; what they do (damping)
is kept in the normalisation. AM targets every identity token and inverts none (``invert_first`` is for
FaceID-Plus-v2's background token; PuLID's tokens come from a background-whitened, greyed face and none of them
encodes the background). ORTHO_v2's gate ``a`` is computed from its own unscaled map, as upstream, so AM changes
``O_id`` but not the gate.

Typical use::

    pulid = PuLID.from_file("pulid_v1.bin")
    tokens = pulid.encode(id_cond, eva_hidden)            # [B, 10, 2048]
    null = pulid.null_tokens()                            # encoder of zeros (the CFG / DCG null identity)
    with pulid.install(unet, mode="fidelity") as handle:  # num_zero 8 + ORTHO_v2
        eps = unet(x, t, ctx, text_embeds=..., time_ids=..., id_tokens=tokens, id_scale=0.8)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fastface.models.attention import IdentityAttention, split_heads
from fastface.models.loading import WeightFormatError, assign_state_dict, read_weights

from .base import InstallHandle, attention_layers_for, tensor_shape
from .faceid import PerceiverAttention, feed_forward

logger = logging.getLogger(__name__)

Version = Literal["v1", "v1.1"]
Projection = Literal["plain", "ortho", "ortho_v2"]
StateDict = dict[str, torch.Tensor]

PROJECTIONS: tuple[str, ...] = ("plain", "ortho", "ortho_v2")
GATE_TOKENS = 5  # ORTHO_v2: attention mass on the first 5 identity tokens (upstream's attn_mean[:, :, :5])

__all__ = [
    "PuLIDEncoderConfig",
    "PULID_ENCODER_CONFIGS",
    "PuLIDMode",
    "PULID_MODES",
    "IDEncoder",
    "IDFormer",
    "PuLIDAttention",
    "PuLID",
    "PuLIDHandle",
    "split_pulid_state_dict",
    "stack_identities",
]


# ----------------------------------------------------------------------------------------------------------------
# Configs and modes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PuLIDEncoderConfig:
    """Shapes of the ``id_adapter`` (defaults: the released SDXL files). ``context_dim`` is the token width."""

    version: Version = "v1"
    id_dim: int = 1280  # antelopev2 embedding (512) ‖ normalised EVA CLS projection (768)
    vit_dim: int = 1024  # EVA hidden width
    hidden: int = 1024  # hidden width of the mapping MLPs
    context_dim: int = 2048
    num_id_tokens: int = 5
    num_vit_layers: int = 5
    body_hidden: tuple[int, int] = (1024, 1024)  # v1 body: min(C·5/4, 1024), min(C·5/2, 1024)
    dim: int = 1024  # v1.1 latent width
    depth: int = 10  # v1.1 perceiver layers (depth / num_vit_layers per EVA layer)
    heads: int = 16
    dim_head: int = 64
    num_queries: int = 32
    ff_mult: int = 4

    def __post_init__(self) -> None:
        if self.version not in ("v1", "v1.1"):
            raise ValueError(f"PuLIDEncoderConfig.version must be 'v1' or 'v1.1', got {self.version!r}")
        if self.version == "v1.1" and (self.depth % self.num_vit_layers or self.depth < self.num_vit_layers):
            raise ValueError(f"IDFormer depth {self.depth} must be a multiple of the {self.num_vit_layers} EVA layers")

    @property
    def num_tokens(self) -> int:
        """Identity tokens per reference image: 10 (v1) or 32 (v1.1, whatever the number of images)."""
        return self.num_id_tokens + self.num_vit_layers if self.version == "v1" else self.num_queries


PULID_ENCODER_CONFIGS: dict[str, PuLIDEncoderConfig] = {
    "v1": PuLIDEncoderConfig(),
    "v1.1": PuLIDEncoderConfig(version="v1.1"),
    # Tiny: the tiny UNet's 64-wide tokens, the tiny EVA tower (width 64, 32-d projection).
    "v1-tiny": PuLIDEncoderConfig(id_dim=544, vit_dim=64, hidden=64, context_dim=64, body_hidden=(80, 160)),
    "v1.1-tiny": PuLIDEncoderConfig(
        version="v1.1", id_dim=544, vit_dim=64, hidden=64, context_dim=64, dim=128, depth=5, heads=2, num_queries=8,
        ff_mult=2,
    ),
}


@dataclass(frozen=True)
class PuLIDMode:
    """Upstream's module switches: ``NUM_ZERO`` zero tokens and the ``projection`` (ORTHO / ORTHO_v2 / neither)."""

    num_zero: int = 0
    projection: Projection = "plain"

    def __post_init__(self) -> None:
        if isinstance(self.num_zero, bool) or not isinstance(self.num_zero, int) or self.num_zero < 0:
            raise ValueError(f"num_zero must be an integer >= 0, got {self.num_zero!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")


PULID_MODES: dict[str, PuLIDMode] = {
    "fidelity": PuLIDMode(8, "ortho_v2"),  # app.py default (v1)
    "style": PuLIDMode(16, "ortho"),  # app.py "extremely style" (v1)
    "v1.1": PuLIDMode(20, "ortho_v2"),  # app_v1_1.py
    "plain": PuLIDMode(0, "plain"),
}
DEFAULT_MODE: dict[str, str] = {"v1": "fidelity", "v1.1": "v1.1"}


def _resolve_mode(mode: str | PuLIDMode | None, version: Version, num_zero: int | None, projection: str | None) -> PuLIDMode:
    if mode is None:
        mode = DEFAULT_MODE[version]
    if isinstance(mode, str):
        if mode not in PULID_MODES:
            raise ValueError(f"unknown PuLID mode {mode!r}; known: {sorted(PULID_MODES)}")
        mode = PULID_MODES[mode]
    if not isinstance(mode, PuLIDMode):
        raise ValueError(f"mode must be a PuLIDMode or a name in {sorted(PULID_MODES)}, got {mode!r}")
    return PuLIDMode(
        mode.num_zero if num_zero is None else num_zero, mode.projection if projection is None else projection
    )


# ----------------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------------


def _mlp(d_in: int, h1: int, h2: int, d_out: int) -> nn.Sequential:
    """Lin-LN-LReLU-Lin-LN-LReLU-Lin (keys .0/.1/.3/.4/.6), LeakyReLU slope 0.01, LayerNorm eps 1e-5."""
    return nn.Sequential(
        nn.Linear(d_in, h1), nn.LayerNorm(h1), nn.LeakyReLU(),
        nn.Linear(h1, h2), nn.LayerNorm(h2), nn.LeakyReLU(),
        nn.Linear(h2, d_out),
    )  # fmt: skip


class IDEncoder(nn.Module):
    """PuLID v1 ``IDEncoder``: ``cat(reshape(body(id_cond), 5×C), [mapping_j(y_j[:, :1])
    + mean_n mapping_patch_j(y_j[:, 1:])]_j)``."""

    def __init__(self, config: PuLIDEncoderConfig) -> None:
        super().__init__()
        c = self.config = config
        h1, h2 = c.body_hidden
        self.body = _mlp(c.id_dim, h1, h2, c.context_dim * c.num_id_tokens)
        for j in range(c.num_vit_layers):
            setattr(self, f"mapping_{j}", _mlp(c.vit_dim, c.hidden, c.hidden, c.context_dim))
            setattr(self, f"mapping_patch_{j}", _mlp(c.vit_dim, c.hidden, c.hidden, c.context_dim))

    def forward(self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """[B, id_dim], num_vit_layers × [B, 1+P, vit_dim] -> [B, 10, C]."""
        c = self.config
        x = self.body(id_cond).reshape(-1, c.num_id_tokens, c.context_dim)
        toks = [
            getattr(self, f"mapping_{j}")(y[:, :1]) + getattr(self, f"mapping_patch_{j}")(y[:, 1:]).mean(dim=1, keepdim=True)
            for j, y in enumerate(vit_hidden)
        ]  # the patch MLP is applied before the mean, as upstream
        return torch.cat([x, *toks], dim=1)


class IDFormer(nn.Module):
    """PuLID v1.1 ``IDFormer``: a perceiver over [32 queries ‖ 5n id tokens] reading the EVA layers stage by stage."""

    def __init__(self, config: PuLIDEncoderConfig) -> None:
        super().__init__()
        c = self.config = config
        # upstream's init (randn / sqrt(dim), scale * randn); a loaded file replaces both
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) * c.dim**-0.5)
        self.proj_out = nn.Parameter(torch.randn(c.dim, c.context_dim) * c.dim**-0.5)  # used as latents @ proj_out
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads), feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth)
        )
        for j in range(c.num_vit_layers):
            setattr(self, f"mapping_{j}", _mlp(c.vit_dim, c.hidden, c.hidden, c.dim))
        self.id_embedding_mapping = _mlp(c.id_dim, c.hidden, c.hidden, c.dim * c.num_id_tokens)

    def forward(self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """[B, id_dim] or [B, n, id_dim] (n images), num_vit_layers × [B, n·(1+P), vit_dim] -> [B, Q, C]."""
        c = self.config
        n = id_cond.shape[1] if id_cond.ndim == 3 else 1
        latents = self.latents.repeat(id_cond.shape[0], 1, 1)
        x = self.id_embedding_mapping(id_cond).reshape(-1, c.num_id_tokens * n, c.dim)  # [B, 5n, dim]
        latents = torch.cat([latents, x], dim=1)
        per_stage = c.depth // c.num_vit_layers
        for j, y in enumerate(vit_hidden):
            ctx = torch.cat([x, getattr(self, f"mapping_{j}")(y)], dim=1)
            for attn, ff in self.layers[j * per_stage : (j + 1) * per_stage]:
                latents = attn(ctx, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : c.num_queries] @ self.proj_out


def build_encoder(config: PuLIDEncoderConfig) -> IDEncoder | IDFormer:
    return IDEncoder(config) if config.version == "v1" else IDFormer(config)


# ----------------------------------------------------------------------------------------------------------------
# Identity attention
# ----------------------------------------------------------------------------------------------------------------


class PuLIDAttention(IdentityAttention):
    """PuLID's identity branch (``IDAttnProcessor2_0``): zero tokens, plain / ORTHO / ORTHO_v2 combination.

    ``to_k_ip``/``to_v_ip`` hold the file's ``id_to_k``/``id_to_v``. ``probs`` carries the map of the identity tokens
    ``[B, H, N, T]`` (zero tokens only in the denominator); ``head_out`` the per-head output.
    """

    def __init__(
        self, dim: int, context_dim: int, heads: int, head_dim: int, *, num_zero: int = 0, projection: Projection = "plain"
    ) -> None:
        super().__init__(dim, context_dim, heads, head_dim)
        self.set_mode(PuLIDMode(num_zero, projection))

    def set_mode(self, mode: PuLIDMode) -> None:
        self.num_zero, self.projection = mode.num_zero, mode.projection

    def _with_zeros(self, logits: torch.Tensor) -> torch.Tensor:
        # zero keys give zero logits: [B, H, N, T] -> [B, H, N, T + num_zero]
        if not self.num_zero:
            return logits
        return torch.cat([logits, logits.new_zeros(*logits.shape[:-1], self.num_zero)], dim=-1)

    def forward(
        self, q: torch.Tensor, o_txt: torch.Tensor, tokens: torch.Tensor, scale: torch.Tensor | None
    ) -> torch.Tensor:
        tokens = tokens.to(self.to_k_ip.weight.dtype)  # fp32 projections as upstream, cast to the query dtype
        k = split_heads(self.to_k_ip(tokens), self.heads).to(q.dtype)  # [B, H, T, d]
        v = split_heads(self.to_v_ip(tokens), self.heads).to(q.dtype)
        t = k.shape[2]
        logits = q @ k.transpose(-1, -2)  # [B, H, N, T], unscaled
        a = torch.softmax(self._with_zeros(logits * self.head_dim**-0.5), dim=-1)[..., :t]
        a_t = self.probs(a)
        o_id = self.head_out(a_t @ v, a, v)  # [B, H, N, d]
        gate = None
        if self.projection == "ortho_v2":
            # upstream: softmax(query @ id_key^T) without 1/sqrt(d), mean over heads, mass on the first 5 tokens
            mass = torch.softmax(self._with_zeros(logits), dim=-1).mean(dim=1, keepdim=True)  # [B, 1, N, T+z]
            gate = mass[..., :GATE_TOKENS].sum(dim=-1, keepdim=True)  # [B, 1, N, 1]
        return self.combine(o_txt, o_id, scale, gate)

    def combine(
        self, o_txt: torch.Tensor, o_id: torch.Tensor, scale: torch.Tensor | None, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Plain, ORTHO or ORTHO_v2 combination (module doc); the ortho variants in fp32, cast back."""
        if self.projection == "plain":
            return super().combine(o_txt, o_id, scale)
        dtype = o_txt.dtype
        ot, oi = o_txt.float(), o_id.float()
        # projection of O_id on O_t, per batch element and channel (h, d): sums over the spatial axis N
        num, den = (ot * oi).sum(dim=-2, keepdim=True), (ot * ot).sum(dim=-2, keepdim=True)
        # A channel whose text output is exactly zero (e.g. a zero "null text" context: zero keys and values) has
        # no direction to project on: P = 0 there, where upstream's 0/0 would give NaN. Identical elsewhere.
        proj = torch.where(den > 0, num / den, torch.zeros_like(num)) * ot
        if self.projection == "ortho":
            orth = oi - proj
        else:
            if gate is None:
                raise ValueError("ORTHO_v2 needs the attention-mass gate (call forward, not combine)")
            orth = oi + (gate - 1).float() * proj  # (a - 1) in the query dtype, as upstream
        s = 1.0 if scale is None else scale.float().view(-1, 1, 1, 1)
        return (ot + s * orth).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Reading a file
# ----------------------------------------------------------------------------------------------------------------

_ATTN_RE = re.compile(r"^(\d+)\.(id_to_k|id_to_v|to_k_ip|to_v_ip)\.weight$")


def split_pulid_state_dict(obj: Mapping, source: str) -> tuple[StateDict, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """``(id_adapter, {i: (W_k, W_v)})`` from a PuLID file: the released flat layout or ComfyUI's conversion."""
    if isinstance(obj.get("image_proj"), Mapping) and isinstance(obj.get("ip_adapter"), Mapping):
        enc, attn = dict(obj["image_proj"]), dict(obj["ip_adapter"])
    else:
        enc, attn, other = {}, {}, []
        for key, value in obj.items():
            for enc_p, attn_p in (("id_adapter.", "id_adapter_attn_layers."), ("image_proj.", "ip_adapter.")):
                if key.startswith(attn_p):
                    attn[key[len(attn_p):]] = value
                    break
                if key.startswith(enc_p):
                    enc[key[len(enc_p):]] = value
                    break
            else:
                other.append(key)
        if other or not enc or not attn:
            shown = ", ".join(sorted(map(str, obj))[:8]) or "nothing"
            hint = ""
            if "proj.0.weight" in enc or "perceiver_resampler.proj_in.weight" in enc or "norm.weight" in enc:
                hint = " This looks like an IP-Adapter file; load it with fastface.adapters.ip_adapter instead."
            raise WeightFormatError(
                f"{source}: not a PuLID file: expected keys 'id_adapter.*' and 'id_adapter_attn_layers.*' "
                f"(pulid_v1.bin / pulid_v1.1.safetensors) or ComfyUI's 'image_proj.*' and 'ip_adapter.*'; found {shown}"
                + (f" (and {len(other)} other keys)" if other and enc and attn else "") + "." + hint
            )
    bad = [k for k, v in {**enc, **attn}.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightFormatError(f"{source}: entries that are not tensors: {sorted(bad)[:6]}")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in attn.items():
        m = _ATTN_RE.match(key)
        if m is None:
            raise WeightFormatError(
                f"{source}: unexpected attention key '{key}'; expected '{{i}}.id_to_k.weight' / '{{i}}.id_to_v.weight' "
                "(or ComfyUI's '{i}.to_k_ip.weight' / '{i}.to_v_ip.weight')"
            )
        layers.setdefault(int(m.group(1)), {})["k" if m.group(2) in ("id_to_k", "to_k_ip") else "v"] = value
    n = max(layers) + 1 if layers else 0
    want = list(range(1, n, 2))
    problems = [i for i in layers if i % 2 == 0] + [i for i in want if set(layers.get(i, {})) != {"k", "v"}]
    if n % 2 or problems:
        raise WeightFormatError(
            f"{source}: the attention weights are not a complete set of cross-attention layers 1, 3, ..., {n - 1}: "
            f"layer(s) {sorted(problems)[:6]} missing, even, or lacking id_to_k/id_to_v"
        )
    out = {}
    for i in want:
        k, v = layers[i]["k"], layers[i]["v"]
        if k.ndim != 2 or k.shape != v.shape:
            raise WeightFormatError(
                f"{source}: attention layer {i}: id_to_k {tuple(k.shape)} and id_to_v {tuple(v.shape)} must be equal "
                "2-d [hidden, context_dim] matrices"
            )
        out[i] = (k, v)
    return enc, out


def detect_version(id_adapter: Mapping[str, torch.Tensor], source: str) -> Version:
    """``v1`` (``body.0.weight``: IDEncoder) or ``v1.1`` (``latents``: IDFormer)."""
    if "body.0.weight" in id_adapter:
        return "v1"
    if "latents" in id_adapter:
        return "v1.1"
    raise WeightFormatError(
        f"{source}: the 'id_adapter' is neither PuLID v1's IDEncoder ('body.0.weight') nor v1.1's IDFormer "
        f"('latents'); keys: {sorted(id_adapter)[:6]}"
    )


def config_from_state_dict(id_adapter: Mapping[str, torch.Tensor], source: str) -> PuLIDEncoderConfig:
    """The encoder config whose shapes the file has (every tensor is checked again on assignment)."""
    version = detect_version(id_adapter, source)
    where = f"{source}: 'id_adapter'"
    n_vit = len({k.split(".")[0] for k in id_adapter if re.match(r"mapping_\d+\.", k)})
    hidden, vit_dim = tensor_shape(id_adapter, "mapping_0.0.weight", 2, where)
    out_w, _ = tensor_shape(id_adapter, "mapping_0.6.weight", 2, where)
    try:
        if version == "v1":
            h1, id_dim = tensor_shape(id_adapter, "body.0.weight", 2, where)
            h2, _ = tensor_shape(id_adapter, "body.3.weight", 2, where)
            body_out, _ = tensor_shape(id_adapter, "body.6.weight", 2, where)
            if body_out % out_w:
                raise ValueError(f"body output {body_out} is not a multiple of the token width {out_w}")
            return PuLIDEncoderConfig(
                version="v1", id_dim=id_dim, vit_dim=vit_dim, hidden=hidden, context_dim=out_w,
                num_id_tokens=body_out // out_w, num_vit_layers=n_vit, body_hidden=(h1, h2),
            )  # fmt: skip
        _, q, dim = tensor_shape(id_adapter, "latents", 3, where)
        _, context_dim = tensor_shape(id_adapter, "proj_out", 2, where)
        _, id_dim = tensor_shape(id_adapter, "id_embedding_mapping.0.weight", 2, where)
        id_out, _ = tensor_shape(id_adapter, "id_embedding_mapping.6.weight", 2, where)
        inner, _ = tensor_shape(id_adapter, "layers.0.0.to_q.weight", 2, where)
        ff, _ = tensor_shape(id_adapter, "layers.0.1.1.weight", 2, where)
        depth = len({k.split(".")[1] for k in id_adapter if k.startswith("layers.")})
        dim_head = 64  # fixed by upstream's IDFormer
        if id_out % dim or inner % dim_head or ff % dim:
            raise ValueError(f"id mapping output {id_out}, attention width {inner} or FF width {ff} do not fit dim {dim}")
        return PuLIDEncoderConfig(
            version="v1.1", id_dim=id_dim, vit_dim=vit_dim, hidden=hidden, context_dim=context_dim,
            num_id_tokens=id_out // dim, num_vit_layers=n_vit, dim=dim, depth=depth, heads=inner // dim_head,
            dim_head=dim_head, num_queries=q, ff_mult=ff // dim,
        )  # fmt: skip
    except ValueError as exc:
        if isinstance(exc, WeightFormatError):
            raise
        raise WeightFormatError(f"{source}: inconsistent PuLID {version} encoder shapes: {exc}") from exc


def stack_identities(
    conds: Sequence[torch.Tensor], hiddens: Sequence[Sequence[torch.Tensor]]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Several reference images of one identity -> ``(id_cond [B, n, id_dim], hidden [B, n·(1+P), vit_dim] each)``.

    ``conds[i]`` is image i's ``[B, id_dim]`` (or ``[id_dim]``), ``hiddens[i]`` its EVA layers; the hidden states are
    concatenated along tokens in image order, as ``pipeline_v1_1.py`` does.
    """
    if not conds or len(conds) != len(hiddens):
        raise ValueError(f"need one EVA hidden-state list per id_cond: {len(conds)} conds, {len(hiddens)} lists")
    conds = [c[None] if c.ndim == 1 else c for c in conds]
    layers = {len(h) for h in hiddens}
    if len(layers) != 1:
        raise ValueError(f"every image needs the same number of EVA hidden states, got {sorted(layers)}")
    hidden = [torch.cat([h[j] for h in hiddens], dim=1) for j in range(layers.pop())]
    return torch.stack(conds, dim=1), hidden


# ----------------------------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------------------------


class PuLID:
    """A loaded PuLID adapter (v1 or v1.1): identity encoder + per-layer ``id_to_k``/``id_to_v``, installable in a UNet."""

    def __init__(
        self, encoder: IDEncoder | IDFormer, attn: dict[int, tuple[torch.Tensor, torch.Tensor]], *, source: str
    ) -> None:
        self.encoder = encoder
        self.attn = attn
        self.num_layers = max(attn) + 1
        self.source = source

    @property
    def config(self) -> PuLIDEncoderConfig:
        return self.encoder.config

    @property
    def version(self) -> Version:
        return self.config.version

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(
        cls,
        obj: Mapping[str, torch.Tensor],
        *,
        source: str = "<state dict>",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> PuLID:
        """Build from a file's dict (flat released layout, or ComfyUI's). The encoder runs in ``dtype`` (fp32 upstream)."""
        id_adapter, attn = split_pulid_state_dict(obj, source)
        config = config_from_state_dict(id_adapter, source)
        for i, (k, _) in attn.items():
            if k.shape[1] != config.context_dim:
                raise WeightFormatError(
                    f"{source}: attention layer {i} takes {k.shape[1]}-d tokens but the encoder makes "
                    f"{config.context_dim}-d tokens"
                )
        with torch.device("meta"):
            encoder = build_encoder(config)
        assign_state_dict(encoder, id_adapter, source=f"{source} [id_adapter]", dtype=dtype, device=device)
        encoder.requires_grad_(False).eval()
        logger.info(
            "%s: PuLID %s, %d tokens of width %d, %d attention layers",
            source, config.version, config.num_tokens, config.context_dim, max(attn) + 1,
        )  # fmt: skip
        return cls(encoder, attn, source=source)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> PuLID:
        """Load ``pulid_v1.bin`` (safe ``torch.load(weights_only=True)``), ``pulid_v1.1.safetensors``, or ComfyUI's
        ``ip-adapter_pulid_sdxl_fp16.safetensors``. The version is detected from the keys."""
        path = Path(path)
        return cls.from_state_dict(read_weights(path), source=str(path), dtype=dtype, device=device)

    # -- identity tokens ---------------------------------------------------------------------------------------

    def _check_inputs(
        self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        c = self.config
        p = next(self.encoder.parameters())
        if id_cond.ndim == 1:
            id_cond = id_cond[None]
        if id_cond.ndim not in (2, 3) or id_cond.shape[-1] != c.id_dim:
            raise ValueError(
                f"id_cond must be [B, {c.id_dim}] or [B, n_images, {c.id_dim}] (antelopev2 embedding ‖ normalised "
                f"EVA CLS), got {tuple(id_cond.shape)}"
            )
        hidden = [vit_hidden] if isinstance(vit_hidden, torch.Tensor) else list(vit_hidden)
        if len(hidden) != c.num_vit_layers:
            raise ValueError(f"need {c.num_vit_layers} EVA hidden states (after blocks 4/8/12/16/20), got {len(hidden)}")
        n = id_cond.shape[1] if id_cond.ndim == 3 else 1
        for j, h in enumerate(hidden):
            if h.ndim != 3 or h.shape[0] != id_cond.shape[0] or h.shape[-1] != c.vit_dim or h.shape[1] % n:
                raise ValueError(
                    f"EVA hidden state {j} must be [{id_cond.shape[0]}, n_images·tokens, {c.vit_dim}] for {n} image(s), "
                    f"got {tuple(h.shape)}"
                )
        return id_cond.to(device=p.device, dtype=p.dtype), [h.to(device=p.device, dtype=p.dtype) for h in hidden]

    def encode(self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor], *, id_mix: bool = False) -> torch.Tensor:
        """Identity tokens ``[B, T, C]`` from ``id_cond`` [B, id_dim] (or [B, n, id_dim] for n images, see
        :func:`stack_identities`) and the EVA hidden states (each [B, n·(1+P), vit_dim]).

        v1.1: one IDFormer pass over all images (32 tokens). v1 (``app.py``): each image is encoded alone; the first
        image gives 10 tokens, every further one 10 (``id_mix``) or its first 5.
        """
        id_cond, hidden = self._check_inputs(id_cond, vit_hidden)
        if self.version == "v1.1":
            return self.encoder(id_cond, hidden)
        if id_cond.ndim == 2:
            return self.encoder(id_cond, hidden)
        n = id_cond.shape[1]
        per = hidden[0].shape[1] // n
        out = []
        for i in range(n):
            tok = self.encoder(id_cond[:, i], [h[:, i * per : (i + 1) * per] for h in hidden])
            out.append(tok if i == 0 or id_mix else tok[:, : self.config.num_id_tokens])
        return torch.cat(out, dim=1)

    def null_tokens(
        self, *, batch_size: int = 1, num_images: int = 1, id_mix: bool = False, vit_tokens: int = 577
    ) -> torch.Tensor:
        """The null identity: the encoder applied to zero inputs (upstream's uncond id embedding), ``[B, T, C]``.

        Upstream zeros the *first* image's inputs: v1.1 gives 32 tokens whatever ``num_images``; v1 concatenates the
        zero embedding per image like :meth:`encode` (10 + 10 or 5 per extra image). ``vit_tokens``: tokens of one
        image's EVA hidden state (1 + patches: 577 for EVA02-L-14-336 at 336). It matters for v1.1, whose perceiver
        attends over that many identical zero-input tokens; v1 averages them, so it does not.
        """
        c = self.config
        p = next(self.encoder.parameters())
        zc = torch.zeros(batch_size, c.id_dim, device=p.device, dtype=p.dtype)
        zh = [torch.zeros(batch_size, vit_tokens, c.vit_dim, device=p.device, dtype=p.dtype)] * c.num_vit_layers
        one = self.encoder(zc, zh)
        if self.version == "v1.1" or num_images == 1:
            return one
        extra = one if id_mix else one[:, : c.num_id_tokens]
        return torch.cat([one] + [extra] * (num_images - 1), dim=1)

    # -- installation ------------------------------------------------------------------------------------------

    def install(
        self,
        unet: nn.Module,
        *,
        mode: str | PuLIDMode | None = None,
        num_zero: int | None = None,
        projection: Projection | None = None,
        kv_dtype: torch.dtype | None = torch.float32,
    ) -> PuLIDHandle:
        """Add PuLID's identity attention to every cross-attention layer of ``unet``; returns a removable handle.

        ``mode``: ``"fidelity"`` (num_zero 8, ORTHO_v2; v1 default), ``"style"`` (16, ORTHO), ``"v1.1"`` (20, ORTHO_v2;
        v1.1 default), ``"plain"``, or a :class:`PuLIDMode`; ``num_zero``/``projection`` override it. ``kv_dtype``:
        dtype of the ``id_to_k/v`` weights (fp32 as upstream; None = the UNet's dtype).
        Everything is checked before the UNet is touched.
        """
        m = _resolve_mode(mode, self.version, num_zero, projection)
        plan = []
        for i, name, attn in attention_layers_for(unet, self.num_layers, self.source, "PuLID"):
            if i % 2 == 0:
                continue
            inner, ctx = attn.to_k.out_features, attn.to_k.in_features
            wk, wv = self.attn[i]
            if tuple(wk.shape) != (inner, ctx):
                raise WeightFormatError(
                    f"{self.source}: 'id_adapter_attn_layers.{i}.id_to_k.weight' has shape {tuple(wk.shape)} but UNet "
                    f"layer '{name}' needs ({inner}, {ctx}); the adapter is for a different base model"
                )
            ref = attn.to_out[0].weight
            with torch.device("meta"):
                ip = PuLIDAttention(inner, ctx, attn.heads, attn.head_dim, num_zero=m.num_zero, projection=m.projection)
            assign_state_dict(
                ip, {"to_k_ip.weight": wk, "to_v_ip.weight": wv}, source=f"{self.source} [attn {i}]",
                dtype=kv_dtype or ref.dtype, device=ref.device,
            )  # fmt: skip
            plan.append((attn, ip.requires_grad_(False), {}))
        return PuLIDHandle(self, plan, m)


class PuLIDHandle(InstallHandle):
    """An installed PuLID: ``set_mode`` (num_zero / projection, no reload), ``remove()`` (exact restore)."""

    def __init__(self, adapter: PuLID, plan: list[tuple], mode: PuLIDMode) -> None:
        super().__init__(adapter, plan)
        self.mode = mode

    @property
    def layers(self) -> list[PuLIDAttention]:
        return self.branches

    def set_mode(
        self, mode: str | PuLIDMode | None = None, *, num_zero: int | None = None, projection: Projection | None = None
    ) -> None:
        """Change the zero-token count and/or the combination on all layers (``mode`` None keeps the current one)."""
        m = _resolve_mode(self.mode if mode is None else mode, self.adapter.version, num_zero, projection)
        for ip in self.layers:
            ip.set_mode(m)
        self.mode = m
