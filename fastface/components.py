"""Finding and loading the parts of a :class:`fastface.Pipeline`: UNet (+ distilled weights), text, VAE, adapter.

Every part comes from a model recipe (:func:`fastface.presets.model_recipe`) and a registered adapter
(:mod:`fastface.adapters.registry`), with a local path override for each: ``base`` (a diffusers SDXL folder),
``unet`` (a UNet folder or file), ``weights`` (the distilled LoRA of hyper/lcm/tcd, or the distilled UNet file of
lightning), ``vae`` (folder or file), ``adapter_file``, and the adapter's own load options (files it names).
Repo parts are looked up in the Hugging Face cache and downloaded only with ``download=True``
(:mod:`fastface.hub`). Everything is resolved before anything is loaded, so a missing file is reported at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastface.adapters.base import FaceSettings, IdentityAdapter
from fastface.adapters.registry import AdapterEntry
from fastface.hub import WeightRef, resolve, resolve_first
from fastface.models.loading import WeightFormatError
from fastface.models.lora_files import fuse_lora
from fastface.models.text import SDXLTextConditioner, load_text_encoder, read_force_zeros
from fastface.models.tokenizer import CLIPTokenizer
from fastface.models.unet import UNet, UNetConfig
from fastface.models.unet_loading import load_unet
from fastface.models.vae import AutoencoderKL
from fastface.models.vae_loading import load_vae
from fastface.presets import ModelRecipe

logger = logging.getLogger(__name__)

__all__ = ["Components", "LocalPaths", "resolve_sources", "load_components"]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class LocalPaths:
    """Local overrides of a pipeline's parts (None: from the recipe / adapter preset)."""

    base: PathLike | None = None
    unet: PathLike | None = None
    weights: PathLike | None = None
    vae: PathLike | None = None
    adapter_file: PathLike | None = None


@dataclass
class Components:
    """The loaded parts, and where each came from (for messages and the PNG metadata)."""

    unet: UNet
    text: SDXLTextConditioner
    vae: AutoencoderKL
    adapter: IdentityAdapter
    sources: dict[str, str] = field(default_factory=dict)


def _candidates(recipe: ModelRecipe, name: str, half: bool) -> list[WeightRef]:
    """Where a component may be: the fp16 variant files first for half precision, the full files first otherwise."""
    order = ("fp16", None) if half else (None, "fp16")
    out: list[WeightRef] = []
    for variant in order:
        ref = recipe.sources(variant).get(name)
        if ref is not None and ref not in out:
            out.append(ref)
    return out


def resolve_sources(
    recipe: ModelRecipe,
    adapter: AdapterEntry,
    paths: LocalPaths = LocalPaths(),
    adapter_files: Mapping[str, Any] | None = None,
    *,
    half: bool = False,
    download: bool = False,
    cache_dir: PathLike | None = None,
) -> dict[str, Path]:
    """Local paths of every part: ``unet`` (folder, or its config folder for apply='unet'), ``weights`` (or absent),
    ``text_encoder``, ``text_encoder_2``, ``vae``, and the adapter's files (``adapter``, and what else its class
    lists, e.g. ``image_encoder``). ``adapter_files``: the user's adapter load options.

    Raises :class:`fastface.hub.WeightNotFoundError` naming the first missing part and how to get it.
    """
    if paths.base is not None:
        recipe = dataclasses.replace(recipe, base=paths.base)
    if paths.vae is not None:
        recipe = dataclasses.replace(recipe, vae=paths.vae)
    kw = dict(cache_dir=cache_dir, download=download)
    out: dict[str, Path] = {}
    if paths.unet is not None:
        out["unet"] = resolve(paths.unet)
    else:
        out["unet"] = resolve_first(_candidates(recipe, "unet", half), **kw)
    weights = paths.weights if paths.weights is not None else recipe.weights
    # A user UNet replaces the distilled UNet file of apply='unet' (lightning) unless weights are given too.
    if weights is not None and not (recipe.apply == "unet" and paths.unet is not None and paths.weights is None):
        out["weights"] = resolve(weights, **kw)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        out[name] = resolve_first(_candidates(recipe, name, half), **kw)
    for name, ref in adapter.adapter.files(adapter.preset, paths.adapter_file, adapter_files or {}).items():
        out[name] = resolve_first(list(ref), **kw) if isinstance(ref, tuple) else resolve(ref, **kw)
    return out


def _unet_config(folder: Path) -> UNetConfig:
    cfg_file = (folder / "unet" if (folder / "unet").is_dir() else folder) / "config.json"
    if not cfg_file.is_file():
        raise WeightFormatError(f"{cfg_file}: no such file (the UNet config of the base model is needed)")
    try:
        return UNetConfig.from_diffusers_config(json.loads(cfg_file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightFormatError(f"{cfg_file}: not valid JSON ({exc})") from exc
    except ValueError as exc:
        raise WeightFormatError(f"{cfg_file}: {exc}") from exc


def _load_unet(recipe: ModelRecipe, src: dict[str, Path], dtype: torch.dtype, device: torch.device) -> UNet:
    weights = src.get("weights")
    if recipe.apply == "unet" and weights is not None:
        # The distilled file is a whole UNet (SDXL-Lightning): the base folder gives only its config.
        cfg = _unet_config(src["unet"]) if src["unet"].is_dir() else None
        unet = load_unet(weights, dtype=dtype, device=device, config=cfg)
    else:
        unet = load_unet(src["unet"], dtype=dtype, device=device)
    if recipe.apply == "lora" and weights is not None:
        report = fuse_lora(unet, weights, recipe.lora_scale, ignore_text_encoder=True)
        logger.info("fused %d distilled LoRA layers from %s", len(report.fused), weights)
    return unet.eval().requires_grad_(False)


def _tokenizer(root: Path, name: str, pad: str) -> CLIPTokenizer:
    folder = root / name
    if (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_folder(folder)
    # SDXL's tokenizer folders hold the standard CLIP vocabulary, which fastface bundles.
    return CLIPTokenizer.bundled(pad_token=pad)


def _load_text(src: dict[str, Path], dtype: torch.dtype, device: torch.device) -> SDXLTextConditioner:
    root = src["text_encoder"].parent
    return SDXLTextConditioner(
        _tokenizer(root, "tokenizer", "<|endoftext|>"),
        _tokenizer(src["text_encoder_2"].parent, "tokenizer_2", "!"),
        load_text_encoder(src["text_encoder"], dtype=dtype, device=device),
        load_text_encoder(src["text_encoder_2"], dtype=dtype, device=device),
        read_force_zeros(root / "model_index.json"),
    )


def load_components(
    recipe: ModelRecipe,
    adapter: AdapterEntry,
    src: dict[str, Path],
    *,
    dtype: torch.dtype,
    device: torch.device,
    faces: FaceSettings | None = None,
) -> Components:
    """Load every part from the paths of :func:`resolve_sources` (the adapter is loaded, not yet installed)."""
    unet = _load_unet(recipe, src, dtype, device)
    text = _load_text(src, dtype, device)
    vae = load_vae(src["vae"], dtype=dtype, device=device)
    ident = adapter.adapter.load(adapter.preset, src, dtype=dtype, device=device,
                                 faces=faces or FaceSettings(device=device))
    if text.encoder_1.config.width + text.encoder_2.config.width != unet.config.context_dim:
        raise WeightFormatError(
            f"the text encoders ({src['text_encoder']}, {src['text_encoder_2']}) give "
            f"{text.encoder_1.config.width + text.encoder_2.config.width}-wide context, the UNet expects "
            f"{unet.config.context_dim}: the parts come from different models"
        )
    return Components(unet, text, vae, ident, {k: str(v) for k, v in src.items()})
