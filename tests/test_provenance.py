"""The commit a run records is the one its code ran at; what DVC rewrites during a run is not changed code."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tasks.provenance import UNKNOWN, code_changes, git_commit

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@medpipe.invalid"]


def _repo(root: Path) -> Path:
    files = {"tasks/stage.py": "x = 1\n", "dvc.lock": "schema: '2.0'\n", "params.yaml": "a: 1\n",
             "reports/classify/evaluate/metrics.json": "{}\n", "dvc.yaml": "stages: {}\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=root, check=True)
    return root


def test_files_dvc_rewrites_leave_the_commit_clean(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    # what a fresh clone's `make run` rewrites: the lock, the committed metrics; params are recorded as params
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "reports/classify/evaluate/metrics.json").write_text('{"test_auc": 0.9}\n')
    (repo / "params.yaml").write_text("a: 2\n")
    assert git_commit(repo) == head
    assert code_changes(repo) == []


def test_changed_code_is_named(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo / "tasks/stage.py").write_text("x = 2\n")
    (repo / "dvc.yaml").write_text("stages: {a: {cmd: echo}}\n")
    subprocess.run(["git", "add", "dvc.yaml"], cwd=repo, check=True)  # staged counts too
    assert code_changes(repo) == ["dvc.yaml", "tasks/stage.py"]
    assert "-dirty" not in git_commit(repo)


def test_outside_git(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == UNKNOWN
    assert code_changes(tmp_path) is None
