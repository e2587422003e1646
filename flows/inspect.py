"""What `gsr show` and `gsr nodes` print: a pipeline's graph with cache status, and the node catalogue."""

from __future__ import annotations

import typing
from typing import Any

from pydantic.fields import FieldInfo

from flows.spec import Pipeline
from gsr_core.store import Store
from tasks import REGISTRY
from tasks.base import NodeType, output_ref, request_key


def cache_status(pipeline: Pipeline, store: Store) -> dict[str, tuple[str, str | None]]:
    """Per node: ("cached", key) when its output is in the store, ("not cached", key) when it would run,
    ("not cached", None) when its key cannot be known yet because an upstream node must run first, or
    ("always runs", None) for a node type that is never cached (``cache=False``)."""
    status: dict[str, tuple[str, str | None]] = {}
    results: dict[str, dict[str, Any]] = {}
    for planned in pipeline.nodes:
        if not planned.node_type.cache:
            status[planned.name] = ("always runs", None)
            continue
        if any(name not in results for name in planned.upstream()):
            status[planned.name] = ("not cached", None)
            continue
        refs = {port: [results[n] for n in value] if isinstance(value, list) else results[value]
                for port, value in planned.inputs.items()}
        key = request_key(planned.node_type, planned.node_type.params.model_validate(planned.params), refs)
        found = store.lookup(key)
        if found is None:
            status[planned.name] = ("not cached", key)
        else:
            status[planned.name] = ("cached", key)
            results[planned.name] = output_ref(planned.name, planned.node_type.output, found, store)
    return status


def format_graph(pipeline: Pipeline, store: Store) -> str:
    status = cache_status(pipeline, store)
    width = max(len(planned.name) for planned in pipeline.nodes)
    lines = [f"pipeline {pipeline.name} ({len(pipeline.nodes)} nodes), store {store.root}"]
    for planned in pipeline.nodes:
        state, key = status[planned.name]
        feeds = ", ".join(f"{port}<-{'+'.join(value) if isinstance(value, list) else value}"
                          for port, value in planned.inputs.items())
        waits = state == "not cached" and key is None
        where = f"objects/{key}" if state == "cached" else ("(waits for upstream)" if waits else "")
        lines.append(f"  {planned.name.ljust(width)}  {planned.node_type.name:<16} {state:<11} "
                     f"{feeds or '-':<40} {where}".rstrip())
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    return text or str(annotation).replace("typing.", "")


def _param_line(name: str, field: FieldInfo) -> str:
    default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
    return f"      {name}: {_type_name(field.annotation)}  ({default})  {field.description or ''}".rstrip()


def format_node_type(node_type: NodeType) -> str:
    lines = [f"{node_type.name} -> {node_type.output}", f"    {node_type.description}"]
    if node_type.inputs:
        lines.append("    inputs:")
        for port_name, port in node_type.inputs.items():
            kinds = " or ".join(port.kinds) + (" (list of nodes)" if port.many else "")
            optional = ", optional" if port.optional else ""
            lines.append(f"      {port_name}: {kinds}{optional}  {port.description}".rstrip())
    else:
        lines.append("    inputs: none")
    lines.append("    params:")
    lines.extend(_param_line(name, field) for name, field in node_type.params.model_fields.items())
    return "\n".join(lines)


def format_catalogue() -> str:
    return "\n\n".join(format_node_type(REGISTRY[name]) for name in sorted(REGISTRY))
