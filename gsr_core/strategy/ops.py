"""Device-independent operations of the MCMC densification (Kheradmand et al., "3D Gaussian Splatting as
Markov Chain Monte Carlo", arXiv 2404.09591), replacing the two CUDA kernels gsplat 1.5.3 calls.

* ``compute_relocation``: Eq. 9 of the paper. A Gaussian of opacity o and scale s that becomes N Gaussians at
  the same place gets, for each of them,

      o' = 1 - (1 - o)^(1/N)
      s' = o / (sum_{i=1..N} sum_{k=0..i-1} C(i-1, k) (-1)^k o'^(k+1) / sqrt(k+1)) * s

  so that the N copies composited together have the opacity o at the centre and the same integral of
  opacity along a line through the centre as the original. Evaluated in float64 (the alternating sum cancels
  badly in float32 for large N and o near 1).
* ``covariance``: Sigma = R diag(s)^2 R^T from wxyz quaternions, for the position noise of Eq. 11.
* ``relocate`` / ``sample_add`` / ``inject_noise``: the strategy steps built on them, over a ``params`` dict
  and one Adam optimizer per parameter, as gsplat's ``gsplat.strategy.ops`` does.

Random draws use the global torch generator (so a trainer can checkpoint and restore it).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

NOISE_SHARPNESS = 100.0  # k of the noise gate sigmoid(-k (o - t)) (MCMC paper, Eq. 11)
NOISE_OPACITY = 0.005  # t: Gaussians more transparent than this move freely


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] rotation matrices of [N, 4] wxyz quaternions (any length; normalised here)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*quats.shape[:-1], 3, 3)


def covariance(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """3D covariances ``R diag(scales)^2 R^T``.

    Args:
        quats: [N, 4] wxyz rotations (any length). scales: [N, 3] standard deviations (activated, not log).

    Returns:
        [N, 3, 3] symmetric positive semi-definite matrices.
    """
    if quats.shape[:-1] != scales.shape[:-1] or quats.shape[-1] != 4 or scales.shape[-1] != 3:
        raise ValueError(f"`quats` [N, 4] and `scales` [N, 3] must agree, got {list(quats.shape)} and "
                         f"{list(scales.shape)}")  # fmt: skip
    axes = quat_to_rotmat(quats) * scales[..., None, :]  # R diag(s): column j is axis j scaled
    return axes @ axes.transpose(-1, -2)


def binomial_table(n_max: int = 51) -> torch.Tensor:
    """[n_max, n_max] float64 ``C(n, k)`` (zero for k > n): gsplat's MCMC lookup table, but exact (gsplat
    keeps float32, which rounds the coefficients above C(n, k) = 2^24, i.e. from n = 27 on)."""
    table = torch.zeros(n_max, n_max, dtype=torch.float64)
    table[:, 0] = 1.0
    for n in range(1, n_max):
        table[n, 1:] = table[n - 1, 1:] + table[n - 1, :-1]
    return table


def compute_relocation(
    opacities: torch.Tensor, scales: torch.Tensor, ratios: torch.Tensor, binoms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Opacity and scale of each of N copies that replace one Gaussian (Eq. 9, module docstring).

    Args:
        opacities: [M] activated opacities o in (0, 1).
        scales: [M, 3] activated scales s.
        ratios: [M] integer N >= 1 per Gaussian (clamped to [1, n_max], as gsplat does).
        binoms: [n_max, n_max] ``C(n, k)`` table (``binomial_table``).

    Returns:
        new_opacities: [M] o'. new_scales: [M, 3] s'. Same dtype as ``opacities``.
    """
    n_max = binoms.shape[0]
    if binoms.shape != (n_max, n_max) or opacities.ndim != 1 or scales.shape != (opacities.shape[0], 3):
        raise ValueError(f"expected opacities [M], scales [M, 3], binoms [n, n]; got {list(opacities.shape)}, "
                         f"{list(scales.shape)}, {list(binoms.shape)}")  # fmt: skip
    if ratios.shape != opacities.shape:
        raise ValueError(f"`ratios` must have shape {list(opacities.shape)}, got {list(ratios.shape)}")
    copies = ratios.long().clamp(1, n_max)
    o = opacities.double()
    new_o = 1.0 - (1.0 - o) ** (1.0 / copies.double())
    # The double sum regrouped by power: the coefficient of o'^(k+1) is sum_{i=1..N} C(i-1, k), a prefix sum
    # over the rows of the table, times (-1)^k / sqrt(k+1).
    k = torch.arange(n_max, dtype=torch.float64, device=o.device)
    prefix = binoms.to(o.device, torch.float64).cumsum(dim=0)[copies - 1]  # [M, n_max]
    terms = prefix * (-1.0) ** k / (k + 1.0).sqrt() * new_o[:, None] ** (k + 1.0)
    new_scales = (o / terms.sum(dim=1))[:, None] * scales.double()
    return new_o.to(opacities.dtype), new_scales.to(scales.dtype)


def sample_by_weight(weights: torch.Tensor, count: int) -> torch.Tensor:
    """[count] indices drawn with replacement, index i with probability ``weights[i] / sum(weights)``.

    Inverse-CDF sampling in float64 (no 2^24 category limit as ``torch.multinomial`` has).
    """
    cdf = weights.double().cumsum(dim=0)
    if not cdf[-1] > 0:
        raise ValueError(f"`weights` must have a positive sum, got {float(cdf[-1])}")
    draws = torch.rand(count, dtype=torch.float64, device=weights.device) * cdf[-1]
    return torch.searchsorted(cdf, draws, right=True).clamp_max(weights.numel() - 1)


def replace_params(
    params: dict[str, torch.nn.Parameter],
    optimizers: dict[str, torch.optim.Optimizer],
    param_fn: Callable[[str, torch.Tensor], torch.Tensor],
    state_fn: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Swap every parameter for ``param_fn(name, old)`` and map its optimizer's per-element state tensors
    (Adam's moments; not ``step``) with ``state_fn``, keeping the optimizer bound to the new parameter."""
    for name, old in list(params.items()):
        new = torch.nn.Parameter(param_fn(name, old.detach()), requires_grad=old.requires_grad)
        params[name] = new
        optimizer = optimizers.get(name)
        if optimizer is None:
            continue
        group = next(g for g in optimizer.param_groups if any(p is old for p in g["params"]))
        group["params"] = [new if p is old else p for p in group["params"]]
        if old in optimizer.state:
            state = optimizer.state.pop(old)
            optimizer.state[new] = {key: value if key == "step" else state_fn(value) for key, value in state.items()}


def _split_targets(params, sources: torch.Tensor, binoms: torch.Tensor, min_opacity: float):
    """Logit opacities [S] and log scales [S, 3] of Gaussians ``sources`` once each is shared with its copies
    (N = 1 + times it was drawn)."""
    opacities = torch.sigmoid(params["opacities"].detach())
    copies = torch.bincount(sources, minlength=opacities.shape[0])[sources] + 1
    new_opacities, new_scales = compute_relocation(
        opacities[sources], torch.exp(params["scales"].detach()[sources]), copies, binoms
    )
    eps = torch.finfo(new_opacities.dtype).eps
    new_opacities = new_opacities.clamp(min=min_opacity, max=1.0 - eps)
    return torch.logit(new_opacities), torch.log(new_scales)


@torch.no_grad()
def relocate(
    params: dict[str, torch.nn.Parameter],
    optimizers: dict[str, torch.optim.Optimizer],
    dead: torch.Tensor,
    binoms: torch.Tensor,
    min_opacity: float = 0.005,
) -> int:
    """Move the ``dead`` [N] Gaussians onto live ones drawn in proportion to opacity; returns how many moved.

    Each drawn Gaussian and its new copies share the Eq. 9 opacity and scale; their Adam moments restart at
    zero (gsplat zeroes only the drawn ones' moments; the copies are new Gaussians, so theirs are zeroed too).
    """
    dead_ids = dead.nonzero(as_tuple=True)[0]
    alive_ids = (~dead).nonzero(as_tuple=True)[0]
    if dead_ids.numel() == 0 or alive_ids.numel() == 0:
        return 0
    alive_opacities = torch.sigmoid(params["opacities"].detach()[alive_ids])
    sources = alive_ids[sample_by_weight(alive_opacities, dead_ids.numel())]
    logit_opacities, log_scales = _split_targets(params, sources, binoms, min_opacity)

    def param_fn(name: str, value: torch.Tensor) -> torch.Tensor:
        value = _with_split_targets(name, value, sources, logit_opacities, log_scales)
        value[dead_ids] = value[sources]
        return value

    def state_fn(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        value[sources] = 0
        value[dead_ids] = 0
        return value

    replace_params(params, optimizers, param_fn, state_fn)
    return dead_ids.numel()


def _with_split_targets(name: str, value: torch.Tensor, sources: torch.Tensor, logit_opacities: torch.Tensor,
                        log_scales: torch.Tensor) -> torch.Tensor:
    """A copy of parameter ``name`` [N, ...] whose ``sources`` rows carry the shared opacity/scale of Eq. 9."""
    value = value.clone()
    if name == "opacities":
        value[sources] = logit_opacities
    elif name == "scales":
        value[sources] = log_scales
    return value


@torch.no_grad()
def sample_add(
    params: dict[str, torch.nn.Parameter],
    optimizers: dict[str, torch.optim.Optimizer],
    count: int,
    binoms: torch.Tensor,
    min_opacity: float = 0.005,
) -> int:
    """Append ``count`` copies of Gaussians drawn in proportion to opacity (Eq. 9 for the shared values);
    the drawn ones and the copies start with zero Adam moments. Returns ``count``."""
    if count <= 0:
        return 0
    sources = sample_by_weight(torch.sigmoid(params["opacities"].detach()), count)
    logit_opacities, log_scales = _split_targets(params, sources, binoms, min_opacity)

    def param_fn(name: str, value: torch.Tensor) -> torch.Tensor:
        value = _with_split_targets(name, value, sources, logit_opacities, log_scales)
        return torch.cat([value, value[sources]])

    def state_fn(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        value[sources] = 0
        return torch.cat([value, value.new_zeros(count, *value.shape[1:])])

    replace_params(params, optimizers, param_fn, state_fn)
    return count


@torch.no_grad()
def inject_noise(params: dict[str, torch.nn.Parameter], scaler: float) -> None:
    """Perturb means in place by ``Sigma (eta * sigmoid(-k (o - t)) * scaler)``, eta ~ N(0, I) (Eq. 11):
    opaque Gaussians barely move, transparent ones explore, along their own covariance."""
    opacities = torch.sigmoid(params["opacities"].detach())
    gate = torch.sigmoid(-NOISE_SHARPNESS * (opacities - NOISE_OPACITY))  # [N]
    noise = torch.randn_like(params["means"]) * gate[:, None] * scaler
    sigma = covariance(params["quats"].detach(), torch.exp(params["scales"].detach()))
    params["means"].add_((sigma @ noise[:, :, None])[:, :, 0])
