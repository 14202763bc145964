"""EVA02-CLIP vision tower (Fang et al. 2023, "EVA-02: A Visual Representation for Neon Genesis"; Sun et al. 2023,
"EVA-CLIP"), the face encoder of PuLID.

PuLID (``pulid/pipeline.py::get_id_embedding``) runs the visual tower of ``EVA02-CLIP-L-14-336`` on a 336² face and
uses two things: the CLS feature ``head(norm(x)[:, 0])`` (768-d, L2-normalised by the caller) and the raw residual
stream after blocks 4, 8, 12, 16 and 20 (each ``[B, 577, 1024]``, CLS first).

Architecture (EVA-CLIP ``eva_vit_model.py`` with ``subln``, ``naiveswiglu``, ``rope``, ``qkv_bias``, no layer scale):
patch conv 14/14 with bias, CLS token, absolute position embedding; per block pre-norm LayerNorm(eps 1e-6),
attention with separate bias-free ``q_proj``/``k_proj``/``v_proj`` plus learned ``q_bias``/``v_bias`` (no k bias),
2-D RoPE on the patch tokens of q and k (the CLS token is not rotated), ``inner_attn_ln`` before ``proj``; SwiGLU
MLP ``w3(ffn_ln(SiLU(w1 x) ⊙ w2 x))``; final ``norm`` and ``head``.

RoPE (``VisionRotaryEmbeddingFast``): with ``half = head_dim / 2`` rotary width per axis,
``f_i = 10000^(-2i/half)`` (i < half/2), positions ``p = arange(G) / G · G_pt`` (G = patch grid side, G_pt the
pre-training grid, 16), angles repeated twice (interleaved pairs), row angles ‖ column angles → ``[G², head_dim]``;
``x·cos + rot(x)·sin`` with ``rot`` mapping each interleaved pair ``(a, b) -> (-b, a)``. The tables are computed here
(the checkpoint's ``rope.freqs_cos/sin`` buffers are not loaded; when present they are compared with ours).

Parameter names equal the checkpoint's ``visual.*`` keys (``QuanSun/EVA-CLIP/EVA02_CLIP_L_336_psz14_s6B.pt``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastface.steps import named

from .loading import StateDict, WeightFormatError, assign_state_dict, read_weights

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = [
    "EVAVisionConfig",
    "EVA_VISION_CONFIGS",
    "get_eva_vision_config",
    "EVAVisionOutput",
    "EVAVisionTower",
    "rope_tables",
    "apply_rope",
    "eva_preprocess",
]


@dataclass(frozen=True)
class EVAVisionConfig:
    """Shape of an EVA02-CLIP vision tower. ``hidden_layers``: block counts after which the residual stream is kept."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_hidden: int = 2730  # int(1024 * 2.6667)
    embed_dim: int = 768  # head output
    rope_pt_grid: int = 16  # pre-training grid side (224 / 14)
    hidden_layers: tuple[int, ...] = (4, 8, 12, 16, 20)
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ValueError(f"EVAVisionConfig: width {self.width} / heads {self.heads} must give a head dim divisible by 4")
        if self.image_size % self.patch_size:
            raise ValueError(f"EVAVisionConfig: image_size {self.image_size} is not a multiple of {self.patch_size}")
        if any(not 0 < n <= self.layers for n in self.hidden_layers):
            raise ValueError(f"EVAVisionConfig: hidden_layers {self.hidden_layers} must lie in 1..{self.layers}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


EVA_VISION_CONFIGS: dict[str, EVAVisionConfig] = {
    # EVA02-CLIP-L-14-336 (model_configs/EVA02-CLIP-L-14-336.json): the PuLID face encoder.
    "eva02-l-14-336": EVAVisionConfig(),
    "tiny": EVAVisionConfig(
        image_size=56, patch_size=14, width=64, layers=6, heads=4, mlp_hidden=170, embed_dim=32, rope_pt_grid=3,
        hidden_layers=(1, 2, 3, 4, 5),
    ),
}


def get_eva_vision_config(name: str | EVAVisionConfig) -> EVAVisionConfig:
    """A named config (``"eva02-l-14-336"``, ``"tiny"``) or a config passed through."""
    return named(EVA_VISION_CONFIGS, name, "EVA vision config", EVAVisionConfig)


def rope_tables(
    head_dim: int, grid: int, pt_grid: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables ``[grid², head_dim]`` of EVA's 2-D RoPE (fp32, computed as EVA-CLIP's rope.py does)."""
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half))  # [half/2]
    t = torch.arange(grid, device=device) / grid * pt_grid
    ang = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # [G, half], pairs interleaved
    full = torch.cat([ang[:, None, :].expand(grid, grid, half), ang[None, :, :].expand(grid, grid, half)], dim=-1)
    full = full.reshape(grid * grid, head_dim)  # token (r, c) -> row angles ‖ column angles
    return full.cos(), full.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rot(x)·sin`` on [..., P, d] with interleaved pairs ``(a, b) -> (-b, a)``."""
    pairs = x.unflatten(-1, (-1, 2))
    rot = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rot * sin


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: EVAVisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)


class _Attention(nn.Module):
    def __init__(self, cfg: EVAVisionConfig) -> None:
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(d))
        self.v_bias = nn.Parameter(torch.zeros(d))
        self.inner_attn_ln = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = self.k_proj(x)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
        # RoPE on the patch tokens only (token 0 is CLS); the tables are fp32, the result is cast back.
        q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], cos, sin)], dim=2).to(v.dtype)
        k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], cos, sin)], dim=2).to(v.dtype)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.proj(self.inner_attn_ln(o))


class _SwiGLU(nn.Module):
    def __init__(self, cfg: EVAVisionConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.w2 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.ffn_ln = nn.LayerNorm(cfg.mlp_hidden, eps=cfg.norm_eps)
        self.w3 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class _Block(nn.Module):
    def __init__(self, cfg: EVAVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = _Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = _SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class EVAVisionOutput:
    """``image_embeds`` [B, embed_dim] = head(norm(x)[:, 0]) (not normalised) and the kept residual streams."""

    image_embeds: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]

    @property
    def normed_embeds(self) -> torch.Tensor:
        """``image_embeds / ||image_embeds||_2`` (PuLID's ``id_cond_vit``)."""
        return self.image_embeds / torch.norm(self.image_embeds, 2, 1, True)


class EVAVisionTower(nn.Module):
    """The EVA02-CLIP visual tower with the checkpoint's ``visual.*`` parameter names (prefix stripped)."""

    def __init__(self, config: str | EVAVisionConfig = "eva02-l-14-336") -> None:
        super().__init__()
        cfg = self.config = get_eva_vision_config(config)
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)  # EVA's init scale; files overwrite it
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.width, cfg.embed_dim)
        cos, sin = rope_tables(cfg.head_dim, cfg.grid, cfg.rope_pt_grid)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables on the parameters' device (needed after building on the meta device)."""
        cfg = self.config
        cos, sin = rope_tables(cfg.head_dim, cfg.grid, cfg.rope_pt_grid, device=self.pos_embed.device)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(self, pixel_values: torch.Tensor, *, return_hidden: bool = True) -> EVAVisionOutput:
        """Run the tower on preprocessed pixels [B, 3, S, S] (see :func:`eva_preprocess`)."""
        cfg = self.config
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values must be [B, 3, {cfg.image_size}, {cfg.image_size}], got {tuple(pixel_values.shape)}; "
                "use eva_preprocess() to resize and normalise"
            )
        w = self.patch_embed.proj.weight
        x = self.patch_embed.proj(pixel_values.to(device=w.device, dtype=w.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # [B, 1+P, D]
        keep = set(cfg.hidden_layers) if return_hidden else set()
        hidden = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.rope_cos, self.rope_sin)
            if i + 1 in keep:
                hidden.append(x)
        embeds = self.head(self.norm(x)[:, 0])
        return EVAVisionOutput(image_embeds=embeds, hidden_states=tuple(hidden))

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        *,
        config: str | EVAVisionConfig = "eva02-l-14-336",
        source: str | os.PathLike = "<state dict>",
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> EVAVisionTower:
        """Build from a state dict in the EVA-CLIP layout (see :meth:`from_pretrained` for the accepted keys)."""
        visual, rope = _visual_keys(sd, source)
        with torch.device("meta"):
            model = cls(config)
        assign_state_dict(model, visual, source=source, dtype=dtype, device=device)
        model.reset_rope()
        _check_rope(model, rope, source)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: str | EVAVisionConfig = "eva02-l-14-336",
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device | None = None,
    ) -> EVAVisionTower:
        """Load ``EVA02_CLIP_L_336_psz14_s6B.pt`` (full CLIP: ``visual.*`` kept, text tower ignored), a visual-only
        file (bare keys), or either wrapped in ``model``/``module``/``state_dict`` or with a ``module.`` prefix.

        ``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``; safetensors are preferred.
        Default dtype fp32, as PuLID runs it.
        """
        path = Path(path)
        return cls.from_state_dict(read_weights(path), config=config, source=str(path), dtype=dtype, device=device)


def _visual_keys(sd: Mapping, source: str | os.PathLike) -> tuple[StateDict, StateDict]:
    """``(visual weights, rope buffers)`` with the ``visual.`` / ``module.`` prefixes removed."""
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if any(str(k).startswith("module.") for k in sd):
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    if "visual.pos_embed" in sd:
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    elif "pos_embed" not in sd:
        hint = ""
        if "visual.trunk.pos_embed" in sd:
            hint = " This is an open_clip/timm-layout checkpoint; fastface reads the original EVA-CLIP layout."
        elif "vision_model.embeddings.class_embedding" in sd:
            hint = " This is a transformers CLIP checkpoint, not EVA-CLIP."
        raise WeightFormatError(
            f"{source}: not an EVA-CLIP vision checkpoint (no 'visual.pos_embed' or 'pos_embed'; first keys: "
            f"{sorted(map(str, sd))[:5]}).{hint} Expected e.g. QuanSun/EVA-CLIP EVA02_CLIP_L_336_psz14_s6B.pt."
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightFormatError(f"{source}: entries that are not tensors: {sorted(bad)[:5]}")
    rope = {k: v for k, v in sd.items() if "freqs_cos" in k or "freqs_sin" in k}
    return {k: v for k, v in sd.items() if k not in rope}, rope


def _check_rope(model: EVAVisionTower, rope: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Compare the file's stored RoPE tables (if any) with ours; they are never loaded."""
    for key, table in rope.items():
        ours = model.rope_cos if key.endswith("cos") else model.rope_sin
        if tuple(table.shape) != tuple(ours.shape) or (table.float().cpu() - ours.float().cpu()).abs().max() > 1e-3:
            logger.warning(
                "%s: the stored RoPE table '%s' %s differs from the one computed for config %s %s",
                source, key, tuple(table.shape), model.config, tuple(ours.shape),
            )  # fmt: skip
            return


def eva_preprocess(images: torch.Tensor, image_size: int = 336) -> torch.Tensor:
    """PuLID's EVA input: ``[B, 3, H, W]`` RGB in [0, 1] -> bicubic resize of the short side to ``image_size``
    (torchvision 0.15 tensor ``resize``: no antialias, no clamp) -> OpenAI CLIP mean/std normalisation.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] RGB in [0, 1], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if (h, w) != (image_size, image_size):
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(image_size * long / short)  # torchvision's rule for an int size
        size = (image_size, new_long) if h <= w else (new_long, image_size)
        images = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=False)
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std
