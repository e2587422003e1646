"""Building and running Prefect flows from pipeline specs; the `gsr` command."""
