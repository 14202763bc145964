"""The tiny end-to-end outputs are bit-identical to the recorded fixture (``tests/make_e2e_fixture.py``).

The fixture was written on the code before the adapter-contract refactor; every adapter x method (and a few
adapter-option runs) must reproduce its final latents and decoded image exactly (``torch.equal``), with the same
UNet evaluations per image and the same PNG settings.
"""

from __future__ import annotations

import json

import pytest
import torch
from make_e2e_fixture import ADAPTERS, FIXTURE, METHODS, OPTION_RUNS, _settings_record, generate_all
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

# UNet evaluations per image at 4 steps (the official implementation spends 12 on every method).
EVALUATIONS = {"baseline": 4, "dcg": 10, "am1": 4, "am2": 12, "fastface-am1": 10, "fastface-am2": 12}


@pytest.fixture(scope="module")
def recorded():
    with safe_open(str(FIXTURE), framework="pt") as f:
        runs = json.loads(f.metadata()["runs"])
    return load_file(str(FIXTURE)), runs


def test_fixture_covers_every_adapter_and_method(recorded) -> None:
    _, runs = recorded
    expected = {f"{a}/{m}" for a in ADAPTERS for m in METHODS} | {f"options/{r[0]}" for r in OPTION_RUNS}
    assert set(runs) == expected
    for name, run in runs.items():
        if not name.startswith("options/"):
            assert run["unet_evaluations"] == EVALUATIONS[name.split("/")[1]], name


def test_outputs_are_bit_identical_to_the_fixture(recorded) -> None:
    tensors, runs = recorded
    seen = set()
    for name, latents, pixels, evals, settings in generate_all():
        seen.add(name)
        assert torch.equal(latents, tensors[f"{name}/latents"]), f"{name}: latents differ from the fixture"
        assert torch.equal(pixels, tensors[f"{name}/pixels"]), f"{name}: image differs from the fixture"
        assert evals == runs[name]["unet_evaluations"], name
        assert json.loads(json.dumps(_settings_record(settings))) == runs[name]["settings"], name
    assert seen == set(runs)
