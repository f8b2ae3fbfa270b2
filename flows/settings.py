"""Environment defaults for the flows: offline, no telemetry, patient with a cold start.

Nothing here runs at import time. Entry points (`python -m flows.pipeline`, `flows.ablations`,
`flows.serve`) and the tests call `apply_defaults()` before Prefect is imported, because Prefect
reads its settings from the environment when it is imported. Values already set in the
environment win (`os.environ.setdefault`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

# Setting names checked against prefect 3.9.1, mlflow 3.17.2 and dvc 3.67.1 sources.
PROCESS_DEFAULTS: dict[str, str] = {
    # Prefect: with PREFECT_API_URL unset, start a temporary local server (SQLite under
    # PREFECT_HOME) and give it time: a new database took ~20 s on a 2-core machine, and the
    # default start-up timeout is 20 s.
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Prefect server-side analytics (also avoids "database is locked" tracebacks on SQLite).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Client-side analytics of Prefect ("1"/"true") and MLflow (only "true").
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}

# What every `dvc` subprocess gets on top of the flow's environment.
SUBPROCESS_DEFAULTS: dict[str, str] = {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PYTHONUNBUFFERED": "1",  # stage output reaches the Prefect log line by line, not at exit
}


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> None:
    """Fill in PROCESS_DEFAULTS where the environment does not set them."""
    target = os.environ if environ is None else environ
    for key, value in PROCESS_DEFAULTS.items():
        target.setdefault(key, value)


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The flow's environment for a `dvc` subprocess.

    The directory of the running interpreter goes first on PATH, so stage commands such as
    `instdisc pretrain` or `torchrun` resolve to the same virtual environment as the flow.
    """
    env = dict(os.environ)
    for key, value in SUBPROCESS_DEFAULTS.items():
        env.setdefault(key, value)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def dvc_command(*args: str) -> list[str]:
    """`dvc <args>` run by this interpreter: the DVC installed next to the flow."""
    return [sys.executable, "-m", "dvc", *args]
