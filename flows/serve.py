"""Serve the pipeline on a cron schedule (and the ablation on demand) from a long-lived process.

    prefect server start --host 127.0.0.1          # terminal 1 (or any Prefect server)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve --cron "0 2 * * *"       # terminal 2, from the repository root

The served process registers two deployments, `instdisc-pipeline/nightly` (scheduled) and
`instdisc-ablation/sweep` (no schedule: `prefect deployment run`), then executes their runs
itself, one at a time. A schedule needs a real server: Prefect's temporary (ephemeral) server
exists only while one flow runs and cannot schedule anything, so this script refuses to start
without PREFECT_API_URL.
"""

if __name__ == "__main__":  # entry point: offline defaults must precede the Prefect import
    from flows.settings import apply_defaults

    apply_defaults()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from prefect.deployments.runner import RunnerDeployment  # noqa: E402
from prefect.schedules import Cron  # noqa: E402
from prefect.types.entrypoint import EntrypointType  # noqa: E402

from flows.ablations import PRESETS, ablation  # noqa: E402
from flows.pipeline import pipeline  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def deployments(repo: Path, cron: str, timezone: str | None = None,
                parameters: dict[str, Any] | None = None) -> list[RunnerDeployment]:
    """The scheduled pipeline deployment and the on-demand ablation deployment."""
    nightly = pipeline.to_deployment(
        name="nightly", schedules=[Cron(cron, timezone=timezone)],
        parameters={"repo": str(repo), **(parameters or {})}, concurrency_limit=1,
        tags=["instdisc"], description=f"dvc pipeline of {repo} on cron {cron!r}",
        entrypoint_type=EntrypointType.MODULE_PATH)
    sweep = ablation.to_deployment(
        name="sweep", parameters={"repo": str(repo), "sweep": PRESETS["nce-m"]},
        concurrency_limit=1, tags=["instdisc"],
        description="ablation sweep as DVC experiments (default: the paper's NCE m sweep)",
        entrypoint_type=EntrypointType.MODULE_PATH)
    return [nightly, sweep]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default="0 2 * * *",
                        help='cron expression (default: "0 2 * * *", 02:00 every day)')
    parser.add_argument("--timezone", default=None, help="IANA zone for the cron (default UTC)")
    parser.add_argument("--repo", default=str(REPO_ROOT), help="repository the runs work on")
    parser.add_argument("--no-track", action="store_true", help="no parent MLflow run")
    args = parser.parse_args(argv)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        parser.error("PREFECT_API_URL is not set: schedules need a running Prefect server "
                     "(`prefect server start`), the temporary one schedules nothing")
    # Runs execute in child processes that import `flows.pipeline` by module path.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    from prefect import serve

    extra = {"track": False} if args.no_track else {}
    serve(*deployments(Path(args.repo).resolve(), args.cron, args.timezone, extra), limit=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
