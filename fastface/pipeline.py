"""The FastFace pipeline: face photo(s) or a precomputed identity + a prompt -> images (``fastface.Pipeline``).

::

    pipe = fastface.Pipeline.from_pretrained("hyper", adapter="faceid-plusv2", download=True)
    out = pipe("a photo of a person as an astronaut", face="me.jpg", method="fastface-am1", seed=42)
    out.images[0].save("out.png")            # or out.save(0, "out.png"): PNG with all settings in its metadata

The pipeline loads the parts of a model preset (:mod:`fastface.presets`), installs the identity adapter
(IP-Adapter FaceID / FaceID-Plus-v2, or PuLID v1 / v1.1), and at each call attaches the method's DCG/AM hooks
(:func:`fastface.attach`) for the duration of the call only, so the UNet is left as it was. With PuLID the null
identity of DCG is the encoder applied to zero inputs (upstream's uncond embedding) and AM acts on every id token.
Image ``i`` of a call is drawn from its own generator seeded with ``seed + i`` (initial noise and every later
sampler draw), and text and identity are encoded per image, so an image does not depend on how many others are
generated with it (the batch size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import fastface
from fastface.adapters.faces import FaceAnalyzer, FaceInfo
from fastface.adapters.pulid import PULID_MODES
from fastface.adapters.pulid_faces import PuLIDFacePreprocessor
from fastface.models.clip_vision import clip_preprocess
from fastface.models.vae import images_to_uint8
from fastface.pipeline_loading import (
    Components,
    FaceInput,
    LocalPaths,
    load_components,
    open_face_analyzer,
    prepare_identity,
    resolve_sources,
)
from fastface.pipeline_pulid import (
    PuLIDIdentity,
    alignment_of,
    check_pulid_eva,
    open_pulid_preprocessor,
    prepare_pulid_identity,
)
from fastface.presets import (
    DEFAULT_METHOD,
    AdapterPreset,
    ModelRecipe,
    get_adapter_preset,
    get_model_preset,
    model_recipe,
    resolve_method,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Pipeline", "Generation", "FaceInput", "PuLIDIdentity", "prepare_identity", "prepare_pulid_identity",
    "open_face_analyzer", "parse_dtype", "METADATA_KEY",
]

METADATA_KEY = "fastface"  # the PNG text chunk holding the JSON settings
_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a name (fp16, bf16, fp32, ...); None = fp16 on CUDA, fp32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be a floating type (fp16, bf16, fp32), got {dtype}")
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[str(dtype).lower()]


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} ({exc})") from None


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value.value if hasattr(value, "value") else value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


@dataclass
class Generation:
    """The result of one pipeline call: PIL ``images``, final ``latents`` [B, 4, h, w] and decoded ``pixels``
    [B, 3, H, W] in [0, 1] (float32, CPU), the per-image ``seeds``, the ``settings`` shared by the images and the
    UNet evaluations per image. Iterating or indexing it gives the images."""

    images: list[Image.Image]
    latents: torch.Tensor
    pixels: torch.Tensor
    seeds: list[int]
    prompts: list[str]
    settings: dict[str, Any]
    unet_evaluations: float

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Image.Image]:
        return iter(self.images)

    def __getitem__(self, i: int) -> Image.Image:
        return self.images[i]

    def metadata(self, i: int) -> dict[str, Any]:
        """Everything needed to reproduce image ``i`` (its own seed and prompt, with num_images 1)."""
        return {**self.settings, "prompt": self.prompts[i], "seed": self.seeds[i], "num_images": 1}

    def save(self, i: int, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Save image ``i`` as PNG with its settings as JSON in the ``fastface`` text chunk (and a readable
        ``parameters`` chunk); ``extra`` entries are added to the JSON."""
        meta = {**self.metadata(i), **(dict(extra) if extra else {})}
        info = PngInfo()
        info.add_text(METADATA_KEY, json.dumps(_jsonable(meta), sort_keys=True))
        info.add_text("parameters", f"{meta['prompt']}\nSteps: {meta['steps']}, Sampler: {meta['sampler']}, "
                                    f"Seed: {meta['seed']}, Method: {meta['method']}, Model: {meta['preset']}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.images[i].save(path, format="PNG", pnginfo=info)
        return path


class Pipeline:
    """A loaded FastFace pipeline (UNet with the identity adapter, text encoders, VAE, CLIP image encoder).

    Build it with :meth:`from_pretrained`; call it to generate. ``unet_evaluations`` of each call counts the
    UNet batch entries per image (the official implementation spends 3 per step on every method). With a PuLID
    adapter, its face models (antelopev2, BiSeNet, EVA02-CLIP) are loaded with the first photo
    (:attr:`pulid_preprocessor`); precomputed PuLID identities need none of them.
    """

    def __init__(
        self,
        components: Components,
        recipe: ModelRecipe,
        adapter: AdapterPreset,
        *,
        device: torch.device,
        dtype: torch.dtype,
        face_root: str | os.PathLike | None = None,
        fuse_adapter_lora: bool = True,
        custom_weights: bool = False,
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
        eva: str | os.PathLike | None = None,
        face_parser: str | os.PathLike | None = None,
        face_detector: str | os.PathLike | None = None,
    ) -> None:
        self.components = components
        self.unet, self.text, self.vae = components.unet, components.text, components.vae
        self.adapter, self.image_encoder = components.adapter, components.image_encoder
        self.recipe, self.adapter_preset = recipe, adapter
        self.device, self.dtype = device, dtype
        self.face_root = face_root
        self.download, self.cache_dir = download, cache_dir
        self.is_pulid = adapter.variant == "pulid"
        self._eva, self._face_parser, self._face_detector = eva, face_parser, face_detector
        self._custom_weights = custom_weights
        self._analyzer: FaceAnalyzer | None = None
        self._pulid_pre: PuLIDFacePreprocessor | None = None
        self._null_cache: dict[Any, torch.Tensor] = {}
        self._lora_scale = adapter.lora_scale
        self._fused = fuse_adapter_lora
        if self.is_pulid:
            self.adapter_handle = self.adapter.install(self.unet, mode=adapter.pulid_mode)
        else:
            self.adapter_handle = self.adapter.install(self.unet, lora_scale=self._lora_scale)
            if fuse_adapter_lora:
                self.adapter_handle.fuse_lora()

    @classmethod
    def from_pretrained(
        cls,
        preset: str = "hyper",
        adapter: str = "faceid-plusv2",
        *,
        steps: int | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
        base: str | os.PathLike | None = None,
        unet: str | os.PathLike | None = None,
        weights: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        adapter_file: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
        face_root: str | os.PathLike | None = None,
        eva: str | os.PathLike | None = None,
        face_parser: str | os.PathLike | None = None,
        face_detector: str | os.PathLike | None = None,
        fuse_adapter_lora: bool = True,
        **recipe_overrides: Any,
    ) -> Pipeline:
        """Load a model preset (hyper, lightning, lcm, turbo, tcd) with an identity adapter (faceid, faceid-plusv2,
        pulid, pulid-v1.1).

        ``steps``: the step count the distilled weights are chosen for (hyper and lightning ship one file per
        count; default the preset's, 4). ``dtype``: fp16/bf16/fp32 (default fp16 on CUDA, else fp32). Weights are
        found in the Hugging Face cache, and downloaded into it only with ``download=True`` (needs the ``hub``
        extra). Overrides: ``base`` (diffusers SDXL folder or repo id: text encoders, VAE, UNet config),
        ``unet`` (UNet folder or file), ``weights`` (the distilled LoRA file, or lightning's UNet file),
        ``vae`` (folder, file or repo id), ``adapter_file``, ``image_encoder`` (CLIP ViT-H/14 folder),
        ``face_root`` (insightface folder with ``models/<pack>``, default ``~/.insightface``; with ``download`` a
        missing pack is fetched from the insightface releases). PuLID: ``eva`` (EVA02-CLIP-L-14-336 checkpoint,
        default ``QuanSun/EVA-CLIP`` from the cache) and ``face_parser`` (facexlib's ``parsing_bisenet.pth``, default
        ``<face_root>/models/facexlib/``) and ``face_detector`` (facexlib's ``detection_Resnet50_Final.pth``, found
        there too: with it photos are aligned as upstream, with RetinaFace; without it with insightface's keypoints
        and a logged warning), all needed for photos only. ``fuse_adapter_lora`` precomputes the adapter's
        LoRA into the weights (faster; a new ``lora_scale`` re-fuses). ``recipe_overrides``: model recipe fields
        (``sampler``, ``sampler_params``, ``spacing``, ``resolution``, ``guidance``, ``lora_scale``, ...).
        """
        dev = _device(device)
        dt = parse_dtype(dtype, dev)
        if weights is not None:
            recipe_overrides["weights"] = Path(os.path.expanduser(os.fspath(weights)))
        recipe = model_recipe(preset, steps, **recipe_overrides)
        ad = get_adapter_preset(adapter)
        if ad.variant != "pulid" and any(x is not None for x in (eva, face_parser, face_detector)):
            raise ValueError(f"eva, face_parser and face_detector are PuLID's face models; adapter {ad.name!r} does "
                             "not use them")
        paths = LocalPaths(base, unet, weights, vae, adapter_file, image_encoder, eva, face_parser, face_detector)
        src = resolve_sources(recipe, ad, paths, half=dt != torch.float32, download=download, cache_dir=cache_dir)
        components = load_components(recipe, ad, src, paths, dtype=dt, device=dev)
        logger.info("loaded %s + %s (%s, %s) from %s", recipe.preset, ad.name, dt, dev, components.sources)
        return cls(components, recipe, ad, device=dev, dtype=dt, face_root=face_root,
                   fuse_adapter_lora=fuse_adapter_lora, custom_weights=weights is not None, download=download,
                   cache_dir=cache_dir, eva=eva, face_parser=face_parser, face_detector=face_detector)

    # -- identity -----------------------------------------------------------------------------------------------

    @property
    def face_analyzer(self) -> FaceAnalyzer:
        """The insightface analyzer of the adapter's pack (loaded on first use, from ``face_root``)."""
        if self._analyzer is None:
            self._analyzer = open_face_analyzer(self.face_root, self.adapter_preset.face_pack, download=self.download)
        return self._analyzer

    @property
    def pulid_preprocessor(self) -> PuLIDFacePreprocessor:
        """PuLID's photo preprocessing (antelopev2 + RetinaFace when found + BiSeNet + EVA02-CLIP, fp32), loaded on
        first use."""
        if not self.is_pulid:
            raise ValueError(f"adapter {self.adapter_preset.name!r} is not PuLID")
        if self._pulid_pre is None:
            self._pulid_pre, used = open_pulid_preprocessor(
                self.adapter_preset, face_root=self.face_root, eva=self._eva, face_parser=self._face_parser,
                face_detector=self._face_detector, device=self.device, download=self.download,
                cache_dir=self.cache_dir, pulid=self.adapter,
            )
            self.components.sources.update(used)
        return self._pulid_pre

    def set_pulid_preprocessor(
        self, preprocessor: PuLIDFacePreprocessor, sources: Mapping[str, str] | None = None
    ) -> None:
        """Use an already loaded PuLID preprocessing (e.g. from :func:`open_pulid_preprocessor`); ``sources`` (the
        files it came from) go into the PNG metadata."""
        if not self.is_pulid:
            raise ValueError(f"adapter {self.adapter_preset.name!r} is not PuLID")
        sources = dict(sources or {})
        check_pulid_eva(self.adapter, preprocessor.eva, sources.get("eva", "the EVA tower"))
        self._pulid_pre = preprocessor
        self.components.sources.update(sources)
        logger.info("PuLID photos are aligned with %s", alignment_of(preprocessor))

    def identity(self, face: FaceInput) -> FaceInfo | PuLIDIdentity:
        """One person: a :class:`FaceInfo` from photos, face files, embeddings or FaceInfos (see
        :func:`prepare_identity`), or for PuLID a :class:`PuLIDIdentity` from photos or PuLID face files (see
        :func:`prepare_pulid_identity`)."""
        if self.is_pulid:
            return prepare_pulid_identity(face, lambda: self.pulid_preprocessor)
        return prepare_identity(face, lambda: self.face_analyzer)

    def _not_pulid(self, what: str) -> None:
        if self.is_pulid:
            raise ValueError(f"{what} is for the IP-Adapters; with PuLID use pipe.pulid_tokens(pipe.identity(face))")

    @torch.no_grad()
    def pulid_tokens(self, person: PuLIDIdentity, *, id_mix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """PuLID's identity tokens [1, T, C] and null tokens (the encoder of zero inputs, upstream's uncond), fp32.

        Several photos: v1 encodes each and concatenates along tokens (10 tokens for the first photo, then 5 per
        photo, or 10 with ``id_mix``, as ``app.py``); v1.1 runs one IDFormer pass over all of them (32 tokens).
        """
        if not self.is_pulid:
            raise ValueError(f"adapter {self.adapter_preset.name!r} is not PuLID; use pipe.id_tokens(face)")
        n = person.num_images
        id_cond = person.id_cond[None] if n > 1 else person.id_cond  # [1, n, D] or [1, D]
        hidden = [h.reshape(1, -1, h.shape[-1]) for h in person.hidden_states]  # [1, n·T, W]: photos along tokens
        tokens = self.adapter.encode(id_cond, hidden, id_mix=id_mix)
        key = ("pulid", n, id_mix, person.hidden_states[0].shape[1])
        if key not in self._null_cache:
            self._null_cache[key] = self.adapter.null_tokens(num_images=n, id_mix=id_mix, vit_tokens=key[3])
        return tokens, self._null_cache[key]

    @torch.no_grad()
    def _clip_features(self, face: FaceInfo) -> torch.Tensor | None:
        if self.adapter.variant != "faceid_plus":
            return None
        if not face.crops:
            raise ValueError(
                f"{face.source}: FaceID-Plus-v2 needs the aligned face crop as well as the embedding: pass a photo, "
                "or a face file with a 'crop' (fastface.pipeline_loading.save_face_file), or use adapter='faceid'"
            )
        enc = self.image_encoder
        size = enc.config.image_size
        pixels = clip_preprocess(list(face.crops), size=size, crop_size=size)
        feats = enc(pixels.to(self.device, self.dtype))  # [N, T, D]
        return feats.mean(dim=0, keepdim=True)  # several photos: mean of their CLIP features

    @torch.no_grad()
    def id_tokens(self, face: FaceInfo, s_scale: float = 1.0) -> torch.Tensor:
        """The identity tokens [1, K, C] of one person (IP-Adapters; PuLID: :meth:`pulid_tokens`)."""
        self._not_pulid("id_tokens")
        emb = torch.from_numpy(np.array(face.embedding, dtype=np.float32))[None].to(self.device)
        return self.adapter.encode(emb, self._clip_features(face), s_scale=s_scale)

    @torch.no_grad()
    def null_tokens(self, s_scale: float = 1.0) -> torch.Tensor:
        """DCG's null identity [1, K, C]: a zero embedding (and, for Plus-v2, the CLIP features of a zero image).
        PuLID: :meth:`pulid_tokens`."""
        self._not_pulid("null_tokens")
        if s_scale not in self._null_cache:
            clip = None if self.image_encoder is None else self.image_encoder.null_features(1)
            self._null_cache[s_scale] = self.adapter.null_tokens(clip, s_scale=s_scale)
        return self._null_cache[s_scale]

    # -- generation ---------------------------------------------------------------------------------------------

    def _recipe_for(self, steps: int | None, sampler: str | None, sampler_params: Mapping | None) -> ModelRecipe:
        r = self.recipe
        if steps is not None and steps != r.steps:
            released = get_model_preset(r.preset).released_steps
            if released is not None and not self._custom_weights:
                raise ValueError(
                    f"this {r.preset} pipeline holds the weights distilled for {r.steps} steps; for {steps} steps "
                    f"load Pipeline.from_pretrained({r.preset!r}, steps={steps}) (released: {released})"
                )
            r = dataclasses.replace(r, steps=steps)
        if sampler is not None or sampler_params is not None:
            changes: dict[str, Any] = {"sampler_params": tuple(dict(sampler_params or {}).items())}
            if sampler is not None:
                changes["sampler"] = sampler
            r = dataclasses.replace(r, **changes)
        return r

    def _set_lora_scale(self, scale: float) -> None:
        if scale != self._lora_scale:
            self.adapter_handle.set_lora_scale(scale)
            self._lora_scale = scale

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        face: FaceInput = None,
        *,
        method: str = DEFAULT_METHOD,
        steps: int | None = None,
        seed: int | None = None,
        ip_scale: float | None = None,
        lora_scale: float | None = None,
        s_scale: float | None = None,
        num_images: int = 1,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int | None = None,
        sampler: str | None = None,
        sampler_params: Mapping[str, Any] | None = None,
        pulid_mode: str | None = None,
        id_mix: bool = False,
        callback: Callable[[int, float, torch.Tensor], None] | None = None,
        **method_options: Any,
    ) -> Generation:
        """Generate ``num_images`` images per prompt of the person in ``face``.

        ``face``: photo path(s), PIL image(s), uint8 array(s), ``.npy``/``.safetensors`` face file(s), a float
        embedding [512], a :class:`FaceInfo`, or a list of these (one person). PuLID: photos, PuLID face files
        (:func:`fastface.pipeline_pulid.save_pulid_face_file`) or :class:`PuLIDIdentity` (no bare embeddings).
        ``method``: baseline, dcg, am1, am2, fastface-am1 (default), fastface-am2; ``method_options`` override its
        settings (``alpha``, ``beta``, ``rescale``, ``p``, ``s_up``, ``s_down``, ``d``, ``s``, ``q``, ``w``,
        ``adain``, ``guidance``, ...).
        ``seed``: image i uses ``seed + i`` (None: a random seed, reported in ``Generation.seeds``).
        ``ip_scale``/``lora_scale``/``s_scale``: identity attention weight (0.8), adapter LoRA weight (1.0),
        Plus-v2 shortcut weight (1.0); with PuLID ``ip_scale`` is its ``id_scale`` (0.8) and the other two do not
        apply. ``pulid_mode``: PuLID's zero tokens + projection (``fidelity``: 8 + ORTHO_v2, the v1 default;
        ``style``: 16 + ORTHO; ``v1.1``: 20 + ORTHO_v2, the v1.1 default; ``plain``). ``id_mix``: PuLID v1 with
        several photos keeps all 10 tokens of every photo instead of 5 for the extra ones (upstream's "ID Mix").
        ``height``/``width``: default the preset's resolution. ``batch_size``: images per UNet batch (default
        all). ``callback(i, t, latents)`` runs after every sampler step.
        """
        ad = self.adapter_preset
        ip_scale = ad.ip_scale if ip_scale is None else _number("ip_scale", ip_scale)
        mode = self._pulid_settings(lora_scale, s_scale, pulid_mode, id_mix)
        if not self.is_pulid:  # PuLID has neither (checked above): recorded as None
            lora_scale = ad.lora_scale if lora_scale is None else _number("lora_scale", lora_scale)
            s_scale = ad.s_scale if s_scale is None else _number("s_scale", s_scale)
        prompts = _prompts(prompt, num_images)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        recipe = self._recipe_for(steps, sampler, sampler_params)
        dcg, am = resolve_method(method, recipe, adapter=ad, **method_options)
        height, width = _size(height, recipe.resolution, "height"), _size(width, recipe.resolution, "width")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor} (the VAE factor), got {height}x{width}")
        if seed is None:
            seed = secrets.randbelow(2**31)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - len(prompts):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        batch = len(prompts) if batch_size is None else batch_size
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

        person = self.identity(face)
        if self.is_pulid:  # the tokens stay fp32: PuLID's id_to_k/v run in fp32 (upstream)
            tokens, null_id = self.pulid_tokens(person, id_mix=id_mix)
        else:
            tokens = self.id_tokens(person, s_scale).to(self.dtype)
            null_id = self.null_tokens(s_scale).to(self.dtype)
        if negative_prompt is None and not self.text.force_zeros_for_empty_prompt:
            negative_prompt = ""
        null_text = None
        if negative_prompt is not None:
            neg = self.text.encode(prompts[0], negative_prompt)
            null_text = {"context": neg.negative_context.to(self.dtype),
                         "text_embeds": neg.negative_pooled.to(self.dtype)}
        encoded = {p: self.text.encode(p, with_negative=False) for p in dict.fromkeys(prompts)}  # one at a time
        if self.is_pulid:
            self.adapter_handle.set_mode(mode)
            pulid_used = self.adapter_handle.mode
        else:
            self._set_lora_scale(lora_scale)

        ts = torch.tensor(recipe.timesteps, dtype=torch.float32)
        seeds = [seed + i for i in range(len(prompts))]
        latents, pixels = [], []
        try:  # a PuLID mode is set for this call only: the UNet is left as it was
            attached = fastface.attach(self.unet, dcg=dcg, am=am, null_id=null_id, null_text=null_text, timesteps=ts)
            with attached as h:
                for start in range(0, len(prompts), batch):
                    idx = range(start, min(start + batch, len(prompts)))
                    ctx = torch.cat([encoded[prompts[i]].context for i in idx]).to(self.dtype)
                    pooled = torch.cat([encoded[prompts[i]].pooled for i in idx]).to(self.dtype)
                    n = len(idx)
                    time_ids = self.text.time_ids((height, width), batch=n).to(self.dtype)
                    id_tok = tokens.expand(n, -1, -1)

                    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                        return self.unet(x.to(self.dtype), t, ctx, text_embeds=pooled, time_ids=time_ids,
                                         id_tokens=id_tok, id_scale=ip_scale)

                    gens = [torch.Generator("cpu").manual_seed(seeds[i]) for i in idx]
                    shape = (1, self.unet.config.in_channels, height // factor, width // factor)
                    noise = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(self.device)
                    x = recipe.sampler_fn(model, noise, ts, generator=gens, callback=callback, **recipe.params)
                    latents.append(x.float().cpu())
                    pixels.append(self.vae.decode(x).float().cpu())
                evaluations = h.branch_evaluations / max(1, -(-len(prompts) // batch))
        finally:
            if self.is_pulid:
                self.adapter_handle.set_mode(ad.pulid_mode)
        pixels_t = torch.cat(pixels)
        images = [Image.fromarray(a.numpy()) for a in images_to_uint8(pixels_t)]
        settings = self._settings(recipe, method, method_options, dcg, am, person, negative_prompt, height, width,
                                  ip_scale, lora_scale, s_scale)
        if self.is_pulid:
            settings["pulid"] = {"version": self.adapter.version, "mode": mode, "num_zero": pulid_used.num_zero,
                                 "projection": pulid_used.projection, "id_mix": id_mix,
                                 "id_tokens": int(tokens.shape[1]), "alignment": person.alignment}
        return Generation(images, torch.cat(latents), pixels_t, seeds, prompts, settings, evaluations)

    def _pulid_settings(self, lora_scale: Any, s_scale: Any, pulid_mode: Any, id_mix: Any) -> str | None:
        """Check the adapter-specific options of a call; returns the PuLID mode name (None for the IP-Adapters)."""
        if not isinstance(id_mix, bool):
            raise ValueError(f"id_mix must be True or False, got {id_mix!r}")
        name = self.adapter_preset.name
        if not self.is_pulid:
            if pulid_mode is not None or id_mix:
                raise ValueError(f"pulid_mode and id_mix are PuLID settings; adapter {name!r} does not use them")
            return None
        for option, value in (("lora_scale", lora_scale), ("s_scale", s_scale)):
            if value is not None:
                raise ValueError(f"{option} is an IP-Adapter setting; PuLID ({name!r}) has no LoRA and no shortcut "
                                 "(its identity weight is ip_scale, its variants are pulid_mode)")
        mode = self.adapter_preset.pulid_mode if pulid_mode is None else pulid_mode
        if mode not in PULID_MODES:
            raise ValueError(f"unknown PuLID mode {mode!r}; known: {', '.join(sorted(PULID_MODES))}")
        if id_mix and self.adapter.version != "v1":
            raise ValueError(f"id_mix is a PuLID v1 option; {name!r} ({self.adapter.version}) always encodes all "
                             "photos together")
        return mode

    def _settings(self, recipe, method, options, dcg, am, person, negative, height, width, ip, lora, s) -> dict:
        n = recipe.steps
        alphas, betas = dcg.coefficients(n)
        resolved: dict[str, Any] = {"dcg": {"variant": dcg.variant, "alpha": alphas, "beta": betas,
                                            "rescale": dcg.rescale}}
        if am is not None:
            resolved["am"] = {"type": type(am).__name__, **_jsonable(am)}
            if hasattr(am, "steps"):  # AM2: the per-step (d, s, q, w) actually used
                resolved["am"]["per_step"] = _jsonable(am.steps(n))
        if isinstance(person, PuLIDIdentity):
            cond = person.id_cond.detach().float().cpu().numpy()
            face = {"source": person.source, "id_cond_sha256": hashlib.sha256(cond.tobytes()).hexdigest(),
                    "photos": person.num_images}
        else:
            emb = np.array(person.embedding, dtype=np.float32)
            face = {"source": person.source, "embedding_sha256": hashlib.sha256(emb.tobytes()).hexdigest(),
                    "crops": len(person.crops)}
        return {
            "fastface_version": fastface.__version__,
            "preset": recipe.preset, "adapter": self.adapter_preset.name, "method": method,
            "method_options": _jsonable(dict(options)), "resolved": _jsonable(resolved),
            "steps": n, "sampler": recipe.sampler, "sampler_params": _jsonable(recipe.params),
            "spacing": recipe.spacing, "timesteps": list(recipe.timesteps), "height": height, "width": width,
            "negative_prompt": negative, "ip_scale": ip, "lora_scale": lora, "s_scale": s,
            "distilled_lora_scale": recipe.lora_scale, "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device.type, "seed_rule": "image i uses seed + i",
            "face": face,
            "weights": dict(self.components.sources),
        }


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def _size(value: int | None, default: int, name: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 8:
        raise ValueError(f"{name} must be an integer >= 8, got {value!r}")
    return value


def _prompts(prompt: str | Sequence[str], num_images: int) -> list[str]:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    items = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else None
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return [p for p in items for _ in range(num_images)]
