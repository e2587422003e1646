"""Output kinds that flow between nodes, and how a node receives an input of each kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from gsr_core.data.views import Views
from gsr_core.gaussians import Gaussians

GAUSSIANS_FILE = "gaussians.ply"

KINDS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "views": ("posed images + cameras (a views folder)", Views.read),
    "gaussians": ("a 3DGS scene (gaussians.ply in the Inria layout, fit.json)",
                  lambda folder: Gaussians.load_ply(folder / GAUSSIANS_FILE)),
    "metrics": ("an evaluation report (metrics.json, metrics.csv, comparison.png)", lambda folder: folder),
}


def load_input(ref: dict[str, Any], store_root: Path) -> Any:
    """The object a node receives for one input reference (e.g. ``Views`` for kind ``views``)."""
    _, load = KINDS[ref["kind"]]
    return load(Path(store_root) / ref["path"])
