"""export: a tiny fabricated model + data -> .mlpackage (spec, labels, metadata), ONNX, parity; the output tree is
byte-identical across processes; SVM refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks import export, tracking
from tasks.config import Params, load_params, write_overrides
from tasks.coreml import convert as coreml
from tasks.models.networks import ModelSpec, load_trained, weights_hash
from tests._fake import PROVENANCE, SPEC_2D, make_preprocessed, make_trained

REPO = Path(__file__).resolve().parents[1]
TINY_EXPORT = {"export.parity_images": 8}


def tiny_params(**over: object) -> Params:
    return load_params(REPO / "params.yaml", {**TINY_EXPORT, **over})


def run_export(p: Params, model_dir: Path, data_dir: Path, output: Path) -> export.ExportResult:
    return export.run(p.export, model_dir, data_dir, output, p.tasks["classify"].model_name)


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    make_preprocessed(tmp_path / "pre", n=(4, 4, 10), size=32)
    return tmp_path


@pytest.fixture()
def exported(workdir: Path) -> tuple[Path, export.ExportResult]:
    model_dir = make_trained(workdir)
    return model_dir, run_export(tiny_params(), model_dir, workdir / "pre", workdir / "export")


def _keys(d: object) -> list[str]:
    """Every key of a nested JSON object."""
    return [k for key, v in d.items() for k in (key, *_keys(v))] if isinstance(d, dict) else []


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
    # provenance that is a function of the inputs: the weights' hash (it finds the MLflow run) and train's record
    assert meta["model_sha256"] == weights_hash(model_dir)
    assert (meta["dvc_data_hash"], meta["params_hash"]) == (PROVENANCE["data_hash"], PROVENANCE["params_hash"])
    assert not {"git_commit", "mlflow_run_id"} & set(meta), "no run ids or commits in a DVC-tracked output"
    assert meta["window_center"] == "40" and meta["window_width"] == "400"
    assert json.loads(meta["class_names"]) == ["normal", "lesion"]
    assert json.loads(meta["input_shape"]) == [1, 1, 32, 32]
    assert json.loads(meta["spacing_mm"]) == [0.7, 0.7]
    assert info["author"] == "medpipe contributors" and info["license"] == "Apache-2.0"

    record = json.loads((workdir / "export/export.json").read_text())
    assert record["package_bytes"] == res.package_bytes == sum(len(b) for b in _tree(res.package).values())
    assert record["onnx_bytes"] == (workdir / "export/model.onnx").stat().st_size
    assert record["parity"]["images"] == 8
    assert record["parity"]["traced_vs_eager_max_abs"] < 1e-4
    assert record["parity"]["onnx_vs_eager_max_abs"] < 1e-4
    assert record["coreml"]["input_kind"] == "image" and "window center 40 HU" in record["coreml"]["input_description"]
    assert not [k for k in _keys(record) if "second" in k or "duration" in k], "timings go to MLflow, not here"

    run_id = tracking.run_for_model(weights_hash(model_dir), model_dir)
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics["export_parity_onnx_max_abs"] == res.parity["onnx_vs_eager_max_abs"]
    assert "export_seconds_total" in run.data.metrics, "durations go to MLflow"
    assert run.info.status == "RUNNING", "export logs into the pipeline's run and leaves it open"
    assert "export/export.json" in [f.path for f in MlflowClient().list_artifacts(run_id, "export")]


@pytest.mark.slow
def test_export_is_byte_identical_across_processes(workdir: Path,
                                                   exported: tuple[Path, export.ExportResult]) -> None:
    """The same model and data exported again by the CLI in another process (other hash seed, other protobuf map
    order) give the same files, byte for byte: the .mlpackage (Manifest.json, spec, weights), model.onnx and
    export.json."""
    import coremltools as ct

    model_dir, res = exported
    shutil.copy(REPO / "params.yaml", workdir / "params.yaml")
    write_overrides(workdir / "params.yaml", TINY_EXPORT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "tasks.export", "--params", "params.yaml", "--model", str(model_dir),
                    "--data", "pre", "--output", "export-again"], cwd=workdir, env=env, check=True,
                   capture_output=True)  # fmt: skip
    first, again = _tree(workdir / "export"), _tree(workdir / "export-again")
    assert {"MedpipeClassifier.mlpackage/Manifest.json", "model.onnx", "export.json"} <= set(first)
    assert sorted(first) == sorted(again)
    assert [name for name in first if first[name] != again[name]] == []
    # the rewritten package is still one Core ML reads: the manifest's root entry leads to the same spec
    manifest = json.loads(first["MedpipeClassifier.mlpackage/Manifest.json"])
    assert manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"] == "com.apple.CoreML/model.mlmodel"
    spec = ct.models.MLModel(str(res.package), skip_model_load=True).get_spec()
    assert spec.description.predictedFeatureName == "classLabel"
    assert _tree(workdir / "export") == first, "loading the package does not rewrite it"


def test_make_deterministic_pins_what_coremltools_randomises(tmp_path: Path) -> None:
    """Two conversions of one network save packages whose Manifest.json differ (coremltools draws a random id per
    item when it converts); after make_deterministic they are the same bytes, and the spec reads back unchanged."""
    import coremltools as ct
    import torch
    from coremltools.libmodelpackage import ModelPackage

    spec = ModelSpec("cnn", "tiny", 2, 1, 2, (1, 4, 4), ("normal", "lesion"))
    contract = coreml.input_contract(spec, {"intensity": {"kind": "uint8"}})
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2), torch.nn.Softmax(dim=1)).eval()
    traced = torch.jit.trace(net, torch.rand(1, 1, 4, 4))
    packages = [tmp_path / "a.mlpackage", tmp_path / "b.mlpackage"]
    for package in packages:
        mlmodel = coreml.convert(traced, contract, list(spec.class_names), "iOS16")
        mlmodel.user_defined_metadata.update({"b": "2", "a": "1"})
        mlmodel.save(str(package))
    assert _tree(packages[0]) != _tree(packages[1]), "coremltools 9.0 writes a random id per item"
    before = ct.utils.load_spec(str(packages[0])).SerializeToString(deterministic=True)
    for package in packages:
        coreml.make_deterministic(package)
    assert _tree(packages[0]) == _tree(packages[1])
    assert ct.utils.load_spec(str(packages[0])).SerializeToString(deterministic=True) == before
    assert ModelPackage.isValid(str(packages[0]))
    manifest = json.loads((packages[0] / coreml.MANIFEST).read_text())
    assert len(manifest["itemInfoEntries"]) == 2 and manifest["rootModelIdentifier"] in manifest["itemInfoEntries"]


@pytest.mark.slow
def test_parity_above_tolerance_fails_naming_the_setting(workdir: Path) -> None:
    model_dir = make_trained(workdir)
    with pytest.raises(export.ExportError, match="export.parity_tolerance"):
        run_export(tiny_params(**{"export.parity_tolerance": 1e-12}), model_dir, workdir / "pre", workdir / "export")
    assert not (workdir / "export/export.json").exists(), "a failed export leaves no export.json for promote"


def test_svm_is_refused_naming_train_family(workdir: Path) -> None:
    model_dir = workdir / "model"
    model_dir.mkdir()
    ModelSpec("svm", "resnet18", 2, 1, 2, (1, 32, 32), ("normal", "lesion")).save(model_dir / "model.json")
    with pytest.raises(export.ExportError, match="train.family=svm"):
        run_export(tiny_params(), model_dir, workdir / "pre", workdir / "export")


def test_input_shape_mismatch_names_both_files(workdir: Path) -> None:
    model_dir = workdir / "model"
    model_dir.mkdir()
    ModelSpec("cnn", "resnet10", 2, 1, 2, (1, 64, 64), ("normal", "lesion")).save(model_dir / "model.json")
    with pytest.raises(export.ExportError, match=r"model\.json.*meta\.json"):
        run_export(tiny_params(), model_dir, workdir / "pre", workdir / "export")


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
    res = run_export(tiny_params(), model_dir, workdir / "pre3d", workdir / "export3d")
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
