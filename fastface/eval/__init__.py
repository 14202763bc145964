"""Reproducing the FastFace paper's evaluation: metrics, DiverseBench data, seeding and reports (the ``eval`` extra).

* :mod:`fastface.eval.data`: DiverseBench / face-folder loaders, the realistic-vs-stylistic ``;`` rule.
* :mod:`fastface.eval.seeding`: per-image seeds from (identity, prompt, base seed).
* :mod:`fastface.eval.face_metrics`, :mod:`~fastface.eval.clip_metrics`, :mod:`~fastface.eval.image_reward`:
  ID, FFC, FCS; CLIP score and LAION aesthetic (AE); ImageReward (IR). :mod:`fastface.eval.metrics` bundles them.
* :mod:`fastface.eval.report`: paper-layout tables, Pareto plots (matplotlib), image grids.

The sweep command built on them is ``python -m benchmarks.eval`` (docs/reproduce.md).
"""

from fastface.eval.clip_metrics import CLIP_L14_REPO, AestheticMLP, AestheticScorer, CLIPScorer
from fastface.eval.data import (
    EvalItem,
    EvalSet,
    Identity,
    is_stylistic,
    load_diversebench,
    load_eval_set,
    load_face_folder,
    style_part,
    subset_of,
)
from fastface.eval.face_metrics import FaceMatch, face_clip_scores, face_fail_count, id_similarity
from fastface.eval.image_reward import ImageRewardScorer
from fastface.eval.metrics import DEFAULT_METRICS, METRICS, MetricModels, MetricSuite, parse_metrics
from fastface.eval.report import aggregate, image_grid, markdown_table, plot_pareto_fronts, write_table
from fastface.eval.seeding import SEED_RULE, derive_seed

__all__ = [
    "AestheticMLP", "AestheticScorer", "CLIPScorer", "CLIP_L14_REPO", "DEFAULT_METRICS", "EvalItem", "EvalSet",
    "FaceMatch", "Identity", "ImageRewardScorer", "METRICS", "MetricModels", "MetricSuite", "SEED_RULE",
    "aggregate", "derive_seed", "face_clip_scores", "face_fail_count", "id_similarity", "image_grid",
    "is_stylistic", "load_diversebench", "load_eval_set", "load_face_folder", "markdown_table",
    "parse_metrics", "plot_pareto_fronts", "style_part", "subset_of", "write_table",
]
