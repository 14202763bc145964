"""``fastface selfcheck``: the whole pipeline on tiny random weights written on the fly, offline, in seconds.

:func:`write_tiny_weights` writes every part in the real file layouts (a diffusers SDXL folder with ``unet/``,
``text_encoder{,_2}/``, ``tokenizer{,_2}/``, ``vae/``; a kohya LoRA for the hyper recipe; a bare UNet file for
the lightning recipe; an IP-Adapter FaceID-Plus-v2 file in the original flattened layout; a CLIP image encoder
folder; PuLID v1 (flat torch pickle) and v1.1 (fp16 safetensors) files and an EVA-CLIP checkpoint with ``visual.*``
keys). :func:`run_selfcheck` loads them through :meth:`fastface.Pipeline.from_pretrained` and runs every method
once with FaceID-Plus-v2, and baseline / FastFace with PuLID v1 and v1.1 (the PuLID identity comes from the tiny
EVA tower through a PuLID face file; BiSeNet and antelopev2 are not exercised: their weights cannot be made here
without extra packages). Its images come from random weights: they prove that the installation works, nothing
about quality.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from fastface.adapters.faceid import FaceIDProjConfig, build_projection
from fastface.adapters.pulid import PULID_ENCODER_CONFIGS, build_encoder
from fastface.models.clip_vision import CLIPVisionEncoder, get_clip_vision_config
from fastface.models.eva_clip import EVAVisionTower, eva_preprocess
from fastface.models.text import CLIPTextConfig, CLIPTextEncoder
from fastface.models.tokenizer import EOS_TOKEN, write_vocab_folder
from fastface.models.unet import UNet, get_unet_config
from fastface.models.vae import AutoencoderKL, VAEConfig

logger = logging.getLogger(__name__)

__all__ = ["TinyWeights", "write_tiny_weights", "run_selfcheck", "NOT_MEANINGFUL"]

NOT_MEANINGFUL = "These images come from tiny RANDOM weights: they are NOT meaningful, they only show the code runs."
# Tiny parts that fit the "tiny" UNet: 32 + 32 wide text states = its 64-wide context, 32-d pooled text;
# a 4-level VAE (8x down, as SDXL's) so 64 px images have 8x8 latents.
TEXT_1 = CLIPTextConfig(width=32, layers=2, heads=2, mlp=64, act="quick_gelu")
TEXT_2 = CLIPTextConfig(width=32, layers=2, heads=2, mlp=64, act="gelu", projection_dim=32)
VAE = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_groups=8)
LORA_TARGETS = (
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.1.transformer_blocks.3.ff.net.2",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.0.attentions.0.proj_out",
)


@dataclass(frozen=True)
class TinyWeights:
    """Paths of the tiny weights: ``base`` folder, hyper ``lora``, lightning ``unet_file``, ``adapter`` (.bin and
    .safetensors), ``image_encoder`` folder, PuLID ``pulid_v1`` (.bin) and ``pulid_v11`` (.safetensors), ``eva``."""

    base: Path
    lora: Path
    unet_file: Path
    adapter: Path
    adapter_bin: Path
    image_encoder: Path
    pulid_v1: Path
    pulid_v11: Path
    eva: Path


def _perturb(module: nn.Module, gen: torch.Generator, std: float = 0.05) -> nn.Module:
    """Add small noise to every parameter (zero-initialised layers become live)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


def _save(module_or_sd, path: Path) -> None:
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, nn.Module) else module_or_sd
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def _text_config_json(cfg: CLIPTextConfig) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model", "hidden_size": cfg.width, "intermediate_size": cfg.mlp,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "hidden_act": cfg.act,
        "max_position_embeddings": cfg.max_positions, "vocab_size": cfg.vocab_size, "layer_norm_eps": cfg.eps,
        "projection_dim": cfg.projection_dim or cfg.width, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }


def _vae_config_json(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups, "act_fn": "silu",
        "scaling_factor": cfg.scaling_factor, "force_upcast": cfg.force_upcast, "sample_size": 64,
    }


def _ip_adapter(unet: UNet, context_dim: int, gen: torch.Generator, rank: int = 4) -> dict[str, torch.Tensor]:
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


def _pulid(unet: UNet, version: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random PuLID weights in the released flat layout (``id_adapter.*``, ``id_adapter_attn_layers.{odd i}.*``)."""
    with torch.device("meta"):
        encoder = build_encoder(PULID_ENCODER_CONFIGS[f"{version}-tiny"])
    sd = {}
    for name, p in encoder.state_dict().items():
        if p.ndim >= 2:  # weights, IDFormer's latents and proj_out
            sd[name] = torch.randn(p.shape, generator=gen) * min(p.shape[-1], p.shape[-2]) ** -0.5
        else:  # LayerNorm weights around 1, biases around 0
            sd[name] = (1.0 if name.endswith("weight") else 0.0) + torch.randn(p.shape, generator=gen) * 0.1
    out = {f"id_adapter.{k}": v for k, v in sd.items()}
    for i, (_, attn) in enumerate(unet.attention_layers()):
        if i % 2:
            inner, ctx = attn.to_k.out_features, attn.to_k.in_features
            for kv in ("k", "v"):
                w = torch.randn(inner, ctx, generator=gen) * ctx**-0.5
                out[f"id_adapter_attn_layers.{i}.id_to_{kv}.weight"] = w
    return out


def _kohya_lora(unet: UNet, gen: torch.Generator, rank: int = 2) -> dict[str, torch.Tensor]:
    sd = {}
    for name in LORA_TARGETS:
        w = unet.get_submodule(name).weight
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=gen) * 0.1
        sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *([1] * (w.ndim - 2)), generator=gen) * 0.1
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def write_tiny_weights(root: str | os.PathLike, seed: int = 0) -> TinyWeights:
    """Write tiny random weights of every pipeline part under ``root`` in the real layouts (see the module doc)."""
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    base = root / "sdxl-tiny"
    ucfg = get_unet_config("tiny")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = _perturb(UNet(ucfg), gen)
        _json(base / "unet" / "config.json", ucfg.to_diffusers_config())
        _save(unet, base / "unet" / "diffusion_pytorch_model.safetensors")
        for name, cfg in (("text_encoder", TEXT_1), ("text_encoder_2", TEXT_2)):
            _json(base / name / "config.json", _text_config_json(cfg))
            _save(CLIPTextEncoder(cfg), base / name / "model.safetensors")
        write_vocab_folder(base / "tokenizer", pad_token=EOS_TOKEN)
        write_vocab_folder(base / "tokenizer_2", pad_token="!")
        _json(base / "vae" / "config.json", _vae_config_json(VAE))
        _save(_perturb(AutoencoderKL(VAE), gen), base / "vae" / "diffusion_pytorch_model.safetensors")
        index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}
        _json(base / "model_index.json", index)
        lora = root / "Hyper-SDXL-4steps-lora.safetensors"
        _save(_kohya_lora(unet, gen), lora)
        unet_file = root / "sdxl_lightning_4step_unet.safetensors"
        _save(_perturb(unet, gen, 0.02), unet_file)

        vcfg = get_clip_vision_config("tiny")
        encoder_dir = root / "image_encoder"
        _json(encoder_dir / "config.json", {
            "architectures": ["CLIPVisionModelWithProjection"], "hidden_size": vcfg.hidden_size,
            "intermediate_size": vcfg.intermediate_size, "num_hidden_layers": vcfg.num_layers,
            "num_attention_heads": vcfg.num_heads, "patch_size": vcfg.patch_size, "image_size": vcfg.image_size,
            "hidden_act": vcfg.hidden_act, "projection_dim": vcfg.projection_dim, "layer_norm_eps": vcfg.layer_norm_eps,
        })
        encoder = CLIPVisionEncoder(vcfg)
        with torch.no_grad():  # the only parameter the module leaves uninitialised (it is always loaded)
            encoder.vision_model.embeddings.class_embedding.normal_(0.0, 1.0, generator=gen)
        _save(encoder, encoder_dir / "model.safetensors")

        # The released shapes except the token width (diffusers' converter assumes depth 4, FF x4, hidden 1024).
        pcfg = FaceIDProjConfig(context_dim=ucfg.context_dim, plus=True, clip_dim=vcfg.hidden_size)
        image_proj = _perturb(build_projection(pcfg), gen).state_dict()
        ip = _ip_adapter(unet, ucfg.context_dim, gen)
    adapter = root / "ip-adapter-faceid-plusv2_sdxl.safetensors"
    _save({**{f"image_proj.{k}": v for k, v in image_proj.items()}, **{f"ip_adapter.{k}": v for k, v in ip.items()}},
          adapter)
    adapter_bin = root / "ip-adapter-faceid-plusv2_sdxl.bin"
    torch.save({"image_proj": dict(image_proj), "ip_adapter": ip}, adapter_bin)
    # PuLID as released: v1 a flat fp32 torch pickle, v1.1 fp16 safetensors; EVA-CLIP a full-CLIP .pt with visual.*
    pulid_v1, pulid_v11 = root / "pulid_v1.bin", root / "pulid_v1.1.safetensors"
    torch.save(_pulid(unet, "v1", gen), pulid_v1)
    _save({k: v.half() for k, v in _pulid(unet, "v1.1", gen).items()}, pulid_v11)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        eva = _perturb(EVAVisionTower("tiny"), gen)
    eva_file = root / "EVA02_CLIP_L_336_psz14_s6B.pt"
    torch.save({**{f"visual.{k}": v for k, v in eva.state_dict().items()}, "logit_scale": torch.tensor(4.6)}, eva_file)
    return TinyWeights(base, lora, unet_file, adapter, adapter_bin, encoder_dir, pulid_v1, pulid_v11, eva_file)


def tiny_face(seed: int = 0, crop_size: int = 56):
    """A random identity (unit embedding + a random aligned crop) for the tiny pipeline."""
    from fastface.adapters.faces import FaceInfo

    rng = np.random.default_rng(seed)
    crop = rng.integers(0, 256, (crop_size, crop_size, 3), dtype=np.uint8)
    return FaceInfo.from_embedding(rng.standard_normal(512).astype(np.float32), crop=crop, source="selfcheck")


@torch.no_grad()
def tiny_pulid_identity(eva_file: str | os.PathLike, seed: int = 0):
    """A random PuLID identity for the tiny pipeline: the tiny EVA tower's outputs for a random grey "face" image and
    a random raw 512-d embedding (:class:`fastface.pipeline_pulid.PuLIDIdentity`)."""
    from fastface.pipeline_pulid import PuLIDIdentity, load_eva

    eva = load_eva(eva_file)
    gen = torch.Generator().manual_seed(seed)
    grey = torch.rand(1, 1, 64, 64, generator=gen).repeat(1, 3, 1, 1)  # stands in for the parsed, greyed face
    out = eva(eva_preprocess(grey, eva.config.image_size))
    raw = torch.randn(1, 512, generator=gen) * 20  # antelopev2 embeddings are not normalised (norm ~20)
    return PuLIDIdentity(torch.cat([raw, out.normed_embeds], dim=-1), out.hidden_states, "selfcheck")


def run_selfcheck(out_dir: str | os.PathLike | None = None, *, device: str | None = "cpu", log=logger.info) -> bool:
    """Build the pipeline from tiny random weights and run every method once; ``log`` gets one line per check.

    Returns True when every method produced finite images of the right size. Saves them in ``out_dir`` if given.
    """
    from fastface.pipeline import Pipeline
    from fastface.presets import METHOD_PRESETS

    from fastface.pipeline_pulid import save_pulid_face_file

    ok = True
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastface-selfcheck-") as tmp:
        w = write_tiny_weights(tmp)
        log(f"wrote tiny random weights in the real layouts ({time.perf_counter() - start:.1f} s)")
        face = tiny_face()
        pulid_face = save_pulid_face_file(Path(tmp) / "pulid-face.safetensors", tiny_pulid_identity(w.eva))
        plus = dict(adapter_file=w.adapter, image_encoder=w.image_encoder)
        runs = [
            ("hyper", "faceid-plusv2", dict(weights=w.lora, **plus), list(METHOD_PRESETS), face),
            ("lightning", "faceid-plusv2", dict(weights=w.unet_file, **plus), ["baseline", "fastface-am1"], face),
            ("hyper", "pulid", dict(weights=w.lora, adapter_file=w.pulid_v1), ["baseline", "fastface-am1"], pulid_face),
            ("hyper", "pulid-v1.1", dict(weights=w.lora, adapter_file=w.pulid_v11), ["fastface-am1"], pulid_face),
        ]
        for preset, adapter, extra, methods, person in runs:
            pipe = Pipeline.from_pretrained(preset, adapter, base=w.base, dtype="fp32", device=device, **extra)
            for method in methods:
                t0 = time.perf_counter()
                out = pipe("a photo of a person", face=person, method=method, seed=0, height=64, width=64)
                good = bool(torch.isfinite(out.pixels).all()) and out.images[0].size == (64, 64)
                ok &= good
                log(f"{'ok  ' if good else 'FAIL'} {preset:9s} {adapter:13s} {method:13s} {out.unet_evaluations:4.0f} "
                    f"UNet evaluations/image, {time.perf_counter() - t0:.2f} s")
                if out_dir is not None:
                    name = f"selfcheck-{preset}-{adapter}-{method}.png"
                    out.save(0, Path(out_dir) / name, {"selfcheck": NOT_MEANINGFUL})
    log(f"selfcheck {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s. {NOT_MEANINGFUL}")
    return ok
