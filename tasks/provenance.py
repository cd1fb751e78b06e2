"""Where a result came from: the git commit, the hash of a stage's real input data, and the hash of its params.

Nothing here talks to MLflow (that is :mod:`tasks.tracking`); these are plain values that stages put in MLflow
tags and, where they are a function of the stage's inputs (data and params hashes), in their outputs.

The data hash of an input path is the one DVC recorded for it in ``dvc.lock`` when the stage runs under DVC
(``dvc repro``/``dvc exp run`` set ``DVC_ROOT`` for the command), so that an MLflow tag leads straight to the
DVC-cached data; run outside DVC (a benchmark, a notebook, a stage called by hand), the lock may describe other
data, so the files themselves are hashed instead (``sha256:<16 hex>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"


# what a run's result depends on as code: sources and the pipeline's definition. What DVC itself rewrites during a run
# (dvc.lock, the committed metrics and registry entry) and params.yaml (recorded key by key as MLflow params) are not
# code: a fresh clone's `make run` rewrites dvc.lock, and that must not mark the run as built from changed code.
CODE_PATHSPECS = ("*.py", "dvc.yaml", "pyproject.toml", "prefect.yaml", "Makefile")


def git_commit(cwd: Path | None = None) -> str:
    """The commit the code ran at (``git rev-parse HEAD``), or ``unknown`` outside a git checkout.

    Whether the tracked code differed from it is :func:`code_changes`, recorded beside it.
    """
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=cwd
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return UNKNOWN


def code_changes(cwd: Path | None = None) -> list[str] | None:
    """Tracked code files (:data:`CODE_PATHSPECS`) that differ from HEAD, staged or not; None outside git."""
    try:
        out = subprocess.run(
            ["git", "diff", "--name-only", "HEAD", "--", *CODE_PATHSPECS], capture_output=True, text=True,
            check=True, cwd=cwd,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sorted(filter(None, out.splitlines()))


def under_dvc() -> bool:
    """Whether this process is a stage command started by DVC (which exports ``DVC_ROOT`` to it)."""
    return bool(os.environ.get("DVC_ROOT"))


def _lock_path() -> Path:
    # a stage runs in dvc.yaml's folder; under `dvc exp run --temp/--queue` that is a temporary copy while DVC_ROOT
    # names the parent workspace, whose dvc.lock describes other data: read the lock of the working directory
    return Path("dvc.lock")


def dvc_lock_hash(path: Path | str, lock: Path | None = None) -> str | None:
    """The md5 DVC recorded in ``dvc.lock`` for ``path`` as a stage output (``<md5>.dir`` for a folder), or None.

    A file inside a recorded folder has no entry of its own: None then.
    """
    from tasks.config import read_yaml

    lock = lock or _lock_path()
    if not lock.exists():
        return None
    root = lock.resolve().parent
    try:
        rel = Path(path).resolve().relative_to(root).as_posix()
    except ValueError:  # outside the DVC project
        return None
    data = read_yaml(lock) or {}
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if Path(out.get("path", "")).as_posix().rstrip("/") == rel and out.get("md5"):
                return str(out["md5"])
    return None


def file_hash(paths: list[Path] | Path, length: int = 16) -> str:
    """``sha256:<hex>`` over the relative names and bytes of every file under ``paths`` (sorted; folders recursed)."""
    h = hashlib.sha256()
    for top in [paths] if isinstance(paths, Path) else paths:
        top = Path(top)
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for f in files:
            h.update((f.relative_to(top).as_posix() if top.is_dir() else f.name).encode() + b"\0")
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return f"sha256:{h.hexdigest()[:length]}"


def data_hash(path: Path | str) -> str:
    """The hash of a stage's input ``path``: DVC's md5 from ``dvc.lock`` under DVC, else the files' sha256."""
    path = Path(path)
    if under_dvc():
        recorded = dvc_lock_hash(path)
        if recorded:
            return recorded
    if not path.exists():
        return UNKNOWN
    return file_hash(path)


def params_hash(values: Any) -> str:
    """A short, stable hash of params values (a pydantic model, a mapping of them, or plain JSON data)."""

    def plain(v: Any) -> Any:
        if hasattr(v, "model_dump"):
            return v.model_dump(mode="json")
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    blob = json.dumps(plain(values), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
