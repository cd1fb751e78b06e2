"""tracking: how runs are named and filed in MLflow (a sqlite store in tmp_path): names that differ when the params
do, the Source and Dataset columns, and a registry that keeps its version tags few. The stages' use of these:
tests/test_train.py, tests/test_promote.py, tests/test_pipeline.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import tracking


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


@pytest.mark.parametrize(
    ("params_hash", "experiment", "expected"),
    [
        ("3d9afb321ea7", None, "synthetic-ct-cnn-resnet18-seed42-3d9afb32"),
        ("0a1b2c3d4e5f", None, "synthetic-ct-cnn-resnet18-seed42-0a1b2c3d"),
        ("3d9afb321ea7", "tidal-wave", "synthetic-ct-cnn-resnet18-seed42-3d9afb32 (tidal-wave)"),
    ],
)
def test_run_name(params_hash: str, experiment: str | None, expected: str) -> None:
    assert tracking.run_name("synthetic-ct-cnn-resnet18-seed42", params_hash, experiment) == expected


@pytest.mark.parametrize(
    ("commit", "expected"),
    [
        ("a" * 40, {"mlflow.source.git.commit": "a" * 40}),
        ("a" * 40 + "-dirty", {"mlflow.source.git.commit": "a" * 40}),  # MLflow links a bare sha
        ("unknown", {}),  # not a git checkout: no commit rather than a wrong one
    ],
)
def test_source_tags(commit: str, expected: dict[str, str]) -> None:
    assert tracking.source_tags("tasks/train.py", commit) == {
        "mlflow.source.name": "tasks/train.py", "mlflow.source.type": "LOCAL", **expected}


def test_dataset_input_names_digest_source_and_profile(store: Path) -> None:
    from mlflow.tracking import MlflowClient

    rid = tracking.start_run("medpipe", "r", {}, {})
    tracking.rename_run(rid, "renamed")
    digest = "8af9b478db645040d4c8bb3336518dfb.dir"  # DVC's md5 of a folder: the longest digest train logs
    tracking.log_dataset(rid, "synthetic-ct", digest, "data/synthetic/dicom", (1, 64, 64),
                         {"train": 237, "val": 59, "test": 75})  # fmt: skip
    run = MlflowClient().get_run(rid)
    assert run.info.run_name == "renamed"
    (inp,) = run.inputs.dataset_inputs
    ds = inp.dataset
    assert (ds.name, ds.digest, ds.source_type) == ("synthetic-ct", digest, "local")
    assert json.loads(ds.source) == {"uri": "data/synthetic/dicom"}
    assert json.loads(ds.profile) == {"n_train": 237, "n_val": 59, "n_test": 75}
    image, label = json.loads(ds.schema)["mlflow_colspec"]
    assert (image["name"], image["tensor-spec"]) == ("image", {"dtype": "float32", "shape": [-1, 1, 64, 64]})
    assert (label["name"], label["tensor-spec"]) == ("label", {"dtype": "int64", "shape": [-1]})
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}


def test_a_ninth_version_tag_is_refused_before_anything_is_logged(store: Path) -> None:
    from mlflow.tracking import MlflowClient

    rid = tracking.start_run("medpipe", "r", {}, {})
    tags = {f"t{i}": str(i) for i in range(tracking.MAX_VERSION_TAGS + 1)}
    with pytest.raises(ValueError, match=r"medpipe-classifier: 9 model-version tags .* at most 8"):
        tracking.log_and_register_pyfunc(rid, "medpipe-classifier", store / "none.py", {}, tags, (1, 8, 8), ["a", "b"])
    assert MlflowClient().search_registered_models() == []
    assert MlflowClient().list_artifacts(rid) == []
