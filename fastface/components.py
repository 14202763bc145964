"""Finding and loading the parts of a :class:`fastface.Pipeline`: UNet (+ distilled weights), text, VAE, adapter.

Every part comes from a model recipe (:func:`fastface.presets.model_recipe`) and a registered adapter
(:mod:`fastface.adapters.registry`), with a local path override for each: ``base`` (a diffusers SDXL folder),
``unet`` (a UNet folder or file), ``weights`` (the distilled LoRA of hyper/lcm/tcd, or the distilled UNet file of
lightning), ``vae`` (folder or file), ``adapter_file``, and the adapter's own load options (files it names).
Repo parts are looked up in the Hugging Face cache and downloaded only with ``download=True``
(:mod:`fastface.hub`). Every part is looked up before anything is loaded, and all missing parts are reported
together (:mod:`fastface.needs`); ``fastface doctor`` lists the same parts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastface.adapters.base import FaceSettings, IdentityAdapter
from fastface.adapters.registry import AdapterEntry
from fastface.hub import HubFile, HubFolder, WeightRef
from fastface.models.loading import WeightFormatError
from fastface.needs import FixHint, Need, doctor_command, resolve_needs
from fastface.models.lora_files import fuse_lora
from fastface.models.text import SDXLTextConditioner, load_text_encoder, read_force_zeros
from fastface.models.tokenizer import CLIPTokenizer
from fastface.models.unet import UNet, UNetConfig
from fastface.models.unet_loading import load_unet
from fastface.models.vae import AutoencoderKL
from fastface.models.vae_loading import load_vae
from fastface.presets import ModelRecipe

logger = logging.getLogger(__name__)

__all__ = ["Components", "LocalPaths", "source_needs", "resolve_sources", "load_components"]

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


def _source(ref: WeightRef) -> HubFile | HubFolder | Path:
    return ref if isinstance(ref, (HubFile, HubFolder)) else Path(os.path.expanduser(os.fspath(ref)))


def _need(name: str, what: str, refs: Any, keyword: str, flag: str) -> Need:
    refs = refs if isinstance(refs, (tuple, list)) else (refs,)
    sources = tuple(_source(r) for r in refs)
    if all(isinstance(s, Path) for s in sources):
        what = f"local file or folder ({what})"
    return Need(name, what, sources, keyword, flag)


_PARTS = {"unet": "the UNet", "text_encoder": "the first text encoder (CLIP ViT-L)",
          "text_encoder_2": "the second text encoder (OpenCLIP ViT-bigG)", "vae": "the VAE"}


def source_needs(
    recipe: ModelRecipe,
    adapter: AdapterEntry,
    paths: LocalPaths = LocalPaths(),
    adapter_files: Mapping[str, Any] | None = None,
    *,
    half: bool = False,
) -> list[Need]:
    """Every part a pipeline loads, as :class:`~fastface.needs.Need` s (where each is looked for, and the keyword /
    flag that gives a local copy): ``unet``, ``weights`` (when the recipe has distilled weights), ``text_encoder``,
    ``text_encoder_2``, ``vae``, and the adapter's files (``adapter``, and what else its class lists)."""
    if paths.base is not None:
        recipe = dataclasses.replace(recipe, base=paths.base)
    if paths.vae is not None:
        recipe = dataclasses.replace(recipe, vae=paths.vae)
    out: list[Need] = []
    if paths.unet is not None:
        out.append(_need("unet", _PARTS["unet"], paths.unet, "unet", "--unet"))
    else:
        out.append(_need("unet", f"{_PARTS['unet']} of {recipe.preset}", _candidates(recipe, "unet", half), "base",
                         "--base"))
    weights = paths.weights if paths.weights is not None else recipe.weights
    # A user UNet replaces the distilled UNet file of apply='unet' (lightning) unless weights are given too.
    if weights is not None and not (recipe.apply == "unet" and paths.unet is not None and paths.weights is None):
        out.append(_need("weights", f"the distilled weights of {recipe.preset} ({recipe.steps} steps)", weights,
                         "weights", "--weights"))
    for name in ("text_encoder", "text_encoder_2", "vae"):
        own = name == "vae" and recipe.vae is not None
        out.append(_need(name, _PARTS[name], _candidates(recipe, name, half), "vae" if own else "base",
                         "--vae" if own else "--base"))
    options = {o.name: o for o in adapter.adapter.load_options()}
    for name, ref in adapter.adapter.files(adapter.preset, paths.adapter_file, adapter_files or {}).items():
        if name == "adapter":
            out.append(_need(name, f"the {adapter.name} adapter file", ref, "adapter_file", "--adapter-file"))
        else:
            o = options.get(name)
            out.append(_need(name, o.help if o else name, ref, name, o.cli_flag if o else ""))
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
    hint: FixHint | None = None,
    also: Sequence[Need] = (),
) -> dict[str, Path]:
    """Local paths of every part of :func:`source_needs` (downloaded into the cache with ``download``).

    Raises one :class:`fastface.needs.MissingWeightsError` naming every missing part and how to get them all
    (``hint``: the command; default ``fastface doctor --preset ... --adapter ... --download``); ``also``: needs of a
    later step (the adapter's face models), not fetched here but named in that error when they are missing too.
    """
    needs = source_needs(recipe, adapter, paths, adapter_files, half=half)
    hint = hint or FixHint(doctor_command(recipe.preset, adapter.name))
    return resolve_needs(needs, download=download, cache_dir=cache_dir, hint=hint, also=also)


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
