"""gsr_core: the library behind gsr. Plain functions and small classes over tensors; no Prefect here."""

__version__ = "0.1.0"
