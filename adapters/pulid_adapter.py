"""PuLID v1 / v1.1 as identity adapters of the pipeline (``pulid``, ``pulid-v1.1``).

* :func:`load_pulid`: ``pulid_v1.bin`` / ``pulid_v1.1.safetensors`` (fp32), checked against the preset.
* Face models, needed for photos only and found before any is loaded (:func:`open_pulid_preprocessor`):
  antelopev2 (:func:`fastface.face_files.open_face_analyzer`), EVA02-CLIP-L-14-336 (:func:`load_eva`, from the
  Hugging Face cache), facexlib's BiSeNet ``parsing_bisenet.pth`` (:func:`find_face_parser`, required) and
  facexlib's RetinaFace-R50 ``detection_Resnet50_Final.pth`` (:func:`find_face_detector`, optional: with it photos
  are aligned as upstream, without it with insightface's keypoints and a warning). Both facexlib files are GitHub
  release assets, looked for in ``<face_root>/models/facexlib/`` and facexlib's own ``weights/`` folder and
  downloaded only on request (:func:`pulid_face_needs`, :mod:`fastface.needs`).
* :class:`PuLIDAdapter`: the contract (:mod:`fastface.adapters.base`); options ``mode`` (zero tokens +
  projection, :data:`~fastface.adapters.pulid.PULID_MODES`) and ``id_mix``; identities are
  :class:`~fastface.adapters.pulid_identity.PuLIDIdentity` (photos or PuLID face files; no bare embeddings).
  The identity tokens stay fp32 (PuLID's id_to_k/v run in fp32, as upstream); the null identity is the encoder
  applied to zero inputs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fastface.adapters.base import (
    AdapterOption,
    AdapterOptionError,
    AdapterPreset,
    FacePreparer,
    FaceSettings,
    IdentityAdapter,
    InstallHandle,
)
from fastface.adapters.pulid import PULID_ENCODER_CONFIGS, PULID_MODES, PuLID, build_encoder
from fastface.adapters.pulid_faces import PuLIDFacePreprocessor, load_bisenet
from fastface.adapters.pulid_identity import (
    PuLIDIdentity,
    alignment_of,
    prepare_pulid_identity,
    save_pulid_face_file,
)
from fastface.adapters.registry import register
from fastface.adapters.faces import FaceAnalyzer
from fastface.hub import HubFile, check_ref, facexlib_folders
from fastface.needs import Need, UrlFile, faces_hint, fetch, locate, manual_step, pack_need, resolve_needs
from fastface.models.eva_clip import EVA_VISION_CONFIGS, EVAVisionTower
from fastface.models.loading import WeightFormatError, read_weights
from fastface.models.retinaface import RetinaFace

logger = logging.getLogger(__name__)

__all__ = [
    "PuLIDPreset", "PuLIDAdapter", "PuLIDPreparer", "load_pulid", "find_face_parser", "find_face_detector",
    "load_eva", "check_pulid_eva", "open_pulid_preprocessor", "PULID_REPO", "EVA_CLIP_REPO", "BISENET_URL",
    "RETINAFACE_URL", "tiny_pulid_identity",
]

PathLike = str | os.PathLike
PULID_REPO = "guozinan/PuLID"
EVA_CLIP_REPO = "QuanSun/EVA-CLIP"
EVA02_L_336 = "EVA02_CLIP_L_336_psz14_s6B.pt"
# facexlib's face-parsing BiSeNet: a GitHub release asset (not on the Hugging Face hub).
BISENET_URL = "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth"
# facexlib's RetinaFace-R50 (upstream PuLID's face alignment): a GitHub release asset too (facexlib.detection).
RETINAFACE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"


def _file_name(url: str | None) -> str | None:
    return None if url is None else url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class PuLIDPreset(AdapterPreset):
    """A PuLID preset. ``eva``: the EVA02-CLIP-L-14-336 checkpoint (``visual.*`` keys); ``face_parser``: the
    release URL (or file name) of facexlib's BiSeNet weights; ``face_detector``: that of facexlib's RetinaFace-R50
    weights (None: align with insightface's keypoints); ``pulid_version`` "v1" or "v1.1"; ``pulid_mode``: the
    default mode of :data:`~fastface.adapters.pulid.PULID_MODES`."""

    face_pack: str = "antelopev2"
    eva: HubFile | str | os.PathLike | None = None
    face_parser: str | None = None
    face_detector: str | None = None
    pulid_version: Literal["v1", "v1.1"] = "v1"
    pulid_mode: str = "fidelity"

    variant = "pulid"  # not a field: what kind of adapter this is

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ref("PuLIDPreset.weights", self.weights, optional=False)
        check_ref("PuLIDPreset.eva", self.eva, optional=False)
        if not isinstance(self.face_parser, str) or not _file_name(self.face_parser):
            raise ValueError(f"PuLIDPreset.face_parser must be the URL or file name of the BiSeNet weights, "
                             f"got {self.face_parser!r}")
        if self.face_detector is not None and (not isinstance(self.face_detector, str)
                                               or not _file_name(self.face_detector)):
            raise ValueError(f"PuLIDPreset.face_detector must be the URL or file name of the RetinaFace weights "
                             f"(or None), got {self.face_detector!r}")
        if self.pulid_version not in ("v1", "v1.1"):
            raise ValueError(f"PuLIDPreset.pulid_version must be 'v1' or 'v1.1', got {self.pulid_version!r}")
        if self.pulid_mode not in PULID_MODES:
            raise ValueError(f"PuLIDPreset.pulid_mode must be one of {sorted(PULID_MODES)}, got {self.pulid_mode!r}")
        if self.invert_first_token:
            raise ValueError("PuLID has no background token to invert (invert_first_token must be False)")

    @property
    def face_parser_file(self) -> str | None:
        """The BiSeNet weights' file name (the last part of ``face_parser``), or None."""
        return _file_name(self.face_parser)

    @property
    def face_detector_file(self) -> str | None:
        """The RetinaFace weights' file name (the last part of ``face_detector``), or None."""
        return _file_name(self.face_detector)


def _facexlib_folder(face_root: PathLike | None) -> Path:
    """``<face_root>/models/facexlib``, next to insightface's ``models/<pack>``."""
    return FaceSettings(face_root).root / "models" / "facexlib"


def load_pulid(adapter: PuLIDPreset, path: Path, device: torch.device) -> PuLID:
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




def _facexlib_need(adapter: PuLIDPreset, name: str, face_root: PathLike | None, given: PathLike | None) -> Need | None:
    """The need of facexlib file ``name`` ("face_parser" or "face_detector"): the given file, else the preset's
    release file looked for in ``<face_root>/models/facexlib`` and facexlib's own folder (None: the preset has none)."""
    url = getattr(adapter, name)
    what, optional = {
        "face_parser": ("BiSeNet face-parsing file (facexlib's parsing_bisenet.pth)", False),
        "face_detector": ("RetinaFace file (facexlib's detection_Resnet50_Final.pth; optional: aligns photos as "
                          "upstream)", True),
    }[name]
    flag = "--" + name.replace("_", "-")
    if given is not None:
        return Need(name, what, (Path(os.path.expanduser(os.fspath(given))),), name, flag, for_photos=True)
    if url is None:
        return None
    src = UrlFile(_file_name(url), url if "://" in url else None, tuple(facexlib_folders(_facexlib_folder(face_root))))
    return Need(name, what, (src,), name, flag, optional, for_photos=True)


def find_face_parser(
    adapter: PuLIDPreset, face_root: PathLike | None = None, path: PathLike | None = None, *, download: bool = False
) -> Path:
    """facexlib's BiSeNet face-parsing weights (``parsing_bisenet.pth``) for PuLID.

    ``path`` (``face_parser=`` / ``--face-parser``) is used as given. Otherwise the file is looked for in
    ``<face_root>/models/facexlib/`` (``face_root`` default ``~/.insightface``, the folder of the insightface packs)
    and in facexlib's own download folder if facexlib is installed. The weights are a GitHub release asset, not on
    the Hugging Face hub: with ``download`` (and ``HF_HUB_OFFLINE`` unset) a missing file is fetched from
    ``adapter.face_parser`` into ``<face_root>/models/facexlib/``; otherwise it is a one-line
    :class:`~fastface.needs.MissingWeightsError` saying how to get it.
    """
    need = _facexlib_need(adapter, "face_parser", face_root, path)
    if need is None:
        raise ValueError(f"adapter {adapter.name!r} uses no face parser")
    return resolve_needs([need], download=download, hint=faces_hint(adapter.name, face_root))["face_parser"]


def find_face_detector(
    adapter: PuLIDPreset, face_root: PathLike | None = None, path: PathLike | None = None, *, download: bool = False
) -> Path | None:
    """facexlib's RetinaFace-R50 weights (``detection_Resnet50_Final.pth``), with which PuLID aligns as upstream.

    ``path`` (``face_detector=`` / ``--face-detector``) must exist (else :class:`~fastface.needs.MissingWeightsError`).
    Otherwise it is looked for and downloaded (only with ``download``) like :func:`find_face_parser`, from
    ``adapter.face_detector``. Not found: None, with a logged warning that photos are aligned with insightface's
    keypoints instead (not upstream's alignment) and how to get the file.
    """
    need = _facexlib_need(adapter, "face_detector", face_root, path)
    if need is None:
        return None  # a preset without RetinaFace: insightface keypoints by design
    if path is not None:
        return resolve_needs([need], hint=faces_hint(adapter.name, face_root))["face_detector"]
    got = locate(need)
    if not got.found and download:
        got = fetch(need)
    if not got.found:
        reason = f"{got.problem[:1].upper()}{got.problem[1:]}. " if got.problem else ""
        logger.warning(
            "PuLID: facexlib's RetinaFace weights (%s) were not found in %s. %sPhotos are aligned with insightface's "
            "antelopev2 keypoints of the largest face instead, which differs from upstream (RetinaFace landmarks of "
            "the face nearest the image centre): other landmarks shift and rotate the 512x512 crop, and in a photo "
            "with several faces another face may be aligned. To align as upstream: %s (a GitHub release asset, not "
            "on the Hugging Face hub), or pass face_detector= / --face-detector PATH, or allow downloads "
            "(download=True, or the CLI's --download).",
            need.sources[0].name, " or ".join(got.looked), reason, manual_step(need.sources[0]),
        )
    return got.path


def pulid_face_needs(
    adapter: PuLIDPreset, face_root: PathLike | None = None, eva: PathLike | None = None,
    face_parser: PathLike | None = None, face_detector: PathLike | None = None,
) -> list[Need]:
    """The files PuLID's photo preprocessing needs, where each is looked for: EVA02-CLIP (Hugging Face cache or
    ``eva``), facexlib's BiSeNet (required) and RetinaFace (optional) in ``<face_root>/models/facexlib`` and
    facexlib's own folder (or the given files), and the antelopev2 pack under ``face_root``."""
    out = [Need("eva", "local file (EVA02-CLIP-L-14-336 checkpoint)" if eva is not None else
                "EVA02-CLIP-L-14-336 checkpoint", (Path(os.path.expanduser(os.fspath(eva))) if eva is not None
                                                     else adapter.eva,), "eva", "--eva", for_photos=True)]
    for name, given in (("face_parser", face_parser), ("face_detector", face_detector)):
        need = _facexlib_need(adapter, name, face_root, given)
        if need is not None:
            out.append(need)
    return [*out, pack_need(face_root, adapter.face_pack)]


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
    adapter: PuLIDPreset,
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
    needs = pulid_face_needs(adapter, face_root, eva, face_parser, face_detector)
    hint = faces_hint(adapter.name, face_root)
    got = resolve_needs(needs, download=download, cache_dir=cache_dir, hint=hint)  # every missing file at once
    eva_path, parser_path, detector_path = got["eva"], got["face_parser"], got.get("face_detector")
    if detector_path is None and adapter.face_detector_file is not None:
        find_face_detector(adapter, face_root)  # logs why and how to align as upstream
    analyzer = FaceAnalyzer(got["face_pack"], pack=adapter.face_pack)
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


class PuLIDPreparer(FacePreparer):
    """Photos (antelopev2 + RetinaFace when found + BiSeNet + EVA02-CLIP, loaded with the first photo) and PuLID
    face files -> one :class:`PuLIDIdentity`. ``model``: the PuLID the EVA tower must fit (checked when loaded)."""

    def __init__(self, preset: PuLIDPreset, faces: FaceSettings, model: PuLID | None = None) -> None:
        self.preset, self.faces, self.model = preset, faces, model
        self.sources: dict[str, str] = {}
        self.preprocessor: PuLIDFacePreprocessor | None = None

    def open(self) -> PuLIDFacePreprocessor:
        """The photo preprocessing (loaded on first use)."""
        if self.preprocessor is None:
            f = self.faces
            self.preprocessor, used = open_pulid_preprocessor(
                self.preset, face_root=f.face_root, eva=f.files.get("eva"), face_parser=f.files.get("face_parser"),
                face_detector=f.files.get("face_detector"), device=f.device, download=f.download,
                cache_dir=f.cache_dir, pulid=self.model,
            )
            self.sources.update(used)
        return self.preprocessor

    def prepare(self, face: Any) -> PuLIDIdentity:
        return prepare_pulid_identity(face, self.open)

    def save(self, path: PathLike, identity: PuLIDIdentity) -> Path:
        return save_pulid_face_file(path, identity)


class PuLIDAdapter(IdentityAdapter):
    """PuLID v1 / v1.1: ``model`` (:class:`~fastface.adapters.pulid.PuLID`, fp32) and its photo preprocessing."""

    family = "PuLID"
    preset_type = PuLIDPreset
    options = (
        AdapterOption("mode", "zero tokens + projection: fidelity (8 + ORTHO_v2, v1 default), style (16 + ORTHO), "
                      "v1.1 (20 + ORTHO_v2, v1.1 default), plain", str, "pulid_mode", tuple(PULID_MODES),
                      aliases=("pulid_mode",), flag="--pulid-mode"),
        AdapterOption("id_mix", "v1 with several photos: keep all 10 tokens of every photo (default: 5 for extra "
                      "ones)", bool, False),
        AdapterOption("eva", "local EVA02-CLIP-L-14-336 checkpoint (default: QuanSun/EVA-CLIP "
                      "EVA02_CLIP_L_336_psz14_s6B.pt from the Hugging Face cache); needed for photos only", Path,
                      load=True),
        AdapterOption("face_parser", "local facexlib parsing_bisenet.pth (default: found in "
                      "FACE_ROOT/models/facexlib; with --download fetched from facexlib's GitHub release)", Path,
                      load=True),
        AdapterOption("face_detector", "local facexlib detection_Resnet50_Final.pth (RetinaFace: aligns photos as "
                      "upstream; default: found in FACE_ROOT/models/facexlib, with --download fetched from facexlib's "
                      "GitHub release; if absent, insightface keypoints with a warning)", Path, load=True),
    )

    def __init__(self, preset, preparer: PuLIDPreparer, sources, model: PuLID) -> None:
        super().__init__(preset, preparer, sources)
        self.model = model
        self._null: dict[tuple, torch.Tensor] = {}

    @classmethod
    def face_needs(cls, preset: PuLIDPreset, faces: FaceSettings) -> list[Need]:
        f = faces.files
        return pulid_face_needs(preset, faces.face_root, f.get("eva"), f.get("face_parser"), f.get("face_detector"))

    @classmethod
    def face_preparer(cls, preset: PuLIDPreset, faces: FaceSettings) -> PuLIDPreparer:
        return PuLIDPreparer(preset, faces)

    @classmethod
    def load(cls, preset: PuLIDPreset, files, *, dtype, device, faces: FaceSettings) -> PuLIDAdapter:
        model = load_pulid(preset, files["adapter"], device)
        return cls(preset, PuLIDPreparer(preset, faces, model), {}, model)

    @classmethod
    def not_an_option(cls, keyword: str) -> str | None:
        if keyword.lstrip("-").replace("-", "_") in ("lora_scale", "s_scale"):
            return ("is an IP-Adapter option; PuLID has no LoRA and no shortcut (its identity weight is ip_scale, its "
                    "variants are the mode option, --pulid-mode)")
        return None

    @classmethod
    def check_options(cls, preset: PuLIDPreset, options: Mapping[str, Any]) -> None:
        if options["id_mix"] and preset.pulid_version != "v1":
            raise AdapterOptionError("id_mix", f"is a PuLID v1 option; {preset.name!r} ({preset.pulid_version}) "
                                     "always encodes all photos together")

    @classmethod
    def write_tiny(cls, root: Path, unet: nn.Module, gen: torch.Generator, seed: int) -> list:
        return write_tiny_pulid(root, unet, gen, seed)

    def install(self, unet: nn.Module, *, fuse: bool = True) -> InstallHandle:
        return self.model.install(unet, mode=self.preset.pulid_mode)

    def offload_modules(self) -> list[nn.Module]:
        pre = self.preparer.preprocessor  # the face models, once a photo loaded them
        face = [] if pre is None else [m for m in (pre.bisenet, pre.eva, pre.detector) if m is not None]
        return [self.model.encoder, *face]

    def configure(self, handle, options: Mapping[str, Any]):
        handle.set_mode(options["mode"])  # for this call only: the UNet is left as it was
        return lambda: handle.set_mode(self.preset.pulid_mode)

    # -- the preprocessing --------------------------------------------------------------------------------------

    @property
    def pulid_preprocessor(self) -> PuLIDFacePreprocessor:
        """PuLID's photo preprocessing (antelopev2 + RetinaFace when found + BiSeNet + EVA02-CLIP, fp32), loaded on
        first use."""
        pre = self.preparer.open()
        self.sources.update(self.preparer.sources)
        return pre

    def use_preparer(self, preparer: FacePreparer) -> None:
        if isinstance(preparer, PuLIDPreparer) and preparer.preprocessor is not None:
            self.set_pulid_preprocessor(preparer.preprocessor, preparer.sources)
        else:
            super().use_preparer(preparer)

    def set_pulid_preprocessor(
        self, preprocessor: PuLIDFacePreprocessor, sources: Mapping[str, str] | None = None
    ) -> None:
        """Use an already loaded PuLID preprocessing (e.g. from :func:`open_pulid_preprocessor`); ``sources`` (the
        files it came from) go into the PNG metadata."""
        sources = dict(sources or {})
        check_pulid_eva(self.model, preprocessor.eva, sources.get("eva", "the EVA tower"))
        self.preparer.preprocessor = preprocessor
        self.preparer.sources.update(sources)
        self.sources.update(sources)
        logger.info("PuLID photos are aligned with %s", alignment_of(preprocessor))

    def prepare(self, face: Any) -> PuLIDIdentity:
        person = self.preparer.prepare(face)
        self.sources.update(self.preparer.sources)
        return person

    # -- tokens -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def pulid_tokens(self, person: PuLIDIdentity, *, id_mix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """PuLID's identity tokens [1, T, C] and null tokens (the encoder of zero inputs, upstream's uncond), fp32.

        Several photos: v1 encodes each and concatenates along tokens (10 tokens for the first photo, then 5 per
        photo, or 10 with ``id_mix``, as ``app.py``); v1.1 runs one IDFormer pass over all of them (32 tokens).
        """
        n = person.num_images
        id_cond = person.id_cond[None] if n > 1 else person.id_cond  # [1, n, D] or [1, D]
        hidden = [h.reshape(1, -1, h.shape[-1]) for h in person.hidden_states]  # [1, n·T, W]: photos along tokens
        tokens = self.model.encode(id_cond, hidden, id_mix=id_mix)
        key = (n, id_mix, person.hidden_states[0].shape[1])
        if key not in self._null:
            self._null[key] = self.model.null_tokens(num_images=n, id_mix=id_mix, vit_tokens=key[2])
        return tokens, self._null[key]

    def tokens(self, identity: PuLIDIdentity, options: Mapping[str, Any], dtype: torch.dtype):
        return self.pulid_tokens(identity, id_mix=options["id_mix"])  # fp32 whatever the UNet's dtype

    # -- metadata -----------------------------------------------------------------------------------------------

    def describe(self, identity: PuLIDIdentity) -> dict[str, Any]:
        cond = identity.id_cond.detach().float().cpu().numpy()
        return {"source": identity.source, "id_cond_sha256": hashlib.sha256(cond.tobytes()).hexdigest(),
                "photos": identity.num_images}

    def metadata(self, identity, options, tokens, handle) -> dict[str, Any]:
        used = handle.mode
        return {"lora_scale": None, "s_scale": None,  # no LoRA, no shortcut (recorded as None, as ever)
                "pulid": {"version": self.model.version, "mode": options["mode"], "num_zero": used.num_zero,
                          "projection": used.projection, "id_mix": options["id_mix"],
                          "id_tokens": int(tokens.shape[1]), "alignment": identity.alignment}}


def _tiny_pulid_weights(unet: nn.Module, version: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random PuLID weights in the released flat layout (``id_adapter.*``, ``id_adapter_attn_layers.{odd i}.*``)."""
    with torch.device("meta"):
        encoder = build_encoder(PULID_ENCODER_CONFIGS[f"{version}-tiny"])
    sd = {}
    for name, p in encoder.state_dict().items():
        if p.ndim >= 2:  # weights, IDFormer's latents and proj_out
            sd[name] = torch.randn(p.shape, generator=gen) * min(p.shape[-1], p.shape[-2]) ** -0.5
        else:  # LayerNorm weights around 1, biases around 0
            sd[name] = (1.0 if name.endswith("weight") else 0.0) + torch.randn(p.shape, generator=gen) * 0.1
    out = {f"id_adapter.{k}": v for k, v in sd.items()}
    for i, (_, attn) in enumerate(unet.attention_layers()):
        if i % 2:
            inner, ctx = attn.to_k.out_features, attn.to_k.in_features
            for kv in ("k", "v"):
                w = torch.randn(inner, ctx, generator=gen) * ctx**-0.5
                out[f"id_adapter_attn_layers.{i}.id_to_{kv}.weight"] = w
    return out


@torch.no_grad()
def tiny_pulid_identity(eva_file: PathLike, seed: int = 0) -> PuLIDIdentity:
    """A random PuLID identity for the tiny pipeline: the tiny EVA tower's outputs for a random grey "face" image and
    a random raw 512-d embedding."""
    from fastface.models.eva_clip import eva_preprocess

    eva = load_eva(eva_file)
    gen = torch.Generator().manual_seed(seed)
    grey = torch.rand(1, 1, 64, 64, generator=gen).repeat(1, 3, 1, 1)  # stands in for the parsed, greyed face
    out = eva(eva_preprocess(grey, eva.config.image_size))
    raw = torch.randn(1, 512, generator=gen) * 20  # antelopev2 embeddings are not normalised (norm ~20)
    return PuLIDIdentity(torch.cat([raw, out.normed_embeds], dim=-1), out.hidden_states, "selfcheck")


def write_tiny_pulid(root: Path, unet: nn.Module, gen: torch.Generator, seed: int) -> list:
    """Tiny PuLID files as released (v1 a flat fp32 torch pickle, v1.1 fp16 safetensors), an EVA-CLIP checkpoint
    with ``visual.*`` keys, and a PuLID face file of a random identity (BiSeNet and antelopev2 are not made)."""
    from fastface.tiny import TinyAdapter, perturb, save_safetensors

    pulid_v1, pulid_v11 = root / "pulid_v1.bin", root / "pulid_v1.1.safetensors"
    torch.save(_tiny_pulid_weights(unet, "v1", gen), pulid_v1)
    save_safetensors({k: v.half() for k, v in _tiny_pulid_weights(unet, "v1.1", gen).items()}, pulid_v11)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        eva = perturb(EVAVisionTower("tiny"), gen)
    eva_file = root / EVA02_L_336
    torch.save({**{f"visual.{k}": v for k, v in eva.state_dict().items()}, "logit_scale": torch.tensor(4.6)}, eva_file)
    face = save_pulid_face_file(root / "pulid-face.safetensors", tiny_pulid_identity(eva_file))
    files = {"pulid_v1": pulid_v1, "pulid_v11": pulid_v11, "eva": eva_file}
    return [TinyAdapter("pulid", {"adapter_file": pulid_v1}, face, ("baseline", "fastface-am1"), files),
            TinyAdapter("pulid-v1.1", {"adapter_file": pulid_v11}, face, ("fastface-am1",))]


# PuLID (Guo et al. 2024): antelopev2 raw embedding + EVA02-CLIP-L-14-336 of the parsed, whitened, grey face;
# id_scale 0.8. v1 app.py: fidelity (8 zero tokens + ORTHO_v2) by default, "style" (16 + ORTHO) on request;
# v1.1 app_v1_1.py: 20 zero tokens + ORTHO_v2.
for _name, _file, _version, _mode, _text in (
    ("pulid", "pulid_v1.bin", "v1", "fidelity",
     "PuLID v1 SDXL (antelopev2 + EVA02-CLIP-L face features -> 10 id tokens; fidelity mode)"),
    ("pulid-v1.1", "pulid_v1.1.safetensors", "v1.1", "v1.1",
     "PuLID v1.1 SDXL (IDFormer -> 32 id tokens; 20 zero tokens + ORTHO_v2)"),
):
    register(PuLIDPreset(
        name=_name, description=_text, weights=HubFile(PULID_REPO, _file), eva=HubFile(EVA_CLIP_REPO, EVA02_L_336),
        face_parser=BISENET_URL, face_detector=RETINAFACE_URL, pulid_version=_version, pulid_mode=_mode,
    ), PuLIDAdapter)
