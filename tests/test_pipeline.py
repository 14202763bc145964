"""fastface.Pipeline end to end on tiny random weights saved in the real layouts.

Parity: our pipeline in ``baseline`` mode with FaceID-Plus-v2 against diffusers' ``StableDiffusionXLPipeline`` +
``load_ip_adapter`` on the same files (a folder written by ``StableDiffusionXLPipeline.save_pretrained``, a kohya
Hyper LoRA fused as the official code does, an SDXL-Lightning-style bare UNet file, the adapter in its original
flattened layout, a transformers CLIP image encoder folder), the same scheduler, seed, prompt and identity inputs.
Tolerance: fp32, max |ours - diffusers| <= 1e-5 on the decoded image in [0, 1] (``IMAGE_TOL``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fastface
from fastface.adapters.faceid import FaceIDProjConfig
from fastface.adapters.faces import FaceInfo
from fastface.hub import WeightNotFoundError
from fastface.models.tokenizer import write_vocab_folder
from fastface.models.unet import UNet, get_unet_config
from fastface.pipeline import METADATA_KEY, Pipeline
from fastface.face_files import load_face_file, save_face_file

sys.path.insert(0, str(Path(__file__).parent))
from test_ip_adapter import make_image_proj, make_ip_adapter, save_flat_safetensors  # noqa: E402
from test_samplers import SDXL_SCHEDULER_CONFIG  # noqa: E402

import diffusers
import transformers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

IMAGE_TOL = 1e-5
PROMPT = "a photo of a person in a red hat"
ADAPTER = "ip-adapter-faceid-plusv2_sdxl.safetensors"
LORA = "Hyper-SDXL-4steps-lora.safetensors"
LIGHTNING = "sdxl_lightning_4step_unet.safetensors"
CLIP_SIZE = 56  # the tiny CLIP image encoder's resolution


def _perturb(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def _text_config(act: str) -> transformers.CLIPTextConfig:
    # eos_token_id 2 as SDXL's real configs: transformers then pools at input_ids.argmax(-1)
    return transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act=act, projection_dim=32, eos_token_id=2, bos_token_id=0, pad_token_id=1,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Tiny random weights written by diffusers/transformers (and the adapter in its original layout)."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    cfg = get_unet_config("tiny")
    unet = _perturb(diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers_config().items()
                                                    if k != "_class_name"}))
    vae = _perturb(diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=8, latent_channels=4,
        scaling_factor=0.13025, sample_size=64,
    ))
    te1 = _perturb(transformers.CLIPTextModel(_text_config("quick_gelu")))
    te2 = _perturb(transformers.CLIPTextModelWithProjection(_text_config("gelu")))
    tok = [transformers.CLIPTokenizer.from_pretrained(write_vocab_folder(root / f"tok{i}", pad_token=pad))
           for i, pad in ((1, "<|endoftext|>"), (2, "!"))]
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok[0], tokenizer_2=tok[1], unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(root / "base")
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
        image_size=CLIP_SIZE, projection_dim=32,
    ))
    _perturb(vision).save_pretrained(root / "image_encoder")
    gen = torch.Generator().manual_seed(3)
    with torch.device("meta"):
        dims = [a.to_q.out_features for _, a in UNet(cfg).attention_layers()]
    pcfg = FaceIDProjConfig(context_dim=cfg.context_dim, plus=True, clip_dim=64)
    save_flat_safetensors(root / ADAPTER, make_image_proj(pcfg, gen), make_ip_adapter(dims, cfg.context_dim, gen, 4))
    lora = {}  # kohya layout, as the Hyper-SD files
    for name in ("down_blocks.0.resnets.0.conv1", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                 "up_blocks.0.attentions.0.proj_out", "mid_block.attentions.0.transformer_blocks.1.ff.net.2"):
        w = unet.get_submodule(name).weight
        key = "lora_unet_" + name.replace(".", "_")
        lora[f"{key}.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=gen) * 0.2
        lora[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 2, *([1] * (w.ndim - 2)), generator=gen) * 0.2
        lora[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(lora, str(root / LORA))
    save_file({k: v.contiguous() for k, v in _perturb(unet, 0.02).state_dict().items()}, str(root / LIGHTNING))
    return root


@pytest.fixture(scope="module")
def identity(files):
    """A face: unit embedding + aligned crop, and the CLIP features transformers computes for that crop."""
    g = torch.Generator().manual_seed(5)
    emb = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
    crop = (torch.rand(CLIP_SIZE, CLIP_SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
    processor = transformers.CLIPImageProcessor(size=CLIP_SIZE, crop_size=CLIP_SIZE)
    pixels = processor(images=crop, return_tensors="pt").pixel_values
    vision = transformers.CLIPVisionModelWithProjection.from_pretrained(files / "image_encoder")
    with torch.no_grad():
        clip = vision(pixels, output_hidden_states=True).hidden_states[-2]
    return FaceInfo.from_embedding(emb.numpy(), crop=crop), emb, clip


def load_ours(files: Path, preset: str, **kw) -> Pipeline:
    weights = files / (LORA if preset == "hyper" else LIGHTNING)
    return Pipeline.from_pretrained(preset, "faceid-plusv2", base=files / "base", weights=weights,
                                    adapter_file=files / ADAPTER, image_encoder=files / "image_encoder",
                                    dtype="fp32", device="cpu", **kw)


@pytest.fixture(scope="module")
def hyper(files) -> Pipeline:
    return load_ours(files, "hyper")


def diffusers_image(files: Path, preset: str, emb: torch.Tensor, clip: torch.Tensor, seed: int) -> np.ndarray:
    """The official-style diffusers run (fastface-official.md Sec. 3), baseline: one conditional pass per step."""
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(files / "base")
    ref.set_progress_bar_config(disable=True)
    if preset == "hyper":
        ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
        ref.load_lora_weights(str(files), weight_name=LORA)
        ref.fuse_lora(lora_scale=1.0)
        ref.unload_lora_weights()
    else:
        ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
        from safetensors.torch import load_file

        ref.unet.load_state_dict(load_file(str(files / LIGHTNING)))
    ref.load_ip_adapter(str(files), subfolder="", weight_name=ADAPTER, image_encoder_folder=None)
    ref.set_ip_adapter_scale(0.8)
    proj = ref.unet.encoder_hid_proj.image_projection_layers[0]
    proj.clip_embeds, proj.shortcut, proj.shortcut_scale = clip[:, None], True, 1.0  # FaceID-Plus-v2
    return ref(PROMPT, ip_adapter_image_embeds=[emb.reshape(1, 1, 512)], num_inference_steps=4, guidance_scale=0.0,
               height=64, width=64, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("preset", ["hyper", "lightning"])
def test_baseline_matches_diffusers_pipeline(files, identity, preset, request):
    face, emb, clip = identity
    ours = request.getfixturevalue("hyper") if preset == "hyper" else load_ours(files, preset)
    out = ours(PROMPT, face=face, method="baseline", seed=11, height=64, width=64, ip_scale=0.8, lora_scale=1.0)
    assert out.unet_evaluations == 4 and out.settings["sampler"] == ("ddim" if preset == "hyper" else "euler")
    ref = diffusers_image(files, preset, emb, clip, seed=11)
    got = out.pixels.permute(0, 2, 3, 1).numpy()
    err = float(np.abs(got - ref).max())
    print(f"{preset}: max |ours - diffusers| on the image = {err:.2e}")
    assert err <= IMAGE_TOL
    # the test can fail: another identity gives another image
    other = FaceInfo.from_embedding(-emb.numpy(), crop=face.crop)
    moved = ours(PROMPT, face=other, method="baseline", seed=11, height=64, width=64).pixels
    assert (moved - out.pixels).abs().max() > 1e-3


def test_same_seed_same_image_whatever_the_batch(hyper, identity):
    face = identity[0]
    # AM2 couples the three guidance branches of an image: the hardest case for batch invariance.
    three = hyper(PROMPT, face=face, method="fastface-am2", seed=100, num_images=3, height=64, width=64)
    alone = hyper(PROMPT, face=face, method="fastface-am2", seed=102, height=64, width=64)
    chunks = hyper(PROMPT, face=face, method="fastface-am2", seed=100, num_images=3, batch_size=2, height=64, width=64)
    assert three.seeds == [100, 101, 102] and alone.seeds == [102]
    scale = alone.latents.abs().max()
    assert (three.latents[2] - alone.latents[0]).abs().max() / scale <= 1e-5
    assert (chunks.latents - three.latents).abs().max() / scale <= 1e-5
    diff = np.abs(np.asarray(three.images[2], dtype=int) - np.asarray(alone.images[0], dtype=int)).max()
    assert diff <= 1
    assert (three.latents[0] - three.latents[1]).abs().max() / scale > 1e-2  # different seeds, different images
    assert three.unet_evaluations == chunks.unet_evaluations == 12


def test_precomputed_embeddings(hyper, identity, tmp_path):
    face, emb, _ = identity
    path = save_face_file(tmp_path / "me.safetensors", face)
    back = load_face_file(path)
    assert np.array_equal(back.embedding, face.embedding) and np.array_equal(back.crop, face.crop)
    kw = dict(method="fastface-am1", seed=3, height=64, width=64)
    direct = hyper(PROMPT, face=face, **kw)
    assert direct.unet_evaluations == 10
    from_file = hyper(PROMPT, face=str(path), **kw)
    assert torch.equal(direct.latents, from_file.latents)
    # several photos of one person: embeddings averaged and renormalised, the CLIP features of the crops averaged
    twice = hyper(PROMPT, face=[face, path], **kw)
    assert torch.allclose(twice.latents, direct.latents, rtol=0, atol=1e-5)
    # an embedding without a crop is enough for FaceID, not for FaceID-Plus-v2
    np.save(tmp_path / "emb.npy", emb.numpy() * 3.0)  # raw (unnormalised) embeddings are normalised
    assert np.allclose(load_face_file(tmp_path / "emb.npy").embedding, face.embedding, atol=1e-6)
    with pytest.raises(ValueError, match="FaceID-Plus-v2 needs the aligned face crop"):
        hyper(PROMPT, face=tmp_path / "emb.npy", **kw)
    with pytest.raises(ValueError, match="FaceID-Plus-v2 needs the aligned face crop"):
        hyper(PROMPT, face=emb, **kw)
    np.save(tmp_path / "bad.npy", np.zeros((3, 128), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected float embeddings \[512\] or \[N, 512\]"):
        load_face_file(tmp_path / "bad.npy")
    save_file({"emb": torch.zeros(512)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="no 'embedding' tensor"):
        load_face_file(tmp_path / "bad.safetensors")


def test_hooks_are_removed_and_metadata_round_trips(hyper, identity, tmp_path):
    face = identity[0]
    unet = hyper.unet
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    args = dict(text_embeds=torch.randn(1, 32, generator=g), time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    before = unet(x, 999, ctx, **args)
    out = hyper(PROMPT, face=face, method="fastface-am2", seed=5, height=64, width=64, negative_prompt="blurry",
                alpha=[1, 2, 2, 1], ip_scale=0.6, lora_scale=0.5)
    hyper(PROMPT, face=face, method="baseline", seed=5, height=64, width=64)  # lora_scale back to the default
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    assert all(not m._forward_hooks for _, m in fastface.hooks.identity_points(unet))
    assert torch.equal(unet(x, 999, ctx, **args), before)
    path = out.save(0, tmp_path / "out.png")
    with Image.open(path) as im:
        meta = json.loads(im.text[METADATA_KEY])
        assert im.size == (64, 64) and "Seed: 5" in im.text["parameters"]
    assert meta["seed"] == 5 and meta["prompt"] == PROMPT and meta["method"] == "fastface-am2"
    assert meta["method_options"] == {"alpha": [1, 2, 2, 1]} and meta["resolved"]["dcg"]["alpha"] == [1, 2, 2, 1]
    assert (meta["ip_scale"], meta["lora_scale"], meta["negative_prompt"]) == (0.6, 0.5, "blurry")
    assert meta["timesteps"] == [999, 749, 499, 249] and meta["sampler"] == "ddim" and meta["steps"] == 4
    assert meta["face"]["embedding_sha256"] and meta["weights"]["adapter"].endswith(ADAPTER)


def test_bad_inputs_are_clear_errors(files, hyper, identity, tmp_path, monkeypatch):
    face = identity[0]
    kw = dict(face=face, height=64, width=64)
    cases = [
        (dict(method="cfg"), "unknown method 'cfg'"),
        (dict(method="dcg", p=1.3), r"unknown setting\(s\) \['p'\] for method 'dcg'"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(num_images=0), "num_images must be a positive integer"),
        (dict(height=60), "multiples of 8"),
        (dict(ip_scale="high"), "ip_scale must be a number, got str 'high'"),
        (dict(face=None), "face is required"),
        (dict(face=[]), "empty list"),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match):
            hyper(PROMPT, **{**kw, **extra})
    with pytest.raises(ValueError, match="prompt must be a string"):
        hyper(7, **kw)
    # weights from the preset (not a user file) are distilled for one step count
    monkeypatch.setattr(hyper, "_custom_weights", False)
    with pytest.raises(ValueError, match=r"for 8 steps load Pipeline.from_pretrained\('hyper', steps=8\)"):
        hyper(PROMPT, steps=8, **kw)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightNotFoundError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        Pipeline.from_pretrained("hyper", device="cpu")
    with pytest.raises(WeightNotFoundError, match="no such local"):
        load_ours(files, "hyper", vae=tmp_path / "no-vae")
    with pytest.raises(ValueError, match="unknown dtype"):
        Pipeline.from_pretrained("hyper", dtype="fp8")


def test_stochastic_sampler_draws_per_image_noise(hyper, identity):
    """Per-image generators (samplers' noise_like with a list): ancestral noise does not depend on the batch."""
    from fastface.samplers._common import noise_like

    x = torch.zeros(3, 2, 4, 4)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    got = noise_like(x, gens)
    assert torch.equal(got[1:2], torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(noise_like(x[:1], torch.Generator().manual_seed(1)), got[:1])  # single generator as before
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        noise_like(x, gens[:2])
    face = identity[0]
    kw = dict(face=face, method="fastface-am1", sampler="euler_ancestral", height=64, width=64)
    three = hyper(PROMPT, seed=20, num_images=3, **kw)
    alone = hyper(PROMPT, seed=22, **kw)
    assert three.settings["sampler"] == "euler_ancestral"
    assert (three.latents[2] - alone.latents[0]).abs().max() / alone.latents.abs().max() <= 1e-5
