"""The evaluation harness (fastface.eval, benchmarks.eval) on tiny random metric models in their real file formats.

Parity tolerances (fp32): CLIP score and FCS against transformers' CLIPModel + CLIPTokenizer + CLIPImageProcessor,
max abs error 1e-5 on cosines; AE against an independently built torch MLP, 1e-5 relative; ID against the numpy
oracle of the tiny ArcFace model (tests/onnx_face_models.py), 1e-5 absolute.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import onnx  # noqa: E402,F401  (test extra)
import transformers  # noqa: E402  (test extra)

from eval_fakes import (  # noqa: E402
    FakeGenerator,
    fake_image,
    write_aesthetic,
    write_diversebench,
    write_identities,
    write_tiny_clip,
)
from insightface.utils import face_align  # noqa: E402
from onnx_face_models import face_image, make_pack, oracle_embedding  # noqa: E402

from benchmarks.eval_sweep import make_configs, plan, run_tasks, shard  # noqa: E402
from fastface.adapters.faces import FaceAnalyzer, load_image  # noqa: E402
from fastface.eval import data as evdata  # noqa: E402
from fastface.eval.clip_metrics import AestheticMLP, AestheticScorer, CLIPScorer, clip_configs  # noqa: E402
from fastface.eval.face_metrics import face_clip_scores, face_fail_count, id_similarity  # noqa: E402
from fastface.eval.metrics import MetricModels, MetricSuite, parse_metrics  # noqa: E402
from fastface.eval.report import aggregate, image_grid, pareto_mask  # noqa: E402
from fastface.eval.seeding import derive_seed  # noqa: E402
from fastface.hub import WeightNotFoundError  # noqa: E402
from fastface.models.loading import WeightFormatError  # noqa: E402
from fastface.models.tokenizer import write_vocab_folder  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
COS_ATOL = 1e-5
AE_RTOL = 1e-5
ID_ATOL = 1e-5
IDS = ["ann", "bob", "cid"]
REAL = ["a photo of a person in a park", "a person reading in a library"]
STYLE = ["anime-style drawing; person in a classroom daydreaming", "oil painting; person on a boat fishing"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny metric models: insightface pack, CLIPModel folder (+ its transformers twin), aesthetic .pth."""
    root = tmp_path_factory.mktemp("metric_models")
    make_pack(root / "insightface", "buffalo_l", seed=0)
    ref_clip = write_tiny_clip(root / "clip")
    ref_ae = write_aesthetic(root / "ava+logos-l14-linearMSE.pth", dim=16)
    return types.SimpleNamespace(root=root, insightface=root / "insightface", clip=root / "clip", ref_clip=ref_clip,
                                 ae=root / "ava+logos-l14-linearMSE.pth", ref_ae=ref_ae)


@pytest.fixture(scope="module")
def analyzer(models):
    return FaceAnalyzer(models.insightface, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def scorer(models):
    return CLIPScorer.from_pretrained(models.clip)


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """transformers' CLIP embeddings (the independent implementation): image(list of arrays), text(list of str)."""
    tok = transformers.CLIPTokenizer.from_pretrained(write_vocab_folder(tmp_path_factory.mktemp("tok")))
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    m = models.ref_clip

    @torch.no_grad()
    def image(arrays):
        px = proc(images=list(arrays), return_tensors="pt")["pixel_values"]
        e = m.visual_projection(m.vision_model(pixel_values=px).pooler_output)
        return torch.nn.functional.normalize(e.double(), dim=-1)

    @torch.no_grad()
    def text(prompts):
        ids = tok(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        e = m.text_projection(m.text_model(input_ids=ids["input_ids"]).pooler_output)
        return torch.nn.functional.normalize(e.double(), dim=-1)

    return types.SimpleNamespace(image=image, text=text)


def _rgb(image) -> np.ndarray:
    return load_image(image)[0][..., ::-1].copy()


# ---- seeding ------------------------------------------------------------------------------------------------


def test_seed_rule_is_a_stable_hash():
    payload = json.dumps(["ann", "a photo", 7]).encode()
    expected = int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") % (2**63 - 1)
    assert derive_seed("ann", "a photo", 7) == expected
    seeds = {derive_seed(i, p, b) for i in ("ann", "bob") for p in ("a", "b") for b in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 - 1 for s in seeds)
    assert derive_seed("a|b", "c") != derive_seed("a", "b|c")  # no separator ambiguity
    for bad in ((1, "p", 0), ("i", None, 0), ("i", "p", -1), ("i", "p", True), ("i", "p", 1.5)):
        with pytest.raises(ValueError):
            derive_seed(*bad)


def _eval_set(tmp_path):
    return evdata.load_diversebench(write_diversebench(tmp_path / "bench", IDS, REAL, STYLE))


def test_same_pair_same_seed_and_image_whatever_the_sharding(tmp_path):
    es = _eval_set(tmp_path)
    configs = make_configs(["hyper"], ["faceid-plusv2"], ["baseline", "fastface-am1"], [0.5, 0.8])
    tasks = plan(es, configs, base_seed=3)
    assert len(tasks) == len(configs) * len(IDS) * (len(REAL) + len(STYLE))
    by_pair = {}
    for t in tasks:  # every configuration of a pair starts from the same seed, which is the rule's
        by_pair.setdefault((t.item.identity.name, t.item.prompt), set()).add(t.seed)
    assert all(s == {derive_seed(i, p, 3)} for (i, p), s in by_pair.items())
    assert len({next(iter(s)) for s in by_pair.values()}) == len(by_pair)

    run_tasks(tasks, tmp_path / "one", FakeGenerator(), None, progress=False)
    for world in (2, 3):  # each rank's share, ranks run in reverse order and each share reversed
        for rank in reversed(range(world)):
            part = shard(tasks, rank, world)
            assert all(t.index % world == rank for t in part)
            run_tasks(part[::-1], tmp_path / f"w{world}", FakeGenerator(), None, progress=False)
        for t in tasks:  # same pixels and seed (the PNG text also holds the generation time, which differs)
            a, b = (Image.open(tmp_path / d / t.image) for d in (f"w{world}", "one"))
            assert np.array_equal(np.asarray(a), np.asarray(b))
            assert json.loads(a.text["fastface_eval"])["seed"] == json.loads(b.text["fastface_eval"])["seed"] == t.seed
    with pytest.raises(ValueError, match="rank 2 is outside"):
        shard(tasks, 2, 2)


# ---- data ---------------------------------------------------------------------------------------------------


def test_diversebench_loader_and_subsets(tmp_path):
    es = _eval_set(tmp_path)
    assert [i.name for i in es.identities] == IDS and es.name == "bench"
    assert list(es.prompts) == REAL + STYLE  # stripped, lowercased, blank lines skipped
    assert [i.subset for i in es.items()[:4]] == ["realistic", "realistic", "stylistic", "stylistic"]
    assert len(es) == 12 and es.items()[4].identity.name == "bob"
    assert es.subset("stylistic").prompts == tuple(STYLE) and es.subset("realistic").prompts == tuple(REAL)
    assert evdata.style_part(STYLE[0]) == "anime-style drawing" and evdata.style_part(REAL[0]) is None
    small = es.limit(identities=2, prompts_per_subset=1)
    assert [i.name for i in small.identities] == IDS[:2] and small.prompts == (REAL[0], STYLE[0])
    assert evdata.load_eval_set(tmp_path / "bench", subset="realistic").prompts == tuple(REAL)

    # prompts.txt alone (the combined file) is split by the ';' rule too
    root = tmp_path / "bench"
    (root / "prompts_nostyle.txt").unlink()
    (root / "prompts_style.txt").rename(root / "prompts.txt")
    assert evdata.load_diversebench(root, "stylistic").prompts == tuple(STYLE)
    # any folder of faces + a prompt file; duplicates dropped
    (tmp_path / "p.txt").write_text("A Cat Person\na cat person\nwatercolor; person\n")
    fs = evdata.load_face_folder(root / "id_photos", tmp_path / "p.txt")
    assert fs.prompts == ("a cat person", "watercolor; person") and len(fs.identities) == 3


def test_data_errors(tmp_path):
    with pytest.raises(ValueError, match="no such DiverseBench folder"):
        evdata.load_diversebench(tmp_path / "nope")
    (tmp_path / "b" / "id_photos").mkdir(parents=True)
    with pytest.raises(ValueError, match="no identity photos"):
        evdata.load_diversebench(tmp_path / "b")
    write_identities(tmp_path / "b" / "id_photos", ["x"])
    with pytest.raises(ValueError, match="no prompt files"):
        evdata.load_diversebench(tmp_path / "b")
    (tmp_path / "b" / "prompts_style.txt").write_text("a; b\n")
    with pytest.raises(ValueError, match="prompts_nostyle.txt is missing"):
        evdata.load_diversebench(tmp_path / "b")
    assert evdata.load_diversebench(tmp_path / "b", "stylistic").prompts == ("a; b",)
    with pytest.raises(ValueError, match="no realistic prompts"):
        evdata.load_diversebench(tmp_path / "b", "realistic")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        evdata.read_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="no such prompt file"):
        evdata.read_prompts(tmp_path / "missing.txt")
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "id_photos" / "x.jpg")
    with pytest.raises(ValueError, match="share the identity name 'x'"):
        evdata.load_face_folder(tmp_path / "b" / "id_photos", tmp_path / "b" / "prompts_style.txt")
    with pytest.raises(ValueError, match="not a DiverseBench folder"):
        evdata.load_eval_set(tmp_path)
    with pytest.raises(ValueError, match="subset must be"):
        evdata.load_diversebench(tmp_path / "b", "style")
    with pytest.raises(ValueError, match="positive integer"):
        evdata.load_diversebench(tmp_path / "b", "stylistic").limit(identities=0)


# ---- CLIP, AE -----------------------------------------------------------------------------------------------


def test_clip_score_matches_transformers(scorer, reference):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 56, 3), (64, 48, 3), (32, 32, 3))]
    prompts = ["a photo of a person", "anime-style drawing", "a person " * 40]  # the last one is truncated
    images = [Image.fromarray(arrays[0]), arrays[1], arrays[2]]
    got = scorer.score(images, prompts)
    expected = (reference.image(arrays) * reference.text(prompts)).sum(-1).numpy()
    assert np.abs(got - expected).max() < COS_ATOL
    assert np.abs(got).max() <= 1 and len(set(np.round(got, 6))) == 3
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(images, prompts[:2])


def test_clip_config_of_old_openai_layout():
    # openai/clip-vit-large-patch14's config.json: sizes in *_config_dict, the rest left to transformers defaults.
    cfg = {"projection_dim": 768, "text_config": {"hidden_size": 512}, "vision_config": {},
           "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                "num_hidden_layers": 12},
           "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                  "num_hidden_layers": 24, "patch_size": 14}}
    text, vision = clip_configs(cfg)
    assert (text.width, text.layers, text.heads, text.mlp, text.act, text.projection_dim) == (
        768, 12, 12, 3072, "quick_gelu", 768)
    assert (vision.hidden_size, vision.num_layers, vision.patch_size, vision.image_size, vision.hidden_act,
            vision.projection_dim) == (1024, 24, 14, 224, "quick_gelu", 768)
    with pytest.raises(WeightFormatError, match="not a CLIPModel config"):
        clip_configs({"hidden_size": 3})


def test_clip_loading_errors(tmp_path, models):
    with pytest.raises(WeightNotFoundError, match="no such local folder"):
        CLIPScorer.from_pretrained(tmp_path / "none")
    with pytest.raises(WeightNotFoundError, match="hf download openai/clip-vit-large-patch14"):
        CLIPScorer.from_pretrained("openai/clip-vit-large-patch14", cache_dir=tmp_path / "hf")
    bad = tmp_path / "vision_only"
    bad.mkdir()
    (bad / "config.json").write_text((models.clip / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    sd = load_file(str(models.clip / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("text")}, str(bad / "model.safetensors"))
    with pytest.raises(WeightFormatError, match="not a full CLIPModel"):
        CLIPScorer.from_pretrained(bad)


def test_aesthetic_matches_independent_mlp(models, scorer, reference):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(3)]
    ae = AestheticScorer.from_file(scorer, models.ae)
    got = ae.score(arrays)
    with torch.no_grad():
        expected = models.ref_ae(reference.image(arrays).float())[:, 0].double().numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() < AE_RTOL

    torch.save({"fc.weight": torch.zeros(2, 2)}, models.root / "other.pth")
    with pytest.raises(WeightFormatError, match="not a LAION aesthetic predictor"):
        AestheticMLP.from_file(models.root / "other.pth")
    write_aesthetic(models.root / "wide.pth", dim=24)
    with pytest.raises(ValueError, match="takes 24-d embeddings"):
        AestheticScorer.from_file(scorer, models.root / "wide.pth")


# ---- face metrics -------------------------------------------------------------------------------------------


def _oracle_unit(analyzer, image, w):
    f = analyzer.analyze(image, choose=0)
    e = oracle_embedding(face_align.norm_crop(load_image(image)[0], f.kps, 112), w)
    return e / np.linalg.norm(e)


def test_id_similarity_ffc_and_no_face_path(models, analyzer, tmp_path):
    from onnx_face_models import make_recognizer

    w = make_recognizer(tmp_path / "w.onnx", seed=0)[1]  # the pack's recognizer weights (same seed)
    refs = write_identities(tmp_path / "ids", ["a", "b"])
    black = np.zeros((320, 320, 3), np.uint8)
    gens = [fake_image(1), fake_image(2), Image.fromarray(black), fake_image(1)]
    pairs = [refs[0], refs[1], refs[0], Image.fromarray(black)]
    m = id_similarity(analyzer, pairs, gens)
    for k in (0, 1):
        expected = float(_oracle_unit(analyzer, pairs[k], w) @ _oracle_unit(analyzer, gens[k], w))
        assert abs(m[k].similarity - expected) < ID_ATOL and not m[k].failed
    assert math.isnan(m[2].similarity) and m[2].reference_found and not m[2].generated_found
    assert math.isnan(m[3].similarity) and not m[3].reference_found and m[3].generated_found
    assert face_fail_count(m) == 2
    with pytest.raises(ValueError, match="one per image"):
        id_similarity(analyzer, refs, gens)


def test_face_clip_score_uses_face_box_and_style_part(analyzer, scorer, reference):
    img = face_image(320, patches=((96, 64, 16),), seed=5)
    prompts = [STYLE[0], REAL[0], STYLE[1]]
    got = face_clip_scores(scorer, analyzer, [img, img, np.zeros((320, 320, 3), np.uint8)], prompts)
    crop = img[64:80, 96:112]  # the detected box of the 16 px face
    expected = float((reference.image([crop]) * reference.text(["anime-style drawing"])).sum())
    assert abs(got[0] - expected) < COS_ATOL
    assert math.isnan(got[1]) and math.isnan(got[2])  # realistic prompt; no face


def test_metric_suite_row(models, tmp_path):
    ref = write_identities(tmp_path, ["a"])[0]
    suite = MetricSuite(["id", "clip", "ae", "fcs"], MetricModels(models.insightface, models.clip, models.ae))
    row = suite.score(fake_image(1), STYLE[0], ref)
    assert set(row) == {"id", "face_found", "clip", "ae", "ir", "fcs"} and row["ir"] is None
    assert row["face_found"] and all(isinstance(row[k], float) for k in ("id", "clip", "ae", "fcs"))
    clip = suite.clip.score([fake_image(1)], [STYLE[0]])[0]
    assert abs(row["clip"] - clip) < 1e-12
    empty = suite.score(Image.new("RGB", (320, 320)), REAL[0], ref)
    assert empty["id"] is None and empty["face_found"] is False and empty["fcs"] is None
    assert parse_metrics("ID, ffc,clip") == ("id", "clip")
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metrics("id,lpips")
    with pytest.raises(ValueError, match="ava\\+logos"):
        MetricSuite(["ae"], MetricModels(models.insightface, models.clip))
    with pytest.raises(ValueError, match="ImageReward.pt"):
        MetricSuite(["ir"], MetricModels(models.insightface, models.clip))


# ---- ImageReward (the real package cannot be installed here: plumbing only) -----------------------------------


def test_image_reward_missing_package(monkeypatch, tmp_path):
    from fastface.eval.image_reward import ImageRewardScorer

    (tmp_path / "ImageReward.pt").write_bytes(b"x")
    (tmp_path / "med_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(ImportError, match="pip install image-reward"):
        ImageRewardScorer(tmp_path / "ImageReward.pt")
    with pytest.raises(WeightFormatError, match="no such ImageReward checkpoint"):
        ImageRewardScorer(tmp_path / "missing.pt")


def test_image_reward_plumbing_with_stand_in_module(monkeypatch, tmp_path):
    from fastface.eval.image_reward import ImageRewardScorer

    calls = []
    monkeypatch.setattr(transformers.BertTokenizer, "from_pretrained",
                        classmethod(lambda cls, name, **kw: calls.append((name, kw)) or "tokenizer"))

    class StandIn(torch.nn.Module):  # the package's class: __init__(med_config, device), score(prompt, PIL)
        def __init__(self, med_config, device="cpu"):
            super().__init__()
            self.tokenizer = transformers.BertTokenizer.from_pretrained("bert-base-uncased")
            self.mlp = torch.nn.Linear(3, 1)

        def score(self, prompt, image):
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            x = torch.tensor(np.asarray(image, dtype=np.float32).mean((0, 1)) / 255)
            return float(self.mlp(x)) + len(prompt)

    pkg, sub = types.ModuleType("ImageReward"), types.ModuleType("ImageReward.ImageReward")
    sub.ImageReward = StandIn
    pkg.ImageReward = sub
    monkeypatch.setitem(sys.modules, "ImageReward", pkg)
    monkeypatch.setitem(sys.modules, "ImageReward.ImageReward", sub)
    sd = {"mlp.weight": torch.tensor([[1.0, 2.0, 3.0]]), "mlp.bias": torch.tensor([0.5])}
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text("{}")
    ir = ImageRewardScorer(tmp_path / "ImageReward.pt")
    assert calls == [("bert-base-uncased", {"local_files_only": True})]  # never the network
    transformers.BertTokenizer.from_pretrained("other")  # the wrapper is gone after construction
    assert calls[-1] == ("other", {})
    img = np.full((4, 4, 3), (255, 0, 51), np.uint8)
    assert ir.score([img], ["ab"])[0] == pytest.approx(1.0 + 0.0 + 0.6 + 0.5 + 2, abs=1e-6)
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(WeightFormatError, match="not an ImageReward checkpoint"):
        ImageRewardScorer(tmp_path / "bad.pt", tmp_path / "med_config.json")


# ---- resumability, reports ----------------------------------------------------------------------------------


def test_resumable_runs(models, tmp_path):
    es = _eval_set(tmp_path).limit(2, 1)
    tasks = plan(es, make_configs(["hyper"], ["faceid-plusv2"], ["baseline", "am1"], [0.8]))
    out = tmp_path / "out"
    gen = FakeGenerator(fail_at=3)
    with pytest.raises(KeyboardInterrupt):  # interrupted after 3 images
        run_tasks(tasks, out, gen, None, progress=False)
    assert len(list(out.rglob("*.png"))) == 3 and not list(out.rglob("*.tmp"))
    gen = FakeGenerator()
    suite = MetricSuite(["id"], MetricModels(models.insightface))
    first = run_tasks(tasks, out, gen, suite, progress=False)
    assert gen.calls == len(tasks) - 3 and all(r["time_s"] is not None for r in first)
    again = FakeGenerator()
    assert run_tasks(tasks, out, again, suite, progress=False) == first and again.calls == 0
    (out / tasks[5].image).unlink()
    second = run_tasks(tasks, out, again, suite, progress=False)
    assert again.calls == 1 and [r["id"] for r in second] == [r["id"] for r in first]
    # asking for another metric rescores the stored images without regenerating them
    suite2 = MetricSuite(["id", "clip"], MetricModels(models.insightface, models.clip))
    third = run_tasks(tasks, out, again, suite2, progress=False)
    assert again.calls == 1 and all(r["clip"] is not None for r in third)
    assert [r["time_s"] for r in third] == [r["time_s"] for r in second]
    (out / "x").mkdir()
    with pytest.raises(ValueError, match="made with seed"):  # another base seed in the same folder
        run_tasks(plan(es, make_configs(["hyper"], ["faceid-plusv2"], ["baseline"], [0.8]), base_seed=9),
                  out, again, None, progress=False)


def test_sweep_command_writes_tables_pareto_plots_and_grids(models, tmp_path):
    from benchmarks.eval import main

    bench = write_diversebench(tmp_path / "bench", IDS, REAL, STYLE)
    out = tmp_path / "run"
    argv = ["--data", str(bench), "--presets", "hyper", "--methods", "baseline,fastface-am1,fastface-am2",
            "--ip-scales", "0.5,0.8", "--out", str(out), "--generator", "eval_fakes:factory", "--metrics",
            "id,clip,ae", "--insightface-root", str(models.insightface), "--clip", str(models.clip), "--aesthetic",
            str(models.ae), "--grid-rows", "3", "--grid-tile", "64", "--no-progress", "--max-prompts", "1"]
    assert main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("images/*/*/*.json"))]
    assert len(rows) == 3 * 2 * 3 * 2
    for t in table:  # the table is the aggregate of the per-image rows
        sel = [r for r in rows if r["method"] == t["method"] and r["ip_scale"] == t["ip_scale"]
               and (t["subset"] == "all" or r["subset"] == t["subset"])]
        assert t["n"] == len(sel) and t["ffc"] == sum(not r["face_found"] for r in sel)
        ids = [r["id"] for r in sel if r["id"] is not None]
        assert t["id"] == pytest.approx(np.mean(ids)) if ids else t["id"] is None
        assert t["clip"] == pytest.approx(np.mean([r["clip"] for r in sel]))
    assert {t["subset"] for t in table} == {"realistic", "stylistic", "all"}
    md = (out / "table.md").read_text()
    assert "| hyper | FastFace-AM1 |" in md and "ID (realistic)" in md and "FFC (stylistic)" in md

    plots = sorted(out.glob("pareto_*.png"))
    assert {p.name.split("_")[2] for p in plots} == {"clip", "ae"} and len(plots) == 6
    for p in plots + sorted(out.glob("grids/*.png")):
        with Image.open(p) as im:
            im.verify()
    with Image.open(plots[0]) as im:
        assert im.format == "PNG" and im.size == (640, 480)
    grids = sorted(out.glob("grids/*.png"))
    assert len(grids) == 2  # one per ip scale
    with Image.open(grids[0]) as im:
        assert im.size == (64 * 4, 24 + 3 * (64 + 20))
        # column 0 is the reference photo, letterboxed: the identity's red face patch survives the resize
        first_ref = np.asarray(Image.open(bench / "id_photos" / "ann.png").convert("RGB").resize((64, 64)))
        assert np.abs(np.asarray(im.convert("RGB"))[24:88, :64].astype(int) - first_ref).mean() < 8


def test_report_helpers():
    assert pareto_mask([1, 2, 3, 2], [3, 2, 1, 1]).tolist() == [True, True, True, False]
    rows = [{"preset": "hyper", "adapter": "a", "method": "baseline", "ip_scale": 0.8, "lora_scale": 1.0,
             "steps": 4, "subset": "realistic", "id": v, "face_found": v is not None, "clip": 0.2, "ae": None,
             "ir": None, "fcs": None, "time_s": t} for v, t in ((0.5, 1.0), (None, 3.0), (0.7, 2.0))]
    (t,) = aggregate(rows)
    assert t["id"] == pytest.approx(0.6) and t["ffc"] == 1 and t["ae"] is None and t["n"] == 3
    assert t["time_s"] == pytest.approx(2.0) and t["time_s_std"] == pytest.approx(np.std([1, 3, 2]))
    with pytest.raises(ValueError, match="2 images for 3 columns"):
        image_grid([("x", [None, None])], ["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown method"):
        make_configs(["hyper"], ["faceid-plusv2"], ["fastface"], [0.8])
    with pytest.raises(ValueError, match="unknown model preset"):
        make_configs(["hyperx"], ["faceid-plusv2"], ["baseline"], [0.8])
    with pytest.raises(ValueError, match="twice"):
        make_configs(["hyper"], ["faceid-plusv2"], ["baseline"], [0.8, 0.8])


def test_selfcheck_generator_through_the_real_pipeline(tmp_path):
    """The pipeline generator path (model load per preset, warm-up, seeds) on tiny random weights."""
    from benchmarks.eval_sweep import GeneratorOptions, Request, load_generator

    es = _eval_set(tmp_path).limit(1, 1)
    tasks = plan(es, make_configs(["hyper"], ["faceid-plusv2"], ["baseline", "fastface-am1"], [0.8]))
    gen = load_generator("selfcheck", GeneratorOptions(device="cpu", warmup=1))
    rows = run_tasks(tasks, tmp_path / "out", gen, None, progress=False)
    assert len(rows) == 4 and all(r["time_s"] > 0 for r in rows)
    t = tasks[0]
    with Image.open(tmp_path / "out" / t.image) as im:
        saved = np.asarray(im)
    assert saved.shape == (64, 64, 3)
    again = np.asarray(gen(Request(t.config, t.item.identity, t.item.prompt, t.seed)))
    other = np.asarray(gen(Request(t.config, t.item.identity, t.item.prompt, t.seed + 1)))
    assert np.array_equal(again, saved) and not np.array_equal(other, saved)
    with pytest.raises(ValueError, match="tiny weights for presets hyper and lightning"):
        gen(Request(make_configs(["lcm"], ["faceid-plusv2"], ["baseline"], [0.8])[0], t.item.identity, "x", 0))
    with pytest.raises(ValueError, match="module:factory"):
        load_generator("nonsense", GeneratorOptions())
    with pytest.raises(ValueError, match="cannot import"):
        load_generator("no_such_module_xyz:make", GeneratorOptions())
