"""IP-Adapter FaceID / FaceID-Plus-v2: file parsing, projections, LoRA and the installed UNet vs diffusers + peft.

Random weights are saved in the original released layouts (``torch.save`` of {"image_proj", "ip_adapter"} and
the flattened ``.safetensors`` conversion) and loaded by both implementations. Tolerance: fp32, max |a - b| /
max |b| <= 1e-5 (``REL_TOL``).
"""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fastface.adapters.faceid import FaceIDProjConfig, MLPProjModel, ProjPlusModel
from fastface.adapters.ip_adapter import IPAdapterFaceID, detect_variant
from fastface.models.loading import WeightFormatError
from fastface.models.lora import LoRALinear

REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# Random weights in the original format
# ----------------------------------------------------------------------------------------------------------------


def _rand(gen: torch.Generator, *shape: int, std: float | None = None) -> torch.Tensor:
    std = std if std is not None else shape[-1] ** -0.5
    return torch.randn(*shape, generator=gen) * std


def make_image_proj(cfg: FaceIDProjConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """An ``image_proj`` dict with the original key names (MLPProjModel / ProjPlusModel)."""
    c, t = cfg.context_dim, cfg.num_tokens
    sd = {
        "proj.0.weight": _rand(gen, cfg.id_hidden_dim, cfg.id_dim),
        "proj.0.bias": _rand(gen, cfg.id_hidden_dim, std=0.1),
        "proj.2.weight": _rand(gen, t * c, cfg.id_hidden_dim),
        "proj.2.bias": _rand(gen, t * c, std=0.1),
        "norm.weight": 1 + _rand(gen, c, std=0.1),
        "norm.bias": _rand(gen, c, std=0.1),
    }
    if cfg.plus:
        p = "perceiver_resampler."
        sd |= {
            p + "proj_in.weight": _rand(gen, c, cfg.clip_dim),
            p + "proj_in.bias": _rand(gen, c, std=0.1),
            p + "proj_out.weight": _rand(gen, c, c),
            p + "proj_out.bias": _rand(gen, c, std=0.1),
            p + "norm_out.weight": 1 + _rand(gen, c, std=0.1),
            p + "norm_out.bias": _rand(gen, c, std=0.1),
        }
        for layer in range(cfg.depth):
            q = f"{p}layers.{layer}."
            sd |= {
                q + "0.norm1.weight": 1 + _rand(gen, c, std=0.1),
                q + "0.norm1.bias": _rand(gen, c, std=0.1),
                q + "0.norm2.weight": 1 + _rand(gen, c, std=0.1),
                q + "0.norm2.bias": _rand(gen, c, std=0.1),
                q + "0.to_q.weight": _rand(gen, c, c),
                q + "0.to_kv.weight": _rand(gen, 2 * c, c),
                q + "0.to_out.weight": _rand(gen, c, c),
                q + "1.0.weight": 1 + _rand(gen, c, std=0.1),
                q + "1.0.bias": _rand(gen, c, std=0.1),
                q + "1.1.weight": _rand(gen, c * cfg.ff_mult, c),
                q + "1.3.weight": _rand(gen, c, c * cfg.ff_mult),
            }
    return sd


def sdxl_layout_dims(widths: tuple[int, int]) -> list[int]:
    """Hidden size of attention layer i in the SDXL checkpoint order (id-adapters.md 1.1), given the two widths."""
    blocks = [widths[0]] * 4 + [widths[1]] * 20 + [widths[1]] * 30 + [widths[0]] * 6 + [widths[1]] * 10
    return [h for h in blocks for _ in (0, 1)]


def make_ip_adapter(
    dims: list[int], context_dim: int, gen: torch.Generator, rank: int | None = 8
) -> dict[str, torch.Tensor]:
    """An ``ip_adapter`` dict: to_k_ip/to_v_ip on odd layers, LoRA (if rank) on all, original key names."""
    sd = {}
    for i, h in enumerate(dims):
        c_in = context_dim if i % 2 else h
        if i % 2:
            sd[f"{i}.to_k_ip.weight"] = _rand(gen, h, context_dim)
            sd[f"{i}.to_v_ip.weight"] = _rand(gen, h, context_dim)
        if rank:
            for slot, fan_in in (("to_q", h), ("to_k", c_in), ("to_v", c_in), ("to_out", h)):
                sd[f"{i}.{slot}_lora.down.weight"] = _rand(gen, rank, fan_in)
                sd[f"{i}.{slot}_lora.up.weight"] = _rand(gen, h, rank, std=0.3 * rank**-0.5)
    return sd


def save_bin(path: Path, image_proj: dict, ip_adapter: dict) -> Path:
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path)
    return path


def save_flat_safetensors(path: Path, image_proj: dict, ip_adapter: dict) -> Path:
    flat = {f"image_proj.{k}": v.contiguous() for k, v in image_proj.items()}
    flat |= {f"ip_adapter.{k}": v.contiguous() for k, v in ip_adapter.items()}
    save_file(flat, str(path))
    return path


FACEID_CFG = FaceIDProjConfig(id_dim=512, id_hidden_dim=1024, context_dim=64)
# 128-wide tokens -> 2 perceiver heads of 64 (checks the head split); N=17 CLIP tokens stand in for 257.
PLUS_CFG = FaceIDProjConfig(id_dim=512, id_hidden_dim=1024, context_dim=128, plus=True, clip_dim=48)
CLIP_TOKENS = 17


def diffusers_projection(image_proj: dict[str, torch.Tensor]) -> nn.Module:
    """diffusers' own conversion of an original ``image_proj`` dict (id-adapters.md 6.4); ``self`` is unused there."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(None, image_proj, low_cpu_mem_usage=False)


@pytest.fixture(scope="module")
def faceid_files(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    d = tmp_path_factory.mktemp("faceid")
    image_proj = make_image_proj(FACEID_CFG, gen)
    ip_adapter = make_ip_adapter(sdxl_layout_dims((16, 32)), FACEID_CFG.context_dim, gen, rank=4)
    return (
        image_proj,
        ip_adapter,
        save_bin(d / "ip-adapter-faceid_sdxl.bin", image_proj, ip_adapter),
        save_flat_safetensors(d / "ip-adapter-faceid_sdxl.safetensors", image_proj, ip_adapter),
    )


@pytest.fixture(scope="module")
def plus_files(tmp_path_factory):
    gen = torch.Generator().manual_seed(1)
    d = tmp_path_factory.mktemp("plus")
    image_proj = make_image_proj(PLUS_CFG, gen)
    ip_adapter = make_ip_adapter(sdxl_layout_dims((16, 32)), PLUS_CFG.context_dim, gen, rank=4)
    return (
        image_proj,
        ip_adapter,
        save_bin(d / "ip-adapter-faceid-plusv2_sdxl.bin", image_proj, ip_adapter),
        save_flat_safetensors(d / "ip-adapter-faceid-plusv2_sdxl.safetensors", image_proj, ip_adapter),
    )


# ----------------------------------------------------------------------------------------------------------------
# LoRA module vs peft
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_lora_linear_matches_peft(scale):
    from peft import LoraConfig, inject_adapter_in_model

    gen = torch.Generator().manual_seed(2)
    base = nn.Linear(24, 40, bias=True)
    down, up = _rand(gen, 6, 24), _rand(gen, 40, 6, std=0.3)
    x = torch.randn(3, 5, 24, generator=gen)

    ours = LoRALinear.from_weights(base, down, up, scale=scale)
    ref = nn.Sequential(nn.Linear(24, 40, bias=True))
    ref[0].load_state_dict(base.state_dict())
    # scaling = lora_alpha / r = scale
    ref = inject_adapter_in_model(LoraConfig(r=6, lora_alpha=6 * scale, target_modules=["0"]), ref)
    ref[0].lora_A["default"].weight.data.copy_(down)
    ref[0].lora_B["default"].weight.data.copy_(up)
    expect = ref(x)
    assert rel_err(ours(x), expect) <= REL_TOL
    assert rel_err(ours(x), base(x)) > 1e-2  # the LoRA does something

    # scale changes in place (no reload), fused == unfused within fp32 rounding, unwrapped base untouched
    ours.set_scale(1.0)
    unfused = ours(x)
    ours.fuse()
    assert rel_err(ours(x), unfused) <= REL_TOL
    ours.set_scale(scale)  # refuses the fused weight
    assert rel_err(ours(x), expect) <= REL_TOL
    ours.unfuse()
    assert rel_err(ours(x), expect) <= REL_TOL
    assert ours.base is base and torch.equal(ours.base.weight, ref[0].base_layer.weight)


def test_lora_linear_rejects_bad_factors():
    with pytest.raises(ValueError, match="do not fit"):
        LoRALinear.from_weights(nn.Linear(8, 4), torch.zeros(2, 9), torch.zeros(4, 2))
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv2d(1, 1, 1), 2)


# ----------------------------------------------------------------------------------------------------------------
# Projections vs diffusers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_faceid_projection_matches_diffusers(faceid_files, fmt):
    image_proj, _, bin_path, st_path = faceid_files
    adapter = IPAdapterFaceID.from_file(bin_path if fmt == "bin" else st_path)
    assert adapter.variant == "faceid" and adapter.num_layers == 140 and adapter.lora_rank == 4
    assert type(adapter.projection) is MLPProjModel
    ref = diffusers_projection(image_proj)
    emb = torch.nn.functional.normalize(torch.randn(3, 512, generator=torch.Generator().manual_seed(3)), dim=-1)
    ours = adapter.encode(emb)
    assert ours.shape == (3, 4, 64)
    with torch.no_grad():
        assert rel_err(ours, ref(emb)) <= REL_TOL
        assert rel_err(adapter.null_tokens(batch_size=2), ref(torch.zeros(2, 512))) <= REL_TOL
    assert rel_err(adapter.encode(emb[0]), ours[:1]) <= REL_TOL  # unbatched input


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("shortcut,s_scale", [(True, 1.0), (True, 0.7), (False, 1.0)])
def test_faceid_plus_projection_matches_diffusers(plus_files, fmt, shortcut, s_scale):
    image_proj, _, bin_path, st_path = plus_files
    adapter = IPAdapterFaceID.from_file(bin_path if fmt == "bin" else st_path, shortcut=shortcut)
    assert adapter.variant == "faceid_plus" and type(adapter.projection) is ProjPlusModel
    assert adapter.config.heads == 2 and adapter.config.depth == 4
    ref = diffusers_projection(image_proj)
    ref.shortcut, ref.shortcut_scale = shortcut, s_scale
    gen = torch.Generator().manual_seed(4)
    emb = torch.randn(2, 512, generator=gen)
    clip = torch.randn(2, CLIP_TOKENS, PLUS_CFG.clip_dim, generator=gen)
    ours = adapter.encode(emb, clip, s_scale=s_scale)
    assert ours.shape == (2, 4, 128)
    with torch.no_grad():
        ref.clip_embeds = clip[:, None]  # diffusers wants [B, n_images, N, D]
        assert rel_err(ours, ref(emb)) <= REL_TOL
        zero_clip = torch.randn(1, CLIP_TOKENS, PLUS_CFG.clip_dim, generator=gen)  # stands for CLIP(zero image)
        ref.clip_embeds = zero_clip[:, None]
        assert rel_err(adapter.null_tokens(zero_clip, s_scale=s_scale), ref(torch.zeros(1, 512))) <= REL_TOL


def test_plus_shortcut_from_file_name(tmp_path, plus_files):
    image_proj, ip_adapter, _, _ = plus_files
    v1 = save_bin(tmp_path / "ip-adapter-faceid-plus_sd15.bin", image_proj, ip_adapter)
    assert IPAdapterFaceID.from_file(v1).shortcut is False
    assert IPAdapterFaceID.from_file(v1, shortcut=True).shortcut is True


def test_encode_rejects_bad_inputs(faceid_files, plus_files):
    faceid = IPAdapterFaceID.from_file(faceid_files[2])
    plus = IPAdapterFaceID.from_file(plus_files[2])
    with pytest.raises(ValueError, match=r"\[B, 512\]"):
        faceid.encode(torch.zeros(2, 128))
    with pytest.raises(ValueError, match="takes no CLIP features"):
        faceid.encode(torch.zeros(1, 512), torch.zeros(1, CLIP_TOKENS, 48))
    with pytest.raises(ValueError, match="needs the CLIP"):
        plus.encode(torch.zeros(1, 512))
    with pytest.raises(ValueError, match="clip_features must have shape"):
        plus.encode(torch.zeros(1, 512), torch.zeros(1, CLIP_TOKENS, 1280))
    with pytest.raises(ValueError, match="batch mismatch"):
        plus.encode(torch.zeros(2, 512), torch.zeros(3, CLIP_TOKENS, 48))
    with pytest.raises(ValueError, match="needs the CLIP"):
        plus.null_tokens()


# ----------------------------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this object calls open(marker, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_bin_is_refused(tmp_path, faceid_files, zip_format):
    image_proj, ip_adapter, _, _ = faceid_files
    marker = tmp_path / "pwned"
    evil = {"image_proj": image_proj, "ip_adapter": dict(ip_adapter, payload=_RunsCode(marker))}
    path = tmp_path / "ip-adapter-faceid_sdxl.bin"
    torch.save(evil, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(WeightFormatError, match="refused to load"):
        IPAdapterFaceID.from_file(path)
    assert not marker.exists()
    # control: the payload is live under a plain unpickler
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_RunsCode(live))).close()
    assert live.exists()


@pytest.mark.parametrize("which", ["bin", "safetensors"])
def test_truncated_file(tmp_path, faceid_files, which):
    src = faceid_files[2 if which == "bin" else 3]
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(WeightFormatError, match="truncated"):
        IPAdapterFaceID.from_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightFormatError, match="no such file"):
        IPAdapterFaceID.from_file(tmp_path / "nope.bin")


def _bad(tmp_path: Path, image_proj: dict, ip_adapter: dict, name: str = "bad.bin") -> Path:
    return save_bin(tmp_path / name, image_proj, ip_adapter)


def test_wrong_files_get_clear_errors(tmp_path, faceid_files):
    image_proj, ip_adapter, _, _ = faceid_files
    gen = torch.Generator().manual_seed(5)

    # other adapter families
    plain = {"proj.weight": torch.zeros(8, 4), "proj.bias": torch.zeros(8), "norm.weight": torch.ones(4)}
    with pytest.raises(WeightFormatError, match="plain IP-Adapter"):
        IPAdapterFaceID.from_file(_bad(tmp_path, plain, ip_adapter))
    assert detect_variant(image_proj, "x") == "faceid"
    pulid = tmp_path / "pulid.safetensors"
    pulid_keys = ("id_adapter.body.0.weight", "id_adapter_attn_layers.1.id_to_k.weight")
    save_file({k: torch.zeros(2, 2) for k in pulid_keys}, str(pulid))
    with pytest.raises(WeightFormatError, match="PuLID"):
        IPAdapterFaceID.from_file(pulid)
    lora_only = tmp_path / "ip-adapter-faceid_sdxl_lora.safetensors"
    kohya_key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    save_file({kohya_key: torch.zeros(2, 2)}, str(lora_only))
    with pytest.raises(WeightFormatError, match="LoRA-only"):
        IPAdapterFaceID.from_file(lora_only)
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(WeightFormatError, match="dict of tensors"):
        IPAdapterFaceID.from_file(tmp_path / "list.bin")

    # image_proj: missing key, wrong shape, inconsistent
    broken = {k: v for k, v in image_proj.items() if k != "norm.bias"}
    with pytest.raises(WeightFormatError, match="norm.bias"):
        IPAdapterFaceID.from_file(_bad(tmp_path, broken, ip_adapter))
    broken = dict(image_proj, **{"proj.0.bias": torch.zeros(7)})
    with pytest.raises(WeightFormatError, match=r"shape mismatch for 'proj.0.bias'"):
        IPAdapterFaceID.from_file(_bad(tmp_path, broken, ip_adapter))
    broken = dict(image_proj, **{"proj.2.weight": torch.zeros(100, 1024)})
    with pytest.raises(WeightFormatError, match="inconsistent FaceID projection"):
        IPAdapterFaceID.from_file(_bad(tmp_path, broken, ip_adapter))

    # ip_adapter: unexpected key, missing layer key, wrong ip width, inconsistent LoRA rank
    with pytest.raises(WeightFormatError, match="unexpected 'ip_adapter' key '1.to_k_ip.bias'"):
        IPAdapterFaceID.from_file(_bad(tmp_path, image_proj, dict(ip_adapter, **{"1.to_k_ip.bias": torch.zeros(3)})))
    broken = {k: v for k, v in ip_adapter.items() if k != "77.to_v_ip.weight"}
    with pytest.raises(WeightFormatError, match=r"layer 77: missing \['to_v_ip.weight'\]"):
        IPAdapterFaceID.from_file(_bad(tmp_path, image_proj, broken))
    broken = dict(ip_adapter, **{"3.to_k_ip.weight": _rand(gen, 16, 65)})
    with pytest.raises(WeightFormatError, match=r"'ip_adapter.3.to_k_ip.weight' has shape \(16, 65\)"):
        IPAdapterFaceID.from_file(_bad(tmp_path, image_proj, broken))
    broken = dict(ip_adapter, **{"5.to_q_lora.down.weight": _rand(gen, 3, 16)})
    with pytest.raises(WeightFormatError, match="LoRA of layer 5 'to_q'"):
        IPAdapterFaceID.from_file(_bad(tmp_path, image_proj, broken))
    broken = {k: v for k, v in ip_adapter.items() if k != "12.to_out_lora.up.weight"}
    with pytest.raises(WeightFormatError, match="layer 12: missing"):
        IPAdapterFaceID.from_file(_bad(tmp_path, image_proj, broken))


def test_file_without_lora(tmp_path, faceid_files):
    image_proj, ip_adapter, _, _ = faceid_files
    no_lora = {k: v for k, v in ip_adapter.items() if "lora" not in k}
    adapter = IPAdapterFaceID.from_file(_bad(tmp_path, image_proj, no_lora, "faceid_separate.bin"))
    assert not adapter.has_lora and adapter.num_layers == 140


# ----------------------------------------------------------------------------------------------------------------
# Installed in our UNet vs diffusers' UNet2DConditionModel + load_ip_adapter machinery + peft LoRA
# ----------------------------------------------------------------------------------------------------------------

LORA_RANK = 4


@pytest.fixture(scope="module")
def unets():
    """Our tiny SDXL-layout UNet and diffusers' UNet2DConditionModel with the same random weights."""
    from diffusers import UNet2DConditionModel

    from fastface.models.unet import UNet, get_unet_config

    cfg = get_unet_config("tiny")
    torch.manual_seed(10)
    ref = UNet2DConditionModel.from_config(cfg.to_diffusers_config()).eval()
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ours, ref


def _unet_files(tmp_path_factory, cfg, plus: bool, seed: int):
    from fastface.models.unet import UNet

    with torch.device("meta"):
        layers = UNet(cfg).attention_layers()
    dims = [attn.to_q.out_features for _, attn in layers]
    assert dims == sdxl_layout_dims(cfg.channels[1:])  # the UNet's order is the documented checkpoint order
    gen = torch.Generator().manual_seed(seed)
    pcfg = FaceIDProjConfig(context_dim=cfg.context_dim, plus=plus, clip_dim=48)
    image_proj = make_image_proj(pcfg, gen)
    ip_adapter = make_ip_adapter(dims, cfg.context_dim, gen, rank=LORA_RANK)
    d = tmp_path_factory.mktemp("unet_plus" if plus else "unet_faceid")
    name = "ip-adapter-faceid-plusv2_sdxl" if plus else "ip-adapter-faceid_sdxl"
    return save_bin(d / f"{name}.bin", image_proj, ip_adapter), save_flat_safetensors(
        d / f"{name}.safetensors", image_proj, ip_adapter
    )


def _diffusers_state_dict(path: Path) -> dict:
    """What diffusers' load_ip_adapter reads from the file (its .bin / .safetensors branches)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        return {
            "image_proj": {k.removeprefix("image_proj."): v for k, v in flat.items() if k.startswith("image_proj.")},
            "ip_adapter": {k.removeprefix("ip_adapter."): v for k, v in flat.items() if k.startswith("ip_adapter.")},
        }
    return torch.load(path, map_location="cpu", weights_only=True)


def _diffusers_with_adapter(ref_base: nn.Module, path: Path) -> nn.Module:
    """A copy of diffusers' UNet with the adapter loaded the way ``load_ip_adapter`` does (attn procs + peft LoRA)."""
    unet = type(ref_base).from_config(ref_base.config)
    unet.load_state_dict(ref_base.state_dict())
    state_dict = _diffusers_state_dict(path)
    unet._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=False)
    loras = unet._load_ip_adapter_loras([state_dict])
    assert len(loras[0]) == 140 * 8
    unet.load_lora_adapter(loras[0], prefix="unet", adapter_name="faceid_0")
    return unet.eval()


def _diffusers_forward(unet, inputs, emb, clip, ip_scale: float, lora_scale: float) -> torch.Tensor:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    unet.set_adapters(["faceid_0"], weights=[lora_scale])
    n = 0
    for proc in unet.attn_processors.values():  # = pipe.set_ip_adapter_scale(ip_scale)
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = [ip_scale]
            n += 1
    assert n == 70
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    if clip is not None:
        proj.clip_embeds, proj.shortcut, proj.shortcut_scale = clip[:, None], True, 1.0
    x, t, ctx, te, ti = inputs
    cond = {"text_embeds": te, "time_ids": ti, "image_embeds": [emb[:, None]]}
    with torch.no_grad():
        return unet(x, t, ctx, added_cond_kwargs=cond).sample


def _inputs(cfg, batch: int = 2, seed: int = 11):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    ctx = torch.randn(batch, 7, cfg.context_dim, generator=gen)
    te = torch.randn(batch, cfg.pooled_dim, generator=gen)
    ti = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1)
    emb = torch.nn.functional.normalize(torch.randn(batch, 512, generator=gen), dim=-1)
    clip = torch.randn(batch, CLIP_TOKENS, 48, generator=gen)
    return (x, 400, ctx, te, ti), emb, clip


# One file format per variant keeps the suite fast; test_bin_and_safetensors_load_identically covers the other.
@pytest.mark.parametrize("plus,fmt", [(False, "bin"), (True, "safetensors")], ids=["faceid-bin", "plusv2-safetensors"])
def test_installed_unet_matches_diffusers(tmp_path_factory, unets, plus, fmt):
    cfg, ours, ref_base = unets
    bin_path, st_path = _unet_files(tmp_path_factory, cfg, plus, seed=20 + plus)
    path = bin_path if fmt == "bin" else st_path
    ref = _diffusers_with_adapter(ref_base, path)
    adapter = IPAdapterFaceID.from_file(path)
    inputs, emb, clip = _inputs(cfg)
    clip = clip if plus else None
    x, t, ctx, te, ti = inputs
    with torch.no_grad():
        plain = ours(x, t, ctx, te, ti)
    tokens = adapter.encode(emb, clip)
    errors = {}
    with adapter.install(ours, lora_scale=1.0) as handle, torch.no_grad():
        for lora_scale in (0.5, 1.0):
            handle.set_lora_scale(lora_scale)
            outs = {}
            for ip_scale in (0.0, 0.5, 1.0):
                scale = torch.full((x.shape[0],), ip_scale)
                outs[ip_scale] = ours(x, t, ctx, te, ti, id_tokens=tokens, id_scale=scale)
                expect = _diffusers_forward(ref, inputs, emb, clip, ip_scale, lora_scale)
                errors[(lora_scale, ip_scale)] = rel_err(outs[ip_scale], expect)
            # the test can fail: the identity branch and the LoRA change the output
            assert rel_err(outs[1.0], outs[0.0]) > 1e-3 and rel_err(outs[0.0], plain) > 1e-3
        # per-sample ip scale: one batch with two different scales equals the two single-scale runs
        mixed = ours(x, t, ctx, te, ti, id_tokens=tokens, id_scale=torch.tensor([0.5, 1.0]))
        assert rel_err(mixed[0], outs[0.5][0]) <= REL_TOL and rel_err(mixed[1], outs[1.0][1]) <= REL_TOL
    print(f"max rel err vs diffusers ({'plus' if plus else 'faceid'}): {max(errors.values()):.2e}")
    assert max(errors.values()) <= REL_TOL, errors
    with torch.no_grad():
        assert torch.equal(ours(x, t, ctx, te, ti), plain)  # removed: bit-identical to before


@pytest.mark.parametrize("plus", [False, True], ids=["faceid", "plusv2"])
def test_bin_and_safetensors_load_identically(tmp_path_factory, unets, plus):
    cfg, ours, _ = unets
    bin_path, st_path = _unet_files(tmp_path_factory, cfg, plus, seed=20 + plus)
    a, b = IPAdapterFaceID.from_file(bin_path), IPAdapterFaceID.from_file(st_path)
    assert a.variant == b.variant == ("faceid_plus" if plus else "faceid")
    pa, pb = a.projection.state_dict(), b.projection.state_dict()
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a.ip_adapter.keys() == b.ip_adapter.keys()
    assert all(torch.equal(a.ip_adapter[k], b.ip_adapter[k]) for k in a.ip_adapter)


def test_install_remove_is_bit_identical(tmp_path_factory, unets):
    cfg, ours, _ = unets
    bin_path, _ = _unet_files(tmp_path_factory, cfg, plus=False, seed=30)
    adapter = IPAdapterFaceID.from_file(bin_path)
    inputs, emb, _ = _inputs(cfg, seed=12)
    x, t, ctx, te, ti = inputs
    before_modules = {name: m for name, m in ours.named_modules()}
    with torch.no_grad():
        before = ours(x, t, ctx, te, ti)
        handle = adapter.install(ours, lora_scale=0.7)
        assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == 140 * 4
        assert all(attn.ip is not None for _, attn in ours.cross_attention_layers())
        handle.fuse_lora()
        fused = ours(x, t, ctx, te, ti, id_tokens=adapter.encode(emb), id_scale=0.8)
        handle.unfuse_lora()
        unfused = ours(x, t, ctx, te, ti, id_tokens=adapter.encode(emb), id_scale=0.8)
        assert rel_err(fused, unfused) <= 1e-4  # fp32 rounding of W + s·U·D only
        handle.remove()
        handle.remove()  # idempotent
        after = ours(x, t, ctx, te, ti)
    assert torch.equal(before, after)
    assert {name: m for name, m in ours.named_modules()} == before_modules


def test_fused_lora_is_in_place_and_remove_while_fused_restores(tmp_path_factory, unets):
    """Fusing writes W + s·U·D into each wrapped weight (no second copy where the UNet lives; W kept on the CPU),
    equals the out-of-place fused linear exactly, re-fuses from W without drift, and remove() while fused puts the
    original weights back bit for bit."""
    cfg, ours, _ = unets
    bin_path, _ = _unet_files(tmp_path_factory, cfg, plus=False, seed=31)
    adapter = IPAdapterFaceID.from_file(bin_path)
    inputs, emb, _ = _inputs(cfg, seed=13)
    x, t, ctx, te, ti = inputs
    weights = {k: v.clone() for k, v in ours.state_dict().items()}

    def nbytes(module: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in [*module.parameters(), *module.buffers()])

    with torch.no_grad():
        handle = adapter.install(ours, lora_scale=0.7)
        tokens = adapter.encode(emb)
        size = nbytes(ours)
        handle.fuse_lora()
        assert nbytes(ours) == size  # in place: the UNet holds no more tensor bytes than unfused
        loras = handle.lora_modules
        assert all(m.is_fused and m._original.device.type == "cpu" for m in loras)
        m = loras[0]
        xx = torch.randn(5, m.in_features, generator=torch.Generator().manual_seed(0))
        delta = m.up.weight.float() @ m.down.weight.float()
        w = (m._original.float() + m.scale.float() * delta).to(m.base.weight.dtype)
        assert torch.equal(m(xx), torch.nn.functional.linear(xx, w, m.base.bias))
        fused = ours(x, t, ctx, te, ti, id_tokens=tokens, id_scale=0.8)
        handle.set_lora_scale(0.3)
        handle.set_lora_scale(0.7)
        assert torch.equal(ours(x, t, ctx, te, ti, id_tokens=tokens, id_scale=0.8), fused)  # no drift
        handle.remove()  # while fused
    after = ours.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)


def test_install_errors(tmp_path_factory, tmp_path, unets):
    cfg, ours, _ = unets
    bin_path, _ = _unet_files(tmp_path_factory, cfg, plus=False, seed=40)
    adapter = IPAdapterFaceID.from_file(bin_path)
    with adapter.install(ours):
        with pytest.raises(ValueError, match="already has an identity branch"):
            adapter.install(ours)
    assert all(attn.ip is None for _, attn in ours.cross_attention_layers())

    gen = torch.Generator().manual_seed(41)
    image_proj = make_image_proj(FaceIDProjConfig(context_dim=cfg.context_dim), gen)
    # widths of another model (the layer count fits, the shapes do not)
    other_dims = sdxl_layout_dims((16, 32))
    wrong = IPAdapterFaceID.from_state_dict(image_proj, make_ip_adapter(other_dims, cfg.context_dim, gen))
    with pytest.raises(WeightFormatError, match=r"LoRA '0.to_q_lora' maps 16 -> 16 but UNet layer 'down_blocks"):
        wrong.install(ours)
    wrong = IPAdapterFaceID.from_state_dict(image_proj, make_ip_adapter(other_dims, cfg.context_dim, gen, rank=None))
    with pytest.raises(WeightFormatError, match=r"'ip_adapter.1.to_k_ip.weight' has shape \(16, 64\) but UNet layer"):
        wrong.install(ours)
    # an SD1.5-sized adapter (32 attention layers)
    sd15 = IPAdapterFaceID.from_state_dict(image_proj, make_ip_adapter([64] * 32, cfg.context_dim, gen))
    with pytest.raises(WeightFormatError, match="32 attention layers but the UNet has 140"):
        sd15.install(ours)
    # a failed install leaves the UNet untouched
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    assert all(attn.ip is None for _, attn in ours.cross_attention_layers())


def test_install_checks_layer_order(tmp_path_factory, unets):
    cfg, ours, _ = unets
    bin_path, _ = _unet_files(tmp_path_factory, cfg, plus=False, seed=30)
    adapter = IPAdapterFaceID.from_file(bin_path)

    class SwappedOrder:  # a UNet whose layer list puts attn2 before attn1
        def attention_layers(self):
            layers = ours.attention_layers()
            return [layers[i ^ 1] for i in range(len(layers))]

    with pytest.raises(WeightFormatError, match="not the checkpoint order"):
        adapter.install(SwappedOrder())


def test_install_without_lora(tmp_path_factory, unets):
    cfg, ours, _ = unets
    bin_path, _ = _unet_files(tmp_path_factory, cfg, plus=False, seed=30)
    adapter = IPAdapterFaceID.from_file(bin_path)
    inputs, emb, _ = _inputs(cfg, seed=13)
    x, t, ctx, te, ti = inputs
    with torch.no_grad():
        plain = ours(x, t, ctx, te, ti)
        with adapter.install(ours, lora=False):
            assert not any(isinstance(m, LoRALinear) for m in ours.modules())
            # ip scale 0 with no LoRA: the identity branch adds exactly 0 * o_id
            assert rel_err(ours(x, t, ctx, te, ti, id_tokens=adapter.encode(emb), id_scale=0.0), plain) <= REL_TOL
            assert rel_err(ours(x, t, ctx, te, ti, id_tokens=adapter.encode(emb), id_scale=1.0), plain) > 1e-3
