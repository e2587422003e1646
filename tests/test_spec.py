"""Spec validation: every bad spec fails before any compute with one message naming the node and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main
from flows.spec import SpecError, apply_overrides, load_pipeline, validate
from tests.conftest import chain_spec, write_spec


def problems_of(spec: dict) -> str:
    with pytest.raises(SpecError) as caught:
        validate(spec, source="spec.yaml")
    return str(caught.value)


def test_valid_chain_is_ordered_with_inputs_first(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"] = dict(reversed(list(spec["nodes"].items())))  # written downstream-first
    pipeline = validate(spec)
    order = [planned.name for planned in pipeline.nodes]
    assert order.index("scene") < order.index("lowres") < order.index("bicubic") < order.index("report")
    assert pipeline.node("lowres").params == {"factor": 4, "filter": "area"}  # defaults filled in


def test_unknown_task_names_node_and_known_tasks(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"]["lowres"]["task"] = "downsampel"
    message = problems_of(spec)
    assert "node 'lowres'" in message and "unknown task 'downsampel'" in message and "downsample" in message


def test_unknown_param_names_node_and_key(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"]["lowres"]["params"] = {"factr": 4}
    message = problems_of(spec)
    assert "node 'lowres' (downsample): params.factr: unknown key" in message


def test_mistyped_param_names_node_key_and_value(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"]["lowres"]["params"] = {"factor": "four"}
    message = problems_of(spec)
    assert "node 'lowres' (downsample): params.factor" in message and "'four'" in message


def test_param_out_of_range(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"]["lowres"]["params"] = {"factor": 0}
    assert "params.factor" in problems_of(spec)


def test_missing_input(views_folder: Path):
    spec = chain_spec(views_folder)
    del spec["nodes"]["lowres"]["inputs"]
    assert "node 'lowres' (downsample): inputs.views: missing input" in problems_of(spec)


def test_input_from_unknown_node(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"]["lowres"]["inputs"] = {"views": "scen"}
    assert "node 'lowres' (downsample): inputs.views: no node named 'scen'" in problems_of(spec)


def test_unknown_input_port(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"]["lowres"]["inputs"]["images"] = "scene"
    assert "node 'lowres' (downsample): inputs.images: unknown input port" in problems_of(spec)


def test_wrong_port_kind(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"]["again"] = {"task": "downsample", "inputs": {"views": "report"}}
    message = problems_of(spec)
    assert "node 'again' (downsample): inputs.views: expects views, but node 'report' (evaluate) outputs metrics" in message


def test_cycle_is_reported_with_its_path(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"]["lowres"]["inputs"] = {"views": "bicubic"}
    message = problems_of(spec)
    assert "inputs form a cycle" in message
    assert "lowres -> bicubic -> lowres" in message or "bicubic -> lowres -> bicubic" in message


def test_self_input(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"]["lowres"]["inputs"] = {"views": "lowres"}
    assert "node 'lowres' (downsample): inputs.views: a node cannot take its own output" in problems_of(spec)


def test_list_for_single_port_and_repeated_list_entry(views_folder: Path):
    spec = chain_spec(views_folder)
    spec["nodes"]["lowres"]["inputs"] = {"views": ["scene", "scene"]}
    spec["nodes"]["report"]["inputs"]["candidates"] = ["bicubic", "bicubic"]
    message = problems_of(spec)
    assert "inputs.views: takes one node" in message
    assert "node 'report' (evaluate): inputs.candidates: lists ['bicubic'] more than once" in message


def test_missing_views_folder_fails_validation(tmp_path: Path):
    spec = chain_spec(tmp_path / "nowhere")
    message = problems_of(spec)
    assert "node 'scene' (load_views): params.path" in message and "nowhere" in message


def test_unknown_top_level_key_and_empty_nodes(views_folder: Path):
    assert "spec.nodess: unknown key" in problems_of({"name": "x", "nodess": {}, "nodes": chain_spec(views_folder)["nodes"]})
    assert "spec.nodes" in problems_of({"name": "x", "nodes": {}})


def test_duplicate_node_in_yaml_is_an_error(tmp_path: Path, views_folder: Path):
    path = tmp_path / "dup.yaml"
    path.write_text(f"name: dup\nnodes:\n  scene: {{task: load_views, params: {{path: {views_folder}}}}}\n"
                    f"  scene: {{task: load_views, params: {{path: {views_folder}}}}}\n")
    with pytest.raises(SpecError, match=r"dup.yaml: duplicate key 'scene' at line 4 \(first at line 3\)"):
        load_pipeline(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nnodes:\n  scene: {task: load_views, params: {path: x}\n")
    with pytest.raises(SpecError, match=r"(?s)broken.yaml: YAML syntax error.*broken.yaml\", line 3"):
        load_pipeline(path)


def test_set_overrides_apply_and_reject_typos(views_folder: Path):
    spec = chain_spec(views_folder)
    changed = apply_overrides(spec, ["nodes.lowres.params.factor=2", "nodes.lowres.params.filter=bicubic"])
    assert changed["nodes"]["lowres"]["params"] == {"factor": 2, "filter": "bicubic"}
    assert spec["nodes"]["lowres"]["params"] == {"factor": 4}  # the original is untouched
    with pytest.raises(SpecError, match="the spec has no 'nodes.lowers'"):
        apply_overrides(spec, ["nodes.lowers.params.factor=2"])
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        apply_overrides(spec, ["nodes.lowres.params.factor"])


def test_cli_validate_exit_codes_and_messages(tmp_path: Path, views_folder: Path, capsys):
    good = write_spec(tmp_path / "good.yaml", chain_spec(views_folder))
    assert main(["validate", str(good)]) == 0
    assert "is valid (4 nodes" in capsys.readouterr().out
    assert main(["validate", str(good), "--set", "nodes.lowres.params.factor=zero"]) == 2
    assert "node 'lowres' (downsample): params.factor" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: spec file does not exist" in capsys.readouterr().err


def test_cli_run_rejects_bad_spec_before_any_compute(tmp_path: Path, views_folder: Path, capsys):
    spec = chain_spec(views_folder)
    spec["nodes"]["report"]["params"]["metrics"] = ["psnr", "fid"]
    path = write_spec(tmp_path / "bad.yaml", spec)
    store = tmp_path / "store"
    assert main(["run", str(path), "--store", str(store)]) == 2
    assert "node 'report' (evaluate): params.metrics.1" in capsys.readouterr().err
    assert not store.exists()  # nothing ran, nothing was created
    assert main(["run", str(write_spec(tmp_path / "ok.yaml", chain_spec(views_folder))), "--store", str(store),
                 "--force", "nope"]) == 2
    assert "no node 'nope'" in capsys.readouterr().err


def test_cli_nodes_lists_ports_params_types_defaults(capsys):
    assert main(["nodes"]) == 0
    out = capsys.readouterr().out
    for name in ("synthetic_scene", "load_views", "downsample", "upsample", "evaluate"):
        assert f"{name} -> " in out
    assert "factor: int  (default 4)" in out
    assert "filter: 'area' | 'bicubic'  (default 'area')" in out
    assert "candidates: views (list of nodes)" in out
    assert "path: str  (required)" in out
