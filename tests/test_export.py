"""export: a tiny fabricated model + data -> .mlpackage (spec, labels, metadata), ONNX, parity; SVM refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks import export, tracking
from tasks.coreml import convert as coreml
from tasks.config import Params, load_params
from tasks.models.networks import ModelSpec, load_trained
from tests._fake import make_preprocessed

REPO = Path(__file__).resolve().parents[1]
SPEC_2D = ModelSpec("cnn", "resnet10", 2, 1, 2, (1, 32, 32), ("normal", "lesion"))


def make_trained(root: Path, spec: ModelSpec = SPEC_2D, val_auc: float = 0.8, seed: int = 0) -> Path:
    """Write what train leaves in ``<root>/model``: model.json, model.pt (fresh weights), val_metrics.json and
    mlflow_run.json (a new RUNNING run in the current tracking store)."""
    import torch

    from tasks.models.networks import build_model

    out = root / "model"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(build_model(spec).state_dict(), out / "model.pt")
    spec.save(out / "model.json")
    (out / "val_metrics.json").write_text(json.dumps({"val_auc": val_auc, "val_accuracy": 0.7, "val_f1": 0.6}))
    rid = tracking.start_run("medpipe-test", "test", {"model_family": spec.family}, {"train.arch": spec.arch})
    tracking.write_run_file(out, rid)
    return out


def tiny_params(**over: object) -> Params:
    return load_params(REPO / "params.yaml", {"export.parity_images": 8, **over})


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    make_preprocessed(tmp_path / "pre", n=(4, 4, 10), size=32)
    return tmp_path


@pytest.fixture()
def exported(workdir: Path) -> tuple[Path, export.ExportResult]:
    model_dir = make_trained(workdir)
    return model_dir, export.run(tiny_params(), model_dir, workdir / "pre", workdir / "export")


@pytest.mark.slow
def test_export_writes_a_checked_classifier_package(workdir: Path, exported: tuple[Path, export.ExportResult]) -> None:
    from mlflow.tracking import MlflowClient

    model_dir, res = exported
    assert res.package.name == "MedpipeClassifier.mlpackage" and res.package.is_dir()
    info = coreml.inspect_package(res.package)
    assert info["type"] == "mlProgram"
    assert info["input"] == {"name": "image", "kind": "image", "shape": [32, 32], "color": "GRAYSCALE"}
    assert sorted(info["outputs"]) == ["classLabel", "classLabel_probs"]
    assert info["predicted_feature"] == "classLabel" and info["probabilities_output"] == "classLabel_probs"
    assert info["class_labels"] == ["normal", "lesion"]
    meta = info["metadata"]
    run_id = tracking.read_run_id(model_dir)
    assert meta["mlflow_run_id"] == run_id
    assert meta["window_center"] == "40" and meta["window_width"] == "400"
    assert json.loads(meta["class_names"]) == ["normal", "lesion"]
    assert json.loads(meta["input_shape"]) == [1, 1, 32, 32]
    assert json.loads(meta["spacing_mm"]) == [0.7, 0.7]
    assert meta["dvc_data_hash"].startswith("sha256:")  # no dvc.lock in the test dir
    assert {"git_commit", "params_hash"} <= set(meta)
    assert info["author"] == "medpipe contributors" and info["license"] == "Apache-2.0"

    record = json.loads((workdir / "export/export.json").read_text())
    assert record["package_bytes"] == res.package_bytes > 0
    assert record["parity"]["images"] == 8
    assert record["parity"]["traced_vs_eager_max_abs"] < 1e-4
    assert record["parity"]["onnx_vs_eager_max_abs"] < 1e-4
    assert record["coreml"]["input_kind"] == "image" and "window center 40 HU" in record["coreml"]["input_description"]

    run = MlflowClient().get_run(run_id)
    assert run.data.metrics["export_parity_onnx_max_abs"] == record["parity"]["onnx_vs_eager_max_abs"]
    assert run.info.status == "RUNNING", "export logs into the pipeline's run and leaves it open"
    assert "export/export.json" in [f.path for f in MlflowClient().list_artifacts(run_id, "export")]


@pytest.mark.slow
def test_parity_above_tolerance_fails_naming_the_setting(workdir: Path) -> None:
    model_dir = make_trained(workdir)
    with pytest.raises(export.ExportError, match="export.parity_tolerance"):
        export.run(tiny_params(**{"export.parity_tolerance": 1e-12}), model_dir, workdir / "pre", workdir / "export")
    assert not (workdir / "export/export.json").exists(), "a failed export leaves no export.json for promote"


def test_svm_is_refused_naming_train_family(workdir: Path) -> None:
    model_dir = workdir / "model"
    model_dir.mkdir()
    ModelSpec("svm", "resnet18", 2, 1, 2, (1, 32, 32), ("normal", "lesion")).save(model_dir / "model.json")
    with pytest.raises(export.ExportError, match="train.family=svm"):
        export.run(tiny_params(), model_dir, workdir / "pre", workdir / "export")


def test_input_shape_mismatch_names_both_files(workdir: Path) -> None:
    model_dir = workdir / "model"
    model_dir.mkdir()
    ModelSpec("cnn", "resnet10", 2, 1, 2, (1, 64, 64), ("normal", "lesion")).save(model_dir / "model.json")
    with pytest.raises(export.ExportError, match=r"model\.json.*meta\.json"):
        export.run(tiny_params(), model_dir, workdir / "pre", workdir / "export")


@pytest.mark.parametrize(
    ("spec", "intensity", "kind", "name", "color"),
    [
        (SPEC_2D, {"kind": "hu_window", "center": 40.0, "width": 400.0}, "image", "image", "GRAYSCALE"),
        (SPEC_2D, {"kind": "uint8"}, "image", "image", "GRAYSCALE"),
        (ModelSpec("cnn", "resnet10", 2, 3, 2, (3, 32, 32)), {"kind": "uint8"}, "image", "image", "RGB"),
        (ModelSpec("cnn", "resnet10", 2, 3, 2, (3, 32, 32)), {"kind": "hu_window", "center": 0, "width": 1},
         "multiarray", "input", None),
        (ModelSpec("cnn", "resnet10", 3, 1, 2, (1, 8, 16, 16)), {"kind": "hu_window", "center": 0, "width": 1},
         "multiarray", "volume", None),
    ],
)
def test_input_contract(spec: ModelSpec, intensity: dict, kind: str, name: str, color: str | None) -> None:
    contract = coreml.input_contract(spec, {"intensity": intensity})
    assert (contract.kind, contract.name, contract.color) == (kind, name, color)
    assert contract.shape == (1, *spec.input_shape)


@pytest.mark.parametrize(
    ("model_name", "package"),
    [("medpipe-classifier", "MedpipeClassifier.mlpackage"), ("chest_ct v2", "ChestCtV2.mlpackage"),
     ("3d-net", "Model3dNet.mlpackage")],
)
def test_package_name(model_name: str, package: str) -> None:
    assert coreml.package_name(model_name) == package


@pytest.mark.slow
def test_3d_resnet_converts_to_a_multiarray_classifier(workdir: Path) -> None:
    spec = ModelSpec("cnn", "resnet10", 3, 1, 2, (1, 16, 16, 16), ("normal", "lesion"))
    make_preprocessed(workdir / "pre3d", n=(2, 2, 3), size=16, spatial_dims=3)
    model_dir = make_trained(workdir, spec)
    res = export.run(tiny_params(), model_dir, workdir / "pre3d", workdir / "export3d")
    info = coreml.inspect_package(res.package)
    assert info["input"] == {"name": "volume", "kind": "multiarray", "shape": [1, 1, 16, 16, 16], "color": None}
    assert info["class_labels"] == ["normal", "lesion"]
    assert max(res.parity["traced_vs_eager_max_abs"], res.parity["onnx_vs_eager_max_abs"]) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict needs macOS")
def test_coreml_predict_matches_torch_on_macos(workdir: Path, exported: tuple[Path, export.ExportResult]) -> None:
    import coremltools as ct
    import torch
    from PIL import Image

    model_dir, res = exported
    spec = ModelSpec.load(model_dir / "model.json")
    model = export.with_softmax(load_trained(model_dir)[1])
    mlmodel = ct.models.MLModel(str(res.package), compute_units=ct.ComputeUnit.CPU_ONLY)
    x = np.load(workdir / "pre/test_x.npy").astype(np.float32)[:4]
    pixels = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)  # the 8-bit rendering a device would pass
    with torch.inference_mode():
        want = model(torch.from_numpy(pixels.astype(np.float32) / 255)).numpy()
    for img, row in zip(pixels, want, strict=True):
        out = mlmodel.predict({"image": Image.fromarray(img[0])})
        got = np.array([out["classLabel_probs"][c] for c in spec.class_names])
        assert np.abs(got - row).max() < 1e-3
        assert out["classLabel"] == spec.class_names[int(row.argmax())]
