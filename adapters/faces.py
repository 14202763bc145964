"""Face analysis for the identity adapters, on insightface (SCRFD detection, ArcFace embedding, 5-point alignment).

``FaceAnalyzer(root)`` loads an insightface model pack (``buffalo_l`` for IP-Adapter FaceID / FaceID-Plus-v2,
``antelopev2`` for PuLID) from ``root/models/<pack>/*.onnx``, and never downloads. ``analyze(image)`` returns a
:class:`FaceInfo`: the 512-d L2-normalised ArcFace embedding (``normed_embedding``), the raw embedding, the
5 keypoints, the box, the detection score and the ``norm_crop`` aligned crop for the CLIP image encoder.

Channel order: insightface is always given BGR. The CLIP crop is BGR by default, as in the official IP-Adapter
and FastFace code (they feed that BGR crop unchanged to the RGB-trained CLIP); ``crop_channels="rgb"`` gives a
true-colour crop instead. Either way the crop is meant for ``clip_preprocess(face.crop)`` unchanged.

Several photos of one person: :func:`average_faces` (or ``FaceAnalyzer.identity``) averages the unit embeddings
and re-normalises, so every photo counts equally and the result stays on the unit sphere the adapters were
trained on (the plain mean of unit vectors is shorter than 1, which would act like a weaker identity).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fastface.hub import find_pack_folder, insightface_pack_url
from fastface.models.loading import WeightFormatError

# insightface 0.7 imports albumentations, which checks PyPI for updates at import unless this is set: no network at
# import (set before any insightface import, here and in fastface.hub).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

logger = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
Choice = Union[Literal["largest", "score"], int]

DEFAULT_DET_SIZES = (640, 576, 512, 448, 384, 320)
EMBEDDING_DIM = 512


class ImageReadError(ValueError):
    """An image could not be read or is not a usable picture (names the file or input)."""


class NoFaceError(ValueError):
    """No face was detected in an image, at any of the detector sizes tried."""


def _frozen(a: np.ndarray | None, dtype: type | None = None) -> np.ndarray | None:
    if a is None:
        return None
    a = np.array(a, dtype=dtype, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class FaceInfo:
    """One identity: a detected face, an average of several, or a precomputed embedding (all arrays read-only).

    embedding:     [512] float32, unit L2 norm (insightface ``normed_embedding``; FaceID's input).
    raw_embedding: [512] float32 or None, the recognizer output before normalisation (PuLID's input).
    kps:           [5, 2] float32 keypoints in source-image pixels (eyes, nose, mouth corners), or None.
    bbox:          [4] float32 ``x1, y1, x2, y2`` in source-image pixels, or None.
    crop:          [S, S, 3] uint8 aligned face (``norm_crop``, S=224 by default) in ``crop_channels`` order, or None.
    score:         detection score (mean over the photos for an average), or None.
    source:        where it came from (a file name, ``<array>``, ``precomputed`` ...), for messages.
    crop_channels: ``"bgr"`` (the reference's CLIP input) or ``"rgb"``.
    crops:         every aligned crop behind this identity (one per photo for an average; ``(crop,)`` otherwise).
    """

    embedding: np.ndarray
    raw_embedding: np.ndarray | None = None
    kps: np.ndarray | None = None
    bbox: np.ndarray | None = None
    crop: np.ndarray | None = None
    score: float | None = None
    source: str = "precomputed"
    crop_channels: Literal["bgr", "rgb"] = "bgr"
    crops: tuple[np.ndarray, ...] = field(default=())

    def __post_init__(self) -> None:
        emb = np.asarray(self.embedding, dtype=np.float32)
        if emb.ndim != 1 or not np.all(np.isfinite(emb)) or abs(float(np.linalg.norm(emb)) - 1.0) > 1e-3:
            raise ValueError(
                f"{self.source}: FaceInfo.embedding must be a finite 1-D unit vector, got shape {emb.shape}; "
                "use FaceInfo.from_embedding() to normalise a raw embedding"
            )
        if self.crop_channels not in ("bgr", "rgb"):
            raise ValueError(f"crop_channels must be 'bgr' or 'rgb', got {self.crop_channels!r}")
        crops = tuple(np.asarray(c) for c in self.crops) or ((np.asarray(self.crop),) if self.crop is not None else ())
        for c in crops:
            if c.dtype != np.uint8 or c.ndim != 3 or c.shape[2] != 3:
                raise ValueError(f"{self.source}: a face crop must be a uint8 H x W x 3 array, got {c.dtype} {c.shape}")
        set_ = object.__setattr__
        set_(self, "embedding", _frozen(emb))
        set_(self, "raw_embedding", _frozen(self.raw_embedding, np.float32))
        set_(self, "kps", _frozen(self.kps, np.float32))
        set_(self, "bbox", _frozen(self.bbox, np.float32))
        set_(self, "crops", tuple(_frozen(c) for c in crops))
        set_(self, "crop", self.crops[0] if self.crops else None)
        set_(self, "score", None if self.score is None else float(self.score))

    @classmethod
    def from_embedding(
        cls,
        embedding: np.ndarray | Sequence[float],
        *,
        crop: np.ndarray | None = None,
        raw_embedding: np.ndarray | None = None,
        crop_channels: Literal["bgr", "rgb"] = "bgr",
        source: str = "precomputed",
    ) -> FaceInfo:
        """An identity from a precomputed ArcFace embedding (normalised here) and, for FaceID-Plus-v2, an aligned crop.

        ``embedding`` may be raw or normalised (a torch CPU tensor works too); if ``raw_embedding`` is not given
        it is the embedding as passed. ``crop`` is a uint8 ``H x W x 3`` aligned face in ``crop_channels`` order.
        """
        e = np.asarray(embedding, dtype=np.float32)
        if e.ndim == 2 and e.shape[0] == 1:  # [1, 512], as some pipelines store it
            e = e[0]
        if e.shape != (EMBEDDING_DIM,):
            raise ValueError(f"{source}: expected a {EMBEDDING_DIM}-d face embedding, got shape {e.shape}")
        norm = float(np.linalg.norm(e))
        if not np.isfinite(norm) or norm < 1e-12:
            raise ValueError(f"{source}: the face embedding is zero or not finite; cannot normalise it")
        raw = e if raw_embedding is None else np.asarray(raw_embedding, dtype=np.float32)
        if raw.shape != (EMBEDDING_DIM,):
            raise ValueError(f"{source}: expected a {EMBEDDING_DIM}-d raw embedding, got shape {raw.shape}")
        if crop is not None:
            crop = np.asarray(crop)
        return cls(embedding=e / norm, raw_embedding=raw, crop=crop, crop_channels=crop_channels, source=source)


def average_faces(faces: Sequence[FaceInfo]) -> FaceInfo:
    """One identity from several photos of one person.

    ``embedding = normalize(mean_i(embedding_i))``: each photo counts equally. ``raw_embedding`` (when all faces
    have one) has the same direction, scaled to the mean raw norm. ``crops`` keeps every crop (``crop`` is the
    first); ``kps``/``bbox`` are None (they belong to single photos); ``score`` is the mean detection score.
    """
    faces = list(faces)
    if not faces:
        raise ValueError("average_faces needs at least one face")
    if len(faces) == 1:
        return faces[0]
    dims = {f.embedding.shape for f in faces}
    if len(dims) != 1:
        raise ValueError(f"cannot average embeddings of different sizes: {sorted(dims)}")
    orders = {f.crop_channels for f in faces if f.crops}
    if len(orders) > 1:
        raise ValueError("cannot average faces whose crops have different channel orders (bgr and rgb)")
    mean = np.mean([f.embedding for f in faces], axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-6:
        raise ValueError("the reference embeddings cancel out (their mean is ~0); are these photos of one person?")
    unit = mean / norm
    raw = None
    if all(f.raw_embedding is not None for f in faces):
        raw = unit * float(np.mean([np.linalg.norm(f.raw_embedding) for f in faces]))
    scores = [f.score for f in faces if f.score is not None]
    return FaceInfo(
        embedding=unit,
        raw_embedding=raw,
        score=float(np.mean(scores)) if scores else None,
        source="average of: " + ", ".join(f.source for f in faces),
        crop_channels=orders.pop() if orders else "bgr",
        crops=tuple(c for f in faces for c in f.crops),
    )


def load_image(
    image: ImageInput, *, channels: Literal["rgb", "bgr"] = "rgb", source: str | None = None
) -> tuple[np.ndarray, str]:
    """Read an image into a ``(BGR uint8 H x W x 3 array, source name)`` pair.

    Accepts a file path (EXIF orientation applied, like ``cv2.imread``), a PIL image, or a uint8 numpy array
    ``H x W`` (grayscale), ``H x W x 1``, ``H x W x 3`` or ``H x W x 4``; ``channels`` names the order of a 3/4
    channel array (``"rgb"``/RGBA or ``"bgr"``/BGRA, e.g. from ``cv2.imread``). Grayscale is replicated to
    3 channels; an alpha channel is composited onto white (opaque pixels are unchanged).
    """
    if channels not in ("rgb", "bgr"):
        raise ValueError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        name = source or str(path)
        if not path.is_file():
            raise ImageReadError(f"{name}: no such image file")
        try:
            with Image.open(path) as im:
                im.load()
                pil = ImageOps.exif_transpose(im) or im
                rgb = _pil_to_rgb(pil)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ImageReadError(
                f"{name}: cannot read this image file ({exc}); is it a damaged or non-image file?"
            ) from exc
    elif isinstance(image, Image.Image):
        name = source or getattr(image, "filename", "") or "<PIL image>"
        rgb = _pil_to_rgb(image)
    elif isinstance(image, np.ndarray):
        name = source or f"<array {image.shape}>"
        rgb = _array_to_rgb(image, channels, name)
    else:
        raise ImageReadError(
            f"{source or '<input>'}: unsupported image type {type(image).__name__}; pass a file path, a PIL image "
            "or a uint8 numpy array"
        )
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageReadError(f"{name}: the image is empty ({rgb.shape[1]}x{rgb.shape[0]})")
    return np.ascontiguousarray(rgb[..., ::-1]), name


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L"):  # 16-bit grayscale: keep the top 8 bits
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 256.0).clip(0, 255).astype(np.uint8))
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(im.convert("RGB"))


def _array_to_rgb(a: np.ndarray, channels: str, name: str) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ImageReadError(f"{name}: expected a uint8 image array (0..255), got dtype {a.dtype}; convert it first")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageReadError(f"{name}: expected an H x W, H x W x 3 or H x W x 4 array, got shape {a.shape}")
    if channels == "bgr":
        a = a[..., [2, 1, 0, 3][: a.shape[2]]]
    if a.shape[2] == 4:
        alpha = a[..., 3:].astype(np.float32) / 255.0
        a = np.rint(a[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return a


def find_model_pack(root: str | os.PathLike, name: str) -> Path:
    """The folder of the ``.onnx`` files of pack ``name`` under ``root`` (insightface layout ``root/models/<name>``).

    Also accepts the layout that unzipping ``antelopev2.zip`` into ``models/antelopev2`` produces
    (``models/antelopev2/antelopev2/*.onnx``). Raises :class:`WeightFormatError` saying where it looked.
    """
    root = Path(root).expanduser()
    folder = root / "models" / name
    found = find_pack_folder(root, name)
    if found is not None:
        return found
    hint = ""
    if (root / name).is_dir():
        hint = f" There is a folder {root / name}: pass root={root.parent} (the folder that contains 'models/')."
    raise WeightFormatError(
        f"insightface model pack {name!r} not found: looked for {folder}/*.onnx (and {folder / name}/*.onnx)."
        f"{hint} FaceAnalyzer never downloads models: download=True (the CLI's --download, or `fastface doctor "
        f"--faces-only --download`) fetches it from {insightface_pack_url(name)} (insightface's own URL), or unzip "
        f"that file so that the .onnx files are in {folder}, or point face_root= (the CLI's --face-root; here "
        f"root=) at an existing insightface folder (default ~/.insightface)."
    )


class FaceAnalyzer:
    """insightface detection + ArcFace recognition + alignment, with size retries and explicit channel order.

    ``root`` contains ``models/<pack>/*.onnx``. Only the detection and recognition models of the pack are loaded.
    ``det_sizes``: the detector runs at the first size and retries at the next ones while no face is found
    (the FastFace evaluation's sequence). ``providers``: onnxruntime providers (default: CUDA if available, CPU).
    """

    def __init__(
        self,
        root: str | os.PathLike = "~/.insightface",
        *,
        pack: str = "buffalo_l",
        det_sizes: Sequence[int] = DEFAULT_DET_SIZES,
        det_thresh: float = 0.5,
        crop_size: int = 224,
        crop_channels: Literal["bgr", "rgb"] = "bgr",
        providers: Sequence[str] | None = None,
    ) -> None:
        if crop_channels not in ("bgr", "rgb"):
            raise ValueError(f"crop_channels must be 'bgr' or 'rgb', got {crop_channels!r}")
        if crop_size % 112 and crop_size % 128:
            raise ValueError(f"crop_size must be a multiple of 112 or 128 (insightface norm_crop), got {crop_size}")
        if not det_sizes or any(int(s) <= 0 or int(s) % 32 for s in det_sizes):
            raise ValueError(f"det_sizes must be positive multiples of 32, got {tuple(det_sizes)}")
        self.det_sizes = tuple(int(s) for s in det_sizes)
        self.crop_size = crop_size
        self.crop_channels = crop_channels
        self.pack = pack
        root = Path(root).expanduser()
        self.folder = find_model_pack(root, pack)
        self._app = _load_face_analysis(root, self.folder, providers, det_thresh, self.det_sizes[0])
        self.detector = self._app.models["detection"]
        self.recognizer = self._app.models["recognition"]
        if not self.detector.use_kps:
            raise WeightFormatError(
                f"{self.folder}: the face detection model outputs no keypoints, so faces cannot be aligned; "
                "use a keypoint detector such as buffalo_l's det_10g.onnx"
            )
        fixed = self.detector.input_shape[2]
        if isinstance(fixed, int):  # a detector exported with a fixed input size cannot be run at other sizes
            logger.info("%s: detector input is fixed at %s; size retries disabled", self.folder, fixed)
            self.det_sizes = (fixed,)

    def detect(
        self, image: ImageInput, *, channels: Literal["rgb", "bgr"] = "rgb", source: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, str]:
        """All faces of one image: ``(bgr image, bboxes [N,5] with scores, kps [N,5,2], size used, source)``.

        Faces come in insightface order (descending score after NMS). Raises :class:`NoFaceError` if no size finds one.
        """
        bgr, name = load_image(image, channels=channels, source=source)
        for size in self.det_sizes:
            bboxes, kpss = self.detector.detect(bgr, input_size=(size, size), max_num=0, metric="default")
            if len(bboxes):
                logger.debug("%s: %d face(s) at detector size %d", name, len(bboxes), size)
                return bgr, bboxes, kpss, size, name
        sizes = ", ".join(str(s) for s in self.det_sizes)
        raise NoFaceError(
            f"{name}: no face found (detection was tried at sizes {sizes} with threshold {self.detector.det_thresh}). "
            "Use a photo where one face is clearly visible, frontal and not cut off."
        )

    def analyze(
        self,
        image: ImageInput,
        *,
        choose: Choice = "largest",
        channels: Literal["rgb", "bgr"] = "rgb",
        source: str | None = None,
    ) -> FaceInfo:
        """The :class:`FaceInfo` of one face of an image.

        ``choose``: ``"largest"`` box area (default; PuLID's choice), ``"score"`` highest detection score
        (the IP-Adapter/FastFace reference's ``faces[0]``), or an int index into insightface's score order.
        ``channels`` is the order of a numpy array input (see :func:`load_image`).
        """
        from insightface.app.common import Face

        bgr, bboxes, kpss, _, name = self.detect(image, channels=channels, source=source)
        i = _choose(bboxes, choose, name)
        face = Face(bbox=bboxes[i, :4], kps=kpss[i], det_score=bboxes[i, 4])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # skimage >= 0.26: SimilarityTransform.estimate deprecation
            self.recognizer.get(bgr, face)
            crop = _norm_crop(bgr, face.kps, self.crop_size)
        if self.crop_channels == "rgb":
            crop = crop[..., ::-1]
        return FaceInfo(
            embedding=face.normed_embedding,
            raw_embedding=face.embedding,
            kps=face.kps,
            bbox=face.bbox,
            crop=np.ascontiguousarray(crop),
            score=float(face.det_score),
            source=name,
            crop_channels=self.crop_channels,
        )

    def identity(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        choose: Choice = "largest",
        channels: Literal["rgb", "bgr"] = "rgb",
    ) -> FaceInfo:
        """One identity from one or several photos of the same person (see :func:`average_faces`)."""
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("identity() needs at least one image")
        return average_faces([self.analyze(im, choose=choose, channels=channels) for im in images])


def _choose(bboxes: np.ndarray, choose: Choice, name: str) -> int:
    n = len(bboxes)
    if choose == "largest":
        return int(np.argmax((bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])))
    if choose == "score":
        return int(np.argmax(bboxes[:, 4]))
    if isinstance(choose, (int, np.integer)) and not isinstance(choose, bool):
        if not -n <= choose < n:
            raise ValueError(f"{name}: face index {choose} requested, but {n} face(s) were found")
        return int(choose) % n
    raise ValueError(f"choose must be 'largest', 'score' or an int index, got {choose!r}")


def _norm_crop(bgr: np.ndarray, kps: np.ndarray, size: int) -> np.ndarray:
    from insightface.utils import face_align

    return face_align.norm_crop(bgr, landmark=kps, image_size=size)


def _load_face_analysis(root: Path, folder: Path, providers: Sequence[str] | None, det_thresh: float, det_size: int):
    """insightface ``FaceAnalysis`` on an existing pack folder (its prints are routed to the debug log)."""
    import onnxruntime
    from insightface.app import FaceAnalysis

    if providers is None:
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    # FaceAnalysis looks in root/models/<name>; that folder exists, so its download branch is never taken.
    name = folder.relative_to(root / "models").as_posix()  # "buffalo_l", or "antelopev2/antelopev2"
    onnx_files = sorted(p.name for p in folder.glob("*.onnx"))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            app = FaceAnalysis(
                name=name, root=str(root), allowed_modules=["detection", "recognition"], providers=list(providers)
            )
            app.prepare(ctx_id=0, det_thresh=det_thresh, det_size=(det_size, det_size))
    except AssertionError as exc:  # FaceAnalysis asserts that a detection model was found
        raise WeightFormatError(f"{folder}: no face detection model recognised among {onnx_files}") from exc
    except Exception as exc:  # onnxruntime raises its own types for damaged files
        if type(exc).__module__.startswith("onnxruntime") or isinstance(exc, (OSError, RuntimeError)):
            raise WeightFormatError(
                f"{folder}: an .onnx file of the pack could not be loaded ({exc}); download the pack again"
            ) from exc
        raise
    finally:
        for line in out.getvalue().splitlines():
            logger.debug("insightface: %s", line)
    if "recognition" not in app.models:
        raise WeightFormatError(
            f"{folder}: no face recognition (ArcFace) model recognised among {onnx_files}"
        )
    return app


__all__ = [
    "DEFAULT_DET_SIZES",
    "FaceAnalyzer",
    "FaceInfo",
    "ImageReadError",
    "NoFaceError",
    "average_faces",
    "find_model_pack",
    "load_image",
]
