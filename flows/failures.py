"""What the flow does when a stage fails: name the stage and its error, retry only what may pass on a second try.

A stage runs as a ``dvc repro`` / ``dvc exp run`` process; when it exits non-zero the flow raises
:class:`StageFailed` with the error line(s) picked from the stage's output (:func:`error_lines`): DVC's ``ERROR:``
line and, when the stage's own command failed, the last exception (or message) the stage printed. Retries are for
transient errors only (:func:`is_transient`): the network, a server, an I/O hiccup, a DVC lock held by another
process. A stage that rejected its input fails the same way every time, so it fails at once.

The CLI (``python -m flows.pipeline``) reports a failure in a few lines on stderr and writes the full log, Prefect's
tracebacks included, to a file (:func:`run_log`).
"""

from __future__ import annotations

import errno
import logging
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# OSErrors that say something about the path or the request, not about the moment: retrying repeats them
DETERMINISTIC_ERRNOS = frozenset({
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOSPC, errno.EROFS,
    errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.EXDEV, errno.ENOEXEC, errno.ENOTEMPTY, errno.EDQUOT,
})  # fmt: skip
# errnos a second try may not see (I/O, the network, a busy resource)
TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET,
    errno.ECONNABORTED, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET,
    errno.ESTALE, errno.ENOBUFS, errno.EPIPE,
})  # fmt: skip
# exception classes (the last name of a printed ``pkg.Class: message`` line) that come from the network or a server
TRANSIENT_NAMES = frozenset({
    "ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError",
    "TimeoutError", "TimeoutExpired", "timeout", "ReadTimeout", "ConnectTimeout", "ReadTimeoutError",
    "ConnectTimeoutError", "MaxRetryError", "NewConnectionError", "ProtocolError", "RemoteDisconnected",
    "IncompleteRead", "ChunkedEncodingError", "gaierror",
})  # fmt: skip
# words in an error line that mean "try again later": DVC's lock, MLflow's sqlite store busy, HTTP 429/5xx, NFS
TRANSIENT_TEXT = re.compile(
    r"Unable to acquire lock|database is locked|Connection (refused|reset|aborted)|timed out|Max retries exceeded"
    r"|Temporary failure in name resolution|Resource temporarily unavailable|Stale file handle|Input/output error"
    r"|error code (429|50[234])|\b(429 Too Many Requests|502 Bad Gateway|503 Service Unavailable|504 Gateway Timeout)"
)
_ERRNO = re.compile(r"\[Errno (-?\d+)\]")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*):")
# DVC's line when the stage's own command failed (its output above says why) and the stage it names
_COMMAND_FAILED = re.compile(r"failed to run: .*, exited with (-?\d+)")
_STAGE_NAMED = re.compile(r"failed to reproduce '(?:[^']*:)?([\w@-]+)'")
MAX_ERROR_LINES = 12


class StageFailed(RuntimeError):
    """A DVC command (a stage, ``dvc status``, an experiment) exited non-zero.

    Attributes:
        stage: the stage that failed, e.g. ``"ingest"``, or the DVC command when no stage did (``"dvc status"``).
        returncode: the process's exit status.
        errors: the error line(s) from its output, the reason first (see :func:`error_lines`).
        transient: whether another try may pass (see :func:`is_transient`).
        experiment: the DVC experiment the stage ran in, if any.
    """

    def __init__(self, stage: str, returncode: int, errors: list[str], transient: bool | None = None,
                 experiment: str | None = None) -> None:  # fmt: skip
        self.stage, self.returncode, self.experiment = stage, returncode, experiment
        self.errors = errors or [f"exited with status {returncode} and printed no error"]
        self.transient = transient_text(self.errors) if transient is None else transient
        where = f"`{stage}`" if " " in stage else f"stage {stage}"
        where += f" of experiment {experiment}" if experiment else ""
        detail = "\n".join([self.errors[0], *(f"  {line}" for line in self.errors[1:])])
        super().__init__(f"{where} failed: {detail}")

    def __reduce__(self):  # pickled with its attributes (Prefect may persist a failed state's exception)
        return type(self), (self.stage, self.returncode, self.errors, self.transient, self.experiment)

    @classmethod
    def from_output(cls, stage: str, returncode: int, lines: list[str], experiment: str | None = None) -> StageFailed:
        """From the lines a failed ``dvc repro`` / ``dvc exp run`` printed; the stage named in DVC's error wins."""
        errors = error_lines(lines)
        named = next((m[1] for line in lines[::-1] if (m := _STAGE_NAMED.search(line))), None)
        return cls(named or stage, returncode, errors, experiment=experiment)


def _strip_dvc_error(line: str) -> str:
    """``ERROR: failed to reproduce 'ingest': [Errno 2] ...`` -> ``[Errno 2] ...`` (the stage is named already)."""
    line = line.removeprefix("ERROR: ")
    return re.sub(r"^failed to reproduce '[^']*': ", "", line)


def _exception_block(lines: list[str]) -> list[str]:
    """The exception line(s) that end the last Python traceback in ``lines`` (empty when there is none)."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return []
    rest = lines[starts[-1] + 1 :]
    body = [i for i, line in enumerate(rest) if line and not line[0].isspace()]
    return rest[body[0] :] if body else []


def error_lines(lines: list[str]) -> list[str]:
    """The line(s) that say why a DVC command failed, picked from everything it printed.

    DVC's last ``ERROR:`` line says which stage failed and, when DVC itself refused (a missing dependency, a lock,
    an invalid ``dvc.yaml``), why. When the stage's own command failed (``failed to run: ..., exited with 1``) the
    reason is what the stage printed just before: the exception that ended its traceback, or its last line (a
    ``SystemExit`` message, an ``ingest: ...`` line), or the signal that killed it. Without either, the last few
    lines.

    Returns:
        The reason first, then DVC's line (without its ``ERROR: failed to reproduce '<stage>':`` prefix), at most
        ``MAX_ERROR_LINES`` lines.
    """
    lines = [line.rstrip() for line in lines if line.strip()]
    dvc_at = max((i for i, line in enumerate(lines) if line.startswith("ERROR:")), default=None)
    if dvc_at is None:
        reason = _exception_block(lines) or lines[-5:]
        return reason[:MAX_ERROR_LINES]
    dvc_error = [_strip_dvc_error(lines[dvc_at]), *lines[dvc_at + 1 :]]
    failed = _COMMAND_FAILED.search(lines[dvc_at])
    if not failed:
        return dvc_error[:MAX_ERROR_LINES]
    if int(failed[1]) < 0:  # killed: what it printed last is just where it was
        return [f"the stage's process was killed by {_signal_name(-int(failed[1]))}", dvc_error[0]]
    before = lines[:dvc_at]
    own = [line for line in before if not line.startswith(("> ", "Running stage '"))]
    reason = _exception_block(before) or own[-1:]
    return [*reason[: MAX_ERROR_LINES - 1], dvc_error[0]]


def _signal_name(number: int) -> str:
    """``9`` -> ``"SIGKILL (out of memory?)"``."""
    import signal

    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    return f"{name} (out of memory?)" if name == "SIGKILL" else name


def transient_text(errors: list[str]) -> bool:
    """Whether error lines printed by another process describe a transient failure (see :func:`is_transient`).

    Only what the text shows counts: an ``[Errno N]`` (a path's errno is deterministic and wins), the exception's
    class name, or words such as DVC's "Unable to acquire lock" or sqlite's "database is locked". A bare
    ``OSError: ...`` line is not enough (PIL's "cannot identify image file" is one).
    """
    errnos = {int(n) for line in errors for n in _ERRNO.findall(line)}
    if errnos & DETERMINISTIC_ERRNOS:
        return False
    if errnos & TRANSIENT_ERRNOS:
        return True
    for line in errors:
        m = _EXCEPTION_LINE.match(line)
        if (m and m[1] in TRANSIENT_NAMES) or TRANSIENT_TEXT.search(line):
            return True
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether a second try may pass: the network, a server, I/O, a timeout, a DVC lock held by another process.

    Deterministic failures (a stage that rejected its input, invalid params, a missing file or folder, a
    permission, a full disk) return False, and so does anything not known to be transient. The exception's cause
    and context are looked at too (``RuntimeError(...) from ConnectionError(...)`` is transient).

    Args:
        exc: the exception a task raised; :class:`StageFailed` carries the verdict on its process's output.
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, StageFailed):
            if link.transient:
                return True
        elif isinstance(link, (ConnectionError, TimeoutError, subprocess.TimeoutExpired)):
            return True
        elif isinstance(link, OSError):
            if link.errno not in DETERMINISTIC_ERRNOS:
                return True
        elif type(link).__name__ in TRANSIENT_NAMES:  # e.g. requests' and urllib3's, without importing them
            return True
        link = link.__cause__ or link.__context__
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed task run only when its exception is transient."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    return exc is not None and is_transient(exc)


def failure_message(exc: BaseException, log: Path | None) -> str:
    """The few lines the CLI prints on a failed flow run: what failed, why, and where the full log is."""
    head = str(exc) if isinstance(exc, StageFailed) else f"failed: {type(exc).__name__}: {exc}"
    hint = f"\nFull log (with tracebacks): {_shown(log)}" if log else ""
    return f"medpipe-pipeline: {head}{hint}"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class _ConsoleFilter(logging.Filter):
    """Keeps the console to one report per failure: Prefect's run loggers log a failure three times, each with a
    traceback (the task, the flow, the final state). Those records go to the log file only; the CLI prints one
    message instead. Everything else, retry notices included, stays on the console."""

    RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.RUN_LOGGERS):
            return True
        if record.levelno >= logging.ERROR or (record.exc_info and record.exc_info[0] is not None):
            return False
        return not str(record.msg).startswith(("Finished in state Failed", "Finished in state Crashed"))


@contextmanager
def run_log(path: Path) -> Iterator[Path]:
    """Everything logged while inside goes to ``path`` (tracebacks included); the console loses the tracebacks.

    Attaches a file handler to the root logger (Prefect's run loggers propagate to it) with Prefect's console format,
    and :class:`_ConsoleFilter` to Prefect's console handler; both are removed on exit.
    """
    from prefect.logging.formatters import PrefectFormatter
    from prefect.logging.handlers import PrefectConsoleHandler

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(PrefectFormatter(
        "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s",
        "%Y-%m-%d %H:%M:%S",
        flow_run_fmt="%(asctime)s.%(msecs)03d | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s",
        task_run_fmt="%(asctime)s.%(msecs)03d | %(levelname)-7s | Task run %(task_run_name)r - %(message)s",
    ))  # fmt: skip
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    consoles = [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    console_filter = _ConsoleFilter()
    root.addHandler(handler)
    for console in consoles:
        console.addFilter(console_filter)
    try:
        yield path
    finally:
        for console in consoles:
            console.removeFilter(console_filter)
        root.removeHandler(handler)
        handler.close()
