"""Every module fastface builds without weights holds finite parameters and buffers.

A module built for tests or research forks (no file loaded) must never compute on uninitialised memory: with
``torch.utils.deterministic.fill_uninitialized_memory`` on, torch fills ``torch.empty`` with NaN, so any parameter left
uninitialised shows up here deterministically instead of as an occasional NaN image depending on the heap.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastface.adapters.faceid import FACEID_PROJ_CONFIGS, FacePerceiverResampler, MLPProjModel
from fastface.adapters.pulid import PULID_ENCODER_CONFIGS, build_encoder
from fastface.adapters.pulid_faces import BiSeNet
from fastface.models.clip_vision import CLIPVisionEncoder
from fastface.models.eva_clip import EVAVisionTower
from fastface.models.retinaface import RetinaFace
from fastface.models.text import CLIPTextEncoder
from fastface.models.unet import UNet, get_unet_config
from fastface.models.vae import AutoencoderKL

BUILDERS = {
    "unet": lambda: UNet(get_unet_config("tiny")),
    "clip-vision": lambda: CLIPVisionEncoder("tiny"),
    "eva": lambda: EVAVisionTower("tiny"),
    "text-l": lambda: CLIPTextEncoder("tiny-clip-l"),
    "text-g": lambda: CLIPTextEncoder("tiny-bigg"),
    "vae": lambda: AutoencoderKL("tiny"),
    "faceid-proj": lambda: MLPProjModel(FACEID_PROJ_CONFIGS["faceid_tiny"]),
    "faceid-plus-proj": lambda: FacePerceiverResampler(FACEID_PROJ_CONFIGS["faceid_plus_tiny"]),
    "pulid-v1": lambda: build_encoder(PULID_ENCODER_CONFIGS["v1-tiny"]),
    "pulid-v1.1": lambda: build_encoder(PULID_ENCODER_CONFIGS["v1.1-tiny"]),
    "bisenet": BiSeNet,
    "retinaface": RetinaFace,  # resnet50, the only config; 27M parameters, built in well under a second
}


@pytest.fixture
def nan_filled_empty():
    was_det, was_fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_det)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


def test_the_detector_works(nan_filled_empty) -> None:
    """The check itself: an uninitialised parameter is caught."""
    assert torch.isnan(nn.Parameter(torch.empty(3))).all()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_built_modules_are_finite(name: str, nan_filled_empty) -> None:
    torch.manual_seed(0)
    module = BUILDERS[name]()
    bad = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if not torch.isfinite(t).all()]
    assert not bad, f"{name}: uninitialised tensors {bad}"
