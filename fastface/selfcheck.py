"""``fastface selfcheck``: the whole pipeline on tiny random weights written on the fly, offline, in seconds.

:func:`write_tiny_weights` writes the model parts in the real file layouts (a diffusers SDXL folder with ``unet/``,
``text_encoder{,_2}/``, ``tokenizer{,_2}/``, ``vae/``; a kohya LoRA for the hyper recipe; a bare UNet file for
the lightning recipe), then asks every registered adapter for its own tiny files and a face input
(:meth:`fastface.adapters.base.IdentityAdapter.write_tiny`). :func:`run_selfcheck` loads them through
:meth:`fastface.Pipeline.from_pretrained` and runs each adapter's methods (the first adapter also on the
lightning recipe). Its images come from random weights: they prove that the installation works, nothing about
quality.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastface.adapters.registry import entries
from fastface.devices import resolve_device
from fastface.models.text import CLIPTextConfig, CLIPTextEncoder
from fastface.models.tokenizer import EOS_TOKEN, write_vocab_folder
from fastface.models.unet import UNet, get_unet_config
from fastface.models.vae import AutoencoderKL, VAEConfig
from fastface.threads import THREADS_VARIABLE, tiny_work
from fastface.tiny import TinyAdapter, perturb, save_safetensors, write_json

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
    """Paths of the tiny weights: ``base`` folder, hyper ``lora``, lightning ``unet_file``, and the adapters' runs
    (``adapters``, one :class:`~fastface.tiny.TinyAdapter` per preset); the adapters' named files are attributes
    too (e.g. ``adapter``, ``image_encoder``)."""

    base: Path
    lora: Path
    unet_file: Path
    adapters: tuple[TinyAdapter, ...] = ()
    files: dict[str, Path] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Path:
        files = self.__dict__.get("files", {})
        if name in files:
            return files[name]
        raise AttributeError(f"the tiny weights have no file {name!r}; files: {', '.join(sorted(files))}")


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
    writers = list(dict.fromkeys(e.adapter for e in entries()))  # each adapter class once, imported before seeding
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = perturb(UNet(ucfg), gen)
        write_json(base / "unet" / "config.json", ucfg.to_diffusers_config())
        save_safetensors(unet, base / "unet" / "diffusion_pytorch_model.safetensors")
        for name, cfg in (("text_encoder", TEXT_1), ("text_encoder_2", TEXT_2)):
            write_json(base / name / "config.json", _text_config_json(cfg))
            save_safetensors(CLIPTextEncoder(cfg), base / name / "model.safetensors")
        write_vocab_folder(base / "tokenizer", pad_token=EOS_TOKEN)
        write_vocab_folder(base / "tokenizer_2", pad_token="!")
        write_json(base / "vae" / "config.json", _vae_config_json(VAE))
        save_safetensors(perturb(AutoencoderKL(VAE), gen), base / "vae" / "diffusion_pytorch_model.safetensors")
        index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}
        write_json(base / "model_index.json", index)
        lora = root / "Hyper-SDXL-4steps-lora.safetensors"
        save_safetensors(_kohya_lora(unet, gen), lora)
        unet_file = root / "sdxl_lightning_4step_unet.safetensors"
        save_safetensors(perturb(unet, gen, 0.02), unet_file)
        runs, files = [], {}
        for adapter in writers:
            for run in adapter.write_tiny(root, unet, gen, seed):
                runs.append(run)
                files.update(run.files)
    return TinyWeights(base, lora, unet_file, tuple(runs), files)



def tiny_face(seed: int = 0, crop_size: int = 56):
    """A random identity (unit embedding + a random aligned crop) for the tiny pipeline."""
    from fastface.adapters.faces import FaceInfo

    rng = np.random.default_rng(seed)
    crop = rng.integers(0, 256, (crop_size, crop_size, 3), dtype=np.uint8)
    return FaceInfo.from_embedding(rng.standard_normal(512).astype(np.float32), crop=crop, source="selfcheck")


def run_selfcheck(out_dir: str | os.PathLike | None = None, *, device: str | None = "cpu", log=logger.info) -> bool:
    """Build the pipeline from tiny random weights and run every method once; ``log`` gets one line per check.

    Returns True when every method produced finite images of the right size. Saves them in ``out_dir`` if given.
    Runs on one CPU thread unless ``OMP_NUM_THREADS`` is set (:func:`fastface.threads.tiny_work`: tiny models are
    fastest so, and do not collapse when another process is busy). An unusable ``device`` is a
    :class:`fastface.devices.DeviceError` before anything is written.
    """
    resolve_device(device)
    with tiny_work() as threads:
        log(f"tiny work on {threads} CPU thread(s) (set {THREADS_VARIABLE} to change)")
        return _run_selfcheck(out_dir, device, log)


def _run_selfcheck(out_dir: str | os.PathLike | None, device: str | None, log) -> bool:
    from fastface.pipeline import Pipeline

    ok = True
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastface-selfcheck-") as tmp:
        w = write_tiny_weights(tmp)
        log(f"wrote tiny random weights in the real layouts ({time.perf_counter() - start:.1f} s)")
        runs = []
        for i, a in enumerate(w.adapters):
            runs.append(("hyper", a.name, dict(weights=w.lora, **a.load), list(a.methods), a.face))
            if i == 0:  # the lightning recipe (a whole distilled UNet file) with the first adapter
                runs.append(("lightning", a.name, dict(weights=w.unet_file, **a.load), ["baseline", "fastface-am1"],
                             a.face))
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
