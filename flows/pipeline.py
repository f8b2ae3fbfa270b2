"""The DVC pipeline as a Prefect flow: DVC owns the DAG and cache; Prefect runs, retries, reports.

`python -m flows.pipeline [--repo .] [--set pretrain.epochs=3 ...]` from the repository root.
The stage graph comes from DVC itself (`flows.dag`), so a new stage in dvc.yaml is a new task
here. Each task is one `dvc repro --single-item <stage>` subprocess; a stage starts when its
upstream stages are done, so independent stages run concurrently (the workers of a
`ThreadPoolTaskRunner`). GPU stages (those that read the `device` param) carry the task tag
`gpu_tag`, whose Prefect tag concurrency limit (`gpu_slots`, created when missing) keeps two of
them off one GPU; CPU-only stages still run side by side. With `overrides` the whole pipeline
runs as one DVC experiment instead (one task; see `flows.experiments`).
"""

if __name__ == "__main__":  # entry point: offline defaults must precede the Prefect import
    from flows.settings import apply_defaults

    apply_defaults()

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import PrefectFuture, wait  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows import metrics  # noqa: E402
from flows.commands import (  # noqa: E402
    DEFAULT_TRANSIENT_PATTERNS, StageFailed, check_repo, raise_for_failure, retry_if_transient,
    run_streaming)
from flows.dag import StageGraph, load_graph  # noqa: E402
from flows.experiments import (  # noqa: E402
    check_name, make_name, parse_sets, run_experiment, show_experiments, validate_overrides)
from flows.parent_run import parent_run  # noqa: E402
from flows.settings import dvc_command, subprocess_env  # noqa: E402

RAN = "Running stage '"  # what `dvc repro` prints before it executes a stage's command


GPU_TAG = "gpu"  # task tag of the GPU stages; its concurrency limit is the number of GPU slots


def ensure_tag_limit(tag: str, slots: int) -> int:
    """The tag concurrency limit of `tag` on the Prefect server: created with `slots` when
    missing, an existing one kept (`prefect concurrency-limit create/delete` changes it).
    Returns the limit in force."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_concurrency_limit_by_tag(tag).concurrency_limit
        except ObjectNotFound:
            client.create_concurrency_limit(tag=tag, concurrency_limit=slots)
            return slots


def dvc_remotes(repo: Path) -> list[str]:
    """The project's DVC remotes (`dvc remote list`: "<name>\t<url>" lines); [] when none."""
    result = subprocess.run(dvc_command("remote", "list"), cwd=repo, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"dvc remote list failed in {repo}: {result.stderr.strip()}")
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, task_run_name="dvc {action}")
def sync_remote(action: str, repo: Path, env: dict[str, str]) -> None:
    """`dvc pull --allow-missing` (what the remote has of the locked outputs; the rest is
    computed) or `dvc push` (every cached output, for the next machine)."""
    logger = get_run_logger()
    args = ("pull", "--allow-missing") if action == "pull" else ("push",)
    result = run_streaming(dvc_command(*args), repo, subprocess_env(env),
                           lambda line: logger.info("[dvc %s] %s", action, line))
    raise_for_failure(f"dvc {action}", result, DEFAULT_TRANSIENT_PATTERNS)


class PipelineFailed(RuntimeError):
    """A stage failed for real (or ran out of retries); names it, its error and what never ran."""


@task(cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient, task_run_name="{stage}")
def run_stage(stage: str, repo: Path, env: dict[str, str], transient_patterns: list[str]) -> str:
    """`dvc repro --single-item <stage>`: DVC decides whether the stage is stale.

    Returns "ran" or "skipped"; raises StageFailed with the stage's own error text.
    `--wait-for-lock`: concurrent stages queue for DVC's repo lock (DVC releases it while
    the stage command itself runs, so the commands do overlap).
    """
    logger = get_run_logger()
    result = run_streaming(dvc_command("--wait-for-lock", "repro", "--single-item", stage),
                           repo, subprocess_env(env),
                           lambda line: logger.info("[%s] %s", stage, line), markers=(RAN,))
    raise_for_failure(f"stage {stage!r}", result, transient_patterns)
    status = "ran" if RAN in result.text_seen else "skipped"
    logger.info("stage %s %s", stage, status)
    return status


def run_stages(graph: StageGraph, repo: Path, env: dict[str, str], patterns: list[str],
               retries: int, retry_delay_seconds: float, max_parallel: int = 0,
               gpu_tag: str = GPU_TAG) -> tuple[dict[str, str], list[str]]:
    """One task per stage in topological order, each waiting for its upstream stages, on a
    thread pool of `max_parallel` workers (0: one per stage). GPU stages are tagged `gpu_tag`,
    so the tag's concurrency limit decides how many of them run at once.

    Returns ({stage: "ran" | "skipped" | "failed" | "not started"}, [failure messages]); a
    stage downstream of a failure is never started.
    """
    stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    gpu_task = stage_task.with_options(tags={gpu_tag})
    futures: dict[str, PrefectFuture] = {}
    with ThreadPoolTaskRunner(max_workers=max_parallel or len(graph.order) or 1) as runner:
        for name in graph.order:  # topological: a worker never waits for a task queued later
            upstream = [futures[parent] for parent in graph.upstream[name]]
            task = gpu_task if graph.stages[name].gpu else stage_task
            futures[name] = runner.submit(task, {"stage": name, "repo": repo, "env": env,
                                                       "transient_patterns": patterns},
                                          wait_for=upstream)
        wait(list(futures.values()))
    statuses: dict[str, str] = {}
    failures: list[str] = []
    for name, future in futures.items():
        state = future.state
        if state.is_completed():
            statuses[name] = future.result()
        elif state.is_failed() or state.is_crashed():
            statuses[name] = "failed"
            error = future.result(raise_on_failure=False)
            failures.append(str(error) if isinstance(error, StageFailed)
                            else f"stage {name!r} {state.name}: {state.message}")
        else:
            statuses[name] = "not started"
    return statuses, failures


def publish(flat: dict[str, Any], statuses: dict[str, str], title: str,
            failures: list[str]) -> None:
    """Prefect artifacts: a table of final metrics and a markdown summary (with any failure)."""
    rows = metrics.table_rows(flat)
    create_table_artifact(rows, key="instdisc-metrics", description=title)
    summary = metrics.markdown_table([{"stage": k, "status": v} for k, v in statuses.items()])
    errors = "".join(f"\n\n## Failed\n\n```\n{f}\n```" for f in failures)
    baseline = metrics.random_init_rows(flat)
    versus = (f"## Trained vs random init\n\n{metrics.markdown_table(baseline)}\n\n"
              if baseline else "")
    create_markdown_artifact(f"# {title}\n\n## Stages\n\n{summary}{errors}\n\n{versus}"
                             f"## Final metrics\n\n{metrics.markdown_table(rows)}\n",
                             key="instdisc-pipeline", description=title)


@flow(name="instdisc-pipeline")
def pipeline(repo: str = ".", overrides: dict[str, Any] | None = None,
             experiment_name: str | None = None, retries: int = 2,
             retry_delay_seconds: float = 30.0, transient_patterns: list[str] | None = None,
             temp_experiment: bool = True, track: bool = True,
             max_parallel_stages: int = 0, gpu_tag: str = GPU_TAG,
             gpu_slots: int = 1, sync: bool = True) -> dict[str, Any]:
    """Run every stale stage of `repo`'s dvc.yaml; with `overrides`, one DVC experiment.

    `retries`/`retry_delay_seconds` apply to transient failures only (see flows.commands);
    `transient_patterns` adds regular expressions to the defaults. `track` creates the parent
    MLflow run. `max_parallel_stages` caps how many independent stages run at once (0: no cap);
    GPU stages (they read the `device` param) run under the tag `gpu_tag`, whose Prefect
    concurrency limit is created with `gpu_slots` when the server has none. With `sync` and a
    DVC remote configured (`dvc remote add -d`), `dvc pull` runs first and, after a run
    without failures, `dvc push` (experiments: `dvc exp push` them yourself).
    Returns {"stages", "metrics", "experiment", "mlflow_run_id"}.
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    check_repo(root, experiments=bool(overrides))
    graph = load_graph(root)
    patterns = [*DEFAULT_TRANSIENT_PATTERNS, *(transient_patterns or [])]
    name = None
    if overrides:
        validate_overrides(root, overrides)
        name = check_name(experiment_name or make_name("run"))
    tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
            "instdisc.flow": "pipeline", **({"dvc.experiment": name} if name else {})}
    remotes = dvc_remotes(root) if sync else []
    if remotes:
        logger.info("DVC remotes %s: pulling the locked outputs first", ", ".join(remotes))
        sync_remote("pull", root, {})
    with parent_run(root, name or f"pipeline-{flow_run.name}", tags, enabled=track) as parent:
        if name:
            logger.info("overrides %s: running the pipeline as DVC experiment %s", overrides, name)
            experiment = run_experiment.with_options(
                retries=retries, retry_delay_seconds=retry_delay_seconds)
            experiment(root, name, dict(overrides or {}), temp_experiment, parent.env(), patterns)
            statuses, failures = {"experiment": name}, []
            files = show_experiments(root).get(name, {}).get("metrics", {})
        else:
            logger.info("stages in order: %s", ", ".join(graph.order))
            if graph.gpu_stages:
                limit = ensure_tag_limit(gpu_tag, gpu_slots)
                logger.info("GPU stages (tag %r, %d at a time): %s", gpu_tag, limit,
                            ", ".join(graph.gpu_stages))
            statuses, failures = run_stages(graph, root, parent.env(), patterns, retries,
                                            retry_delay_seconds, max_parallel_stages, gpu_tag)
            if remotes and not failures:
                sync_remote("push", root, {})
            files, problems = metrics.read_workspace(root, graph)
            for problem in problems:
                logger.warning(problem)
        flat = metrics.by_stage(graph, files)
        parent.log_metrics(flat)
        title = f"instdisc pipeline {flow_run.name}" + (f", experiment {name}" if name else "")
        publish(flat, statuses, title, failures)
        if failures:
            not_started = [n for n, s in statuses.items() if s == "not started"]
            raise PipelineFailed("\n\n".join(failures)
                                 + f"\n\nnot started: {', '.join(not_started) or 'none'}")
    return {"stages": statuses, "metrics": flat, "experiment": name,
            "mlflow_run_id": parent.run_id}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="repository root (default: .)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key; the run becomes a DVC experiment")
    parser.add_argument("--name", help="experiment name for a run with --set")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--retry-delay", type=float, default=30.0)
    parser.add_argument("--in-workspace", action="store_true",
                        help="run an experiment in the workspace instead of a --temp copy")
    parser.add_argument("--no-track", action="store_true", help="no parent MLflow run")
    parser.add_argument("--max-parallel-stages", type=int, default=0,
                        help="stages run at once (default 0: no cap)")
    parser.add_argument("--no-sync", action="store_true",
                        help="no dvc pull/push even when a DVC remote is configured")
    parser.add_argument("--gpu-slots", type=int, default=1,
                        help="GPU stages run at once, when the server has no 'gpu' tag limit yet")
    args = parser.parse_args(argv)
    state = pipeline(repo=args.repo, overrides=parse_sets(args.sets) or None,
                     experiment_name=args.name, retries=args.retries,
                     retry_delay_seconds=args.retry_delay, temp_experiment=not args.in_workspace,
                     track=not args.no_track, max_parallel_stages=args.max_parallel_stages,
                     gpu_slots=args.gpu_slots, sync=not args.no_sync,
                     return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
