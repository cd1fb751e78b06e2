"""Relay a stage process's output as it comes: each line as soon as it ends, progress bars live on a terminal.

A stage (``dvc repro`` / ``dvc exp run`` and the ``python -m tasks.<stage>`` process DVC starts) writes lines and
tqdm bars. A bar redraws one line with carriage returns, hundreds of times; a log wants the line's final state only.
:func:`stream` hands every finished line (its last carriage-return state) to a callback the moment its newline
arrives, and the unfinished line's current state to another: :class:`TerminalBar` draws it in place when the console
is a terminal, and nothing is drawn when it is not (a log file, a CI job, a Prefect worker).

:func:`stage_env` is the stages' environment: the project's interpreter first on PATH, unbuffered Python output
(else lines sit in the child's buffer until it exits), and progress bars on or off as the console is a terminal or not.
"""

from __future__ import annotations

import codecs
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

# DVC's hint after every stage that changed outputs; no remote is configured by default, so it is noise here
QUIET_LINES = frozenset({"Use `dvc push` to send your updates to remote storage."})


def console_is_terminal(stream: TextIO | None = None) -> bool:
    """Whether the console the flow logs to (Prefect's handler writes to stderr) is an interactive terminal."""
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def stage_env(extra: dict[str, str] | None = None, terminal: bool | None = None) -> dict[str, str]:
    """The environment for DVC and the stages it starts.

    Args:
        extra: variables to set on top.
        terminal: whether the output ends on a terminal (default: :func:`console_is_terminal`). On a terminal the
            stages draw their tqdm bars (``MEDPIPE_PROGRESS=1``, ``COLUMNS`` = the terminal's width, since their
            stderr is a pipe); otherwise bars are off (``MEDPIPE_PROGRESS=0``, ``TQDM_DISABLE=1``) and a log gets one
            line per epoch.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    terminal = console_is_terminal() if terminal is None else terminal
    if terminal:
        env["MEDPIPE_PROGRESS"] = "1"
        env.pop("TQDM_DISABLE", None)  # tqdm reads any value, "0" included, as True
        env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    else:
        env["MEDPIPE_PROGRESS"] = "0"
        env["TQDM_DISABLE"] = "1"
    env.update(extra or {})
    return env


def _final_state(raw: str) -> str:
    """A line as a terminal would leave it: the text after its last carriage return, without trailing blanks."""
    return raw.rstrip("\r").rsplit("\r", 1)[-1].rstrip()


def stream(
    args: list[str],
    cwd: Path,
    env: dict[str, str],
    on_line: Callable[[str], None],
    on_progress: Callable[[str], None] | None = None,
) -> tuple[int, list[str]]:
    """Run a command; hand each line of its output (stdout and stderr, in order) to ``on_line`` as soon as it ends.

    Reads whatever the pipe holds (not a line at a time), so a progress bar's carriage-return updates are seen
    while the line is still open: ``on_progress`` (if given) gets the open line's current state each time it
    changes, if the line is being redrawn (holds a carriage return), and ``""`` once it is finished (before
    ``on_line`` gets it). A finished line is handed over in
    its final state (after its last carriage return); blank lines and :data:`QUIET_LINES` are dropped.

    Args:
        args: the command.
        cwd: its working directory.
        env: its environment (see :func:`stage_env`: Python children must run unbuffered for lines to come live).
        on_line: called with each finished line, in order, while the command runs.
        on_progress: called with the open line's state (a bar), for a terminal.

    Returns:
        (exit status, the lines handed to ``on_line``).
    """
    lines: list[str] = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending, shown = "", ""

    def show(state: str) -> None:
        nonlocal shown
        if on_progress is not None and state != shown:
            on_progress(state)
            shown = state

    def finish(raw: str) -> None:
        line = _final_state(raw)
        if line and line not in QUIET_LINES:
            lines.append(line)
            on_line(line)

    with subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:  # fmt: skip
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(1 << 16):
            pending += decoder.decode(chunk)
            *done, pending = pending.split("\n")
            if done:
                show("")
            for raw in done:
                finish(raw)
            show(_final_state(pending) if "\r" in pending else "")  # a bar redraws with \r; other text waits
        pending += decoder.decode(b"", final=True)
        show("")
        finish(pending)
    return proc.returncode, lines


class TerminalBar:
    """Draws the open line of a stage's output (a tqdm bar) in place on a terminal, below the logged lines.

    Args:
        out: the terminal (the stream Prefect's console handler writes to).
    """

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr

    def __call__(self, state: str) -> None:
        width = max(shutil.get_terminal_size().columns - 1, 10)
        self.out.write(f"\r{state[:width]}\x1b[K" if state else "\r\x1b[K")
        self.out.flush()
