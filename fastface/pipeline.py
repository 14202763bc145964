"""The FastFace pipeline: face photo(s) or a precomputed identity + a prompt -> images (``fastface.Pipeline``).

::

    pipe = fastface.Pipeline.from_pretrained("hyper", adapter="faceid-plusv2", download=True)
    out = pipe("a photo of a person as an astronaut", face="me.jpg", method="fastface-am1", seed=42)
    out.images[0].save("out.png")            # or out.save(0, "out.png"): PNG with all settings in its metadata

The pipeline loads the parts of a model preset (:mod:`fastface.presets`, :mod:`fastface.components`), installs
the registered identity adapter named by ``adapter`` (:mod:`fastface.adapters.registry`), and at each call attaches
the method's DCG/AM hooks (:func:`fastface.attach`) for the duration of the call only, so the UNet is left as it
was. Everything adapter-specific (face inputs, identity tokens and the null identity of DCG, its options, its PNG
metadata) is asked of the adapter (:class:`fastface.adapters.base.IdentityAdapter`).
Image ``i`` of a call is drawn from its own generator seeded with ``seed + i`` (initial noise and every later
sampler draw), and text and identity are encoded per image, so an image does not depend on how many others are
generated with it (the batch size).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import fastface
from fastface.adapters.base import FacePreparer, FaceSettings
from fastface.adapters.registry import AdapterEntry, get_entry, option_owners, unknown_option_error
from fastface.components import Components, LocalPaths, load_components, resolve_sources
from fastface.devices import resolve_device
from fastface.face_files import FaceInput
from fastface.generation import METADATA_KEY, Generation, jsonable
from fastface.models.vae import images_to_uint8
from fastface.presets import DEFAULT_METHOD, ModelRecipe, get_model_preset, model_recipe, resolve_method
from fastface.stages import check_vae_tile, decode_tile, stage, unet_caller
from fastface.steps import check_scale

logger = logging.getLogger(__name__)

__all__ = ["Pipeline", "Generation", "FaceInput", "parse_dtype", "METADATA_KEY"]

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


def resolve_fuse_adapter_lora(fuse: bool | None, device: torch.device) -> bool:
    """Whether an adapter's own LoRA is precomputed into the weights: ``fuse`` when given, else only off the CPU.

    Fusing saves the LoRA's two low-rank GEMMs per projection (at rank 128, 20-40 % more FLOPs on a 1280/640-wide
    projection). It writes ``W + ΔW`` into the projections in place and keeps the originals in host memory for the
    exact ``remove()`` / ``lora_scale`` change (SDXL fp32 ~3.8 GB, fp16 ~1.9 GB): no extra memory on an
    accelerator, one more copy of those weights on the CPU. Measured at the real shapes on a 2-core CPU (256 px,
    fp32): fused was as fast for baseline and am1 and 6-9 % faster for fastface-am1, at a peak memory 19 % above
    the unfused pipeline's, which is below diffusers'. So the CPU, where memory is the limit, defaults to unfused;
    an accelerator, where the UNet is compute-bound and the copy stays in host memory, to fused.
    """
    if fuse is not None:
        if not isinstance(fuse, bool):
            raise TypeError(f"fuse_adapter_lora must be True, False or None (automatic), got {fuse!r}")
        return fuse
    return torch.device(device).type != "cpu"


class Pipeline:
    """A loaded FastFace pipeline: the UNet with the identity adapter installed, text encoders, VAE.

    Build it with :meth:`from_pretrained`; call it to generate. ``unet_evaluations`` of each call counts the
    UNet batch entries per image (the official implementation spends 3 per step on every method).
    ``identity_adapter`` is the loaded adapter (:class:`~fastface.adapters.base.IdentityAdapter`), ``adapter`` its
    weights object, ``adapter_handle`` its installation; attributes the pipeline lacks are the identity adapter's
    (e.g. ``pipe.id_tokens`` of the FaceID adapters).
    """

    def __init__(self, components: Components, recipe: ModelRecipe, adapter: AdapterEntry, *, device: torch.device,
                 dtype: torch.dtype, fuse_adapter_lora: bool | None = None, custom_weights: bool = False,
                 compile: bool | Mapping[str, Any] = False, offload: bool = False, vae_tile: int | None = None) -> None:
        self.components = components
        self.unet, self.text, self.vae = components.unet, components.text, components.vae
        self.identity_adapter = components.adapter
        self.adapter = getattr(self.identity_adapter, "model", self.identity_adapter)
        self.image_encoder = getattr(self.identity_adapter, "image_encoder", None)  # an adapter's, if it has one
        self.recipe, self.adapter_entry, self.adapter_preset = recipe, adapter, adapter.preset
        self.device, self.dtype = device, dtype
        self._custom_weights = custom_weights
        self.fuse_adapter_lora = resolve_fuse_adapter_lora(fuse_adapter_lora, device)
        self.adapter_handle = self.identity_adapter.install(self.unet, fuse=self.fuse_adapter_lora)
        self.offload, self.vae_tile = bool(offload), check_vae_tile(vae_tile)
        self.unet_call = unet_caller(self.unet, compile)  # the UNet, or its compiled module (hooks stay on the UNet)

    def __getattr__(self, name: str) -> Any:
        adapter = self.__dict__.get("identity_adapter")
        if adapter is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(adapter, name)

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
        face_root: str | os.PathLike | None = None,
        fuse_adapter_lora: bool | None = None,
        compile: bool | Mapping[str, Any] = False,
        offload: bool = False,
        vae_tile: int | None = None,
        **recipe_overrides: Any,
    ) -> Pipeline:
        """Load a model preset (hyper, lightning, lcm, turbo, tcd) with a registered identity adapter (the names
        of :data:`fastface.presets.ADAPTER_PRESETS`).

        ``steps``: the step count the distilled weights are chosen for (hyper and lightning ship one file per
        count; default the preset's, 4). ``dtype``: fp16/bf16/fp32 (default fp16 on CUDA, else fp32). Weights are
        found in the Hugging Face cache, and downloaded into it only with ``download=True`` (needs the ``hub``
        extra). Overrides: ``base`` (diffusers SDXL folder or repo id: text encoders, VAE, UNet config),
        ``unet`` (UNet folder or file), ``weights`` (the distilled LoRA file, or lightning's UNet file),
        ``vae`` (folder, file or repo id), ``adapter_file``, ``face_root`` (insightface folder with
        ``models/<pack>``, default ``~/.insightface``; with ``download`` a missing pack is fetched from the
        insightface releases). ``fuse_adapter_lora``: True precomputes an adapter's LoRA into the
        projections (fewer FLOPs; the original projections kept in host memory; a new ``lora_scale`` re-fuses),
        False computes it beside each projection as diffusers does; default (None): fused on an accelerator,
        unfused on the CPU (see :func:`resolve_fuse_adapter_lora`). ``compile``: the UNet through
        :func:`fastface.compile_unet` (True, or a dict of :func:`torch.compile` arguments); ``offload``: parts on
        the CPU, each on ``device`` only in use; ``vae_tile``: decode tile in latents (0: never; default tiles above
        1024 px); see :mod:`fastface.stages`.
        ``recipe_overrides``: the adapter's load options (local files it uses, e.g. ``image_encoder``, ``eva``; see
        its ``options``) and model recipe fields (``sampler``, ``sampler_params``, ``spacing``, ``resolution``,
        ``guidance``, ``lora_scale``, ...).
        """
        dev = resolve_device(device)  # an unusable device fails here, before any file is opened
        dt = parse_dtype(dtype, dev)
        check_vae_tile(vae_tile)
        entry = get_entry(adapter)
        mine = {k: o for o in entry.adapter.load_options() for k in o.keywords}
        files = {mine[k].name: mine[k].parse(v) for k, v in recipe_overrides.items() if k in mine and v is not None}
        recipe_overrides = {k: v for k, v in recipe_overrides.items() if k not in mine}
        for k, v in list(recipe_overrides.items()):
            if option_owners(k):
                if v is not None:
                    raise unknown_option_error(entry.name, k)
                del recipe_overrides[k]
        if weights is not None:
            recipe_overrides["weights"] = Path(os.path.expanduser(os.fspath(weights)))
        recipe = model_recipe(preset, steps, **recipe_overrides)
        paths = LocalPaths(base, unet, weights, vae, adapter_file)
        home = torch.device("cpu") if offload else dev  # offload: every part waits on the CPU between its stages
        faces = FaceSettings(face_root, download, cache_dir, home, files)
        src = resolve_sources(recipe, entry, paths, files, half=dt != torch.float32, download=download,
                              cache_dir=cache_dir, also=entry.adapter.face_needs(entry.preset, faces))
        components = load_components(recipe, entry, src, dtype=dt, device=home, faces=faces)
        logger.info("loaded %s + %s (%s, %s) from %s", recipe.preset, entry.name, dt, home, components.sources)
        return cls(components, recipe, entry, device=dev, dtype=dt, fuse_adapter_lora=fuse_adapter_lora,
                   custom_weights=weights is not None, compile=compile, offload=offload, vae_tile=vae_tile)

    # -- identity -----------------------------------------------------------------------------------------------

    def identity(self, face: FaceInput) -> Any:
        """One person, as the adapter prepares it from photos, face files or precomputed inputs (a
        :class:`~fastface.adapters.faces.FaceInfo` for the FaceID adapters)."""
        return self.identity_adapter.prepare(face)

    def use_face_preparer(self, preparer: FacePreparer) -> None:
        """Use an already opened face preparation (e.g. the CLI's, which checked the faces before loading)."""
        self.identity_adapter.use_preparer(preparer)

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

    def split_options(self, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(adapter options, method options) of a call's keyword options: names any registered adapter has go to
        the adapter (which refuses another adapter's), the rest to the method."""
        adapter = {k: v for k, v in options.items() if option_owners(k)}
        return adapter, {k: v for k, v in options.items() if k not in adapter}

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
        num_images: int = 1,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int | None = None,
        sampler: str | None = None,
        sampler_params: Mapping[str, Any] | None = None,
        callback: Callable[[int, float, torch.Tensor], None] | None = None,
        **method_options: Any,
    ) -> Generation:
        """Generate ``num_images`` images per prompt of the person in ``face``.

        ``face``: what the adapter takes (see :meth:`identity`): photo path(s), PIL image(s), uint8 array(s), face
        files, precomputed identities, or a list of these (one person).
        ``method``: baseline, dcg, am1, am2, fastface-am1 (default), fastface-am2.
        ``method_options``: the adapter's options (e.g. ``lora_scale``, ``s_scale``, ``mode``, ``id_mix``: see
        ``pipe.identity_adapter.options``) and overrides of the method's settings (``alpha``, ``beta``,
        ``rescale``, ``p``, ``s_up``, ``s_down``, ``d``, ``s``, ``q``, ``w``, ``adain``, ``guidance``, ...).
        ``seed``: image i uses ``seed + i`` (None: a random seed, reported in ``Generation.seeds``).
        ``ip_scale``: identity attention weight (default the adapter preset's, 0.8).
        ``height``/``width``: default the preset's resolution. ``batch_size``: images per UNet batch (default
        all). ``callback(i, t, latents)`` runs after every sampler step.
        """
        ip_scale = self.adapter_preset.ip_scale if ip_scale is None else check_scale("ip_scale", ip_scale)
        given, method_options = self.split_options(method_options)
        name = self.adapter_entry.name
        options = self.identity_adapter.resolve_options(self.adapter_preset, given,
                                                        lambda k: unknown_option_error(name, k))
        prompts = _prompts(prompt, num_images)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        recipe = self._recipe_for(steps, sampler, sampler_params)
        dcg, am = resolve_method(method, recipe, adapter=self.adapter_preset, **method_options)
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

        with self._stage(self.identity_adapter.offload_modules):
            person = self.identity(face)
            tokens, null_id = (t.to(self.device) for t in self.identity_adapter.tokens(person, options, self.dtype))
        if negative_prompt is None and not self.text.force_zeros_for_empty_prompt:
            negative_prompt = ""
        null_text = None
        with self._stage(lambda: [self.text.encoder_1, self.text.encoder_2]):
            if negative_prompt is not None:
                neg = self.text.encode(prompts[0], negative_prompt)
                null_text = {"context": neg.negative_context.to(self.dtype),
                             "text_embeds": neg.negative_pooled.to(self.dtype)}
            encoded = {p: self.text.encode(p, with_negative=False) for p in dict.fromkeys(prompts)}  # one at a time
        undo = self.identity_adapter.configure(self.adapter_handle, options)
        adapter_settings = self.identity_adapter.metadata(person, options, tokens, self.adapter_handle)

        ts = torch.tensor(recipe.timesteps, dtype=torch.float32)
        seeds = [seed + i for i in range(len(prompts))]
        latents: list[torch.Tensor] = []
        try:  # call-only adapter settings are undone after the call: the UNet is left as it was
            with self._stage(lambda: self.unet), fastface.attach(
                    self.unet, dcg=dcg, am=am, null_id=null_id, null_text=null_text, timesteps=ts) as h:
                for start in range(0, len(prompts), batch):
                    idx = range(start, min(start + batch, len(prompts)))
                    ctx = torch.cat([encoded[prompts[i]].context for i in idx]).to(self.dtype)
                    pooled = torch.cat([encoded[prompts[i]].pooled for i in idx]).to(self.dtype)
                    n = len(idx)
                    time_ids = self.text.time_ids((height, width), batch=n).to(self.device, self.dtype)
                    id_tok = tokens.expand(n, -1, -1)

                    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                        return self.unet_call(x.to(self.dtype), t, ctx, text_embeds=pooled, time_ids=time_ids,
                                              id_tokens=id_tok, id_scale=ip_scale)

                    gens = [torch.Generator("cpu").manual_seed(seeds[i]) for i in idx]
                    shape = (1, self.unet.config.in_channels, height // factor, width // factor)
                    noise = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(self.device)
                    x = recipe.sampler_fn(model, noise, ts, generator=gens, callback=callback, **recipe.params)
                    latents.append(x)
                evaluations = h.branch_evaluations / max(1, -(-len(prompts) // batch))
        finally:
            undo()
        tile = decode_tile(height, width, factor, self.vae_tile)
        with self._stage(lambda: self.vae):
            pixels_t = torch.cat([self.vae.decode(x, tile=tile).float().cpu() for x in latents])
        images = [Image.fromarray(a.numpy()) for a in images_to_uint8(pixels_t)]
        if tile is not None:
            adapter_settings["vae_tile"] = tile  # recorded only when tiled: every untiled image's settings as before
        settings = self._settings(recipe, method, method_options, dcg, am, person, negative_prompt, height, width,
                                  ip_scale, adapter_settings)
        latents_t = torch.cat([x.float().cpu() for x in latents])
        return Generation(images, latents_t, pixels_t, seeds, prompts, settings, evaluations)

    def _stage(self, modules: Callable[[], Any]):  # with offload, modules() run on the device inside the block
        return stage(modules, self.device, self.offload)

    def _settings(self, recipe, method, options, dcg, am, person, negative, height, width, ip, adapter) -> dict:
        n = recipe.steps
        alphas, betas = dcg.coefficients(n)
        resolved: dict[str, Any] = {"dcg": {"variant": dcg.variant, "alpha": alphas, "beta": betas,
                                            "rescale": dcg.rescale}}
        if am is not None:
            resolved["am"] = {"type": type(am).__name__, **jsonable(am)}
            if hasattr(am, "steps"):  # AM2: the per-step (d, s, q, w) actually used
                resolved["am"]["per_step"] = jsonable(am.steps(n))
        return {
            "fastface_version": fastface.__version__,
            "preset": recipe.preset, "adapter": self.adapter_preset.name, "method": method,
            "method_options": jsonable(dict(options)), "resolved": jsonable(resolved),
            "steps": n, "sampler": recipe.sampler, "sampler_params": jsonable(recipe.params),
            "spacing": recipe.spacing, "timesteps": list(recipe.timesteps), "height": height, "width": width,
            "negative_prompt": negative, "ip_scale": ip, **adapter,
            "distilled_lora_scale": recipe.lora_scale, "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device.type, "seed_rule": "image i uses seed + i",
            "face": self.identity_adapter.describe(person),
            "weights": {**self.components.sources, **self.identity_adapter.sources},
        }


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
