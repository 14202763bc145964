"""Finding and loading the parts of a :class:`fastface.Pipeline`: UNet (+ distilled weights), text, VAE, adapter.

Every part comes from a model recipe (:func:`fastface.presets.model_recipe`) and an adapter preset, with a local
path override for each: ``base`` (a diffusers SDXL folder), ``unet`` (a UNet folder or file), ``weights`` (the
distilled LoRA of hyper/lcm/tcd, or the distilled UNet file of lightning), ``vae`` (folder or file),
``adapter_file``, ``image_encoder``, and for PuLID ``eva``, ``face_parser`` and ``face_detector``. Repo parts are
looked up in the Hugging Face cache and downloaded only with ``download=True`` (:mod:`fastface.hub`). Everything
the pipeline needs is resolved before anything is loaded, so a missing file is reported at once. PuLID's face models
and identities are in :mod:`fastface.pipeline_pulid` (loaded with the first photo).

Also the face inputs of the IP-Adapters: :func:`prepare_identity` (photos, face files, embeddings -> one FaceInfo),
:func:`open_face_analyzer`, the precomputed face file format of :func:`load_face_file` (docs/usage.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from fastface.adapters.faces import PACK_URL, FaceAnalyzer, FaceInfo, ImageReadError, average_faces
from fastface.adapters.ip_adapter import IPAdapterFaceID
from fastface.adapters.pulid import PuLID
from fastface.hub import WeightNotFoundError, WeightRef, is_offline, resolve, resolve_first
from fastface.models.clip_vision import CLIPVisionEncoder
from fastface.models.loading import WeightFormatError, read_safetensors
from fastface.models.lora_files import fuse_lora
from fastface.models.text import SDXLTextConditioner, load_text_encoder
from fastface.models.tokenizer import CLIPTokenizer
from fastface.models.unet import UNet, UNetConfig
from fastface.models.unet_loading import load_unet
from fastface.models.vae import AutoencoderKL
from fastface.models.vae_loading import load_vae
from fastface.presets import AdapterPreset, ModelRecipe

logger = logging.getLogger(__name__)

__all__ = [
    "Components", "LocalPaths", "resolve_sources", "load_components", "FaceInput", "prepare_identity",
    "open_face_analyzer", "load_face_file", "save_face_file",
]

PathLike = str | os.PathLike
FaceInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor, FaceInfo, Sequence[Any]]
_FACE_FILES = (".npy", ".safetensors")


@dataclass(frozen=True)
class LocalPaths:
    """Local overrides of a pipeline's parts (None: from the recipe / adapter preset)."""

    base: PathLike | None = None
    unet: PathLike | None = None
    weights: PathLike | None = None
    vae: PathLike | None = None
    adapter_file: PathLike | None = None
    image_encoder: PathLike | None = None
    eva: PathLike | None = None
    face_parser: PathLike | None = None
    face_detector: PathLike | None = None


@dataclass
class Components:
    """The loaded parts, and where each came from (for messages and the PNG metadata)."""

    unet: UNet
    text: SDXLTextConditioner
    vae: AutoencoderKL
    adapter: IPAdapterFaceID | PuLID
    image_encoder: CLIPVisionEncoder | None
    sources: dict[str, str] = field(default_factory=dict)


def _candidates(recipe: ModelRecipe, name: str, half: bool) -> list[WeightRef]:
    """Where a component may be: the fp16 variant files first for half precision, the full files first otherwise."""
    order = ("fp16", None) if half else (None, "fp16")
    out: list[WeightRef] = []
    for variant in order:
        ref = recipe.sources(variant).get(name)
        if ref is not None and ref not in out:
            out.append(ref)
    return out


def resolve_sources(
    recipe: ModelRecipe,
    adapter: AdapterPreset,
    paths: LocalPaths = LocalPaths(),
    *,
    half: bool = False,
    download: bool = False,
    cache_dir: PathLike | None = None,
) -> dict[str, Path]:
    """Local paths of every part: ``unet`` (folder, or its config folder for apply='unet'), ``weights`` (or absent),
    ``text_encoder``, ``text_encoder_2``, ``vae``, ``adapter``, ``image_encoder`` (FaceID-Plus only). PuLID's face
    models are resolved with the photos (:func:`fastface.pipeline_pulid.open_pulid_preprocessor`).

    Raises :class:`fastface.hub.WeightNotFoundError` naming the first missing part and how to get it.
    """
    if paths.base is not None:
        recipe = _with(recipe, base=paths.base)
    if paths.vae is not None:
        recipe = _with(recipe, vae=paths.vae)
    kw = dict(cache_dir=cache_dir, download=download)
    out: dict[str, Path] = {}
    if paths.unet is not None:
        out["unet"] = resolve(paths.unet)
    else:
        out["unet"] = resolve_first(_candidates(recipe, "unet", half), **kw)
    weights = paths.weights if paths.weights is not None else recipe.weights
    # A user UNet replaces the distilled UNet file of apply='unet' (lightning) unless weights are given too.
    if weights is not None and not (recipe.apply == "unet" and paths.unet is not None and paths.weights is None):
        out["weights"] = resolve(weights, **kw)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        out[name] = resolve_first(_candidates(recipe, name, half), **kw)
    out["adapter"] = resolve(paths.adapter_file if paths.adapter_file is not None else adapter.weights, **kw)
    if adapter.variant == "faceid_plus":
        enc = (paths.image_encoder,) if paths.image_encoder is not None else adapter.image_encoder
        out["image_encoder"] = resolve_first(list(enc), **kw)
    return out


def _with(recipe: ModelRecipe, **changes: object) -> ModelRecipe:
    import dataclasses

    return dataclasses.replace(recipe, **changes)


def _unet_config(folder: Path) -> UNetConfig:
    cfg_file = (folder / "unet" if (folder / "unet").is_dir() else folder) / "config.json"
    if not cfg_file.is_file():
        raise WeightFormatError(f"{cfg_file}: no such file (the UNet config of the base model is needed)")
    try:
        return UNetConfig.from_diffusers_config(json.loads(cfg_file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightFormatError(f"{cfg_file}: not valid JSON ({exc})") from exc
    except ValueError as exc:
        raise WeightFormatError(f"{cfg_file}: {exc}") from exc


def _load_unet(recipe: ModelRecipe, src: dict[str, Path], paths: LocalPaths, dtype, device) -> UNet:
    weights = src.get("weights")
    if recipe.apply == "unet" and weights is not None:
        # The distilled file is a whole UNet (SDXL-Lightning): the base folder gives only its config.
        cfg = _unet_config(src["unet"]) if src["unet"].is_dir() else None
        unet = load_unet(weights, dtype=dtype, device=device, config=cfg)
    else:
        unet = load_unet(src["unet"], dtype=dtype, device=device)
    if recipe.apply == "lora" and weights is not None:
        report = fuse_lora(unet, weights, recipe.lora_scale, ignore_text_encoder=True)
        logger.info("fused %d distilled LoRA layers from %s", len(report.fused), weights)
    return unet.eval().requires_grad_(False)


def _tokenizer(root: Path, name: str, pad: str) -> CLIPTokenizer:
    folder = root / name
    if (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_folder(folder)
    # SDXL's tokenizer folders hold the standard CLIP vocabulary, which fastface bundles.
    return CLIPTokenizer.bundled(pad_token=pad)


def _force_zeros(root: Path) -> bool:
    index = root / "model_index.json"
    if not index.is_file():
        return True
    try:
        return bool(json.loads(index.read_text(encoding="utf-8")).get("force_zeros_for_empty_prompt", True))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightFormatError(f"{index}: not valid JSON ({exc})") from exc


def _load_text(src: dict[str, Path], dtype, device) -> SDXLTextConditioner:
    root = src["text_encoder"].parent
    return SDXLTextConditioner(
        _tokenizer(root, "tokenizer", "<|endoftext|>"),
        _tokenizer(src["text_encoder_2"].parent, "tokenizer_2", "!"),
        load_text_encoder(src["text_encoder"], dtype=dtype, device=device),
        load_text_encoder(src["text_encoder_2"], dtype=dtype, device=device),
        _force_zeros(root),
    )


def load_components(
    recipe: ModelRecipe,
    adapter: AdapterPreset,
    src: dict[str, Path],
    paths: LocalPaths = LocalPaths(),
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> Components:
    """Load every part from the paths of :func:`resolve_sources` (the adapter is loaded, not yet installed)."""
    unet = _load_unet(recipe, src, paths, dtype, device)
    text = _load_text(src, dtype, device)
    vae = load_vae(src["vae"], dtype=dtype, device=device)
    if adapter.variant == "pulid":
        from fastface.pipeline_pulid import load_pulid  # (pipeline_pulid imports this module)

        ip = load_pulid(adapter, src["adapter"], device)
    else:
        shortcut = adapter.shortcut if adapter.variant == "faceid_plus" else None
        ip = IPAdapterFaceID.from_file(src["adapter"], dtype=dtype, device=device, shortcut=shortcut)
    if isinstance(ip, IPAdapterFaceID) and ip.variant != adapter.variant:
        raise WeightFormatError(
            f"{src['adapter']}: this is a {ip.variant} adapter file, but the adapter preset {adapter.name!r} is "
            f"{adapter.variant}; pick the matching adapter (--adapter) or file"
        )
    encoder = None
    if adapter.variant == "faceid_plus":
        encoder = CLIPVisionEncoder.from_pretrained(src["image_encoder"], dtype=dtype, device=device)
        if encoder.config.hidden_size != ip.config.clip_dim:
            raise WeightFormatError(
                f"{src['image_encoder']}: the image encoder's width {encoder.config.hidden_size} is not the adapter's "
                f"CLIP width {ip.config.clip_dim}; FaceID-Plus-v2 needs CLIP ViT-H/14"
            )
    if text.encoder_1.config.width + text.encoder_2.config.width != unet.config.context_dim:
        raise WeightFormatError(
            f"the text encoders ({src['text_encoder']}, {src['text_encoder_2']}) give "
            f"{text.encoder_1.config.width + text.encoder_2.config.width}-wide context, the UNet expects "
            f"{unet.config.context_dim}: the parts come from different models"
        )
    return Components(unet, text, vae, ip, encoder, {k: str(v) for k, v in src.items()})


# ----------------------------------------------------------------------------------------------------------------
# Faces: photos, face files, embeddings

def prepare_identity(face: FaceInput, analyzer: Callable[[], FaceAnalyzer]) -> FaceInfo:
    """One person's :class:`FaceInfo` from ``face``: a photo (path, PIL image, uint8 array), a ``.npy`` /
    ``.safetensors`` face file (:func:`fastface.pipeline_loading.load_face_file`), a float embedding [512]
    (array or tensor), a :class:`FaceInfo`, or a list of these (several photos of one person: embeddings averaged
    by :func:`average_faces`, every crop kept). ``analyzer()`` gives the face analyzer, only when a photo needs it.
    """
    if isinstance(face, (list, tuple)):
        if not face:
            raise ValueError("face is an empty list; give at least one photo or embedding")
        return average_faces([prepare_identity(f, analyzer) for f in face])
    if face is None:
        raise ValueError("face is required: a photo, several photos of one person, or a precomputed embedding")
    if isinstance(face, FaceInfo):
        return face
    if isinstance(face, (str, os.PathLike)):
        if not Path(face).expanduser().is_file():
            raise ImageReadError(f"{face}: no such file (a face photo or a .npy/.safetensors face file)")
        if Path(face).suffix.lower() in _FACE_FILES:
            return load_face_file(Path(face).expanduser())
    if isinstance(face, torch.Tensor) or (isinstance(face, np.ndarray) and face.dtype.kind == "f"):
        arr = face.detach().cpu().float().numpy() if isinstance(face, torch.Tensor) else face
        return FaceInfo.from_embedding(arr, source="<embedding>")
    return analyzer().identity(face)


def open_face_analyzer(
    root: str | os.PathLike | None, pack: str = "buffalo_l", *, download: bool = False
) -> FaceAnalyzer:
    """The insightface analyzer of ``pack`` under ``root`` (default ``~/.insightface``).

    With ``download`` (and ``HF_HUB_OFFLINE`` unset) a missing pack is fetched once from the insightface GitHub
    releases into ``root/models/<pack>``; otherwise a missing pack is a WeightFormatError saying how to get it.
    """
    root = Path(os.path.expanduser(os.fspath(root or "~/.insightface")))
    try:
        return FaceAnalyzer(root, pack=pack)
    except WeightFormatError:
        if not download or is_offline():
            raise
    import contextlib
    import io

    from insightface.utils import storage

    folder = root / "models" / pack
    logger.warning("downloading the insightface face-analysis pack %r into %s", pack, folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            storage.download("models", pack, force=folder.exists(), root=str(root))
    except Exception as exc:  # network or archive problems: one clear error
        raise WeightNotFoundError(
            f"could not download the insightface pack {pack!r} into {folder} ({type(exc).__name__}: {exc}); get "
            f"{PACK_URL.format(name=pack)} and unzip it there, or pass face_root= / --face-root"
        ) from exc
    return FaceAnalyzer(root, pack=pack)


def load_face_file(path: PathLike) -> FaceInfo:
    """A precomputed identity from a ``.npy`` or ``.safetensors`` file.

    * ``.npy``: a float array ``[512]`` (one ArcFace embedding) or ``[N, 512]`` (N photos, averaged as
      :func:`fastface.adapters.faces.average_faces` does). No crop, so FaceID only (not Plus-v2).
    * ``.safetensors``: tensor ``embedding`` ``[512]`` or ``[N, 512]`` (float), and optionally ``crop``:
      uint8 ``[S, S, 3]`` or ``[N, S, S, 3]`` aligned face crops (insightface ``norm_crop``, S = 224), needed by
      FaceID-Plus-v2; the header metadata ``crop_channels`` says ``"bgr"`` (default, the reference's order) or
      ``"rgb"``. :func:`save_face_file` writes this format.
    Embeddings may be raw or unit-norm (they are normalised).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such face embedding file")
    crops = None
    channels = "bgr"
    if path.suffix == ".npy":
        try:
            emb = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from exc
    elif path.suffix == ".safetensors":
        try:
            sd = read_safetensors(path)
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except WeightFormatError as exc:
            raise ValueError(str(exc)) from exc
        if "embedding" not in sd:
            raise ValueError(f"{path}: no 'embedding' tensor (found {sorted(sd)}); see fastface.save_face_file")
        emb = sd["embedding"].float().numpy()
        if "crop" in sd:
            crops = sd["crop"].numpy()
        channels = meta.get("crop_channels", "bgr")
    else:
        raise ValueError(f"{path}: a face embedding file must be .npy or .safetensors, got '{path.suffix}'")
    if emb.dtype.kind != "f" or emb.ndim not in (1, 2) or emb.shape[-1] != 512:
        raise ValueError(f"{path}: expected float embeddings [512] or [N, 512], got {emb.dtype} {emb.shape}")
    emb = emb.reshape(-1, 512)
    if crops is not None:
        crops = crops[None] if crops.ndim == 3 else crops
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
            raise ValueError(f"{path}: 'crop' must be uint8 [S, S, 3] or [N, S, S, 3], got {crops.dtype} {crops.shape}")
    names = [f"{path}[{i}]" if len(emb) > 1 else str(path) for i in range(len(emb))]
    faces = [FaceInfo.from_embedding(e, source=name) for e, name in zip(emb, names)]
    face = average_faces(faces)
    if crops is None:
        return face
    return FaceInfo(embedding=face.embedding, raw_embedding=face.raw_embedding, source=str(path),
                    crop_channels=channels, crops=tuple(np.ascontiguousarray(c) for c in crops))


def save_face_file(path: PathLike, face: FaceInfo) -> Path:
    """Write an identity as the ``.safetensors`` face file of :func:`load_face_file` (embedding and crops)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: face files are written as .safetensors")
    tensors = {"embedding": torch.from_numpy(np.array(face.embedding, dtype=np.float32))}
    if face.crops:
        shapes = {c.shape for c in face.crops}
        if len(shapes) == 1:
            tensors["crop"] = torch.from_numpy(np.stack(face.crops))
        else:
            tensors["crop"] = torch.from_numpy(np.array(face.crops[0]))
            logger.warning("%s: crops of different sizes; saving the first only", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"crop_channels": face.crop_channels, "format": "fastface-face-v1"})
    return path
