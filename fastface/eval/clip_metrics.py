"""CLIP score (CLIP) and the LAION aesthetic predictor v2 (AE) on OpenAI CLIP ViT-L/14, with fastface's own encoders.

CLIP score (paper Sec. 4.1; official ``clip_metric.py``): cosine of the L2-normalised projected image and text
embeddings, **no x100**. Image preprocessing = OpenAI's: bicubic resize of the shorter side to 224, center crop
224, CLIP mean/std normalisation (:func:`fastface.models.clip_vision.clip_preprocess`, PIL bicubic like
``clip.load``'s preprocess; the official script resized tensors with torchvision, which can differ in the last
digits). Text: the full lowercased prompt, CLIP BPE, 77 tokens, pooled at the end token.

AE (``ava+logos-l14-linearMSE.pth``): an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts and *no*
activations (LAION's improved-aesthetic-predictor), applied to the L2-normalised CLIP ViT-L/14 image embedding.

Weights: a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors``), e.g. the Hugging Face repo
``openai/clip-vit-large-patch14`` found in the HF cache (never downloaded here). The two towers are built with
fastface's :class:`~fastface.models.text.CLIPTextEncoder` and :class:`~fastface.models.clip_vision.CLIPVisionEncoder`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastface.adapters.faces import ImageInput, load_image
from fastface.hub import resolve_folder
from fastface.models.clip_vision import CLIPVisionConfig, CLIPVisionEncoder, clip_preprocess
from fastface.models.loading import (
    WeightFormatError,
    assign_state_dict,
    find_weight_file,
    read_weight_files,
    read_weights,
)
from fastface.models.text import CLIPTextConfig, CLIPTextEncoder, build_text_encoder
from fastface.models.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

__all__ = ["CLIP_L14_REPO", "CLIPScorer", "AestheticMLP", "AestheticScorer", "clip_configs", "to_rgb"]

CLIP_L14_REPO = "openai/clip-vit-large-patch14"
# transformers' CLIPTextConfig / CLIPVisionConfig defaults: old config.json files (as openai's) rely on them.
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5}


def to_rgb(image: ImageInput) -> np.ndarray:
    """An ``H x W x 3`` uint8 RGB array from a PIL image, an RGB uint8 array or an image file."""
    bgr, _ = load_image(image)
    return np.ascontiguousarray(bgr[..., ::-1])


def _section(cfg: Mapping, name: str, defaults: Mapping) -> dict:
    """A tower config: transformers defaults <- ``<name>_config`` <- ``<name>_config_dict`` (old files' overrides)."""
    out = dict(defaults)
    for key in (f"{name}_config", f"{name}_config_dict"):
        part = cfg.get(key)
        if isinstance(part, Mapping):
            out.update({k: v for k, v in part.items() if v is not None})
    return out


def clip_configs(cfg: Mapping, source: str | os.PathLike = "config.json") -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """Text and vision tower configs of a transformers ``CLIPModel`` ``config.json`` (dict)."""
    if "text_config" not in cfg and "text_config_dict" not in cfg:
        raise WeightFormatError(
            f"{source}: not a CLIPModel config (no text_config); the CLIP score needs a full CLIP model folder "
            f"such as {CLIP_L14_REPO}, with both the text and the vision tower"
        )
    proj = int(cfg.get("projection_dim", 512))
    t = _section(cfg, "text", _TEXT_DEFAULTS)
    v = _section(cfg, "vision", _VISION_DEFAULTS)
    try:
        act = "gelu" if t["hidden_act"] in ("gelu", "gelu_python") else t["hidden_act"]
        text = CLIPTextConfig(width=int(t["hidden_size"]), layers=int(t["num_hidden_layers"]),
                              heads=int(t["num_attention_heads"]), mlp=int(t["intermediate_size"]), act=act,
                              projection_dim=proj, vocab_size=int(t["vocab_size"]),
                              max_positions=int(t["max_position_embeddings"]), eps=float(t["layer_norm_eps"]))
    except (TypeError, ValueError) as exc:
        raise WeightFormatError(f"{source}: unsupported CLIP text config ({exc})") from exc
    vision = CLIPVisionConfig.from_hf_dict({**v, "projection_dim": proj}, source)
    return text, vision


class CLIPScorer:
    """OpenAI-CLIP image/text embeddings and the CLIP score (cosine, no x100) on fastface's own CLIP towers."""

    def __init__(self, text: CLIPTextEncoder, vision: CLIPVisionEncoder, tokenizer: CLIPTokenizer | None = None,
                 *, batch_size: int = 8) -> None:
        if text.config.projection_dim != vision.config.projection_dim:
            raise ValueError(
                f"text and vision projections differ ({text.config.projection_dim} vs {vision.config.projection_dim})"
            )
        self.text, self.vision = text, vision
        self.tokenizer = tokenizer or CLIPTokenizer.bundled(max_length=text.config.max_positions)
        self.batch_size = _positive_int("batch_size", batch_size)
        w = vision.visual_projection.weight
        self.device, self.dtype = w.device, w.dtype
        self.image_size = vision.config.image_size

    @classmethod
    def from_pretrained(
        cls,
        ref: str | os.PathLike = CLIP_L14_REPO,
        *,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
    ) -> CLIPScorer:
        """Load a ``CLIPModel`` folder or a repo id from the Hugging Face cache (no network; the error says how to
        download it). ``dtype``: fp32 by default (the metric is cheap next to generation)."""
        folder = resolve_folder(ref, required=("config.json",), allow_patterns=("config.json", "model.safetensors"),
                                cache_dir=cache_dir)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise WeightFormatError(f"{folder}: no config.json (a transformers CLIPModel folder is expected)")
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightFormatError(f"{cfg_file}: not valid JSON ({exc})") from exc
        text_cfg, vision_cfg = clip_configs(raw, cfg_file)
        files = find_weight_file(folder, "model")
        sd = read_weight_files(files)
        source = ", ".join(map(str, files))
        if "text_projection.weight" not in sd or "visual_projection.weight" not in sd:
            raise WeightFormatError(
                f"{source}: not a full CLIPModel weight file (text_projection/visual_projection missing); "
                f"use a CLIPModel checkpoint such as {CLIP_L14_REPO}"
            )
        text_sd = {k: v for k, v in sd.items() if k.startswith(("text_model.", "text_projection."))}
        text = build_text_encoder(text_cfg, text_sd, source=source, dtype=dtype, device=device)
        vision_sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
        with torch.device("meta"):
            vision = CLIPVisionEncoder(vision_cfg)
        assign_state_dict(vision, vision_sd, source=source, dtype=dtype, device=device,
                          ignore_unexpected=("vision_model.embeddings.position_ids",))
        logger.info("CLIP scorer loaded from %s", source)
        return cls(text, vision.eval().requires_grad_(False), batch_size=batch_size)

    def pixel_values(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """OpenAI CLIP preprocessing ``[N, 3, S, S]`` (S = the model's image size, 224 for ViT-L/14)."""
        return clip_preprocess([to_rgb(im) for im in images], size=self.image_size, crop_size=self.image_size)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """L2-normalised projected image embeddings ``[N, D]`` (float32, CPU)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            px = self.pixel_values(images[start : start + self.batch_size]).to(self.device, self.dtype)
            out.append(self.vision.encode(px, image_embeds=True).image_embeds.float().cpu())
        return _unit(torch.cat(out)) if out else torch.zeros(0, self.vision.config.projection_dim)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings ``[N, D]`` (float32, CPU)."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            ids = self.tokenizer(list(prompts[start : start + self.batch_size])).to(self.device)
            out.append(self.text(ids, pooled=True).pooled.float().cpu())
        return _unit(torch.cat(out)) if out else torch.zeros(0, self.text.config.projection_dim)

    def score(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> np.ndarray:
        """CLIP score per (image, prompt) pair: the cosine of their embeddings (float64, in [-1, 1])."""
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        img, txt = self.image_embeddings(images), self.text_embeddings(prompts)
        return (img.double() * txt.double()).sum(-1).numpy()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class AestheticMLP(nn.Module):
    """LAION improved-aesthetic-predictor v2 head: Linear layers D->1024->128->64->16->1, dropouts, no activations."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Scores ``[N]`` of L2-normalised image embeddings ``[N, D]``."""
        return self.layers(embeds)[:, 0]

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> AestheticMLP:
        """Load ``ava+logos-l14-linearMSE.pth`` (or its ``.safetensors`` conversion); ``.pth`` via safe torch.load."""
        path = Path(path).expanduser()
        sd = read_weights(path)
        w0 = sd.get("layers.0.weight")
        if not isinstance(w0, torch.Tensor) or w0.ndim != 2:
            raise WeightFormatError(
                f"{path}: not a LAION aesthetic predictor (no 'layers.0.weight' matrix; keys: {sorted(sd)[:6]}). "
                "Expected improved-aesthetic-predictor's ava+logos-l14-linearMSE.pth."
            )
        with torch.device("meta"):
            mlp = cls(int(w0.shape[1]))
        assign_state_dict(mlp, sd, source=path, dtype=torch.float32, device=device)
        return mlp.eval().requires_grad_(False)


class AestheticScorer:
    """LAION aesthetic score (AE) of images: the MLP on normalised CLIP ViT-L/14 image embeddings."""

    def __init__(self, clip: CLIPScorer, mlp: AestheticMLP) -> None:
        dim = mlp.layers[0].in_features
        if dim != clip.vision.config.projection_dim:
            raise ValueError(
                f"the aesthetic MLP takes {dim}-d embeddings but the CLIP model gives "
                f"{clip.vision.config.projection_dim}-d ones; the predictor needs CLIP ViT-L/14 (768-d)"
            )
        self.clip, self.mlp = clip, mlp

    @classmethod
    def from_file(cls, clip: CLIPScorer, path: str | os.PathLike) -> AestheticScorer:
        return cls(clip, AestheticMLP.from_file(path, device=clip.device))

    @torch.no_grad()
    def score_embeddings(self, embeds: torch.Tensor) -> np.ndarray:
        """AE of already-normalised CLIP image embeddings ``[N, D]``."""
        dev = self.mlp.layers[0].weight.device
        return self.mlp(embeds.float().to(dev)).double().cpu().numpy()

    def score(self, images: Sequence[ImageInput]) -> np.ndarray:
        """AE per image (float64)."""
        return self.score_embeddings(self.clip.image_embeddings(list(images)))
