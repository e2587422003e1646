"""Prefect tasks: one thin task per node type, each calling gsr_core.

Importing this package registers every node type in ``REGISTRY`` (name -> ``tasks.base.NodeType``).
"""

from tasks import distill, evaluate, gaussians, load_dataset, load_views, priors, resample, synthetic_scene  # noqa: F401  (registration)
from tasks import history  # noqa: F401  (registration)
from tasks.base import REGISTRY

__all__ = ["REGISTRY"]
