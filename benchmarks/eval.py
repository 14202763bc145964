"""Reproduce the FastFace paper's evaluation: generate a sweep, score it, write tables, Pareto plots and grids.

::

    python -m benchmarks.eval --data DiverseBench/ --presets hyper,lightning --adapters faceid-plusv2 \\
        --methods baseline,fastface-am1,fastface-am2 --ip-scales 0.8 --out runs/table2 \\
        --insightface-root ~/.insightface --aesthetic ava+logos-l14-linearMSE.pth

    torchrun --nproc_per_node=8 -m benchmarks.eval ...        # the same, sharded over 8 GPUs (or machines)

Outputs in ``--out``: ``images/`` (PNG + per-image JSON rows), ``rows.csv`` (all per-image rows), ``table.csv``/
``table.json``/``table.md`` (paper layout), ``pareto_*.png`` (ID vs CLIP/AE over the ip scales) and ``grids/``
(reference, baseline, FastFace-AM1, FastFace-AM2 side by side). See docs/reproduce.md.

Distributed: under ``torchrun`` each rank takes the tasks with index % world_size == rank on its own device
(``cuda:LOCAL_RANK``), rank 0 gathers the per-image rows (over a gloo group, so no GPU memory is used) and writes
the reports. The images stay where each rank wrote them; grids need a shared ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.eval_sweep import (
    Config,
    GeneratorOptions,
    Task,
    load_generator,
    make_configs,
    plan,
    run_tasks,
    shard,
)
from fastface.eval.data import EvalSet, load_eval_set
from fastface.eval.metrics import DEFAULT_METRICS, MetricModels, MetricSuite, parse_metrics
from fastface.eval.report import METHOD_LABELS, aggregate, image_grid, plot_pareto_fronts, write_rows, write_table
from fastface.jobs import join_ranks, rank_device, rank_info

logger = logging.getLogger("benchmarks.eval")

GRID_METHODS = ("baseline", "fastface-am1", "fastface-am2")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="DiverseBench folder (id_photos/, prompts_*.txt) or a folder of faces")
    d.add_argument("--prompts", help="prompt file (one per line) for a plain folder of faces")
    d.add_argument("--subset", default="full", choices=("full", "realistic", "stylistic"))
    d.add_argument("--max-identities", type=int, help="only the first N identities (quick runs)")
    d.add_argument("--max-prompts", type=int, help="only the first N prompts of each subset (quick runs)")
    s = p.add_argument_group("sweep")
    s.add_argument("--presets", type=_names, default=["hyper"], help="model presets, comma-separated")
    s.add_argument("--adapters", type=_names, default=["faceid-plusv2"])
    s.add_argument("--methods", type=_names, default=list(GRID_METHODS))
    s.add_argument("--ip-scales", type=_floats, default=[0.8], help="e.g. 0.1,0.35,0.5,0.65,0.8,0.95 for Pareto plots")
    s.add_argument("--lora-scales", type=_floats, default=None, help="adapter LoRA scales (default: the adapter's)")
    s.add_argument("--steps", type=int, help="sampling steps (default: the preset's, 4)")
    s.add_argument("--seed", type=int, default=0, help="base seed; image seed = hash(identity, prompt, seed)")
    s.add_argument("--out", required=True, help="output folder (re-running resumes)")
    g = p.add_argument_group("generation")
    g.add_argument("--generator", default="pipeline",
                   help="pipeline, selfcheck (tiny random weights) or module:factory")
    g.add_argument("--no-generate", action="store_true", help="only score images already in --out")
    g.add_argument("--device", help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    g.add_argument("--dtype", help="pipeline dtype (fp16, bf16, fp32; default fp16 on CUDA)")
    g.add_argument("--download", action="store_true", help="let the pipeline download missing weights (hub extra)")
    g.add_argument("--cache-dir", help="Hugging Face cache folder")
    g.add_argument("--warmup", type=int, default=1, help="throw-away images after each model load (timing)")
    m = p.add_argument_group("metrics")
    m.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="id (with FFC), clip, ae, ir, fcs; or none")
    m.add_argument("--insightface-root", default="~/.insightface", help="folder with models/buffalo_l/*.onnx")
    m.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIPModel folder or HF-cache repo id")
    m.add_argument("--aesthetic", help="ava+logos-l14-linearMSE.pth (LAION aesthetic predictor v2)")
    m.add_argument("--imagereward", help="ImageReward.pt (med_config.json beside it)")
    r = p.add_argument_group("reports")
    r.add_argument("--grid-methods", type=_names, default=list(GRID_METHODS))
    r.add_argument("--grid-rows", type=int, default=4, help="(identity, prompt) rows per grid")
    r.add_argument("--grid-tile", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dist-timeout-min", type=float, default=240.0, help="how long rank 0 waits for the others")
    return p


def write_grids(tasks: Sequence[Task], out: Path, methods: Sequence[str], rows_per_grid: int, tile: int) -> list[Path]:
    """One grid per (preset, adapter, LoRA scale, steps, ip scale) with at least two of ``methods``: reference face
    then each method, for ``rows_per_grid`` (identity, prompt) pairs spread over the set."""
    if rows_per_grid < 1:
        return []
    families: dict[tuple, dict[str, dict[tuple[str, str], Task]]] = {}
    for t in tasks:
        c = t.config
        if c.method in methods:
            fam = families.setdefault((c.preset, c.adapter, c.lora_scale, c.steps, c.ip_scale), {})
            fam.setdefault(c.method, {})[(t.item.identity.name, t.item.prompt)] = t
    paths = []
    for (preset, adapter, lora, steps, ip), by_method in sorted(families.items()):
        present = [m for m in methods if m in by_method]
        if len(present) < 2:
            continue
        pairs = list(by_method[present[0]])
        picks = sorted({int(i) for i in np.linspace(0, len(pairs) - 1, min(rows_per_grid, len(pairs))).round()})
        rows = []
        for i in picks:
            key = pairs[i]
            ref = by_method[present[0]][key].item.identity.path
            cells = [ref] + [out / by_method[m][key].image if key in by_method[m] else None for m in present]
            rows.append((f"{key[0]}: {key[1]}", cells))
        grid = image_grid(rows, ["reference"] + [METHOD_LABELS.get(m, m) for m in present], tile=tile)
        path = out / "grids" / f"grid_{preset}_{adapter}_ip{ip:g}_lora{lora:g}_{steps}steps.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path, format="PNG")
        paths.append(path)
    return paths


def write_reports(rows: Sequence[dict[str, Any]], tasks: Sequence[Task], out: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    """rows.csv, the table (csv/json/md), Pareto plots and grids; returns the written paths."""
    rows = sorted(rows, key=lambda r: r["index"])
    written: dict[str, Any] = {"rows": write_rows([{k: v for k, v in r.items() if k != "metrics"} for r in rows],
                                                  out / "rows.csv")}
    table = aggregate(rows)
    written.update(write_table(table, out))
    written["pareto"] = plot_pareto_fronts(table, out, x_metrics=[x for x in ("clip", "ae", "ir")
                                                                   if any(t[x] is not None for t in table)])
    written["grids"] = write_grids(tasks, out, args.grid_methods, args.grid_rows, args.grid_tile)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world, local_rank = rank_info()
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).expanduser()
    eval_set: EvalSet = load_eval_set(args.data, args.prompts, args.subset)
    if args.max_identities or args.max_prompts:
        eval_set = eval_set.limit(args.max_identities, args.max_prompts)
    configs: list[Config] = make_configs(args.presets, args.adapters, args.methods, args.ip_scales,
                                         args.lora_scales or [None], args.steps)
    tasks = plan(eval_set, configs, args.seed)
    device = rank_device(args.device, local_rank)

    ranks = join_ranks(device, args.dist_timeout_min)
    mine = shard(tasks, rank, world)
    logger.info("%d identities x %d prompts x %d configurations = %d images; this rank: %d on %s",
                len(eval_set.identities), len(eval_set.prompts), len(configs), len(tasks), len(mine), device)

    names = [] if args.metrics.strip().lower() == "none" else parse_metrics(args.metrics)
    suite = None
    if names:
        import torch

        models = MetricModels(insightface_root=args.insightface_root, clip=args.clip, aesthetic=args.aesthetic,
                              imagereward=args.imagereward, cache_dir=args.cache_dir)
        suite = MetricSuite(names, models, device=device, dtype=torch.float32)
    generator = None
    if not args.no_generate:
        options = GeneratorOptions(device=device, dtype=args.dtype, download=args.download,
                                   cache_dir=args.cache_dir, face_root=args.insightface_root, warmup=args.warmup)
        generator = load_generator(args.generator, options)
    rows = run_tasks(mine, out, generator, suite, progress=False if args.no_progress else None,
                     desc=f"rank {rank}/{world}", position=rank)

    gathered = ranks.gather(rows)
    ranks.close()
    if rank == 0:
        rows = [r for part in gathered for r in part]
        written = write_reports(rows, tasks, out, args)
        (out / "run.json").write_text(json.dumps({"argv": list(argv if argv is not None else sys.argv[1:]),
                                                  "world_size": world, "images": len(rows)}, indent=1))
        logger.info("wrote %s", {k: (str(v) if not isinstance(v, list) else len(v)) for k, v in written.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
