"""IP-Adapter FaceID / FaceID-Plus-v2 for our SDXL UNet: reading the released files and installing them.

Ye et al. 2023, "IP-Adapter" (decoupled cross-attention, eq. 5), FaceID variants of tencent-ailab/IP-Adapter.
A file holds ``{"image_proj": {...}, "ip_adapter": {...}}`` (``.bin``) or the same flattened with ``image_proj.`` /
``ip_adapter.`` prefixes (``.safetensors``). ``ip_adapter`` keys are indexed by the position ``i`` of the layer in
``unet.attention_layers()``: ``{i}.to_k_ip.weight``/``{i}.to_v_ip.weight`` for the cross-attention layers (odd ``i``)
and a rank-r LoRA ``{i}.to_{q,k,v,out}_lora.{down,up}.weight`` on all of them.

Typical use::

    adapter = IPAdapterFaceID.from_file("ip-adapter-faceid-plusv2_sdxl.bin")
    tokens = adapter.encode(embedding, clip_features)           # [B, 4, 2048]
    with adapter.install(unet, lora_scale=1.0) as handle:
        eps = unet(x, t, ctx, text_embeds=..., time_ids=..., id_tokens=tokens, id_scale=scale)  # scale [B]
        handle.set_lora_scale(0.5)                               # no reload
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fastface.models.attention import IdentityAttention
from fastface.models.loading import WeightFormatError, assign_state_dict, read_weights
from fastface.models.lora import LoRALinear

from .base import InstallHandle, attention_layers_for, tensor_shape
from .faceid import FaceIDProjConfig, MLPProjModel, ProjPlusModel, build_projection

logger = logging.getLogger(__name__)

Variant = Literal["faceid", "faceid_plus"]
StateDict = dict[str, torch.Tensor]

_LORA_SLOTS = ("to_q", "to_k", "to_v", "to_out")  # file names; to_out wraps the module to_out.0
_KEY_RE = re.compile(r"^(\d+)\.(.+)$")
_IP_SUFFIXES = ("to_k_ip.weight", "to_v_ip.weight")
_LORA_SUFFIXES = tuple(f"{s}_lora.{p}.weight" for s in _LORA_SLOTS for p in ("down", "up"))


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking a file
# ----------------------------------------------------------------------------------------------------------------


def split_ip_adapter_state_dict(obj: Mapping, source: str) -> tuple[StateDict, StateDict]:
    """Split a loaded file into ``(image_proj, ip_adapter)``: nested (the original ``.bin``) or prefixed (flattened)."""
    if isinstance(obj.get("image_proj"), Mapping) and isinstance(obj.get("ip_adapter"), Mapping):
        extra = [k for k in obj if k not in ("image_proj", "ip_adapter")]
        if extra:
            logger.warning("%s: ignoring top-level entries %s", source, extra)
        image_proj, ip_adapter = dict(obj["image_proj"]), dict(obj["ip_adapter"])
    else:
        image_proj, ip_adapter, other = {}, {}, []
        for key, value in obj.items():
            if key.startswith("image_proj."):
                image_proj[key[len("image_proj.") :]] = value
            elif key.startswith("ip_adapter."):
                ip_adapter[key[len("ip_adapter.") :]] = value
            else:
                other.append(key)
        if other or not image_proj or not ip_adapter:
            raise WeightFormatError(f"{source}: {_not_an_ip_adapter_hint(list(obj))}")
    for part, sd in (("image_proj", image_proj), ("ip_adapter", ip_adapter)):
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightFormatError(f"{source}: '{part}' entries that are not tensors: {sorted(bad)[:8]}")
    return image_proj, ip_adapter


def _not_an_ip_adapter_hint(keys: list[str]) -> str:
    shown = ", ".join(sorted(str(k) for k in keys)[:8]) or "nothing"
    if any(str(k).startswith("id_adapter") for k in keys):
        what = "this looks like a PuLID file; load it with the PuLID adapter instead"
    elif any("lora_down" in str(k) or str(k).startswith("lora_unet") for k in keys):
        what = (
            "this looks like a LoRA-only file (e.g. ip-adapter-faceid_sdxl_lora.safetensors); pass the adapter "
            "file itself (ip-adapter-faceid_sdxl.bin), which carries the same LoRA"
        )
    else:
        what = "is this an IP-Adapter FaceID file?"
    return (
        "not an IP-Adapter file: expected {'image_proj': ..., 'ip_adapter': ...} (.bin) or keys prefixed "
        f"'image_proj.' and 'ip_adapter.' (.safetensors); found keys {shown}; {what}"
    )


def detect_variant(image_proj: Mapping[str, torch.Tensor], source: str) -> Variant:
    """``faceid_plus`` or ``faceid`` from the ``image_proj`` keys (the order diffusers and ComfyUI use)."""
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "faceid_plus"
    if "proj.3.weight" in image_proj:
        kind = "IP-Adapter full-face"
    elif "proj.weight" in image_proj:
        kind = "plain IP-Adapter (image prompt)"
    elif "norm.weight" in image_proj and "proj.2.weight" in image_proj:
        return "faceid"
    elif "latents" in image_proj:
        kind = "IP-Adapter Plus (image prompt)"
    else:
        kind = "unknown"
    raise WeightFormatError(
        f"{source}: the image projection is a {kind} model (keys: {sorted(image_proj)[:6]}), not FaceID or "
        "FaceID-Plus; fastface supports ip-adapter-faceid_sdxl and ip-adapter-faceid-plusv2_sdxl"
    )


def proj_config_from_state_dict(
    image_proj: Mapping[str, torch.Tensor], variant: Variant, source: str
) -> FaceIDProjConfig:
    """The projection config whose shapes the file's ``image_proj`` tensors have (checked again on assignment)."""
    where = f"{source}: 'image_proj'"
    hidden, id_dim = tensor_shape(image_proj, "proj.0.weight", 2, where)
    out_dim, hidden2 = tensor_shape(image_proj, "proj.2.weight", 2, where)
    (context_dim,) = tensor_shape(image_proj, "norm.weight", 1, where)
    if hidden2 != hidden or out_dim % context_dim:
        raise WeightFormatError(
            f"{source}: inconsistent FaceID projection shapes: proj.0 {(hidden, id_dim)}, proj.2 {(out_dim, hidden2)}, "
            f"norm ({context_dim},); proj.2 must map {hidden} -> num_tokens x {context_dim}"
        )
    cfg = dict(id_dim=id_dim, id_hidden_dim=hidden, context_dim=context_dim, num_tokens=out_dim // context_dim)
    if variant == "faceid_plus":
        p = "perceiver_resampler."
        dim, clip_dim = tensor_shape(image_proj, p + "proj_in.weight", 2, where)
        q_out, _ = tensor_shape(image_proj, p + "layers.0.0.to_q.weight", 2, where)
        ff_inner, _ = tensor_shape(image_proj, p + "layers.0.1.1.weight", 2, where)
        depth = len({k.split(".")[2] for k in image_proj if k.startswith(p + "layers.")})
        head_dim = 64  # fixed in the reference (heads = dim // 64)
        if dim != context_dim or q_out != dim or dim % head_dim or ff_inner % dim:
            raise WeightFormatError(
                f"{source}: inconsistent FaceID-Plus perceiver shapes: proj_in out {dim}, to_q out {q_out}, "
                f"FF inner {ff_inner}, token width {context_dim} (all widths must be equal and a multiple of 64)"
            )
        cfg.update(plus=True, clip_dim=clip_dim, depth=depth, head_dim=head_dim, ff_mult=ff_inner // dim)
    return FaceIDProjConfig(**cfg)


def check_ip_adapter_layers(
    ip_adapter: Mapping[str, torch.Tensor], context_dim: int, source: str
) -> tuple[int, int | None]:
    """Check the ``ip_adapter`` keys: ``(number of attention layers, LoRA rank or None)``.

    Layers are ``0..n-1``; odd ones carry ``to_k_ip``/``to_v_ip`` [h, context_dim]; LoRA keys are on all or none.
    """
    layers: dict[int, set[str]] = {}
    for key in ip_adapter:
        m = _KEY_RE.match(key)
        if m is None or m.group(2) not in _IP_SUFFIXES + _LORA_SUFFIXES:
            raise WeightFormatError(
                f"{source}: unexpected 'ip_adapter' key '{key}'; expected '{{i}}.to_k_ip.weight', "
                "'{i}.to_v_ip.weight' or '{i}.to_{q,k,v,out}_lora.{down,up}.weight'"
            )
        layers.setdefault(int(m.group(1)), set()).add(m.group(2))
    n = max(layers) + 1 if layers else 0
    has_lora = any(s in _LORA_SUFFIXES for names in layers.values() for s in names)
    problems = []
    for i in range(n):
        want = set(_IP_SUFFIXES) if i % 2 else set()
        if has_lora:
            want |= set(_LORA_SUFFIXES)
        have = layers.get(i, set())
        if have != want:
            problems.append(f"layer {i}: missing {sorted(want - have)}, unexpected {sorted(have - want)}")
    if n == 0 or n % 2 or problems:
        detail = "; ".join(problems[:4]) + (f" ... ({len(problems)} layers)" if len(problems) > 4 else "")
        raise WeightFormatError(
            f"{source}: the 'ip_adapter' weights are not a complete set of {n} attention layers "
            f"(odd layers need to_k_ip/to_v_ip, and the LoRA is on all layers or none): {detail or 'no layers'}"
        )
    rank = None
    for i in range(n):
        for suffix in _IP_SUFFIXES if i % 2 else ():
            shape = tuple(ip_adapter[f"{i}.{suffix}"].shape)
            if len(shape) != 2 or shape[1] != context_dim:
                raise WeightFormatError(
                    f"{source}: 'ip_adapter.{i}.{suffix}' has shape {shape}, expected (hidden, {context_dim}) to match "
                    "the image projection's token width"
                )
        if has_lora:
            for slot in _LORA_SLOTS:
                down = tuple(ip_adapter[f"{i}.{slot}_lora.down.weight"].shape)
                up = tuple(ip_adapter[f"{i}.{slot}_lora.up.weight"].shape)
                r = down[0] if len(down) == 2 else -1
                if rank is None:
                    rank = r
                if len(down) != 2 or len(up) != 2 or r != rank or up[1] != rank:
                    raise WeightFormatError(
                        f"{source}: LoRA of layer {i} '{slot}' has down {down} / up {up}; expected (r, in) / (out, r) "
                        f"with the same rank r (= {rank}) on every layer"
                    )
    return n, rank


# ----------------------------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------------------------


class IPAdapterFaceID:
    """A loaded IP-Adapter FaceID or FaceID-Plus(-v2): projection model + per-layer weights, installable in a UNet."""

    def __init__(
        self,
        projection: MLPProjModel,
        ip_adapter: StateDict,
        *,
        num_layers: int,
        lora_rank: int | None,
        shortcut: bool = True,
        source: str = "<state dict>",
    ) -> None:
        self.projection = projection
        self.ip_adapter = ip_adapter
        self.num_layers = num_layers
        self.lora_rank = lora_rank
        self.shortcut = shortcut
        self.source = source

    @property
    def variant(self) -> Variant:
        return "faceid_plus" if isinstance(self.projection, ProjPlusModel) else "faceid"

    @property
    def config(self) -> FaceIDProjConfig:
        return self.projection.config

    @property
    def has_lora(self) -> bool:
        return self.lora_rank is not None

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(
        cls,
        image_proj: Mapping[str, torch.Tensor],
        ip_adapter: Mapping[str, torch.Tensor],
        *,
        source: str = "<state dict>",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        shortcut: bool = True,
    ) -> IPAdapterFaceID:
        """Build from the two original-format dicts (checked; tensors cast to ``dtype``/``device``)."""
        variant = detect_variant(image_proj, source)
        config = proj_config_from_state_dict(image_proj, variant, source)
        with torch.device("meta"):
            projection = build_projection(config)
        assign_state_dict(projection, image_proj, source=f"{source} [image_proj]", dtype=dtype, device=device)
        projection.requires_grad_(False).eval()
        num_layers, rank = check_ip_adapter_layers(ip_adapter, config.context_dim, source)
        weights = {k: v.to(device=device, dtype=dtype) for k, v in ip_adapter.items()}
        logger.info(
            "%s: %s adapter, %d attention layers, LoRA rank %s, %d tokens of width %d",
            source, variant, num_layers, rank, config.num_tokens, config.context_dim,
        )  # fmt: skip
        return cls(projection, weights, num_layers=num_layers, lora_rank=rank, shortcut=shortcut, source=source)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        shortcut: bool | None = None,
    ) -> IPAdapterFaceID:
        """Load ``ip-adapter-faceid_sdxl.bin`` / ``ip-adapter-faceid-plusv2_sdxl.bin`` or a ``.safetensors`` conversion.

        ``.bin`` files are read with ``torch.load(weights_only=True)`` only. ``shortcut`` (Plus only) selects v2
        (``x_id + s_scale·resampler``); the file does not record it, so None means True unless the file name says
        "plus" without "v2" (as ComfyUI decides).
        """
        path = Path(path)
        source = str(path)
        obj = read_weights(path)
        image_proj, ip_adapter = split_ip_adapter_state_dict(obj, source)
        if shortcut is None:
            name = path.name.lower()
            shortcut = not ("plus" in name and "v2" not in name)
        return cls.from_state_dict(image_proj, ip_adapter, source=source, dtype=dtype, device=device, shortcut=shortcut)

    # -- identity tokens ---------------------------------------------------------------------------------------

    def encode(
        self, embedding: torch.Tensor, clip_features: torch.Tensor | None = None, *, s_scale: float = 1.0
    ) -> torch.Tensor:
        """Identity tokens [B, T, C] from face embeddings [B, 512] (or [512]) and, for Plus, CLIP features.

        ``clip_features`` [B, 257, 1280] are the penultimate CLIP ViT-H/14 hidden states of the aligned face
        crops; ``s_scale`` weighs the perceiver's refinement in the v2 shortcut.
        """
        p = next(self.projection.parameters())
        if embedding.ndim == 1:
            embedding = embedding[None]
        if embedding.ndim != 2 or embedding.shape[1] != self.config.id_dim:
            raise ValueError(
                f"face embedding must have shape [B, {self.config.id_dim}] (or [{self.config.id_dim}]), "
                f"got {tuple(embedding.shape)}"
            )
        embedding = embedding.to(device=p.device, dtype=p.dtype)
        if not isinstance(self.projection, ProjPlusModel):
            if clip_features is not None:
                raise ValueError("FaceID (not Plus) takes no CLIP features; pass clip_features=None")
            return self.projection(embedding)
        if clip_features is None:
            raise ValueError(
                "FaceID-Plus needs the CLIP ViT-H/14 penultimate hidden states of the aligned face crop "
                f"(clip_features [B, 257, {self.config.clip_dim}])"
            )
        if clip_features.ndim == 2:
            clip_features = clip_features[None]
        if clip_features.ndim != 3 or clip_features.shape[-1] != self.config.clip_dim:
            raise ValueError(
                f"clip_features must have shape [B, N, {self.config.clip_dim}], got {tuple(clip_features.shape)}"
            )
        if clip_features.shape[0] != embedding.shape[0]:
            raise ValueError(
                f"batch mismatch: {embedding.shape[0]} face embedding(s) but {clip_features.shape[0]} "
                "CLIP feature set(s)"
            )
        clip_features = clip_features.to(device=p.device, dtype=p.dtype)
        return self.projection(embedding, clip_features, shortcut=self.shortcut, s_scale=s_scale)

    def null_tokens(
        self, clip_features: torch.Tensor | None = None, *, batch_size: int = 1, s_scale: float = 1.0
    ) -> torch.Tensor:
        """The "null identity" tokens [B, T, C]: the projection of a zero embedding (the reference's uncond tokens).

        For Plus, ``clip_features`` must be the CLIP features of a zero image (all-zero normalised pixel values), which
        the caller computes with the vision encoder; the batch size then follows them.
        """
        p = next(self.projection.parameters())
        if clip_features is not None:
            if clip_features.ndim == 2:
                clip_features = clip_features[None]
            batch_size = clip_features.shape[0]
        zeros = torch.zeros(batch_size, self.config.id_dim, device=p.device, dtype=p.dtype)
        return self.encode(zeros, clip_features, s_scale=s_scale)

    # -- installation ------------------------------------------------------------------------------------------

    def install(self, unet: nn.Module, *, lora_scale: float = 1.0, lora: bool = True) -> IPAdapterHandle:
        """Add the identity branch to every cross-attention layer of ``unet`` and (if ``lora``) the LoRA to all layers.

        Returns a handle whose ``remove()`` (or context exit) restores the original modules exactly. Weights are
        cast to the UNet's dtype/device. Everything is checked before the UNet is touched.
        """
        layers = attention_layers_for(unet, self.num_layers, self.source)
        use_lora = lora and self.has_lora
        if lora and not self.has_lora:
            logger.info("%s: the file has no LoRA; installing the identity branch only", self.source)
        plan = [self._plan_layer(i, name, attn, use_lora) for i, name, attn in layers]
        return IPAdapterHandle(self, plan, lora_scale=lora_scale)

    def _plan_layer(self, i: int, name: str, attn: nn.Module, use_lora: bool) -> tuple:
        """Check layer ``i`` against the file and build (not yet install) its new modules."""
        w = self.ip_adapter
        is_cross = i % 2 == 1
        ref = attn.to_q.weight if isinstance(attn.to_q, nn.Linear) else next(attn.to_q.parameters())
        dtype, device = ref.dtype, ref.device
        ip = None
        if is_cross:
            inner, ctx = attn.to_k.out_features, attn.to_k.in_features
            for s in _IP_SUFFIXES:
                shape = tuple(w[f"{i}.{s}"].shape)
                if shape != (inner, ctx):
                    raise WeightFormatError(
                        f"{self.source}: 'ip_adapter.{i}.{s}' has shape {shape} but UNet layer '{name}' needs "
                        f"({inner}, {ctx}); the adapter is for a different base model or the layer order differs"
                    )
            with torch.device("meta"):
                ip = IdentityAttention(inner, ctx, attn.heads, attn.head_dim)
            sd = {"to_k_ip.weight": w[f"{i}.to_k_ip.weight"], "to_v_ip.weight": w[f"{i}.to_v_ip.weight"]}
            assign_state_dict(ip, sd, source=f"{self.source} [ip_adapter.{i}]", dtype=dtype, device=device)
            ip.requires_grad_(False)
        loras = {}
        if use_lora:
            for slot in _LORA_SLOTS:
                base = attn.to_out[0] if slot == "to_out" else getattr(attn, slot)
                if not isinstance(base, nn.Linear):
                    raise ValueError(
                        f"'{name}.{slot}' is a {type(base).__name__}, not a plain Linear (another LoRA installed?); "
                        "remove it before installing this adapter"
                    )
                down, up = w[f"{i}.{slot}_lora.down.weight"], w[f"{i}.{slot}_lora.up.weight"]
                if down.shape[1] != base.in_features or up.shape[0] != base.out_features:
                    raise WeightFormatError(
                        f"{self.source}: LoRA '{i}.{slot}_lora' maps {down.shape[1]} -> {up.shape[0]} but UNet layer "
                        f"'{name}.{slot}' maps {base.in_features} -> {base.out_features}; the adapter is for a "
                        "different base model or the layer order differs"
                    )
                lora_module = LoRALinear.from_weights(base, down, up).requires_grad_(False)
                loras["to_out.0" if slot == "to_out" else slot] = lora_module
        return attn, ip, loras


class IPAdapterHandle(InstallHandle):
    """An installed adapter: ``set_lora_scale``, ``fuse_lora``/``unfuse_lora``, and ``remove()`` (exact restore)."""

    def __init__(self, adapter: IPAdapterFaceID, plan: list[tuple], *, lora_scale: float = 1.0) -> None:
        super().__init__(adapter, plan)
        self.set_lora_scale(lora_scale)

    @property
    def lora_modules(self) -> list[LoRALinear]:
        return self.swapped

    def set_lora_scale(self, scale: float) -> None:
        """Set the strength of the adapter's LoRA on all layers (in place, no reload)."""
        if self.installed and not self.lora_modules and scale != 1.0:
            logger.warning("%s: set_lora_scale has no effect: no LoRA installed", self.adapter.source)
        for m in self.lora_modules:
            m.set_scale(scale)

    def fuse_lora(self) -> None:
        """Precompute ``W + scale·U·D`` into each wrapped weight for speed (the originals kept on the CPU)."""
        for m in self.lora_modules:
            m.fuse()

    def unfuse_lora(self) -> None:
        """Back to the exact unfused LoRA computation (the original weights copied back)."""
        for m in self.lora_modules:
            m.unfuse()
