"""SDXL's KL autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

The LDM ``AutoencoderKL`` with diffusers module names (``decoder.up_blocks.{i}.resnets.{j}`` ...), so diffusers
``vae/`` weights load as they are; the LDM single-file names are mapped in :mod:`fastface.models.vae_loading`.
``decode`` turns scaled latents into images in [0, 1]; in fp16 the original SDXL VAE overflows (inf/NaN), which is
detected once per call and answered by decoding again in fp32 (or bf16), with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastface.steps import named

from .vae_tiling import tiled_decode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAEConfig:
    """Shape and latent scaling of an AutoencoderKL."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    scaling_factor: float = 0.13025
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    force_upcast: bool = True  # informational: the original SDXL VAE overflows in fp16
    eps: float = 1e-6


VAE_CONFIGS: dict[str, VAEConfig] = {
    "sdxl": VAEConfig(),
    "sdxl-fp16-fix": VAEConfig(force_upcast=False),
    "tiny": VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_groups=8),
}


def vae_config(name_or_config: str | VAEConfig) -> VAEConfig:
    """A config from the registry by name (``sdxl``, ``sdxl-fp16-fix``, ``tiny``), or as given."""
    return named(VAE_CONFIGS, name_or_config, "VAE config", VAEConfig)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, cout, eps=cfg.eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual."""

    def __init__(self, ch: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.eps)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, ch: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, cfg), ResnetBlock(ch, ch, cfg)])
        self.attentions = nn.ModuleList([AttentionBlock(ch, cfg)]) if cfg.mid_attention else nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """LDM downsampling: asymmetric zero pad (right, bottom) then a stride-2 3x3 conv without padding."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, cfg: VAEConfig, resample: type[nn.Module] | None, name: str):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, cfg) for i in range(n))
        setattr(self, name, nn.ModuleList([resample(cout)] if resample else []))
        self._resample = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, self._resample):
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg,
                   Downsample if i < len(ch) - 1 else None, "downsamplers")
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=cfg.eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        rev = cfg.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], cfg)
        self.up_blocks = nn.ModuleList(
            _Level(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, cfg,
                   Upsample if i < len(rev) - 1 else None, "upsamplers")
            for i in range(len(rev))
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, rev[-1], eps=cfg.eps)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``decode`` scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in [0, 1]; ``encode`` back."""

    def __init__(self, config: str | VAEConfig = "sdxl") -> None:
        super().__init__()
        self.config = cfg = vae_config(config)
        z = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if cfg.use_post_quant_conv else None
        self.upcast_dtype = torch.float32  # fallback when fp16 decoding overflows (bf16 also works)
        self._fp16_overflows = False  # set after the first overflow: later calls go straight to the fallback

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(scale, shift) so that raw latents = scaled * scale + shift."""
        cfg = self.config
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
            std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
            return std / cfg.scaling_factor, mean
        return 1.0 / cfg.scaling_factor, cfg.shift_factor or 0.0

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoder output in [-1, 1] (unclamped) from scaled latents, in the model's dtype, without overflow checks."""
        scale, shift = self._latent_stats(latents)
        z = (latents * scale + shift).to(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _upcast_decoder(self):
        """``latents -> decode_raw(latents)`` with temporary ``upcast_dtype`` copies of the weights, made once (the
        module itself is unchanged; tiles share the copies)."""
        dt = self.upcast_dtype
        params = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in self.state_dict().items()}
        return lambda z: torch.func.functional_call(self, params, (z.to(dt),), strict=True, tie_weights=False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(latents)

    @property
    def upsampling_factor(self) -> int:
        """Pixels per latent along each side (8 for SDXL)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (float32) from scaled latents, as ``clamp(x / 2 + 0.5, 0, 1)``.

        In fp16, a non-finite output (the original SDXL VAE overflows) is detected with one check at the end and
        the batch is decoded again in ``upcast_dtype`` (fp32 by default); later calls then skip the fp16 attempt.
        ``tile`` (latents per side, e.g. 128 = 1024 px) decodes larger latents in overlapping tiles with blended
        seams (:func:`fastface.models.vae_tiling.tiled_decode`): memory bounded by one tile, result close to but
        not equal to the plain decode; latents no larger than one tile decode in one piece as without it.
        """

        def run(fn):
            if tile is None:
                return fn(latents)
            return tiled_decode(fn, latents, tile=tile, scale=self.upsampling_factor)

        if self.dtype == torch.float16 and self._fp16_overflows:
            x = run(self._upcast_decoder())
        else:
            x = run(self.decode_raw)
            if self.dtype == torch.float16 and not bool(torch.isfinite(x).all()):
                logger.warning(
                    "VAE decode overflowed in float16 (inf/NaN; the original SDXL VAE does this): decoding again in "
                    "%s, and from now on for this VAE. Use the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix) or load "
                    "this one in bfloat16/float32 to avoid the extra work.",
                    str(self.upcast_dtype).replace("torch.", ""),
                )
                self._fp16_overflows = True
                x = run(self._upcast_decoder())
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar) [B, 4, H/8, W/8] of images in [0, 1] (unscaled latents; logvar clamped to [-30, 20])."""
        x = self.encoder((images * 2 - 1).to(self.dtype))
        if self.quant_conv is not None:
            x = self.quant_conv(x)
        mean, logvar = x.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Scaled latents of images in [0, 1]: the posterior mean, or a sample when ``sample`` (using ``generator``)."""
        mean, logvar = self.encode_moments(images)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        scale, shift = self._latent_stats(z)
        return (z - shift) / scale


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] images in [0, 1] -> uint8 [B, H, W, 3] on the CPU (``round(x * 255)``, as diffusers does)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
