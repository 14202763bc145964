"""Write (or check) ``tests/fixtures/e2e_outputs.safetensors``: the outputs of the tiny end-to-end pipeline.

Every adapter (faceid, faceid-plusv2, pulid v1, pulid v1.1) x every method (baseline, dcg, am1, am2,
fastface-am1, fastface-am2), plus a few runs with non-default adapter options, through
``fastface.Pipeline.from_pretrained`` on the tiny random weights of :func:`fastface.selfcheck.write_tiny_weights`
(and a FaceID file written here), 4 steps, 64x64, seed 0, fp32 on the CPU with one thread. Stored per run: the
final latents [1, 4, 8, 8] and the decoded image [1, 3, 64, 64]; the header metadata holds each run's UNet
evaluations per image and its PNG settings (minus the temporary weight paths and the version).

``python tests/make_e2e_fixture.py`` rewrites the file (only on purpose: it is the record of outputs before a
refactor); ``tests/test_e2e_fixture.py`` checks that the current code reproduces it bit for bit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "e2e_outputs.safetensors"
METHODS = ("baseline", "dcg", "am1", "am2", "fastface-am1", "fastface-am2")
ADAPTERS = ("faceid", "faceid-plusv2", "pulid", "pulid-v1.1")
# Runs with non-default adapter options: (name, adapter, method, options, two photos).
OPTION_RUNS = (
    ("faceid-plusv2-scales", "faceid-plusv2", "fastface-am1", {"s_scale": 0.5, "lora_scale": 0.7, "ip_scale": 0.6}, False),
    ("faceid-unfused-lora", "faceid", "fastface-am2", {"lora_scale": 0.6}, False),
    ("pulid-style", "pulid", "fastface-am1", {"pulid_mode": "style"}, False),
    ("pulid-idmix", "pulid", "dcg", {"id_mix": True}, True),
    ("pulid-v1.1-two", "pulid-v1.1", "am2", {"pulid_mode": "fidelity"}, True),
)
SIZE = dict(height=64, width=64, seed=0)
PROMPT = "a photo of a person"


def _settings_record(settings: dict[str, Any]) -> dict[str, Any]:
    """The PNG settings without what depends on the machine (temporary weight paths) or the version."""
    return {k: v for k, v in settings.items() if k not in ("weights", "fastface_version")}


def _faceid_file(root: Path, unet_dim: int, seed: int = 7) -> Path:
    """A plain FaceID adapter file (MLP projection + LoRA + to_k_ip/to_v_ip) in the original flattened layout."""
    from safetensors.torch import save_file

    from fastface.adapters.faceid import FaceIDProjConfig, build_projection
    from fastface.adapters.faceid_adapter import _ip_adapter_weights as _ip_adapter
    from fastface.models.unet import UNet, get_unet_config
    from fastface.tiny import perturb as _perturb

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet = UNet(get_unet_config("tiny"))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        proj = _perturb(build_projection(FaceIDProjConfig(context_dim=unet_dim)), gen).state_dict()
    ip = _ip_adapter(unet, unet_dim, gen)
    path = root / "ip-adapter-faceid_sdxl.safetensors"
    flat = {f"image_proj.{k}": v.contiguous() for k, v in proj.items()}
    flat |= {f"ip_adapter.{k}": v.contiguous() for k, v in ip.items()}
    save_file(flat, str(path))
    return path


def generate_all() -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float, dict[str, Any]]]:
    """(run name, latents, pixels, UNet evaluations per image, settings) of every fixture run."""
    from fastface.models.unet import get_unet_config
    from fastface.pipeline import Pipeline
    from fastface.adapters.pulid_adapter import tiny_pulid_identity
    from fastface.selfcheck import tiny_face, write_tiny_weights

    with tempfile.TemporaryDirectory(prefix="fastface-fixture-") as tmp:
        w = write_tiny_weights(Path(tmp) / "w")
        faceid = _faceid_file(Path(tmp), get_unet_config("tiny").context_dim)
        files = {
            "faceid": dict(adapter_file=faceid),
            "faceid-plusv2": dict(adapter_file=w.adapter, image_encoder=w.image_encoder),
            "pulid": dict(adapter_file=w.pulid_v1),
            "pulid-v1.1": dict(adapter_file=w.pulid_v11),
        }
        ip_faces = [tiny_face(0), tiny_face(1)]
        pulid_faces = [tiny_pulid_identity(w.eva, 0), tiny_pulid_identity(w.eva, 1)]
        pipes = {}

        def pipe_for(adapter: str, fuse: bool = True):
            key = (adapter, fuse)
            if key not in pipes:
                pipes[key] = Pipeline.from_pretrained("hyper", adapter, base=w.base, weights=w.lora, dtype="fp32",
                                                      device="cpu", fuse_adapter_lora=fuse, **files[adapter])
            return pipes[key]

        def faces(adapter: str, two: bool):
            people = pulid_faces if adapter.startswith("pulid") else ip_faces
            return list(people) if two else people[0]

        for adapter in ADAPTERS:
            for method in METHODS:
                out = pipe_for(adapter)(PROMPT, faces(adapter, False), method=method, **SIZE)
                yield f"{adapter}/{method}", out.latents, out.pixels, out.unet_evaluations, out.settings
        for name, adapter, method, options, two in OPTION_RUNS:
            fuse = name != "faceid-unfused-lora"
            out = pipe_for(adapter, fuse)(PROMPT, faces(adapter, two), method=method, **SIZE, **options)
            yield f"options/{name}", out.latents, out.pixels, out.unet_evaluations, out.settings


def configure_torch() -> None:
    """The settings of tests/conftest.py (one thread; deterministic algorithms), so the outputs match the tests'."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def main() -> int:
    from safetensors.torch import save_file

    configure_torch()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, latents, pixels, evals, settings in generate_all():
        tensors[f"{name}/latents"] = latents.contiguous()
        tensors[f"{name}/pixels"] = pixels.contiguous()
        meta[name] = {"unet_evaluations": evals, "settings": _settings_record(settings)}
        print(f"{name}: {evals:g} UNet evaluations/image", flush=True)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(FIXTURE), metadata={"runs": json.dumps(meta, sort_keys=True)})
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
