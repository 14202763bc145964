"""Reports of an evaluation run: metric tables (CSV, JSON, Markdown), Pareto plots and image grids.

Tables follow the paper's Tables 2, 5 and 6: one row per (model, method) and, per column group (subset and/or
adapter LoRA scale), ID, CLIP, AE, IR, FCS means, the FFC count and the time per image (mean +- std).
Means are over the images where the metric exists: ID over the pairs where both faces were found (as the
official code), FCS over stylistic prompts with a face. Plots use matplotlib's Agg canvas directly (no pyplot, no
global backend change); grids use PIL.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "GROUP_KEYS",
    "VALUE_KEYS",
    "aggregate",
    "write_rows",
    "write_table",
    "markdown_table",
    "pareto_mask",
    "pareto_plot",
    "plot_pareto_fronts",
    "image_grid",
]

GROUP_KEYS = ("preset", "adapter", "method", "ip_scale", "lora_scale", "steps")
VALUE_KEYS = ("id", "clip", "ae", "ir", "fcs")
LABELS = {"id": "ID", "clip": "CLIP", "ae": "AE", "ir": "IR", "fcs": "FCS"}
SUBSET_ORDER = ("realistic", "stylistic", "all")
METHOD_ORDER = ("baseline", "dcg", "am1", "am2", "fastface-am1", "fastface-am2")
METHOD_LABELS = {"baseline": "baseline", "dcg": "DCG", "am1": "AM1", "am2": "AM2",
                 "fastface-am1": "FastFace-AM1", "fastface-am2": "FastFace-AM2"}


def _mean(values: Iterable[Any]) -> float | None:
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(xs)) if xs else None


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _sort_key(row: Mapping[str, Any]) -> tuple:
    return (str(row["preset"]), str(row["adapter"]), -float(row["lora_scale"]), int(row["steps"]),
            _method_rank(str(row["method"])), float(row["ip_scale"]), str(row.get("subset", "")))


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One table row per configuration and subset (``realistic``/``stylistic``, plus ``all`` when both occur).

    Each has the :data:`GROUP_KEYS`, ``subset``, ``n`` (images), the metric means (None if never computed),
    ``ffc`` (None if ID was not computed), ``time_s`` and ``time_s_std`` (over the images generated in the run).
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    out = []
    for key, members in groups.items():
        subsets = sorted({m["subset"] for m in members})
        for subset in subsets + (["all"] if len(subsets) > 1 else []):
            sel = [m for m in members if subset == "all" or m["subset"] == subset]
            entry: dict[str, Any] = dict(zip(GROUP_KEYS, key))
            entry["subset"] = subset
            entry["n"] = len(sel)
            for k in VALUE_KEYS:
                entry[k] = _mean(m.get(k) for m in sel)
            found = [m.get("face_found") for m in sel if m.get("face_found") is not None]
            entry["ffc"] = sum(1 for f in found if not f) if found else None
            times = [float(m["time_s"]) for m in sel if m.get("time_s") is not None]
            entry["time_s"] = float(np.mean(times)) if times else None
            entry["time_s_std"] = float(np.std(times)) if times else None
            out.append(entry)
    return sorted(out, key=_sort_key)


def _csv_value(v: Any) -> Any:
    return "" if v is None else v


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Per-image rows as CSV (column order of the first row; empty cells for None)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in keys})
    return path


def write_table(table: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, name: str = "table") -> dict[str, Path]:
    """Write ``<name>.csv``, ``<name>.json`` and ``<name>.md`` (the paper layout) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_rows(table, out / f"{name}.csv"), "json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(list(table), indent=1), encoding="utf-8")
    paths["md"].write_text(markdown_table(table), encoding="utf-8")
    return paths


def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(table: Sequence[Mapping[str, Any]]) -> str:
    """The paper's layout: a block per (adapter, ip scale, steps); rows = model x method; column groups = subset
    (x adapter LoRA scale when several); in each group the metrics present and FFC; time per image last."""
    blocks = []
    keyf = lambda r: (str(r["adapter"]), float(r["ip_scale"]), int(r["steps"]))  # noqa: E731
    for block_key in sorted({keyf(r) for r in table}):
        rows = [r for r in table if keyf(r) == block_key]
        loras = sorted({float(r["lora_scale"]) for r in rows}, reverse=True)
        cols = sorted({(float(r["lora_scale"]), r["subset"]) for r in rows},
                      key=lambda c: (-c[0], SUBSET_ORDER.index(c[1]) if c[1] in SUBSET_ORDER else 9, c[1]))
        # per column group: the metrics with a value there (FCS is empty on realistic prompts, for example)
        group_metrics = {c: [k for k in VALUE_KEYS if any(r[k] is not None for r in rows
                                                          if (float(r["lora_scale"]), r["subset"]) == c)]
                         for c in cols}
        with_ffc = any(r["ffc"] is not None for r in rows)
        head = ["Model", "Method"]
        for lora, subset in cols:
            tag = subset if len(loras) == 1 else f"{subset}, lora_scale={lora:g}"
            head += [f"{LABELS[m]} ({tag})" for m in group_metrics[(lora, subset)]]
            head += [f"FFC ({tag})"] if with_ffc else []
        head.append("time (s)")
        lines = [f"### {block_key[0]}, ip_scale={block_key[1]:g}, {block_key[2]} steps", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        models = sorted({(r["preset"], r["method"]) for r in rows}, key=lambda x: (x[0], _method_rank(x[1])))
        for preset, method in models:
            cells = [preset, METHOD_LABELS.get(method, method)]
            times = []
            for lora, subset in cols:
                match = [r for r in rows if (r["preset"], r["method"], float(r["lora_scale"]), r["subset"])
                         == (preset, method, lora, subset)]
                r = match[0] if match else None
                cells += [_fmt(r[m] if r else None) for m in group_metrics[(lora, subset)]]
                if with_ffc:
                    cells.append("-" if r is None or r["ffc"] is None else str(r["ffc"]))
                if r is not None and r["time_s"] is not None:
                    times.append((r["n"], r["time_s"], r["time_s_std"]))
            if times:
                _, t, sd = max(times)  # the widest group (all images of the configuration)
                cells.append(f"{t:.2f} ± {sd:.2f}")
            else:
                cells.append("-")
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def pareto_mask(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Which points are Pareto-optimal when both coordinates are maximised (not strictly dominated by another)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        keep[i] = not dominated.any()
    return keep


def pareto_plot(
    series: Mapping[str, Sequence[tuple[float, float, float]]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str = "ID",
    title: str = "",
    size: tuple[int, int] = (640, 480),
    dpi: int = 100,
) -> Path:
    """One line per method through its (x, y, ip_scale) points in ip-scale order, points labelled with the scale;
    the Pareto front of all points (both axes maximised) is ringed. A PNG of exactly ``size`` pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    all_pts = []
    for method in sorted(series, key=_method_rank):
        pts = sorted(series[method], key=lambda p: p[2])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", label=METHOD_LABELS.get(method, method))
        for px, py, scale in pts:
            ax.annotate(f"{scale:g}", (px, py), textcoords="offset points", xytext=(3, 3), fontsize=7)
        all_pts += pts
    if all_pts:
        mask = pareto_mask([p[0] for p in all_pts], [p[1] for p in all_pts])
        front = [p for p, m in zip(all_pts, mask) if m]
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=140, facecolors="none", edgecolors="black",
                   linewidths=1.0, label="Pareto front")
    ax.set_xlabel(f"{xlabel} (↑)")
    ax.set_ylabel(f"{ylabel} (↑)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def plot_pareto_fronts(table: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                       x_metrics: Sequence[str] = ("clip", "ae"), **kw: Any) -> list[Path]:
    """ID against each of ``x_metrics`` over the ip-scale sweep: one PNG per (preset, adapter, LoRA scale, steps,
    subset, x metric) that has at least two ip scales of one method."""
    out = []
    keyf = lambda r: (r["preset"], r["adapter"], float(r["lora_scale"]), int(r["steps"]), r["subset"])  # noqa: E731
    for key in sorted({keyf(r) for r in table}):
        rows = [r for r in table if keyf(r) == key]
        for xm in x_metrics:
            series: dict[str, list[tuple[float, float, float]]] = {}
            for r in rows:
                if r["id"] is not None and r[xm] is not None:
                    series.setdefault(r["method"], []).append((r[xm], r["id"], float(r["ip_scale"])))
            if not any(len(v) > 1 for v in series.values()):
                continue
            preset, adapter, lora, steps, subset = key
            name = f"pareto_id_{xm}_{preset}_{adapter}_lora{lora:g}_{steps}steps_{subset}.png"
            title = f"{preset} + {adapter}, lora_scale={lora:g}, {steps} steps, {subset}"
            out.append(pareto_plot(series, Path(out_dir) / name, xlabel=LABELS[xm], title=title, **kw))
    return out


def _fit(image: Image.Image, tile: int) -> Image.Image:
    """Letterbox an image into a ``tile`` x ``tile`` square (aspect kept, dark background)."""
    im = image.convert("RGB")
    scale = tile / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (tile, tile), (32, 32, 32))
    canvas.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return canvas


def image_grid(
    rows: Sequence[tuple[str, Sequence[str | os.PathLike | Image.Image | None]]],
    columns: Sequence[str],
    *,
    tile: int = 256,
    header: int = 24,
    caption: int = 20,
) -> Image.Image:
    """A grid a person can read: a header with the column names, then per row ``tile``-sized images side by side
    (missing ones grey with "missing") over a caption line (e.g. identity and prompt).

    ``rows``: ``(caption, [image or path or None per column])``. Size: ``(tile * len(columns),
    header + len(rows) * (tile + caption))``.
    """
    if not rows or not columns:
        raise ValueError("an image grid needs at least one row and one column")
    width, height = tile * len(columns), header + len(rows) * (tile + caption)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(columns):
        draw.text((j * tile + 4, 4), str(name), fill=(0, 0, 0))
    for i, (text, images) in enumerate(rows):
        if len(images) != len(columns):
            raise ValueError(f"grid row {i} has {len(images)} images for {len(columns)} columns")
        top = header + i * (tile + caption)
        for j, im in enumerate(images):
            if im is None or (not isinstance(im, Image.Image) and not Path(im).is_file()):
                cell = Image.new("RGB", (tile, tile), (160, 160, 160))
                ImageDraw.Draw(cell).text((8, tile // 2), "missing", fill=(0, 0, 0))
            elif isinstance(im, Image.Image):
                cell = _fit(im, tile)
            else:
                with Image.open(im) as src:
                    cell = _fit(src, tile)
            grid.paste(cell, (j * tile, top))
        max_chars = max(8, width // 7)
        shown = text if len(text) <= max_chars else text[: max_chars - 3] + "..."
        draw.text((4, top + tile + 4), shown, fill=(0, 0, 0))
    return grid
