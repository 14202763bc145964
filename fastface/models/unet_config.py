"""The SDXL UNet's configuration: :class:`UNetConfig`, the named configs, and reading a diffusers config dict.

Kept apart from the model (:mod:`fastface.models.unet`) and the weight loading (:mod:`fastface.models.unet_loading`)
so that both import it and the model does not import its loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fastface.steps import named

__all__ = [
    "SDXL_DOWN_BLOCKS",
    "SDXL_UP_BLOCKS",
    "UNetConfig",
    "UNET_CONFIGS",
    "get_unet_config",
    "config_from_diffusers",
    "check_sdxl_layout",
    "not_sdxl",
]

SDXL_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP_BLOCKS = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class UNetConfig:
    """Shapes of an SDXL-family UNet; ``depth[i]`` transformer blocks per attention at level i (0 = no attention)."""

    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    depth: tuple[int, ...] = (0, 2, 10)
    heads: tuple[int, ...] = (5, 10, 20)
    context_dim: int = 2048
    pooled_dim: int = 1280
    time_id_dim: int = 256  # diffusers' addition_time_embed_dim: sinusoid size per time id
    num_time_ids: int = 6
    norm_groups: int = 32
    time_cond_proj_dim: int | None = None  # LCM-SDXL full UNet: guidance embedding added to the sinusoid
    sample_size: int = 128  # default latent size (1024 px); SDXL-Turbo uses 64

    def __post_init__(self) -> None:
        n = len(self.channels)
        if not (len(self.depth) == len(self.heads) == n) or n < 2:
            raise ValueError(f"UNetConfig: channels, depth and heads need one entry per level (>= 2): {self}")
        for c, d, h in zip(self.channels, self.depth, self.heads):
            if c % self.norm_groups or (d > 0 and c % h):
                raise ValueError(f"UNetConfig: {c} channels do not split into {self.norm_groups} groups / {h} heads")
        if self.depth[-1] <= 0 or self.layers_per_block < 1:
            raise ValueError(f"UNetConfig: the last level (and so the mid block) needs attention: {self}")

    @property
    def mid_depth(self) -> int:
        """Transformer blocks in the mid block: the depth of the last level, as in diffusers and sgm."""
        return self.depth[-1]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    @property
    def add_in_dim(self) -> int:
        """Input size of the text-time embedding: pooled text ‖ sinusoids of the time ids (2816 for SDXL)."""
        return self.pooled_dim + self.num_time_ids * self.time_id_dim

    def replace(self, **changes: Any) -> UNetConfig:
        """A copy with some fields changed."""
        return UNetConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def to_diffusers_config(self) -> dict[str, Any]:
        """The equivalent diffusers ``UNet2DConditionModel`` config (a plain dict, as in ``unet/config.json``)."""
        down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in self.depth]
        up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(self.depth)]
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": list(self.channels),
            "layers_per_block": self.layers_per_block,
            "transformer_layers_per_block": [max(d, 1) for d in self.depth],
            "attention_head_dim": list(self.heads),
            "num_attention_heads": None,
            "cross_attention_dim": self.context_dim,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": self.time_id_dim,
            "projection_class_embeddings_input_dim": self.add_in_dim,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "norm_num_groups": self.norm_groups,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "time_cond_proj_dim": self.time_cond_proj_dim,
        }

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> UNetConfig:
        """Read a diffusers ``unet/config.json`` dict; raises ValueError if it is not an SDXL UNet layout."""
        return config_from_diffusers(cfg)


UNET_CONFIGS: dict[str, UNetConfig] = {
    "sdxl": UNetConfig(),
    # Same block layout and attention count (70 transformer blocks, 140 attention layers) at small widths.
    "tiny": UNetConfig(
        channels=(32, 64, 128),
        heads=(2, 4, 8),
        context_dim=64,
        pooled_dim=32,
        time_id_dim=8,
        sample_size=16,
    ),
}


def get_unet_config(name: str) -> UNetConfig:
    """The registered UNet config called ``name`` ("sdxl", "tiny")."""
    return named(UNET_CONFIGS, name, "UNet config")


# diffusers config entries that must hold these values (missing entries take diffusers' defaults, given second).
_REQUIRED: dict[str, tuple[Any, Any]] = {
    "addition_embed_type": ("text_time", None),
    "use_linear_projection": (True, False),
    "flip_sin_to_cos": (True, True),
    "freq_shift": (0, 0),
    "act_fn": ("silu", "silu"),
    "norm_eps": (1e-5, 1e-5),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn"),
    "time_embedding_type": ("positional", "positional"),
    "resnet_time_scale_shift": ("default", "default"),
    "class_embed_type": (None, None),
    "encoder_hid_dim": (None, None),
    "center_input_sample": (False, False),
    "dual_cross_attention": (False, False),
    "conv_in_kernel": (3, 3),
    "conv_out_kernel": (3, 3),
    "attention_type": ("default", "default"),
    "time_embedding_act_fn": (None, None),
    "timestep_post_act": (None, None),
    "resnet_skip_time_act": (False, False),
    "resnet_out_scale_factor": (1.0, 1.0),
    "class_embeddings_concat": (False, False),
    "cross_attention_norm": (None, None),
    "num_class_embeds": (None, None),
    "mid_block_scale_factor": (1, 1),
    "downsample_padding": (1, 1),
    "dropout": (0.0, 0.0),
}


def not_sdxl(reason: str) -> ValueError:
    return ValueError(
        f"not an SDXL UNet layout: {reason}. fastface supports SDXL base-family UNets (SDXL 1.0 and its "
        "fine-tunes and distillations: Lightning, Hyper-SD, LCM, Turbo); SD1.x/2.x and the SDXL refiner are not "
        "supported"
    )


def _per_level(value: Any, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise not_sdxl(f"{name} = {value!r} (expected an int or {n} ints)")


def config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers ``UNet2DConditionModel`` config dict; ValueError if not SDXL layout."""
    name = cfg.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise not_sdxl(f"the config describes a {name}, not a UNet2DConditionModel")
    down = tuple(cfg.get("down_block_types", ()))
    up = tuple(cfg.get("up_block_types", ()))
    if down != SDXL_DOWN_BLOCKS or up != SDXL_UP_BLOCKS:
        raise not_sdxl(
            f"down_block_types {list(down)} / up_block_types {list(up)} "
            f"(SDXL has {list(SDXL_DOWN_BLOCKS)} / {list(SDXL_UP_BLOCKS)})"
        )
    bad = []
    for key, (want, default) in _REQUIRED.items():
        got = cfg.get(key, default)
        if key == "mid_block_type" and got is None:
            got = default
        if got != want:
            bad.append(f"{key}={got!r} (need {want!r})")
    only_cross = cfg.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        bad.append(f"only_cross_attention={only_cross!r} (need False)")
    if bad:
        raise not_sdxl(", ".join(bad))
    n = len(down)
    channels = _per_level(cfg.get("block_out_channels"), n, "block_out_channels")
    layers = cfg.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise not_sdxl(f"layers_per_block = {layers!r} differs between levels")
        layers = layers[0]
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    reverse = cfg.get("reverse_transformer_layers_per_block")
    if reverse is not None and tuple(reverse) != depth[::-1]:
        raise not_sdxl(f"reverse_transformer_layers_per_block = {reverse!r}")
    heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), n, "attention heads")
    context_dim = cfg.get("cross_attention_dim", 1280)
    if not isinstance(context_dim, int):
        raise not_sdxl(f"cross_attention_dim = {context_dim!r} (expected one int)")
    time_id_dim = cfg.get("addition_time_embed_dim")
    add_in = cfg.get("projection_class_embeddings_input_dim")
    if not isinstance(time_id_dim, int) or not isinstance(add_in, int) or add_in <= 6 * time_id_dim:
        raise not_sdxl(
            f"addition_time_embed_dim = {time_id_dim!r}, projection_class_embeddings_input_dim = {add_in!r}"
        )
    ted = cfg.get("time_embedding_dim")
    if ted is not None and ted != 4 * channels[0]:
        raise not_sdxl(f"time_embedding_dim = {ted} (need {4 * channels[0]})")
    try:
        return UNetConfig(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            channels=channels,
            layers_per_block=layers,
            depth=(0,) + depth[1:],  # the first level (DownBlock2D) has no attention whatever its entry says
            heads=heads,
            context_dim=context_dim,
            pooled_dim=add_in - 6 * time_id_dim,
            time_id_dim=time_id_dim,
            norm_groups=cfg.get("norm_num_groups", 32),
            time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
            sample_size=cfg.get("sample_size") or 128,
        )
    except ValueError as exc:
        raise not_sdxl(str(exc)) from None


def check_sdxl_layout(config: UNetConfig) -> None:
    """Raise ValueError unless ``config`` has SDXL's block layout (3 levels; attention on levels 1 and 2 only)."""
    if len(config.channels) != 3 or config.depth[0] != 0 or min(config.depth[1:]) <= 0:
        raise not_sdxl(f"{len(config.channels)} levels with transformer depths {config.depth}")
    if config.num_time_ids != 6:
        raise not_sdxl(f"{config.num_time_ids} time ids (SDXL has 6)")
