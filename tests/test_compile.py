"""torch.compile of a UNet with FastFace hooks: one graph per call (no graph break), compiled == eager, and a
bounded number of compiles over a 4-step run; plus the device-step path (a timestep the hooks look up in a tensor).

A "micro" UNet keeps tracing affordable on two CPU cores: the tiny config with one transformer block and one
resnet per level (same block types, so down/mid/up identity-attention layers and their hook points are all there).
FaceID-Plus-v2 (identity branch + LoRA) and PuLID (zero tokens, ORTHO_v2) are installed from original-format files.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from safetensors.torch import save_file
from test_ip_adapter import make_image_proj, make_ip_adapter, save_flat_safetensors
from test_pulid import flat, make_attn_layers, make_id_adapter
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import fastface
from fastface import samplers
from fastface.adapters.faceid import FaceIDProjConfig
from fastface.adapters.ip_adapter import IPAdapterFaceID
from fastface.adapters.pulid import PULID_ENCODER_CONFIGS, PuLID
from fastface.models.unet import UNet, get_unet_config

MICRO = get_unet_config("tiny").replace(depth=(0, 1, 1), layers_per_block=1)
TS = samplers.timesteps(4, spacing="trailing")
METHODS = {"fastface-am1": ("paper", "am1"), "fastface-am2": ("paper", "am2")}
# Distinct branch sets of a 4-step run: DCG paper + AM1 skips (∅,∅) at the first and last steps (α = 1): 2 sets;
# AM2 couples the branches, all three at every step: 1 set. compile_unet compiles once per set.
BRANCH_SETS = {"fastface-am1": 2, "fastface-am2": 1}


# Host syncs a graph may capture without a graph break (dynamo records .item() as a graph op, for example).
SYNC_METHODS = {"item", "tolist", "numpy", "nonzero", "__bool__", "__float__", "__int__", "masked_select", "unique"}
SYNC_FUNCTIONS = {torch.nonzero, torch.masked_select, torch.unique, torch.argwhere, torch.Tensor.item,
                  torch.Tensor.tolist, torch.ops.aten._local_scalar_dense.default}


class SyncRecorder(CompileCounterWithBackend):
    """A compile counter that also lists the host-sync operations in every graph it compiles."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.syncs: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            if (node.op == "call_method" and node.target in SYNC_METHODS) or (
                node.op == "call_function" and node.target in SYNC_FUNCTIONS
            ):
                where = (node.stack_trace or "").strip().splitlines()[-2:]
                self.syncs.append(f"{node.target} at {' / '.join(x.strip() for x in where)}")
        return super().__call__(gm, example_inputs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _micro_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(MICRO).eval()


@pytest.fixture(scope="module")
def plus_v2(tmp_path_factory):
    """The micro UNet with FaceID-Plus-v2 installed (identity attention + LoRA), and its call inputs."""
    unet = _micro_unet()
    gen = torch.Generator().manual_seed(3)
    pcfg = FaceIDProjConfig(context_dim=MICRO.context_dim, plus=True, clip_dim=32)
    dims = [attn.to_q.out_features for _, attn in unet.attention_layers()]
    path = save_flat_safetensors(tmp_path_factory.mktemp("plus") / "ip-adapter-faceid-plusv2_sdxl.safetensors",
                                 make_image_proj(pcfg, gen), make_ip_adapter(dims, MICRO.context_dim, gen, rank=4))
    handle = IPAdapterFaceID.from_file(path).install(unet, lora_scale=1.0)
    yield unet, _inputs(gen, tokens=4)
    handle.remove()


@pytest.fixture(scope="module")
def pulid(tmp_path_factory):
    """The micro UNet with PuLID v1 installed (8 zero tokens, ORTHO_v2), and its call inputs."""
    unet = _micro_unet()
    gen = torch.Generator().manual_seed(4)
    cfg = PULID_ENCODER_CONFIGS["v1-tiny"]
    path = tmp_path_factory.mktemp("pulid") / "pulid_v1.safetensors"
    save_file({k: v.contiguous() for k, v in flat(make_id_adapter(cfg, gen), make_attn_layers(unet, gen, 0.5)).items()},
              str(path))
    handle = PuLID.from_file(path).install(unet)
    yield unet, _inputs(gen, tokens=cfg.num_id_tokens)
    handle.remove()


def _inputs(gen: torch.Generator, tokens: int) -> dict:
    c = MICRO.context_dim
    return dict(
        noise=torch.randn(1, 4, 8, 8, generator=gen),
        null_id=torch.randn(1, tokens, c, generator=gen),
        cond=dict(context=torch.randn(1, 77, c, generator=gen), text_embeds=torch.randn(1, MICRO.pooled_dim, generator=gen),
                  time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]), id_tokens=torch.randn(1, tokens, c, generator=gen),
                  id_scale=torch.tensor([0.8])),
    )  # fmt: skip


def _sample(model, inp: dict) -> torch.Tensor:
    with torch.no_grad():
        return samplers.ddim(lambda x, t: model(x, t, **inp["cond"]), inp["noise"].clone(), TS)


def _run(unet: UNet, model, inp: dict, method: str) -> tuple[torch.Tensor, int]:
    dcg, am = METHODS[method]
    with fastface.attach(unet, dcg=dcg, am=am, null_id=inp["null_id"], timesteps=TS) as h:
        return _sample(model, inp), h.branch_evaluations


# ---------------------------------------------------------------------------------------------------------------
# (1) no graph break


@pytest.mark.parametrize("adapter", ["plus_v2", "pulid"])
@pytest.mark.parametrize("method", list(METHODS))
def test_hooked_unet_call_has_no_graph_break(adapter, method, request) -> None:
    """One hooked UNet call (a step with all three branches) traces into a single graph: fullgraph=True raises on
    any graph break, dynamo's graph-break counter stays empty, and the graph holds no host sync (.item(), ...)."""
    unet, inp = request.getfixturevalue(adapter)
    torch._dynamo.reset()
    counters.clear()
    cnt = SyncRecorder("eager")
    compiled = fastface.compile_unet(unet, backend=cnt, fullgraph=True)
    dcg, am = METHODS[method]
    with fastface.attach(unet, dcg=dcg, am=am, null_id=inp["null_id"], timesteps=TS), torch.no_grad():
        out = compiled(inp["noise"], TS[1], **inp["cond"])
        ref = unet(inp["noise"], TS[1], **inp["cond"])
    assert dict(counters["graph_break"]) == {}
    assert cnt.syncs == []
    assert cnt.frame_count == 1 and cnt.op_count > 100  # the whole UNet call, hooks included, in one graph
    assert rel(out, ref) < 1e-6  # the eager backend runs the same kernels (tensor coefficients instead of floats)


# ---------------------------------------------------------------------------------------------------------------
# (2) compiled == eager over a 4-step run, (3) compiles bounded by the distinct branch sets


@pytest.fixture(scope="module")
def compiled_runs(plus_v2):
    """Eager and compile_unet (aot_eager backend, fullgraph) 4-step runs per method, with the compile counts."""
    unet, inp = plus_v2
    results = {}
    for method in METHODS:
        torch._dynamo.reset()
        counters.clear()
        cnt = SyncRecorder("aot_eager")
        compiled = fastface.compile_unet(unet, backend=cnt, fullgraph=True)
        eager, ev_eager = _run(unet, unet, inp, method)
        out, ev = _run(unet, compiled, inp, method)
        frames = cnt.frame_count
        again, _ = _run(unet, compiled, inp, method)  # a second run (a new handle) reuses the graphs
        results[method] = dict(eager=eager, out=out, again=again, evals=(ev_eager, ev), frames=frames,
                               frames_after_second_run=cnt.frame_count, breaks=dict(counters["graph_break"]),
                               syncs=cnt.syncs)
    return results


@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_equals_eager_over_a_4_step_run(compiled_runs, method) -> None:
    r = compiled_runs[method]
    assert r["breaks"] == {} and r["syncs"] == []
    assert rel(r["out"], r["eager"]) < 1e-5
    assert torch.equal(r["again"], r["out"])
    assert r["evals"] == ((10, 10) if method == "fastface-am1" else (12, 12))  # the eager evaluation counts


@pytest.mark.parametrize("method", list(METHODS))
def test_compiles_once_per_distinct_branch_set(compiled_runs, method) -> None:
    r = compiled_runs[method]
    assert r["frames"] == BRANCH_SETS[method]
    assert r["frames_after_second_run"] == BRANCH_SETS[method]


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor builds its CPU kernels with, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # inductor raises when it finds no compiler
        return None


@pytest.mark.skipif(not torch.cuda.is_available() and _cpp_compiler() is None,
                    reason="inductor needs a C++ compiler (g++ or clang++) to build CPU kernels")
@pytest.mark.skipif(os.environ.get("FASTFACE_SKIP_INDUCTOR") == "1", reason="FASTFACE_SKIP_INDUCTOR=1")
def test_inductor_equals_eager(plus_v2) -> None:
    """The default backend (inductor: generated C++ / Triton kernels, so float sums in another order): compiled ==
    eager within 1e-5 (fp32) over 4-step DCG + AM1 and DCG + AM2 runs, with eager's evaluation counts. Building the
    kernels takes a few minutes on a 2-core CPU (FASTFACE_SKIP_INDUCTOR=1 skips it)."""
    unet, inp = plus_v2
    for method in METHODS:
        torch._dynamo.reset()
        compiled = fastface.compile_unet(unet)  # the default backend
        eager, ev_eager = _run(unet, unet, inp, method)
        out, ev = _run(unet, compiled, inp, method)
        assert ev == ev_eager
        assert rel(out, eager) < 1e-5, method


# ---------------------------------------------------------------------------------------------------------------
# Hooks attached or removed after compiling


def test_attach_and_remove_after_compiling(plus_v2) -> None:
    unet, inp = plus_v2
    torch._dynamo.reset()
    compiled = fastface.compile_unet(unet, backend="eager", fullgraph=True)
    x, t, cond = inp["noise"], TS[0], inp["cond"]
    with torch.no_grad():
        plain = unet(x, t, **cond)
        assert torch.equal(compiled(x, t, **cond), plain)  # compiled before any hook
        with fastface.attach(unet, dcg="paper", am="am1", null_id=inp["null_id"], timesteps=TS):
            hooked = unet(x, t, **cond)
            assert torch.equal(compiled(x, t, **cond), hooked)
        assert not torch.equal(hooked, plain)
        assert torch.equal(compiled(x, t, **cond), plain)  # removal seen by the compiled call
        with fastface.attach(unet, am="am1"):  # another configuration: AM only, no DCG
            am_only = unet(x, t, **cond)
            assert torch.equal(compiled(x, t, **cond), am_only)


# ---------------------------------------------------------------------------------------------------------------
# The device-step path: a timestep the hooks look up in a tensor (no host step)


@pytest.mark.parametrize("method", list(METHODS))
def test_device_step_lookup_equals_host_steps(plus_v2, method) -> None:
    """Plain torch.compile cannot read the timestep on the host: the hooks look the step up in the plan's tensor
    tables inside the graph, evaluate the union of the schedule's branches and gather the coefficients on the
    device (the path a CUDA timestep takes). Per-step results equal the host path's."""
    unet, inp = plus_v2
    torch._dynamo.reset()
    counters.clear()
    cnt = SyncRecorder("eager")
    compiled = torch.compile(unet, backend=cnt, fullgraph=True)

    frames = []

    def model(x, t, **cond):  # a per-sample timestep tensor [B], as some samplers pass
        out = compiled(x, t.reshape(1).expand(x.shape[0]), **cond)
        frames.append(cnt.frame_count)
        return out

    host, host_evals = _run(unet, unet, inp, method)
    dev, _ = _run(unet, model, inp, method)
    assert rel(dev, host) < 1e-6
    assert host_evals == (10 if method == "fastface-am1" else 12)
    assert cnt.syncs == []  # the step is looked up on the device, never read back to the host
    assert dict(counters["graph_break"]) == {}
    assert len(frames) == 4 and frames[-1] == frames[0]  # compiled at the first step, no recompile after


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_timestep_equals_host_steps(plus_v2, method) -> None:
    unet, inp = plus_v2
    host, _ = _run(unet, unet, inp, method)
    unet.cuda()
    try:
        cuda_inp = dict(noise=inp["noise"].cuda(), null_id=inp["null_id"].cuda(),
                        cond={k: v.cuda() for k, v in inp["cond"].items()})
        dev, evals = _run(unet, lambda x, t, **c: unet(x, t.cuda(), **c), cuda_inp, method)
        assert evals == 12  # the union of the branches at every step
        assert rel(dev.cpu(), host) < 1e-5  # a different device: kernels differ in rounding
    finally:
        unet.cpu()
