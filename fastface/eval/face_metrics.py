"""Face metrics: identity similarity (ID), face-fail count (FFC) and the face-crop CLIP score (FCS).

ID (paper Sec. 4.1; official ``face_metrics.py::FaceDistanceMetric``): the cosine *similarity* of the insightface
``buffalo_l`` ArcFace embeddings of the reference photo and the generated image. The face is insightface's first
detection (``faces[0]``, the highest score), the detector is retried at 640, 576, ..., 320 until a face is found
(:class:`fastface.adapters.faces.FaceAnalyzer` does both). A pair where either image has no face counts in FFC
and is left out of the ID mean.

FCS (official ``FaceClipScore``, used on stylistic prompts): the CLIP score of the generated face crop against the
style part of the prompt (before ``;``). Two deliberate differences from the official code, both documented in
docs/reproduce.md:

* **range bug fixed**: the official metric fed 0-255 crops to a preprocessing that expects [-1, 1] images (it
  un-normalises with ``(x + 1) / 2``), so CLIP saw values up to ~128 instead of [0, 1]; here the crop gets the
  standard CLIP preprocessing of a uint8 image. Scores are therefore *not* comparable with the paper's FCS column.
* the crop is insightface's face box (the same detector as ID) instead of facenet-pytorch's MTCNN, which is not a
  dependency of fastface. The box is clamped to the image; CLIP then resizes the shorter side and center-crops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastface.adapters.faces import FaceAnalyzer, ImageInput, NoFaceError
from fastface.eval.clip_metrics import CLIPScorer, to_rgb
from fastface.eval.data import style_part

logger = logging.getLogger(__name__)

__all__ = ["DetectedFace", "FaceMatch", "detect_face", "match_faces", "id_similarity", "face_fail_count",
           "face_crop", "face_clip_scores"]


@dataclass(frozen=True)
class DetectedFace:
    """The face metrics' view of one image: unit ArcFace ``embedding`` [512] and ``bbox`` (x1, y1, x2, y2) pixels."""

    embedding: np.ndarray
    bbox: np.ndarray


def detect_face(analyzer: FaceAnalyzer, image: ImageInput) -> DetectedFace | None:
    """insightface's first face (``faces[0]``) of an image with detector-size retries, or None if there is none."""
    try:
        f = analyzer.analyze(image, choose=0)
    except NoFaceError:
        return None
    return DetectedFace(np.asarray(f.embedding, dtype=np.float64), np.asarray(f.bbox, dtype=np.float64))


@dataclass(frozen=True)
class FaceMatch:
    """ID of one (reference, generated) pair: ``similarity`` (NaN when a face is missing) and which faces were found."""

    similarity: float
    reference_found: bool
    generated_found: bool

    @property
    def failed(self) -> bool:
        """True when either image had no face (the pair counts in FFC)."""
        return not (self.reference_found and self.generated_found)


def match_faces(reference: DetectedFace | None, generated: DetectedFace | None) -> FaceMatch:
    """The ID of a pair of detections: cosine of the unit embeddings, NaN if either is missing."""
    if reference is None or generated is None:
        return FaceMatch(math.nan, reference is not None, generated is not None)
    return FaceMatch(float(np.dot(reference.embedding, generated.embedding)), True, True)


def id_similarity(
    analyzer: FaceAnalyzer, references: Sequence[ImageInput], images: Sequence[ImageInput]
) -> list[FaceMatch]:
    """ID per (reference photo, generated image) pair; each distinct reference (by path or object) is analysed once."""
    if len(references) != len(images):
        raise ValueError(f"got {len(references)} reference photos but {len(images)} images; pass one per image")
    cache: dict[object, DetectedFace | None] = {}
    out = []
    for ref, img in zip(references, images):
        key = str(ref) if isinstance(ref, (str, bytes)) or hasattr(ref, "__fspath__") else id(ref)
        if key not in cache:
            cache[key] = detect_face(analyzer, ref)
        out.append(match_faces(cache[key], detect_face(analyzer, img)))
    return out


def face_fail_count(matches: Sequence[FaceMatch]) -> int:
    """FFC: the number of pairs with no face in the reference or the generated image."""
    return sum(m.failed for m in matches)


def face_crop(image: ImageInput, bbox: Sequence[float]) -> np.ndarray:
    """The RGB uint8 crop of a face box ``(x1, y1, x2, y2)``, rounded outwards and clamped to the image."""
    rgb = to_rgb(image)
    h, w = rgb.shape[:2]
    x1, y1 = max(0, int(math.floor(bbox[0]))), max(0, int(math.floor(bbox[1])))
    x2, y2 = min(w, int(math.ceil(bbox[2]))), min(h, int(math.ceil(bbox[3])))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"the face box {tuple(float(b) for b in bbox[:4])} lies outside the {w}x{h} image")
    return np.ascontiguousarray(rgb[y1:y2, x1:x2])


def face_clip_scores(
    clip: CLIPScorer,
    analyzer: FaceAnalyzer,
    images: Sequence[ImageInput],
    prompts: Sequence[str],
    faces: Sequence[DetectedFace | None] | None = None,
) -> np.ndarray:
    """FCS per image: CLIP score of the face crop against the prompt's style part; NaN for realistic prompts
    (no ``;``) and images without a face. ``faces``: detections already made (else detected here)."""
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    if faces is None:
        faces = [detect_face(analyzer, im) if style_part(p) else None for im, p in zip(images, prompts)]
    elif len(faces) != len(images):
        raise ValueError(f"got {len(faces)} detections for {len(images)} images")
    out = np.full(len(images), math.nan)
    todo = [i for i, (p, f) in enumerate(zip(prompts, faces)) if style_part(p) and f is not None]
    if todo:
        crops = [face_crop(images[i], faces[i].bbox) for i in todo]
        out[todo] = clip.score(crops, [style_part(prompts[i]) for i in todo])
    return out
