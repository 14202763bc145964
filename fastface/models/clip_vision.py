"""CLIP ViT vision encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision").

The image encoder of IP-Adapter FaceID-Plus-v2 is CLIP ViT-H/14 (laion2B), stored by Hugging Face as a
``CLIPVisionModelWithProjection`` folder (``config.json`` + ``model.safetensors``, keys ``vision_model.*`` and
``visual_projection.weight``). FaceID-Plus-v2 uses the *penultimate* hidden states: the output of encoder layer
N-1 of N, before ``post_layernorm`` (``hidden_states[-2]`` in transformers terms), shape ``[B, 257, 1280]``.

Preprocessing (:func:`clip_preprocess`) reproduces ``CLIPImageProcessor`` at 224: PIL bicubic resize of the
shortest edge to 224, center crop 224, ``x/255``, normalise with the OpenAI mean/std.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastface.steps import named

from .loading import StateDict, WeightFormatError, assign_state_dict, find_weight_file, read_weight_files, read_weights

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape of a CLIP ViT vision tower (field names follow our module; ``from_hf_dict`` maps transformers' names)."""

    hidden_size: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    intermediate_size: int = 5120
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-5
    hidden_act: Literal["gelu", "quick_gelu"] = "gelu"
    projection_dim: int = 1024
    num_channels: int = 3

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in ("gelu", "quick_gelu"):
            raise ValueError(f"hidden_act must be 'gelu' or 'quick_gelu', got {self.hidden_act!r}")

    @property
    def num_tokens(self) -> int:
        """Sequence length: one CLS token plus one token per patch (257 for ViT-H/14 at 224)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf_dict(cls, cfg: Mapping, source: str | os.PathLike = "config.json") -> CLIPVisionConfig:
        """Build from a transformers ``config.json`` (a vision config, or a ``CLIPConfig``'s ``vision_config``)."""
        if "vision_config" in cfg and isinstance(cfg["vision_config"], Mapping):
            proj = cfg.get("projection_dim")
            cfg = {**cfg["vision_config"], **({"projection_dim": proj} if proj is not None else {})}
        names = {
            "hidden_size": "hidden_size",
            "num_hidden_layers": "num_layers",
            "num_attention_heads": "num_heads",
            "intermediate_size": "intermediate_size",
            "patch_size": "patch_size",
            "image_size": "image_size",
            "layer_norm_eps": "layer_norm_eps",
            "hidden_act": "hidden_act",
            "projection_dim": "projection_dim",
            "num_channels": "num_channels",
        }
        kwargs = {ours: cfg[theirs] for theirs, ours in names.items() if theirs in cfg}
        if "hidden_size" not in kwargs or "num_layers" not in kwargs:
            raise WeightFormatError(
                f"{source}: not a CLIP vision config (no hidden_size / num_hidden_layers). Pass config= explicitly."
            )
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise WeightFormatError(f"{source}: unsupported CLIP vision config ({exc})") from exc


CLIP_VISION_CONFIGS: dict[str, CLIPVisionConfig] = {
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K = h94/IP-Adapter models/image_encoder.
    "vit-h-14": CLIPVisionConfig(),
    "tiny": CLIPVisionConfig(
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        intermediate_size=128,
        patch_size=14,
        image_size=56,
        projection_dim=32,
    ),
}


def get_clip_vision_config(name: str | CLIPVisionConfig) -> CLIPVisionConfig:
    """Look up a named config (``"vit-h-14"``, ``"tiny"``) or pass a config through."""
    return named(CLIP_VISION_CONFIGS, name, "CLIP vision config", CLIPVisionConfig)


class _Embeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.image_size = cfg.image_size
        # initialised as transformers' CLIP does (std D^-0.5); a loaded file replaces it, but a module built without
        # weights (tests, research forks) must never compute on uninitialised memory
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * cfg.hidden_size**-0.5)
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_tokens, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"pixel_values are {h}x{w}, the encoder expects {self.image_size}x{self.image_size}; "
                "use clip_preprocess() to resize and crop"
            )
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, h/p, w/p]
        x = x.flatten(2).transpose(1, 2)  # [B, P, D]
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.unsqueeze(0)  # [B, 1+P, D]


class _Attention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # [B, N, D] -> [B, H, N, D/H]
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x)
        return self.fc2(x)


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = _Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(cfg) for _ in range(cfg.num_layers))


class _VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint's spelling
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


@dataclass(frozen=True)
class CLIPVisionOutput:
    """Penultimate hidden states ``[B, T, D]`` and, when asked for, projected image embeddings ``[B, proj]``."""

    penultimate: torch.Tensor
    image_embeds: torch.Tensor | None = None


class CLIPVisionEncoder(nn.Module):
    """CLIP ViT vision tower with the transformers ``CLIPVisionModelWithProjection`` parameter names.

    ``forward(pixel_values)`` returns the penultimate hidden states (the FaceID-Plus-v2 input) and skips the
    last layer. ``encode(..., image_embeds=True)`` also runs the last layer, ``post_layernorm`` on the CLS token
    and ``visual_projection``.
    """

    def __init__(self, config: str | CLIPVisionConfig = "vit-h-14", *, with_projection: bool = True) -> None:
        super().__init__()
        self.config = get_clip_vision_config(config)
        self.vision_model = _VisionTransformer(self.config)
        self.visual_projection = (
            nn.Linear(self.config.hidden_size, self.config.projection_dim, bias=False) if with_projection else None
        )

    def hidden_states(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> list[torch.Tensor]:
        """All hidden states as transformers returns them: ``[pre_layrnorm(embeddings), layer 1, ..., layer N]``.

        ``num_layers`` stops after that many encoder layers (default: all).
        """
        vm = self.vision_model
        n = len(vm.encoder.layers) if num_layers is None else num_layers
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        out = [x]
        for layer in vm.encoder.layers[:n]:
            x = layer(x)
            out.append(x)
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Penultimate hidden states ``[B, 1+P, D]`` (``hidden_states[-2]``, CLS first) of preprocessed pixels."""
        return self.encode(pixel_values).penultimate

    def encode(self, pixel_values: torch.Tensor, *, image_embeds: bool = False) -> CLIPVisionOutput:
        """Penultimate hidden states, plus ``image_embeds`` (post_layernorm(CLS of layer N) @ projection) if asked."""
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for layer in vm.encoder.layers[:-1]:
            x = layer(x)
        if not image_embeds:
            return CLIPVisionOutput(penultimate=x)
        if self.visual_projection is None:
            raise ValueError(
                "this encoder has no visual_projection (its weight file had none); image_embeds are unavailable"
            )
        last = vm.encoder.layers[-1](x)
        embeds = self.visual_projection(vm.post_layernorm(last[:, 0]))
        return CLIPVisionOutput(penultimate=x, image_embeds=embeds)

    def null_features(self, pixel_values: torch.Tensor | int) -> torch.Tensor:
        """Penultimate features of ``zeros_like(pixel_values)``: the FaceID-Plus-v2 "null identity" CLIP input.

        As diffusers' ``encode_image`` does for the unconditional branch, the zeros are in *normalised* pixel space
        (the mean colour image, not a black one). An int gives that batch size at the model's resolution.
        """
        if isinstance(pixel_values, int):
            s = self.config.image_size
            w = self.vision_model.embeddings.patch_embedding.weight
            pixel_values = torch.zeros(pixel_values, self.config.num_channels, s, s, dtype=w.dtype, device=w.device)
        return self(torch.zeros_like(pixel_values))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: str | CLIPVisionConfig | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> CLIPVisionEncoder:
        """Load an image-encoder folder (``config.json`` + ``model.safetensors``) or a single weight file.

        The config comes from ``config`` if given, else the folder's ``config.json``, else ``"vit-h-14"``.
        Accepted key layouts: ``CLIPVisionModelWithProjection`` / transformers-4 ``CLIPVisionModel``
        (``vision_model.*``), transformers-5 ``CLIPVisionModel`` (bare ``embeddings.*``), and full ``CLIPModel``
        files (text tower ignored). ``position_ids`` buffers are ignored.
        """
        path = Path(path)
        if path.is_dir():
            files = find_weight_file(path, "model")
            sd = read_weight_files(files)
            source = files[0]
            cfg_file = path / "config.json"
        elif path.is_file():
            sd = read_weights(path)
            source = path
            cfg_file = path.parent / "config.json"
        else:
            raise WeightFormatError(f"{path}: no such file or folder (expected a CLIP image_encoder folder)")
        if config is None and cfg_file.is_file():
            try:
                config = CLIPVisionConfig.from_hf_dict(json.loads(cfg_file.read_text()), cfg_file)
            except json.JSONDecodeError as exc:
                raise WeightFormatError(f"{cfg_file}: not valid JSON ({exc})") from exc
        cfg = get_clip_vision_config(config or "vit-h-14")
        sd = _normalize_keys(sd, source)
        with torch.device("meta"):
            model = cls(cfg, with_projection="visual_projection.weight" in sd)
        ignore = ("vision_model.embeddings.position_ids",)
        assign_state_dict(model, sd, source=source, dtype=dtype, device=device, ignore_unexpected=ignore)
        return model.eval().requires_grad_(False)


def _normalize_keys(sd: StateDict, source: str | os.PathLike) -> StateDict:
    """Map the accepted key layouts onto ours (``vision_model.*`` + ``visual_projection.weight``)."""
    if "vision_model.embeddings.class_embedding" in sd:
        keep = ("vision_model.", "visual_projection.")
        return {k: v for k, v in sd.items() if k.startswith(keep)}
    if "embeddings.class_embedding" in sd:  # transformers-5 CLIPVisionModel.save_pretrained
        return {f"vision_model.{k}": v for k, v in sd.items()}
    raise WeightFormatError(
        f"{source}: not a transformers CLIP vision weight file (no 'vision_model.embeddings.class_embedding'; "
        f"first keys: {sorted(sd)[:5]}). open_clip checkpoints must be converted to the transformers layout "
        "(the h94/IP-Adapter 'models/image_encoder' folder is in the right layout)."
    )


def _resize_shortest_edge(image: np.ndarray, size: int) -> np.ndarray:
    """PIL bicubic resize so the shorter side is ``size`` (the longer side truncated, as transformers computes it)."""
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    if (new_h, new_w) == (h, w):
        return image  # PIL returns an identical copy for an equal size
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))


def clip_preprocess(
    images: np.ndarray | Sequence[np.ndarray],
    *,
    channel_order: Literal["rgb", "bgr"] = "rgb",
    size: int = 224,
    crop_size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """CLIP pixel values ``[B, 3, crop, crop]`` float32 from uint8 ``H x W x 3`` arrays, as ``CLIPImageProcessor`` does.

    ``channel_order`` names the order of the input channels. ``"rgb"`` (default) passes them through unchanged,
    exactly as ``CLIPImageProcessor`` treats numpy arrays; ``"bgr"`` reverses them first, so the model sees RGB.
    Note: the official FaceID-Plus-v2 code feeds its BGR ``norm_crop`` unchanged, i.e. like ``channel_order="rgb"``
    on BGR data (``FaceInfo.crop`` is BGR by default for that reason: pass it with the default to reproduce it).
    """
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    if crop_size > size:
        raise ValueError(f"crop_size {crop_size} is larger than the resize target {size}; use crop_size <= size")
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    out = []
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) == 0:
            raise ValueError(
                f"image {i}: expected a uint8 H x W x 3 array, got dtype {img.dtype} shape {img.shape}; "
                "convert grayscale/RGBA images to 3 channels (fastface.adapters.faces.load_image does)"
            )
        if channel_order == "bgr":
            img = img[..., ::-1]
        img = _resize_shortest_edge(np.ascontiguousarray(img), size)
        h, w = img.shape[:2]
        top, left = (h - crop_size) // 2, (w - crop_size) // 2
        img = img[top : top + crop_size, left : left + crop_size]
        # Same arithmetic as transformers: float64 rescale, cast to float32, then float32 normalise.
        x = (img.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append(((x - mean32) / std32).transpose(2, 0, 1))
    if not out:
        raise ValueError("clip_preprocess got no images")
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


__all__ = [
    "CLIP_VISION_CONFIGS",
    "CLIPVisionConfig",
    "CLIPVisionEncoder",
    "CLIPVisionOutput",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "clip_preprocess",
    "get_clip_vision_config",
]
