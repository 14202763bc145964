"""Loading SDXL's VAE: diffusers ``vae/`` folders, single-file checkpoints (``first_stage_model.*``), standalone files.

The LDM -> diffusers key map (``convert_ldm_vae_checkpoint`` in diffusers' single-file utilities, reimplemented):
``encoder.down.{i}.block.{j}`` -> ``encoder.down_blocks.{i}.resnets.{j}``, ``...downsample.conv`` ->
``...downsamplers.0.conv``; **the decoder's up index is reversed**: ``decoder.up.{b}`` -> ``decoder.up_blocks.{n-1-b}``
(``upsample.conv`` -> ``upsamplers.0.conv``); ``mid.block_{1,2}`` -> ``mid_block.resnets.{0,1}``;
``mid.attn_1.{norm,q,k,v,proj_out}`` -> ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` with the
1x1-conv weights ``[C, C, 1, 1]`` squeezed to ``[C, C]``; ``nin_shortcut`` -> ``conv_shortcut``; ``norm_out`` ->
``conv_norm_out``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .loading import StateDict, WeightFormatError, assign_state_dict, find_weight_file, read_weight_files, read_weights
from .vae import AutoencoderKL, VAEConfig, vae_config

logger = logging.getLogger(__name__)

VAE_PREFIXES = ("first_stage_model.", "vae.")
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers < 0.14 attention names, still found in some standalone VAE files.
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_state_from_ldm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """LDM-named VAE weights (prefix already removed) in diffusers names (see the module docstring)."""
    ups = [int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    out: StateDict = {}
    for key, value in sd.items():
        new = key
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        new = re.sub(
            r"^decoder\.up\.(\d+)\.(block|upsample)\.",
            lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}."
            + ("resnets." if m.group(2) == "block" else "upsamplers.0."),
            new,
        )
        new = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", new)
        attn = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", new)
        if attn:
            new = f"{attn.group(1)}.mid_block.attentions.0.{_ATTN[attn.group(2)]}.{attn.group(3)}"
            if attn.group(2) != "norm" and value.ndim == 4:
                value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv -> linear
        new = new.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
        out[new] = value
    return out


def _fix_diffusers_names(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Old diffusers attention names (query/key/value/proj_attn) to current ones, squeezing 1x1 conv weights."""
    out: StateDict = {}
    for key, value in sd.items():
        m = re.match(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
        if m:
            key = f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"
        if re.search(r"\.attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", key) and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[key] = value
    return out


def vae_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> StateDict:
    """Diffusers-named VAE weights from any supported layout: with or without a ``first_stage_model.``/``vae.``
    prefix, in LDM or diffusers names. Keys of other models in the same file are dropped."""
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in sd)), "")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    else:  # training leftovers of some standalone VAE files (the discriminator, EMA copies)
        sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    if any(k.startswith(("decoder.up.", "encoder.down.")) for k in sd):
        return vae_state_from_ldm(sd)
    if any(k.startswith(("decoder.up_blocks.", "encoder.down_blocks.")) for k in sd):
        return _fix_diffusers_names(sd)
    raise WeightFormatError(
        f"{source}: no VAE weights found (looked for 'first_stage_model.*' / 'vae.*' prefixes, LDM names like "
        "'decoder.up.0.block.0.conv1.weight' and diffusers names like 'decoder.up_blocks.0.resnets.0.conv1.weight')"
    )


def build_vae(
    config: str | VAEConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> AutoencoderKL:
    """Build an :class:`AutoencoderKL` on the meta device and assign diffusers-named weights."""
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    assign_state_dict(vae, state_dict, source=source, dtype=dtype, device=device)
    return vae.eval().requires_grad_(False)


def config_from_diffusers(config_file: str | os.PathLike) -> VAEConfig:
    """A :class:`VAEConfig` from a diffusers ``vae/config.json``."""
    path = Path(config_file)
    if not path.is_file():
        raise WeightFormatError(f"{path}: no such file (a diffusers vae folder needs its config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        opt = lambda k: None if raw.get(k) is None else tuple(float(v) for v in raw[k])  # noqa: E731
        return VAEConfig(
            block_out_channels=tuple(int(c) for c in raw["block_out_channels"]),
            layers_per_block=int(raw.get("layers_per_block", 2)),
            latent_channels=int(raw.get("latent_channels", 4)),
            in_channels=int(raw.get("in_channels", 3)),
            out_channels=int(raw.get("out_channels", 3)),
            norm_groups=int(raw.get("norm_num_groups", 32)),
            scaling_factor=float(raw.get("scaling_factor", 0.18215)),
            shift_factor=None if raw.get("shift_factor") is None else float(raw["shift_factor"]),
            latents_mean=opt("latents_mean"),
            latents_std=opt("latents_std"),
            mid_attention=bool(raw.get("mid_block_add_attention", True)),
            use_quant_conv=bool(raw.get("use_quant_conv", True)),
            use_post_quant_conv=bool(raw.get("use_post_quant_conv", True)),
            force_upcast=bool(raw.get("force_upcast", True)),
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WeightFormatError(f"{path}: not a usable AutoencoderKL config ({type(exc).__name__}: {exc})") from exc


def load_vae(
    path: str | os.PathLike,
    config: str | VAEConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
) -> AutoencoderKL:
    """Load a VAE from a diffusers ``vae/`` folder, or a standalone/single-file weight file (LDM or diffusers names).

    ``config`` defaults to the folder's config.json, or to ``"sdxl"`` for a file.
    """
    path = Path(path)
    if path.is_dir():
        cfg = vae_config(config) if config is not None else config_from_diffusers(path / "config.json")
        files = find_weight_file(path, "diffusion_pytorch_model", variant)
        sd = vae_state_dict(read_weight_files(files), source=str(path))
        return build_vae(cfg, sd, source=", ".join(map(str, files)), dtype=dtype, device=device)
    if not path.exists():
        raise WeightFormatError(f"{path}: no such file or folder (expected a diffusers vae folder or a VAE weight file)")
    return load_vae_from_state_dict(read_weights(path), config or "sdxl", dtype=dtype, device=device, source=str(path))


def load_vae_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    config: str | VAEConfig = "sdxl",
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    source: str = "<state dict>",
) -> AutoencoderKL:
    """The VAE of an already-read checkpoint (a full SDXL single file, or a standalone VAE)."""
    return build_vae(config, vae_state_dict(sd, source=source), source=source, dtype=dtype, device=device)
