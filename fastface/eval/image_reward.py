"""ImageReward v1.0 (IR; Xu et al. 2023), the paper's reward for stylistic images, through the ``image-reward`` package.

``image-reward`` (1.5 in the official FastFace requirements) needs torchvision, timm and fairscale, so it is not
a fastface dependency: it is imported only when this metric is built, with a clear error if it is missing. Its
own ``ImageReward.load`` always contacts the Hugging Face Hub (for ``med_config.json``), so the model is built
here from local files instead: ``ImageReward.pt`` and ``med_config.json`` (both from the ``THUDM/ImageReward``
repo), with the BLIP text tokenizer (``bert-base-uncased``) loaded with ``local_files_only=True`` - it must be in
the Hugging Face cache. This wrapper is untested against the real package (it cannot be installed on the CI
machine); the tests cover its plumbing with a stand-in module.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastface.adapters.faces import ImageInput
from fastface.eval.clip_metrics import to_rgb
from fastface.models.loading import WeightFormatError, read_torch_bin

logger = logging.getLogger(__name__)

__all__ = ["ImageRewardScorer", "INSTALL_HINT"]

INSTALL_HINT = (
    "pip install image-reward==1.5 (it needs torchvision, timm and fairscale matching your torch); then download "
    "ImageReward.pt and med_config.json with `hf download THUDM/ImageReward ImageReward.pt med_config.json` and "
    "the BLIP tokenizer with `hf download google-bert/bert-base-uncased --include \"*.txt\" \"*.json\"`"
)


@contextlib.contextmanager
def _tokenizers_local_only(module) -> Iterator[None]:
    """While building the model, make ``transformers.BertTokenizer.from_pretrained`` use the local cache only."""
    tok = getattr(module, "BertTokenizer", None)
    if tok is None:
        yield
        return
    had_own = "from_pretrained" in tok.__dict__
    own = tok.__dict__.get("from_pretrained")
    bound = tok.from_pretrained

    def local_only(cls, *args, **kwargs):
        kwargs["local_files_only"] = True
        return bound.__func__(cls, *args, **kwargs)

    tok.from_pretrained = classmethod(local_only)
    try:
        yield
    finally:
        if had_own:
            tok.from_pretrained = own
        else:
            del tok.from_pretrained


def _import_model_class():
    try:
        import transformers
        from ImageReward.ImageReward import ImageReward
    except ImportError as exc:
        raise ImportError(
            f"the ImageReward (IR) metric needs the 'image-reward' package ({exc}). {INSTALL_HINT}"
        ) from exc
    return ImageReward, transformers


class ImageRewardScorer:
    """ImageReward v1.0 scores of (prompt, image) pairs (higher is better; roughly standardised, mean 0)."""

    def __init__(self, checkpoint: str | os.PathLike, med_config: str | os.PathLike | None = None,
                 *, device: str | torch.device = "cpu") -> None:
        checkpoint = Path(checkpoint).expanduser()
        med_config = checkpoint.parent / "med_config.json" if med_config is None else Path(med_config).expanduser()
        for what, path in (("ImageReward checkpoint", checkpoint), ("ImageReward med_config.json", med_config)):
            if not path.is_file():
                raise WeightFormatError(f"{path}: no such {what}. {INSTALL_HINT}")
        model_cls, transformers = _import_model_class()
        sd = read_torch_bin(checkpoint)
        if not isinstance(sd, dict) or not any(k.startswith("mlp.") for k in sd):
            raise WeightFormatError(f"{checkpoint}: not an ImageReward checkpoint (no 'mlp.*' weights)")
        try:
            with _tokenizers_local_only(transformers):
                model = model_cls(med_config=str(med_config), device=str(device))
        except OSError as exc:  # the tokenizer is not in the local cache
            raise WeightFormatError(
                f"ImageReward could not load its BLIP tokenizer locally ({exc}). {INSTALL_HINT}"
            ) from exc
        result = model.load_state_dict(sd, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing:
            raise WeightFormatError(f"{checkpoint}: {len(missing)} ImageReward weights missing, e.g. {missing[:4]}")
        self.model = model.to(device).eval()
        logger.info("ImageReward loaded from %s", checkpoint)

    @torch.no_grad()
    def score(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> np.ndarray:
        """IR per (image, prompt) pair (float64)."""
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        return np.array([float(self.model.score(p, Image.fromarray(to_rgb(im)))) for im, p in zip(images, prompts)],
                        dtype=np.float64)
