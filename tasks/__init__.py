"""Prefect tasks: one thin task per node type, each calling gsr_core."""
