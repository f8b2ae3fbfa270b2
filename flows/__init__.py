"""Prefect flows that schedule the DVC pipeline; they talk to it through `dvc` subprocesses only."""
