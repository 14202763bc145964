"""RetinaFace face detector with a ResNet-50 backbone (Deng et al. 2020, "RetinaFace: Single-shot Multi-level Face
Localisation in the Wild"), as facexlib runs it for PuLID's face alignment.

Network (facexlib ``detection/retinaface.py`` + ``retinaface_net.py``, config ``Resnet50``):

* ``body``: torchvision's ResNet-50 (v1.5: stride in the 3×3 conv of each bottleneck) up to ``layer4``; the outputs of
  ``layer2``/``layer3``/``layer4`` (512/1024/2048 channels, strides 8/16/32) feed the FPN.
* ``fpn``: 1×1 conv+BN+act laterals to 256 channels; top-down ``nearest`` upsampling to the finer map's size, sum,
  3×3 conv+BN+act ``merge2`` / ``merge1``.
* ``ssh1..3`` (SSH context module): 3×3 (128 ch) ‖ 5×5 as two 3×3 (64 ch) ‖ 7×7 as three 3×3 (64 ch, sharing
  the first), concatenated, ReLU.
* Heads per level, 2 anchors per position: ``ClassHead`` (2 logits, softmax), ``BboxHead`` (4), ``LandmarkHead`` (10),
  1×1 convs with bias, flattened in (y, x, anchor) order and concatenated over the levels.
* The activation of the FPN/SSH conv blocks is LeakyReLU with slope 0 for 256 channels (0.1 only for ≤ 64 channels,
  the MobileNet variant).

Priors (``PriorBox``): level k has a ``ceil(H/s_k) × ceil(W/s_k)`` grid (s = 8, 16, 32), anchors of side
``min_sizes[k] = (16, 32), (64, 128), (256, 512)`` pixels centred at ``((x + .5) s / W, (y + .5) s / H)``, all in
units of the image size. Decoding with variances (0.1, 0.2): centre ``c = p_c + 0.1 · t_c · p_wh``,
size ``wh = p_wh · exp(0.2 · t_wh)``, corners ``c ∓ wh/2``; landmark i ``p_c + 0.1 · t_i · p_wh``; times (W, H).

:meth:`RetinaFace.detect` is facexlib's ``detect_faces(image, conf_threshold, nms_threshold=0.4,
use_origin_size=True)``: BGR float minus (104, 117, 123) at the original size, scores ``softmax[:, 1]``, keep
``score > threshold``, sort by descending score (numpy ``argsort``, as upstream), greedy NMS at IoU > 0.4
(torchvision ``nms`` semantics: areas ``(x2-x1)(y2-y1)``, no +1). ``FaceRestoreHelper.get_face_landmarks_5`` calls it
with threshold 0.97 and, with ``only_center_face=True``, keeps the face whose box centre is nearest to the image
centre (:func:`center_face_index`).

Parameter names equal the keys of facexlib's released ``detection_Resnet50_Final.pth`` after the ``module.`` prefix
is removed (``body.layer1.0.conv1.weight``, ``fpn.output1.0.weight``, ``ssh1.conv3X3.0.weight``,
``ClassHead.0.conv1x1.weight``, ...).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastface.steps import named

from .loading import StateDict, WeightFormatError, assign_state_dict, read_weights

logger = logging.getLogger(__name__)

__all__ = [
    "RetinaFaceConfig",
    "RETINAFACE_CONFIGS",
    "get_retinaface_config",
    "FaceDetections",
    "RetinaFace",
    "prior_boxes",
    "decode_boxes",
    "decode_landmarks",
    "nms",
    "center_face_index",
]


@dataclass(frozen=True)
class RetinaFaceConfig:
    """Shape and decoding constants of a RetinaFace detector with a torchvision-style bottleneck ResNet body."""

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # bottleneck blocks per stage (ResNet-50)
    stem_width: int = 64
    out_channels: int = 256  # FPN / SSH width
    anchors_per_position: int = 2
    min_sizes: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
    steps: tuple[int, ...] = (8, 16, 32)
    variances: tuple[float, float] = (0.1, 0.2)
    mean_bgr: tuple[float, float, float] = (104.0, 117.0, 123.0)

    def __post_init__(self) -> None:
        if self.out_channels % 4:
            raise ValueError(f"RetinaFaceConfig: out_channels {self.out_channels} must be divisible by 4 (SSH)")
        if len(self.min_sizes) != 3 or len(self.steps) != 3:
            raise ValueError("RetinaFaceConfig: min_sizes and steps need one entry per FPN level (3)")
        if any(len(m) != self.anchors_per_position for m in self.min_sizes):
            raise ValueError(f"RetinaFaceConfig: each min_sizes entry needs {self.anchors_per_position} sizes")

    @property
    def leaky(self) -> float:
        """LeakyReLU slope of the FPN/SSH blocks (facexlib: 0.1 if out_channels <= 64, else 0)."""
        return 0.1 if self.out_channels <= 64 else 0.0


RETINAFACE_CONFIGS: dict[str, RetinaFaceConfig] = {
    "resnet50": RetinaFaceConfig(),  # facexlib retinaface_resnet50, detection_Resnet50_Final.pth
}


def get_retinaface_config(name: str | RetinaFaceConfig) -> RetinaFaceConfig:
    return named(RETINAFACE_CONFIGS, name, "RetinaFace config", RetinaFaceConfig)


# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1×1 → 3×3 (with the stride) → 1×1 (4× width), BN after each."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _ResNetBody(nn.Module):
    """ResNet stem + 4 stages; returns the stage-2/3/4 maps (strides 8, 16, 32)."""

    def __init__(self, cfg: RetinaFaceConfig) -> None:
        super().__init__()
        w = cfg.stem_width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        cin = w
        for i, n in enumerate(cfg.layers):
            width = w * 2**i
            blocks = [_Bottleneck(cin, width, 1 if i == 0 else 2)]
            blocks += [_Bottleneck(width * 4, width, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width * 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class _ConvBN(nn.Sequential):
    """Conv (no bias) + BN, keys ``0.*`` / ``1.*``; ``act`` None or a LeakyReLU slope."""

    def __init__(self, cin: int, cout: int, ks: int, act: float | None) -> None:
        super().__init__(nn.Conv2d(cin, cout, ks, 1, ks // 2, bias=False), nn.BatchNorm2d(cout))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x if self.act is None else F.leaky_relu(x, self.act)


class _FPN(nn.Module):
    def __init__(self, cins: list[int], cout: int, leaky: float) -> None:
        super().__init__()
        self.output1 = _ConvBN(cins[0], cout, 1, leaky)
        self.output2 = _ConvBN(cins[1], cout, 1, leaky)
        self.output3 = _ConvBN(cins[2], cout, 1, leaky)
        self.merge1 = _ConvBN(cout, cout, 3, leaky)
        self.merge2 = _ConvBN(cout, cout, 3, leaky)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class _SSH(nn.Module):
    def __init__(self, cin: int, cout: int, leaky: float) -> None:
        super().__init__()
        self.conv3X3 = _ConvBN(cin, cout // 2, 3, None)
        self.conv5X5_1 = _ConvBN(cin, cout // 4, 3, leaky)
        self.conv5X5_2 = _ConvBN(cout // 4, cout // 4, 3, None)
        self.conv7X7_2 = _ConvBN(cout // 4, cout // 4, 3, leaky)
        self.conv7x7_3 = _ConvBN(cout // 4, cout // 4, 3, None)  # lower-case x, as the checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5_1 = self.conv5X5_1(x)
        out = [self.conv3X3(x), self.conv5X5_2(c5_1), self.conv7x7_3(self.conv7X7_2(c5_1))]
        return F.relu(torch.cat(out, dim=1))


class _Head(nn.Module):
    """1×1 conv to ``anchors · k`` channels, reshaped to ``[B, H·W·anchors, k]`` in (y, x, anchor) order."""

    def __init__(self, cin: int, anchors: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.conv1x1 = nn.Conv2d(cin, anchors * k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.k)


@dataclass(frozen=True)
class FaceDetections:
    """Detections of one image after threshold and NMS, by descending score (float32 numpy, image pixels).

    ``boxes`` [N, 4] (x1, y1, x2, y2), ``scores`` [N], ``landmarks`` [N, 5, 2] (left eye, right eye, nose,
    left and right mouth corner, in the image's left/right).
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def as_facexlib(self) -> np.ndarray:
        """facexlib's ``detect_faces`` array: ``[N, 15]`` = box (4), score, landmarks (x0, y0, ..., x4, y4)."""
        return np.concatenate([self.boxes, self.scores[:, None], self.landmarks.reshape(-1, 10)], axis=1)


class RetinaFace(nn.Module):
    """RetinaFace-ResNet50 with facexlib's parameter names; ``forward`` gives ``(loc, softmax scores, landmarks)``."""

    def __init__(self, config: str | RetinaFaceConfig = "resnet50") -> None:
        super().__init__()
        cfg = self.config = get_retinaface_config(config)
        self.body = _ResNetBody(cfg)
        c, leaky, a = cfg.out_channels, cfg.leaky, cfg.anchors_per_position
        cins = [cfg.stem_width * 2**i * 4 for i in (1, 2, 3)]  # 512, 1024, 2048
        self.fpn = _FPN(cins, c, leaky)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(c, c, leaky), _SSH(c, c, leaky), _SSH(c, c, leaky)
        self.ClassHead = nn.ModuleList(_Head(c, a, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(c, a, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(c, a, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [B, 3, H, W] BGR minus the mean -> loc [B, P, 4], scores [B, P, 2] (softmax), landmarks [B, P, 10]."""
        fpn = self.fpn(self.body(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1)
        logits = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1)
        landm = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, F.softmax(logits, dim=-1), landm

    def preprocess(self, bgr: np.ndarray) -> torch.Tensor:
        """BGR ``H × W × 3`` image (uint8 or float, 0..255) -> ``[1, 3, H, W]`` float minus (104, 117, 123)."""
        if not isinstance(bgr, np.ndarray) or bgr.ndim != 3 or bgr.shape[2] != 3:
            shape = getattr(bgr, "shape", None)
            raise ValueError(f"expected a BGR H x W x 3 numpy image, got {type(bgr).__name__} with shape {shape}")
        p = self.body.conv1.weight
        x = torch.from_numpy(np.ascontiguousarray(bgr.astype(np.float32).transpose(2, 0, 1)))[None]
        mean = torch.tensor(self.config.mean_bgr, dtype=torch.float32).view(1, 3, 1, 1)
        return (x.to(p.device) - mean.to(p.device)).to(p.dtype)

    @torch.no_grad()
    def detect(self, bgr: np.ndarray, *, conf_threshold: float = 0.97, nms_threshold: float = 0.4) -> FaceDetections:
        """All faces of a BGR image at its original size (facexlib ``detect_faces(..., use_origin_size=True)``).

        The defaults are ``FaceRestoreHelper.get_face_landmarks_5``'s (0.97) and ``detect_faces``' (0.4).
        """
        if not 0.0 <= conf_threshold < 1.0 or not 0.0 <= nms_threshold <= 1.0:
            raise ValueError(f"conf_threshold must lie in [0, 1) and nms_threshold in [0, 1], got "
                             f"{conf_threshold}, {nms_threshold}")  # fmt: skip
        x = self.preprocess(bgr)
        h, w = x.shape[2:]
        loc, conf, landm = self(x)
        cfg = self.config
        priors = prior_boxes(h, w, cfg).to(loc.device)
        scale = torch.tensor([w, h] * 2, dtype=torch.float32, device=loc.device)
        scale1 = torch.tensor([w, h] * 5, dtype=torch.float32, device=loc.device)
        boxes = (decode_boxes(loc[0].float(), priors, cfg.variances) * scale).cpu().numpy()
        lms = (decode_landmarks(landm[0].float(), priors, cfg.variances) * scale1).cpu().numpy()
        scores = conf[0, :, 1].float().cpu().numpy()
        idx = np.where(scores > conf_threshold)[0]
        boxes, lms, scores = boxes[idx], lms[idx], scores[idx]
        order = scores.argsort()[::-1]  # facexlib's order (numpy quicksort), which decides ties
        boxes, lms, scores = boxes[order], lms[order], scores[order]
        keep = nms(torch.from_numpy(boxes.copy()), torch.from_numpy(scores.copy()), nms_threshold).numpy()
        return FaceDetections(
            np.ascontiguousarray(boxes[keep]), np.ascontiguousarray(scores[keep]), lms[keep].reshape(-1, 5, 2)
        )

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        *,
        config: str | RetinaFaceConfig = "resnet50",
        source: str | os.PathLike = "<state dict>",
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device | None = None,
    ) -> RetinaFace:
        """Build from facexlib's key layout (a ``module.`` prefix is removed as facexlib does)."""
        sd = _strip_module(sd, source)
        with torch.device("meta"):
            model = cls(config)
        for key in model.state_dict():  # files saved before torch 0.4.1 have no BN batch counters
            if key.endswith("num_batches_tracked") and key not in sd:
                sd[key] = torch.zeros((), dtype=torch.long)
        assign_state_dict(model, sd, source=source, dtype=dtype, device=device)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: str | RetinaFaceConfig = "resnet50",
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device | None = None,
    ) -> RetinaFace:
        """Load facexlib's ``detection_Resnet50_Final.pth`` (safe ``torch.load(weights_only=True)``) or a safetensors
        copy."""
        path = Path(path)
        return cls.from_state_dict(read_weights(path), config=config, source=str(path), dtype=dtype, device=device)


def _strip_module(sd: Mapping, source: str | os.PathLike) -> StateDict:
    out = {(k[len("module."):] if str(k).startswith("module.") else k): v for k, v in sd.items()}
    if "body.conv1.weight" not in out:
        hint = ""
        if "body.stage1.0.0.weight" in out:
            hint = " This is the MobileNet-0.25 RetinaFace; fastface implements the ResNet-50 one."
        raise WeightFormatError(
            f"{source}: not facexlib's RetinaFace-ResNet50 weights (no 'body.conv1.weight'; first keys: "
            f"{sorted(map(str, out))[:5]}).{hint} Expected detection_Resnet50_Final.pth."
        )
    bad = [k for k, v in out.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightFormatError(f"{source}: entries that are not tensors: {sorted(map(str, bad))[:5]}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Priors, decoding, NMS, face choice (pure functions)
# ----------------------------------------------------------------------------------------------------------------


def prior_boxes(height: int, width: int, config: str | RetinaFaceConfig = "resnet50") -> torch.Tensor:
    """Anchors ``[P, 4]`` (cx, cy, w, h in units of the image size) in the heads' (level, y, x, anchor) order.

    Computed in float64 and rounded to float32 once, as facexlib's Python-float ``PriorBox``.
    """
    cfg = get_retinaface_config(config)
    out = []
    for step, sizes in zip(cfg.steps, cfg.min_sizes):
        fh, fw = -(-height // step), -(-width // step)  # ceil
        cy = (np.arange(fh, dtype=np.float64) + 0.5) * step / height
        cx = (np.arange(fw, dtype=np.float64) + 0.5) * step / width
        s = np.asarray(sizes, dtype=np.float64)
        a = np.empty((fh, fw, len(sizes), 4), dtype=np.float64)
        a[..., 0] = cx[None, :, None]
        a[..., 1] = cy[:, None, None]
        a[..., 2] = s / width
        a[..., 3] = s / height
        out.append(a.reshape(-1, 4))
    return torch.from_numpy(np.concatenate(out).astype(np.float32))


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float]) -> torch.Tensor:
    """Box regressions ``[P, 4]`` -> corners (x1, y1, x2, y2) in units of the image size."""
    centre = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1])
    top_left = centre - size / 2
    return torch.cat([top_left, size + top_left], dim=1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float]) -> torch.Tensor:
    """Landmark regressions ``[P, 10]`` -> (x0, y0, ..., x4, y4) in units of the image size."""
    pts = pre.reshape(-1, 5, 2)
    return (priors[:, None, :2] + pts * variances[0] * priors[:, None, 2:]).reshape(-1, 10)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression with torchvision ``ops.nms`` semantics: indices kept, by decreasing score.

    A box is dropped when its IoU with a kept higher-scoring box exceeds ``iou_threshold`` (compared in float64,
    as torchvision's C++ kernel does); areas are ``(x2 - x1)(y2 - y1)``. Equal scores keep their input order.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms expects boxes [N, 4] and scores [N], got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    order = torch.argsort(scores, descending=True, stable=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for n in range(len(order)):
        i = order[n]
        if suppressed[i]:
            continue
        keep.append(int(i))
        rest = order[n + 1 :]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou.double() > iou_threshold]] = True
    return torch.tensor(keep, dtype=torch.long)


def center_face_index(boxes: np.ndarray, height: int, width: int) -> int:
    """Index of the box whose centre is nearest to the image centre (facexlib ``get_center_face``; first on ties)."""
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[0] == 0 or boxes.shape[1] < 4:
        raise ValueError(f"center_face_index needs at least one box [N, >=4], got shape {boxes.shape}")
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    dist = np.linalg.norm(centres - np.array([width / 2, height / 2]), axis=1)
    return int(np.argmin(dist))
