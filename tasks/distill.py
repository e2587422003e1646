"""Node `distill`: a high-resolution 3DGS distilled from a 2D SR prior (GaussianSR, 3DSR, SR -> 3DGS).

Params are one flat model listing every method's settings, each marked with the methods it applies to;
setting one that the chosen `method` does not use is an error naming it, and values left unset take the
method's own defaults (``gsr_core.distill``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from gsr_core.distill import METHODS
from gsr_core.priors import load_prior
from gsr_core.upscale_views import check_prior_scale
from tasks.base import NodeContext, NodeParams, Port, node
from tasks.kinds import GAUSSIANS_FILE


def _settings_fields() -> dict[str, Any]:
    """Every method's settings as optional fields, described with the methods that use them and their defaults."""
    fields: dict[str, Any] = {}
    users: dict[str, list[str]] = {}
    for method, (settings, _) in METHODS.items():
        for name, info in settings.model_fields.items():
            users.setdefault(name, []).append(f"{method}: {info.default}")
            fields[name] = (info.annotation | None, info.description or name)
    return {name: (annotation, Field(None, description=f"{text} [{'; '.join(users[name])}]"))
            for name, (annotation, text) in fields.items()}


def _check_method_settings(params):
    """Only the chosen method's settings may be set; they must validate against its settings model."""
    settings_model, _ = METHODS[params.method]
    foreign = sorted(name for name in params.settings_values() if name not in settings_model.model_fields)
    if foreign:
        raise ValueError(f"method {params.method!r} does not use {', '.join(foreign)} "
                         f"(its settings: {', '.join(settings_model.model_fields)})")
    settings_model.model_validate(params.settings_values())
    return params


class _DistillBase(NodeParams):
    def settings_values(self) -> dict[str, Any]:
        """The settings given a value (None stands for "the method's default")."""
        return {name: value for name, value in self if name != "method" and value is not None}

    def settings(self):
        return METHODS[self.method][0].model_validate(self.settings_values())


DistillParams = create_model(
    "DistillParams", __base__=_DistillBase,
    __validators__={"_per_method": model_validator(mode="after")(_check_method_settings)},
    method=(Literal[tuple(METHODS)], Field(description="gaussiansr | 3dsr | sr_then_fit")),
    **_settings_fields(),
)


def _write_history(history: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


@node("distill", inputs={"gaussians": Port(("gaussians",), description="the LR 3DGS to start from"),
                         "views": Port(("views",), description="the LR views (train split)"),
                         "prior": Port(("prior",))},
      output="gaussians", version=1)
def distill(params: DistillParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """A high-resolution 3DGS distilled from the prior: gaussians.ply, fit.json (seconds, Gaussian count), history.csv.

    Checkpoints go to the node's scratch folder; a crashed run resumes (3DSR at the stage it was in).
    """
    settings = params.settings()
    _, method = METHODS[params.method]
    prior = load_prior(inputs["prior"], device=settings.device)
    views = inputs["views"]
    check_prior_scale(prior, views)
    total = settings.iterations * getattr(settings, "steps", 1)
    with ctx.progress(total, unit="step") as bar:
        def report(state: dict) -> None:
            bar.update(state["step"] - bar.n)
            shown = {k: f"{state[k]:.4g}" for k in ("loss", "lr_loss", "sds", "hr_loss", "t") if k in state}
            bar.set_postfix(**shown, n=state["num_gaussians"], refresh=False)

        result = method(inputs["gaussians"], views, prior, settings, checkpoint_dir=ctx.scratch / "distill",
                        progress=report)
    result.gaussians.save_ply(out / GAUSSIANS_FILE)
    (out / "fit.json").write_text(json.dumps({**result.summary(), "prior": prior.describe(),
                                              "settings": settings.model_dump(mode="json")}, indent=1))
    _write_history(result.history, out / "history.csv")
