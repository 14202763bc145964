"""CLIP text transformer (Radford et al. 2021) for SDXL's two text encoders, and their weight loaders.

One pre-LN causal transformer parameterised for both encoders: CLIP ViT-L/14 (quick_gelu, width 768, 12 layers)
and OpenCLIP ViT-bigG/14 (gelu, width 1280, 32 layers, with a bias-free text projection). Module names follow the
transformers layout (``text_model.encoder.layers.{i}.self_attn.q_proj`` ...), so diffusers ``text_encoder/`` and
``text_encoder_2/`` weights load as they are; the single-file (SGM) layouts are mapped by pure functions below.
SDXL prompt encoding (both encoders, pooled vector, micro-conditioning time ids) is :class:`SDXLTextConditioner`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastface.steps import named

from .tokenizer import CLIPTokenizer
from .loading import StateDict, WeightFormatError, assign_state_dict, find_weight_file, read_weight_files, read_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text transformer."""

    width: int
    layers: int
    heads: int
    mlp: int
    act: str  # "quick_gelu" (CLIP ViT-L) or "gelu" (OpenCLIP bigG, exact erf form)
    projection_dim: int | None = None  # None: no text projection (no pooled output)
    vocab_size: int = 49408
    max_positions: int = 77
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIPTextConfig.act must be 'quick_gelu' or 'gelu', got {self.act!r}")
        if self.width % self.heads:
            raise ValueError(f"CLIPTextConfig: width {self.width} is not divisible by heads {self.heads}")


TEXT_CONFIGS: dict[str, CLIPTextConfig] = {
    "clip-l": CLIPTextConfig(width=768, layers=12, heads=12, mlp=3072, act="quick_gelu"),
    "bigg": CLIPTextConfig(width=1280, layers=32, heads=20, mlp=5120, act="gelu", projection_dim=1280),
    "tiny-clip-l": CLIPTextConfig(width=32, layers=3, heads=2, mlp=64, act="quick_gelu"),
    "tiny-bigg": CLIPTextConfig(width=48, layers=3, heads=3, mlp=96, act="gelu", projection_dim=48),
}


def text_config(name_or_config: str | CLIPTextConfig) -> CLIPTextConfig:
    """A config from the registry by name (``clip-l``, ``bigg``, ``tiny-clip-l``, ``tiny-bigg``), or as given."""
    return named(TEXT_CONFIGS, name_or_config, "text encoder config", CLIPTextConfig)


class TextEncoderOutput(NamedTuple):
    hidden: torch.Tensor  # [B, T, width]: the selected hidden state (no final layer norm)
    pooled: torch.Tensor | None  # [B, projection_dim]: text_projection(final_ln(last)[argmax ids]), or None


class _Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)


class _Attention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention of ``x`` [B, T, D]; with ``rows`` [B], only the query at that position per batch."""
        b, t, d = x.shape
        q_in = x if rows is None else x[torch.arange(b, device=x.device), rows].unsqueeze(1)
        split = lambda y: y.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  [B, H, T, Dh]
        q, k, v = split(self.q_proj(q_in)), split(self.k_proj(x)), split(self.v_proj(x))
        if rows is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the query at position r sees keys 0..r
            mask = torch.arange(t, device=x.device)[None, :] <= rows[:, None]  # [B, T]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).flatten(2))


class _MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.quick = cfg.act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return self.fc2(h)


class _Layer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = _Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        residual = x if rows is None else x[torch.arange(x.shape[0], device=x.device), rows].unsqueeze(1)
        h = residual + self.self_attn(self.layer_norm1(x), rows)
        return h + self.mlp(self.layer_norm2(h))


class _Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))


class _TextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer returning one hidden state (default: penultimate) and the projected pooled output."""

    def __init__(self, config: str | CLIPTextConfig) -> None:
        super().__init__()
        self.config = text_config(config)
        self.text_model = _TextModel(self.config)
        p = self.config.projection_dim
        self.text_projection = nn.Linear(self.config.width, p, bias=False) if p else None

    def forward(self, input_ids: torch.Tensor, hidden_layer: int = -2, pooled: bool | None = None) -> TextEncoderOutput:
        """Encode ``input_ids`` [B, T].

        ``hidden_layer`` indexes the transformers-style ``hidden_states`` tuple (embeddings, then each layer's output):
        -2 is SDXL's penultimate layer, ``-(clip_skip + 2)`` diffusers' clip_skip. ``pooled`` (default: when the
        model has a projection) adds ``text_projection(final_layer_norm(last)[argmax(ids)])``; the last layer is then
        evaluated only at that position when its full output is not asked for. Layers past both are skipped.
        """
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_positions:
            raise ValueError(f"input_ids must be [B, T<={cfg.max_positions}], got shape {tuple(input_ids.shape)}")
        n = cfg.layers
        if not -(n + 1) <= hidden_layer <= n:
            raise ValueError(f"hidden_layer must be in [-{n + 1}, {n}] for a {n}-layer encoder, got {hidden_layer}")
        want = hidden_layer % (n + 1)  # 0: embeddings, i: output of layer i
        if pooled is None:
            pooled = self.text_projection is not None
        if pooled and self.text_projection is None:
            raise ValueError("this text encoder has no text projection, so it has no pooled output")
        emb = self.text_model.embeddings
        t = input_ids.shape[1]
        x = emb.token_embedding(input_ids) + emb.position_embedding.weight[:t]
        hidden = x if want == 0 else None
        last_needed = n if (pooled or want == n) else want
        pooled_out = None
        for i, layer in enumerate(self.text_model.encoder.layers[:last_needed], start=1):
            if i == n and want < n:  # only the pooled row of the last layer is needed
                eos = input_ids.argmax(dim=-1)
                x = layer(x, rows=eos)[:, 0]  # [B, D]
                break
            x = layer(x)
            if i == want:
                hidden = x
        if pooled:
            if x.ndim == 3:
                x = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
            pooled_out = self.text_projection(self.text_model.final_layer_norm(x))
        return TextEncoderOutput(hidden, pooled_out)


# ---- loading ------------------------------------------------------------------------------------------------

_IGNORED = ("text_model.embeddings.position_ids",)
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."


def build_text_encoder(
    config: str | CLIPTextConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> CLIPTextEncoder:
    """Build a :class:`CLIPTextEncoder` on the meta device and assign transformers-layout weights to it."""
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    state_dict = _with_text_model_prefix(state_dict)
    assign_state_dict(model, state_dict, source=source, dtype=dtype, device=device, ignore_unexpected=_IGNORED)
    return model.eval().requires_grad_(False)


def _with_text_model_prefix(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """transformers >= 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix; older files have it."""
    if any(k.startswith("text_model.") for k in sd):
        return sd
    bare = ("embeddings.", "encoder.", "final_layer_norm.")
    return {("text_model." + k if k.startswith(bare) else k): v for k, v in sd.items()}


def config_from_transformers(config_file: str | os.PathLike) -> CLIPTextConfig:
    """A :class:`CLIPTextConfig` from a transformers ``config.json`` (CLIPTextModel[WithProjection])."""
    path = Path(config_file)
    if not path.is_file():
        raise WeightFormatError(f"{path}: no such file (a text encoder folder needs its config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw = raw.get("text_config", raw)  # a full CLIPModel config nests the text part
        with_projection = any("WithProjection" in a for a in raw.get("architectures") or [])
        act = raw.get("hidden_act", "quick_gelu")
        act = "gelu" if act in ("gelu", "gelu_python") else act
        return CLIPTextConfig(
            width=int(raw["hidden_size"]),
            layers=int(raw["num_hidden_layers"]),
            heads=int(raw["num_attention_heads"]),
            mlp=int(raw["intermediate_size"]),
            act=act,
            projection_dim=int(raw.get("projection_dim", raw["hidden_size"])) if with_projection else None,
            vocab_size=int(raw.get("vocab_size", 49408)),
            max_positions=int(raw.get("max_position_embeddings", 77)),
            eps=float(raw.get("layer_norm_eps", 1e-5)),
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WeightFormatError(f"{path}: not a usable CLIP text config ({type(exc).__name__}: {exc})") from exc


def load_text_encoder(
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
) -> CLIPTextEncoder:
    """Load a diffusers ``text_encoder/`` or ``text_encoder_2/`` folder (``config.json`` + ``model.safetensors``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightFormatError(f"{folder}: no such folder (expected a diffusers text_encoder folder)")
    cfg = config_from_transformers(folder / "config.json")
    files = find_weight_file(folder, "model", variant)
    return build_text_encoder(cfg, read_weight_files(files), source=", ".join(map(str, files)), dtype=dtype, device=device)


def clip_l_state_from_sgm(sd: Mapping[str, torch.Tensor], prefix: str = CLIP_L_PREFIX) -> StateDict:
    """CLIP-L weights of an SGM single file: strip the prefix (the rest already has transformers names)."""
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise WeightFormatError(f"no CLIP-L text encoder keys (prefix '{prefix}') in the checkpoint")
    return out


_OPENCLIP_RENAMES = (
    ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
)


def bigg_state_from_openclip(sd: Mapping[str, torch.Tensor], prefix: str = BIGG_PREFIX) -> StateDict:
    """OpenCLIP text weights (SGM ``conditioner.embedders.1.model.*``) in transformers names.

    The packed ``attn.in_proj_{weight,bias}`` [3D, D] splits row-wise into q, k, v; ``text_projection`` (used as
    ``x @ P``) becomes ``text_projection.weight = P.T``; ``logit_scale`` and ``attn_mask`` are dropped.
    """
    src = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not src:
        raise WeightFormatError(f"no OpenCLIP text encoder keys (prefix '{prefix}') in the checkpoint")
    out: StateDict = {}
    for key, value in src.items():
        if key in ("logit_scale", "attn_mask"):
            continue
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key[len("ln_final."):]] = value
        elif key.startswith("transformer.resblocks."):
            rest = key[len("transformer.resblocks."):]
            idx, _, name = rest.partition(".")
            base = f"text_model.encoder.layers.{idx}."
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                if value.shape[0] % 3:
                    raise WeightFormatError(
                        f"'{prefix}{key}' has shape {tuple(value.shape)}: the packed q/k/v rows are not divisible by 3"
                    )
                kind = name.rsplit("_", 1)[1]  # weight / bias
                for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{part}_proj.{kind}"] = chunk
                continue
            for old, new in _OPENCLIP_RENAMES:
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            out[base + name] = value
        else:
            out[key] = value  # unknown: reported as unexpected by assign_state_dict
    return out


def load_text_encoders_from_single_file(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    configs: tuple[str | CLIPTextConfig, str | CLIPTextConfig] = ("clip-l", "bigg"),
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    source: str | None = None,
) -> tuple[CLIPTextEncoder, CLIPTextEncoder]:
    """Both SDXL text encoders from a single-file (SGM) checkpoint, given as a path or an already-read state dict."""
    if isinstance(checkpoint, Mapping):
        sd, src = checkpoint, source or "<state dict>"
    else:
        sd, src = read_weights(checkpoint), str(checkpoint)
    try:
        clip_l = clip_l_state_from_sgm(sd)
        bigg = bigg_state_from_openclip(sd)
    except WeightFormatError as exc:
        raise WeightFormatError(f"{src}: {exc}. Is this an SDXL single-file checkpoint?") from None
    enc1 = build_text_encoder(configs[0], clip_l, source=f"{src} ({CLIP_L_PREFIX}*)", dtype=dtype, device=device)
    enc2 = build_text_encoder(configs[1], bigg, source=f"{src} ({BIGG_PREFIX}*)", dtype=dtype, device=device)
    return enc1, enc2


# ---- SDXL prompt encoding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SDXLPromptEmbeds:
    """SDXL text conditioning: context [B, 77, 2048] and pooled [B, 1280] for the prompt and the negative prompt."""

    context: torch.Tensor
    pooled: torch.Tensor
    negative_context: torch.Tensor | None
    negative_pooled: torch.Tensor | None


def sdxl_time_ids(
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """SDXL micro-conditioning ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` repeated to [B, 6]."""
    target_size = tuple(original_size) if target_size is None else target_size
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != 6:
        raise ValueError(
            f"time ids need (height, width) sizes and a (top, left) crop; got original_size={original_size}, "
            f"crop_top_left={crop_top_left}, target_size={target_size}"
        )
    return torch.tensor([values], dtype=dtype, device=device).repeat(batch, 1)


@dataclass(frozen=True)
class SDXLTextConditioner:
    """SDXL's prompt encoding: CLIP-L and OpenCLIP bigG penultimate states side by side, bigG's pooled projection.

    ``force_zeros_for_empty_prompt`` (True for SDXL base and its distillations): without a negative prompt the
    negative conditioning is all zeros, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` does.
    """

    tokenizer_1: CLIPTokenizer  # pad 49407
    tokenizer_2: CLIPTokenizer  # the same vocabulary, pad id 0
    encoder_1: CLIPTextEncoder
    encoder_2: CLIPTextEncoder
    force_zeros_for_empty_prompt: bool = True

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder_2.text_model.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder_2.text_model.final_layer_norm.weight.device

    def _encode(
        self, prompts_1: list[str], prompts_2: list[str], clip_skip: int | None, n_skip: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompt lists; the first ``n_skip`` rows (negatives) ignore clip_skip, as diffusers does."""
        layer = -2 if clip_skip is None else -(clip_skip + 2)
        ids_1 = self.tokenizer_1(prompts_1).to(self.encoder_1.text_model.final_layer_norm.weight.device)
        # the two tokenizers share one vocabulary: a too-long prompt is reported once, not once per encoder
        ids_2 = self.tokenizer_2(prompts_2, warn=prompts_2 != prompts_1).to(self.device)
        if layer == -2 or n_skip == 0:
            h1 = self.encoder_1(ids_1, hidden_layer=layer).hidden
            h2, pooled = self.encoder_2(ids_2, hidden_layer=layer, pooled=True)
        else:  # negatives at -2, prompts at the clip_skip layer: two calls
            h1 = torch.cat([self.encoder_1(ids_1[:n_skip]).hidden, self.encoder_1(ids_1[n_skip:], layer).hidden])
            neg, pos = self.encoder_2(ids_2[:n_skip], pooled=True), self.encoder_2(ids_2[n_skip:], layer, pooled=True)
            h2, pooled = torch.cat([neg.hidden, pos.hidden]), torch.cat([neg.pooled, pos.pooled])
        context = torch.cat([h1.to(device=h2.device, dtype=h2.dtype), h2], dim=-1)
        return context, pooled

    @torch.no_grad()
    def encode(
        self,
        prompts: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        prompts_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        with_negative: bool = True,
        clip_skip: int | None = None,
    ) -> SDXLPromptEmbeds:
        """Encode B prompts (and negatives, batched into the same encoder calls).

        ``prompts_2`` (for bigG) defaults to ``prompts``, ``negative_prompt_2`` to ``negative_prompt``. A single
        negative string applies to every prompt. Without ``negative_prompt`` the negatives are zeros when
        ``force_zeros_for_empty_prompt``, else the encoded empty prompt. ``with_negative=False``: negatives are None.
        """
        p1 = _as_list(prompts, "prompts")
        b = len(p1)
        p2 = p1 if not prompts_2 else _as_list(prompts_2, "prompts_2", b)
        if not with_negative:
            context, pooled = self._encode(p1, p2, clip_skip, 0)
            return SDXLPromptEmbeds(context, pooled, None, None)
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            context, pooled = self._encode(p1, p2, clip_skip, 0)
            return SDXLPromptEmbeds(context, pooled, torch.zeros_like(context), torch.zeros_like(pooled))
        n1 = _as_list(negative_prompt if negative_prompt is not None else "", "negative_prompt", b)
        n2 = n1 if not negative_prompt_2 else _as_list(negative_prompt_2, "negative_prompt_2", b)
        context, pooled = self._encode(n1 + p1, n2 + p2, clip_skip, b)
        return SDXLPromptEmbeds(context[b:], pooled[b:], context[:b], pooled[:b])

    def time_ids(
        self,
        original_size: tuple[int, int],
        crop_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        *,
        batch: int = 1,
    ) -> torch.Tensor:
        """:func:`sdxl_time_ids` in this conditioner's dtype and device."""
        return sdxl_time_ids(original_size, crop_top_left, target_size, batch=batch, dtype=self.dtype, device=self.device)

    @classmethod
    def from_diffusers(
        cls,
        root: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        variant: str | None = None,
        force_zeros_for_empty_prompt: bool | None = None,
    ) -> SDXLTextConditioner:
        """Load from a diffusers SDXL pipeline folder (``tokenizer{,_2}/``, ``text_encoder{,_2}/``)."""
        root = Path(root)
        if not root.is_dir():
            raise WeightFormatError(f"{root}: no such folder (expected a diffusers SDXL pipeline folder)")
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = read_force_zeros(root / "model_index.json")
        return cls(
            CLIPTokenizer.from_folder(root / "tokenizer"),
            CLIPTokenizer.from_folder(root / "tokenizer_2"),
            load_text_encoder(root / "text_encoder", dtype=dtype, device=device, variant=variant),
            load_text_encoder(root / "text_encoder_2", dtype=dtype, device=device, variant=variant),
            force_zeros_for_empty_prompt,
        )

    @classmethod
    def from_single_file(
        cls,
        checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        configs: tuple[str | CLIPTextConfig, str | CLIPTextConfig] = ("clip-l", "bigg"),
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        force_zeros_for_empty_prompt: bool = True,
        source: str | None = None,
    ) -> SDXLTextConditioner:
        """Load from an SGM single-file checkpoint (path or state dict), with the bundled CLIP vocabulary."""
        enc1, enc2 = load_text_encoders_from_single_file(
            checkpoint, configs=configs, dtype=dtype, device=device, source=source
        )
        return cls(CLIPTokenizer.bundled(), CLIPTokenizer.bundled(pad_token="!"), enc1, enc2, force_zeros_for_empty_prompt)


def _as_list(value: str | Sequence[str], name: str, batch: int | None = None) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    if batch is not None and len(items) != batch:
        if len(items) == 1:
            return items * batch
        raise ValueError(f"{name} has {len(items)} entries but there are {batch} prompts; give 1 or {batch}")
    return items


def read_force_zeros(model_index: Path) -> bool:
    """``force_zeros_for_empty_prompt`` from a pipeline's model_index.json (diffusers' default True if absent)."""
    if not model_index.is_file():
        return True
    try:
        return bool(json.loads(model_index.read_text(encoding="utf-8")).get("force_zeros_for_empty_prompt", True))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightFormatError(f"{model_index}: not valid JSON ({exc})") from exc


__all__ = [
    "CLIPTextConfig", "TEXT_CONFIGS", "text_config", "CLIPTextEncoder", "TextEncoderOutput", "build_text_encoder",
    "config_from_transformers", "load_text_encoder", "clip_l_state_from_sgm", "bigg_state_from_openclip",
    "load_text_encoders_from_single_file", "SDXLPromptEmbeds", "SDXLTextConditioner", "sdxl_time_ids", "read_force_zeros",
]
