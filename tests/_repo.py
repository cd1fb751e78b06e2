"""A throw-away copy of this repository (a real git + DVC project) with shrunken params, for pipeline tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# the real params.yaml, shrunk: a tiny cohort, a small network, one epoch
TINY = {
    "synth.n_patients": 16,
    "synth.image_size": 64,
    "preprocess.spatial_size": [32, 32],
    "train.arch": "resnet10",
    "train.epochs": 1,
    "train.batch_size": 16,
    "evaluate.bootstrap": 50,
}


def copy_repo(dest: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Copy the working tree's files (tracked and untracked-not-ignored) to ``dest``, apply params overrides
    (comments kept) and commit, so git and DVC behave as in a fresh clone."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    set_params(dest, {**TINY, **(overrides or {})})
    git = ["git", "-c", "user.name=medpipe-test", "-c", "user.email=test@medpipe.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "test copy"], cwd=dest, check=True)
    return dest


def set_params(repo: Path, overrides: dict[str, Any]) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    path = repo / "params.yaml"
    doc = yaml.load(path.read_text())
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with path.open("w") as fh:
        yaml.dump(doc, fh)
