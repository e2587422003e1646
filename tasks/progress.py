"""Progress of a node's long work: a tqdm bar on stderr that also keeps a Prefect progress artifact up to date.

A node gets one from ``ctx.progress(total)``. Run as a Prefect task, a bar whose work lasts longer than
``ARTIFACT_EVERY_S`` seconds creates a progress artifact (0-100 %) on its task run, updates it at most every
``ARTIFACT_EVERY_S`` seconds and once more when it closes, so the Prefect UI shows how far a long fit, distillation
or prior training is; short work creates none. Outside a task run (a node function called directly) it is a plain
tqdm bar. The Prefect API failing to answer never fails the node: the bar stops reporting to it, with one warning.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from tqdm import tqdm

ARTIFACT_EVERY_S = 5.0
_log = logging.getLogger(__name__)


class NodeProgress(tqdm):
    """``tqdm`` that mirrors its fraction done into a Prefect progress artifact (see the module docstring).

    Args:
        node: the node's name, shown in the artifact's description.
        *args, **kwargs: tqdm's.
    """

    def __init__(self, *args: Any, node: str, **kwargs: Any):
        self._node = node
        self._in_task_run = TaskRunContext.get() is not None
        self._last_report = time.monotonic()
        self._artifact_id = None
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        displayed = super().update(n)
        self._report(final=False)
        return displayed

    def close(self) -> None:
        # tqdm also closes from __del__, possibly after a failed __init__: only a fully built bar reports.
        if hasattr(self, "_in_task_run") and not self.disable:
            self._report(final=True)
        super().close()

    def _report(self, final: bool) -> None:
        if not self._in_task_run or not self.total:
            return
        now = time.monotonic()
        if final:
            if self._artifact_id is None:  # the work never lasted long enough to show
                return
        elif now - self._last_report < ARTIFACT_EVERY_S:
            return
        self._last_report = now
        percent = min(100.0, 100.0 * self.n / self.total)
        description = f"{self._node}: {self.n:g} of {self.total:g} {self.unit}"
        try:
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(progress=percent, description=description)
            else:
                update_progress_artifact(self._artifact_id, progress=percent, description=description)
        except Exception as error:  # noqa: BLE001 - reporting progress must never fail the node's work
            _log.warning("node %r: stopped reporting progress to Prefect: %s: %s", self._node,
                         type(error).__name__, error)
            self._in_task_run = False
