"""CLIP text encoders and SDXL prompt encoding vs transformers / diffusers, on tiny random weights in real layouts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from fastface.models.loading import WeightFormatError
from fastface.models.text import (
    BIGG_PREFIX,
    CLIP_L_PREFIX,
    CLIPTextConfig,
    CLIPTextEncoder,
    SDXLTextConditioner,
    bigg_state_from_openclip,
    load_text_encoder,
    load_text_encoders_from_single_file,
    sdxl_time_ids,
    text_config,
)
from fastface.models.tokenizer import write_vocab_folder

import transformers

RTOL = 1e-5  # fp32, relative to the reference's max magnitude


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def hf_config(cfg: CLIPTextConfig) -> transformers.CLIPTextConfig:
    # eos_token_id 2 as in SDXL's real configs: transformers then pools at input_ids.argmax(-1).
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions, hidden_act=cfg.act,
        projection_dim=cfg.projection_dim or cfg.width, eos_token_id=2, bos_token_id=0, pad_token_id=1,
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + offset)


@pytest.fixture(scope="module")
def hf_models():
    torch.manual_seed(0)
    te1 = transformers.CLIPTextModel(hf_config(text_config("tiny-clip-l"))).eval()
    te2 = transformers.CLIPTextModelWithProjection(hf_config(text_config("tiny-bigg"))).eval()
    for i, m in enumerate((te1, te2)):
        randomize(m, i)
    return te1, te2


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory, hf_models):
    root = tmp_path_factory.mktemp("sdxl")
    te1, te2 = hf_models
    te1.save_pretrained(root / "text_encoder")
    te2.save_pretrained(root / "text_encoder_2")
    write_vocab_folder(root / "tokenizer")
    write_vocab_folder(root / "tokenizer_2", pad_token="!")
    (root / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": True}))
    return root


def hf_keys(model) -> dict[str, torch.Tensor]:
    """transformers-layout keys with the ``text_model.`` prefix that real (transformers 4 era) files carry."""
    sd = model.state_dict()
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def openclip_keys(hf_sd: dict[str, torch.Tensor], prefix: str = BIGG_PREFIX) -> dict[str, torch.Tensor]:
    """The OpenCLIP (SGM single-file) layout, written independently from the transformers weights."""
    out = {}
    n = 1 + max(int(k.split(".")[3]) for k in hf_sd if k.startswith("text_model.encoder.layers."))
    out[prefix + "token_embedding.weight"] = hf_sd["text_model.embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = hf_sd["text_model.embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = hf_sd["text_model.final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = hf_sd["text_model.final_layer_norm.bias"]
    out[prefix + "text_projection"] = hf_sd["text_projection.weight"].T.contiguous()
    out[prefix + "logit_scale"] = torch.tensor(4.6)
    for i in range(n):
        h, o = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.in_proj_{kind}"] = torch.cat([hf_sd[h + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[o + f"attn.out_proj.{kind}"] = hf_sd[h + f"self_attn.out_proj.{kind}"]
            out[o + f"ln_1.{kind}"] = hf_sd[h + f"layer_norm1.{kind}"]
            out[o + f"ln_2.{kind}"] = hf_sd[h + f"layer_norm2.{kind}"]
            out[o + f"mlp.c_fc.{kind}"] = hf_sd[h + f"mlp.fc1.{kind}"]
            out[o + f"mlp.c_proj.{kind}"] = hf_sd[h + f"mlp.fc2.{kind}"]
    return out


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, hf_models):
    te1, te2 = hf_models
    sd = {CLIP_L_PREFIX + k: v.contiguous() for k, v in hf_keys(te1).items()}
    sd[CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update(openclip_keys(hf_keys(te2)))
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other parts of a full checkpoint are ignored
    path = tmp_path_factory.mktemp("single") / "sdxl.safetensors"
    save_file(sd, str(path))
    return path


def sample_ids(batch: int, seed: int, pad: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (batch, 77), generator=g)
    ids[:, 0] = 49406
    for b in range(batch):
        end = 3 + 17 * b
        ids[b, end] = 49407
        ids[b, end + 1 :] = pad
    return ids


def check_parity(ours: CLIPTextEncoder, ref, pad: int, with_pool: bool) -> None:
    ids = sample_ids(3, seed=pad, pad=pad)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        for layer in (-2, -1, -3, 0):
            got = ours(ids, hidden_layer=layer)
            assert rel_err(got.hidden, out.hidden_states[layer]) < RTOL, layer
            if with_pool:
                assert rel_err(got.pooled, out.text_embeds) < RTOL, layer
            else:
                assert got.pooled is None


def test_diffusers_folders_match_transformers(pipeline_root, hf_models):
    te1, te2 = hf_models
    enc1 = load_text_encoder(pipeline_root / "text_encoder")
    enc2 = load_text_encoder(pipeline_root / "text_encoder_2")
    assert enc1.config == text_config("tiny-clip-l") and enc2.config == text_config("tiny-bigg")
    check_parity(enc1, te1, pad=49407, with_pool=False)
    check_parity(enc2, te2, pad=0, with_pool=True)


def test_single_file_matches_transformers(single_file, hf_models):
    te1, te2 = hf_models
    enc1, enc2 = load_text_encoders_from_single_file(single_file, configs=("tiny-clip-l", "tiny-bigg"))
    check_parity(enc1, te1, pad=49407, with_pool=False)
    check_parity(enc2, te2, pad=0, with_pool=True)


def test_openclip_map_agrees_with_diffusers_converter(hf_models):
    """Our test-side OpenCLIP layout is what diffusers' own single-file converter reads back to transformers keys."""
    import diffusers.loaders.single_file_utils as single_file_utils
    te2 = hf_models[1]
    packed = openclip_keys(hf_keys(te2))
    theirs = single_file_utils.convert_open_clip_checkpoint(te2, packed, prefix=BIGG_PREFIX)
    ours = bigg_state_from_openclip(packed)
    expected = {k: v for k, v in hf_keys(te2).items() if "position_ids" not in k}
    assert set(ours) == set(expected) == {k for k in theirs if "position_ids" not in k}
    for k, v in expected.items():
        assert torch.equal(ours[k], v) and torch.equal(theirs[k], v), k


def test_fp16_dtype_and_meta_free(pipeline_root):
    enc = load_text_encoder(pipeline_root / "text_encoder_2", dtype=torch.float16)
    assert all(p.dtype == torch.float16 and p.device.type == "cpu" for p in enc.parameters())
    assert not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_prompt_encoding_matches_diffusers_pipeline(pipeline_root, hf_models, negative):
    import diffusers as diffusers
    te1, te2 = hf_models
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=te1, text_encoder_2=te2,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(pipeline_root / "tokenizer"),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(pipeline_root / "tokenizer_2"),
        unet=None, scheduler=None, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    prompts = ["anime-style drawing; person in a high school classroom daydreaming", "a photo of a man, wow!!!"]
    with torch.no_grad():
        ref = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                 negative_prompt=None if negative is None else [negative] * 2)
    cond = SDXLTextConditioner.from_diffusers(pipeline_root)
    got = cond.encode(prompts, negative)
    assert got.context.shape == (2, 77, 32 + 48) and got.pooled.shape == (2, 48)
    for ours, theirs in zip((got.context, got.negative_context, got.pooled, got.negative_pooled), ref):
        if negative is None and not theirs.abs().max() > 0:
            assert torch.equal(ours, torch.zeros_like(theirs))
        else:
            assert rel_err(ours, theirs) < RTOL
    assert negative is not None or got.negative_context.abs().max() == 0
    # clip_skip: diffusers applies it to the prompt only, never to the negative.
    with torch.no_grad():
        ref_skip = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                      negative_prompt=negative, clip_skip=1)
    got_skip = cond.encode(prompts, negative, clip_skip=1)
    assert rel_err(got_skip.context, ref_skip[0]) < RTOL
    assert rel_err(got_skip.negative_context, ref_skip[1]) < RTOL or negative is None
    # The single-file loader (bundled vocab) gives the same conditioning.
    cond_sf = SDXLTextConditioner.from_single_file(
        {**{CLIP_L_PREFIX + k: v for k, v in hf_keys(te1).items()}, **openclip_keys(hf_keys(te2))},
        configs=("tiny-clip-l", "tiny-bigg"),
    )
    got_sf = cond_sf.encode(prompts, negative)
    assert rel_err(got_sf.context, ref[0]) < RTOL and rel_err(got_sf.pooled, ref[2]) < RTOL


def test_time_ids_layout():
    # diffusers' _get_add_time_ids: list(original_size + crops_coords_top_left + target_size), repeated per image.
    ids = sdxl_time_ids((1024, 768), (16, 8), (896, 640), batch=3)
    assert torch.equal(ids, torch.tensor([[1024.0, 768, 16, 8, 896, 640]]).repeat(3, 1))
    assert torch.equal(sdxl_time_ids((512, 512)), torch.tensor([[512.0, 512, 0, 0, 512, 512]]))


# ---- errors ---------------------------------------------------------------------------------------------------


def test_missing_folder_and_config(tmp_path, pipeline_root):
    with pytest.raises(WeightFormatError, match="no such folder"):
        load_text_encoder(tmp_path / "nope")
    (tmp_path / "te").mkdir()
    with pytest.raises(WeightFormatError, match="config.json"):
        load_text_encoder(tmp_path / "te")
    (tmp_path / "te" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(WeightFormatError, match="not a usable CLIP text config"):
        load_text_encoder(tmp_path / "te")
    (tmp_path / "te" / "config.json").write_text((pipeline_root / "text_encoder" / "config.json").read_text())
    with pytest.raises(WeightFormatError, match="no weight file 'model.safetensors'"):
        load_text_encoder(tmp_path / "te")


def test_missing_and_misshaped_keys(tmp_path, hf_models):
    te1, te2 = hf_models
    sd = {CLIP_L_PREFIX + k: v for k, v in hf_keys(te1).items()}
    with pytest.raises(WeightFormatError, match="no OpenCLIP text encoder keys"):
        load_text_encoders_from_single_file(sd, configs=("tiny-clip-l", "tiny-bigg"))
    packed = openclip_keys(hf_keys(te2))
    del packed[BIGG_PREFIX + "ln_final.bias"]
    with pytest.raises(WeightFormatError, match="missing key.*final_layer_norm.bias"):
        load_text_encoders_from_single_file({**sd, **packed}, configs=("tiny-clip-l", "tiny-bigg"))
    wrong_mlp = dataclasses.replace(text_config("tiny-bigg"), mlp=128)
    with pytest.raises(WeightFormatError, match="shape mismatch.*mlp.fc1"):
        load_text_encoders_from_single_file({**sd, **openclip_keys(hf_keys(te2))}, configs=("tiny-clip-l", wrong_mlp))
    bad = openclip_keys(hf_keys(te2))
    bad[BIGG_PREFIX + "transformer.resblocks.0.attn.in_proj_bias"] = torch.zeros(7)
    with pytest.raises(WeightFormatError, match="not divisible by 3"):
        bigg_state_from_openclip(bad)
    with pytest.raises(WeightFormatError, match="no CLIP-L text encoder keys"):
        load_text_encoders_from_single_file(openclip_keys(hf_keys(te2)), configs=("tiny-clip-l", "tiny-bigg"))


def test_bad_arguments(pipeline_root):
    enc = load_text_encoder(pipeline_root / "text_encoder")
    with pytest.raises(ValueError, match="hidden_layer"):
        enc(sample_ids(1, 0, 0), hidden_layer=-9)
    with pytest.raises(ValueError, match="no text projection"):
        enc(sample_ids(1, 0, 0), pooled=True)
    with pytest.raises(ValueError, match="input_ids must be"):
        enc(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown text encoder config"):
        text_config("clip-xl")
    with pytest.raises(ValueError, match="act must be"):
        CLIPTextConfig(width=8, layers=1, heads=2, mlp=8, act="relu")
    cond = SDXLTextConditioner.from_diffusers(pipeline_root)
    with pytest.raises(ValueError, match="negative_prompt has 3 entries"):
        cond.encode(["a", "b"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="prompts must be a string"):
        cond.encode([])
    with pytest.raises(ValueError, match="time ids need"):
        sdxl_time_ids((1024,))
