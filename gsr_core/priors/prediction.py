"""Noise estimates from a denoiser's raw output, whatever it was trained to predict (diffusers' ``prediction_type``).

With z_t = sqrt(a) z_0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) z_0 (Salimans & Ho):
``epsilon`` is eps itself, ``v_prediction`` gives eps = sqrt(a) v + sqrt(1-a) z_t, ``sample`` (z_0) gives
eps = (z_t - sqrt(a) z_0) / sqrt(1-a).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def eps_from_output(output: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
                    ) -> torch.Tensor:
    """eps [B,C,h,w] from a model ``output`` [B,C,h,w] at ``z_t`` [B,C,h,w], signal levels ``alpha_bar`` [B,1,1,1]."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * z_t
    if prediction_type == "sample":
        return (z_t - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()
    raise ValueError(f"scheduler prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def check_prediction_type(owner: str, prediction_type: str) -> None:
    """ValueError naming ``owner`` unless ``prediction_type`` is one ``eps_from_output`` converts."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{owner}: scheduler prediction_type must be one of {PREDICTION_TYPES}, "
                         f"found {prediction_type!r}")
