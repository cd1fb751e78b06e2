"""The flow's contract with the working tree: scheduled runs run what is committed, overrides run as DVC experiments.

One copy of the repo per module: the flow runs once without overrides (the nightly run), then once with overrides
(``train.epochs``, ``base.seed``), which must become a DVC experiment that leaves params.yaml, dvc.lock and the
outputs of the working tree as they were, shows in ``dvc exp show`` and has its MLflow run. Bad overrides fail before
any stage runs. The deployment and the ``-S`` value encoding need no flow run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests._repo import copy_repo, dvc, tree_digest

EXP_OVERRIDES = {"train.epochs": 2, "base.seed": 3}


# --- no flow run --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [2, 0.001, 1e-05, True, None, "cnn", "1", "null", [32, 32], [], ["a b", "c"], "it's", "C:\\data\\", "${x}", ""],
)
def test_override_values_reach_params_as_given(tmp_path: Path, value: Any) -> None:
    """Each value the flow passes to ``dvc exp run -S`` is read back by DVC's own -S parser as the same value."""
    from dvc.utils.hydra import apply_overrides

    from flows.pipeline import _hydra_value
    from tasks.config import read_yaml

    path = tmp_path / "params.yaml"
    path.write_text("group:\n  key: 0\n")
    apply_overrides(path, [f"group.key={_hydra_value(value)}"])
    assert read_yaml(path)["group"]["key"] == value


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train.epochs=2", ("train.epochs", 2)),
        ("preprocess.spatial_size=[32, 32]", ("preprocess.spatial_size", [32, 32])),
        ("ingest.labels_csv=null", ("ingest.labels_csv", None)),
        ("train.family=svm", ("train.family", "svm")),
        ("ingest.input=data/a=b", ("ingest.input", "data/a=b")),
        ("train.lr=1e-3", ("train.lr", 0.001)),
    ],
)
def test_cli_set_reads_values_as_yaml(text: str, expected: tuple[str, Any]) -> None:
    from flows.pipeline import _parse_set

    assert _parse_set(text) == expected


@pytest.mark.parametrize("text", ["train.epochs", "=2"])
def test_cli_set_without_key_or_value_is_refused(text: str, capsys) -> None:
    from flows.pipeline import main

    with pytest.raises(SystemExit) as exit_info:
        main(["-S", text])
    assert exit_info.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err


# --- one repository, two flow runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("flowrepo"))


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def no_mlflow_env():
    """The stages use the repo's own sqlite store (the default), whatever the developer's shell says."""
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    if old is not None:
        os.environ["MLFLOW_TRACKING_URI"] = old


def _snapshot(repo: Path) -> dict[str, Any]:
    return {
        "params": (repo / "params.yaml").read_text(),
        "lock": (repo / "dvc.lock").read_text() if (repo / "dvc.lock").exists() else None,
        "models": tree_digest(repo / "models"),
        "reports": tree_digest(repo / "reports"),
        "exps": dvc(repo, "exp", "list", "--name-only").stdout.split(),
    }


@pytest.fixture(scope="module")
def nightly(repo: Path, harness, no_mlflow_env) -> dict[str, Any]:
    """The scheduled run: no overrides, in the working tree. Returns the flow's result and the tree after it."""
    from flows.pipeline import pipeline

    result = pipeline(repo=str(repo))
    return {"result": result, "after": _snapshot(repo)}


@pytest.fixture(scope="module")
def experiment(repo: Path, nightly: dict[str, Any]) -> dict[str, Any]:
    """The flow with overrides (a shortcut flag and the generic mapping), after the nightly run."""
    from flows.pipeline import pipeline

    result = pipeline(repo=str(repo), epochs=EXP_OVERRIDES["train.epochs"],
                      overrides={"base.seed": EXP_OVERRIDES["base.seed"]})  # fmt: skip
    return {"result": result, "after": _snapshot(repo)}


@pytest.mark.slow
def test_overrides_leave_the_working_tree_as_committed(repo: Path, nightly, experiment) -> None:
    assert nightly["result"]["experiment"] is None and nightly["after"]["models"], "the nightly run wrote no models/"
    diff = subprocess.run(["git", "diff", "--exit-code", "params.yaml"], cwd=repo, capture_output=True, text=True)
    assert diff.returncode == 0, f"the flow left overrides in params.yaml:\n{diff.stdout}"
    after, before = experiment["after"], nightly["after"]
    assert after["params"] == before["params"]
    assert after["lock"] == before["lock"], "the experiment changed the working tree's dvc.lock"
    assert after["models"] == before["models"], "the experiment changed the working tree's models/"
    assert after["reports"] == before["reports"], "the experiment changed the working tree's reports/"
    assert after["exps"] == [*before["exps"], experiment["result"]["experiment"]]
    assert not list((repo / ".dvc/tmp/exps").glob("tmp*")), "the experiment's temporary workspace was left behind"


@pytest.mark.slow
def test_experiment_reuses_the_cache_and_shows_in_dvc_exp_show(repo: Path, experiment) -> None:
    result = experiment["result"]
    # base.seed and train.epochs change train and what follows it; the data stages come from the DVC cache
    assert [(s["stage"], s["ran"]) for s in result["stages"]] == [
        ("synth", False), ("ingest", False), ("preprocess@classify", False),
        ("train@classify", True), ("evaluate@classify", True), ("export@classify", True), ("promote@classify", True),
    ]  # fmt: skip
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    revs = [rev for baseline in shown for exp in baseline.get("experiments") or [] for rev in exp["revs"]]
    (exp,) = [rev for rev in revs if rev.get("name") == result["experiment"]]
    params = exp["data"]["params"]["params.yaml"]["data"]
    assert params["train"]["epochs"] == 2 and params["base"]["seed"] == 3
    metrics = exp["data"]["metrics"]["reports/classify/evaluate/metrics.json"]["data"]
    assert metrics == result["tasks"]["classify"]["metrics"] and "test_auc" in metrics
    workspace = next(b for b in shown if b["rev"] == "workspace")
    assert workspace["data"]["params"]["params.yaml"]["data"]["train"]["epochs"] == 1


@pytest.mark.slow
def test_experiment_is_tracked_in_the_repos_mlflow_store(repo: Path, nightly, experiment, monkeypatch) -> None:
    monkeypatch.chdir(repo)  # the default store, <repo>/mlflow/mlflow.db, the one the experiment must have used
    from tasks import tracking

    name = experiment["result"]["experiment"]
    client = tracking.client()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"tags.`dvc.exp_name` = '{name}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs tagged dvc.exp_name={name}"
    (run,) = runs
    assert run.data.params["train.epochs"] == "2" and run.data.params["base.seed"] == "3"
    assert run.info.status == "FINISHED" and "test_auc" in run.data.metrics
    registry = experiment["result"]["tasks"]["classify"]["registry"]
    assert registry["run_id"] == run.info.run_id
    assert registry["version"] == str(int(nightly["result"]["tasks"]["classify"]["registry"]["version"]) + 1)
    assert registry["alias"] == "challenger", "an experiment never takes @champion: what is committed does"
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(repo / "mlflow"), f"artifacts went to {artifacts}, outside the repo's store"
    assert artifacts.exists()


@pytest.mark.slow
def test_experiment_records_dvcs_data_hash(repo: Path, nightly, experiment, monkeypatch) -> None:
    """The experiment trained on the same preprocessed data: its run carries the same DVC md5 as the nightly run's."""
    monkeypatch.chdir(repo)
    from tasks import tracking

    client = tracking.client()
    tags = [client.get_run(r["result"]["tasks"]["classify"]["registry"]["run_id"]).data.tags
            for r in (nightly, experiment)]
    assert tags[0]["dvc_data_hash"].endswith(".dir")
    assert tags[1]["dvc_data_hash"] == tags[0]["dvc_data_hash"]


# --- bad params fail first ----------------------------------------------------------------------------------------


def _task_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:  # the sync client sends sort/limit as given: give both
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)
    return sorted(r.name for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"train.epochs": -3}, "train.epochs: Input should be greater than or equal to 1"),
        ({"train.epoch": 2}, "train.epoch: unknown key"),
        ({"train.family": "transformer"}, "train.family: Input should be 'cnn', 'rnn' or 'svm'"),
    ],
)
def test_bad_override_fails_before_any_stage(repo: Path, nightly, overrides, expected) -> None:
    from flows.pipeline import pipeline
    from tasks.config import ParamsError

    before = _snapshot(repo)
    state = pipeline(repo=str(repo), overrides=overrides, return_state=True)
    assert state.is_failed()
    with pytest.raises(ParamsError, match=expected.replace("(", r"\(")):
        state.result()
    names = _task_names(state.state_details.flow_run_id)
    assert len(names) == 1 and names[0].startswith("validate-params"), f"tasks that ran: {names}"
    assert _snapshot(repo) == before  # models/, reports/, dvc.lock, params.yaml and the experiments untouched


@pytest.mark.slow
def test_bad_params_file_fails_the_flow_and_the_cli(tmp_path: Path, harness, capsys) -> None:
    """A bad value in params.yaml itself fails before DVC decides anything: no data/ is written."""
    from flows.pipeline import main, pipeline
    from tasks.config import ParamsError

    repo = copy_repo(tmp_path)
    text = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(text.replace("  val_fraction: 0.15", "  val_fraction: 0.75", 1))
    with pytest.raises(ParamsError, match=r"params.yaml: invalid params:\n  ingest.val_fraction: Input should be less"):
        pipeline(repo=str(repo))
    with pytest.raises(SystemExit) as exit_info:
        main(["--repo", str(repo), "-S", "train.epochs=2"])
    assert exit_info.value.code == 2
    assert "ingest.val_fraction" in capsys.readouterr().err
    assert not (repo / "data").exists(), "a stage ran although params.yaml is invalid"
    files = sorted(p.relative_to(repo / "models").as_posix() for p in (repo / "models").rglob("*") if p.is_file())
    assert files == ["classify/registry.json", "segment/registry.json"]  # only the committed entries


def test_last_lines_name_the_champion_when_the_new_version_is_not_it() -> None:
    from flows.pipeline import registry_lines

    challenger = {"model_name": "m", "version": "4", "alias": "challenger", "previous_champion": "1",
                  "reason": "val_auc 0.90 does not beat champion v1 (0.95)"}
    assert registry_lines(challenger) == [
        "Registered model: models:/m/4 (alias @challenger)",
        "Champion:         models:/m/1 (alias @champion, kept: val_auc 0.90 does not beat champion v1 (0.95))",
    ]
    champion = {"model_name": "m", "version": "5", "alias": "champion", "previous_champion": "1", "reason": "beats"}
    assert registry_lines(champion) == ["Registered model: models:/m/5 (alias @champion)"]
