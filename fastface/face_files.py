"""Face inputs of the FaceID adapters: photos, face files and precomputed embeddings -> one :class:`FaceInfo`.

* :func:`prepare_identity`: photo(s), ``.npy`` / ``.safetensors`` face files, float embeddings, FaceInfos -> one
  person (several photos averaged).
* :func:`open_face_analyzer`: the insightface analyzer of a pack (downloaded only on request, :mod:`fastface.hub`).
* :func:`load_face_file` / :func:`save_face_file`: the precomputed face file format (docs/usage.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from fastface.adapters.faces import FaceAnalyzer, FaceInfo, ImageReadError, average_faces
from fastface.needs import FixHint, faces_hint, pack_need, resolve_needs
from fastface.models.loading import WeightFormatError, read_safetensors

logger = logging.getLogger(__name__)

__all__ = ["FaceInput", "prepare_identity", "open_face_analyzer", "load_face_file", "save_face_file",
           "safetensors_metadata"]

PathLike = str | os.PathLike
FaceInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor, FaceInfo, Sequence[Any]]
_FACE_FILES = (".npy", ".safetensors")


def prepare_identity(face: FaceInput, analyzer: Callable[[], FaceAnalyzer]) -> FaceInfo:
    """One person's :class:`FaceInfo` from ``face``: a photo (path, PIL image, uint8 array), a ``.npy`` /
    ``.safetensors`` face file (:func:`load_face_file`), a float embedding [512] (array or tensor), a
    :class:`FaceInfo`, or a list of these (several photos of one person: embeddings averaged by
    :func:`~fastface.adapters.faces.average_faces`, every crop kept). ``analyzer()`` gives the face analyzer, only
    when a photo needs it.
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
    root: str | os.PathLike | None, pack: str = "buffalo_l", *, download: bool = False, hint: FixHint | None = None
) -> FaceAnalyzer:
    """The insightface analyzer of ``pack`` under ``root`` (default ``~/.insightface``).

    With ``download`` (and ``HF_HUB_OFFLINE`` unset) a missing pack is fetched once from the URL insightface uses
    into ``root/models/<pack>``; otherwise a missing pack is a :class:`~fastface.needs.MissingWeightsError` saying
    how to get it (``hint``: the command that does, default ``fastface doctor --faces-only ... --download``).
    """
    need = pack_need(root, pack)
    resolve_needs([need], download=download, hint=hint or faces_hint(None, root))
    return FaceAnalyzer(need.sources[0].root, pack=pack)


def safetensors_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A face file's tensors and header metadata (ValueError naming the file when it is not readable)."""
    try:
        sd = read_safetensors(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except WeightFormatError as exc:
        raise ValueError(str(exc)) from exc
    return sd, meta


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
        sd, meta = safetensors_metadata(path)
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
    if not np.isfinite(emb).all():
        nan, inf = int(np.isnan(emb).sum()), int(np.isinf(emb).sum())
        raise ValueError(f"{path}: the face embedding holds non-finite values ({nan} NaN, {inf} Inf of {emb.size}); "
                         "the file is damaged: make it again from photos with `fastface embed` (fastface.save_face_file)")
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
