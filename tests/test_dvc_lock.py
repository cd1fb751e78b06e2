"""The committed dvc.lock describes the committed code and params: a fresh clone's `dvc repro` reruns only what
its missing data needs, and a lock left stale by a code edit is caught here, not by a user's surprise rerun.
(After editing a stage's code or params: `dvc repro`, then commit dvc.lock with the change.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.config import read_yaml

REPO = Path(__file__).resolve().parents[1]


def _lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


def expanded_stages(spec: dict, params: dict) -> dict:
    """dvc.yaml's stages with each ``foreach: ${tasks}`` group expanded to ``<stage>@<task>`` (its ``do`` body, with
    ``${key}`` replaced), as DVC names them in dvc.lock."""
    out = {}
    for name, stage in spec.items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        assert stage["foreach"] == "${tasks}", f"dvc.yaml stage {name}: foreach over {stage['foreach']}"
        for task in params["tasks"]:
            deps = [d.replace("${key}", task) if isinstance(d, str) else d for d in stage["do"].get("deps", [])]
            out[f"{name}@{task}"] = {**stage["do"], "deps": deps}
    return out


def test_dvc_lock_matches_the_committed_code_and_params():
    lock = read_yaml(REPO / "dvc.lock")["stages"]
    params = read_yaml(REPO / "params.yaml")
    spec = expanded_stages(read_yaml(REPO / "dvc.yaml")["stages"], params)
    stale = []
    assert set(lock) == set(spec), f"dvc.lock stages {sorted(lock)} != dvc.yaml stages {sorted(spec)}"
    for name, entry in lock.items():
        code = [d for d in entry.get("deps", []) if d["path"].startswith(("tasks/", "flows/"))]
        declared = [d for d in spec[name].get("deps", []) if isinstance(d, str) and d.startswith(("tasks/", "flows/"))]
        if sorted(d["path"] for d in code) != sorted(declared):
            stale.append(f"{name}: code deps in dvc.lock differ from dvc.yaml's")
        for dep in code:
            path = REPO / dep["path"]
            if not path.is_file() or hashlib.md5(path.read_bytes()).hexdigest() != dep["md5"]:
                stale.append(f"{name}: {dep['path']} changed since dvc.lock was written")
        for key, value in (entry.get("params", {}).get("params.yaml") or {}).items():
            if _lookup(params, key) != value:
                stale.append(f"{name}: params {key} is {_lookup(params, key)!r}, dvc.lock has {value!r}")
    assert not stale, "dvc.lock is stale (run `dvc repro` and commit dvc.lock):\n  " + "\n  ".join(stale)
