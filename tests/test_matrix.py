"""Sweeps: a spec's `matrix:` expanded into nodes before validation (flows/matrix.py), and one sweep run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.matrix import MatrixError, expand_matrix
from flows.pipeline import run_pipeline
from flows.spec import SpecError, apply_overrides, load_pipeline, read_spec, validate
from tests.conftest import REPO

EXAMPLE = REPO / "pipelines" / "sweep_example.yaml"


def sweep(iters: list | dict = (100, 300), resolution: int = 64) -> dict:
    """scene x iters: the scene's views and LR views shared by every fit; one evaluation per scene."""
    return {
        "name": "sweep",
        "matrix": {"scene": {"tiles": {"name": "tiles", "seed": 0}, "glyphs": {"name": "glyphs", "seed": 1}},
                   "iters": list(iters) if isinstance(iters, tuple) else iters},
        "nodes": {
            "${scene}_hr": {"task": "synthetic_scene",
                            "params": {"name": "${scene.name}", "seed": "${scene.seed}", "resolution": resolution,
                                       "views": 8, "test_every": 4, "supersample": 1, "num_points": 300}},
            "${scene}_lr": {"task": "downsample", "inputs": {"views": "${scene}_hr"}, "params": {"factor": 4}},
            "${scene}_bicubic": {"task": "upsample", "inputs": {"views": "${scene}_lr"}, "params": {"factor": 4}},
            "${scene}_gs_${iters}": {"task": "fit_gaussians", "inputs": {"views": "${scene}_lr"},
                                     "params": {"iterations": "${iters}"}},
            "${scene}_3dgs_${iters}": {"task": "render_views", "params": {"split": "test"},
                                       "inputs": {"gaussians": "${scene}_gs_${iters}", "views": "${scene}_hr"}},
            "${scene}": {"task": "evaluate", "params": {"metrics": ["psnr", "ssim"]},
                         "inputs": {"reference": "${scene}_hr",
                                    "candidates": ["${scene}_bicubic", "${scene}_3dgs_${*iters}"]}},
        },
    }


def problems(spec: dict) -> str:
    with pytest.raises(SpecError) as caught:
        validate(spec, source="sweep.yaml")
    return str(caught.value)


def test_each_node_is_instantiated_once_per_value_of_the_axes_it_mentions():
    pipeline = validate(sweep())
    names = [planned.name for planned in pipeline.nodes]
    assert len(names) == 2 * 4 + 2 * 2 * 2  # per scene: hr, lr, bicubic, evaluate; per scene and iters: fit, render
    assert {"tiles_hr", "glyphs_lr", "tiles_gs_100", "glyphs_gs_300", "glyphs_3dgs_100", "tiles"} <= set(names)
    # One LR views node per scene feeds every fit of that scene; each fit feeds only its own render.
    feeds = {planned.name: planned.upstream() for planned in pipeline.nodes}
    assert feeds["tiles_gs_100"] == feeds["tiles_gs_300"] == ["tiles_lr"]
    assert feeds["glyphs_3dgs_300"] == ["glyphs_gs_300", "glyphs_hr"]
    assert pipeline.node("tiles").inputs["candidates"] == ["tiles_bicubic", "tiles_3dgs_100", "tiles_3dgs_300"]


def test_whole_placeholders_keep_the_value_type_and_fields_reach_into_mappings():
    pipeline = validate(sweep())
    assert pipeline.node("glyphs_gs_300").params["iterations"] == 300  # an int, not the text "300"
    assert pipeline.node("glyphs_hr").params["name"] == "glyphs" and pipeline.node("glyphs_hr").params["seed"] == 1


def test_labelled_values_name_the_instances():
    pipeline = validate(sweep(iters={"short": 20, "long": 40}))
    assert pipeline.node("tiles_gs_short").params["iterations"] == 20
    assert pipeline.node("tiles").inputs["candidates"] == ["tiles_bicubic", "tiles_3dgs_short", "tiles_3dgs_long"]


def test_text_around_placeholders_and_nested_fields():
    nodes = {"a_${x}": {"task": "t-${x}", "inputs": {"v": "up_${x}"},
                        "params": {"note": "run ${x} of ${x.deep.k}", "whole": "${x}", "deep": "${x.deep}"}}}
    expanded = expand_matrix({"x": {"one": {"deep": {"k": 1}}}}, nodes)
    assert expanded == {"a_one": {"task": "t-one", "inputs": {"v": "up_one"},
                                  "params": {"note": "run one of 1", "whole": {"deep": {"k": 1}},
                                             "deep": {"k": 1}}}}


def test_a_spec_without_placeholders_is_unchanged():
    nodes = {"scene": {"task": "synthetic_scene", "inputs": {}, "params": {"name": "tiles"}},
             "lowres": {"task": "downsample", "inputs": {"views": "scene"}, "params": {"factor": 4}}}
    assert expand_matrix({}, nodes) == nodes


def test_unknown_axis_is_named_with_the_node_and_key():
    spec = sweep()
    spec["nodes"]["${scene}_hr"]["params"]["name"] = "${scen.name}"
    message = problems(spec)
    assert "sweep.yaml: invalid pipeline 'sweep':" in message
    assert ("node '${scene}_hr': params.name: unknown axis 'scen' in '${scen.name}'; the matrix has axes scene, iters"
            in message)


def test_placeholder_without_matrix_is_an_error():
    message = problems({"name": "p", "nodes": {"a": {"task": "synthetic_scene", "params": {"seed": "${seed}"}}}})
    assert "node 'a': params.seed: unknown axis 'seed' in '${seed}'; the spec has no matrix" in message


def test_missing_field_of_a_value_is_named():
    spec = sweep()
    spec["nodes"]["${scene}_hr"]["params"]["name"] = "${scene.nmae}"
    assert ("node '${scene}_hr': params.name: '${scene.nmae}': value 'tiles' of axis 'scene' has no 'scene.nmae' "
            "(keys ['name', 'seed'])") in problems(spec)


def test_an_axis_the_name_does_not_mention_is_an_error():
    spec = sweep()
    spec["nodes"]["${scene}_lr"]["params"]["factor"] = "${iters}"
    message = problems(spec)
    assert ("node '${scene}_lr': params.factor: mentions axis 'iters', which the node's name does not; each "
            "instance needs its own name, e.g. '${scene}_lr_${iters}'") in message


def test_gathering_outside_inputs_and_malformed_placeholders_are_errors():
    spec = sweep()
    spec["nodes"]["${scene}_hr"]["params"].update(views="${*iters}", seed="${scene.}", supersample="${scene")
    message = problems(spec)
    assert "node '${scene}_hr': params.views: '${*iters}' gathers a list, which only inputs can take" in message
    assert "node '${scene}_hr': params.seed: malformed placeholder '${scene.}'" in message
    assert "node '${scene}_hr': params.supersample: '${scene' has an unclosed or nested '${'" in message


def test_bad_axes_are_errors():
    for matrix, expected in [
        ({"lr": [0.5, 1.0]}, "matrix.lr: '0.5' cannot be part of a node name"),
        ({"iters": []}, "matrix.iters: an axis needs at least one value"),
        ({"iters": [1, 1]}, "matrix.iters: lists ['1'] more than once"),
        ({"iters": 5}, "matrix.iters: expected a list of values or a mapping label -> value"),
        ({"scene": [{"name": "tiles"}]}, "matrix.scene: a list axis takes plain values"),
    ]:
        with pytest.raises(MatrixError) as caught:
            expand_matrix(matrix, {})
        assert expected in str(caught.value), (matrix, str(caught.value))


def test_unused_axis_and_colliding_names_are_errors():
    spec = sweep()
    spec["matrix"]["seed"] = [0, 1]
    assert "matrix.seed: no node mentions this axis (${seed})" in problems(spec)
    spec = sweep()
    spec["nodes"]["tiles_gs_100"] = {"task": "fit_gaussians", "inputs": {"views": "tiles_lr"}}
    assert ("node 'tiles_gs_100': expands to 'tiles_gs_100', as node '${scene}_gs_${iters}' does"
            in problems(spec))


def test_later_errors_name_the_expanded_nodes():
    spec = sweep()
    spec["nodes"]["${scene}_lr"]["params"] = {"factr": 4}
    message = problems(spec)
    assert "node 'tiles_lr' (downsample): params.factr: unknown key" in message
    assert "node 'glyphs_lr' (downsample): params.factr: unknown key" in message
    spec = sweep()
    spec["nodes"]["${scene}_bicubic"]["inputs"]["views"] = "${scene}_low"
    assert "node 'tiles_bicubic' (upsample): inputs.views: no node named 'tiles_low'" in problems(spec)


def test_example_spec_validates_and_overrides_reach_the_matrix():
    pipeline = load_pipeline(EXAMPLE)
    assert pipeline.name == "sweep-example" and len(pipeline.nodes) == 24
    assert pipeline.node("glyphs").inputs["candidates"] == [
        "glyphs_bicubic", "glyphs_lr_3dgs_100", "glyphs_lr_3dgs_300", "glyphs_lr_3dgs_bicubic_100",
        "glyphs_lr_3dgs_bicubic_300"]
    smaller = validate(apply_overrides(read_spec(EXAMPLE), ["matrix.iters=[7]"]))
    assert len(smaller.nodes) == 2 * 4 + 2 * 4 and smaller.node("tiles_lr_gs_7").params["iterations"] == 7


def test_sweep_runs_end_to_end_sharing_common_nodes(tmp_path: Path, prefect_api):
    reports = run_pipeline(spec=sweep(iters=[3, 6], resolution=32), store=str(tmp_path / "store"))
    status = {report["node"]: report["status"] for report in reports}
    assert len(status) == 16 and set(status.values()) == {"ran"}
    keys = {report["node"]: report["key"] for report in reports}
    assert len(set(keys.values())) == 16  # every instance is its own output
    for scene in ("tiles", "glyphs"):
        fits = [tmp_path / "store" / f"objects/{keys[f'{scene}_gs_{n}']}/_node.json" for n in (3, 6)]
        fed_by = {json.loads(path.read_text())["inputs"]["views"]["key"] for path in fits}
        assert fed_by == {keys[f"{scene}_lr"]}  # one LR views output feeds both fits of the scene
        metrics = json.loads((tmp_path / "store" / f"objects/{keys[scene]}/metrics.json").read_text())
        assert list(metrics["candidates"]) == [f"{scene}_bicubic", f"{scene}_3dgs_3", f"{scene}_3dgs_6"]
