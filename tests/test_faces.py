"""Face analysis through insightface's real model zoo, on tiny generated ONNX models (tests/onnx_face_models.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

import onnx  # noqa: F401
import insightface  # noqa: F401

from insightface.utils import face_align  # noqa: E402
from onnx_face_models import (  # noqa: E402
    ARCFACE_DST,
    face_image,
    make_detector,
    make_pack,
    make_recognizer,
    oracle_embedding,
)

from fastface.adapters.faces import (  # noqa: E402
    DEFAULT_DET_SIZES,
    FaceAnalyzer,
    FaceInfo,
    ImageReadError,
    NoFaceError,
    average_faces,
    load_image,
)
from fastface.models.loading import WeightFormatError  # noqa: E402

EMB_RTOL = 1e-5  # onnxruntime fp32 vs the numpy oracle, max |a-b| / max |b|

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # skimage >= 0.26 deprecates what insightface calls


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    w = make_pack(root, "buffalo_l", seed=0)
    return root, w


@pytest.fixture(scope="module")
def analyzer(pack):
    return FaceAnalyzer(pack[0], providers=["CPUExecutionProvider"])


@pytest.fixture
def spy_sizes(analyzer, monkeypatch):
    """Record the detector input sizes insightface is run at."""
    sizes: list[int] = []
    real = analyzer.detector.detect

    def detect(img, input_size=None, **kw):
        sizes.append(input_size[0])
        return real(img, input_size=input_size, **kw)

    monkeypatch.setattr(analyzer.detector, "detect", detect)
    return sizes


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_detection_embedding_keypoints_and_crop(analyzer, pack, tmp_path):
    rgb = face_image(patches=((224, 160, 32),))
    bgr = rgb[..., ::-1].copy()
    f = analyzer.analyze(rgb)

    np.testing.assert_allclose(f.bbox, [224, 160, 256, 192], atol=1e-3)
    np.testing.assert_allclose(f.kps, [224, 160] + 32 * ARCFACE_DST / 112, atol=1e-3)
    assert 0.5 < f.score <= 1.0
    # Independent oracle: insightface's 112 alignment of the BGR image, then the recognizer's math in numpy.
    expected_raw = oracle_embedding(face_align.norm_crop(bgr, f.kps, 112), pack[1])
    assert _rel(f.raw_embedding, expected_raw) < EMB_RTOL
    np.testing.assert_allclose(f.embedding, expected_raw / np.linalg.norm(expected_raw), atol=1e-6)
    assert f.embedding.shape == (512,) and abs(np.linalg.norm(f.embedding) - 1) < 1e-6

    # The crop is the 224 norm_crop of the BGR image: the patch (red, i.e. the last BGR channel) fills it.
    assert f.crop.shape == (224, 224, 3) and f.crop.dtype == np.uint8 and f.crop_channels == "bgr"
    assert np.array_equal(f.crop, face_align.norm_crop(bgr, f.kps, 224))
    b, g, r = f.crop[20:200, 20:200].reshape(-1, 3).mean(0)
    assert r > 200 and b < 80
    assert len(f.crops) == 1 and f.crops[0] is f.crop

    # Same face from a BGR array, a PIL image and a PNG file.
    path = tmp_path / "face.png"
    Image.fromarray(rgb).save(path)
    for image, kw in ((bgr, {"channels": "bgr"}), (Image.fromarray(rgb), {}), (path, {}), (str(path), {})):
        g2 = analyzer.analyze(image, **kw)
        np.testing.assert_array_equal(g2.embedding, f.embedding)
        np.testing.assert_array_equal(g2.crop, f.crop)
    assert analyzer.analyze(path).source == str(path)


def test_rgb_crop_option(pack):
    rgb_analyzer = FaceAnalyzer(pack[0], crop_channels="rgb", providers=["CPUExecutionProvider"])
    img = face_image()
    f = rgb_analyzer.analyze(img)
    bgr_crop = face_align.norm_crop(img[..., ::-1].copy(), f.kps, 224)
    assert f.crop_channels == "rgb" and np.array_equal(f.crop, bgr_crop[..., ::-1])


def test_face_choice(analyzer):
    img = face_image(patches=((224, 160, 32), (400, 400, 16)))
    big, small = [224, 160, 256, 192], [400, 400, 416, 416]
    np.testing.assert_allclose(analyzer.analyze(img).bbox, big, atol=1e-3)  # largest (default)
    by_score = analyzer.analyze(img, choose="score")
    np.testing.assert_allclose(by_score.bbox, small, atol=1e-3)
    assert by_score.score > analyzer.analyze(img).score
    np.testing.assert_allclose(analyzer.analyze(img, choose=0).bbox, small, atol=1e-3)  # insightface order = score
    np.testing.assert_allclose(analyzer.analyze(img, choose=-1).bbox, big, atol=1e-3)
    with pytest.raises(ValueError, match="face index 2 requested, but 2 face"):
        analyzer.analyze(img, choose=2)
    with pytest.raises(ValueError, match="choose must be"):
        analyzer.analyze(img, choose="biggest")


def test_no_face_error_names_file_and_retried_sizes(analyzer, spy_sizes, tmp_path):
    path = tmp_path / "black.png"
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(path)
    with pytest.raises(NoFaceError) as err:
        analyzer.analyze(path)
    msg = str(err.value)
    assert str(path) in msg and "640, 576, 512, 448, 384, 320" in msg
    assert spy_sizes == list(DEFAULT_DET_SIZES)


def test_retry_at_smaller_size_finds_face(analyzer, spy_sizes):
    # A 64 px "face" covers 2x2 detector cells at 640 (no detection) and fits the cells better at 576.
    f = analyzer.analyze(face_image(patches=((64, 64, 64),)))
    assert spy_sizes == [640, 576]
    assert 64 - 1 <= f.bbox[0] and f.bbox[2] <= 128 + 1  # box mapped back to source pixels


def test_average_of_several_references(analyzer):
    imgs = [face_image(seed=s) for s in (1, 2, 3)]
    faces = [analyzer.analyze(im) for im in imgs]
    e = np.stack([f.embedding for f in faces])
    assert (e @ e.T)[np.triu_indices(3, 1)].max() < 0.999  # different photos give different embeddings

    ident = analyzer.identity(imgs)
    mean = e.mean(0)
    np.testing.assert_allclose(ident.embedding, mean / np.linalg.norm(mean), atol=1e-6)
    assert abs(np.linalg.norm(ident.embedding) - 1) < 1e-6
    raw_norm = np.mean([np.linalg.norm(f.raw_embedding) for f in faces])
    np.testing.assert_allclose(ident.raw_embedding, ident.embedding * raw_norm, rtol=1e-5)
    assert len(ident.crops) == 3 and all(np.array_equal(a, f.crop) for a, f in zip(ident.crops, faces))
    assert ident.crop is ident.crops[0] and ident.kps is None and ident.bbox is None
    assert ident.source.startswith("average of:")
    # The same from precomputed embeddings; one image is a pass-through.
    pre = average_faces([FaceInfo.from_embedding(f.raw_embedding) for f in faces])
    np.testing.assert_allclose(pre.embedding, ident.embedding, atol=1e-6)
    assert np.array_equal(analyzer.identity(imgs[0]).embedding, faces[0].embedding)

    with pytest.raises(ValueError, match="cancel out"):
        average_faces([FaceInfo.from_embedding(faces[0].embedding), FaceInfo.from_embedding(-faces[0].embedding)])
    with pytest.raises(ValueError, match="at least one"):
        average_faces([])
    with pytest.raises(ValueError, match="at least one"):
        analyzer.identity([])


def test_grayscale_and_rgba_inputs(analyzer, tmp_path):
    rgb = face_image()
    ref = analyzer.analyze(rgb)
    gray = rgb[..., 0]  # bright patch in the single channel
    for image in (gray, gray[..., None], Image.fromarray(gray)):
        f = analyzer.analyze(image)
        np.testing.assert_allclose(f.bbox, ref.bbox, atol=1e-3)
        assert np.array_equal(f.crop[..., 0], f.crop[..., 2])  # gray replicated to 3 channels
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
    bgra = rgba[..., [2, 1, 0, 3]]
    for image, kw in ((rgba, {}), (bgra, {"channels": "bgr"}), (Image.fromarray(rgba, "RGBA"), {})):
        np.testing.assert_array_equal(analyzer.analyze(image, **kw).embedding, ref.embedding)
    path = tmp_path / "face_la.png"
    Image.fromarray(gray).convert("LA").save(path)
    np.testing.assert_allclose(analyzer.analyze(path).bbox, ref.bbox, atol=1e-3)


def test_load_image_conversions():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: unchanged
    rgba[1, 1] = (10, 20, 30, 0)  # transparent: white
    bgr, name = load_image(rgba, source="x")
    assert name == "x" and bgr.shape == (2, 2, 3)
    assert tuple(bgr[0, 0]) == (30, 20, 10) and tuple(bgr[1, 1]) == (255, 255, 255)
    bgr2, _ = load_image(rgba[..., [2, 1, 0, 3]], channels="bgr")
    assert np.array_equal(bgr, bgr2)
    pal = Image.fromarray(np.full((3, 3), 7, np.uint8)).convert("P")
    assert load_image(pal)[0].shape == (3, 3, 3)


def test_bad_images(analyzer, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg: cannot read"):
        analyzer.analyze(broken)
    with pytest.raises(ImageReadError, match="missing.png: no such image file"):
        analyzer.analyze(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="uint8"):
        analyzer.analyze(face_image().astype(np.float32))
    with pytest.raises(ImageReadError, match="shape"):
        analyzer.analyze(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ImageReadError, match="empty"):
        analyzer.analyze(np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(ImageReadError, match="unsupported image type list"):
        analyzer.analyze([[0, 1]])
    with pytest.raises(ValueError, match="channels must be"):
        analyzer.analyze(face_image(), channels="rbg")


def test_missing_model_pack_never_downloads(tmp_path, monkeypatch):
    import insightface.utils.storage as storage

    def no_download(*a, **k):
        raise AssertionError("insightface tried to download")

    monkeypatch.setattr(storage, "download_file", no_download)
    with pytest.raises(WeightFormatError) as err:
        FaceAnalyzer(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "models" / "buffalo_l") in msg and "buffalo_l.zip" in msg and "never downloads" in msg
    # root given one level too deep: the message says which root to pass.
    (tmp_path / "models" / "antelopev2").mkdir(parents=True)
    with pytest.raises(WeightFormatError, match=f"pass root={tmp_path}"):
        FaceAnalyzer(tmp_path / "models", pack="antelopev2")
    with pytest.raises(WeightFormatError, match="antelopev2.zip"):  # folder exists but holds no .onnx
        FaceAnalyzer(tmp_path, pack="antelopev2")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crop_size": 200}, "multiple of 112 or 128"),
        ({"det_sizes": (640, 600)}, "multiples of 32"),
        ({"det_sizes": ()}, "multiples of 32"),
        ({"crop_channels": "rbg"}, "crop_channels"),
    ],
)
def test_bad_analyzer_arguments(pack, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FaceAnalyzer(pack[0], **kwargs)


def test_incomplete_or_damaged_pack(tmp_path):
    make_recognizer(tmp_path / "a" / "models" / "buffalo_l" / "w.onnx")
    with pytest.raises(WeightFormatError, match="no face detection model"):
        FaceAnalyzer(tmp_path / "a", providers=["CPUExecutionProvider"])
    make_detector(tmp_path / "b" / "models" / "buffalo_l" / "det.onnx")
    with pytest.raises(WeightFormatError, match="no face recognition"):
        FaceAnalyzer(tmp_path / "b", providers=["CPUExecutionProvider"])
    make_detector(tmp_path / "d" / "models" / "buffalo_l" / "det.onnx", with_kps=False)
    make_recognizer(tmp_path / "d" / "models" / "buffalo_l" / "w.onnx")
    with pytest.raises(WeightFormatError, match="no keypoints"):
        FaceAnalyzer(tmp_path / "d", providers=["CPUExecutionProvider"])
    bad = tmp_path / "c" / "models" / "buffalo_l"
    bad.mkdir(parents=True)
    (bad / "det_10g.onnx").write_bytes(b"truncated download")
    with pytest.raises(WeightFormatError, match="could not be loaded"):
        FaceAnalyzer(tmp_path / "c", providers=["CPUExecutionProvider"])


def test_antelopev2_nested_zip_layout(tmp_path):
    w = make_pack(tmp_path, "antelopev2", seed=5, subdir="antelopev2")  # what unzipping antelopev2.zip in place gives
    an = FaceAnalyzer(tmp_path, pack="antelopev2", providers=["CPUExecutionProvider"])
    img = face_image()
    f = an.analyze(img)
    expected = oracle_embedding(face_align.norm_crop(img[..., ::-1].copy(), f.kps, 112), w)
    assert _rel(f.raw_embedding, expected) < EMB_RTOL


def test_face_info_from_embedding_and_immutability():
    rng = np.random.default_rng(0)
    raw = rng.standard_normal(512).astype(np.float32) * 20
    crop = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    f = FaceInfo.from_embedding(raw, crop=crop)
    np.testing.assert_allclose(f.embedding, raw / np.linalg.norm(raw), atol=1e-7)
    assert np.array_equal(f.raw_embedding, raw) and np.array_equal(f.crop, crop) and f.crop_channels == "bgr"
    assert f.kps is None and f.score is None and f.source == "precomputed"
    np.testing.assert_array_equal(FaceInfo.from_embedding(raw[None]).embedding, f.embedding)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.embedding = raw
    with pytest.raises(ValueError, match="read-only"):
        f.embedding[0] = 1.0
    crop[0, 0] = 0  # the FaceInfo holds its own copy
    assert f.crop is not crop

    with pytest.raises(ValueError, match="512-d face embedding"):
        FaceInfo.from_embedding(raw[:511])
    with pytest.raises(ValueError, match="zero or not finite"):
        FaceInfo.from_embedding(np.zeros(512))
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        FaceInfo.from_embedding(raw, crop=crop.astype(np.float32))
    with pytest.raises(ValueError, match="unit vector"):
        FaceInfo(embedding=raw)
    with pytest.raises(ValueError, match="crop_channels"):
        FaceInfo.from_embedding(raw, crop_channels="rbg")
