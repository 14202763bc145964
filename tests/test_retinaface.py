"""RetinaFace-ResNet50: ours vs facexlib's ``RetinaFace`` on the same random weights saved as facexlib's
``detection_Resnet50_Final.pth`` (with the ``module.`` prefix), and PuLID's RetinaFace alignment vs facexlib's
``FaceRestoreHelper`` (detection -> 5 points of the centre-most face -> ``align_warp_face``).

Tolerances: network outputs (loc, softmax scores, landmarks) 1e-5 relative (max |a-b| / max |b|, fp32); priors, the
decoded detections after threshold + NMS (boxes, scores, landmarks) and the aligned 512² crop must be equal.

facexlib imports torchvision, which cannot be installed here. Stood in (written in this file, installed in
``sys.modules`` only while the reference is imported and built):

* ``torchvision.models.resnet50``: a plain transcription of torchvision's ResNet-50 (``Bottleneck`` with the stride in
  the 3×3 conv, layers [3, 4, 6, 3], torchvision's parameter names and init);
* ``torchvision.models._utils.IntermediateLayerGetter``: torchvision's (children up to the last returned layer, an
  ordered dict of the requested outputs);
* ``torchvision.ops.nms``: plain greedy NMS written as torchvision's CPU kernel (stable descending score sort, scalar
  float32 IoU, ``> threshold`` in double);
* ``torchvision.transforms.functional.normalize``: a name only (imported by the helper module, not called).

facexlib's own code runs unchanged: ``retinaface.py`` (FPN, SSH, heads, ``detect_faces``), ``retinaface_net.py``,
``retinaface_utils.py`` (PriorBox, decode), ``detection/__init__.py::init_detection_model`` (its ``torch.load`` and
``module.`` stripping; the weight file is already in ``model_rootpath``, so nothing is downloaded) and
``FaceRestoreHelper``. Only ``facexlib.parsing.init_parsing_model`` is replaced (it would download ParseNet, unused).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from onnx_face_models import face_image, make_pack
from torch import nn

from fastface.adapters.faces import FaceAnalyzer, NoFaceError
from fastface.adapters.pulid_faces import (
    BiSeNet,
    PuLIDFacePreprocessor,
    align_face,
    bisenet_from_state_dict,
    retinaface_landmarks,
)
from fastface.models.eva_clip import EVAVisionTower, get_eva_vision_config
from fastface.models.loading import WeightFormatError
from fastface.models.retinaface import (
    RetinaFace,
    center_face_index,
    get_retinaface_config,
    nms,
    prior_boxes,
)

REL_TOL = 1e-5
IMAGE_HW = (280, 344)  # not multiples of 32: exercises the ceil of the prior grids
N_PASS = (24, 4, 0)  # anchors per FPN level made to pass the 0.97 threshold on the test image

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------------------------------------------
# torchvision stand-ins
# ----------------------------------------------------------------------------------------------------------------


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tv_resnet50(pretrained=False, progress=True, **kwargs):
    assert not pretrained, "the stand-in has no pretrained weights"
    return TVResNet(TVBottleneck, [3, 4, 6, 3], **kwargs)


class TVIntermediateLayerGetter(nn.ModuleDict):
    def __init__(self, model, return_layers):
        if not set(return_layers).issubset([name for name, _ in model.named_children()]):
            raise ValueError("return_layers are not present in model")
        orig_return_layers = return_layers
        return_layers = {str(k): str(v) for k, v in return_layers.items()}
        layers = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            if name in return_layers:
                del return_layers[name]
            if not return_layers:
                break
        super().__init__(layers)
        self.return_layers = orig_return_layers

    def forward(self, x):
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def tv_nms(boxes, scores, iou_threshold):
    """torchvision's CPU ``nms_kernel``: scalar float32 IoU, suppression when ``ovr > iou_threshold`` (double)."""
    b = boxes.numpy().astype(np.float32)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores, stable=True, dim=0, descending=True)[1].numpy()
    suppressed = np.zeros(len(b), dtype=bool)
    keep = []
    for _i in range(len(b)):
        i = order[_i]
        if suppressed[i]:
            continue
        keep.append(i)
        for _j in range(_i + 1, len(b)):
            j = order[_j]
            if suppressed[j]:
                continue
            w = max(np.float32(0), min(x2[i], x2[j]) - max(x1[i], x1[j]))
            h = max(np.float32(0), min(y2[i], y2[j]) - max(y1[i], y1[j]))
            inter = w * h
            ovr = inter / (areas[i] + areas[j] - inter)
            if float(ovr) > iou_threshold:
                suppressed[j] = True
    return torch.tensor(keep, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# facexlib, imported through namespace stubs and the stand-ins
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facexlib():
    """``(facexlib RetinaFace class, init_detection_model, FaceRestoreHelper, PriorBox, cfg)``; the stand-ins stay
    installed for this module's tests (facexlib's RetinaFace imports ``torchvision.models`` in its constructor)."""
    spec = importlib.util.find_spec("facexlib")
    if spec is None:
        pytest.fail("facexlib is missing: run the README test command "
                    "(pip install --no-deps timm==1.0.31 facexlib==0.3.0)")  # fmt: skip
    if importlib.util.find_spec("torchvision") is not None:
        pytest.fail("a real torchvision is installed; this test is written for its absence (the stand-ins)")
    root = os.path.dirname(spec.origin)
    tv_names = ["torchvision", "torchvision.models", "torchvision.models._utils", "torchvision.ops",
                "torchvision.transforms", "torchvision.transforms.functional"]  # fmt: skip
    saved = {k: v for k, v in sys.modules.items() if k.startswith(("facexlib", "torchvision"))}
    for k in saved:
        del sys.modules[k]
    tv = {n: types.ModuleType(n) for n in tv_names}
    for n in ("torchvision", "torchvision.models", "torchvision.transforms"):
        tv[n].__path__ = []
    tv["torchvision.models"].resnet50 = tv_resnet50
    tv["torchvision.models._utils"].IntermediateLayerGetter = TVIntermediateLayerGetter
    tv["torchvision.ops"].nms = tv_nms
    tv["torchvision.transforms.functional"].normalize = None
    tv["torchvision"].models, tv["torchvision"].ops = tv["torchvision.models"], tv["torchvision.ops"]
    tv["torchvision"].transforms = tv["torchvision.transforms"]
    tv["torchvision.models"]._utils = tv["torchvision.models._utils"]
    tv["torchvision.transforms"].functional = tv["torchvision.transforms.functional"]
    sys.modules.update(tv)
    pkg = types.ModuleType("facexlib")  # skips facexlib/__init__.py (it imports every submodule)
    pkg.__path__ = [root]
    parsing = types.ModuleType("facexlib.parsing")
    parsing.__path__ = [os.path.join(root, "parsing")]
    parsing.init_parsing_model = lambda *a, **k: None  # would download ParseNet; unused here
    sys.modules.update({"facexlib": pkg, "facexlib.parsing": parsing})
    try:
        det = importlib.import_module("facexlib.detection")
        rf = importlib.import_module("facexlib.detection.retinaface")
        utils = importlib.import_module("facexlib.detection.retinaface_utils")
        helper = importlib.import_module("facexlib.utils.face_restoration_helper")
        yield rf.RetinaFace, det.init_detection_model, helper.FaceRestoreHelper, utils.PriorBox, rf.generate_config
    finally:
        for k in [k for k in sys.modules if k.startswith(("facexlib", "torchvision"))]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_standins_are_torchvisions_names(facexlib):
    """The stand-in ResNet-50 has ResNet-50's size and the body keys the released file uses."""
    ref_cls = facexlib[0]
    torch.manual_seed(0)
    ref = ref_cls(network_name="resnet50", device="cpu")
    n = sum(p.numel() for p in TVResNet(TVBottleneck, [3, 4, 6, 3]).parameters())
    assert n == 25_557_032  # torchvision resnet50's parameter count
    keys = ref.state_dict().keys()
    assert "body.layer4.2.bn3.running_var" in keys and "body.fc.weight" not in keys
    assert set(keys) == set(RetinaFace().state_dict().keys())


def _test_image() -> np.ndarray:
    """BGR uint8: three textured patches on a dim noisy background (RGB ``face_image`` flipped to BGR)."""
    rgb = face_image(IMAGE_HW, patches=((60, 50, 64), (170, 110, 72), (250, 40, 48)), seed=3)
    noise = np.random.default_rng(4).integers(0, 40, rgb.shape, dtype=np.uint8)
    return np.ascontiguousarray((rgb | noise)[..., ::-1])


@pytest.fixture(scope="module")
def weights(facexlib, tmp_path_factory):
    """facexlib's RetinaFace with random weights (non-trivial BN statistics; head weights rescaled so that decoded
    boxes stay near their anchors and the face-logit biases shifted so ``N_PASS`` anchors per level pass 0.97 on the
    test image), saved as ``detection_Resnet50_Final.pth`` with the ``module.`` prefix."""
    ref_cls = facexlib[0]
    torch.manual_seed(0)
    ref = ref_cls(network_name="resnet50", device="cpu").eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in ref.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
        for mod in ref.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(1 + torch.randn(mod.weight.shape, generator=gen) * 0.1)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
        for head in (*ref.ClassHead, *ref.BboxHead, *ref.LandmarkHead):
            head.conv1x1.bias.copy_(torch.randn(head.conv1x1.bias.shape, generator=gen) * 0.1)
        x = torch.from_numpy(_test_image().astype(np.float32).transpose(2, 0, 1))[None] - ref.mean_tensor
        loc, _, landm = ref(x)
        for heads, out in ((ref.BboxHead, loc), (ref.LandmarkHead, landm)):
            k = 0.7 / float(out.std())
            for h in heads:
                h.conv1x1.weight.mul_(k), h.conv1x1.bias.mul_(k)
        thr = math.log(0.97 / 0.03)  # softmax score 0.97 as a logit difference
        for h, f, n in zip(ref.ClassHead, _ref_features(ref, x), N_PASS):
            logits = h(f)[0]
            d = (logits[:, 1] - logits[:, 0]).sort(descending=True)[0]
            h.conv1x1.bias[1::2] += thr - (float(d[n - 1] + d[n]) / 2 if n else float(d[0]) + 2)
    sd = {f"module.{k}": v.clone() for k, v in ref.state_dict().items()}
    folder = tmp_path_factory.mktemp("facexlib_weights")
    torch.save(sd, folder / "detection_Resnet50_Final.pth")
    return folder


def _ref_features(ref, x):
    fpn = ref.fpn(list(ref.body(x).values()))
    return [ref.ssh1(fpn[0]), ref.ssh2(fpn[1]), ref.ssh3(fpn[2])]


@pytest.fixture(scope="module")
def pair(facexlib, weights):
    """(ours, facexlib's) loaded from the same file, each by its own loader."""
    ref = facexlib[1]("retinaface_resnet50", half=False, device="cpu", model_rootpath=str(weights))
    return RetinaFace.from_pretrained(weights / "detection_Resnet50_Final.pth"), ref


def test_network_matches_facexlib(pair):
    ours, ref = pair
    x = torch.randn(2, 3, 75, 101, generator=torch.Generator().manual_seed(5)) * 60
    with torch.no_grad():
        a, b = ours(x), ref(x)
    for name, u, v in zip(("loc", "conf", "landmarks"), a, b):
        assert u.shape == v.shape, name
        assert rel_err(u, v) < REL_TOL, (name, rel_err(u, v))
    assert a[0].shape == (2, 2 * (10 * 13 + 5 * 7 + 3 * 4), 4)


def test_priors_match_facexlib(facexlib):
    prior_cls, generate_config = facexlib[3], facexlib[4]
    for hw in ((280, 344), (64, 64), (97, 33)):
        want = prior_cls(generate_config("resnet50"), image_size=hw).forward()
        assert torch.equal(prior_boxes(*hw), want)


def test_nms_matches_torchvision_semantics():
    gen = torch.Generator().manual_seed(6)
    xy = torch.rand(200, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=gen) * 30], dim=1)
    scores = torch.randperm(200, generator=gen).float() / 200  # distinct
    for thr in (0.0, 0.3, 0.4, 0.7):
        keep = nms(boxes, scores, thr)
        assert torch.equal(keep, tv_nms(boxes, scores, thr))
        assert 1 < len(keep) < 200 or thr == 0.0
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.4).shape == (0,)
    same = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    assert nms(same, torch.tensor([0.5, 0.9]), 0.4).tolist() == [1]


def test_detect_faces_matches_facexlib(pair):
    ours, ref = pair
    bgr = _test_image()
    det = ours.detect(bgr)  # threshold 0.97, as get_face_landmarks_5
    with torch.no_grad():  # as get_face_landmarks_5 calls it
        want = ref.detect_faces(bgr, 0.97)
    n_all = len(ours.detect(bgr, nms_threshold=1.0))  # IoU never exceeds 1: no suppression
    assert 3 <= len(det) < n_all  # NMS removed overlapping boxes and several faces remain
    got = det.as_facexlib()
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)
    assert (det.scores > 0.97).all()
    assert len(np.unique(det.scores)) < len(det)  # ties (scores of exactly 1.0): their order is exercised


def test_center_face_matches_facexlib(facexlib, pair, weights):
    """The whole ``get_face_landmarks_5(only_center_face=True)`` choice, also when the centre face is not the best."""
    ours, _ = pair
    helper_cls = facexlib[2]
    bgr = _test_image()
    helper = helper_cls(upscale_factor=1, face_size=512, crop_ratio=(1, 1), det_model="retinaface_resnet50",
                        device="cpu", model_rootpath=str(weights))  # fmt: skip
    helper.read_image(bgr)
    assert helper.get_face_landmarks_5(only_center_face=True) == 1
    lm = retinaface_landmarks(ours, bgr)
    assert lm.shape == (5, 2) and np.array_equal(lm, helper.all_landmarks_5[0])
    det = ours.detect(bgr)
    assert center_face_index(det.boxes, *bgr.shape[:2]) > 0  # not simply the top-scoring face
    helper.align_warp_face()
    assert np.array_equal(align_face(bgr, lm), helper.cropped_faces[0])


@pytest.fixture(scope="module")
def preprocessor_parts(tmp_path_factory):
    from test_eva_clip import make_eva_clip_state_dict

    root = tmp_path_factory.mktemp("antelope")
    make_pack(root, "antelopev2", seed=1)
    analyzer = FaceAnalyzer(root, pack="antelopev2", providers=["CPUExecutionProvider"])
    torch.manual_seed(7)
    bisenet = bisenet_from_state_dict(BiSeNet().state_dict())  # torch's default init; parsing is not under test
    eva = EVAVisionTower.from_state_dict(
        make_eva_clip_state_dict(get_eva_vision_config("tiny"), torch.Generator().manual_seed(0)), config="tiny"
    )
    return analyzer, bisenet, eva


def test_preprocessor_aligns_like_facexlib(facexlib, pair, weights, preprocessor_parts):
    """PuLIDFacePreprocessor(detector=RetinaFace): the crop equals facexlib's detection -> 5 points -> align_warp_face;
    the embedding is still insightface's largest face; the insightface-keypoint path gives another crop."""
    ours, _ = pair
    analyzer, bisenet, eva = preprocessor_parts
    bgr = _test_image()
    helper = facexlib[2](upscale_factor=1, face_size=512, crop_ratio=(1, 1), det_model="retinaface_resnet50",
                         device="cpu", model_rootpath=str(weights))  # fmt: skip
    helper.read_image(bgr)
    helper.get_face_landmarks_5(only_center_face=True)
    helper.align_warp_face()
    out = PuLIDFacePreprocessor(analyzer, bisenet, eva, detector=ours)(bgr, channels="bgr")
    assert np.array_equal(out.aligned, helper.cropped_faces[0])
    assert np.array_equal(out.landmarks, helper.all_landmarks_5[0])
    info = analyzer.analyze(bgr, channels="bgr")
    assert np.array_equal(out.id_cond[0, :512].numpy(), info.raw_embedding)
    old = PuLIDFacePreprocessor(analyzer, bisenet, eva)(bgr, channels="bgr")  # insightface keypoints
    assert np.array_equal(old.landmarks, info.kps) and not np.array_equal(old.aligned, out.aligned)


def test_preprocessor_fallback_embedding(weights, preprocessor_parts):
    """No insightface face: as upstream, ArcFace (get_feat) on the RetinaFace-aligned crop."""
    analyzer, bisenet, eva = preprocessor_parts
    sd = dict(torch.load(weights / "detection_Resnet50_Final.pth", weights_only=True))
    for i in range(3):  # face logits raised: RetinaFace finds faces in the noise image
        sd[f"module.ClassHead.{i}.conv1x1.bias"] += torch.tensor([0, 20.0] * 2)
    always = RetinaFace.from_state_dict(sd)
    bgr = np.random.default_rng(8).integers(0, 40, (*IMAGE_HW, 3), dtype=np.uint8)  # no red patch: no SCRFD face
    with pytest.raises(NoFaceError):
        analyzer.analyze(bgr, channels="bgr")
    out = PuLIDFacePreprocessor(analyzer, bisenet, eva, detector=always)(bgr, channels="bgr")
    assert np.array_equal(out.aligned, align_face(bgr, retinaface_landmarks(always, bgr)))
    want = analyzer.recognizer.get_feat(out.aligned)[0]
    assert want.shape == (512,) and np.array_equal(out.id_cond[0, :512].numpy(), want)
    never = dict(sd)
    for i in range(3):
        never[f"module.ClassHead.{i}.conv1x1.bias"] = torch.tensor([0, -1e6] * 2)  # no anchor is a face
    with pytest.raises(NoFaceError, match="RetinaFace found no face"):
        PuLIDFacePreprocessor(analyzer, bisenet, eva, detector=RetinaFace.from_state_dict(never))(bgr, channels="bgr")


def test_errors(weights, tmp_path):
    with pytest.raises(WeightFormatError, match="not facexlib's RetinaFace-ResNet50"):
        RetinaFace.from_state_dict({"foo": torch.zeros(1)})
    with pytest.raises(WeightFormatError, match="MobileNet-0.25"):
        RetinaFace.from_state_dict({"module.body.stage1.0.0.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(WeightFormatError, match="not tensors"):
        RetinaFace.from_state_dict({"body.conv1.weight": torch.zeros(64, 3, 7, 7), "epoch": 3})
    sd = dict(torch.load(weights / "detection_Resnet50_Final.pth", weights_only=True))
    sd["module.fpn.output1.0.weight"] = torch.zeros(256, 256, 1, 1)
    with pytest.raises(WeightFormatError, match="shape mismatch for 'fpn.output1.0.weight'"):
        RetinaFace.from_state_dict(sd)
    del sd["module.fpn.output1.0.weight"]
    with pytest.raises(WeightFormatError, match="missing key"):
        RetinaFace.from_state_dict(sd)
    with pytest.raises(WeightFormatError, match="no such file"):
        RetinaFace.from_pretrained(tmp_path / "detection_Resnet50_Final.pth")
    with pytest.raises(ValueError, match="unknown RetinaFace config"):
        get_retinaface_config("mobile0.25")
    with torch.device("meta"):
        model = RetinaFace()
    with pytest.raises(ValueError, match="BGR H x W x 3"):
        model.preprocess(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="conf_threshold"):
        model.detect(np.zeros((8, 8, 3), np.uint8), conf_threshold=1.5)
    with pytest.raises(ValueError, match="nms expects"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.4)
    with pytest.raises(ValueError, match="at least one box"):
        center_face_index(np.zeros((0, 5)), 10, 10)
    with pytest.raises(ValueError, match="detector must be"):
        PuLIDFacePreprocessor(None, None, None, detector=object())  # type: ignore[arg-type]
