"""The README's "Use it from your own code" snippet runs as written once its paths are real (here: tiny files).

Only the paths, the device/dtype line and the image size are substituted; every name the snippet uses is its own.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from fastface.adapters.faceid import FaceIDProjConfig, build_projection
from fastface.models.unet import UNet, get_unet_config
from fastface.adapters.faceid_adapter import _ip_adapter_weights as _ip_adapter
from fastface.selfcheck import write_tiny_weights

sys.path.insert(0, str(Path(__file__).parent))
import onnx_face_models  # noqa: E402  (needs the onnx package of the test extra)

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Use it from your own code"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_library_snippet_runs(tmp_path):
    w = write_tiny_weights(tmp_path / "w")
    cfg = get_unet_config("tiny")
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        unet = UNet(cfg)
    proj = build_projection(FaceIDProjConfig(context_dim=cfg.context_dim, id_hidden_dim=64))
    adapter_file = tmp_path / "ip-adapter-faceid_sdxl.safetensors"
    save_file({**{f"image_proj.{k}": v for k, v in proj.state_dict().items()},
               **{f"ip_adapter.{k}": v for k, v in _ip_adapter(unet, cfg.context_dim, gen).items()}}, adapter_file)
    onnx_face_models.make_pack(tmp_path / "insightface", "buffalo_l")
    photo = tmp_path / "me.png"
    Image.fromarray(onnx_face_models.face_image(256, ((96, 64, 32),))).save(photo)

    code = _snippet()
    subs = {
        '"cuda", torch.float16': '"cpu", torch.float32',
        '"path/to/stable-diffusion-xl-base-1.0"': repr(str(w.base)),
        '"path/to/sdxl_lightning_4step_unet.safetensors"': repr(str(w.base / "unet")),
        '"path/to/ip-adapter-faceid_sdxl.bin"': repr(str(adapter_file)),
        '"~/.insightface"': repr(str(tmp_path / "insightface")),
        '"me.jpg"': repr(str(photo)),
        "(1024, 1024)": "(64, 64)",
        "1, 4, 128, 128": "1, 4, 8, 8",
    }
    for old, new in subs.items():
        assert old in code, f"the README snippet no longer contains {old!r}: update this test's substitutions"
        code = code.replace(old, new)
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    image = scope["image"]
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert float(out.getvalue()) == 10  # fastface-am1 (DCG + AM1): 10 UNet evaluations per 4-step image
    assert np.isfinite(scope["embedding"].numpy()).all() and scope["context"].shape[:2] == (1, 77)
