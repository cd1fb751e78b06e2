"""promote: register the exported pyfunc, alias champion/challenger, serve it from `models:/<name>@champion`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import export, promote, tracking
from tasks.models.networks import ModelSpec, load_trained, weights_hash
from tests._fake import PROVENANCE, make_preprocessed, make_trained
from tests.test_export import run_export, tiny_params

NAME = "medpipe-classifier"


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    make_preprocessed(tmp_path / "pre", n=(4, 4, 6), size=32)
    (tmp_path / "metrics.json").write_text(json.dumps({"test_auc": 0.75, "test_accuracy": 0.7, "n_test": 6,
                                                       "threshold": 0.5}))  # evaluate's headline, shortened
    return tmp_path


def _train_and_promote(wd: Path, tag: str, val_auc: float, seed: int,
                       export_dir: Path | None = None) -> promote.PromoteResult:  # fmt: skip
    """A fabricated model (weights from ``seed``: each version's own hash finds its own run), exported unless
    ``export_dir`` is given, then promoted."""
    model_dir = make_trained(wd / tag, val_auc=val_auc, seed=seed)
    p = tiny_params()
    if export_dir is None:
        export_dir = wd / "export"
        run_export(p, model_dir, wd / "pre", export_dir)
    return promote.run(p.promote, model_dir, export_dir, wd / "metrics.json", wd / tag / "registry.json",
                       p.tasks["classify"].model_name)  # fmt: skip


@pytest.mark.slow
def test_champion_then_challenger_then_new_champion_and_serving(workdir: Path) -> None:
    import warnings

    from mlflow.tracking import MlflowClient

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _train_and_promote(workdir, "v1", 0.80, seed=1)
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "input example" in m.lower()], said  # MLflow's "An input example was not provided"
    assert (first.version, first.alias, first.previous_champion) == ("1", "champion", None)
    second = _train_and_promote(workdir, "v2", 0.70, seed=2, export_dir=workdir / "export")
    assert (second.version, second.alias, second.previous_champion) == ("2", "challenger", "1")
    third = _train_and_promote(workdir, "v3", 0.90, seed=3, export_dir=workdir / "export")
    assert len({first.run_id, second.run_id, third.run_id}) == 3, "each version is filed under its model's run"
    assert third.run_id == tracking.run_for_model(weights_hash(workdir / "v3/model"), workdir / "v3/model")
    assert (third.version, third.alias, third.previous_champion, third.previous_value) == ("3", "champion", "1", 0.8)

    assert tracking.alias_version(NAME, "champion") == "3"
    assert tracking.alias_version(NAME, "challenger") == "2"
    assert json.loads((workdir / "v3/registry.json").read_text()) | {"reason": ""} == {
        "model_name": NAME, "version": "3", "alias": "champion", "run_id": third.run_id, "metric": "val_auc",
        "value": 0.9, "previous_champion": "1", "previous_value": 0.8, "reason": "",
    }
    client = MlflowClient()
    mv = client.get_model_version(NAME, "3")
    assert mv.run_id == third.run_id
    # what a reviewer reads in the registry list, and nothing more
    assert set(mv.tags) == {"val_auc", "test_auc", "threshold", "promotion", "git_commit", "dvc_data_hash",
                            "params_hash", "model_sha256"}  # fmt: skip
    assert len(mv.tags) <= tracking.MAX_VERSION_TAGS
    assert mv.tags["model_sha256"] == weights_hash(workdir / "v3/model")
    assert (mv.tags["dvc_data_hash"], mv.tags["params_hash"]) == (PROVENANCE["data_hash"], PROVENANCE["params_hash"])
    assert mv.tags["git_commit"]  # the registry version, not a DVC output, carries the commit
    assert (mv.tags["val_auc"], mv.tags["test_auc"], mv.tags["threshold"]) == ("0.9", "0.75", "0.5")
    assert mv.tags["promotion"] == f"@champion: {third.reason}" and "beats champion v1" in third.reason
    assert client.get_model_version(NAME, "2").tags["promotion"].startswith("@challenger: val_auc 0.7000 does not")
    # the rest: a JSON artifact of the version's run
    record = json.loads(Path(tracking.download_artifact(
        third.run_id, tracking.version_details_path(NAME, "3"), workdir / "dl")).read_text())  # fmt: skip
    assert (record["version"], record["run_id"], record["alias"]) == ("3", third.run_id, "champion")
    assert record["tags"] == mv.tags
    assert record["validation"] == {"val_auc": 0.9, "val_accuracy": 0.7, "val_f1": 0.6}
    assert record["test"]["test_accuracy"] == 0.7 and record["test"]["n_test"] == 6
    assert record["export"]["family"] == "cnn" and record["export"]["package"] == "MedpipeClassifier.mlpackage"
    assert record["provenance"]["model_sha256"] == weights_hash(workdir / "v1/model")  # the shared export's
    assert client.get_run(third.run_id).info.status == "FINISHED", "promote ends the pipeline's run"

    import mlflow.models

    example = mlflow.models.get_model_info(f"models:/{NAME}/3").saved_input_example_info
    assert example is not None, "the pyfunc has an input example"

    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    x = np.load(workdir / "pre/test_x.npy").astype(np.float32)
    out = model.predict(x)
    assert list(out.columns) == ["prob_normal", "prob_lesion", "label"] and len(out) == len(x)
    spec = ModelSpec.load(workdir / "v1/model/model.json")  # the export all versions share
    want = export.predict_torch(export.with_softmax(load_trained(workdir / "v1/model")[1]), x)
    assert np.abs(out[["prob_normal", "prob_lesion"]].to_numpy() - want).max() < 1e-4
    assert list(out["label"]) == [spec.class_names[i] for i in want.argmax(1)]
    # MLflow's DataFrame form for a tensor signature: one column, each cell a flattened sample
    flat = model.predict(pd.DataFrame({"x": list(x.reshape(len(x), -1))}))
    assert np.allclose(flat[["prob_normal", "prob_lesion"]].to_numpy(), want, atol=1e-4)
    with pytest.raises(Exception, match="shape"):
        model.predict(x[:, :, :16, :16])


def test_missing_metric_names_file_and_setting(workdir: Path) -> None:
    model_dir = make_trained(workdir)
    p = tiny_params(**{"promote.metric": "val_kappa"})
    with pytest.raises(KeyError, match=r"val_metrics\.json.*promote\.metric"):
        promote.run(p.promote, model_dir, workdir / "export", workdir / "metrics.json", workdir / "registry.json",
                    p.tasks["classify"].model_name)  # fmt: skip
    assert not (workdir / "registry.json").exists()


@pytest.mark.parametrize(
    ("metric", "test", "expected"),
    [
        ("val_auc", {"test_auc": 0.75, "threshold": 0.3}, {"val_auc": "0.8", "test_auc": "0.75", "threshold": "0.3"}),
        ("val_loss", {"test_auc": 0.75}, {"val_loss": "0.4"}),  # no test_loss: no counterpart tag
    ],
)
def test_version_tags_are_few(metric: str, test: dict[str, float], expected: dict[str, str]) -> None:
    val = {"val_auc": 0.8, "val_loss": 0.4, "val_accuracy": 0.7, "val_f1": 0.6, "best_epoch": 3.0}
    metadata = {"dvc_data_hash": PROVENANCE["data_hash"], "params_hash": PROVENANCE["params_hash"]}  # export.json's
    record = {"metadata": metadata, "family": "cnn", "arch": "resnet18"}
    tags = promote.version_tags(metric, val, test, record, "f" * 64, "@champion: no champion yet")
    assert tags == {**expected, "promotion": "@champion: no champion yet", "git_commit": tags["git_commit"],
                    "dvc_data_hash": PROVENANCE["data_hash"], "params_hash": PROVENANCE["params_hash"],
                    "model_sha256": "f" * 64}  # fmt: skip
    assert len(tags) <= tracking.MAX_VERSION_TAGS


def test_an_equal_value_does_not_beat_its_recorded_tag() -> None:
    recorded, decide = promote.recorded, promote.decide
    value = 0.9445942569587191  # a segmenter's val_dice; its version tag says 0.944594
    assert recorded(value) == 0.944594 and value > recorded(value)
    assert decide(recorded(value), "2", recorded(value), True, "val_dice")[0] == "challenger"
    assert decide(recorded(value + 1e-5), "2", recorded(value), True, "val_dice")[0] == "champion"


@pytest.mark.parametrize(
    ("value", "champion", "champion_value", "greater", "alias"),
    [
        (0.5, None, None, True, "champion"),
        (0.9, "1", 0.8, True, "champion"),
        (0.8, "1", 0.8, True, "challenger"),  # a tie keeps the champion
        (0.7, "1", 0.8, True, "challenger"),
        (0.7, "1", 0.8, False, "champion"),  # e.g. a loss
        (0.9, "1", None, True, "challenger"),  # nothing to compare with: a person decides
        (math.nan, "1", 0.8, True, "challenger"),
        (0.6, "1", math.nan, True, "champion"),
    ],
)
def test_decide(value: float, champion: str | None, champion_value: float | None, greater: bool, alias: str) -> None:
    assert promote.decide(value, champion, champion_value, greater, "val_auc")[0] == alias


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,  # (N, C, H, W)
        lambda x: x.reshape(len(x), -1),  # flat rows
        lambda x: pd.DataFrame(x.reshape(len(x), -1)),  # one column per value
        lambda x: pd.DataFrame({"x": list(x.reshape(len(x), -1))}),  # one column of flattened samples
        lambda x: x.astype(np.float64),
    ],
)
def test_pyfunc_input_forms(make) -> None:
    from tasks.coreml.pyfunc import as_batch

    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    got = as_batch(make(x), (1, 8, 8))
    assert got.dtype == np.float32 and got.shape == (3, 1, 8, 8) and np.allclose(got, x)
    assert as_batch(x[0], (1, 8, 8)).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"expected \(N, 1, 8, 8\)"):
        as_batch(x[:, :, :4], (1, 8, 8))
