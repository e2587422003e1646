"""Runners (flows/runners.py): the same pipeline on Prefect's threads and on a Dask cluster of worker processes gives
the same cache keys and byte-identical outputs, and each runner finds the other's outputs cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.pipeline import run_pipeline
from flows.runners import DaskRunner, runner_option, wants_gpu
from flows.spec import SpecError, validate
from tests.conftest import chain_spec


def test_runner_option_parses_the_three_forms():
    assert runner_option("threads") == {"kind": "threads"}
    assert runner_option("dask") == {"kind": "dask"}
    assert runner_option("dask://10.0.0.5:8786") == {"kind": "dask", "address": "tcp://10.0.0.5:8786"}
    with pytest.raises(ValueError, match=r"--runner 'dask:/x': expected threads, dask .* or dask://HOST:PORT"):
        runner_option("dask:/x")


def test_spec_runner_defaults_to_threads_and_rejects_mistakes(views_folder: Path):
    spec = chain_spec(views_folder)
    assert validate(spec).runner.kind == "threads"
    spec["runner"] = {"kind": "dask", "n_workers": 3, "resources": {"GPU": 1}}
    runner = validate(spec).runner
    assert isinstance(runner, DaskRunner) and runner.n_workers == 3 and runner.threads_per_worker == 1
    spec["runner"] = {"kind": "dask", "address": "tcp://127.0.0.1:8786", "n_workers": 2}
    with pytest.raises(SpecError, match="n_workers describe a local cluster and cannot go with `address`"):
        validate(spec)
    spec["runner"] = {"kind": "slurm"}
    with pytest.raises(SpecError, match=r"spec\.runner: .*'slurm'.*'threads', 'dask'"):
        validate(spec)
    spec["runner"] = {"kind": "threads", "n_workers": 2}
    with pytest.raises(SpecError, match=r"spec\.runner\.threads\.n_workers: unknown key"):
        validate(spec)


def test_gpu_nodes_are_those_asking_for_cuda_or_auto_on_a_gpu_cluster():
    assert wants_gpu({"device": "cuda"}, cluster_has_gpu=False)
    assert wants_gpu({"device": "cuda:1"}, cluster_has_gpu=False)
    assert wants_gpu({"device": "auto"}, cluster_has_gpu=True)
    assert not wants_gpu({"device": "auto"}, cluster_has_gpu=False)
    assert not wants_gpu({"device": "cpu"}, cluster_has_gpu=True)
    assert not wants_gpu({"factor": 4}, cluster_has_gpu=True)


def test_a_cuda_node_without_gpu_workers_fails_before_anything_runs(tmp_path: Path, views_folder: Path, prefect_api):
    spec = chain_spec(views_folder)
    spec["nodes"]["fit"] = {"task": "fit_gaussians", "inputs": {"views": "lowres"},
                            "params": {"iterations": 2, "device": "cuda"}}
    spec["runner"] = {"kind": "dask"}
    with pytest.raises(ValueError, match=r"node\(s\) \['fit'\] ask for a CUDA device, but no worker of the local "
                                         r"Dask cluster .* offers the Dask resource GPU"):
        run_pipeline(spec=spec, store=str(tmp_path / "store"))
    assert not list((tmp_path / "store" / "objects").iterdir())


def _without_wall_times(value):
    """A JSON value without its "seconds" entries: wall times differ from run to run under any runner."""
    if isinstance(value, dict):
        return {key: _without_wall_times(item) for key, item in value.items() if key != "seconds"}
    if isinstance(value, list):
        return [_without_wall_times(item) for item in value]
    return value


def _contents(store: Path, reports: list[dict]) -> dict[str, dict[str, object]]:
    """node -> {file: bytes (JSON files: parsed, without wall times)} of its output, bookkeeping files aside."""
    contents = {}
    for report in reports:
        folder = store / report["path"]
        contents[report["node"]] = {
            path.relative_to(folder).as_posix(): _without_wall_times(json.loads(path.read_text()))
            if path.suffix == ".json" else path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file() and not path.name.startswith("_")}
    return contents


def _digests(store: Path, reports: list[dict]) -> dict[str, str]:
    return {r["node"]: json.loads((store / r["path"] / "_complete.json").read_text())["digest"] for r in reports}


@pytest.fixture(scope="module")
def gpu_cluster():
    """An existing Dask cluster (reached by address) whose one worker offers a GPU resource; the worker runs in
    this process (the worker processes of a cluster are tested with the local cluster)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, resources={"GPU": 1},
                      dashboard_address=":0") as cluster:
        yield cluster


def test_dask_and_threads_give_the_same_keys_and_outputs_and_share_the_cache(tmp_path: Path, views_folder: Path,
                                                                            prefect_api, gpu_cluster):
    spec = chain_spec(views_folder)  # its evaluate node has device auto: a GPU node on a GPU cluster
    spec["nodes"]["fit"] = {"task": "fit_gaussians", "inputs": {"views": "lowres"}, "params": {"iterations": 3}}
    threads_store, dask_store = tmp_path / "threads", tmp_path / "dask"

    by_threads = run_pipeline(spec=spec, store=str(threads_store))
    local = {**spec, "runner": {"kind": "dask", "n_workers": 2, "threads_per_worker": 1}}
    by_dask = run_pipeline(spec=local, store=str(dask_store))
    assert {r["status"] for r in by_threads} == {r["status"] for r in by_dask} == {"ran"}
    assert [r["key"] for r in by_threads] == [r["key"] for r in by_dask]
    assert _contents(threads_store, by_threads) == _contents(dask_store, by_dask)  # identical Gaussians, images
    # Byte-identical outputs, except that a fit records its own wall time (fit.json "seconds").
    digests_threads, digests_dask = _digests(threads_store, by_threads), _digests(dask_store, by_dask)
    assert digests_threads.pop("fit") != digests_dask.pop("fit") and digests_threads == digests_dask

    # Each runner finds the other's outputs: threads on the Dask store, and a Dask cluster reached by address
    # (evaluate placed on its GPU worker) on the threads store.
    again_threads = run_pipeline(spec=spec, store=str(dask_store))
    remote = {**spec, "runner": {"kind": "dask", "address": gpu_cluster.scheduler_address}}
    again_dask = run_pipeline(spec=remote, store=str(threads_store))
    for reports in (again_threads, again_dask):
        assert {r["node"]: r["status"] for r in reports} == {r["node"]: "cached" for r in by_threads}
    assert [r["key"] for r in again_dask] == [r["key"] for r in by_threads]
