"""LoRA files for the SDXL UNet: read kohya / diffusers / PEFT LoRA files and fuse them into the weights.

Fusion (Hu et al. 2021, LoRA, eq. 3, with the kohya/PEFT alpha convention)::

    W' = W + s · (alpha / r) · reshape(B.flatten(1) @ A.flatten(1), W.shape)

with down A [r, in(, kh, kw)], up B [out, r(, 1, 1)], r = A.shape[0], alpha = r when the file gives none
(PEFT ``use_rslora``: alpha / sqrt(r)). The delta is computed in fp32 and the sum rounded once to the weight dtype.

Key families (detected per key): kohya ``lora_unet_<name>.lora_down/lora_up/lora_mid.weight`` + ``.alpha``,
diffusers ``unet.<module>.lora.down/up.weight``, the old attention-processor form
``unet.<...>.processor.to_q_lora.down/up.weight``, and PEFT ``[base_model.model.][unet.]<module>.lora_A/lora_B.weight``
(``lora_alpha``/``alpha_pattern``/``use_rslora`` from diffusers' safetensors metadata or a sibling
``adapter_config.json``). Names are resolved the ComfyUI way: every weight of the UNet is registered under its
diffusers name and its LDM/SGM name (each also underscored behind ``lora_unet_``), and the file's names are looked up.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fastface.models.loading import WeightFormatError, read_weights
from fastface.models.unet import UNet, UNetConfig
from fastface.models.unet_loading import ldm_key_map

logger = logging.getLogger(__name__)

METADATA_KEY = "lora_adapter_metadata"  # where diffusers writes the PEFT LoraConfig in a safetensors header

# key suffix -> (role, family); longest-first matters only where one suffix ends another (none here)
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    ("_lora.down.weight", "down", "diffusers-processor"),
    ("_lora.up.weight", "up", "diffusers-processor"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora.up.weight", "up", "diffusers"),
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".alpha", "alpha", ""),
)
# markers of adapter types that are not plain LoRA (fused differently, or not at all here)
_UNSUPPORTED = {
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "hada_": "LoHa",
    "lokr_": "LoKr",
    ".lora_B.bias": "LoRA bias",
    ".diff_b": "full bias difference",
    ".diff": "full weight difference",
    ".w_norm": "norm patch",
    ".b_norm": "norm patch",
}
_TE_KOHYA = ("lora_te_", "lora_te1_", "lora_te2_")
_TE_PREFIXES = ("text_encoder.", "text_encoder_2.")
_PEFT_WRAPPER = "base_model.model."


@dataclass(frozen=True)
class LoRALayer:
    """One low-rank update: down A [r, in(, kh, kw)], up B [out, r(, 1, 1)], optional LoCon mid [r, r, kh, kw]."""

    name: str  # module name as written in the file (prefixes such as ``unet.`` removed)
    keys: dict[str, str]  # role ("down", "up", "mid", "alpha") -> the file key it came from (for messages)
    family: str  # "kohya", "diffusers", "diffusers-processor" or "peft"
    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None = None
    alpha: float | None = None  # None: alpha = rank (factor 1)
    use_rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        """alpha / r (or alpha / sqrt(r) for rsLoRA); 1.0 when the file has no alpha."""
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def down_effective(self) -> torch.Tensor:
        """A in fp32, with a LoCon Tucker mid folded in: A'[a,i,y,x] = sum_b mid[a,b,y,x] · A[b,i]."""
        down = self.down.float()
        if self.mid is None:
            return down
        return torch.einsum("abyx,bi->aiyx", self.mid.float(), down.flatten(1))

    def delta(self, shape: torch.Size | tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
        """The fp32 weight update s·(alpha/r)·B·A reshaped to ``shape`` (on the factors' device)."""
        prod = self.up.float().flatten(1) @ self.down_effective().flatten(1)  # [out, in·kh·kw]
        return prod.reshape(shape).mul_(scale * self.factor)


@dataclass(frozen=True)
class LoRAWeights:
    """The parsed contents of a LoRA file: UNet layers and (kept apart) text-encoder layers."""

    source: str
    unet: dict[str, LoRALayer]  # keyed by the name in the file
    text_encoder: dict[str, LoRALayer] = field(default_factory=dict)

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(sorted({layer.family for layer in [*self.unet.values(), *self.text_encoder.values()]}))


@dataclass(frozen=True)
class FuseReport:
    """What :func:`fuse_lora` did."""

    source: str
    formats: tuple[str, ...]  # key families found in the file
    naming: tuple[str, ...]  # UNet naming schemes matched: "diffusers", "ldm"
    scale: float
    fused: tuple[str, ...]  # diffusers module names whose weight changed
    skipped_text_encoder: tuple[str, ...]  # text-encoder layers present in the file and not applied


def _show(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(stem, role, family) of a LoRA key, or None if it ends in no known suffix."""
    for suffix, role, family in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role, family
    return None


def _module_name(stem: str, family: str) -> str:
    """The module name a stem refers to: processor forms (``attn1.processor.to_out_lora``) become ``attn1.to_out.0``."""
    if family == "diffusers-processor":
        stem = stem.replace(".processor.", ".")
        if stem.endswith(".to_out"):
            stem += ".0"
    return stem


def _read_peft_configs(path: Path) -> dict[str, dict]:
    """PEFT LoraConfig dicts by component ("unet", "text_encoder", ... or "" when unprefixed); {} if none."""
    raw = None
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
        except (SafetensorError, OSError) as exc:
            raise WeightFormatError(f"{path}: cannot read the safetensors metadata ({exc})") from exc
    sibling = path.parent / "adapter_config.json"
    if raw is None and sibling.is_file():
        raw = sibling.read_text()
    if raw is None:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise WeightFormatError(f"{path}: the LoRA adapter metadata is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise WeightFormatError(f"{path}: the LoRA adapter metadata is a {type(cfg).__name__}, expected a JSON object")
    comps: dict[str, dict] = {}
    for key, value in cfg.items():
        comp, dot, rest = key.partition(".")
        if dot and comp in ("unet", "text_encoder", "text_encoder_2"):
            comps.setdefault(comp, {})[rest] = value
        else:
            comps.setdefault("", {})[key] = value
    return comps


def _peft_alpha(cfg: Mapping, name: str, source: str) -> tuple[float | None, bool]:
    """(alpha, use_rslora) of module ``name`` under a PEFT LoraConfig (peft's ``get_pattern_key`` rule)."""
    rslora = bool(cfg.get("use_rslora", False))
    alpha = cfg.get("lora_alpha")
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", name):
                alpha = value
                break
        except re.error as exc:
            msg = f"bad alpha_pattern entry {pattern!r} in the LoRA metadata ({exc})"
            raise WeightFormatError(f"{source}: {msg}") from None
    return (None if alpha is None else float(alpha)), rslora


@dataclass
class _Entry:
    """The tensors of one LoRA layer while a state dict is grouped."""

    keys: dict[str, str] = field(default_factory=dict)  # role -> file key
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> tensor
    family: str = ""


def _component(name: str) -> tuple[str, str]:
    """(component, module name): "unet", "te"/"te1"/"te2" (kohya) or "text_encoder[_2]"; prefixes removed."""
    name = name.removeprefix(_PEFT_WRAPPER)
    if name.startswith(_TE_KOHYA):
        return name.split("_", 2)[1], name
    if name.startswith(_TE_PREFIXES):
        component, rest = name.split(".", 1)
        return component, rest
    return "unet", name.removeprefix("unet.")


def _group(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, _Entry]:
    """Group keys by layer stem; unknown and unsupported keys raise, each kind listed."""
    entries: dict[str, _Entry] = {}
    unsupported: dict[str, list[str]] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        split = _split_key(key)
        if split is None:
            kind = next((label for marker, label in _UNSUPPORTED.items() if marker in key), None)
            (unknown if kind is None else unsupported.setdefault(kind, [])).append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise WeightFormatError(f"{source}: entry '{key}' is a {type(value).__name__}, expected a tensor")
        stem, role, family = split
        entry = entries.setdefault(stem, _Entry())
        entry.keys[role], entry.tensors[role] = key, value
        if family and entry.family and entry.family != family:
            raise WeightFormatError(f"{source}: LoRA layer '{stem}' mixes key families: {sorted(entry.keys.values())}")
        entry.family = family or entry.family
    if unsupported:
        msg = "; ".join(f"{kind}: {_show(keys, 4)}" for kind, keys in unsupported.items())
        raise WeightFormatError(
            f"{source}: the file holds adapter types fastface cannot fuse ({msg}). Only plain LoRA/LoCon "
            "(lora_down/lora_up[/lora_mid], lora.down/up, lora_A/lora_B) is supported."
        )
    if unknown:
        raise WeightFormatError(
            f"{source}: {len(unknown)} key(s) in no known LoRA format: {_show(unknown)}. Expected kohya "
            "(lora_unet_*.lora_down/lora_up.weight, .alpha), diffusers (*.lora.down/up.weight, "
            "*.processor.to_q_lora.down.weight) or PEFT (*.lora_A/lora_B.weight) keys. Is this a LoRA file?"
        )
    return entries


def parse_lora(
    state_dict: Mapping[str, torch.Tensor],
    source: str | os.PathLike = "<state dict>",
    peft_configs: Mapping[str, Mapping] | None = None,
) -> LoRAWeights:
    """Group a LoRA state dict into :class:`LoRALayer` s, detecting the key family of each entry.

    ``peft_configs`` maps a component ("unet", "text_encoder", or "" for unprefixed) to a PEFT LoraConfig dict
    (``lora_alpha``, ``alpha_pattern``, ``use_rslora``) used for PEFT-family layers without an ``.alpha`` key.
    Raises :class:`WeightFormatError` for keys in no known LoRA format, unsupported adapter types (DoRA, LoHa,
    LoKr, ...), or incomplete layers (a down without its up).
    """
    source = str(source)
    peft_configs = peft_configs or {}
    unet: dict[str, LoRALayer] = {}
    text: dict[str, LoRALayer] = {}
    for stem, entry in _group(state_dict, source).items():
        t = entry.tensors
        if "down" not in t or "up" not in t:
            raise WeightFormatError(
                f"{source}: incomplete LoRA layer '{stem}' (only {', '.join(sorted(entry.keys.values()))}): both the "
                "down (A) and the up (B) matrix are needed. The file may be damaged or truncated."
            )
        component, name = _component(_module_name(stem, entry.family))
        alpha, rslora = None, False
        if "alpha" in t:
            if t["alpha"].numel() != 1:
                found = tuple(t["alpha"].shape)
                raise WeightFormatError(f"{source}: '{entry.keys['alpha']}' must be a scalar, found shape {found}")
            alpha = float(t["alpha"].item())
        elif entry.family == "peft" and (cfg := peft_configs.get(component) or peft_configs.get("")):
            alpha, rslora = _peft_alpha(cfg, name, source)
        down, up, mid = t["down"], t["up"], t.get("mid")
        if down.ndim not in (2, 4) or up.ndim != down.ndim or (mid is not None and (mid.ndim != 4 or down.ndim != 4)):
            shapes = ", ".join(f"{role} {tuple(v.shape)}" for role, v in t.items() if role != "alpha")
            raise WeightFormatError(
                f"{source}: LoRA layer '{stem}' has {shapes}: expected 2-D (linear) or 4-D (conv) factors"
            )
        layer = LoRALayer(name, entry.keys, entry.family, down, up, mid, alpha, rslora)
        (unet if component == "unet" else text)[stem] = layer
    if not unet and not text:
        raise WeightFormatError(f"{source}: no LoRA layers found (the file is empty)")
    return LoRAWeights(source, unet, text)


def load_lora(path: str | os.PathLike) -> LoRAWeights:
    """Read a LoRA file (``.safetensors`` preferred; ``.bin`` read safely) and parse it with :func:`parse_lora`."""
    path = Path(path)
    state_dict = read_weights(path)
    lora = parse_lora(state_dict, path, _read_peft_configs(path))
    logger.info("%s: %d UNet and %d text-encoder LoRA layers (%s)", path, len(lora.unet), len(lora.text_encoder),
                ", ".join(lora.formats))
    return lora


# ----------------------------------------------------------------------------------------------------------------
# Resolving names against the UNet


@functools.lru_cache(maxsize=4)
def lora_aliases(config: UNetConfig) -> Mapping[str, tuple[str, str]]:
    """Every name a LoRA file may use for a UNet weight -> (diffusers module name, naming scheme).

    For each Linear/Conv2d module ``p`` (diffusers name) and its LDM/SGM name ``q``: ``p``, ``q``,
    ``lora_unet_`` + ``p`` with dots as underscores, and the same for ``q``. Underscores are never inverted.
    """
    with torch.device("meta"):
        model = UNet(config)
    # the LDM layout has no LCM guidance projection (time_embedding.cond_proj): it keeps only its diffusers name
    ldm = ldm_key_map(config.replace(time_cond_proj_dim=None))
    table: dict[str, tuple[str, str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        names = [(name, "diffusers")]
        ldm_weight = ldm.get(f"{name}.weight")
        if ldm_weight is not None:
            names.append((ldm_weight[: -len(".weight")], "ldm"))
        for path, scheme in names:
            for alias in (path, "lora_unet_" + path.replace(".", "_")):
                previous = table.setdefault(alias, (name, scheme))
                if previous[0] != name:
                    raise AssertionError(f"LoRA alias {alias!r} names both {previous[0]} and {name}")
    return types.MappingProxyType(table)  # cached: read-only


def resolve_lora(lora: LoRAWeights, config: UNetConfig) -> dict[str, tuple[LoRALayer, str]]:
    """UNet module name -> (layer, naming scheme) for every UNet layer of ``lora``.

    Raises :class:`WeightFormatError` naming the file when layers match no module of the UNet (listing them) or
    when two layers target the same module.
    """
    table = lora_aliases(config)
    out: dict[str, tuple[LoRALayer, str]] = {}
    unknown = []
    for stem, layer in lora.unet.items():
        hit = table.get(layer.name)
        if hit is None:
            unknown.append(stem)
            continue
        module, scheme = hit
        if module in out:
            raise WeightFormatError(
                f"{lora.source}: LoRA layers '{out[module][0].name}' and '{layer.name}' both target UNet module "
                f"'{module}'; the file mixes two copies of one layer"
            )
        out[module] = (layer, scheme)
    if unknown:
        raise WeightFormatError(
            f"{lora.source}: {len(unknown)} LoRA layer(s) match no module of the SDXL UNet: {_show(unknown)}. "
            "Is this an SDXL LoRA (not SD1.5/SD3/FLUX)?"
        )
    return out


def _target(unet: nn.Module, module_name: str) -> nn.Parameter:
    module = unet.get_submodule(module_name)
    base = getattr(module, "base", None)  # a runtime LoRA wrapper (fastface.models.lora.LoRALinear): fuse into its base
    if isinstance(base, (nn.Linear, nn.Conv2d)):
        if getattr(module, "is_fused", False):
            raise ValueError(f"{module_name}: a runtime LoRA wrapper has its LoRA fused into the weight; "
                             "unfuse it first")
        module = base
    return module.weight


def _expected_shapes(layer: LoRALayer, weight_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    out_f, in_f, *kernel = weight_shape
    ones = (1,) * len(kernel)
    r_down, r_up = layer.rank, int(layer.up.shape[1])
    if layer.mid is None:
        return {"down": (r_down, in_f, *kernel), "up": (out_f, r_down, *ones)}
    return {"down": (r_down, in_f, *ones), "mid": (r_up, r_down, *kernel), "up": (out_f, r_up, *ones)}


def fuse_lora(
    unet: UNet,
    lora: LoRAWeights | str | os.PathLike,
    scale: float = 1.0,
    *,
    ignore_text_encoder: bool = False,
) -> FuseReport:
    """Fuse a LoRA into ``unet`` in place: ``W += scale · (alpha/r) · B·A`` on each targeted weight.

    ``lora`` is a path or :class:`LoRAWeights`. All names and shapes are checked before any weight changes, so a
    bad file leaves the UNet untouched. The delta is computed in fp32 and added with one rounding to the weight dtype.
    Text-encoder layers in the file raise ValueError unless ``ignore_text_encoder`` (then logged and listed in the
    report). Returns a :class:`FuseReport`.
    """
    if not isinstance(getattr(unet, "config", None), UNetConfig):
        raise TypeError(f"fuse_lora needs a fastface UNet (with a UNetConfig), got {type(unet).__name__}")
    if not isinstance(lora, LoRAWeights):
        lora = load_lora(lora)
    if lora.text_encoder and not ignore_text_encoder:
        raise ValueError(
            f"{lora.source}: the LoRA also has {len(lora.text_encoder)} text-encoder layer(s) "
            f"({_show(lora.text_encoder, 3)}) that fuse_lora(unet, ...) cannot apply; pass ignore_text_encoder=True "
            "to fuse only the UNet part"
        )
    if lora.text_encoder:
        logger.warning("%s: ignoring %d text-encoder LoRA layer(s)", lora.source, len(lora.text_encoder))
    plan = resolve_lora(lora, unet.config)
    targets = {}
    for module_name, (layer, _) in plan.items():
        weight = _target(unet, module_name)
        want = _expected_shapes(layer, tuple(weight.shape))
        for role, shape in want.items():
            found = tuple(getattr(layer, role).shape)
            if found != shape:
                raise WeightFormatError(
                    f"{lora.source}: shape mismatch for LoRA '{layer.keys[role]}' ({role}) on UNet weight "
                    f"'{module_name}' {tuple(weight.shape)}: expected {shape}, found {found}. "
                    "The LoRA was made for another model."
                )
        targets[module_name] = weight
    with torch.no_grad():
        for module_name, (layer, _) in plan.items():
            weight = targets[module_name]
            delta = _to(layer, weight.device).delta(weight.shape, scale)
            if weight.dtype == torch.float32:
                weight.add_(delta)
            else:  # sum in fp32, one rounding to the weight dtype
                weight.copy_(weight.float().add_(delta))
    report = FuseReport(
        source=lora.source,
        formats=lora.formats,
        naming=tuple(sorted({scheme for _, scheme in plan.values()})),
        scale=float(scale),
        fused=tuple(plan),
        skipped_text_encoder=tuple(lora.text_encoder),
    )
    logger.info("%s: fused %d LoRA layers at scale %g (%s)", lora.source, len(plan), scale, ", ".join(report.formats))
    return report


def _to(layer: LoRALayer, device: torch.device) -> LoRALayer:
    if layer.down.device == device:
        return layer
    mid = None if layer.mid is None else layer.mid.to(device)
    return dataclasses.replace(layer, down=layer.down.to(device), up=layer.up.to(device), mid=mid)
