"""Densification strategies: gsplat's ``DefaultStrategy`` and ``MCMCStrategy``, working on any device.

Both keep gsplat's interface (a dataclass of hyperparameters, ``initialize_state``, and the hooks
``step_pre_backward`` / ``step_post_backward`` over a ``params`` dict and one Adam optimizer per parameter), so a
trainer drives them exactly as gsplat's simple trainer does and never sees split, prune or relocation logic.
What differs from gsplat 1.5.3 is what does not work there on a CPU (see ``default.py`` and ``mcmc.py``).
"""

from gsr_core.strategy.default import DefaultStrategy
from gsr_core.strategy.mcmc import MCMCStrategy

__all__ = ["DefaultStrategy", "MCMCStrategy"]
