"""Evaluating candidate views against reference views: metrics per view and mean, as JSON, CSV and a picture.

Candidates are compared with the reference's views of one split (``test`` by default), matched by view name,
at the reference's resolution. LPIPS needs the AlexNet backbone weights; when they are absent the report says
so and why (``lpips.available`` false, ``lpips.reason``) and carries no LPIPS number.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gsr_core.comparison import comparison_image
from gsr_core.data.views import Split, Views
from gsr_core.images import write_image
from gsr_core.lpips import LPIPSUnavailable, load_lpips
from gsr_core.metrics import psnr, ssim

METRICS = ("psnr", "ssim", "lpips")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}


@dataclass
class Evaluation:
    """Metric values per candidate and view; ``lpips_reason`` explains a missing LPIPS."""

    split: str
    metrics: list[str]
    views: list[str]
    values: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # candidate -> view -> metric
    lpips_available: bool = True
    lpips_reason: str = ""

    def mean(self, candidate: str) -> dict[str, float]:
        per_view = self.values[candidate]
        return {metric: sum(per_view[v][metric] for v in self.views) / len(self.views)
                for metric in self.reported_metrics}

    @property
    def reported_metrics(self) -> list[str]:
        return [m for m in self.metrics if m != "lpips" or self.lpips_available]

    def to_json(self) -> dict:
        return {
            "split": self.split,
            "views": self.views,
            "metrics": self.reported_metrics,
            "lpips": {"requested": "lpips" in self.metrics, "available": self.lpips_available,
                      "reason": self.lpips_reason},
            "candidates": {name: {"mean": self.mean(name), "per_view": self.values[name]} for name in self.values},
        }


def _matched_candidate(reference: Views, candidate: Views, label: str, names: list[str]) -> list:
    records = []
    for name in names:
        try:
            record = candidate.record(name)
        except ValueError:
            raise ValueError(f"candidate {label!r} ({candidate.root}) has no view {name!r}, which the reference "
                             f"has in its evaluated split; candidates must render the reference's views") from None
        records.append(record)
    if (candidate.width, candidate.height) != (reference.width, reference.height):
        raise ValueError(f"candidate {label!r} ({candidate.root}) is {candidate.width}x{candidate.height} but the "
                         f"reference is {reference.width}x{reference.height}; evaluate compares at the reference's "
                         f"resolution (upsample or render the candidate at that size first)")
    return records


def evaluate_views(reference: Views, candidates: dict[str, Views], metrics: list[str], split: Split = "test",
                   lpips_weights: str | None = None, progress: Callable[[int], None] | None = None) -> Evaluation:
    """Compare each candidate with ``reference`` on the views of ``split``.

    Args:
        reference: the ground-truth views.
        candidates: label -> views to score (same view names, same size as the reference).
        metrics: a subset of ``METRICS``.
        lpips_weights: path of the torchvision AlexNet checkpoint; None looks in the torch hub cache.
        progress: called with 1 after each (candidate, view) pair.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"`metrics` must be a non-empty subset of {list(METRICS)}, got {metrics}")
    if not candidates:
        raise ValueError("`candidates` must name at least one candidate")
    records = reference.split(split)
    if not records:
        raise ValueError(f"reference {reference.root} has no views in split {split!r}")
    names = [r.name for r in records]
    result = Evaluation(split=split, metrics=list(metrics), views=names)
    lpips_model = None
    if "lpips" in metrics:
        try:
            lpips_model = load_lpips(lpips_weights)
        except LPIPSUnavailable as error:
            result.lpips_available, result.lpips_reason = False, str(error)
    matched = {label: _matched_candidate(reference, views, label, names) for label, views in candidates.items()}
    result.values = {label: {} for label in candidates}
    for index, ref_record in enumerate(records):
        truth = reference.load_rgb([ref_record])  # decoded once, scored against every candidate
        for label, views in candidates.items():
            guess = views.load_rgb([matched[label][index]])
            row: dict[str, float] = {}
            with torch.no_grad():
                if "psnr" in metrics:
                    row["psnr"] = float(psnr(guess, truth)[0])
                if "ssim" in metrics:
                    row["ssim"] = float(ssim(guess, truth)[0])
                if lpips_model is not None:
                    row["lpips"] = float(lpips_model(guess, truth)[0])
            result.values[label][ref_record.name] = row
            if progress:
                progress(1)
    return result


def _format(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"


def write_report(evaluation: Evaluation, reference: Views, candidates: dict[str, Views], out: Path,
                 comparison_views: int = 2) -> None:
    """Write ``metrics.json``, ``metrics.csv`` (one row per candidate and view, then the means) and
    ``comparison.png`` (reference and candidates side by side, with zoomed crops) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(evaluation.to_json(), indent=1, allow_nan=True))
    columns = evaluation.reported_metrics
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["candidate", "view", *columns])
        for label, per_view in evaluation.values.items():
            for view in evaluation.views:
                writer.writerow([label, view, *(_format(per_view[view][m]) for m in columns)])
        for label in evaluation.values:
            mean = evaluation.mean(label)
            writer.writerow([label, "mean", *(_format(mean[m]) for m in columns)])
    shown = [reference.record(name) for name in evaluation.views[:comparison_views]]
    picture = comparison_image(reference.load_rgb(shown),
                               {label: views.load_rgb([views.record(r.name) for r in shown])
                                for label, views in candidates.items()})
    write_image(out / "comparison.png", picture)


def format_table(report: dict) -> str:
    """The mean metrics of a ``metrics.json`` document as an aligned text table, best values marked ``*``."""
    columns = report["metrics"]
    names = list(report["candidates"])
    best = {}
    for metric in columns:
        values = [report["candidates"][n]["mean"][metric] for n in names]
        best[metric] = max(values) if HIGHER_IS_BETTER[metric] else min(values)
    header = ["candidate", *[m.upper() for m in columns]]
    lines = [header]
    for name in names:
        mean = report["candidates"][name]["mean"]
        lines.append([name, *[_format(mean[m]) + ("*" if len(names) > 1 and mean[m] == best[m] else " ")
                              for m in columns]])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)) for row in lines)
    text += f"\n({report['split']} split, {len(report['views'])} views; * best)"
    if report["lpips"]["requested"] and not report["lpips"]["available"]:
        text += f"\nLPIPS unavailable: {report['lpips']['reason']}"
    return text
