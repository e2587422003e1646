"""Evaluating candidate views against reference views: metrics per view and mean, as JSON, CSV and a picture.

Candidates are compared with the reference's views of one split (``test`` by default), matched by view name,
at the reference's resolution. LPIPS needs the AlexNet backbone weights; when they are absent the report says
so and why (``lpips.available`` false, ``lpips.reason``) and carries no LPIPS number.

``consistency`` (needs a geometry: a 3DGS whose depth gives correspondences) is the multi-view consistency error
of ``gsr_core.consistency``: view k's value is the error of the pair (k, its nearest other view of the split).
The report also ranks the candidates (by mean PSNR), gives each one's producing cost when its views say it
(``candidate_info``) and, given a baseline and an upper bound, its gap closure
``(PSNR - PSNR_baseline) / (PSNR_upper_bound - PSNR_baseline)``. ``docs/evaluation.md`` defines every figure.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gsr_core.comparison import comparison_image
from gsr_core.consistency import DEFAULT_DEPTH_TOLERANCE, DEFAULT_MIN_ALPHA, multiview_consistency, nearest_pairs
from gsr_core.data.views import Split, Views
from gsr_core.gaussians import Gaussians
from gsr_core.images import write_image
from gsr_core.lpips import LPIPSUnavailable, load_lpips
from gsr_core.metrics import psnr, ssim
from gsr_core.render_views import render_depths

METRICS = ("psnr", "ssim", "lpips", "consistency")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "consistency": False}


@dataclass
class Evaluation:
    """Metric values per candidate and view; ``lpips_reason`` explains a missing LPIPS.

    ``info``: candidate -> ``{"gaussians", "seconds"}`` (None where unknown); ``consistency``: how the
    consistency metric was set up (view pairs by name, depth tolerance, min alpha, co-visible fraction) and the
    reference's own score; ``baseline`` and ``upper_bound``: the candidates that gap closure runs between.
    """

    split: str
    metrics: list[str]
    views: list[str]
    values: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # candidate -> view -> metric
    lpips_available: bool = True
    lpips_reason: str = ""
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    consistency: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    upper_bound: str | None = None

    def mean(self, candidate: str) -> dict[str, float]:
        """Mean over views of each reported metric; views where a metric is undefined (NaN: a consistency pair
        with no co-visible pixel) are left out, and the mean is NaN only when every view's is."""
        per_view = self.values[candidate]
        means = {}
        for metric in self.reported_metrics:
            defined = [per_view[v][metric] for v in self.views if not math.isnan(per_view[v][metric])]
            means[metric] = sum(defined) / len(defined) if defined else math.nan
        return means

    @property
    def reported_metrics(self) -> list[str]:
        return [m for m in self.metrics if m != "lpips" or self.lpips_available]

    @property
    def ranked_by(self) -> str:
        """The metric candidates are ranked by: PSNR when reported, else the first reported metric."""
        return "psnr" if "psnr" in self.reported_metrics else self.reported_metrics[0]

    def ranking(self) -> list[str]:
        """Candidates from best to worst mean ``ranked_by`` (ties keep the candidates' order, NaN last)."""
        metric = self.ranked_by
        sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
        means = {name: self.mean(name)[metric] for name in self.values}
        return sorted(self.values, key=lambda name: (math.isnan(means[name]),
                                                      0.0 if math.isnan(means[name]) else sign * means[name]))

    def gap_closure(self) -> dict[str, float | None]:
        """Candidate -> ``(PSNR - PSNR_baseline) / (PSNR_upper_bound - PSNR_baseline)`` of the means; None where
        a term is not finite or the two ends are equal. Empty without a baseline and an upper bound."""
        if self.baseline is None or self.upper_bound is None:
            return {}
        psnrs = {name: self.mean(name)["psnr"] for name in self.values}
        low, span = psnrs[self.baseline], psnrs[self.upper_bound] - psnrs[self.baseline]
        usable = math.isfinite(low) and math.isfinite(span) and span != 0

        def closure(value: float) -> float | None:
            if not (usable and math.isfinite(value)):
                return None
            return 0.0 if value == low else (value - low) / span  # the baseline's is 0.0, never -0.0

        return {name: closure(value) for name, value in psnrs.items()}

    def to_json(self) -> dict:
        gaps = self.gap_closure()
        candidates = {}
        for name in self.values:
            entry: dict[str, Any] = {"mean": self.mean(name), "per_view": self.values[name]}
            if name in self.info:
                entry["info"] = self.info[name]
            if gaps:
                entry["gap_closure"] = gaps[name]
            candidates[name] = entry
        document: dict[str, Any] = {
            "split": self.split,
            "views": self.views,
            "metrics": self.reported_metrics,
            "lpips": {"requested": "lpips" in self.metrics, "available": self.lpips_available,
                      "reason": self.lpips_reason},
            "candidates": candidates,
            "ranked_by": self.ranked_by,
            "ranking": self.ranking(),
        }
        if gaps:
            document["gap_closure"] = {"baseline": self.baseline, "upper_bound": self.upper_bound}
        if self.consistency:
            document["consistency"] = self.consistency
        return document


def candidate_info(views: Views) -> dict[str, Any]:
    """``{"gaussians": N | None, "seconds": s | None}``: what produced a candidate, from its views' metadata.

    Renders of a 3DGS (``render_views``) carry ``source`` (the 3DGS's size and its fit or distillation wall
    time); per-view 2D SR (``upscale_views``) carries ``upscaled.seconds``. ``source`` wins when both are there
    (a 3DGS rendered at the cameras of upscaled views). Nodes downstream of these keep the metadata, so e.g. a
    bicubic upsampling of a 3DGS render reports that 3DGS.
    """
    source = views.metadata.get("source") or {}
    if source:
        return {"gaussians": source.get("num_gaussians"), "seconds": source.get("seconds")}
    return {"gaussians": None, "seconds": (views.metadata.get("upscaled") or {}).get("seconds")}


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


def _check_gap_ends(baseline: str | None, upper_bound: str | None, candidates: dict, metrics: list[str]) -> None:
    if upper_bound is None:
        return
    for name, value in (("upper_bound", upper_bound), ("baseline", baseline)):
        if value is None:
            raise ValueError(f"`baseline` must name a candidate when `upper_bound` ({upper_bound!r}) is set: gap "
                             f"closure runs from the baseline to the upper bound")
        if value not in candidates:
            raise ValueError(f"`{name}` {value!r} is not a candidate; candidates are {list(candidates)}")
    if "psnr" not in metrics:
        raise ValueError(f"gap closure (`upper_bound` {upper_bound!r}) is a PSNR ratio: `metrics` must include "
                         f"'psnr', got {metrics}")


def _consistency(reference: Views, records: list, candidates: dict[str, Views], matched: dict[str, list],
                 geometry: Gaussians, device: str, result: Evaluation) -> None:
    """Score every candidate's (and the reference's) consistency under ``geometry``'s depth, into ``result``."""
    cameras = [record.camera for record in records]
    if len(cameras) < 2:
        raise ValueError(f"`consistency` compares views with each other, but split {result.split!r} of the "
                         f"reference {reference.root} has {len(cameras)} view")
    pairs = nearest_pairs(cameras)
    depths, alphas = render_depths(geometry, cameras, device=device)

    def score(images: torch.Tensor) -> dict:
        return multiview_consistency(images, cameras, depths, alphas, pairs)

    for label, views in candidates.items():
        per_pair = score(views.load_rgb(matched[label]))["per_pair"]
        for record, pair in zip(records, per_pair):
            result.values[label][record.name]["consistency"] = pair["error"]
    own = score(reference.load_rgb(records))
    result.consistency = {
        "pairs": [[records[i].name, records[j].name] for i, j in pairs],
        "depth_tolerance": DEFAULT_DEPTH_TOLERANCE, "min_alpha": DEFAULT_MIN_ALPHA,
        "covisible_fraction": own["covisible_fraction"], "reference": own["error"],
    }


def evaluate_views(reference: Views, candidates: dict[str, Views], metrics: list[str], split: Split = "test",
                   lpips_weights: str | None = None, progress: Callable[[int], None] | None = None, *,
                   geometry: Gaussians | None = None, baseline: str | None = None, upper_bound: str | None = None,
                   device: str = "auto") -> Evaluation:
    """Compare each candidate with ``reference`` on the views of ``split``.

    Args:
        reference: the ground-truth views.
        candidates: label -> views to score (same view names, same size as the reference).
        metrics: a subset of ``METRICS``; ``consistency`` needs ``geometry``.
        lpips_weights: path of the torchvision AlexNet checkpoint; None looks in the torch hub cache.
        progress: called with 1 after each (candidate, view) pair.
        geometry: the 3DGS whose depth and opacity, rendered at the reference's cameras, give the correspondences
            of the consistency metric (the same for every candidate).
        baseline, upper_bound: candidate labels; with both, the report gives each candidate's gap closure.
        device: where the geometry is rendered ("auto": CUDA when available).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"`metrics` must be a non-empty subset of {list(METRICS)}, got {metrics}")
    if "consistency" in metrics and geometry is None:
        raise ValueError("`metrics` includes 'consistency', which needs a `geometry` (the 3DGS whose depth gives "
                         "the correspondences between views); none was given")
    if not candidates:
        raise ValueError("`candidates` must name at least one candidate")
    _check_gap_ends(baseline, upper_bound, candidates, list(metrics))
    records = reference.split(split)
    if not records:
        raise ValueError(f"reference {reference.root} has no views in split {split!r}")
    names = [r.name for r in records]
    result = Evaluation(split=split, metrics=list(metrics), views=names, baseline=baseline, upper_bound=upper_bound)
    lpips_model = None
    if "lpips" in metrics:
        try:
            lpips_model = load_lpips(lpips_weights)
        except LPIPSUnavailable as error:
            result.lpips_available, result.lpips_reason = False, str(error)
    matched = {label: _matched_candidate(reference, views, label, names) for label, views in candidates.items()}
    result.values = {label: {} for label in candidates}
    result.info = {label: candidate_info(views) for label, views in candidates.items()}
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
    if "consistency" in metrics:
        _consistency(reference, records, candidates, matched, geometry, device, result)
    return result


def _format(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"


def write_report(evaluation: Evaluation, reference: Views, candidates: dict[str, Views], out: Path,
                 comparison_views: int = 2) -> None:
    """Write ``metrics.json``, ``metrics.csv`` (one row per candidate and view, then the means) and
    ``comparison.png`` (reference and candidates side by side, with zoomed crops) into ``out``."""
    write_metrics(evaluation, out)
    shown = [reference.record(name) for name in evaluation.views[:comparison_views]]
    picture = comparison_image(reference.load_rgb(shown),
                               {label: views.load_rgb([views.record(r.name) for r in shown])
                                for label, views in candidates.items()})
    write_image(out / "comparison.png", picture)


def write_metrics(evaluation: Evaluation, out: Path) -> None:
    """Write ``metrics.json`` and ``metrics.csv`` (one row per candidate and view, then the means) into ``out``."""
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


def _cell(value: float | None, pattern: str) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else "nan" if math.isnan(value) else format(value, pattern)


def format_table(report: dict) -> str:
    """The mean metrics of a ``metrics.json`` document as an aligned text table, best values marked ``*``.

    Rows go from best to worst (``ranking``, when the document has one) with their rank; gap closure, Gaussian
    count and producing seconds get columns when the document has them (``-`` where unknown).
    """
    columns = report["metrics"]
    names = report.get("ranking") or list(report["candidates"])
    candidates = report["candidates"]
    best = {}
    for metric in columns:
        values = [v for v in (candidates[n]["mean"][metric] for n in names) if not math.isnan(v)]
        best[metric] = (max(values) if HIGHER_IS_BETTER[metric] else min(values)) if values else math.nan
    has_gap = "gap_closure" in report
    has_info = any("info" in candidates[n] for n in names)
    header = ["#", "candidate", *[m.upper() for m in columns]]
    header += ["GAP"] * has_gap + ["GAUSSIANS", "SECONDS"] * has_info
    lines = [header]
    for rank, name in enumerate(names, start=1):
        entry, mean = candidates[name], candidates[name]["mean"]
        row = [str(rank) if "ranking" in report else "", name]
        row += [_format(mean[m]) + ("*" if len(names) > 1 and mean[m] == best[m] else " ") for m in columns]
        if has_gap:
            row.append(_cell(entry.get("gap_closure"), ".3f"))
        if has_info:
            info = entry.get("info") or {}
            row += [_cell(info.get("gaussians"), "d"), _cell(info.get("seconds"), ".1f")]
        lines.append(row)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(widths[i]) if i in (0, 1) else cell.rjust(widths[i])
                               for i, cell in enumerate(row)).rstrip() for row in lines)
    ranked = f"; ranked by {report['ranked_by'].upper()}" if "ranked_by" in report else ""
    text += f"\n({report['split']} split, {len(report['views'])} views; * best{ranked})"
    if has_gap:
        ends = report["gap_closure"]
        text += (f"\nGAP: gap closure (PSNR - PSNR[{ends['baseline']}]) / "
                 f"(PSNR[{ends['upper_bound']}] - PSNR[{ends['baseline']}])")
    if "consistency" in report:
        setup = report["consistency"]
        text += (f"\nCONSISTENCY: mean |RGB difference| of views warped into their nearest neighbour by the"
                 f"\n  geometry's depth (lower is better; {setup['covisible_fraction']:.0%} of pixels co-visible; "
                 f"the reference scores {_cell(setup['reference'], '.4f')})")
    if has_info:
        text += "\nGAUSSIANS, SECONDS: size and fit/distillation (or 2D SR) wall time of the candidate's maker"
    if report["lpips"]["requested"] and not report["lpips"]["available"]:
        text += f"\nLPIPS unavailable: {report['lpips']['reason']}"
    return text
