"""Tiny ONNX face models that insightface's real model zoo loads as a detector and an ArcFace recognizer.

Test-only helpers (they need the ``onnx`` package). No weights are downloaded: the graphs are built here.

Detector (routed by ``insightface.model_zoo.ModelRouter`` to ``RetinaFace``/SCRFD decoding because it has >= 5
outputs; 9 outputs = fmc 3, strides 8/16/32, 2 anchors per cell, with keypoints). Outputs are 2-D
(``[cells*2, C]``, non-batched) in the order scores(8,16,32), bbox(8,16,32), kps(8,16,32), like SCRFD's det_10g.
A "face" is a bright-red square that fills one grid cell on a dark background: per stride ``s``,
``A = mean of the red channel over the s x s cell`` (blob units, (v-127.5)/128), ``B = 3x3-cell average of A``,
``score = sigmoid(k * (A - B - t_s))``. A lone bright cell gives ``A - B ~ 1.5-1.8``; a black image or a large
bright area gives ``<= ~1``. Only the second anchor of each cell is always 0. The box of a detection is its cell,
and the 5 keypoints are the ArcFace template scaled into the cell, so ``norm_crop`` maps the cell onto the crop.

Recognizer (routed to ``ArcFaceONNX`` by its 112x112 input): ``embedding = W^T flatten(avgpool8(x))`` for a fixed
random ``W`` [588, 512]; node names avoid ``Sub``/``Mul`` so insightface uses mean = std = 127.5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# Thresholds per stride: stride 8 never fires; stride 16 faces score higher than stride 32 faces.
DEFAULT_THRESHOLDS = {8: 100.0, 16: 1.1, 32: 1.2}
SHARPNESS = 10.0
OPSET = 13


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(array, name=name + "_v"))


def make_detector(path: str | Path, thresholds: dict[int, float] = DEFAULT_THRESHOLDS, with_kps: bool = True) -> Path:
    """Write the SCRFD-compatible tiny detector described in the module docstring (6 outputs if not ``with_kps``)."""
    nodes: list[onnx.NodeProto] = []
    outs: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    box = np.array([0, 0, 1, 1] * 2, dtype=np.float32).reshape(1, 8, 1, 1)  # l, t, r, b in stride units, 2 anchors
    kps = np.tile((ARCFACE_DST / 112.0).reshape(-1), 2).astype(np.float32).reshape(1, 20, 1, 1)
    for s in (8, 16, 32):
        w = np.zeros((1, 3, s, s), dtype=np.float32)
        w[0, 0] = 1.0 / (s * s)  # channel 0 of the blob is red (insightface swaps BGR -> RGB)
        p = f"s{s}_"
        nodes += [
            _const(p + "w", w),
            helper.make_node("Conv", ["input.1", p + "w"], [p + "a"], name=p + "conv", strides=[s, s]),
            helper.make_node(
                "AveragePool", [p + "a"], [p + "b"], name=p + "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                count_include_pad=1,
            ),
            helper.make_node("Sub", [p + "a", p + "b"], [p + "d"], name=p + "dog"),
            _const(p + "t", np.array(thresholds[s], dtype=np.float32)),
            _const(p + "k", np.array(SHARPNESS, dtype=np.float32)),
            helper.make_node("Sub", [p + "d", p + "t"], [p + "dt"], name=p + "shift"),
            helper.make_node("Mul", [p + "dt", p + "k"], [p + "logit"], name=p + "scale"),
            helper.make_node("Sigmoid", [p + "logit"], [p + "sc"], name=p + "sigmoid"),
            _const(p + "zero", np.array(0.0, dtype=np.float32)),
            helper.make_node("Mul", [p + "sc", p + "zero"], [p + "z"], name=p + "zeros"),
            helper.make_node("Concat", [p + "sc", p + "z"], [p + "sc2"], name=p + "anchors", axis=1),
            _const(p + "box", box),
            helper.make_node("Add", [p + "z", p + "box"], [p + "bx"], name=p + "boxmap"),
            _const(p + "kp", kps),
            helper.make_node("Add", [p + "z", p + "kp"], [p + "kx"], name=p + "kpsmap"),
        ]
        for kind, src, c in (("score", p + "sc2", 1), ("bbox", p + "bx", 4), ("kps", p + "kx", 10)):
            name = f"{kind}_{s}"
            nodes += [
                helper.make_node("Transpose", [src], [name + "_t"], name=name + "_perm", perm=[0, 2, 3, 1]),
                _const(name + "_shape", np.array([-1, c], dtype=np.int64)),
                helper.make_node("Reshape", [name + "_t", name + "_shape"], [name], name=name + "_flat"),
            ]
            outs[kind].append(name)
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])]
    channels = {"score": 1, "bbox": 4, "kps": 10}
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"anchors_{n.split('_')[1]}", channels[kind]])
        for kind in ("score", "bbox", "kps")[: 3 if with_kps else 2]
        for n in outs[kind]
    ]
    graph = helper.make_graph(nodes, "tiny_scrfd", inputs, outputs)
    return _save(graph, path)


def make_recognizer(path: str | Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """Write the ArcFace-compatible tiny recognizer; returns (path, W [588, 512])."""
    w = np.random.default_rng(seed).standard_normal((3 * 14 * 14, 512)).astype(np.float32) / 24.0
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        _const("fc_w", w),
        helper.make_node("MatMul", ["flat", "fc_w"], ["embedding"], name="fc"),
    ]
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, 112, 112])]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 512])]
    graph = helper.make_graph(nodes, "tiny_arcface", inputs, outputs)
    return _save(graph, path), w


def _save(graph: onnx.GraphProto, path: str | Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_pack(root: str | Path, name: str = "buffalo_l", seed: int = 0, subdir: str = "") -> np.ndarray:
    """Write ``root/models/<name>[/subdir]/{det_tiny,w_tiny}.onnx``; returns the recognizer's W."""
    folder = Path(root) / "models" / name / subdir
    make_detector(folder / "det_tiny.onnx")
    _, w = make_recognizer(folder / "w_tiny.onnx", seed=seed)
    return w


def face_image(
    size: int | tuple[int, int] = 640, patches: tuple[tuple[int, int, int], ...] = ((224, 160, 32),), seed: int = 0
) -> np.ndarray:
    """An RGB uint8 image: black, with textured bright-red squares ``(x, y, side)`` (the "faces")."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), dtype=np.uint8)
    for x, y, side in patches:
        img[y : y + side, x : x + side, 0] = rng.integers(230, 256, (side, side))
        img[y : y + side, x : x + side, 1] = rng.integers(60, 180, (side, side))
        img[y : y + side, x : x + side, 2] = rng.integers(0, 60, (side, side))
    return img


def oracle_embedding(crop112_bgr: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The recognizer's output computed in numpy from a 112x112 BGR aligned crop (insightface: RGB, (v-127.5)/127.5)."""
    x = (crop112_bgr[..., ::-1].astype(np.float32) - 127.5) / 127.5  # [112, 112, 3] RGB
    pooled = x.reshape(14, 8, 14, 8, 3).mean(axis=(1, 3))  # [14, 14, 3]
    return pooled.transpose(2, 0, 1).reshape(-1) @ w
