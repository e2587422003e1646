"""Sweeps: a spec's ``matrix:`` expanded into plain nodes, before the graph is validated.

A matrix names axes, each with named values; nodes mention axes with ``${...}`` placeholders::

    matrix:
      scene: {tiles: {name: tiles}, glyphs: {name: glyphs}}   # label -> value (any YAML value)
      iters: [100, 300]                                       # a list: each value is its own label
    nodes:
      ${scene}_hr:           {task: synthetic_scene, params: {name: "${scene.name}"}}
      ${scene}_lr:           {task: downsample, inputs: {views: "${scene}_hr"}, params: {factor: 4}}
      ${scene}_gs_${iters}:  {task: fit_gaussians, inputs: {views: "${scene}_lr"}, params: {iterations: "${iters}"}}
      ${scene}:              {task: evaluate, inputs: {reference: "${scene}_hr", candidates: ["${scene}_gs_${*iters}"]}}

Rules:

* A node is instantiated once per combination of the values of the axes it mentions (in its name, task, inputs or
  params), and only those: above, ``${scene}_lr`` exists once per scene and feeds every fit of that scene.
* Every axis a node varies over must appear in its name, so each instance has its own name
  (``tiles_gs_100``, ``tiles_gs_300``, ...). Instances follow the spec's node order, then the matrix's axis order.
* ``${axis}`` is the value's label in names, inputs and inside longer text. A param that is exactly one
  placeholder takes the value itself: ``"${iters}"`` is the number 100, not the text "100".
* ``${axis.key}`` is a field of a mapping value (``${scene.name}``), also nested (``${scene.camera.fov}``).
* ``${*axis}`` in an input gathers: the entry becomes one entry per value of the axis (in matrix order), so a
  list port (e.g. evaluate's ``candidates``) can take every instance of a node. A gathered axis does not make
  the node vary.

Mistakes (an unknown axis or key, a malformed placeholder, an axis missing from a node's name, two nodes
expanding to one name, an axis no node mentions) are reported together, each naming the node and the key.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

_PLACEHOLDER = re.compile(r"\$\{([^{}]*)\}")
_REFERENCE = re.compile(r"(\*?)([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z0-9_-]+)*)")
_AXIS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"[A-Za-z0-9_-]+")
_SCALARS = (str, int, float, bool)


class MatrixError(ValueError):
    """A matrix or a placeholder that cannot be expanded; ``problems`` lists each, naming the node and key."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Axis:
    """One axis of the matrix: its values in order, each with the label used in node names."""

    name: str
    labels: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class _Reference:
    """One ``${...}`` placeholder: ``${axis}``, ``${axis.key.key}`` or (gathering) ``${*axis}``."""

    text: str
    axis: str
    keys: tuple[str, ...]
    gather: bool


def read_axes(matrix: Any) -> dict[str, Axis]:
    """The axes of a ``matrix:`` mapping (see the module docstring); raises ``MatrixError``."""
    if not isinstance(matrix, dict):
        raise MatrixError([f"matrix: expected a mapping axis -> values, got {type(matrix).__name__}"])
    axes, problems = {}, []
    for name, raw in matrix.items():
        where = f"matrix.{name}"
        if not isinstance(name, str) or not _AXIS_NAME.fullmatch(name):
            problems.append(f"{where}: axis names are letters, digits and _ (not starting with a digit)")
            continue
        if isinstance(raw, dict):
            labels, values = [str(label) for label in raw], list(raw.values())
        elif isinstance(raw, list):
            bad = [value for value in raw if not isinstance(value, _SCALARS)]
            if bad:
                problems.append(f"{where}: a list axis takes plain values (text, numbers), got {bad[0]!r}; "
                                f"give mappings labels instead, e.g. {name}: {{a: {{...}}, b: {{...}}}}")
                continue
            labels = [value if isinstance(value, str) else json.dumps(value) for value in raw]
            values = list(raw)
        else:
            problems.append(f"{where}: expected a list of values or a mapping label -> value, "
                            f"got {type(raw).__name__} {raw!r:.60}")
            continue
        if not labels:
            problems.append(f"{where}: an axis needs at least one value")
            continue
        unusable = [label for label in labels if not _LABEL.fullmatch(label)]
        if unusable:
            problems.append(f"{where}: {unusable[0]!r} cannot be part of a node name (letters, digits, _ and - "
                            f"only); label the values instead, e.g. {name}: {{small: 0.5, large: 2.0}}")
            continue
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            problems.append(f"{where}: lists {repeated} more than once")
            continue
        axes[name] = Axis(name, tuple(labels), tuple(values))
    if problems:
        raise MatrixError(problems)
    return axes


def _parse(inner: str) -> _Reference | None:
    """The reference inside ``${...}``, or None when it is malformed."""
    match = _REFERENCE.fullmatch(inner)
    if match is None:
        return None
    return _Reference("${" + inner + "}", match.group(2), tuple(filter(None, match.group(3).split("."))),
                      match.group(1) == "*")


def _references(text: str) -> list[_Reference]:
    """The well-formed references in ``text``, in order (a scanned template has no malformed ones)."""
    return [reference for reference in map(_parse, _PLACEHOLDER.findall(text)) if reference]


def _field(axis: Axis, index: int, keys: tuple[str, ...]) -> Any:
    """Value ``index`` of ``axis``, or its field at ``keys``; LookupError naming what is missing."""
    value = axis.values[index]
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            path = ".".join((axis.name,) + keys[:depth + 1])
            found = f"keys {sorted(value)}" if isinstance(value, dict) else f"the value {value!r:.40}"
            raise LookupError(f"value {axis.labels[index]!r} of axis {axis.name!r} has no {path!r} ({found})")
        value = value[key]
    return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class _Template:
    """One node as written: its placeholders, checked, and its instances.

    Args:
        name, body: the node's name and body (``task``, ``inputs``, ``params``) as written (types checked).
        axes: the matrix.
        problems: where the node's problems are appended, each prefixed with the node's name.
    """

    def __init__(self, name: str, body: dict[str, Any], axes: dict[str, Axis], problems: list[str]):
        self.name, self.body, self.axes = name, body, axes
        self.mentioned: dict[str, str] = {}  # axis the node varies over -> where it is first mentioned
        self.gathered: set[str] = set()
        own: list[str] = []
        self._scan(name, "name", "text", own)
        self._scan(body.get("task"), "task", "text", own)
        for port, value in (body.get("inputs") or {}).items():
            entries = value if isinstance(value, list) else [value]
            for index, entry in enumerate(entries):
                where = f"inputs.{port}" + (f"[{index}]" if isinstance(value, list) else "")
                self._scan(entry, where, "input", own)
        self._scan(body.get("params"), "params", "param", own)
        named = {reference.axis for reference in _references(name)}
        for axis, where in self.mentioned.items():
            if axis not in named:
                own.append(f"{where}: mentions axis {axis!r}, which the node's name does not; each instance needs "
                           f"its own name, e.g. '{name}_${{{axis}}}' (or gather it with ${{*{axis}}} in a list "
                           f"input)")
            if axis in self.gathered:
                own.append(f"{where}: both varies over axis {axis!r} and gathers it (${{*{axis}}})")
        problems.extend(f"node {name!r}: {problem}" for problem in own)

    def _scan(self, value: Any, where: str, context: str, problems: list[str]) -> None:
        """Check every placeholder in ``value``; ``context`` is "text", "input" (may gather) or "param" (a whole
        placeholder may stand for any value)."""
        if isinstance(value, dict):
            for key, item in value.items():
                self._scan(item, f"{where}.{key}", context, problems)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                self._scan(item, f"{where}[{index}]", context, problems)
        elif isinstance(value, str):
            self._scan_text(value, where, context, problems)

    def _scan_text(self, text: str, where: str, context: str, problems: list[str]) -> None:
        found = _PLACEHOLDER.findall(text)
        if text.count("${") != len(found):
            problems.append(f"{where}: {text!r} has an unclosed or nested '${{'")
        whole = context == "param" and _PLACEHOLDER.fullmatch(text) is not None
        for inner in found:
            reference = _parse(inner)
            if reference is None:
                problems.append(f"{where}: malformed placeholder '${{{inner}}}'; expected ${{axis}}, ${{axis.key}} "
                                f"or, in inputs, ${{*axis}}")
                continue
            axis = self.axes.get(reference.axis)
            if axis is None:
                known = f"the matrix has axes {', '.join(self.axes)}" if self.axes else "the spec has no matrix"
                problems.append(f"{where}: unknown axis {reference.axis!r} in {reference.text!r}; {known}")
                continue
            if reference.gather and context != "input":
                problems.append(f"{where}: {reference.text!r} gathers a list, which only inputs can take")
                continue
            problem = self._value_problem(axis, reference, whole)
            if problem:
                problems.append(f"{where}: {reference.text!r}: {problem}")
            elif reference.gather:
                self.gathered.add(reference.axis)
            else:
                self.mentioned.setdefault(reference.axis, where)

    @staticmethod
    def _value_problem(axis: Axis, reference: _Reference, whole: bool) -> str | None:
        """Why ``reference`` cannot be substituted for some value of ``axis`` (None when it always can)."""
        for index in range(len(axis.values)):
            try:
                value = _field(axis, index, reference.keys)
            except LookupError as error:
                return str(error)
            if reference.keys and not whole and not isinstance(value, _SCALARS):
                return (f"is a {type(value).__name__} for value {axis.labels[index]!r}, which cannot be part of a "
                        f"text; use it as a whole param value")
        return None

    def instances(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, body) of every instance, in the matrix's axis order."""
        varying = [axis for axis in self.axes if axis in self.mentioned]
        result = []
        for indices in itertools.product(*(range(len(self.axes[axis].values)) for axis in varying)):
            binding = dict(zip(varying, indices))
            body = dict(self.body)
            body["task"] = self._text(body["task"], binding)
            body["inputs"] = {port: self._input(value, binding) for port, value in (body.get("inputs") or {}).items()}
            body["params"] = self._param(body.get("params") or {}, binding)
            result.append((self._text(self.name, binding), body))
        return result

    def _text(self, text: str, binding: dict[str, int]) -> str:
        """``text`` with each placeholder replaced by its label (``${axis}``) or field value as text."""
        def replace(match: re.Match) -> str:
            reference = _parse(match.group(1))
            axis, index = self.axes[reference.axis], binding[reference.axis]
            return _as_text(_field(axis, index, reference.keys)) if reference.keys else axis.labels[index]

        return _PLACEHOLDER.sub(replace, text)

    def _param(self, value: Any, binding: dict[str, int]) -> Any:
        if isinstance(value, dict):
            return {key: self._param(item, binding) for key, item in value.items()}
        if isinstance(value, list):
            return [self._param(item, binding) for item in value]
        if not isinstance(value, str):
            return value
        if _PLACEHOLDER.fullmatch(value):
            reference = _parse(value[2:-1])
            return _field(self.axes[reference.axis], binding[reference.axis], reference.keys)
        return self._text(value, binding)

    def _input(self, value: Any, binding: dict[str, int]) -> Any:
        """An input's upstream name(s); an entry that gathers becomes one name per value of the gathered axes."""
        if isinstance(value, list):
            return [name for entry in value for name in self._gather(entry, binding)]
        if any(reference.gather for reference in _references(value)):
            return self._gather(value, binding)
        return self._text(value, binding)

    def _gather(self, entry: str, binding: dict[str, int]) -> list[str]:
        gathered = [axis for axis in self.axes
                    if any(reference.gather and reference.axis == axis for reference in _references(entry))]
        plain = entry.replace("${*", "${")
        return [self._text(plain, {**binding, **dict(zip(gathered, indices))})
                for indices in itertools.product(*(range(len(self.axes[axis].values)) for axis in gathered))]


def expand_matrix(matrix: Any, nodes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The nodes of a spec with the matrix applied: every node replaced by its instances, in spec order.

    Args:
        matrix: the spec's ``matrix:`` value (``{}`` when it has none; a placeholder is then an error).
        nodes: node name -> node body (``task``, ``inputs``, ``params``), as written.

    Returns:
        expanded node name -> node body with every placeholder substituted. A node that mentions no axis is
        kept as it is.

    Raises:
        MatrixError listing every problem, each naming the node (as written) and the key.
    """
    axes = read_axes(matrix)
    problems: list[str] = []
    templates = [_Template(name, body, axes, problems) for name, body in nodes.items()]
    mentioned = {axis for template in templates for axis in (*template.mentioned, *template.gathered)}
    problems += [f"matrix.{axis}: no node mentions this axis (${{{axis}}})" for axis in axes if axis not in mentioned]
    if problems:
        raise MatrixError(problems)
    expanded: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for template in templates:
        for name, instance in template.instances():
            if name in expanded:
                problems.append(f"node {template.name!r}: expands to {name!r}, as node {origin[name]!r} does; "
                                f"add the axis that tells them apart to one of the names")
                continue
            expanded[name], origin[name] = instance, template.name
    if problems:
        raise MatrixError(problems)
    return expanded
