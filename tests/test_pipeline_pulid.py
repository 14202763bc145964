"""PuLID v1 / v1.1 through fastface.Pipeline: tiny random weights in the released layouts (``pulid_v1.bin`` flat
torch pickle, ``pulid_v1.1.safetensors`` fp16, an EVA-CLIP ``.pt`` with ``visual.*`` keys, facexlib's BiSeNet
``parsing_bisenet.pth`` as a torch pickle, a synthetic antelopev2 insightface pack), photos through the whole
preprocessing, PuLID face files, DCG + AM1 on top, and every error path.

What is compared: the identity tokens the UNet receives equal ``PuLID.encode`` of the inputs that a separately
built ``PuLIDFacePreprocessor`` computes for the same photo (bit-exact: same code path), and the DCG null identity
equals the encoder applied to zero inputs written out here (bit-exact). The numerics of the encoders and the
attention against the formulas are in tests/test_pulid.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastface
from fastface.adapters.faces import FaceAnalyzer, FaceInfo
from fastface.adapters.pulid import PULID_MODES
from fastface.adapters.pulid_faces import BiSeNet, PuLIDFacePreprocessor, load_bisenet
from fastface.hub import HubFile, WeightNotFoundError
from fastface.models.loading import WeightFormatError
from fastface.pipeline import METADATA_KEY, Pipeline
from fastface.adapters.pulid_adapter import (
    BISENET_URL,
    RETINAFACE_URL,
    find_face_detector,
    find_face_parser,
    load_eva,
    open_pulid_preprocessor,
)
from fastface.adapters.pulid_identity import (
    ALIGN_KEYPOINTS,
    ALIGN_RETINAFACE,
    PuLIDIdentity,
    load_pulid_face_file,
    save_pulid_face_file,
)
from fastface.face_files import save_face_file
from fastface.presets import ADAPTER_PRESETS, get_adapter_preset, resolve_method
from fastface.selfcheck import tiny_face, write_tiny_weights

sys.path.insert(0, str(Path(__file__).parent))
from onnx_face_models import face_image, make_pack  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PROMPT = "a photo of a person"
KW = dict(height=64, width=64, seed=3)
ADAPTERS = {"pulid": "pulid_v1", "pulid-v1.1": "pulid_v11"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny weights, a face root with antelopev2 + facexlib/parsing_bisenet.pth, and two face photos."""
    root = tmp_path_factory.mktemp("pulid")
    w = write_tiny_weights(root / "w")
    face_root = root / "faces"
    make_pack(face_root, "antelopev2", seed=1)
    torch.manual_seed(0)
    bisenet = BiSeNet().eval()
    (face_root / "models" / "facexlib").mkdir(parents=True)
    torch.save(bisenet.state_dict(), face_root / "models" / "facexlib" / "parsing_bisenet.pth")
    photos = [root / "me.png", root / "me2.png"]
    Image.fromarray(face_image(256, ((96, 64, 32),))).save(photos[0])
    Image.fromarray(face_image(256, ((64, 128, 32),), seed=1)).save(photos[1])
    return w, face_root, photos


def load(env, adapter: str, **kw) -> Pipeline:
    w, face_root, _ = env
    kw = {"eva": w.eva, "face_root": face_root, "dtype": "fp32", **kw}
    return Pipeline.from_pretrained("hyper", adapter, base=w.base, weights=w.lora,
                                    adapter_file=getattr(w, ADAPTERS[adapter]), device="cpu", **kw)


def probe(unet, tokens):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    args = dict(text_embeds=torch.randn(1, 32, generator=g), time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    with torch.no_grad():
        return unet(x, 999, ctx, id_tokens=tokens, id_scale=0.8, **args), unet(x, 999, ctx, **args)


def capture_id_tokens(pipe):
    """The identity tokens one PuLID attention layer receives at each UNet call (all guidance branches)."""
    seen = []
    layer = pipe.adapter_handle.layers[0]
    return seen, layer.register_forward_pre_hook(lambda m, args: seen.append(args[2].clone()))


def test_presets():
    v1, v11 = ADAPTER_PRESETS["pulid"], ADAPTER_PRESETS["pulid-v1.1"]
    assert v1.weights == HubFile("guozinan/PuLID", "pulid_v1.bin")
    assert v11.weights == HubFile("guozinan/PuLID", "pulid_v1.1.safetensors")
    for a in (v1, v11):
        assert a.eva == HubFile("QuanSun/EVA-CLIP", "EVA02_CLIP_L_336_psz14_s6B.pt")
        assert (a.variant, a.face_pack, a.ip_scale, a.invert_first_token) == ("pulid", "antelopev2", 0.8, False)
        assert a.face_parser == BISENET_URL and a.face_parser_file == "parsing_bisenet.pth"
        assert BISENET_URL.startswith("https://github.com/xinntao/facexlib/releases/")
    assert (v1.pulid_version, v1.pulid_mode, v11.pulid_version, v11.pulid_mode) == ("v1", "fidelity", "v1.1", "v1.1")
    assert (PULID_MODES["fidelity"].num_zero, PULID_MODES["fidelity"].projection) == (8, "ortho_v2")
    assert (PULID_MODES["style"].num_zero, PULID_MODES["style"].projection) == (16, "ortho")
    assert (PULID_MODES["v1.1"].num_zero, PULID_MODES["v1.1"].projection) == (20, "ortho_v2")
    assert resolve_method("fastface-am2", "hyper", adapter="pulid")[1].invert_first is False  # AM: no inversion
    with pytest.raises(ValueError, match="pulid_mode must be one of"):
        get_adapter_preset("pulid", pulid_mode="fast")
    with pytest.raises(ValueError, match="are PuLID settings"):
        get_adapter_preset("faceid", pulid_mode="style")
    with pytest.raises(ValueError, match="no background token"):
        get_adapter_preset("pulid", invert_first_token=True)


@pytest.mark.parametrize("adapter", ["pulid", "pulid-v1.1"])
def test_end_to_end(env, adapter, tmp_path):
    w, face_root, photos = env
    pipe = load(env, adapter)
    pulid, unet = pipe.adapter, pipe.unet
    v1 = adapter == "pulid"
    assert pulid.version == ("v1" if v1 else "v1.1") and pipe.image_encoder is None
    assert pipe.adapter_handle.mode == PULID_MODES["fidelity" if v1 else "v1.1"]
    fixed = torch.randn(1, pulid.config.num_tokens, 64, generator=torch.Generator().manual_seed(1))
    with_id, without_id = probe(unet, fixed)
    assert (with_id - without_id).abs().max() > 1e-3  # the identity branch is installed and acts

    # baseline from a photo: the tokens the UNet receives are PuLID.encode of the preprocessor's outputs
    seen, hook = capture_id_tokens(pipe)
    base = pipe(PROMPT, face=photos[0], method="baseline", **KW)
    hook.remove()
    assert base.unet_evaluations == 4 and len(seen) == 4
    bisenet = load_bisenet(face_root / "models" / "facexlib" / "parsing_bisenet.pth")
    pre = PuLIDFacePreprocessor(FaceAnalyzer(face_root, pack="antelopev2"), bisenet, load_eva(w.eva))
    inputs = pre(photos[0])
    with torch.no_grad():
        want = pulid.encode(inputs.id_cond, inputs.hidden_states)
    assert want.shape == (1, pulid.config.num_tokens, 64) and torch.equal(seen[0], want)
    s = base.settings
    assert s["adapter"] == adapter and s["lora_scale"] is None and s["s_scale"] is None and s["ip_scale"] == 0.8
    assert s["pulid"]["mode"] == ("fidelity" if v1 else "v1.1")
    assert (s["pulid"]["num_zero"], s["pulid"]["projection"]) == ((8 if v1 else 20), "ortho_v2")
    assert s["face"]["photos"] == 1 and s["face"]["id_cond_sha256"]
    assert s["weights"]["eva"] == str(w.eva) and s["weights"]["face_parser"].endswith("parsing_bisenet.pth")
    again = pipe(PROMPT, face=photos[0], method="baseline", **KW)
    assert torch.equal(again.latents, base.latents)  # deterministic

    # FastFace (DCG + AM1): null identity = the encoder of zero inputs; AM on the identity maps changes the image
    seen, hook = capture_id_tokens(pipe)
    ff = pipe(PROMPT, face=photos[0], method="fastface-am1", **KW)
    hook.remove()
    assert ff.unet_evaluations == 10 and sum(len(t) for t in seen) == 10
    c = pulid.config
    with torch.no_grad():
        zeros = pulid.encoder(torch.zeros(1, c.id_dim), [torch.zeros(1, 17, c.vit_dim)] * c.num_vit_layers)
    rows = torch.cat(seen)
    assert any(torch.equal(r[None], zeros) for r in rows) and any(torch.equal(r[None], want) for r in rows)
    assert all(torch.equal(r[None], zeros) or torch.equal(r[None], want) for r in rows)  # DCG uses only these
    assert torch.equal(pipe(PROMPT, face=photos[0], method="fastface-am1", **KW).latents, ff.latents)
    am = pipe(PROMPT, face=photos[0], method="am1", **KW)
    assert am.unet_evaluations == 4
    for other in (ff, am):
        assert (other.latents - base.latents).abs().max() > 1e-4

    # a PuLID face file gives the same image as the photo; the PNG records the PuLID settings
    person = pipe.identity(photos[0])
    path = save_pulid_face_file(tmp_path / "me.safetensors", person)
    back = load_pulid_face_file(path)
    assert torch.equal(back.id_cond, person.id_cond.cpu()) and back.num_images == 1
    assert torch.equal(pipe(PROMPT, face=path, method="baseline", **KW).latents, base.latents)
    png = base.save(0, tmp_path / "out.png")
    with Image.open(png) as im:
        meta = json.loads(im.text[METADATA_KEY])
    assert meta["pulid"]["mode"] == s["pulid"]["mode"] and meta["adapter"] == adapter

    # several photos: v1 concatenates per-photo tokens (10 + 5, or 10 + 10 with id_mix), v1.1 one IDFormer pass
    two = pipe.identity([photos[0], path, photos[1]])
    assert two.num_images == 3
    tokens, null = pipe.pulid_tokens(two)
    if v1:
        assert tokens.shape[1] == null.shape[1] == 20 and torch.equal(tokens[:, :10], want)
        mixed, null_mixed = pipe.pulid_tokens(two, id_mix=True)
        assert mixed.shape[1] == null_mixed.shape[1] == 30
        assert torch.equal(mixed[:, :15], torch.cat([want, want[:, :5]], 1))
        style = pipe(PROMPT, face=photos[0], method="baseline", pulid_mode="style", **KW)
        assert (style.settings["pulid"]["num_zero"], style.settings["pulid"]["projection"]) == (16, "ortho")
        assert pipe.adapter_handle.mode == PULID_MODES["fidelity"]  # the mode was for that call only
        assert (style.latents - base.latents).abs().max() > 1e-4
    else:
        assert tokens.shape[1] == null.shape[1] == c.num_queries and (tokens - want).abs().max() > 1e-4
        with pytest.raises(ValueError, match="id_mix is a PuLID v1 option"):
            pipe(PROMPT, face=photos[0], id_mix=True, **KW)

    # the UNet is left as it was; removing PuLID leaves no identity branch
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    assert all(not m._forward_hooks for _, m in fastface.hooks.identity_points(unet))
    assert torch.equal(probe(unet, fixed)[0], with_id)
    pipe.adapter_handle.remove()
    assert torch.equal(probe(unet, fixed)[0], without_id)


def test_fp16_unet_with_fp32_pulid(env):
    """As upstream: fp16 UNet, fp32 encoder and identity K/V (cast to the query dtype). Tolerance: 1% of the
    latents' max |value| against the all-fp32 pipeline (measured ~0.1%; the identity itself moves them ~7%)."""
    photo = env[2][0]
    half, full = load(env, "pulid", dtype="fp16"), load(env, "pulid")
    assert half.unet.conv_in.weight.dtype == torch.float16
    assert half.adapter_handle.layers[0].to_k_ip.weight.dtype == torch.float32
    assert next(half.adapter.encoder.parameters()).dtype == torch.float32
    a = half(PROMPT, face=photo, method="fastface-am1", **KW).latents
    b = full(PROMPT, face=photo, method="fastface-am1", **KW).latents
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(f"fp16 vs fp32 PuLID pipeline: max rel error {err:.2e}")
    assert torch.isfinite(a).all() and err < 1e-2


def test_inputs_pulid_cannot_use(env, tmp_path):
    pipe = load(env, "pulid")
    save_face_file(tmp_path / "faceid.safetensors", tiny_face())
    np.save(tmp_path / "emb.npy", np.asarray(tiny_face().embedding))
    for face in (tiny_face(), torch.randn(512), tmp_path / "emb.npy", tmp_path / "faceid.safetensors"):
        with pytest.raises(ValueError, match="PuLID needs photos or a PuLID face file"):
            pipe(PROMPT, face=face, **KW)
    with pytest.raises(ValueError, match="lora_scale is an IP-Adapter option; PuLID has no LoRA"):
        pipe(PROMPT, face=env[2][0], lora_scale=0.5, **KW)
    with pytest.raises(ValueError, match=r"mode must be one of fidelity, style, v1.1, plain, got 'fast'"):
        pipe(PROMPT, face=env[2][0], pulid_mode="fast", **KW)
    with pytest.raises(ValueError, match=r"EVA hidden state 0 must be|id_cond must be"):  # another EVA's shapes
        pipe(PROMPT, face=PuLIDIdentity(torch.randn(1, 1280), (torch.randn(1, 577, 1024),) * 5), **KW)
    with pytest.raises(ValueError, match="one row per photo"):
        PuLIDIdentity(torch.randn(2, 544), (torch.randn(1, 17, 64),) * 5)
    from safetensors.torch import save_file

    save_file({"pulid_id_cond": torch.zeros(544), "pulid_hidden_states": torch.zeros(17, 64)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"expected float pulid_id_cond \[N, 1280\]"):
        load_pulid_face_file(tmp_path / "bad.safetensors")


def test_missing_face_models_say_how_to_get_them(env, tmp_path, monkeypatch):
    w, face_root, photos = env
    preset = ADAPTER_PRESETS["pulid"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    # EVA: from the preset (the Hugging Face cache) or a local path
    with pytest.raises(WeightNotFoundError, match="QuanSun/EVA-CLIP") as err:
        open_pulid_preprocessor(preset, face_root=face_root)
    assert "hf download QuanSun/EVA-CLIP EVA02_CLIP_L_336_psz14_s6B.pt" in str(err.value)
    assert "\n" not in str(err.value)
    # BiSeNet: not on the hub; the message names the folders searched, the release URL and the options
    with pytest.raises(WeightNotFoundError, match="parsing_bisenet.pth") as err:
        find_face_parser(preset, tmp_path / "no-face-root")
    text = str(err.value)
    assert BISENET_URL in text and str(tmp_path / "no-face-root" / "models" / "facexlib") in text
    assert "--face-parser" in text and "--download" in text and "\n" not in text
    # through the pipeline: found at the first photo, reported then
    pipe = load(env, "pulid", face_parser=tmp_path / "nowhere.pth")
    with pytest.raises(WeightNotFoundError, match=r"nowhere.pth: no such BiSeNet face-parsing file"):
        pipe(PROMPT, face=photos[0], **KW)
    pipe = load(env, "pulid", eva=tmp_path / "no-eva.pt")
    with pytest.raises(WeightNotFoundError, match="no-eva.pt: no such local file"):
        pipe(PROMPT, face=photos[0], **KW)
    with pytest.raises(WeightFormatError, match=r"PuLID v1.1 file, but the adapter preset 'pulid' is PuLID v1"):
        Pipeline.from_pretrained("hyper", "pulid", base=w.base, weights=w.lora, adapter_file=w.pulid_v11,
                                 dtype="fp32", device="cpu")
    with pytest.raises(WeightFormatError, match="not an EVA-CLIP vision checkpoint"):
        load_eva(w.pulid_v1)


def test_face_parser_is_downloaded_only_when_allowed(tmp_path, monkeypatch):
    import fastface.hub as loading

    calls = []

    def fake(url, dest):
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"weights")

    monkeypatch.setattr(loading, "_download_url", fake)
    monkeypatch.setattr(loading, "_facexlib_weights_dir", lambda: None)
    preset = ADAPTER_PRESETS["pulid"]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(WeightNotFoundError):
        find_face_parser(preset, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightNotFoundError, match="HF_HUB_OFFLINE is set"):
        find_face_parser(preset, tmp_path, download=True)
    assert calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    got = find_face_parser(preset, tmp_path, download=True)
    assert calls == [BISENET_URL] and got == tmp_path / "models" / "facexlib" / "parsing_bisenet.pth"
    assert find_face_parser(preset, tmp_path, download=True) == got and len(calls) == 1  # found now


# ----------------------------------------------------------------------------------------------------------------
# Alignment: facexlib's RetinaFace when its file is found, else insightface keypoints with a warning


def write_tiny_retinaface(path: Path, photo: Path) -> Path:
    """facexlib's ``detection_Resnet50_Final.pth`` layout (``module.`` prefix, torch pickle) with random weights
    (the released file's shapes: only ResNet-50 exists) whose detections on ``photo`` pass the 0.97 threshold: face
    logits raised by 20, box and landmark heads scaled so that outputs stay near the anchors (std 0.3 on ``photo``),
    landmark biases a face-like 5-point pattern (eyes above, nose centre, mouth below) so the alignment is regular."""
    from fastface.models.retinaface import RetinaFace

    torch.manual_seed(11)
    net = RetinaFace().eval()
    bgr = np.ascontiguousarray(np.asarray(Image.open(photo).convert("RGB"))[..., ::-1])
    pattern = torch.tensor([-3.0, -2, 3, -2, 0, 0, -2, 3, 2, 3])  # in units of 0.1 x the anchor size
    with torch.no_grad():
        feats_in = net.fpn(net.body(net.preprocess(bgr)))
        feats = [net.ssh1(feats_in[0]), net.ssh2(feats_in[1]), net.ssh3(feats_in[2])]
        for heads, bias in ((net.BboxHead, None), (net.LandmarkHead, pattern)):
            k = 0.3 / float(torch.cat([h(f).flatten() for h, f in zip(heads, feats)]).std())
            for h in heads:
                h.conv1x1.weight.mul_(k)
                h.conv1x1.bias.copy_(torch.zeros_like(h.conv1x1.bias) if bias is None else bias.repeat(2))
        for h in net.ClassHead:
            h.conv1x1.bias += torch.tensor([0, 20.0] * 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def detector_file(env, tmp_path_factory):
    return write_tiny_retinaface(tmp_path_factory.mktemp("retinaface") / "detection_Resnet50_Final.pth", env[2][0])


def _hand_built(env, detector=None) -> PuLIDFacePreprocessor:
    w, face_root, _ = env
    bisenet = load_bisenet(face_root / "models" / "facexlib" / "parsing_bisenet.pth")
    return PuLIDFacePreprocessor(FaceAnalyzer(face_root, pack="antelopev2"), bisenet, load_eva(w.eva),
                                 detector=detector)


def test_retinaface_alignment_when_the_file_is_found(env, detector_file, tmp_path, monkeypatch, caplog):
    """Explicit face_detector=, then found in <face_root>/models/facexlib/: the UNet receives the tokens of
    PuLIDFacePreprocessor(detector=RetinaFace) built by hand (bit-exact), not those of the keypoint path."""
    from fastface.models.retinaface import RetinaFace

    w, face_root, photos = env
    monkeypatch.setattr("fastface.hub._facexlib_weights_dir", lambda: None)
    with_det = _hand_built(env, RetinaFace.from_pretrained(detector_file))(photos[0])
    assert with_det.landmarks is not None
    without = _hand_built(env)(photos[0])
    assert not np.array_equal(with_det.aligned, without.aligned)  # the two paths give different crops here

    # a second face root holding the detector next to BiSeNet (the packs linked from the first)
    root2 = tmp_path / "faces2"
    (root2 / "models" / "facexlib").mkdir(parents=True)
    (root2 / "models" / "antelopev2").symlink_to(face_root / "models" / "antelopev2", target_is_directory=True)
    (root2 / "models" / "facexlib" / "parsing_bisenet.pth").symlink_to(
        face_root / "models" / "facexlib" / "parsing_bisenet.pth")
    (root2 / "models" / "facexlib" / "detection_Resnet50_Final.pth").symlink_to(detector_file)
    for kw, where in ((dict(face_detector=detector_file), detector_file),
                      (dict(face_root=root2), root2 / "models" / "facexlib" / "detection_Resnet50_Final.pth")):
        pipe = load(env, "pulid", **kw)
        seen, hook = capture_id_tokens(pipe)
        caplog.clear()
        with caplog.at_level("INFO", logger="fastface"):
            out = pipe(PROMPT, face=photos[0], method="baseline", **KW)
        hook.remove()
        with torch.no_grad():
            want = pipe.adapter.encode(with_det.id_cond, with_det.hidden_states)
            other = pipe.adapter.encode(without.id_cond, without.hidden_states)
        assert torch.equal(seen[0], want) and not torch.equal(seen[0], other)
        assert "aligned as upstream, with facexlib's RetinaFace-R50" in caplog.text
        assert "differs from upstream" not in caplog.text
        assert out.settings["pulid"]["alignment"] == ALIGN_RETINAFACE
        assert out.settings["weights"]["face_detector"] == str(where)
        png = out.save(0, tmp_path / "out.png")
        with Image.open(png) as im:
            assert json.loads(im.text[METADATA_KEY])["pulid"]["alignment"] == ALIGN_RETINAFACE
    # the alignment travels with a PuLID face file
    path = save_pulid_face_file(tmp_path / "me.safetensors", pipe.identity(photos[0]))
    assert load_pulid_face_file(path).alignment == ALIGN_RETINAFACE
    assert pipe(PROMPT, face=path, method="baseline", **KW).settings["pulid"]["alignment"] == ALIGN_RETINAFACE


def test_keypoint_fallback_warns(env, monkeypatch, caplog, tmp_path):
    """No RetinaFace file: insightface keypoints (the hand-built detector=None path) and a warning saying how it
    differs from upstream and how to get the file."""
    w, face_root, photos = env
    monkeypatch.setattr("fastface.hub._facexlib_weights_dir", lambda: None)
    pipe = load(env, "pulid")
    seen, hook = capture_id_tokens(pipe)
    with caplog.at_level("WARNING", logger="fastface"):
        out = pipe(PROMPT, face=photos[0], method="baseline", **KW)
    hook.remove()
    inputs = _hand_built(env)(photos[0])
    with torch.no_grad():
        assert torch.equal(seen[0], pipe.adapter.encode(inputs.id_cond, inputs.hidden_states))
    text = caplog.text
    assert "detection_Resnet50_Final.pth" in text and "differs from upstream" in text
    assert RETINAFACE_URL in text and str(face_root / "models" / "facexlib") in text
    assert "--face-detector" in text and "--download" in text
    assert out.settings["pulid"]["alignment"] == ALIGN_KEYPOINTS and "face_detector" not in out.settings["weights"]
    path = save_pulid_face_file(tmp_path / "kp.safetensors", pipe.identity(photos[0]))
    assert load_pulid_face_file(path).alignment == ALIGN_KEYPOINTS
    mixed = PuLIDIdentity.stack([load_pulid_face_file(path), PuLIDIdentity(inputs.id_cond, inputs.hidden_states)])
    assert mixed.alignment == f"{ALIGN_KEYPOINTS}, unknown"
    # an explicit path must exist; other adapters refuse the option
    with pytest.raises(WeightNotFoundError, match="nowhere.pth: no such RetinaFace file"):
        load(env, "pulid", face_detector=tmp_path / "nowhere.pth")(PROMPT, face=photos[0], **KW)
    with pytest.raises(ValueError, match="face_detector is a PuLID option; adapter 'faceid' does not use it"):
        Pipeline.from_pretrained("hyper", "faceid", base=w.base, weights=w.lora, face_detector="x.pth",
                                 device="cpu", dtype="fp32")


def test_face_detector_is_downloaded_only_when_allowed(tmp_path, monkeypatch, caplog):
    import fastface.hub as pulid_loading

    calls = []

    def fake(url, dest):
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"weights")

    monkeypatch.setattr(pulid_loading, "_download_url", fake)
    monkeypatch.setattr(pulid_loading, "_facexlib_weights_dir", lambda: None)
    preset = ADAPTER_PRESETS["pulid"]
    assert preset.face_detector == RETINAFACE_URL and preset.face_detector_file == "detection_Resnet50_Final.pth"
    assert RETINAFACE_URL.startswith("https://github.com/xinntao/facexlib/releases/")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert find_face_detector(preset, tmp_path) is None and calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("WARNING", logger="fastface"):
        assert find_face_detector(preset, tmp_path, download=True) is None
    assert "HF_HUB_OFFLINE is set" in caplog.text and calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    got = find_face_detector(preset, tmp_path, download=True)
    assert calls == [RETINAFACE_URL] and got == tmp_path / "models" / "facexlib" / "detection_Resnet50_Final.pth"
    assert find_face_detector(preset, tmp_path, download=True) == got and len(calls) == 1  # found now

    def failing(url, dest):
        raise OSError("no network")

    monkeypatch.setattr(pulid_loading, "_download_url", failing)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastface"):  # optional: a failed download falls back
        assert find_face_detector(preset, tmp_path / "other", download=True) is None
    assert "The download failed (OSError: no network)" in caplog.text
    with pytest.raises(ValueError, match="face_detector must be the URL or file name"):
        get_adapter_preset("pulid", face_detector="")
    assert find_face_detector(get_adapter_preset("pulid", face_detector=None), tmp_path / "other") is None
