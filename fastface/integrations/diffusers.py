"""FastFace as a drop-in for diffusers: ``handle = enable(pipe, method="fastface-am1")`` on your own SDXL pipeline.

The pipeline keeps everything the user set up: the IP-Adapter FaceID / FaceID-Plus-v2 loaded by diffusers'
``load_ip_adapter`` (its FaceID LoRA loaded by diffusers too), the scheduler, other LoRAs. :func:`enable` adds:

- **DCG** through :func:`fastface.attach` on ``pipe.unet`` with the :data:`~fastface.integrations.DIFFUSERS_UNET` call
  spec: the identity conditioning is ``added_cond_kwargs["image_embeds"]``, its null the adapter's input for a
  zero face embedding (FaceID-Plus-v2: with the CLIP features of a zero image). Plus-v2's CLIP features live on
  diffusers' projection layer (``clip_embeds``), not in the call: a pre-hook packs them with the embeddings, so
  the guidance branches carry their own, and a pre-hook on ``encoder_hid_proj`` unpacks them per call.
- **AM** through hook points (``probs``, ``head_out``) on diffusers' own IP-Adapter attention processors:
  each ``IPAdapterAttnProcessor(2_0)`` is swapped for :class:`FastFaceIPAdapterProcessor`, which shares its
  ``to_k_ip``/``to_v_ip`` modules and its ``scale`` and computes the identity map explicitly.
- **Step schedule**: at every UNet call the schedule is ``pipe.scheduler.timesteps`` (re-announced when the
  scheduler sets new timesteps), so each call's step is its timestep's position there and unused branches are
  skipped as in :class:`fastface.Pipeline`.

``handle.remove()`` (or leaving ``with enable(...)``) restores the original processors and removes every hook:
the pipeline's outputs are then bit-identical to before. diffusers is imported here only, never by
``import fastface``. Tested on diffusers 0.31.0 to 0.42.1 (:data:`TESTED_DIFFUSERS`).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
)
from diffusers.models.embeddings import (
    IPAdapterFaceIDImageProjection,
    IPAdapterFaceIDPlusImageProjection,
    MultiIPAdapterImageProjection,
)
from torch import nn

import fastface
from fastface.am import AM2Config
from fastface.hooks import FastFace
from fastface.integrations import DIFFUSERS_UNET
from fastface.models.attention import HookPoint, merge_heads, split_heads

logger = logging.getLogger(__name__)

__all__ = [
    "DiffusersFastFace", "FastFaceIPAdapterProcessor", "SUPPORTED_ADAPTERS", "TESTED_DIFFUSERS", "enable", "face_inputs",
    "null_identity", "null_text", "version_tested",
]

# The diffusers releases the drop-in's parity tests passed on: the newest in CI, the official FastFace pin by
# benchmarks/check_diffusers_version.py. enable() logs a warning outside this range.
TESTED_DIFFUSERS = ("0.31.0", "0.42.1")
ID_PATH = "added_cond_kwargs.image_embeds"
# diffusers' projection class of each supported adapter -> fastface's adapter preset name
SUPPORTED_ADAPTERS = {
    IPAdapterFaceIDImageProjection: "faceid",
    IPAdapterFaceIDPlusImageProjection: "faceid-plusv2",
}
_SUPPORTED_TEXT = "IP-Adapter FaceID (ip-adapter-faceid_sdxl) and FaceID-Plus-v2 (ip-adapter-faceid-plusv2_sdxl)"
_ENABLED: weakref.WeakKeyDictionary[nn.Module, DiffusersFastFace] = weakref.WeakKeyDictionary()


class FastFaceIPAdapterProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IP-Adapter attention processor with fastface's hook points on the identity branch.

    Wraps one ``IPAdapterAttnProcessor``/``IPAdapterAttnProcessor2_0``: shares its ``to_k_ip``/``to_v_ip``
    modules (same parameter names, so ``state_dict`` keys are unchanged) and reads and writes its ``scale`` (so
    ``pipe.set_ip_adapter_scale`` keeps working). Text attention as diffusers computes it (SDPA); the identity map
    ``softmax(q K'^T / sqrt(d))`` [B, H, N, K] passes through ``probs`` and the per-head output [B, H, N, d] through
    ``head_out(o, a, v)``, the contract :func:`fastface.attach`'s AM hooks expect.
    """

    def __init__(self, original: IPAdapterAttnProcessor | IPAdapterAttnProcessor2_0) -> None:
        nn.Module.__init__(self)  # not the parent's __init__: it would allocate new identity weights
        if len(original.to_k_ip) != 1:
            raise ValueError(
                f"FastFace supports one IP-Adapter at a time; this pipeline has {len(original.to_k_ip)} loaded "
                "(pipe.unload_ip_adapter() and load one FaceID / FaceID-Plus-v2 adapter)"
            )
        self.__dict__["original"] = original  # a plain attribute: not a submodule (no duplicate state_dict keys)
        self.hidden_size, self.cross_attention_dim = original.hidden_size, original.cross_attention_dim
        self.num_tokens = original.num_tokens
        self.to_k_ip, self.to_v_ip = original.to_k_ip, original.to_v_ip
        self.probs = HookPoint()
        self.head_out = HookPoint()

    @property
    def scale(self) -> list:  # type: ignore[override]
        return self.original.scale

    @scale.setter
    def scale(self, value: list) -> None:
        self.original.scale = value

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if ip_adapter_masks is not None:
            raise ValueError("FastFace's attention manipulation does not support ip_adapter_masks; drop the masks")
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError(
                "FastFaceIPAdapterProcessor expects encoder_hidden_states = (text, [identity tokens]) as diffusers' "
                "UNet passes them with an IP-Adapter loaded"
            )
        context, ip_states = encoder_hidden_states
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b4, c4, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(b4, c4, h4 * w4).transpose(1, 2)
        batch = context.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = split_heads(attn.to_q(hidden_states), attn.heads)  # [B, H, N, d]
        k = split_heads(attn.to_k(context), attn.heads)
        v = split_heads(attn.to_v(context), attn.heads)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)  # [B, H, N, d]
        out = merge_heads(o).to(q.dtype)
        s = self.scale[0]
        if not (all(x == 0 for x in s) if isinstance(s, list) else s == 0):  # diffusers skips a zero scale
            if isinstance(s, list):
                if len(s) != 1:
                    raise ValueError("per-image IP-Adapter scales need masks, which FastFace's AM does not support")
                s = s[0]
            tokens = ip_states[0]  # [B, images, K, C] -> [B, images*K, C] as diffusers' view does
            tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
            k_ip = split_heads(self.to_k_ip[0](tokens), attn.heads)  # [B, H, K, d]
            v_ip = split_heads(self.to_v_ip[0](tokens), attn.heads)
            a = torch.softmax(q @ k_ip.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # [B, H, N, K]
            o_id = self.head_out(self.probs(a) @ v_ip, a, v_ip)  # [B, H, N, d]
            out = out + s * merge_heads(o_id).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b4, c4, h4, w4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string ("0.43.0.dev0" -> (0, 43, 0))."""
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit()) if p[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def version_tested(version: str | None = None) -> bool:
    """Whether a diffusers version (default the installed one) lies in :data:`TESTED_DIFFUSERS`."""
    import diffusers

    v = _release(version or diffusers.__version__)
    return _release(TESTED_DIFFUSERS[0]) <= v <= _release(TESTED_DIFFUSERS[1])


def _projection(pipe: Any) -> nn.Module:
    """The pipeline's one supported IP-Adapter projection layer, or a clear error."""
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise ValueError(f"enable() needs a diffusers StableDiffusionXLPipeline, got {type(pipe).__name__}")
    proj = getattr(unet, "encoder_hid_proj", None)
    if not isinstance(proj, MultiIPAdapterImageProjection) or unet.config.encoder_hid_dim_type != "ip_image_proj":
        raise ValueError(
            "no IP-Adapter is loaded in this pipeline: load one first, e.g. pipe.load_ip_adapter("
            "'h94/IP-Adapter-FaceID', subfolder=None, weight_name='ip-adapter-faceid-plusv2_sdxl.bin', "
            f"image_encoder_folder=None). Supported: {_SUPPORTED_TEXT}"
        )
    layers = list(proj.image_projection_layers)
    if len(layers) != 1:
        raise ValueError(f"FastFace supports one IP-Adapter at a time; {len(layers)} are loaded")
    if type(layers[0]) not in SUPPORTED_ADAPTERS:
        raise ValueError(
            f"unsupported IP-Adapter kind ({type(layers[0]).__name__}); FastFace supports {_SUPPORTED_TEXT}"
        )
    return layers[0]


@torch.no_grad()
def _clip_features(encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Penultimate hidden states [B, T, D] of a transformers CLIP vision model (what diffusers' encode_image uses)."""
    p = next(encoder.parameters())
    return encoder(pixels.to(p.device, p.dtype), output_hidden_states=True).hidden_states[-2]


def _image_size(encoder: nn.Module) -> int:
    return int(encoder.config.image_size)


def null_identity(pipe: Any, null_clip_embeds: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """DCG's null identity for the pipeline's adapter, in the form ``added_cond_kwargs["image_embeds"][0]`` takes.

    FaceID: a zero embedding [1, 1, 512]. FaceID-Plus-v2: (zero embedding, CLIP features of a zero image
    [1, 1, T, D]) through ``pipe.image_encoder``, or ``null_clip_embeds`` when given ([T, D], [1, T, D] or
    [1, 1, T, D]).
    """
    proj = _projection(pipe)
    p = next(proj.parameters())
    zero = torch.zeros(1, 1, 512, device=p.device, dtype=p.dtype)
    if not isinstance(proj, IPAdapterFaceIDPlusImageProjection):
        return zero
    if null_clip_embeds is None:
        encoder = getattr(pipe, "image_encoder", None)
        if encoder is None:
            raise ValueError(
                "FaceID-Plus-v2's null identity needs the CLIP features of a zero image, and this pipeline has no "
                "image encoder: load it (pipe.load_ip_adapter(..., image_encoder_folder=...)), or pass "
                "enable(pipe, null_clip_embeds=features) computed with your CLIP ViT-H/14"
            )
        s = _image_size(encoder)
        null_clip_embeds = _clip_features(encoder, torch.zeros(1, 3, s, s))  # diffusers: zeros_like(pixel_values)
    c = torch.as_tensor(null_clip_embeds)
    while c.ndim < 4:
        c = c.unsqueeze(0)
    if c.shape[:2] != (1, 1):
        raise ValueError(f"null_clip_embeds must be one image's CLIP features [T, D], got shape {tuple(c.shape)}")
    return zero, c.to(p.device, p.dtype)


def face_inputs(
    pipe: Any,
    face: Any,
    *,
    image: np.ndarray | None = None,
    s_scale: float = 1.0,
) -> dict[str, Any]:
    """What ``pipe(...)`` needs for one person: returns ``{"ip_adapter_image_embeds": [embeds [1, 1, 512]]}``.

    ``face``: a :class:`fastface.adapters.faces.FaceInfo` (embedding and, for Plus-v2, aligned crops), an
    insightface face (``normed_embedding``, ``kps``; pass the BGR ``image`` it was found in, which is cropped with
    insightface's ``norm_crop`` at 224 as the FaceID-Plus-v2 card does) or a 512-d embedding (FaceID only).
    For FaceID-Plus-v2 this also sets the projection layer's ``clip_embeds`` (CLIP features of the crop, mean over
    several crops, through ``pipe.image_encoder``), ``shortcut = True`` and ``shortcut_scale = s_scale``, the way
    diffusers expects them ([1, 1, T, D]). The pipeline repeats the embeddings for every prompt and image of a call;
    under :func:`enable` the CLIP features are repeated likewise (plain diffusers needs ``clip_embeds`` with one row
    per image of the batch).
    """
    from fastface.adapters.faces import FaceInfo
    from fastface.models.clip_vision import clip_preprocess

    proj = _projection(pipe)
    plus = isinstance(proj, IPAdapterFaceIDPlusImageProjection)
    if hasattr(face, "normed_embedding") and not isinstance(face, FaceInfo):  # an insightface Face
        crop = None
        if plus:
            if image is None:
                raise ValueError("an insightface face needs the image it was detected in: face_inputs(pipe, face, "
                                 "image=bgr_array)")
            from insightface.utils import face_align

            crop = face_align.norm_crop(np.asarray(image), landmark=face.kps, image_size=224)
        face = FaceInfo.from_embedding(np.asarray(face.normed_embedding, dtype=np.float32), crop=crop)
    elif not isinstance(face, FaceInfo):
        face = FaceInfo.from_embedding(np.asarray(face, dtype=np.float32))
    p = next(proj.parameters())
    emb = torch.from_numpy(np.array(face.embedding, dtype=np.float32)).reshape(1, 1, -1)
    embeds = emb.to(p.device, p.dtype)
    if plus:
        encoder = getattr(pipe, "image_encoder", None)
        if not face.crops:
            raise ValueError("FaceID-Plus-v2 needs the aligned face crop as well as the embedding (a FaceInfo with "
                             "a crop, or an insightface face with its image)")
        if encoder is None:
            raise ValueError("FaceID-Plus-v2 needs pipe.image_encoder for the crop's CLIP features: load it with "
                             "pipe.load_ip_adapter(..., image_encoder_folder=...)")
        s = _image_size(encoder)
        feats = _clip_features(encoder, clip_preprocess(list(face.crops), size=s, crop_size=s))
        clip = feats.mean(dim=0, keepdim=True)[:, None]  # [1, 1, T, D]
        proj.clip_embeds = clip.to(p.device, p.dtype)
        proj.shortcut, proj.shortcut_scale = True, float(s_scale)
    return {"ip_adapter_image_embeds": [embeds]}


@torch.no_grad()
def null_text(pipe: Any) -> dict[str, torch.Tensor] | None:
    """DCG's null text: None (zeros) when the pipeline zeroes an empty prompt (SDXL's ``force_zeros_for_empty_prompt``,
    as diffusers' own CFG does), else the pipeline's encoding of the empty prompt."""
    if getattr(pipe.config, "force_zeros_for_empty_prompt", True):
        return None
    context, _, pooled, _ = pipe.encode_prompt("", device=pipe._execution_device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    return {"encoder_hidden_states": context, "added_cond_kwargs.text_embeds": pooled}


class DiffusersFastFace:
    """The handle :func:`enable` returns: ``.remove()`` (also a context manager) restores the pipeline exactly.

    ``branch_evaluations``: UNet evaluations per image since enabling (or :meth:`reset_stats`), summed over the
    UNet calls; ``fastface`` is the underlying :class:`fastface.FastFace` handle.
    """

    def __init__(self, pipe: Any, fastface_handle: FastFace, dcg: Any, am: Any,
                 swapped: dict[str, nn.Module] | None) -> None:
        self.pipe, self.unet, self.fastface = pipe, pipe.unet, fastface_handle
        self.dcg, self.am = dcg, am
        self._originals = swapped
        self._schedule: torch.Tensor | None = None
        self._host_ts: torch.Tensor | None = None
        self._signature = inspect.signature(self.unet.forward)
        self._hooks = [
            self.unet.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
            self.unet.encoder_hid_proj.register_forward_pre_hook(self._unpack),
            self.unet.encoder_hid_proj.register_forward_hook(self._restore_clip),
        ]
        self._saved_clip: Any = None

    @property
    def branch_evaluations(self) -> int:
        return self.fastface.branch_evaluations

    def reset_stats(self) -> None:
        self.fastface.reset_stats()

    # -- per-call ---------------------------------------------------------------------------------------------

    def _announce(self) -> None:
        """Take the schedule from the pipeline's scheduler when it sets new timesteps (sampling starts)."""
        sched = self.pipe.scheduler
        ts = getattr(sched, "timesteps", None)
        if ts is None:
            raise ValueError("the pipeline's scheduler has no timesteps: call pipe(...) (it sets them) or "
                             "pipe.scheduler.set_timesteps(n) before calling the UNet")
        if ts is self._schedule:
            return
        if getattr(sched, "order", 1) != 1:
            raise ValueError(
                f"{type(sched).__name__} evaluates the UNet {sched.order} times per step; FastFace's per-step "
                "schedules need one evaluation per step (DDIM, Euler, Euler ancestral, LCM, TCD, DPM++ 2M, ...)"
            )
        self.fastface.set_timesteps(ts)
        self._schedule = ts
        self._host_ts = torch.as_tensor(ts).detach().to("cpu", torch.float64).reshape(-1)

    def _check_cfg(self) -> None:
        try:
            cfg = bool(self.pipe.do_classifier_free_guidance)
        except AttributeError:  # outside a pipeline call
            return
        n = self.fastface.num_steps or 1
        keep_all = isinstance(self.am, AM2Config)
        trivial = all(len(b) == 1 and b[0].has_text and b[0].has_id for b in self.dcg.needed(n, keep_all))
        if cfg and not trivial:
            raise ValueError(
                "the pipeline's classifier-free guidance is on (guidance_scale > 1) together with FastFace's DCG, "
                "which does the guidance itself: call pipe(..., guidance_scale=0); the method's alpha/beta (or "
                "'guidance' for baseline/am1/am2, enable(pipe, method, guidance=g)) set its strength"
            )

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._announce()
        self._check_cfg()
        bound = self._signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        added = dict(arguments.get("added_cond_kwargs") or {})
        embeds = added.get("image_embeds")
        if not isinstance(embeds, (list, tuple)) or len(embeds) != 1 or not torch.is_tensor(embeds[0]):
            raise ValueError(
                "FastFace needs the identity as pipe(..., ip_adapter_image_embeds=[embeds]) (one tensor [B, 1, 512]; "
                "fastface.integrations.diffusers.face_inputs(pipe, face) builds it)"
            )
        x = arguments["sample"]
        e = embeds[0]
        if e.shape[0] == 1 and x.shape[0] > 1:  # one identity for every prompt of the batch
            e = e.expand(x.shape[0], *e.shape[1:])
        proj = self.unet.encoder_hid_proj.image_projection_layers[0]
        if isinstance(proj, IPAdapterFaceIDPlusImageProjection):
            clip = proj.clip_embeds
            if clip is None:
                raise ValueError("FaceID-Plus-v2 needs the CLIP features of the face crop on the projection layer: "
                                 "use fastface.integrations.diffusers.face_inputs(pipe, face)")
            if clip.shape[0] == 1 and e.shape[0] > 1:
                clip = clip.expand(e.shape[0], *clip.shape[1:])
            elif clip.shape[0] != e.shape[0]:
                raise ValueError(f"the projection layer's clip_embeds have batch {clip.shape[0]} but the call has "
                                 f"{e.shape[0]} identity embeddings: set one image's features (face_inputs does)")
            e = (e, clip)  # packed: the guidance branches carry their own CLIP features
        added["image_embeds"] = [e]
        arguments["added_cond_kwargs"] = added
        t = arguments.get("timestep")
        new = inspect.BoundArguments(self._signature, arguments)  # type: ignore[arg-type]
        new_kwargs = dict(new.kwargs)
        t = arguments.get("timestep")
        if isinstance(t, torch.Tensor) and t.device.type != "cpu" and "step" not in kwargs:
            # one host read of the timestep per call, so unused guidance branches are skipped as on the CPU path;
            # the step keyword is taken (and range-checked) by the FastFace pre-hook that runs next
            new_kwargs["step"] = self._host_step(float(t.reshape(-1)[0]))
        return new.args, new_kwargs

    def _host_step(self, tv: float) -> int:
        """The position of timestep ``tv`` in the scheduler's schedule."""
        dist = (self._host_ts - tv).abs()
        i = int(dist.argmin())
        if float(dist[i]) > 1e-3 * max(1.0, abs(tv)):
            raise ValueError(f"timestep {tv} is not in the scheduler's timesteps {self._host_ts.tolist()}")
        return i

    def _unpack(self, module: nn.Module, args: tuple) -> tuple | None:
        embeds = args[0]
        if not isinstance(embeds, (list, tuple)) or not isinstance(embeds[0], tuple):
            return None
        proj = module.image_projection_layers[0]
        ids, clip = embeds[0]
        if self._saved_clip is None:  # (after a failed call the user's features are still the saved ones)
            self._saved_clip = proj.clip_embeds
        proj.clip_embeds = clip
        return ([ids],)

    def _restore_clip(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._saved_clip is not None:
            module.image_projection_layers[0].clip_embeds = self._saved_clip
            self._saved_clip = None

    # -- lifetime ---------------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Remove every hook and give back the original attention processors."""
        if _ENABLED.get(self.unet) is not self:
            return
        self.fastface.remove()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._originals is not None:
            procs = dict(self.unet.attn_processors)
            procs.update(self._originals)
            self.unet.set_attn_processor(procs)
        del _ENABLED[self.unet]

    def __enter__(self) -> DiffusersFastFace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def enable(
    pipe: Any,
    method: str = "fastface-am1",
    *,
    preset: str | None = None,
    null_clip_embeds: torch.Tensor | None = None,
    **method_options: Any,
) -> DiffusersFastFace:
    """Turn a diffusers SDXL pipeline with IP-Adapter FaceID / FaceID-Plus-v2 into FastFace; returns a handle.

    ``method``: baseline, dcg, am1, am2, fastface-am1 (default), fastface-am2, with ``method_options`` as
    :class:`fastface.Pipeline` takes them (``alpha``, ``beta``, ``rescale``, ``p``, ``s_up``, ``s_down``, ``d``,
    ``s``, ``q``, ``w``, ``adain``, ``guidance``, ...). ``preset``: a fastface model preset name (hyper, lightning,
    lcm, turbo, tcd) whose baseline guidance the methods without DCG use (lcm: 1.5; default 1). Then call
    ``pipe(prompt, ip_adapter_image_embeds=[embeds], guidance_scale=0, ...)``: DCG replaces the pipeline's
    classifier-free guidance. ``null_clip_embeds``: FaceID-Plus-v2's null CLIP features when the pipeline has
    no image encoder.
    """
    from fastface.presets import resolve_method

    if not isinstance(method, str):
        raise ValueError(f"method must be a method name string, got {method!r}")
    proj = _projection(pipe)
    unet = pipe.unet
    if unet in _ENABLED:
        raise ValueError("FastFace is already enabled on this pipeline: call handle.remove() first (or use "
                         "`with enable(...)`)")
    dcg, am = resolve_method(method, preset, adapter=SUPPORTED_ADAPTERS[type(proj)], **method_options)
    if not version_tested():
        import diffusers

        logger.warning("diffusers %s is outside the releases the drop-in was tested on (%s to %s)",
                       diffusers.__version__, *TESTED_DIFFUSERS)
    null = null_identity(pipe, null_clip_embeds)
    swapped = None
    if am is not None:
        procs = dict(unet.attn_processors)
        swapped = {n: p for n, p in procs.items() if isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))}
        if not swapped:
            raise ValueError("the UNet has no IP-Adapter attention processors (IPAdapterAttnProcessor2_0): was the "
                             "adapter loaded with pipe.load_ip_adapter?")
        wrapped = {n: FastFaceIPAdapterProcessor(p) for n, p in swapped.items()}
        unet.set_attn_processor({**procs, **wrapped})
    try:
        h = fastface.attach(unet, dcg=dcg, am=am, null_id={ID_PATH: [null]}, null_text=null_text(pipe),
                            spec=DIFFUSERS_UNET)
    except Exception:
        if swapped is not None:
            unet.set_attn_processor({**dict(unet.attn_processors), **swapped})
        raise
    handle = DiffusersFastFace(pipe, h, dcg, am, swapped)
    _ENABLED[unet] = handle
    logger.debug("FastFace %s enabled on %s (%s)", method, type(pipe).__name__, type(proj).__name__)
    return handle

