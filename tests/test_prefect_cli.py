"""The Prefect deployment as the README gives it: the pinned client and server, the CLI against a started server.

A real ``prefect server`` starts on loopback (its own PREFECT_HOME); the README's commands then run as a user runs
them: create the work pool, ``prefect deploy --all``, list deployments, trigger a run, let a worker execute it on a
tiny copy of this repository, list flow runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._repo import REPO, copy_repo

POOL = "medpipe-process"


def test_serve_and_prefect_yaml_declare_the_same_run_under_different_names() -> None:
    """flows.serve and prefect.yaml agree on flow, cron (UTC), entrypoint and parameters (no overrides), and use
    different names, so `prefect deploy --all` does not replace what `python -m flows.serve` registered."""
    from prefect.flows import load_flow_from_entrypoint

    from flows.pipeline import pipeline
    from flows.serve import build_deployment
    from tasks.config import read_yaml

    dep = build_deployment("0 */6 * * *", repo="/srv/medpipe")
    assert dep.flow_name == pipeline.name
    assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [("0 */6 * * *", "UTC")]
    assert dep.parameters == {"repo": "/srv/medpipe"}  # no overrides: the scheduled run uses params.yaml as committed

    default = build_deployment()
    doc = read_yaml(REPO / "prefect.yaml")
    (yaml_dep,) = doc["deployments"]
    assert yaml_dep["name"] != default.name
    assert [(s["cron"], s["timezone"]) for s in yaml_dep["schedules"]] == [
        (s.schedule.cron, s.schedule.timezone) for s in default.schedules
    ]
    assert yaml_dep["parameters"] == default.parameters == {"repo": "."}
    assert yaml_dep["entrypoint"] == default.entrypoint
    assert yaml_dep["work_pool"]["name"] == POOL
    assert "pull" not in doc, "a pull step would need a path or env var; without one prefect records the deploy folder"
    assert load_flow_from_entrypoint(str(REPO / yaml_dep["entrypoint"])).name == pipeline.name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `prefect server start` on loopback; yields the environment that points the CLI at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({
        "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })  # fmt: skip
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def prefect(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120) -> str:
    """Run ``prefect <args>`` as a user would; fail with its output when it exits non-zero."""
    res = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env={**env, "COLUMNS": "250"},
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert res.returncode == 0, f"prefect {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.mark.slow
def test_cli_lists_deploys_and_runs_against_the_started_server(server: dict[str, str], tmp_path: Path) -> None:
    """The README's deployment commands against a started server: no 422 from list endpoints, deploy --all with
    no extra env var, a worker runs the triggered run to completion, and the served deployment is kept."""
    repo = copy_repo(tmp_path)
    # list endpoints first, on an empty server: these answered 422 with fastapi >= 0.151
    for args in (("deployment", "ls"), ("flow-run", "ls"), ("work-pool", "ls"), ("flow", "ls")):
        prefect(server, repo, *args)

    # what `python -m flows.serve` registers (without serving): it must survive `prefect deploy --all`
    served = subprocess.run(
        [sys.executable, "-c", "from flows.serve import build_deployment; print(build_deployment().apply())"],
        cwd=repo, env=server, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr

    prefect(server, repo, "work-pool", "create", POOL, "--type", "process")
    prefect(server, repo, "--no-prompt", "deploy", "--all")
    listing = prefect(server, repo, "deployment", "ls")
    assert "medpipe-pipeline/medpipe-nightly " in listing or "medpipe-pipeline/medpipe-nightly\n" in listing
    assert "medpipe-pipeline/medpipe-nightly-served" in listing

    prefect(server, repo, "deployment", "run", "medpipe-pipeline/medpipe-nightly")
    prefect(server, repo, "worker", "start", "--pool", POOL, "--run-once", timeout=900)

    import json

    runs = json.loads(prefect(server, repo, "flow-run", "ls", "--output", "json"))
    states = sorted(r["state_type"] for r in runs)
    # the triggered run completed; the schedules may have added SCHEDULED runs for the coming nights
    assert states.count("COMPLETED") == 1 and set(states) <= {"COMPLETED", "SCHEDULED"}, states
    # the worker ran the pipeline in the deploy folder: the tiny copy now has its model and its MLflow run
    assert (repo / "models" / "classify" / "train" / "model.json").is_file()
    assert (repo / "mlflow" / "mlflow.db").is_file()
