"""PuLID's parts of a :class:`fastface.Pipeline`: the adapter file, the face models for photos, and identities.

* :func:`load_pulid`: ``pulid_v1.bin`` / ``pulid_v1.1.safetensors`` (fp32), checked against the adapter preset.
* Face models, needed for photos only and found before any is loaded (:func:`open_pulid_preprocessor`):
  antelopev2 (:func:`fastface.pipeline_loading.open_face_analyzer`), EVA02-CLIP-L-14-336 (:func:`load_eva`, from the
  Hugging Face cache), facexlib's BiSeNet ``parsing_bisenet.pth`` (:func:`find_face_parser`, required) and
  facexlib's RetinaFace-R50 ``detection_Resnet50_Final.pth`` (:func:`find_face_detector`, optional: with it photos
  are aligned as upstream, without it with insightface's keypoints and a warning). Both facexlib files are GitHub
  release assets, looked for in ``<face_root>/models/facexlib/`` and facexlib's own ``weights/`` folder and
  downloaded only on request.
* Identities: :class:`PuLIDIdentity` (the encoder inputs of one person, one row per photo, and the alignment used),
  :func:`prepare_pulid_identity` (photos, PuLID face files -> one identity), :func:`load_pulid_face_file` and
  :func:`save_pulid_face_file` (docs/usage.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastface.adapters.faces import FaceInfo, ImageReadError
from fastface.adapters.pulid import PuLID
from fastface.adapters.pulid_faces import PuLIDFaceInputs, PuLIDFacePreprocessor, load_bisenet
from fastface.hub import WeightNotFoundError, is_offline, resolve
from fastface.models.eva_clip import EVA_VISION_CONFIGS, EVAVisionTower
from fastface.models.loading import WeightFormatError, read_safetensors, read_weights
from fastface.models.retinaface import RetinaFace
from fastface.pipeline_loading import PathLike, open_face_analyzer
from fastface.presets import AdapterPreset

logger = logging.getLogger(__name__)

__all__ = [
    "PuLIDIdentity", "prepare_pulid_identity", "load_pulid_face_file", "save_pulid_face_file", "load_pulid",
    "find_face_parser", "find_face_detector", "load_eva", "check_pulid_eva", "open_pulid_preprocessor",
    "alignment_of", "ALIGN_RETINAFACE", "ALIGN_KEYPOINTS",
]

ALIGN_RETINAFACE = "retinaface"  # upstream: facexlib RetinaFace-R50, 5 points of the face nearest the centre
ALIGN_KEYPOINTS = "insightface-keypoints"  # fallback: antelopev2 (SCRFD) keypoints of the largest face


def alignment_of(preprocessor: PuLIDFacePreprocessor) -> str:
    """How a preprocessing aligns faces: :data:`ALIGN_RETINAFACE` or :data:`ALIGN_KEYPOINTS`."""
    return ALIGN_KEYPOINTS if preprocessor.detector is None else ALIGN_RETINAFACE


def load_pulid(adapter: AdapterPreset, path: Path, device: torch.device) -> PuLID:
    """The PuLID file, in fp32 as upstream runs its encoder (the UNet may be fp16); its version must be the preset's."""
    try:
        pulid = PuLID.from_file(path, dtype=torch.float32, device=device)
    except WeightFormatError as exc:
        raise WeightFormatError(f"{exc} (adapter {adapter.name!r} needs guozinan/PuLID's "
                                f"{getattr(adapter.weights, 'filename', 'PuLID file')})") from exc
    if pulid.version != adapter.pulid_version:
        right = {"v1": "pulid", "v1.1": "pulid-v1.1"}[pulid.version]
        raise WeightFormatError(
            f"{path}: this is a PuLID {pulid.version} file, but the adapter preset {adapter.name!r} is PuLID "
            f"{adapter.pulid_version}; use --adapter {right} (adapter={right!r}) or the matching file"
        )
    return pulid


PULID_FACE_FORMAT = "fastface-pulid-v1"
_FACEXLIB_SUBDIR = ("models", "facexlib")  # under the face root, next to insightface's models/<pack>


@dataclass(frozen=True, eq=False)
class PuLIDIdentity:
    """One person's PuLID encoder inputs, one row per photo (reference/id-adapters.md 4.5).

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
    "`fastface embed --adapter pulid --face PHOTO -o me.safetensors` (fastface.save_pulid_face_file)"
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
    try:
        sd = read_safetensors(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            alignment = (f.metadata() or {}).get("alignment")
    except WeightFormatError as exc:
        raise ValueError(str(exc)) from exc
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


def _face_root(root: PathLike | None) -> Path:
    return Path(os.path.expanduser(os.fspath(root or "~/.insightface")))


def _facexlib_weights_dir() -> Path | None:
    """facexlib's own download folder (``<site-packages>/facexlib/weights``), found without importing facexlib."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("facexlib")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "weights"


def _download_url(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` through a temporary file (no partial file is left behind)."""
    import shutil
    import tempfile
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=dest.name, suffix=".part", delete=False) as tmp:
        part = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310  (a fixed https URL)
                shutil.copyfileobj(response, tmp)
        except BaseException:
            tmp.close()
            part.unlink(missing_ok=True)
            raise
    part.replace(dest)


def _find_facexlib_file(
    name: str, url: str | None, what: str, face_root: PathLike | None, download: bool
) -> tuple[Path | None, list[Path], str]:
    """Look for facexlib's weight file ``name`` in ``<face_root>/models/facexlib/`` and facexlib's ``weights/``
    folder; fetch it from ``url`` into the first only with ``download`` (and ``HF_HUB_OFFLINE`` unset).

    Returns (the file or None, the folders searched, why a download did not happen or failed, or "").
    """
    folder = _face_root(face_root).joinpath(*_FACEXLIB_SUBDIR)
    places = [folder] + [d for d in (_facexlib_weights_dir(),) if d is not None]
    for place in places:
        if (place / name).is_file():
            return place / name, places, ""
    if download and url and not is_offline():
        logger.warning("downloading facexlib's %s %s into %s", what, url, folder)
        try:
            _download_url(url, folder / name)
            return folder / name, places, ""
        except Exception as exc:  # network problems: reported by the caller
            return None, places, f"The download failed ({type(exc).__name__}: {exc}). "
    if download and url:
        return None, places, "Downloads were allowed but HF_HUB_OFFLINE is set, so the network was not used. "
    return None, places, ""


def _how_to_get(name: str, url: str | None, places: list[Path]) -> str:
    return f"download {url} into {places[0]}" if url else f"put {name} into {places[0]}"


def _given_file(path: PathLike, what: str) -> Path:
    """A file the caller named explicitly: it must exist (else a WeightNotFoundError naming ``what``)."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_file():
        raise WeightNotFoundError(f"{p}: no such {what}")
    return p


def find_face_parser(
    adapter: AdapterPreset, face_root: PathLike | None = None, path: PathLike | None = None, *, download: bool = False
) -> Path:
    """facexlib's BiSeNet face-parsing weights (``parsing_bisenet.pth``) for PuLID.

    ``path`` (``face_parser=`` / ``--face-parser``) is used as given. Otherwise the file is looked for in
    ``<face_root>/models/facexlib/`` (``face_root`` default ``~/.insightface``, the folder of the insightface packs)
    and in facexlib's own download folder if facexlib is installed. The weights are a GitHub release asset, not on
    the Hugging Face hub: with ``download`` (and ``HF_HUB_OFFLINE`` unset) a missing file is fetched from
    ``adapter.face_parser`` into ``<face_root>/models/facexlib/``; otherwise it is a one-line
    :class:`~fastface.hub.WeightNotFoundError` saying how to get it.
    """
    if path is not None:
        return _given_file(path, f"BiSeNet face-parsing file (facexlib's parsing_bisenet.pth, from {adapter.face_parser})")
    name = adapter.face_parser_file
    if name is None:
        raise ValueError(f"adapter {adapter.name!r} uses no face parser")
    url = adapter.face_parser if "://" in adapter.face_parser else None
    found, places, reason = _find_facexlib_file(name, url, "BiSeNet face-parsing weights", face_root, download)
    if found is not None:
        return found
    raise WeightNotFoundError(
        f"PuLID's face parser (facexlib BiSeNet, {name}) was not found in {' or '.join(map(str, places))}. {reason}"
        f"To get it: {_how_to_get(name, url, places)} (it is a GitHub release asset, not on the Hugging Face hub); "
        "or pass face_parser= / --face-parser PATH; or allow downloads (download=True, or the CLI's --download)."
    )


def find_face_detector(
    adapter: AdapterPreset, face_root: PathLike | None = None, path: PathLike | None = None, *, download: bool = False
) -> Path | None:
    """facexlib's RetinaFace-R50 weights (``detection_Resnet50_Final.pth``), with which PuLID aligns as upstream.

    ``path`` (``face_detector=`` / ``--face-detector``) must exist (else :class:`~fastface.hub.WeightNotFoundError`).
    Otherwise it is looked for and downloaded (only with ``download``) like :func:`find_face_parser`, from
    ``adapter.face_detector``. Not found: None, with a logged warning that photos are aligned with insightface's
    keypoints instead (not upstream's alignment) and how to get the file.
    """
    if path is not None:
        return _given_file(path, f"RetinaFace file (facexlib's detection_Resnet50_Final.pth, from {adapter.face_detector})")
    name = adapter.face_detector_file
    if name is None:
        return None  # a preset without RetinaFace: insightface keypoints by design
    url = adapter.face_detector if "://" in adapter.face_detector else None
    found, places, reason = _find_facexlib_file(name, url, "RetinaFace-R50 detector weights", face_root, download)
    if found is None:
        logger.warning(
            "PuLID: facexlib's RetinaFace weights (%s) were not found in %s. %sPhotos are aligned with insightface's "
            "antelopev2 keypoints of the largest face instead, which differs from upstream (RetinaFace landmarks of "
            "the face nearest the image centre): other landmarks shift and rotate the 512x512 crop, and in a photo "
            "with several faces another face may be aligned. To align as upstream: %s (a GitHub release asset, not "
            "on the Hugging Face hub), or pass face_detector= / --face-detector PATH, or allow downloads "
            "(download=True, or the CLI's --download).",
            name, " or ".join(map(str, places)), reason, _how_to_get(name, url, places),
        )
    return found


def load_eva(path: PathLike, *, device: torch.device | str = "cpu") -> EVAVisionTower:
    """The EVA02-CLIP vision tower of a checkpoint (``visual.*`` keys; fp32, as PuLID runs it). The config is the
    named one (:data:`fastface.models.eva_clip.EVA_VISION_CONFIGS`) whose shapes the file has."""
    path = Path(path)
    sd = read_weights(path)
    errors = []
    for name in EVA_VISION_CONFIGS:
        try:
            return EVAVisionTower.from_state_dict(sd, config=name, source=str(path), dtype=torch.float32, device=device)
        except WeightFormatError as exc:
            errors.append(exc)
    raise WeightFormatError(f"{errors[0]} (PuLID needs QuanSun/EVA-CLIP EVA02_CLIP_L_336_psz14_s6B.pt)")


def check_pulid_eva(adapter: PuLID, eva: EVAVisionTower, source: str) -> None:
    """The EVA tower must give the inputs the PuLID encoder takes (512 + CLS projection width, hidden width, layers)."""
    c, e = adapter.config, eva.config
    if (c.id_dim, c.vit_dim, c.num_vit_layers) != (512 + e.embed_dim, e.width, len(e.hidden_layers)):
        raise WeightFormatError(
            f"{source}: this EVA tower gives id_cond of width {512 + e.embed_dim}, hidden states of width {e.width} "
            f"from {len(e.hidden_layers)} layers, but the PuLID file ({adapter.source}) expects {c.id_dim}, "
            f"{c.vit_dim} and {c.num_vit_layers}; PuLID needs EVA02-CLIP-L-14-336"
        )


def open_pulid_preprocessor(
    adapter: AdapterPreset,
    *,
    face_root: PathLike | None = None,
    eva: PathLike | None = None,
    face_parser: PathLike | None = None,
    face_detector: PathLike | None = None,
    device: torch.device | str = "cpu",
    download: bool = False,
    cache_dir: PathLike | None = None,
    pulid: PuLID | None = None,
) -> tuple[PuLIDFacePreprocessor, dict[str, str]]:
    """PuLID's photo preprocessing (antelopev2 + RetinaFace if found + BiSeNet + EVA02-CLIP, all fp32 on ``device``)
    and the files used (``eva``, ``face_parser``, and ``face_detector`` when RetinaFace aligns).

    ``eva``/``face_parser``/``face_detector``: local files replacing the preset's (EVA from the Hugging Face cache,
    BiSeNet from :func:`find_face_parser`, RetinaFace from :func:`find_face_detector`; without RetinaFace the faces
    are aligned with insightface's keypoints, with a warning). Every file is found before any is loaded. ``pulid``:
    check the EVA tower against it.
    """
    eva_path = resolve(eva if eva is not None else adapter.eva, cache_dir=cache_dir, download=download)
    parser_path = find_face_parser(adapter, face_root, face_parser, download=download)
    detector_path = find_face_detector(adapter, face_root, face_detector, download=download)
    analyzer = open_face_analyzer(face_root, adapter.face_pack, download=download)
    tower = load_eva(eva_path, device=device)
    if pulid is not None:
        check_pulid_eva(pulid, tower, str(eva_path))
    bisenet = load_bisenet(parser_path, device=device)
    used = {"eva": str(eva_path), "face_parser": str(parser_path)}
    detector = None
    if detector_path is not None:
        detector = RetinaFace.from_pretrained(detector_path, device=device)
        used["face_detector"] = str(detector_path)
        logger.info("PuLID: photos are aligned as upstream, with facexlib's RetinaFace-R50 from %s", detector_path)
    return PuLIDFacePreprocessor(analyzer, bisenet, tower, detector=detector), used
