"""Pipeline specs: YAML node graphs, ``--set`` overrides, and validation of the whole graph before any compute.

A spec::

    name: demo-x4
    description: optional text
    nodes:
      scene:  {task: synthetic_scene, params: {name: tiles, resolution: 256}}
      lowres: {task: downsample, inputs: {views: scene}, params: {factor: 4}}
    schedule: {cron: "0 3 * * *", timezone: Europe/Paris}   # optional: when `gsr serve` runs it
    runner: {kind: dask, n_workers: 2}                       # optional: where nodes run (flows/runners.py)
    matrix: {scene: [tiles, glyphs]}                         # optional: a sweep (flows/matrix.py); nodes then
                                                             # mention axes as ${scene}

A matrix is expanded before anything else is checked, so every message names the expanded nodes.

Validation reports unknown tasks, unknown or mistyped params, unknown or missing input ports, references to
nodes that do not exist, wrong port kinds, cycles and duplicate keys — each naming the node and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.schedules import Cron, Interval, Schedule
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.matrix import MatrixError, expand_matrix
from flows.runners import RunnerSpec, ThreadsRunner
from tasks import REGISTRY
from tasks.base import NodeType


class SpecError(ValueError):
    """A pipeline spec that cannot run; the message names the file, node and key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics, but a mapping with a repeated key is an error (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                                f"(first at line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="node type, one of `gsr nodes`")
    inputs: dict[str, str | list[str]] = Field(default_factory=dict, description="port -> upstream node name(s)")
    params: dict[str, Any] = Field(default_factory=dict, description="the node type's params")


class ScheduleSpec(BaseModel):
    """When `gsr serve` runs a spec: a cron expression or an interval, read in a time zone."""

    model_config = ConfigDict(extra="forbid")
    cron: str | None = Field(None, description="cron expression: minute hour day-of-month month day-of-week, "
                                               "e.g. '0 3 * * *' (03:00 every day)")
    interval: float | None = Field(None, gt=0, description="seconds between runs")
    timezone: str = Field("UTC", description="IANA time zone the schedule is read in, e.g. Europe/Paris")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                CronSchedule(cron=value)  # Prefect's own check: what passes here, the server schedules
            except ValidationError:
                raise ValueError(f"not a valid cron expression: {value!r}; expected five fields, minute hour "
                                 f"day-of-month month day-of-week, e.g. '0 3 * * *' (03:00 every day)") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"not an IANA time zone: {value!r}; e.g. UTC, Europe/Paris, America/New_York") from None
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleSpec:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give exactly one of `cron` (e.g. '0 3 * * *') or `interval` (seconds)")
        return self

    def to_prefect(self) -> Schedule:
        """The schedule as Prefect's deployment schedule."""
        if self.cron is not None:
            return Cron(self.cron, timezone=self.timezone)
        return Interval(timedelta(seconds=self.interval), timezone=self.timezone)

    def describe(self) -> str:
        when = f"cron {self.cron!r}" if self.cron is not None else f"every {self.interval:g} s"
        return f"{when}, time zone {self.timezone}"


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="pipeline name (letters, digits, _ . -)")
    description: str = ""
    nodes: dict[str, NodeSpec] = Field(min_length=1)
    schedule: ScheduleSpec | None = Field(None, description="when `gsr serve` runs the spec (cron or interval)")
    runner: RunnerSpec = Field(default_factory=ThreadsRunner, description="where nodes run: threads or dask")
    matrix: dict[str, Any] = Field(default_factory=dict, description="sweep axes -> values (flows/matrix.py)")


@dataclass(frozen=True)
class PlannedNode:
    """A validated node: its type, its params as validated JSON, and its inputs as upstream node names."""

    name: str
    node_type: NodeType
    params: dict[str, Any]
    inputs: dict[str, str | list[str]]

    def upstream(self) -> list[str]:
        names: list[str] = []
        for value in self.inputs.values():
            names.extend(value if isinstance(value, list) else [value])
        return names


@dataclass(frozen=True)
class Pipeline:
    """A validated spec: nodes in an order where every node follows its inputs."""

    name: str
    spec: dict[str, Any]
    nodes: list[PlannedNode]
    runner: RunnerSpec = field(default_factory=ThreadsRunner)

    def node(self, name: str) -> PlannedNode:
        for planned in self.nodes:
            if planned.name == name:
                return planned
        raise SpecError(f"pipeline {self.name!r} has no node {name!r}; nodes: {', '.join(n.name for n in self.nodes)}")


def read_spec(path: str | Path) -> dict[str, Any]:
    """Parse a spec file (safe YAML, duplicate keys rejected) into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file does not exist")
    try:
        with open(path) as handle:  # a file stream, so YAML's error marks name the file
            data = yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: YAML syntax error: {error}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a mapping with `name` and `nodes`, got {type(data).__name__}")
    return data


def apply_overrides(spec: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b.c=VALUE`` overrides (VALUE parsed as YAML) to a copy of ``spec``.

    Every part of the dotted path but the last must already exist, so a typo in a node name is an error.
    """
    result = yaml.safe_load(yaml.safe_dump(spec, sort_keys=False))  # keeps node and matrix order
    for override in overrides:
        if "=" not in override:
            raise SpecError(f"--set {override!r}: expected KEY=VALUE, e.g. nodes.lr_gs.params.iterations=200")
        dotted, raw = override.split("=", 1)
        parts = dotted.split(".")
        if not all(parts):
            raise SpecError(f"--set {override!r}: empty part in key {dotted!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise SpecError(f"--set {override!r}: value is not valid YAML: {error}") from None
        target = result
        for depth, part in enumerate(parts[:-1]):
            if part not in target:
                if depth < 2:  # top-level keys and node names must exist: a typo there is an error
                    raise SpecError(f"--set {override!r}: the spec has no {'.'.join(parts[:depth + 1])!r}")
                target[part] = {}
            target = target[part]
            if not isinstance(target, dict):
                raise SpecError(f"--set {override!r}: {'.'.join(parts[:depth + 1])!r} is not a mapping")
        target[parts[-1]] = value
    return result


def _pydantic_problems(error: ValidationError, prefix: str) -> list[str]:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        where = f"{prefix}.{location}" if location else prefix
        if item["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key")
        else:
            problems.append(f"{where}: {item['msg']} (got {item.get('input')!r:.80})")
    return problems


def validate(spec: dict[str, Any], source: str = "spec") -> Pipeline:
    """Check the whole graph; raise one ``SpecError`` listing every problem, each naming node and key."""
    try:
        pipeline_spec = PipelineSpec.model_validate(spec)
    except ValidationError as error:
        raise SpecError(f"{source}: invalid spec:\n  " + "\n  ".join(_pydantic_problems(error, "spec"))) from None
    try:
        expanded = expand_matrix(pipeline_spec.matrix, {name: node_spec.model_dump()
                                                        for name, node_spec in pipeline_spec.nodes.items()})
    except MatrixError as error:
        raise SpecError(f"{source}: invalid pipeline {pipeline_spec.name!r}:\n  "
                        + "\n  ".join(error.problems)) from None
    nodes = {name: NodeSpec.model_validate(body) for name, body in expanded.items()}
    problems: list[str] = []
    planned: dict[str, PlannedNode] = {}
    for name, node_spec in nodes.items():
        where = f"node {name!r}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            problems.append(f"{where}: node names use letters, digits, _ and - only")
        node_type = REGISTRY.get(node_spec.task)
        if node_type is None:
            problems.append(f"{where}: task: unknown task {node_spec.task!r}; known: {', '.join(sorted(REGISTRY))}")
            continue
        where = f"node {name!r} ({node_type.name})"
        try:
            params = node_type.params.model_validate(node_spec.params).model_dump(mode="json")
        except ValidationError as error:
            problems.extend(_pydantic_problems(error, f"{where}: params"))
            params = {}
        for port_name in node_spec.inputs:
            if port_name not in node_type.inputs:
                expected = ", ".join(node_type.inputs) or "none"
                problems.append(f"{where}: inputs.{port_name}: unknown input port; {node_type.name} takes: {expected}")
        inputs: dict[str, str | list[str]] = {}
        for port_name, port in node_type.inputs.items():
            value = node_spec.inputs.get(port_name)
            if value is None:
                if not port.optional:
                    problems.append(f"{where}: inputs.{port_name}: missing input "
                                    f"(expects {' or '.join(port.kinds)}{' list' if port.many else ''})")
                continue
            if port.many:
                inputs[port_name] = value if isinstance(value, list) else [value]
                repeated = sorted({v for v in inputs[port_name] if inputs[port_name].count(v) > 1})
                if repeated:
                    problems.append(f"{where}: inputs.{port_name}: lists {repeated} more than once")
            elif isinstance(value, list):
                problems.append(f"{where}: inputs.{port_name}: takes one node, got a list {value}")
                continue
            else:
                inputs[port_name] = value
        planned[name] = PlannedNode(name, node_type, params, inputs)
    for node_plan in planned.values():
        where = f"node {node_plan.name!r} ({node_plan.node_type.name})"
        for port_name, value in node_plan.inputs.items():
            port = node_plan.node_type.inputs[port_name]
            for upstream in value if isinstance(value, list) else [value]:
                if upstream == node_plan.name:
                    problems.append(f"{where}: inputs.{port_name}: a node cannot take its own output")
                elif upstream not in nodes:
                    problems.append(f"{where}: inputs.{port_name}: no node named {upstream!r}")
                elif upstream in planned and planned[upstream].node_type.output not in port.kinds:
                    problems.append(
                        f"{where}: inputs.{port_name}: expects {' or '.join(port.kinds)}, but node {upstream!r} "
                        f"({planned[upstream].node_type.name}) outputs {planned[upstream].node_type.output}")
    if problems:
        raise SpecError(f"{source}: invalid pipeline {pipeline_spec.name!r}:\n  " + "\n  ".join(problems))
    order = _topological_order(planned, source, pipeline_spec.name)
    return Pipeline(pipeline_spec.name, spec, [planned[name] for name in order], pipeline_spec.runner)


def _topological_order(planned: dict[str, PlannedNode], source: str, name: str) -> list[str]:
    """Spec order, moved only as far as dependencies require; a cycle is reported with its path."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(node_name: str, path: list[str]) -> None:
        if state.get(node_name) == "done":
            return
        if state.get(node_name) == "visiting":
            cycle = path[path.index(node_name):] + [node_name]
            raise SpecError(f"{source}: invalid pipeline {name!r}:\n  node {node_name!r}: inputs form a cycle: "
                            + " -> ".join(cycle))
        state[node_name] = "visiting"
        for upstream in planned[node_name].upstream():
            visit(upstream, path + [node_name])
        state[node_name] = "done"
        order.append(node_name)

    for node_name in planned:
        visit(node_name, [])
    return order


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> Pipeline:
    """Read, override and validate a spec file."""
    return validate(apply_overrides(read_spec(path), list(overrides)), source=str(path))
