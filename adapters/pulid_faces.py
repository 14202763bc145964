"""PuLID face preprocessing (``pulid/pipeline.py::get_id_embedding``): antelopev2 embedding, aligned and parsed face,
EVA02-CLIP features -> the inputs of :meth:`fastface.adapters.pulid.PuLID.encode`.

Steps, as upstream:

1. The photo's long edge is reduced to at most 1024 px (``cv2.INTER_LANCZOS4``, no upscaling; ``app.py``).
2. insightface ``antelopev2`` (our :class:`~fastface.adapters.faces.FaceAnalyzer`, ``pack="antelopev2"``): the face with
   the **largest** box, its **raw** (not normalised) 512-d ``embedding``.
3. Alignment to 512² from 5 landmarks (see "two paths" below):
   ``cv2.estimateAffinePartial2D(landmarks, template, method=cv2.LMEDS)`` and ``cv2.warpAffine`` with
   ``BORDER_CONSTANT`` and border value (135, 133, 132), exactly facexlib's ``FaceRestoreHelper.align_warp_face``.
   ``template="facexlib"`` (default) is what upstream runs with the facexlib its requirements install (PyPI 0.3.0,
   ``template_3points=False``): all 5 landmarks onto the FFHQ template. ``template="3points"`` uses eyes + nose onto
   ``[[192, 240], [319, 240], [257, 371]]`` (facexlib's ``template_3points=True``, the default of older git versions).
4. BiSeNet face parsing (19 classes, facexlib's ``parsing_bisenet.pth``, our :class:`BiSeNet`) on the RGB face in [0, 1]
   normalised with ImageNet mean/std; argmax of the main output. Labels 0, 16, 18, 7, 8, 9, 14, 15 (background, cloth,
   hat, ears, earring, neck, necklace) become white; every other pixel becomes its grey value
   ``0.299 R + 0.587 G + 0.114 B`` on all three channels.
5. EVA input: bicubic resize to 336 (no antialias), OpenAI CLIP normalisation
   (:func:`fastface.models.eva_clip.eva_preprocess`); ``id_cond = [raw embedding ‖ L2-normalised EVA CLS projection]``.

**Landmarks: two paths.**

* ``detector=RetinaFace`` (:class:`fastface.models.retinaface.RetinaFace`, loaded from facexlib's
  ``detection_Resnet50_Final.pth``): upstream's way and the default whenever those weights are given. RetinaFace-R50
  runs on the (≤ 1024 px) BGR photo at its own size (BGR − (104, 117, 123), confidence > 0.97, NMS at IoU 0.4) and
  the face whose box centre is **nearest the image centre** gives the 5 landmarks (facexlib
  ``FaceRestoreHelper.get_face_landmarks_5(only_center_face=True)``). The embedding still comes from insightface's
  **largest** face, so, as upstream, a multi-face photo can embed one face and align another. If insightface finds no
  face, the embedding is upstream's fallback: antelopev2's ArcFace (``get_feat``) on the 512² RetinaFace-aligned crop.
  If RetinaFace finds no face, :class:`~fastface.adapters.faces.NoFaceError` (upstream: "facexlib align face fail").
  Tested equal (bit-exact crop) to facexlib's detection → 5 points → ``align_warp_face`` on the same random weights.
* ``detector=None``: the 5 keypoints insightface's antelopev2 detector (SCRFD-10G) returns for the chosen
  (**largest**) face, so one face is both embedded and aligned and no second detector is needed. With identical
  landmarks the crop equals facexlib's exactly (tested against ``align_warp_face``), but SCRFD's keypoints are not
  RetinaFace's (another network, trained on other labels): on real photos they will differ somewhat, which shifts and
  rotates the 512² crop by as much, and in multi-face photos the aligned face may differ from upstream's (largest vs
  centre-most).

Not measured here: the numeric size of the SCRFD-vs-RetinaFace landmark difference (and its effect on the crop, the
parsing mask and the EVA features). That needs real photos and the released weights (antelopev2 and
``detection_Resnet50_Final.pth``), none of which are available offline; random weights only prove the code paths equal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastface.models.eva_clip import EVAVisionTower, eva_preprocess
from fastface.models.loading import WeightFormatError, assign_state_dict, read_weights
from fastface.models.retinaface import RetinaFace, center_face_index

from .faces import FaceAnalyzer, ImageInput, NoFaceError, load_image

logger = logging.getLogger(__name__)

__all__ = [
    "FACE_SIZE",
    "TEMPLATES",
    "BORDER_VALUE",
    "BACKGROUND_LABELS",
    "BiSeNet",
    "load_bisenet",
    "resize_long_edge",
    "align_face",
    "retinaface_landmarks",
    "parse_face",
    "face_features_image",
    "PuLIDFaceInputs",
    "PuLIDFacePreprocessor",
]

FACE_SIZE = 512
TEMPLATES: dict[str, np.ndarray] = {
    # facexlib FaceRestoreHelper, face_size 512, crop_ratio (1, 1)
    "facexlib": np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]]),  # fmt: skip
    "3points": np.array([[192, 240], [319, 240], [257, 371]], dtype=np.float64),
}
BORDER_VALUE = (135, 133, 132)
BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------
# BiSeNet (Yu et al. 2018, "BiSeNet: Bilateral Segmentation Network"), facexlib's face-parsing variant
# ----------------------------------------------------------------------------------------------------------------


class _ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, ks: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(r + (x if self.downsample is None else self.downsample(x)))


class _ResNet18(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (cin, cout, s) in enumerate(widths, start=1):
            setattr(self, f"layer{i}", nn.Sequential(_BasicBlock(cin, cout, s), _BasicBlock(cout, cout, 1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)  # strides 8, 16, 32


class _ARM(nn.Module):
    """Attention refinement: features ⊙ sigmoid(BN(conv1x1(global average)))."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        return f * torch.sigmoid(self.bn_atten(self.conv_atten(f.mean(dim=(2, 3), keepdim=True))))


class _ContextPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnet = _ResNet18()
        self.arm16 = _ARM(256, 128)
        self.arm32 = _ARM(512, 128)
        self.conv_head32 = _ConvBNReLU(128, 128)
        self.conv_head16 = _ConvBNReLU(128, 128)
        self.conv_avg = _ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f8, f16, f32 = self.resnet(x)
        avg = self.conv_avg(f32.mean(dim=(2, 3), keepdim=True))  # broadcast = nearest upsampling of a 1x1 map
        up32 = self.conv_head32(F.interpolate(self.arm32(f32) + avg, f16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(f16) + up32, f8.shape[2:], mode="nearest"))
        return f8, up16


class _FFM(nn.Module):
    """Feature fusion: f + f ⊙ sigmoid(conv(relu(conv(global average of f)))), f = ConvBNReLU(cat)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convblk = _ConvBNReLU(cin, cout, ks=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        f = self.convblk(torch.cat([a, b], dim=1))
        att = torch.sigmoid(self.conv2(F.relu(self.conv1(f.mean(dim=(2, 3), keepdim=True)))))
        return f * att + f


class _Output(nn.Module):
    def __init__(self, cin: int, mid: int, num_class: int) -> None:
        super().__init__()
        self.conv = _ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, num_class, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """facexlib's face-parsing BiSeNet (ResNet-18 context path, 19 classes); parameter names equal the .pth keys.

    ``forward`` returns the main logits ``[B, 19, H, W]`` (facexlib's ``out``, bilinearly upsampled with
    ``align_corners=True``). The auxiliary heads ``conv_out16``/``conv_out32`` are loaded but not evaluated.
    """

    def __init__(self, num_class: int = 19) -> None:
        super().__init__()
        self.cp = _ContextPath()
        self.ffm = _FFM(256, 256)
        self.conv_out = _Output(256, 256, num_class)
        self.conv_out16 = _Output(128, 64, num_class)
        self.conv_out32 = _Output(128, 64, num_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f8, cp8 = self.cp(x)
        out = self.conv_out(self.ffm(f8, cp8))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def load_bisenet(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> BiSeNet:
    """Load facexlib's ``parsing_bisenet.pth`` (safe ``torch.load(weights_only=True)``) or a safetensors copy."""
    path = Path(path)
    return bisenet_from_state_dict(read_weights(path), source=str(path), dtype=dtype, device=device)


def bisenet_from_state_dict(
    sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>", dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BiSeNet:  # fmt: skip
    """Build from a state dict with facexlib's key names (``num_batches_tracked`` may be absent)."""
    sd = dict(sd)
    if "cp.resnet.conv1.weight" not in sd:
        raise WeightFormatError(
            f"{source}: not facexlib's BiSeNet face-parsing weights (no 'cp.resnet.conv1.weight'; first keys: "
            f"{sorted(sd)[:5]}); expected parsing_bisenet.pth (ParseNet's parsing_parsenet.pth is another model)"
        )
    with torch.device("meta"):
        model = BiSeNet(num_class=_num_classes(sd, source))
    for key in model.state_dict():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros((), dtype=torch.long)
    assign_state_dict(model, sd, source=source, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def _num_classes(sd: Mapping[str, torch.Tensor], source: str) -> int:
    w = sd.get("conv_out.conv_out.weight")
    if w is None or w.ndim != 4:
        raise WeightFormatError(f"{source}: BiSeNet weights lack 'conv_out.conv_out.weight' [classes, 256, 1, 1]")
    return int(w.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Geometry and parsing
# ----------------------------------------------------------------------------------------------------------------


def resize_long_edge(image: np.ndarray, long_edge: int = 1024) -> np.ndarray:
    """Shrink so that the long edge is at most ``long_edge`` (``cv2.INTER_LANCZOS4``; never upscales), as app.py."""
    h, w = image.shape[:2]
    if max(h, w) <= long_edge:
        return image
    k = long_edge / max(h, w)
    return cv2.resize(image, (int(w * k), int(h * k)), interpolation=cv2.INTER_LANCZOS4)


def align_face(
    bgr: np.ndarray, kps: np.ndarray, *, template: Literal["facexlib", "3points"] = "facexlib"
) -> np.ndarray:
    """The 512² aligned face (BGR uint8) from 5 landmarks (left eye, right eye, nose, left/right mouth corner)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise ValueError(f"kps must be 5 finite (x, y) landmarks [5, 2], got shape {kps.shape}")
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 H x W x 3 image, got {bgr.dtype} {bgr.shape}")
    tpl = TEMPLATES[template]
    matrix = cv2.estimateAffinePartial2D(kps[: len(tpl)], tpl, method=cv2.LMEDS)[0]
    if matrix is None:
        raise ValueError(f"cannot align the face: degenerate landmarks {kps.tolist()}")
    return cv2.warpAffine(
        bgr, matrix, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUE
    )


def retinaface_landmarks(detector: RetinaFace, bgr: np.ndarray, *, source: str = "<image>") -> np.ndarray:
    """The 5 landmarks [5, 2] (float32) of the face nearest the image centre, as facexlib's
    ``FaceRestoreHelper.get_face_landmarks_5(only_center_face=True)`` (RetinaFace at the original size, score > 0.97).
    """
    det = detector.detect(bgr, conf_threshold=0.97, nms_threshold=0.4)
    if len(det) == 0:
        raise NoFaceError(
            f"{source}: RetinaFace found no face with confidence > 0.97 (upstream fails here too: 'facexlib align "
            "face fail'). Use a photo where one face is clearly visible, frontal and not cut off."
        )
    return det.landmarks[center_face_index(det.boxes, bgr.shape[0], bgr.shape[1])]


def _to_rgb_tensor(aligned_bgr: np.ndarray, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    rgb = np.ascontiguousarray(aligned_bgr[..., ::-1]).astype(np.float32)
    return (torch.from_numpy(rgb).permute(2, 0, 1)[None] / 255.0).to(device=device, dtype=dtype)  # [1, 3, H, W]


def parse_face(bisenet: BiSeNet, rgb: torch.Tensor) -> torch.Tensor:
    """Parsing labels ``[B, 1, H, W]`` (argmax of BiSeNet's main output) of RGB faces ``[B, 3, H, W]`` in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return bisenet((rgb - mean) / std).argmax(dim=1, keepdim=True)


def face_features_image(rgb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """White where the label is background-like (:data:`BACKGROUND_LABELS`), grey ``0.299R+0.587G+0.114B`` elsewhere."""
    bg = torch.zeros_like(labels, dtype=torch.bool)
    for lab in BACKGROUND_LABELS:
        bg |= labels == lab
    gray = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).repeat(1, 3, 1, 1)
    return torch.where(bg, torch.ones_like(rgb), gray)


# ----------------------------------------------------------------------------------------------------------------
# The whole preprocessing
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PuLIDFaceInputs:
    """One photo's PuLID inputs: ``id_cond`` [1, 512 + 768] and the EVA hidden states (5 × [1, 577, 1024]).

    ``aligned`` (512² BGR uint8), ``features`` ([1, 3, 512, 512] whitened grey face) and ``landmarks`` ([5, 2], the
    points the alignment used: RetinaFace's or insightface's) are kept for inspection.
    """

    id_cond: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    aligned: np.ndarray
    features: torch.Tensor
    source: str
    landmarks: np.ndarray | None = None


class PuLIDFacePreprocessor:
    """antelopev2 + alignment + BiSeNet + EVA02-CLIP: photos -> :class:`PuLIDFaceInputs` (see the module doc).

    ``detector``: facexlib's RetinaFace-R50 (:meth:`RetinaFace.from_pretrained` on ``detection_Resnet50_Final.pth``)
    to align as upstream (centre-most face); None aligns with insightface's keypoints of the largest face.
    """

    def __init__(
        self,
        analyzer: FaceAnalyzer,
        bisenet: BiSeNet,
        eva: EVAVisionTower,
        *,
        template: Literal["facexlib", "3points"] = "facexlib",
        long_edge: int = 1024,
        detector: RetinaFace | None = None,
    ) -> None:
        if detector is not None and not isinstance(detector, RetinaFace):
            raise ValueError(
                f"detector must be a fastface.models.retinaface.RetinaFace (or None), got {type(detector).__name__}"
            )
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
        if analyzer.pack != "antelopev2":
            logger.warning("PuLID was trained with antelopev2 embeddings; the analyzer uses pack %r", analyzer.pack)
        self.analyzer, self.bisenet, self.eva = analyzer, bisenet, eva
        self.template, self.long_edge, self.detector = template, long_edge, detector

    @torch.no_grad()
    def __call__(
        self, image: ImageInput, *, channels: Literal["rgb", "bgr"] = "rgb", source: str | None = None
    ) -> PuLIDFaceInputs:
        bgr, name = load_image(image, channels=channels, source=source)
        bgr = resize_long_edge(bgr, self.long_edge)
        if self.detector is None:
            info = self.analyzer.analyze(bgr, choose="largest", channels="bgr", source=name)
            if info.raw_embedding is None or info.kps is None:
                raise ValueError(f"{name}: the face analyzer returned no raw embedding or keypoints")
            raw, kps = np.asarray(info.raw_embedding, dtype=np.float32), info.kps
            aligned = align_face(bgr, kps, template=self.template)
        else:
            kps = retinaface_landmarks(self.detector, bgr, source=name)
            aligned = align_face(bgr, kps, template=self.template)
            try:
                info = self.analyzer.analyze(bgr, choose="largest", channels="bgr", source=name)
                if info.raw_embedding is None:
                    raise ValueError(f"{name}: the face analyzer returned no raw embedding")
                raw = np.asarray(info.raw_embedding, dtype=np.float32)
            except NoFaceError:  # upstream: ArcFace on the RetinaFace-aligned crop
                logger.info("%s: insightface found no face; embedding the RetinaFace-aligned crop", name)
                raw = np.asarray(self.analyzer.recognizer.get_feat(aligned), dtype=np.float32).reshape(-1)
        p = next(self.bisenet.parameters())
        rgb = _to_rgb_tensor(aligned, p.device, p.dtype)
        features = face_features_image(rgb, parse_face(self.bisenet, rgb))
        w = self.eva.patch_embed.proj.weight
        out = self.eva(eva_preprocess(features.to(device=w.device, dtype=w.dtype), self.eva.config.image_size))
        raw_t = torch.from_numpy(raw.copy())[None].to(device=w.device, dtype=w.dtype)
        id_cond = torch.cat([raw_t, out.normed_embeds], dim=-1)
        return PuLIDFaceInputs(id_cond, out.hidden_states, aligned, features, name, np.array(kps, dtype=np.float32))
