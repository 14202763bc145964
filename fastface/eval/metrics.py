"""The paper's metric suite on generated images: ID, FFC, CLIP, AE, IR, FCS (see the metric modules).

:class:`MetricSuite` holds the metric models a run asked for and scores one generated image at a time into a
flat row (``id``, ``face_found``, ``clip``, ``ae``, ``ir``, ``fcs``; None where a metric was not asked for or does
not apply). Reference faces are analysed once per path. The batch functions of the metric modules
(:func:`~fastface.eval.face_metrics.id_similarity`, :meth:`~fastface.eval.clip_metrics.CLIPScorer.score`, ...)
serve library users who score folders of images directly.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastface.adapters.faces import FaceAnalyzer, ImageInput
from fastface.eval.clip_metrics import CLIP_L14_REPO, AestheticScorer, CLIPScorer
from fastface.eval.data import style_part
from fastface.eval.face_metrics import DetectedFace, detect_face, face_clip_scores, match_faces

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "DEFAULT_METRICS", "MetricModels", "MetricSuite", "parse_metrics"]

METRICS = ("id", "clip", "ae", "ir", "fcs")  # "id" also gives FFC
DEFAULT_METRICS = ("id", "clip", "ae")
ROW_KEYS = ("id", "face_found", "clip", "ae", "ir", "fcs")


def parse_metrics(names: str | Sequence[str]) -> tuple[str, ...]:
    """Metric names from ``"id,clip,ae"`` or a list, checked and de-duplicated (``"ffc"`` is an alias of ``"id"``)."""
    items = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    items = ["id" if n == "ffc" else n for n in items]
    unknown = [n for n in items if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)} (ffc comes with id)")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class MetricModels:
    """Where the metric models come from (all local; nothing is downloaded).

    ``insightface_root``: folder with ``models/buffalo_l/*.onnx``. ``clip``: a CLIPModel folder or a repo id in the
    HF cache (default openai/clip-vit-large-patch14). ``aesthetic``: ``ava+logos-l14-linearMSE.pth``.
    ``imagereward``: ``ImageReward.pt`` (``med_config.json`` beside it unless ``imagereward_med_config``).
    """

    insightface_root: str | os.PathLike = "~/.insightface"
    clip: str | os.PathLike = CLIP_L14_REPO
    aesthetic: str | os.PathLike | None = None
    imagereward: str | os.PathLike | None = None
    imagereward_med_config: str | os.PathLike | None = None
    cache_dir: str | os.PathLike | None = None
    face_providers: tuple[str, ...] | None = None


class MetricSuite:
    """The metric models of a run; :meth:`score` gives the metric row of one generated image."""

    def __init__(self, metrics: Sequence[str], models: MetricModels = MetricModels(), *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.metrics = parse_metrics(metrics)
        self.analyzer: FaceAnalyzer | None = None
        self.clip: CLIPScorer | None = None
        self.aesthetic: AestheticScorer | None = None
        self.imagereward = None
        if "id" in self.metrics or "fcs" in self.metrics:
            providers = models.face_providers
            if providers is None and torch.device(device).type == "cpu":
                providers = ("CPUExecutionProvider",)
            self.analyzer = FaceAnalyzer(models.insightface_root, pack="buffalo_l",
                                         providers=None if providers is None else list(providers))
        if {"clip", "ae", "fcs"} & set(self.metrics):
            self.clip = CLIPScorer.from_pretrained(models.clip, cache_dir=models.cache_dir, device=device, dtype=dtype)
        if "ae" in self.metrics:
            if models.aesthetic is None:
                raise ValueError(
                    "the AE metric needs the LAION aesthetic predictor file ava+logos-l14-linearMSE.pth "
                    "(pass its path; see docs/reproduce.md)"
                )
            self.aesthetic = AestheticScorer.from_file(self.clip, models.aesthetic)
        if "ir" in self.metrics:
            if models.imagereward is None:
                raise ValueError("the IR metric needs the ImageReward.pt file (pass its path; see docs/reproduce.md)")
            from fastface.eval.image_reward import ImageRewardScorer

            self.imagereward = ImageRewardScorer(models.imagereward, models.imagereward_med_config, device=device)
        self._references: dict[str, DetectedFace | None] = {}

    def reference(self, path: str | os.PathLike) -> DetectedFace | None:
        """The detected face of a reference photo (cached by path; None if it has none, which is logged)."""
        key = str(Path(path))
        if key not in self._references:
            face = detect_face(self.analyzer, key)
            if face is None:
                logger.warning("%s: no face found in the reference photo; its pairs all count in FFC", key)
            self._references[key] = face
        return self._references[key]

    def score(self, image: ImageInput, prompt: str, reference: str | os.PathLike) -> dict[str, Any]:
        """The metric row of one generated image (floats, None where not computed or not applicable)."""
        row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
        gen_face = None
        if self.analyzer is not None:
            gen_face = detect_face(self.analyzer, image)
        if "id" in self.metrics:
            m = match_faces(self.reference(reference), gen_face)
            row["id"] = None if math.isnan(m.similarity) else m.similarity
            row["face_found"] = not m.failed
        embeds = None
        if self.clip is not None and ({"clip", "ae"} & set(self.metrics)):
            embeds = self.clip.image_embeddings([image])
        if "clip" in self.metrics:
            row["clip"] = float((embeds.double() * self.clip.text_embeddings([prompt]).double()).sum())
        if "ae" in self.metrics:
            row["ae"] = float(self.aesthetic.score_embeddings(embeds)[0])
        if "ir" in self.metrics:
            row["ir"] = float(self.imagereward.score([image], [prompt])[0])
        if "fcs" in self.metrics and style_part(prompt):
            value = face_clip_scores(self.clip, self.analyzer, [image], [prompt], faces=[gen_face])[0]
            row["fcs"] = None if math.isnan(value) else float(value)
        return row
