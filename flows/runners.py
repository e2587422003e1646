"""Where a pipeline's nodes run: Prefect's thread pool in the flow's own process, or a Dask cluster.

In a spec (or ``gsr run --runner threads|dask|dask://HOST:PORT``, which replaces the spec's ``runner``)::

    runner: {kind: threads}                                   # the default
    runner: {kind: dask, n_workers: 2, threads_per_worker: 1} # a local cluster of worker processes, for this run
    runner: {kind: dask, n_workers: 1, resources: {GPU: 1}}   # ... whose workers each offer one GPU
    runner: {kind: dask, address: tcp://10.0.0.5:8786}        # an existing scheduler and its workers

Either way every node is the same Prefect task with the same cache key, writing to the same store, so outputs
and cache hits do not depend on the runner. Dask workers import the node registry (``tasks``) when they unpickle
a node's task, and talk to the flow's Prefect API: the API of the flow's settings, or, when the flow runs on
Prefect's ephemeral API, that server's address on this machine (so workers elsewhere need ``PREFECT_API_URL``
pointing at a server they can reach; see docs/pipelines.md, "Scaling out").

GPU placement: a node whose params ask for ``device: cuda`` (or ``cuda:N``) needs a worker that offers the
Dask resource ``GPU``; one with ``device: auto`` asks for it too when some worker of the cluster offers it. Such
nodes are submitted under ``dask.annotate(resources={"GPU": 1})``, so the scheduler places them on GPU workers
only, one per GPU at a time. A node that needs a GPU the cluster does not offer is an error before anything runs.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from typing import Annotated, Any, Callable, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

GPU = "GPU"
_LOCAL_CLUSTER_KEYS = ("n_workers", "threads_per_worker", "resources")


class ThreadsRunner(BaseModel):
    """Nodes run in threads of the flow's process (Prefect's ``ThreadPoolTaskRunner``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["threads"] = "threads"


class DaskRunner(BaseModel):
    """Nodes run on a Dask cluster (prefect-dask's ``DaskTaskRunner``): a local one started for the run, or the
    scheduler at ``address``."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["dask"]
    address: str | None = Field(None, description="scheduler of an existing cluster, e.g. tcp://10.0.0.5:8786; "
                                                   "default: start a local cluster for the run")
    n_workers: int = Field(2, ge=1, description="local cluster: worker processes")
    threads_per_worker: int = Field(1, ge=1, description="local cluster: threads (concurrent nodes) per worker")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="local cluster: resources each worker offers, e.g. {GPU: 1}")

    @model_validator(mode="after")
    def _address_or_local(self) -> DaskRunner:
        local = sorted(set(_LOCAL_CLUSTER_KEYS) & self.model_fields_set)
        if self.address is not None and local:
            raise ValueError(f"{', '.join(local)} describe a local cluster and cannot go with `address` (an existing "
                             f"cluster's workers are started with their own options, e.g. "
                             f"`dask worker ADDRESS --nthreads 1 --resources GPU=1`)")
        return self


RunnerSpec = Annotated[Union[ThreadsRunner, DaskRunner], Field(discriminator="kind")]


def runner_option(text: str) -> dict[str, Any]:
    """The ``runner`` a ``--runner`` value stands for: ``threads``, ``dask`` (a local cluster) or
    ``dask://HOST:PORT`` (the scheduler at tcp://HOST:PORT)."""
    if text in ("threads", "dask"):
        return {"kind": text}
    match = re.fullmatch(r"dask://([^/:\s]+):(\d+)", text)
    if match:
        return {"kind": "dask", "address": f"tcp://{match.group(1)}:{match.group(2)}"}
    raise ValueError(f"--runner {text!r}: expected threads, dask (a local cluster) or dask://HOST:PORT "
                     f"(an existing scheduler)")


def wants_gpu(params: dict[str, Any], cluster_has_gpu: bool) -> bool:
    """Whether a node with these (validated) params must run on a GPU worker: ``device`` is cuda[:N], or
    ``auto`` while the cluster offers GPUs."""
    device = params.get("device")
    if not isinstance(device, str):
        return False
    return device.startswith("cuda") or (device == "auto" and cluster_has_gpu)


Submit = Callable[[Any, Any, dict[str, Any]], Any]  # (planned node, its task, request) -> PrefectFuture


@contextmanager
def node_submitter(runner: ThreadsRunner | DaskRunner, nodes: list[Any]) -> Iterator[Submit]:
    """Inside a flow run: a ``submit(planned, task, request)`` that starts a node's task on ``runner``.

    The runner (for Dask, its cluster and client) lives until the block ends, so collect every result inside it.

    Args:
        runner: the spec's runner.
        nodes: the pipeline's planned nodes (``name``, ``params``), to check GPU needs before anything runs.

    Raises:
        ValueError naming the nodes that need a GPU the cluster does not offer.
    """
    if isinstance(runner, ThreadsRunner):
        yield lambda planned, task, request: task.submit(request=request)
        return
    import dask
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    with ExitStack() as stack:
        if not PREFECT_API_URL.value():  # the ephemeral API: workers must reach this process's server
            api_url = str(get_client(sync_client=True).api_url).rstrip("/")
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        if runner.address is not None:
            task_runner = DaskTaskRunner(address=runner.address)
        else:
            task_runner = DaskTaskRunner(cluster_kwargs={
                "n_workers": runner.n_workers, "threads_per_worker": runner.threads_per_worker,
                "processes": True, "resources": dict(runner.resources), "dashboard_address": ":0"})
        stack.enter_context(task_runner)
        if runner.address is not None:
            workers = task_runner.client.scheduler_info(n_workers=-1)["workers"].values()
            has_gpu = any(worker.get("resources", {}).get(GPU, 0) >= 1 for worker in workers)
            where = f"the Dask cluster at {runner.address}"
        else:
            has_gpu = runner.resources.get(GPU, 0) >= 1
            where = "the local Dask cluster (runner.resources has no GPU)"
        on_gpu = {planned.name for planned in nodes if wants_gpu(planned.params, has_gpu)}
        if on_gpu and not has_gpu:
            raise ValueError(f"node(s) {sorted(on_gpu)} ask for a CUDA device, but no worker of {where} offers the "
                             f"Dask resource {GPU}; start workers with `--resources {GPU}=1`, or set "
                             f"runner.resources: {{{GPU}: 1}} for a local cluster")

        def submit(planned: Any, task: Any, request: dict[str, Any]) -> Any:
            if planned.name in on_gpu:
                with dask.annotate(resources={GPU: 1}):
                    return task_runner.submit(task, {"request": request})
            return task_runner.submit(task, {"request": request})

        yield submit
