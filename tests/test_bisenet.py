"""PuLID face preprocessing: our BiSeNet vs facexlib's (same random weights saved as a .pth), our alignment vs facexlib's
``FaceRestoreHelper.align_warp_face`` (same landmarks), the whitening vs upstream's formula, and the whole
preprocessor on a synthetic antelopev2 pack. Tolerance: fp32 BiSeNet logits 1e-5 relative (max |a-b| / max |b|);
alignment bit-exact.

facexlib is imported without running its ``__init__`` (which imports torchvision): namespace stubs with the real
``__path__`` are registered for ``facexlib`` and ``facexlib.parsing`` (and, for the restoration helper, stubs for the
detector/parsing model factories, which would download weights, plus torchvision's ``normalize`` name); the network
and alignment code that runs is facexlib's own.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import cv2
import numpy as np
import pytest
import torch
from onnx_face_models import face_image, make_pack

from fastface.adapters.faces import FaceAnalyzer
from fastface.adapters.pulid_faces import (
    BACKGROUND_LABELS,
    BORDER_VALUE,
    PuLIDFacePreprocessor,
    align_face,
    bisenet_from_state_dict,
    face_features_image,
    load_bisenet,
    parse_face,
)
from fastface.models.eva_clip import EVAVisionTower, eva_preprocess, get_eva_vision_config
from fastface.models.loading import WeightFormatError

REL_TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def facexlib():
    """facexlib's parsing network and restoration helper, imported through namespace stubs."""
    spec = importlib.util.find_spec("facexlib")
    if spec is None:
        pytest.fail("facexlib is missing: run the README test command (pip install --no-deps timm==1.0.31 facexlib==0.3.0)")
    root = os.path.dirname(spec.origin)
    names = ["facexlib", "facexlib.parsing", "facexlib.detection", "facexlib.utils", "facexlib.utils.misc",
             "facexlib.utils.face_restoration_helper", "facexlib.parsing.bisenet", "facexlib.parsing.resnet",
             "torchvision", "torchvision.transforms", "torchvision.transforms.functional"]  # fmt: skip
    saved = {k: sys.modules.get(k) for k in names}
    try:
        for name, path in (("facexlib", root), ("facexlib.parsing", os.path.join(root, "parsing")),
                           ("facexlib.utils", os.path.join(root, "utils"))):  # fmt: skip
            m = types.ModuleType(name)
            m.__path__ = [path]
            sys.modules[name] = m
        det = types.ModuleType("facexlib.detection")
        det.init_detection_model = lambda *a, **k: None  # the helper's detector; landmarks are given directly
        sys.modules["facexlib.detection"] = det
        sys.modules["facexlib.parsing"].init_parsing_model = lambda *a, **k: None
        if importlib.util.find_spec("torchvision") is None:
            tv, tr, fn = (types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                                        "torchvision.transforms.functional"))  # fmt: skip
            tv.__path__, tr.__path__ = [], []
            fn.normalize = None  # imported by the helper module, unused by align_warp_face
            sys.modules.update({"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn})
        from facexlib.parsing.bisenet import BiSeNet as RefBiSeNet
        from facexlib.utils.face_restoration_helper import FaceRestoreHelper
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return RefBiSeNet, FaceRestoreHelper


@pytest.fixture(scope="module")
def bisenet_pair(facexlib, tmp_path_factory):
    ref_cls, _ = facexlib
    torch.manual_seed(0)
    ref = ref_cls(num_class=19)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in ref.named_buffers():  # non-trivial BatchNorm statistics
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
        for name, p in ref.named_parameters():
            if ".bn" in name or "bn1" in name or "bn2" in name or "downsample.1" in name:
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1 if name.endswith("weight")
                        else torch.randn(p.shape, generator=gen) * 0.1)  # fmt: skip
    path = tmp_path_factory.mktemp("bisenet") / "parsing_bisenet.pth"
    torch.save(ref.state_dict(), path)
    return load_bisenet(path), ref.eval()


def test_bisenet_matches_facexlib(bisenet_pair):
    ours, ref = bisenet_pair
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(x), ref(x)[0]
    assert a.shape == (2, 19, 96, 80)
    assert rel_err(a, b) < REL_TOL
    assert torch.equal(a.argmax(1), b.argmax(1))


@pytest.mark.parametrize("three", [False, True])
def test_alignment_matches_facexlib(facexlib, three):
    _, helper_cls = facexlib
    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    kps = np.array([[150, 120], [230, 118], [190, 165], [160, 205], [225, 204]], dtype=np.float64) + rng.normal(0, 2, (5, 2))
    helper = helper_cls(upscale_factor=1, face_size=512, crop_ratio=(1, 1), det_model="retinaface_resnet50",
                        save_ext="png", template_3points=three)  # fmt: skip
    helper.read_image(bgr)
    helper.all_landmarks_5 = [kps[:3] if three else kps]  # what get_face_landmarks_5 stores
    helper.align_warp_face()
    ours = align_face(bgr, kps, template="3points" if three else "facexlib")
    assert ours.shape == (512, 512, 3) and np.array_equal(ours, helper.cropped_faces[0])
    assert tuple(ours[0, 0]) == BORDER_VALUE or tuple(ours[-1, -1]) == BORDER_VALUE  # border outside the photo


def test_upstream_default_template_is_five_points(facexlib):
    """The facexlib PuLID installs (PyPI) defaults to the 5-point FFHQ template, not ``template_3points``."""
    _, helper_cls = facexlib
    helper = helper_cls(upscale_factor=1, face_size=512, crop_ratio=(1, 1), det_model="retinaface_resnet50")
    assert helper.template_3points is False and helper.face_template.shape == (5, 2)


def test_whitening_matches_upstream_formula():
    gen = torch.Generator().manual_seed(4)
    rgb = torch.rand(1, 3, 16, 16, generator=gen)
    labels = torch.randint(0, 19, (1, 1, 16, 16), generator=gen)
    # pipeline.py: bg = sum(parsing_out == i for i in bg_label).bool(); torch.where(bg, white, to_gray(input))
    bg = sum(labels == i for i in [0, 16, 18, 7, 8, 9, 14, 15]).bool()
    gray = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).repeat(1, 3, 1, 1)
    want = torch.where(bg, torch.ones_like(rgb), gray)
    assert torch.equal(face_features_image(rgb, labels), want)
    assert set(BACKGROUND_LABELS) == {0, 16, 18, 7, 8, 9, 14, 15}


def test_preprocessor_end_to_end(bisenet_pair, facexlib, tmp_path):
    """antelopev2 pack (synthetic ONNX models) -> alignment -> BiSeNet -> EVA, against the steps composed by hand."""
    from test_eva_clip import make_eva_clip_state_dict

    ours_bisenet, ref_bisenet = bisenet_pair
    _, helper_cls = facexlib
    make_pack(tmp_path, "antelopev2", seed=1)
    analyzer = FaceAnalyzer(tmp_path, pack="antelopev2", providers=["CPUExecutionProvider"])
    eva = EVAVisionTower.from_state_dict(
        make_eva_clip_state_dict(get_eva_vision_config("tiny"), torch.Generator().manual_seed(0)), config="tiny"
    )
    pre = PuLIDFacePreprocessor(analyzer, ours_bisenet, eva)
    rgb = face_image(patches=((224, 160, 32),))
    out = pre(rgb)
    assert out.id_cond.shape == (1, 512 + 32) and len(out.hidden_states) == 5

    info = analyzer.analyze(rgb)  # the largest face, raw embedding
    helper = helper_cls(upscale_factor=1, face_size=512, crop_ratio=(1, 1), det_model="retinaface_resnet50")
    helper.read_image(rgb[..., ::-1].copy())
    helper.all_landmarks_5 = [info.kps.astype(np.float64)]
    helper.align_warp_face()
    aligned = helper.cropped_faces[0]
    assert np.array_equal(out.aligned, aligned)
    x = torch.from_numpy(cv2.cvtColor(aligned, cv2.COLOR_BGR2RGB).astype(np.float32)).permute(2, 0, 1)[None] / 255.0
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        labels = ref_bisenet((x - mean) / std)[0].argmax(dim=1, keepdim=True)
        assert torch.equal(parse_face(ours_bisenet, x), labels)
        feats = face_features_image(x, labels)
        eva_out = eva(eva_preprocess(feats, 56))
    assert torch.equal(out.features, feats)
    want = torch.cat([torch.tensor(info.raw_embedding)[None], eva_out.normed_embeds], dim=-1)
    assert rel_err(out.id_cond, want) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, eva_out.hidden_states))


def test_errors(tmp_path):
    with pytest.raises(WeightFormatError, match="not facexlib's BiSeNet"):
        bisenet_from_state_dict({"foo": torch.zeros(1)})
    with pytest.raises(WeightFormatError, match="conv_out.conv_out.weight"):
        bisenet_from_state_dict({"cp.resnet.conv1.weight": torch.zeros(64, 3, 7, 7)})
    bgr = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=r"kps must be 5 finite"):
        align_face(bgr, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="template must be one of"):
        align_face(bgr, np.zeros((5, 2)), template="ffhq")
    with pytest.raises(ValueError, match="BGR uint8"):
        align_face(bgr.astype(np.float32), np.ones((5, 2)))
    with pytest.raises(WeightFormatError, match="no such file"):
        load_bisenet(tmp_path / "parsing_bisenet.pth")
