"""Loading SDXL UNet weights: diffusers folders, single-file LDM/SGM checkpoints, bare diffusers-keyed files.

Also holds the LDM <-> diffusers key map (derived from the config by the index rules of the original
``openaimodel.UNetModel``) and config inference from weight shapes; the SDXL layout checks live in
:mod:`fastface.models.unet_config`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from fastface.models.loading import (
    StateDict,
    WeightFormatError,
    assign_state_dict,
    find_weight_file,
    read_weight_files,
    read_weights,
)
from fastface.models.unet import UNet
from fastface.models.unet_config import (  # re-exported: config_from_diffusers and check_sdxl_layout lived here
    UNetConfig,
    check_sdxl_layout,
    config_from_diffusers,
    get_unet_config,
    not_sdxl,
)

logger = logging.getLogger(__name__)

LDM_PREFIX = "model.diffusion_model."
WEIGHT_STEM = "diffusion_pytorch_model"
SDXL_HEAD_DIM = 64  # every released SDXL-family UNet uses 64-channel heads

# ----------------------------------------------------------------------------------------------------------------
# LDM (sgm openaimodel) <-> diffusers key names

_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_FIXED_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _module_prefix_map(config: UNetConfig) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, by the input/output block index rules."""
    n, lpb = len(config.channels), config.layers_per_block
    out = dict(_FIXED_LDM)
    for b in range(n):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            out[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            out[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
        if b < n - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op"
    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = "middle_block.2"
    for b in range(n):
        has_attn = config.depth[n - 1 - b] > 0
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            out[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            out[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
        if b < n - 1:
            out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv"
    return out


def ldm_key_map(config: UNetConfig) -> dict[str, str]:
    """Every diffusers UNet key of ``config`` -> its LDM/SGM name (without the ``model.diffusion_model.`` prefix)."""
    if config.time_cond_proj_dim is not None:
        raise ValueError("the LDM layout has no time_embedding.cond_proj (LCM full UNets ship in diffusers layout)")
    prefixes = _module_prefix_map(config)
    with torch.device("meta"):
        keys = list(UNet(config).state_dict())
    out = {}
    for key in keys:
        parts = key.split(".")
        # longest matching module prefix (resnet prefixes end at the resnet, attention names are shared)
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in prefixes:
                rest = parts[cut:]
                if ".resnets." in f".{head}." and rest[0] in _RESNET_LDM:
                    rest = _RESNET_LDM[rest[0]].split(".") + rest[1:]
                out[key] = ".".join([prefixes[head], *rest])
                break
        else:
            raise AssertionError(f"no LDM name rule for {key}")
    return out


def diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor], config: UNetConfig) -> StateDict:
    """Rename a diffusers-keyed UNet state dict to LDM names (no prefix); tensors are shared, not copied."""
    names = ldm_key_map(config)
    unknown = [k for k in state_dict if k not in names]
    if unknown:
        raise ValueError(f"keys with no LDM name: {unknown[:12]}")
    return {names[k]: v for k, v in state_dict.items()}


def ldm_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: UNetConfig, source: str | os.PathLike
) -> StateDict:
    """Rename an LDM-keyed UNet state dict (no prefix) to diffusers names; unknown keys raise WeightFormatError."""
    names = {v: k for k, v in ldm_key_map(config).items()}
    unknown = [k for k in state_dict if k not in names]
    missing = [k for k in names if k not in state_dict]
    if unknown or missing:
        parts = [f"{len(missing)} missing key(s): {_show(missing)}"] if missing else []
        parts += [f"{len(unknown)} unexpected key(s): {_show(unknown)}"] if unknown else []
        raise WeightFormatError(
            f"{source}: the LDM UNet weights do not match an SDXL UNet ({'; '.join(parts)}). "
            "Is the file complete and an SDXL checkpoint?"
        )
    return {names[k]: v for k, v in state_dict.items()}


def _show(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Config inference from diffusers-keyed weight shapes


def _shape(sd: Mapping[str, torch.Tensor], key: str, source: str | os.PathLike) -> tuple[int, ...]:
    if key not in sd:
        raise WeightFormatError(
            f"{source}: cannot infer the UNet config: key '{key}' is missing. Is this an SDXL UNet file?"
        )
    return tuple(sd[key].shape)


def infer_unet_config(sd: Mapping[str, torch.Tensor], source: str | os.PathLike = "<state dict>") -> UNetConfig:
    """Infer an SDXL UNet config from the shapes of a diffusers-keyed state dict (head size 64 assumed).

    Raises WeightFormatError naming ``source`` if the weights are not an SDXL-layout UNet.
    """
    n = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")), default=-1)
    if n == 0:
        raise WeightFormatError(f"{source}: no UNet weights found (no 'down_blocks.*' keys)")
    cin = _shape(sd, "conv_in.weight", source)
    cout = _shape(sd, "conv_out.weight", source)
    channels = tuple(_shape(sd, f"down_blocks.{b}.resnets.0.conv1.weight", source)[0] for b in range(n))
    lpb = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets."))
    depth = []
    for b in range(n):
        blocks = {int(k.split(".")[5]) for k in sd if k.startswith(f"down_blocks.{b}.attentions.0.transformer_blocks.")}
        depth.append(len(blocks))
        proj = f"down_blocks.{b}.attentions.0.proj_in.weight"
        if proj in sd and len(sd[proj].shape) != 2:
            reason = "proj_in is a 1x1 conv (SD1.x/2.x style), SDXL uses linear projections"
            raise WeightFormatError(f"{source}: {not_sdxl(reason)}")
    if "add_embedding.linear_1.weight" not in sd:
        raise WeightFormatError(f"{source}: {not_sdxl('no text-time add embedding (add_embedding.linear_1.weight)')}")
    add_in = _shape(sd, "add_embedding.linear_1.weight", source)[1]
    if add_in <= 6 * 256:
        raise WeightFormatError(
            f"{source}: cannot infer the text-time embedding split of add_embedding input size {add_in} "
            "(SDXL: 1280 pooled + 6x256 time ids); pass config= explicitly"
        )
    last = n - 1
    context = _shape(sd, f"down_blocks.{last}.attentions.0.transformer_blocks.0.attn2.to_k.weight", source)[1]
    cond = sd.get("time_embedding.cond_proj.weight")
    try:
        config = UNetConfig(
            in_channels=cin[1],
            out_channels=cout[0],
            channels=channels,
            layers_per_block=lpb,
            depth=tuple(depth),
            heads=tuple(max(c // SDXL_HEAD_DIM, 1) for c in channels),
            context_dim=context,
            pooled_dim=add_in - 6 * 256,
            time_id_dim=256,
            time_cond_proj_dim=None if cond is None else int(cond.shape[1]),
        )
        check_sdxl_layout(config)
    except ValueError as exc:
        raise WeightFormatError(f"{source}: {exc}") from None
    return config


def infer_unet_config_ldm(sd: Mapping[str, torch.Tensor], source: str | os.PathLike = "<state dict>") -> UNetConfig:
    """Infer the config of an LDM-keyed state dict (levels, layers and depths read from the block indices)."""
    if "label_emb.0.0.weight" not in sd:
        raise WeightFormatError(f"{source}: {not_sdxl('no label_emb (text-time embedding): an SD1.x/2.x UNet?')}")
    ops = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.") and ".0.op." in k)
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    lpb = ops[0] - 1 if ops else n_in - 1
    n = n_in // (lpb + 1)
    # build a shape-only diffusers view of the keys inference needs
    view: dict[str, torch.Tensor] = {}
    for b in range(n):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            for k, v in sd.items():
                if k.startswith(f"input_blocks.{i}.0.in_layers.2.") and k.endswith("weight"):
                    view[f"down_blocks.{b}.resnets.{j}.conv1.weight"] = v
                elif k.startswith(f"input_blocks.{i}.1."):
                    view[f"down_blocks.{b}.attentions.{j}." + k[len(f"input_blocks.{i}.1."):]] = v
    fixed = (("input_blocks.0.0", "conv_in"), ("out.2", "conv_out"), ("label_emb.0.0", "add_embedding.linear_1"))
    for ldm, dif in fixed:
        if f"{ldm}.weight" in sd:
            view[f"{dif}.weight"] = sd[f"{ldm}.weight"]
    return infer_unet_config(view, source)


# ----------------------------------------------------------------------------------------------------------------
# load_unet


def _resolve_config(config: str | UNetConfig | None) -> UNetConfig | None:
    if config is None or isinstance(config, UNetConfig):
        return config
    return get_unet_config(config)


def _read_folder(folder: Path) -> tuple[StateDict, UNetConfig | None, str]:
    if (folder / "unet").is_dir():
        folder = folder / "unet"
    config = None
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, OSError) as exc:
            raise WeightFormatError(f"{cfg_path}: not a readable JSON config ({exc})") from exc
        try:
            config = config_from_diffusers(raw)
        except ValueError as exc:
            raise WeightFormatError(f"{cfg_path}: {exc}") from None
    files = find_weight_file(folder, WEIGHT_STEM)
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    return read_weight_files(files), config, source


def _unet_part(sd: StateDict, path: Path) -> tuple[StateDict, str]:
    """The UNet tensors of a single file and their layout ("ldm" or "diffusers"); other components are dropped."""
    if any(k.startswith(LDM_PREFIX) for k in sd):
        skipped = sum(1 for k in sd if not k.startswith(LDM_PREFIX))
        if skipped:
            logger.debug("%s: ignoring %d non-UNet tensors (text encoders, VAE, ...)", path, skipped)
        return {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}, "ldm"
    if any(k.startswith("input_blocks.") for k in sd):
        return sd, "ldm"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in sd):
        return sd, "diffusers"
    raise WeightFormatError(
        f"{path}: no UNet weights found: expected 'model.diffusion_model.*' (single-file checkpoint), "
        f"'input_blocks.*' (LDM UNet) or 'down_blocks.*' (diffusers UNet) keys; "
        f"the file holds {_show(list(sd), 5)}"
    )


def load_unet(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: str | UNetConfig | None = None,
) -> UNet:
    """Load an SDXL UNet from a diffusers folder, a single-file LDM/SGM checkpoint, or a bare UNet file.

    ``path`` may be a pipeline root (with ``unet/``), a diffusers UNet folder (``diffusion_pytorch_model*.safetensors``,
    fp16 variant, or shards with an index), a single ``.safetensors`` checkpoint (``model.diffusion_model.*``), a
    ComfyUI UNet-only LDM file (``input_blocks.*``) or a diffusers-keyed file with no config (config inferred from
    the shapes, or given as a registry name or :class:`UNetConfig`). The model is built on the meta device and the
    file's tensors become its parameters (converted only if ``dtype``/``device`` differ).
    """
    path = Path(path)
    if not path.exists():
        raise WeightFormatError(f"{path}: no such file or folder (expected an SDXL UNet folder or weight file)")
    cfg = _resolve_config(config)
    if path.is_dir():
        sd, folder_cfg, source = _read_folder(path)
        cfg = cfg or folder_cfg
        layout = "diffusers"
    else:
        sd, layout = _unet_part(read_weights(path), path)
        source = str(path)
    if cfg is None:
        cfg = infer_unet_config_ldm(sd, source) if layout == "ldm" else infer_unet_config(sd, source)
        logger.info("%s: inferred UNet config %s", source, cfg)
    else:
        try:
            check_sdxl_layout(cfg)
        except ValueError as exc:
            raise WeightFormatError(f"{source}: {exc}") from None
    if layout == "ldm":
        sd = ldm_to_diffusers(sd, cfg, source)
    with torch.device("meta"):
        model = UNet(cfg)
    assign_state_dict(model, sd, source=source, dtype=dtype, device=device)
    return model.eval()
