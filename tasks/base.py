"""Node types and the Prefect task that runs one node against the artifact store.

A node type is a function over gsr_core registered with ``@node``: typed input ports, one output kind, a
pydantic params model and a version. Each node type becomes one Prefect task. Tasks pass small JSON
references between each other (``{"kind", "key", "digest", "path", "node"}``), never tensors or images.

Caching (see DESIGN.md, "Caching and the artifact store"): the cache key is ours — node type, version,
params, the content digests of the inputs, and the gsr version (``gsr_core.store.cache_key``). The Prefect
cache policy returns exactly that key and keeps Prefect's result records in the store, so a rerun in a new
process finds them; before answering, it checks that the output folder is still present and intact, and
drops the record when it is not, so a deleted or corrupted output recomputes instead of reading as cached.

A node type registered with ``cache=False`` runs on every run (e.g. ``record_history``, whose job is a side
effect: appending the run to the history): its key also hashes a fresh run nonce, the store is never searched
for it, and its Prefect task has no cache policy.
"""

from __future__ import annotations

import sys
import time
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefect import Task
from prefect.cache_policies import NO_CACHE, CachePolicy
from pydantic import BaseModel, ConfigDict

import gsr_core
from gsr_core.store import Output, Store, cache_key
from tasks.kinds import load_input
from tasks.progress import NodeProgress


class NodeParams(BaseModel):
    """Base of every node's params model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Port:
    """An input port: which output kinds it accepts, and whether it takes a list of upstream nodes."""

    kinds: tuple[str, ...]
    many: bool = False
    optional: bool = False
    description: str = ""


@dataclass
class NodeContext:
    """What a running node may use besides its params and inputs."""

    node: str
    key: str
    store: Store

    @property
    def scratch(self) -> Path:
        """A folder for checkpoints that survives a crash of this node and is removed when it completes."""
        return self.store.scratch_dir(self.key)

    def progress(self, total: int, unit: str = "it") -> NodeProgress:
        """A progress bar for this node's long work (on stderr), mirrored into a Prefect progress artifact when
        the work lasts long enough (``tasks.progress``)."""
        return NodeProgress(total=total, desc=self.node, unit=unit, file=sys.stderr, mininterval=1.0, leave=False,
                            node=self.node)


@dataclass(frozen=True)
class NodeType:
    name: str
    description: str
    params: type[NodeParams]
    inputs: dict[str, Port]
    output: str
    version: int
    run: Callable[[Any, dict[str, Any], Path, NodeContext], None]
    extra_key: Callable[[Any], dict[str, Any]] | None = None
    summary: Callable[[Path], str] | None = None
    cache: bool = True
    alerts: Callable[[Path], list[str]] | None = None
    task: Task = field(init=False, repr=False, compare=False)


REGISTRY: dict[str, NodeType] = {}


def node(name: str, *, inputs: dict[str, Port], output: str, version: int,
         extra_key: Callable[[Any], dict[str, Any]] | None = None,
         summary: Callable[[Path], str] | None = None, cache: bool = True,
         alerts: Callable[[Path], list[str]] | None = None):
    """Register ``fn(params, inputs, out, ctx)`` as node type ``name``.

    ``fn`` writes its output into the folder ``out``; its docstring's first paragraph describes the node in
    ``gsr nodes``; its ``params`` annotation is the params model. ``extra_key(params)`` adds what the output
    depends on beyond params and inputs (e.g. the digest of a source folder); ``summary(folder)`` returns text
    that ``gsr run`` prints after the node (e.g. a metrics table). ``cache=False`` makes the node run on every
    run, never served from the store (for nodes whose job is a side effect, e.g. appending to the history).
    ``alerts(folder)`` returns what the node flagged in its own output (e.g. metric regressions), one line
    each; the pipeline reports them after the run and ends with ``PipelineAlert`` (``gsr run`` exit status 3).
    """

    def register(fn: Callable) -> Callable:
        params_model = typing.get_type_hints(fn)["params"]
        description = (fn.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        node_type = NodeType(name, description, params_model, inputs, output, version, fn, extra_key, summary,
                             cache, alerts)
        object.__setattr__(node_type, "task", _make_task(node_type))
        if name in REGISTRY:
            raise ValueError(f"node type {name!r} is registered twice")
        REGISTRY[name] = node_type
        return fn

    return register


def input_refs(node_type: NodeType, upstream: dict[str, Any], names: dict[str, Any] | None = None) -> dict[str, Any]:
    """Output references per port from the upstream task results (``{"ref": ..., ...}``) of a request.

    ``names`` (port -> upstream node name, or names for list ports) relabels each reference with the node that
    feeds it in this spec: a result served from Prefect's cache carries the name of whichever spec computed it
    first (two specs sharing an output would otherwise label an evaluate candidate by the other spec's name).
    """
    refs = {port: [result["ref"] for result in value] if node_type.inputs[port].many else value["ref"]
            for port, value in upstream.items()}
    for port, label in (names or {}).items():
        if port in refs:
            refs[port] = ([dict(ref, node=name) for ref, name in zip(refs[port], label)] if isinstance(label, list)
                          else dict(refs[port], node=label))
    return refs


def input_digests(node_type: NodeType, inputs: dict[str, Any]) -> dict[str, Any]:
    """The part of the cache key that comes from the inputs: digests, with upstream names for list ports."""
    material: dict[str, Any] = {}
    for port_name, port in node_type.inputs.items():
        if port_name not in inputs:
            continue
        value = inputs[port_name]
        material[port_name] = [[ref["node"], ref["digest"]] for ref in value] if port.many else value["digest"]
    return material


def request_key(node_type: NodeType, params: NodeParams, inputs: dict[str, Any], nonce: str | None = None) -> str:
    """The node's cache key; ``nonce`` (for ``cache=False`` node types) makes it unique to one run."""
    extra = node_type.extra_key(params) if node_type.extra_key else {}
    if nonce is not None:
        extra = {**extra, "nonce": nonce}
    return cache_key(node_type.name, node_type.version, params.model_dump(mode="json"),
                     input_digests(node_type, inputs), extra)


def output_ref(node_name: str, kind: str, output: Output, store: Store) -> dict[str, Any]:
    return {"kind": kind, "key": output.key, "digest": output.digest,
            "path": output.path.relative_to(store.root).as_posix(), "node": node_name}


def execute(request: dict[str, Any]) -> dict[str, Any]:
    """Run one node (the body of every node task).

    Args:
        request: ``{"node", "type", "params", "inputs": {port: result | [result]}, "store", "force"}``, where each
            result is what the upstream node's task returned.

    Returns:
        ``{"ref": <output reference>, "computed": bool, "seconds": float}``.
    """
    node_type = REGISTRY[request["type"]]
    store = Store(request["store"])
    params = node_type.params.model_validate(request["params"])
    refs = input_refs(node_type, request["inputs"], request.get("upstream"))
    key = request_key(node_type, params, refs, nonce=None if node_type.cache else uuid.uuid4().hex)
    if node_type.cache and not request.get("force"):
        found = store.lookup(key)
        if found is not None:
            return {"ref": output_ref(request["node"], node_type.output, found, store), "computed": False, "seconds": 0.0}
    store.remove_stale_tmp(key)
    loaded = {  # list ports arrive as {upstream node name: object}, in spec order
        port: {ref["node"]: load_input(ref, store.root) for ref in value} if node_type.inputs[port].many
        else load_input(value, store.root)
        for port, value in refs.items()
    }
    node_info = {"node": request["node"], "node_type": node_type.name, "node_version": node_type.version,
                 "params": params.model_dump(mode="json"), "inputs": refs,
                 "gsr_version": gsr_core.__version__}
    start = time.perf_counter()
    with store.writer(key, node_info) as out:
        node_type.run(params, loaded, out, NodeContext(request["node"], key, store))
        seconds = node_info["seconds"] = time.perf_counter() - start  # recorded in _node.json
    return {"ref": output_ref(request["node"], node_type.output, store.published(key), store),
            "computed": True, "seconds": seconds}


@dataclass
class NodeCachePolicy(CachePolicy):
    """Prefect cache policy over exactly gsr's cache key (see the module docstring)."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        request = inputs["request"]
        node_type = REGISTRY[request["type"]]
        params = node_type.params.model_validate(request["params"])
        key = request_key(node_type, params, input_refs(node_type, request["inputs"], request.get("upstream")))
        store = Store(request["store"])
        if store.lookup(key) is None:
            store.forget_record(key)
        return key


def _make_task(node_type: NodeType) -> Task:
    def run_node(request: dict[str, Any]) -> dict[str, Any]:
        return execute(request)

    run_node.__doc__ = node_type.description
    return Task(
        run_node,
        name=node_type.name,
        task_run_name="{request[node]}",
        cache_policy=NodeCachePolicy() if node_type.cache else NO_CACHE,
        persist_result=node_type.cache,
        result_serializer="json",
    )
