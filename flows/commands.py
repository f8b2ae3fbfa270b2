"""Run a `dvc` command as a subprocess, stream its output, and explain a failure.

Prefect-free, so it is testable without a server. A failure is *transient* (worth a retry)
when the output matches one of `DEFAULT_TRANSIENT_PATTERNS` or the caller's patterns; a stage
command can ask for a retry explicitly by exiting with 75 (EX_TEMPFAIL from sysexits.h).
Everything else fails at once with the stage's own error text.
"""

from __future__ import annotations

import collections
import io
import math
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TRANSIENT_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure; the user is invited to retry"

DEFAULT_TRANSIENT_PATTERNS: tuple[str, ...] = (
    rf"exited with {TRANSIENT_EXIT_CODE}\b",          # DVC reporting a stage's EX_TEMPFAIL
    r"Unable to acquire lock",                        # another dvc process held the repo lock
    r"is busy, it is being blocked by",               # DVC rwlock on an output
    r"ConnectionResetError|ConnectionRefusedError|RemoteDisconnected",
    r"Temporary failure in name resolution|Connection timed out|ReadTimeout",
    r"sqlite3\.OperationalError: database is locked",  # MLflow's SQLite store under contention
)

TAIL_LINES = 40  # how much output a failure message carries
PROGRESS_INTERVAL = 10.0  # seconds between two logged progress-bar updates
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")
_DVC_ERROR = re.compile(r"^ERROR: (.*)")
_STAGE_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")


@dataclass
class CommandResult:
    """Exit code and the last TAIL_LINES lines of merged stdout/stderr."""

    returncode: int
    tail: list[str] = field(default_factory=list)
    text_seen: set[str] = field(default_factory=set)  # markers found anywhere in the output

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class StageFailed(RuntimeError):
    """A stage (or experiment) failed; `reason` is its own error line, `tail` its last output."""

    def __init__(self, what: str, returncode: int, reason: str, tail: Sequence[str],
                 transient: bool) -> None:
        self.what, self.returncode, self.reason = what, returncode, reason
        self.tail, self.transient = list(tail), transient
        kind = "transient failure" if transient else "failed"
        super().__init__(f"{what} {kind} (exit code {returncode}): {reason}\n"
                         f"--- last output ---\n" + "\n".join(self.tail))


def check_repo(repo: Path, experiments: bool = False) -> None:
    """Fail early, and say what to do, when `repo` cannot run DVC stages or experiments."""
    if not (repo / ".dvc").is_dir():
        raise FileNotFoundError(f"{repo} is not a DVC repository (no .dvc/): run `dvc init` there "
                                "and commit .dvc/")
    if experiments and not (repo / ".git").exists():
        raise FileNotFoundError(f"{repo} is not a git repository: DVC experiments need git "
                                "with at least one commit")


def run_streaming(args: Sequence[str], cwd: Path, env: Mapping[str, str],
                  emit: Callable[[str], None], markers: Iterable[str] = (),
                  progress_interval: float = PROGRESS_INTERVAL) -> CommandResult:
    """Run `args`, passing each output line to `emit` as it arrives.

    Lines ended by a bare carriage return (tqdm-style progress bars) are passed on at most once
    every `progress_interval` seconds, so a long epoch does not flood the run log. `markers`
    are substrings whose presence anywhere in the output is recorded in `text_seen` (for
    example DVC's "Running stage"). The child is terminated if the caller is interrupted.
    """
    markers = tuple(markers)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    seen: set[str] = set()
    last_progress = -math.inf
    proc = subprocess.Popen(list(args), cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        # newline="": split on \r, \n and \r\n but keep the ending, to tell progress apart
        for raw in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline=""):
            line = raw.rstrip()
            if not line:
                continue
            seen.update(m for m in markers if m in line)
            if raw.endswith("\r"):
                if time.monotonic() - last_progress < progress_interval:
                    continue
                last_progress = time.monotonic()
            emit(line)
            tail.append(line)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return CommandResult(returncode=returncode, tail=list(tail), text_seen=seen)


def failure_reason(lines: Sequence[str]) -> str:
    """The most telling line: the last Python exception, else DVC's first ERROR, else the last."""
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line.strip()):
            return line.strip()
    for line in lines:
        match = _DVC_ERROR.match(line.strip())
        if match:
            return match.group(1)
    return lines[-1].strip() if lines else "no output"


def is_transient(lines: Sequence[str],
                 patterns: Iterable[str] = DEFAULT_TRANSIENT_PATTERNS) -> bool:
    """True when any output line matches any of the regular expressions in `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return any(p.search(line) for p in compiled for line in lines)


def raise_for_failure(what: str, result: CommandResult, patterns: Iterable[str]) -> None:
    """Raise StageFailed (marked transient or not) unless `result` succeeded."""
    if result.ok:
        return
    raise StageFailed(what, exit_code(result.tail, result.returncode), failure_reason(result.tail),
                      result.tail, transient=is_transient(result.tail, patterns))


def exit_code(lines: Sequence[str], default: int) -> int:
    """The stage command's own exit code as DVC reports it ("exited with 1"), else `default`."""
    for line in reversed(lines):
        match = _STAGE_EXIT.search(line)
        if match:
            return int(match.group(1))
    return default


def retry_if_transient(task: object, task_run: object, state: object) -> bool:
    """Prefect `retry_condition_fn`: retry a transient StageFailed or an OSError, nothing else.

    A bug in the flow code or a stage that fails for real would only fail again.
    """
    error = getattr(state, "data", None)
    if isinstance(error, StageFailed):
        return error.transient
    return isinstance(error, OSError)
