"""IP-Adapter FaceID and FaceID-Plus-v2 as identity adapters of the pipeline (``faceid``, ``faceid-plusv2``).

The ArcFace embedding of insightface's ``buffalo_l`` (and for Plus-v2 the CLIP ViT-H/14 features of the aligned
face crop) -> 4 identity tokens; DCG's null identity is the projection of a zero embedding (and of the CLIP
features of a zero image). Options: ``lora_scale`` (the adapter's own LoRA) and ``s_scale`` (Plus-v2 shortcut).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fastface.adapters.base import (
    AdapterOption,
    AdapterPreset,
    FacePreparer,
    FaceSettings,
    IdentityAdapter,
    InstallHandle,
)
from fastface.adapters.faces import FaceAnalyzer, FaceInfo
from fastface.adapters.ip_adapter import IPAdapterFaceID
from fastface.adapters.registry import register
from fastface.face_files import open_face_analyzer, prepare_identity, save_face_file
from fastface.hub import HubFile, HubFolder, check_ref
from fastface.needs import faces_hint
from fastface.models.clip_vision import CLIPVisionEncoder, clip_preprocess
from fastface.models.loading import WeightFormatError
from fastface.offload import module_device
from fastface.steps import check_bool, check_number

__all__ = ["FaceIDPreset", "FaceIDAdapter", "FaceIDPreparer", "FACEID_REPO", "CLIP_H_REPO", "IP_ADAPTER_REPO"]

FACEID_REPO = "h94/IP-Adapter-FaceID"
CLIP_H_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
IP_ADAPTER_REPO = "h94/IP-Adapter"
_IMAGE_ENCODER_FILES = ("config.json", "model.safetensors")


@dataclass(frozen=True)
class FaceIDPreset(AdapterPreset):
    """An IP-Adapter FaceID preset. ``variant``: "faceid" or "faceid_plus". ``image_encoder``: equivalent CLIP
    ViT-H/14 folders, first preferred (Plus only). ``lora_scale``: weight of the adapter's own LoRA (the paper's
    "lora_scale"); ``s_scale``: the Plus-v2 shortcut weight; ``shortcut``: Plus-v2 (``x_id + s·resampler``)."""

    variant: Literal["faceid", "faceid_plus"] = "faceid"
    image_encoder: tuple[HubFolder | str | os.PathLike, ...] = ()
    shortcut: bool = False
    lora_scale: float = 1.0
    s_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in ("faceid", "faceid_plus"):
            raise ValueError(f"FaceIDPreset.variant must be 'faceid' or 'faceid_plus', got {self.variant!r}")
        check_ref("FaceIDPreset.weights", self.weights, optional=False)
        enc = self.image_encoder
        enc = (enc,) if isinstance(enc, (str, os.PathLike, HubFolder)) else tuple(enc)
        object.__setattr__(self, "image_encoder", enc)
        for e in self.image_encoder:
            check_ref("FaceIDPreset.image_encoder", e, optional=False)
        if self.variant == "faceid_plus" and not self.image_encoder:
            raise ValueError("a FaceID-Plus adapter needs an image_encoder (a CLIP ViT-H/14 folder)")
        check_bool("FaceIDPreset.shortcut", self.shortcut)
        for n in ("lora_scale", "s_scale"):
            check_number(f"FaceIDPreset.{n}", getattr(self, n), 0.0)


class FaceIDPreparer(FacePreparer):
    """Photos (insightface analysis), face files and embeddings -> one :class:`FaceInfo`; Plus-v2 needs crops."""

    def __init__(self, preset: FaceIDPreset, faces: FaceSettings) -> None:
        self.preset, self.faces = preset, faces
        self.sources: dict[str, str] = {}
        self._analyzer: FaceAnalyzer | None = None

    @property
    def analyzer(self) -> FaceAnalyzer:
        """The insightface analyzer of the preset's pack (loaded on first use, from ``face_root``)."""
        if self._analyzer is None:
            self._analyzer = open_face_analyzer(self.faces.face_root, self.preset.face_pack,
                                                download=self.faces.download,
                                                hint=faces_hint(self.preset.name, self.faces.face_root))
        return self._analyzer

    def prepare(self, face: Any) -> FaceInfo:
        person = prepare_identity(face, lambda: self.analyzer)
        if self.preset.variant == "faceid_plus" and not person.crops:
            raise ValueError(
                f"{person.source}: FaceID-Plus-v2 needs the aligned face crop as well as the embedding: pass a photo, "
                "or a face file with a 'crop' (fastface.save_face_file, 'fastface embed'), or use adapter='faceid'"
            )
        return person

    def save(self, path: str | os.PathLike, identity: FaceInfo) -> Path:
        return save_face_file(path, identity)


class FaceIDAdapter(IdentityAdapter):
    """IP-Adapter FaceID / FaceID-Plus-v2: ``model`` (:class:`IPAdapterFaceID`) and, for Plus, ``image_encoder``."""

    family = "IP-Adapter"
    preset_type = FaceIDPreset
    options = (
        AdapterOption("lora_scale", "weight of the adapter's LoRA (default 1.0)", float, "lora_scale"),
        AdapterOption("s_scale", "FaceID-Plus-v2 shortcut weight (default 1.0)", float, "s_scale"),
        AdapterOption("image_encoder", "local CLIP ViT-H/14 image encoder folder (FaceID-Plus-v2)", Path, load=True),
    )

    def __init__(self, preset, preparer, sources, model: IPAdapterFaceID, image_encoder: CLIPVisionEncoder | None,
                 *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(preset, preparer, sources)
        self.model, self.image_encoder = model, image_encoder
        self.device, self.dtype = device, dtype
        self._null: dict[float, torch.Tensor] = {}
        self._lora_scale = preset.lora_scale

    @classmethod
    def files(cls, preset: FaceIDPreset, adapter_file, given: Mapping[str, Any]) -> dict[str, Any]:
        out = super().files(preset, adapter_file, given)
        if preset.variant == "faceid_plus":
            enc = given.get("image_encoder")
            out["image_encoder"] = (enc,) if enc is not None else preset.image_encoder
        return out

    @classmethod
    def face_preparer(cls, preset: FaceIDPreset, faces: FaceSettings) -> FaceIDPreparer:
        return FaceIDPreparer(preset, faces)

    @classmethod
    def load(cls, preset: FaceIDPreset, files, *, dtype, device, faces: FaceSettings) -> FaceIDAdapter:
        shortcut = preset.shortcut if preset.variant == "faceid_plus" else None
        model = IPAdapterFaceID.from_file(files["adapter"], dtype=dtype, device=device, shortcut=shortcut)
        if model.variant != preset.variant:
            raise WeightFormatError(
                f"{files['adapter']}: this is a {model.variant} adapter file, but the adapter preset {preset.name!r} "
                f"is {preset.variant}; pick the matching adapter (--adapter) or file"
            )
        encoder = None
        if preset.variant == "faceid_plus":
            encoder = CLIPVisionEncoder.from_pretrained(files["image_encoder"], dtype=dtype, device=device)
            if encoder.config.hidden_size != model.config.clip_dim:
                raise WeightFormatError(
                    f"{files['image_encoder']}: the image encoder's width {encoder.config.hidden_size} is not the "
                    f"adapter's CLIP width {model.config.clip_dim}; FaceID-Plus-v2 needs CLIP ViT-H/14"
                )
        return cls(preset, cls.face_preparer(preset, faces), {}, model, encoder, device=device, dtype=dtype)

    @classmethod
    def write_tiny(cls, root: Path, unet: nn.Module, gen: torch.Generator, seed: int) -> list:
        return write_tiny_faceid(root, unet, gen, seed)

    def install(self, unet: nn.Module, *, fuse: bool = True) -> InstallHandle:
        handle = self.model.install(unet, lora_scale=self._lora_scale)
        if fuse:
            handle.fuse_lora()
        return handle

    @property
    def face_analyzer(self) -> FaceAnalyzer:
        """The insightface analyzer of the preset's pack (loaded on first use)."""
        return self.preparer.analyzer

    def offload_modules(self) -> list[nn.Module]:
        return [m for m in (self.model.projection, self.image_encoder) if m is not None]

    def configure(self, handle, options: Mapping[str, Any]):
        if options["lora_scale"] != self._lora_scale:
            handle.set_lora_scale(options["lora_scale"])
            self._lora_scale = options["lora_scale"]
        return lambda: None

    # -- tokens -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _clip_features(self, face: FaceInfo) -> torch.Tensor | None:
        if self.image_encoder is None:
            return None
        size = self.image_encoder.config.image_size
        pixels = clip_preprocess(list(face.crops), size=size, crop_size=size)
        feats = self.image_encoder(pixels.to(module_device(self.image_encoder), self.dtype))  # [N, T, D]
        return feats.mean(dim=0, keepdim=True)  # several photos: mean of their CLIP features

    @torch.no_grad()
    def id_tokens(self, face: FaceInfo, s_scale: float = 1.0) -> torch.Tensor:
        """The identity tokens [1, K, C] of one person (in the adapter's dtype)."""
        emb = torch.from_numpy(np.array(face.embedding, dtype=np.float32))[None].to(self.device)
        return self.model.encode(emb, self._clip_features(face), s_scale=s_scale)

    @torch.no_grad()
    def null_tokens(self, s_scale: float = 1.0) -> torch.Tensor:
        """DCG's null identity [1, K, C]: a zero embedding (and, for Plus-v2, the CLIP features of a zero image)."""
        if s_scale not in self._null:
            clip = None if self.image_encoder is None else self.image_encoder.null_features(1)
            self._null[s_scale] = self.model.null_tokens(clip, s_scale=s_scale)
        return self._null[s_scale]

    def tokens(self, identity: FaceInfo, options: Mapping[str, Any], dtype: torch.dtype):
        s = options["s_scale"]
        return self.id_tokens(identity, s).to(dtype), self.null_tokens(s).to(dtype)

    # -- metadata -----------------------------------------------------------------------------------------------

    def describe(self, identity: FaceInfo) -> dict[str, Any]:
        emb = np.array(identity.embedding, dtype=np.float32)
        return {"source": identity.source, "embedding_sha256": hashlib.sha256(emb.tobytes()).hexdigest(),
                "crops": len(identity.crops)}

    def metadata(self, identity, options, tokens, handle) -> dict[str, Any]:
        return {"lora_scale": options["lora_scale"], "s_scale": options["s_scale"]}


register(FaceIDPreset(
    name="faceid",
    description="IP-Adapter FaceID SDXL (insightface embedding -> 4 id tokens, with its LoRA)",
    weights=HubFile(FACEID_REPO, "ip-adapter-faceid_sdxl.bin"),
    variant="faceid",
), FaceIDAdapter)
register(FaceIDPreset(
    name="faceid-plusv2",
    description="IP-Adapter FaceID-Plus-v2 SDXL (embedding + CLIP-H face crop, shortcut), as FastFace",
    weights=HubFile(FACEID_REPO, "ip-adapter-faceid-plusv2_sdxl.bin"),
    variant="faceid_plus",
    # The official FastFace code uses the laion repo; h94/IP-Adapter ships the same encoder, smaller.
    image_encoder=(
        HubFolder(CLIP_H_REPO, required=_IMAGE_ENCODER_FILES, allow_patterns=_IMAGE_ENCODER_FILES),
        HubFolder(
            IP_ADAPTER_REPO, "models/image_encoder", required=_IMAGE_ENCODER_FILES,
            allow_patterns=tuple(f"models/image_encoder/{f}" for f in _IMAGE_ENCODER_FILES),
        ),
    ),
    shortcut=True,
    invert_first_token=True,
), FaceIDAdapter)


def _ip_adapter_weights(unet: nn.Module, context_dim: int, gen: torch.Generator, rank: int = 4) -> dict:
    """Random ``ip_adapter`` weights in the original key layout (layer index = position in attention_layers())."""
    sd = {}
    for i, (_, attn) in enumerate(unet.attention_layers()):
        h, c_in = attn.to_q.out_features, attn.to_k.in_features
        if i % 2:
            sd[f"{i}.to_k_ip.weight"] = torch.randn(h, context_dim, generator=gen) * context_dim**-0.5
            sd[f"{i}.to_v_ip.weight"] = torch.randn(h, context_dim, generator=gen) * context_dim**-0.5
        for slot, fan_in in (("to_q", h), ("to_k", c_in), ("to_v", c_in), ("to_out", h)):
            sd[f"{i}.{slot}_lora.down.weight"] = torch.randn(rank, fan_in, generator=gen) * fan_in**-0.5
            sd[f"{i}.{slot}_lora.up.weight"] = torch.randn(h, rank, generator=gen) * 0.1
    return sd


def write_tiny_faceid(root: Path, unet: nn.Module, gen: torch.Generator, seed: int) -> list:
    """A tiny FaceID-Plus-v2 file (flattened ``.safetensors`` and the original ``.bin``) and a CLIP image encoder
    folder, for the tiny UNet; the face is a random embedding + crop (``fastface.selfcheck.tiny_face``)."""
    from fastface.adapters.faceid import FaceIDProjConfig, build_projection
    from fastface.models.clip_vision import get_clip_vision_config
    from fastface.selfcheck import tiny_face
    from fastface.tiny import TinyAdapter, perturb, save_safetensors, write_json

    context_dim = unet.config.context_dim
    vcfg = get_clip_vision_config("tiny")
    encoder_dir = root / "image_encoder"
    write_json(encoder_dir / "config.json", {
        "architectures": ["CLIPVisionModelWithProjection"], "hidden_size": vcfg.hidden_size,
        "intermediate_size": vcfg.intermediate_size, "num_hidden_layers": vcfg.num_layers,
        "num_attention_heads": vcfg.num_heads, "patch_size": vcfg.patch_size, "image_size": vcfg.image_size,
        "hidden_act": vcfg.hidden_act, "projection_dim": vcfg.projection_dim, "layer_norm_eps": vcfg.layer_norm_eps,
    })
    encoder = CLIPVisionEncoder(vcfg)
    with torch.no_grad():  # the only parameter the module leaves uninitialised (it is always loaded)
        encoder.vision_model.embeddings.class_embedding.normal_(0.0, 1.0, generator=gen)
    save_safetensors(encoder, encoder_dir / "model.safetensors")
    # The released shapes except the token width (diffusers' converter assumes depth 4, FF x4, hidden 1024).
    pcfg = FaceIDProjConfig(context_dim=context_dim, plus=True, clip_dim=vcfg.hidden_size)
    image_proj = perturb(build_projection(pcfg), gen).state_dict()
    ip = _ip_adapter_weights(unet, context_dim, gen)
    adapter = root / "ip-adapter-faceid-plusv2_sdxl.safetensors"
    save_safetensors({**{f"image_proj.{k}": v for k, v in image_proj.items()},
                      **{f"ip_adapter.{k}": v for k, v in ip.items()}}, adapter)
    adapter_bin = root / "ip-adapter-faceid-plusv2_sdxl.bin"
    torch.save({"image_proj": dict(image_proj), "ip_adapter": ip}, adapter_bin)
    files = {"adapter": adapter, "adapter_bin": adapter_bin, "image_encoder": encoder_dir}
    methods = ("baseline", "dcg", "am1", "am2", "fastface-am1", "fastface-am2")
    return [TinyAdapter("faceid-plusv2", {"adapter_file": adapter, "image_encoder": encoder_dir}, tiny_face(),
                        methods, files, tiny_face)]

