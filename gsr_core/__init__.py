"""gsr_core: the library behind gsr. Plain functions and small classes over tensors; no Prefect here."""

import os

# PyTorch's CPU threads spin while waiting for work (OpenMP's default). With any other load on the machine —
# another node running concurrently, a second process — that spinning steals the cores the work needs: measured
# here, a conv/exp loop ran 13.2 s with 2 spinning threads vs 0.67 s with passive waiting under the same load.
# Must be set before torch is first imported; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
