"""Every spec shipped in pipelines/ validates: node types, params, ports and the graph, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.spec import load_pipeline
from gsr_core.priors.sources import builtin_folder
from tests.conftest import SHARED_DATA

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_shipped_spec_validates(path: Path):
    if "../shared/data" in path.read_text() and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} reads the shared data folder {SHARED_DATA}, which is absent")
    pipeline = load_pipeline(path)
    assert pipeline.nodes, f"{path.name} has no nodes"
    for planned in pipeline.nodes:
        source = planned.params.get("source")
        if isinstance(source, str) and source.startswith("builtin:"):
            assert (builtin_folder(source.split(":", 1)[1]) / "prior.json").is_file()
