"""PuLID identities: the encoder inputs of one person, from photos or PuLID face files.

* :class:`PuLIDIdentity`: antelopev2 + EVA02-CLIP inputs, one row per photo, and how the faces were aligned.
* :func:`prepare_pulid_identity`: photos, PuLID face files -> one identity (ArcFace embeddings are refused).
* :func:`load_pulid_face_file` / :func:`save_pulid_face_file`: the PuLID face file format (docs/usage.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastface.adapters.faces import FaceInfo, ImageReadError
from fastface.adapters.pulid_faces import PuLIDFaceInputs, PuLIDFacePreprocessor
from fastface.face_files import safetensors_metadata

__all__ = [
    "PuLIDIdentity", "prepare_pulid_identity", "load_pulid_face_file", "save_pulid_face_file", "alignment_of",
    "ALIGN_RETINAFACE", "ALIGN_KEYPOINTS", "PULID_FACE_FORMAT",
]

PathLike = str | os.PathLike
ALIGN_RETINAFACE = "retinaface"  # upstream: facexlib RetinaFace-R50, 5 points of the face nearest the centre
ALIGN_KEYPOINTS = "insightface-keypoints"  # fallback: antelopev2 (SCRFD) keypoints of the largest face


def alignment_of(preprocessor: PuLIDFacePreprocessor) -> str:
    """How a preprocessing aligns faces: :data:`ALIGN_RETINAFACE` or :data:`ALIGN_KEYPOINTS`."""
    return ALIGN_KEYPOINTS if preprocessor.detector is None else ALIGN_RETINAFACE


PULID_FACE_FORMAT = "fastface-pulid-v1"


@dataclass(frozen=True, eq=False)
class PuLIDIdentity:
    """One person's PuLID encoder inputs, one row per photo.

    ``id_cond`` [n, 1280]: the antelopev2 raw embedding (512) ‖ the L2-normalised EVA02-CLIP CLS projection (768).
    ``hidden_states``: 5 tensors [n, 577, 1024], EVA's residual stream after blocks 4, 8, 12, 16 and 20 (CLS first).
    Several photos are encoded as upstream does (:meth:`fastface.adapters.pulid.PuLID.encode`).
    ``alignment``: how the photos' faces were aligned (:data:`ALIGN_RETINAFACE`, :data:`ALIGN_KEYPOINTS`, several
    joined by ", " when photos differ), None when unknown (inputs made elsewhere).
    """

    id_cond: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    source: str = "precomputed"
    alignment: str | None = None

    def __post_init__(self) -> None:
        c = self.id_cond
        hidden = tuple(self.hidden_states)
        object.__setattr__(self, "hidden_states", hidden)
        if not isinstance(c, torch.Tensor) or c.ndim != 2 or not c.is_floating_point() or not len(c):
            raise ValueError(f"{self.source}: PuLID id_cond must be a float tensor [n_photos, 1280], got "
                             f"{getattr(c, 'shape', type(c).__name__)}")
        if not hidden or not all(isinstance(h, torch.Tensor) and h.ndim == 3 for h in hidden):
            raise ValueError(f"{self.source}: PuLID hidden_states must be EVA hidden states [n_photos, tokens, width]")
        shapes = {tuple(h.shape) for h in hidden}
        if len(shapes) != 1 or next(iter(shapes))[0] != len(c):
            raise ValueError(f"{self.source}: every EVA hidden state must be [{len(c)}, tokens, width] (one row per "
                             f"photo, like id_cond), got {sorted(shapes)}")
        if not torch.isfinite(c).all() or not all(torch.isfinite(h).all() for h in hidden):
            raise ValueError(f"{self.source}: the PuLID identity holds NaN or infinite values")

    @property
    def num_images(self) -> int:
        return len(self.id_cond)

    @classmethod
    def from_inputs(cls, inputs: PuLIDFaceInputs, alignment: str | None = None) -> PuLIDIdentity:
        """From one photo's :class:`~fastface.adapters.pulid_faces.PuLIDFaceInputs` (aligned as ``alignment`` says)."""
        return cls(inputs.id_cond, tuple(inputs.hidden_states), inputs.source, alignment)

    @classmethod
    def stack(cls, people: Sequence[PuLIDIdentity]) -> PuLIDIdentity:
        """Several photos' identities as one (rows in order); their EVA shapes must agree."""
        people = list(people)
        if len(people) == 1:
            return people[0]
        shapes = {(len(p.hidden_states), tuple(p.hidden_states[0].shape[1:]), p.id_cond.shape[1]) for p in people}
        if len(shapes) != 1:
            raise ValueError(f"cannot combine PuLID identities with different EVA shapes: {sorted(shapes)}")
        dev = people[0].id_cond.device
        id_cond = torch.cat([p.id_cond.to(dev, torch.float32) for p in people])
        hidden = tuple(torch.cat([p.hidden_states[j].to(dev, torch.float32) for p in people])
                       for j in range(len(people[0].hidden_states)))
        aligned = dict.fromkeys(p.alignment or "unknown" for p in people)
        alignment = None if list(aligned) == ["unknown"] else ", ".join(aligned)
        return cls(id_cond, hidden, "; ".join(p.source for p in people), alignment)


_NOT_FOR_PULID = (
    "PuLID needs photos or a PuLID face file: an ArcFace embedding ({what}) lacks the EVA02-CLIP features of the "
    "parsed face that PuLID encodes. Pass the photo(s), or make a PuLID face file with "
    "`fastface embed --adapter pulid --face PHOTO -o me.safetensors` (fastface.adapters.pulid_identity.save_pulid_face_file)"
)


def prepare_pulid_identity(face: Any, preprocessor: Callable[[], PuLIDFacePreprocessor]) -> PuLIDIdentity:
    """One person's :class:`PuLIDIdentity` from ``face``: a photo (path, PIL image, uint8 array), a PuLID face file
    (:func:`load_pulid_face_file`), a :class:`PuLIDIdentity` or ``PuLIDFaceInputs``, or a list of these (several
    photos: their rows are concatenated). ``preprocessor()`` gives the antelopev2 + BiSeNet + EVA preprocessing
    (with RetinaFace when it has one), only when a photo needs it; the identity records its alignment. ArcFace
    embeddings (FaceInfo, ``.npy``, float arrays) are rejected.
    """
    if isinstance(face, (list, tuple)):
        if not face:
            raise ValueError("face is an empty list; give at least one photo or PuLID face file")
        return PuLIDIdentity.stack([prepare_pulid_identity(f, preprocessor) for f in face])
    if face is None:
        raise ValueError("face is required: a photo, several photos of one person, or a PuLID face file")
    if isinstance(face, PuLIDIdentity):
        return face
    if isinstance(face, PuLIDFaceInputs):
        return PuLIDIdentity.from_inputs(face)
    if isinstance(face, FaceInfo):
        raise ValueError(f"{face.source}: " + _NOT_FOR_PULID.format(what="a FaceInfo"))
    if isinstance(face, torch.Tensor) or (isinstance(face, np.ndarray) and face.dtype.kind == "f"):
        raise ValueError(_NOT_FOR_PULID.format(what="a float array"))
    if isinstance(face, (str, os.PathLike)):
        path = Path(face).expanduser()
        if not path.is_file():
            raise ImageReadError(f"{face}: no such file (a face photo or a PuLID .safetensors face file)")
        if path.suffix.lower() == ".npy":
            raise ValueError(f"{path}: " + _NOT_FOR_PULID.format(what="a .npy file"))
        if path.suffix.lower() == ".safetensors":
            return load_pulid_face_file(path)
    pre = preprocessor()
    return PuLIDIdentity.from_inputs(pre(face), alignment_of(pre))


def load_pulid_face_file(path: PathLike) -> PuLIDIdentity:
    """A precomputed PuLID identity: a ``.safetensors`` file with ``pulid_id_cond`` float ``[1280]`` or ``[N, 1280]``
    and ``pulid_hidden_states`` float ``[5, 577, 1024]`` or ``[N, 5, 577, 1024]`` (N photos; header metadata
    ``format`` = ``fastface-pulid-v1``, and ``alignment`` when known). :func:`save_pulid_face_file` and
    ``fastface embed --adapter pulid`` write it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such PuLID face file")
    sd, meta = safetensors_metadata(path)
    alignment = meta.get("alignment")
    if "pulid_id_cond" not in sd or "pulid_hidden_states" not in sd:
        what = "a FaceID face file (ArcFace embedding only)" if "embedding" in sd else f"tensors {sorted(sd)[:6]}"
        raise ValueError(f"{path}: no 'pulid_id_cond' / 'pulid_hidden_states' tensors ({what}); "
                         + _NOT_FOR_PULID.format(what="a FaceID face file"))
    c, h = sd["pulid_id_cond"], sd["pulid_hidden_states"]
    c = c[None] if c.ndim == 1 else c
    h = h[None] if h.ndim == 3 else h
    if not c.is_floating_point() or c.ndim != 2 or not h.is_floating_point() or h.ndim != 4 or len(h) != len(c):
        raise ValueError(f"{path}: expected float pulid_id_cond [N, 1280] and pulid_hidden_states [N, 5, tokens, "
                         f"width], got {c.dtype} {tuple(c.shape)} and {h.dtype} {tuple(h.shape)}")
    names = path.name if len(c) == 1 else f"{path.name} ({len(c)} photos)"
    return PuLIDIdentity(c.float(), tuple(h[:, j].float() for j in range(h.shape[1])), names, alignment)


def save_pulid_face_file(path: PathLike, person: PuLIDIdentity) -> Path:
    """Write a PuLID identity as the ``.safetensors`` face file of :func:`load_pulid_face_file` (fp32; about 12 MB
    per photo with the released EVA02-CLIP-L)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: PuLID face files are written as .safetensors")
    tensors = {
        "pulid_id_cond": person.id_cond.detach().float().cpu().contiguous(),
        "pulid_hidden_states": torch.stack([h.detach().float().cpu() for h in person.hidden_states], 1).contiguous(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": PULID_FACE_FORMAT, "source": person.source[:500]}
    if person.alignment is not None:
        meta["alignment"] = person.alignment
    save_file(tensors, str(path), metadata=meta)
    return path
