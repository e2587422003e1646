"""Output kinds that flow between nodes, and how a node receives an input of each kind."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gsr_core.data.views import Views
from gsr_core.gaussians import Gaussians

GAUSSIANS_FILE = "gaussians.ply"
FIT_FILE = "fit.json"


@dataclass
class StoredGaussians(Gaussians):
    """The Gaussians of a ``gaussians`` output folder, with what the node that made them recorded in ``fit.json``
    (``stats``: e.g. ``seconds``, ``num_gaussians``; empty when the folder has no ``fit.json``)."""

    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> "StoredGaussians":
        gaussians = cls.load_ply(folder / GAUSSIANS_FILE)
        path = folder / FIT_FILE
        if path.is_file():
            try:
                gaussians.stats = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from error
        return gaussians


KINDS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "views": ("posed images + cameras (a views folder)", Views.read),
    "gaussians": ("a 3DGS scene (gaussians.ply in the Inria layout, fit.json)", StoredGaussians.read),
    "prior": ("a diffusion super-resolution prior folder (prior.json names its kind; gsr_core.priors.load_prior)",
              lambda folder: folder),
    "metrics": ("an evaluation report (metrics.json, metrics.csv, comparison.png)", lambda folder: folder),
    "history": ("a run's place in the metric history (regressions.json, history.csv, history.png)",
                lambda folder: folder),
}


def load_input(ref: dict[str, Any], store_root: Path) -> Any:
    """The object a node receives for one input reference (e.g. ``Views`` for kind ``views``)."""
    _, load = KINDS[ref["kind"]]
    return load(Path(store_root) / ref["path"])
