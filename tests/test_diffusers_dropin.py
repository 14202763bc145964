"""FastFace as a drop-in for diffusers users: ``fastface.integrations.diffusers.enable(pipe, method)``.

The user's diffusers ``StableDiffusionXLPipeline`` (tiny random components written by diffusers/transformers, the
FaceID / FaceID-Plus-v2 adapters in their original format loaded by diffusers' ``load_ip_adapter``, which also
loads the FaceID LoRA through peft) with ``enable(...)`` against ``fastface.Pipeline`` on the same files, seed,
prompt and identity. Tolerance, fp32: max |diffusers - ours| / max |ours| <= 1e-5 on the final latents and
max |diffusers - ours| <= 1e-5 on the decoded image in [0, 1].
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_ip_adapter import make_image_proj, make_ip_adapter, save_bin  # noqa: E402
from test_pipeline import ADAPTER, LIGHTNING, LORA, PROMPT, files, identity  # noqa: E402, F401

import diffusers  # noqa: E402
from fastface.adapters.faceid import FaceIDProjConfig  # noqa: E402
from fastface.integrations.diffusers import (  # noqa: E402
    TESTED_DIFFUSERS,
    enable,
    face_inputs,
    null_identity,
    version_tested,
)
from fastface.models.unet import UNet, get_unet_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

TOL = 1e-5
FACEID = "ip-adapter-faceid_sdxl.bin"
METHODS = ["baseline", "dcg", "am1", "am2", "fastface-am1", "fastface-am2"]
IP_SCALE = 0.8
# the diffusers scheduler a user sets for each fastface preset (as the model cards do)
SCHEDULERS = {
    "hyper": (diffusers.DDIMScheduler, {"timestep_spacing": "trailing"}, {}),
    "lightning": (diffusers.EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, {}),
    "lcm": (diffusers.LCMScheduler, {}, {}),
    "tcd": (diffusers.TCDScheduler, {}, {"eta": 0.3}),
}


@pytest.fixture(scope="module")
def faceid_file(files) -> Path:
    """The FaceID adapter (with its LoRA) in the original .bin layout, next to the Plus-v2 file."""
    cfg = get_unet_config("tiny")
    with torch.device("meta"):
        dims = [a.to_q.out_features for _, a in UNet(cfg).attention_layers()]
    gen = torch.Generator().manual_seed(21)
    pcfg = FaceIDProjConfig(context_dim=cfg.context_dim)
    return save_bin(files / FACEID, make_image_proj(pcfg, gen), make_ip_adapter(dims, cfg.context_dim, gen, 4))


def _user_pipe(files: Path, weights: str, adapter: str) -> diffusers.StableDiffusionXLPipeline:
    """What a diffusers user writes: base + distilled weights, then diffusers' own load_ip_adapter."""
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(files / "base")
    pipe.set_progress_bar_config(disable=True)
    if weights == "lightning":
        from safetensors.torch import load_file

        pipe.unet.load_state_dict(load_file(str(files / LIGHTNING)))
    else:
        pipe.load_lora_weights(str(files), weight_name=LORA)
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()
    encoder = "image_encoder" if adapter == ADAPTER else None
    pipe.load_ip_adapter(str(files), subfolder="", weight_name=adapter, image_encoder_folder=encoder)
    pipe.set_ip_adapter_scale(IP_SCALE)
    return pipe


def _ours(files: Path, preset: str, plus: bool, faceid_file: Path):
    """fastface.Pipeline on the same files (the distilled LoRA for hyper/lcm/tcd, the UNet file for lightning)."""
    from fastface.pipeline import Pipeline

    extra = {"image_encoder": files / "image_encoder"} if plus else {}
    return Pipeline.from_pretrained(preset, "faceid-plusv2" if plus else "faceid", base=files / "base",
                                    weights=files / (LIGHTNING if preset == "lightning" else LORA),
                                    adapter_file=files / ADAPTER if plus else faceid_file, dtype="fp32",
                                    device="cpu", **extra)


@pytest.fixture(scope="module")
def pipes(files, faceid_file):
    """get(preset, plus) -> (the user's diffusers pipe with that preset's scheduler, fastface.Pipeline, pipe kwargs);
    built on first use and shared across the module."""
    cache: dict = {}

    def get(preset: str, plus: bool = True):
        weights = "lightning" if preset == "lightning" else "lora"
        if ("d", weights, plus) not in cache:
            cache["d", weights, plus] = _user_pipe(files, weights, ADAPTER if plus else FACEID)
        if ("o", preset, plus) not in cache:
            cache["o", preset, plus] = _ours(files, preset, plus, faceid_file)
        pipe = cache["d", weights, plus]
        cls, cfg, call = SCHEDULERS[preset]
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **cfg)
        return pipe, cache["o", preset, plus], call

    return get


def run_diffusers(pipe, face, method: str | None, preset: str, call: dict, prompts=(PROMPT,), seed: int = 11):
    """The user's own pipe(...) call (guidance_scale=0) under enable(...); returns latents, image, evaluations."""
    seen = {}

    def keep(p, i, t, kw):
        seen["latents"] = kw["latents"]
        return {}

    kwargs = face_inputs(pipe, face)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]

    def go():
        return pipe(list(prompts), **kwargs, num_inference_steps=4, guidance_scale=0.0, height=64, width=64,
                    generator=gens, output_type="pt", callback_on_step_end=keep, **call).images

    if method is None:
        img = go()
        return seen["latents"], img, None
    with enable(pipe, method, preset=preset) as h:
        img = go()
        return seen["latents"], img, h.branch_evaluations


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


CASES = [(p, m) for p in ("hyper", "lightning") for m in METHODS] + [
    (p, m) for p in ("lcm", "tcd") for m in ("baseline", "fastface-am1")]


@pytest.mark.parametrize("preset,method", CASES)
def test_dropin_equals_fastface_pipeline(pipes, identity, preset, method):
    face = identity[0]
    pipe, ours, call = pipes(preset)
    lat, img, evals = run_diffusers(pipe, face, method, preset, call)
    ref = ours(PROMPT, face=face, method=method, seed=11, height=64, width=64, ip_scale=IP_SCALE)
    e_lat, e_img = rel(lat, ref.latents), float((img - ref.pixels).abs().max())
    print(f"{preset:9s} {method:13s} latents {e_lat:.2e} image {e_img:.2e} evals {evals}")
    assert e_lat <= TOL and e_img <= TOL
    assert evals == ref.unet_evaluations


def test_empty_prompt_encoded_when_the_pipeline_does_not_zero_it(files, pipes, identity, tmp_path_factory):
    """force_zeros_for_empty_prompt=False: DCG's null text is the encoded empty prompt, in both pipelines."""
    import json

    base = tmp_path_factory.mktemp("nozeros") / "base"
    base.mkdir()
    for part in (files / "base").iterdir():
        (base / part.name).symlink_to(part)
    index = json.loads((files / "base" / "model_index.json").read_text())
    (base / "model_index.json").unlink()
    (base / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    root = base.parent
    for name in (LORA, ADAPTER, "image_encoder"):
        (root / name).symlink_to(files / name)
    pipe = _user_pipe(root, "lora", ADAPTER)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    assert not pipe.config.force_zeros_for_empty_prompt
    lat, img, evals = run_diffusers(pipe, identity[0], "fastface-am1", "hyper", {})
    from fastface.pipeline import Pipeline

    ours = Pipeline.from_pretrained("hyper", "faceid-plusv2", base=base, weights=files / LORA,
                                    adapter_file=files / ADAPTER, image_encoder=files / "image_encoder",
                                    dtype="fp32", device="cpu")
    ref = ours(PROMPT, face=identity[0], method="fastface-am1", seed=11, height=64, width=64, ip_scale=IP_SCALE)
    assert rel(lat, ref.latents) <= TOL and float((img - ref.pixels).abs().max()) <= TOL and evals == 10
    zeros, _, _ = run_diffusers(pipes("hyper")[0], identity[0], "fastface-am1", "hyper", {})
    assert rel(lat, zeros) > 1e-4  # the null text matters: zeros give another image


@pytest.mark.parametrize("method", ["baseline", "fastface-am1", "fastface-am2"])
def test_faceid_dropin_equals_fastface_pipeline(pipes, identity, method):
    face, emb, _ = identity
    pipe, ours, call = pipes("hyper", plus=False)
    lat, img, evals = run_diffusers(pipe, emb.numpy(), method, "hyper", call)
    ref = ours(PROMPT, face=face, method=method, seed=11, height=64, width=64, ip_scale=IP_SCALE)
    e_lat, e_img = rel(lat, ref.latents), float((img - ref.pixels).abs().max())
    print(f"faceid    {method:13s} latents {e_lat:.2e} image {e_img:.2e} evals {evals}")
    assert e_lat <= TOL and e_img <= TOL
    assert evals == ref.unet_evaluations


def test_methods_change_the_image_and_counts(pipes, identity):
    """The parity above can fail: each method moves the image away from the baseline."""
    pipe, _, call = pipes("hyper")
    base = run_diffusers(pipe, identity[0], "baseline", "hyper", call)
    for method, evals in (("dcg", 10), ("am1", 4), ("fastface-am2", 12)):
        lat, _, n = run_diffusers(pipe, identity[0], method, "hyper", call)
        assert n == evals and rel(lat, base[0]) > 1e-3, method


def test_remove_restores_the_pipeline_bit_for_bit(pipes, identity):
    pipe, _, call = pipes("hyper")
    procs = dict(pipe.unet.attn_processors)
    keys = list(pipe.unet.state_dict())
    before = run_diffusers(pipe, identity[0], None, "hyper", call)
    handle = enable(pipe, "fastface-am2")
    assert list(pipe.unet.state_dict()) == keys  # the wrapped processors share diffusers' identity weights
    with pytest.raises(ValueError, match="already enabled"):
        enable(pipe, "dcg")
    during = run_diffusers(pipe, identity[0], None, "hyper", call)
    handle.remove()
    handle.remove()  # idempotent
    after = run_diffusers(pipe, identity[0], None, "hyper", call)
    assert all(pipe.unet.attn_processors[k] is v for k, v in procs.items())
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert rel(during[0], before[0]) > 1e-3
    with enable(pipe, "fastface-am1"):
        pass
    assert torch.equal(run_diffusers(pipe, identity[0], None, "hyper", call)[1], before[1])


def test_batch_of_two_prompts_equals_each_alone(pipes, identity):
    pipe, _, call = pipes("hyper")
    prompts = (PROMPT, "a portrait of a person at the beach")
    both, img, evals = run_diffusers(pipe, identity[0], "fastface-am2", "hyper", call, prompts=prompts, seed=40)
    assert evals == 12  # per image: one batched call per step
    for i, p in enumerate(prompts):
        alone, img1, _ = run_diffusers(pipe, identity[0], "fastface-am2", "hyper", call, prompts=(p,), seed=40 + i)
        assert rel(both[i:i + 1], alone) <= TOL and float((img[i:i + 1] - img1).abs().max()) <= TOL
    assert rel(both[0:1], both[1:2]) > 1e-2


def test_clear_errors(files, pipes, identity):
    pipe, _, call = pipes("hyper")
    plain = diffusers.StableDiffusionXLPipeline.from_pretrained(files / "base")
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        enable(plain, "fastface-am1")
    with pytest.raises(ValueError, match="unknown method"):
        enable(pipe, "fastface-am3")
    layers = pipe.unet.encoder_hid_proj.image_projection_layers
    original = layers[0]
    layers[0] = diffusers.models.embeddings.ImageProjection(image_embed_dim=8, cross_attention_dim=8)
    try:
        with pytest.raises(ValueError, match="unsupported IP-Adapter kind.*FaceID-Plus-v2"):
            enable(pipe)
    finally:
        layers[0] = original
    # the pipeline's own CFG together with DCG
    kwargs = face_inputs(pipe, identity[0])
    emb = kwargs["ip_adapter_image_embeds"][0]
    with enable(pipe, "fastface-am1"), pytest.raises(ValueError, match="guidance_scale=0"):
        pipe(PROMPT, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(emb), emb])], num_inference_steps=4,
             guidance_scale=5.0, height=64, width=64)
    with enable(pipe, "fastface-am1"), pytest.raises(ValueError, match="ip_adapter_image_embeds"):
        pipe(PROMPT, num_inference_steps=4, guidance_scale=0.0, height=64, width=64)
    heun = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    ddim, pipe.scheduler = pipe.scheduler, heun
    try:
        with enable(pipe, "dcg"), pytest.raises(ValueError, match="one evaluation per step"):
            pipe(PROMPT, **kwargs, num_inference_steps=2, guidance_scale=0.0, height=64, width=64)
    finally:
        pipe.scheduler = ddim
    # pipe.set_ip_adapter_scale reaches the wrapped processors' originals
    originals = [p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    with enable(pipe, "am1"):
        pipe.set_ip_adapter_scale(0.5)
    assert all(p.scale == [0.5] for p in originals) and len(originals) == 70
    pipe.set_ip_adapter_scale(IP_SCALE)
    # Plus-v2 without an image encoder needs the null CLIP features given
    from types import SimpleNamespace

    bare = SimpleNamespace(unet=pipe.unet, image_encoder=None)
    with pytest.raises(ValueError, match="null_clip_embeds"):
        null_identity(bare)
    zero, clip = null_identity(bare, torch.ones(5, 64))
    assert zero.shape == (1, 1, 512) and not zero.any() and clip.shape == (1, 1, 5, 64)
    with pytest.raises(ValueError, match="insightface face needs the image"):
        face_inputs(pipe, SimpleNamespace(normed_embedding=np.ones(512, np.float32), kps=np.zeros((5, 2))))


def test_import_fastface_does_not_import_diffusers():
    code = ("import sys, fastface, fastface.integrations, fastface.hooks; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_installed_diffusers_is_a_tested_release():
    """The drop-in states the releases its parity tests passed on; a newer diffusers in CI must update the range
    (after these tests pass on it) so that the stated support stays true."""
    assert version_tested(), (f"diffusers {diffusers.__version__} is outside TESTED_DIFFUSERS {TESTED_DIFFUSERS}: "
                              "update it in fastface/integrations/diffusers.py and docs/embedding.md")
    assert version_tested("0.31.0") and version_tested("0.42.1") and not version_tested("0.30.3")
    assert not version_tested("0.43.0.dev0") and version_tested("0.35.2")
