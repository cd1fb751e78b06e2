"""export of a segmenter: a MONAI U-Net (2D and 3D) + a fabricated segmentation preprocess output -> .mlpackage with
one ``probabilities`` output (1, K, *S) and the class names in its metadata, ONNX sibling, parity; a trace that
does not match the eager model is refused; the pyfunc returns probability and label maps."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tasks import export, tracking
from tasks.config import load_params
from tasks.coreml import convert as coreml
from tasks.models.networks import ModelSpec, weights_hash
from tasks.schema import ExportParams
from tests._fake import PROVENANCE, SPEC_2D, make_trained

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "lung", "lesion"]
CHANNELS = (8, 16, 32)
N_TEST = 4


def export_params(**update: object) -> ExportParams:
    """The real params' export group for the segmentation task (its overrides, once tasks.config has them)."""
    p = load_params(REPO / "params.yaml", {"export.parity_images": N_TEST})
    ep = p.for_task("segment").export if hasattr(p, "for_task") else p.export
    return ep.model_copy(update={"parity_images": N_TEST, **update})


def make_seg_preprocessed(out: Path, size: int, spatial_dims: int = 2, class_names: list[str] = CLASSES) -> Path:
    """What preprocess writes for a segmentation task, as far as export reads it: meta.json and test_x.npy (plus
    test_m.npy and test_ids.csv). Image 0 is dark (mean ~0.15), the others bright (~0.75): a trace taken on image 0
    and a branch on the mean then disagree on the rest."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    spatial = (size,) * spatial_dims
    x = rng.random((N_TEST, 1, *spatial)) * 0.3
    x[1:] += 0.6
    m = np.zeros((N_TEST, *spatial), np.uint8)
    m[(slice(None), *(slice(size // 4, 3 * size // 4),) * spatial_dims)] = 1
    m[(slice(None), *(slice(size // 4, size // 2),) * spatial_dims)] = 2
    np.save(out / "test_x.npy", x.astype(np.float16))
    np.save(out / "test_m.npy", m)
    with (out / "test_ids.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "patient_id", "label", "orig_shape", "spacing"])
        w.writerows([f"test{i}", f"p{i}", -1, json.dumps([2 * size] * spatial_dims), json.dumps([0.7] * spatial_dims)]
                    for i in range(N_TEST))  # fmt: skip
    meta = {
        "task_kind": "segmentation", "spatial_dims": spatial_dims, "in_channels": 1, "input_shape": [1, *spatial],
        "num_classes": len(class_names), "class_names": class_names, "spatial_size": list(spatial),
        "intensity": {"kind": "hu_window", "center": 40.0, "width": 400.0, "a_min": -160.0, "a_max": 240.0},
        "source_spacing_mm": [0.7] * spatial_dims, "counts": {"train": 0, "val": 0, "test": N_TEST},
        "storage_dtype": "float16", "resized": True,
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def unet_spec(spatial_dims: int, size: int) -> ModelSpec:
    """A small MONAI U-Net's model.json (3 levels of :data:`CHANNELS`)."""
    return ModelSpec("cnn", "unet", spatial_dims, 1, len(CLASSES), (1, *(size,) * spatial_dims), tuple(CLASSES),
                     channels=CHANNELS)  # fmt: skip


def make_seg_model(root: Path, spec: ModelSpec, net: object | None = None) -> tuple[Path, object, bool]:
    """Write train's output for ``spec`` (fresh weights from seed 0) and open its MLflow run tagged with the weights'
    hash. The network is ``net`` if given, else what ``build_model`` builds for ``spec``.

    Returns:
        (model folder, the network in eval mode, whether ``export.run`` can rebuild it from the folder).
    """
    import torch

    from tasks.models.networks import build_model

    torch.manual_seed(0)
    loadable = net is None
    net = build_model(spec) if net is None else net
    out = root / "model"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "model.pt")
    spec.save(out / "model.json")
    (out / "val_metrics.json").write_text(json.dumps({"val_dice": 0.5}))
    (out / "provenance.json").write_text(json.dumps(PROVENANCE))
    rid = tracking.start_run("medpipe-test", "test", {"model_family": spec.family}, {"train.arch": spec.arch})
    tracking.tag_model(rid, weights_hash(out))
    return out, net.eval(), loadable


def export_seg(ep: ExportParams, root: Path, spec: ModelSpec, data: Path, net: object | None = None
               ) -> tuple[export.ExportResult, object]:  # fmt: skip
    """Export through ``export.run`` when the model folder can be rebuilt (``net`` None), else through
    ``export.export_network`` (the same code after loading)."""
    model_dir, net, loadable = make_seg_model(root, spec, net)
    if loadable:
        return export.run(ep, model_dir, data, root / "export", "medpipe-segmenter"), net
    return export.export_network(ep, spec, net, model_dir, data, root / "export", "medpipe-segmenter"), net


def torch_probabilities(net: object, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


@pytest.mark.slow
def test_2d_unet_exports_a_probability_map_segmenter(workdir: Path) -> None:
    import onnxruntime as ort

    data = make_seg_preprocessed(workdir / "pre", size=32)
    ep = export_params()
    res, net = export_seg(ep, workdir, unet_spec(2, 32), data)
    assert res.task_kind == "segmentation" and res.package.name == "MedpipeSegmenter.mlpackage"

    info = coreml.inspect_package(res.package)
    assert info["type"] == "mlProgram"
    assert info["input"] == {"name": "image", "kind": "image", "shape": [32, 32], "color": "GRAYSCALE"}
    assert info["outputs"] == ["probabilities"]
    assert info["output_shapes"]["probabilities"] == [1, 3, 32, 32]
    assert info["output_dtypes"]["probabilities"] == "FLOAT32"
    assert info["class_labels"] == [], "a segmenter is not a Core ML classifier"
    meta = info["metadata"]
    assert json.loads(meta["class_names"]) == CLASSES
    assert meta["task_kind"] == "segmentation"
    assert json.loads(meta["spatial_size"]) == [32, 32] and json.loads(meta["output_shape"]) == [1, 3, 32, 32]
    assert json.loads(meta["spacing_mm"]) == [0.7, 0.7]
    assert meta["output_layout"] == "(batch, class, H, W)"
    assert "ResizeWithPadOrCrop" in json.loads(meta["map_back"])["rule"]
    assert json.loads(meta["map_back"])["spatial_size"] == [32, 32]
    assert meta["window_center"] == "40" and "val_threshold" not in meta
    contract = coreml.input_contract(unet_spec(2, 32), json.loads((data / "meta.json").read_text()))
    assert coreml.spec_mismatches(info, contract, CLASSES, "segmentation") == []
    assert [m.split(":")[0] for m in coreml.spec_mismatches(info, contract, ["background", "lesion"],
                                                            "segmentation")] == ["output shape", "metadata class_names"]

    record = json.loads((workdir / "export/export.json").read_text())
    assert record["task_kind"] == "segmentation" and record["class_names"] == CLASSES
    assert record["coreml"]["probabilities_output"] == "probabilities" and record["coreml"]["label_output"] is None
    assert record["coreml"]["output_shape"] == [1, 3, 32, 32]
    assert record["parity"]["images"] == N_TEST
    assert max(res.parity["traced_vs_eager_max_abs"], res.parity["onnx_vs_eager_max_abs"]) <= ep.parity_tolerance

    # the ONNX sibling, run here independently of export, gives torch's probability maps
    x = np.load(data / "test_x.npy").astype(np.float32)
    session = ort.InferenceSession(str(res.onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    want = torch_probabilities(net, x)
    assert got.shape == (N_TEST, 3, 32, 32)
    assert np.abs(got - want).max() <= ep.parity_tolerance
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_cli_task_segment_exports_the_same_bytes_in_another_process(workdir: Path) -> None:
    """``python -m tasks.export --task segment`` (the segment task's model_name and export overrides), in another
    process with another hash seed, writes the same files as the in-process export, byte for byte."""
    data = make_seg_preprocessed(workdir / "pre", size=32)
    ep = export_params(parity_images=0)  # test_x.npy has N_TEST images: 0 (= all) is the same set
    res, _ = export_seg(ep, workdir, unet_spec(2, 32), data)
    shutil.copy(REPO / "params.yaml", workdir / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "4321"}
    out = subprocess.run([sys.executable, "-m", "tasks.export", "--params", "params.yaml", "--task", "segment",
                          "--model", "model", "--data", "pre", "--output", "export-again"], cwd=workdir, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "segmentation" in out.stdout and "MedpipeSegmenter.mlpackage" in out.stdout

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first, again = tree(workdir / "export"), tree(workdir / "export-again")
    assert {"MedpipeSegmenter.mlpackage/Manifest.json", "model.onnx", "export.json"} <= set(first)
    assert sorted(first) == sorted(again)
    assert [name for name in first if first[name] != again[name]] == []
    assert res.package == workdir / "export/MedpipeSegmenter.mlpackage"


@pytest.mark.slow
def test_pyfunc_returns_probability_and_label_maps(workdir: Path) -> None:
    """The served model (the pyfunc class, loaded from real export artifacts) returns (N, K, H, W) float32
    probabilities, or with params output=labels the (N, H, W) argmax label maps."""
    import mlflow.pyfunc

    from tasks.coreml import pyfunc

    data = make_seg_preprocessed(workdir / "pre", size=32)
    res, net = export_seg(export_params(), workdir, unet_spec(2, 32), data)
    model = pyfunc.CoreMLModel()
    model.load_context(mlflow.pyfunc.PythonModelContext(artifacts={
        pyfunc.ARTIFACT_PACKAGE: str(res.package), pyfunc.ARTIFACT_ONNX: str(res.onnx),
        pyfunc.ARTIFACT_EXPORT_JSON: str(workdir / "export/export.json"),
    }, model_config={}))
    x = np.load(data / "test_x.npy").astype(np.float32)
    probs = model.predict(None, x)
    assert probs.dtype == np.float32 and probs.shape == (N_TEST, 3, 32, 32)
    assert np.abs(probs - torch_probabilities(net, x)).max() <= 1e-4
    labels = model.predict(None, x, params={"output": "labels"})
    assert labels.dtype == np.uint8 and labels.shape == (N_TEST, 32, 32)
    assert np.array_equal(labels, probs.argmax(axis=1))
    with pytest.raises(ValueError, match="output='logits'"):
        model.predict(None, x, params={"output": "logits"})


@pytest.mark.slow
def test_3d_unet_exports_a_multiarray_segmenter(workdir: Path) -> None:
    """A 3D U-Net upsamples with ConvTranspose3d(output_padding=1), which coremltools 9.0 cannot convert as it
    is: the Core ML copy crops instead (coreml_compatible), and the parity check holds it to the eager model."""
    data = make_seg_preprocessed(workdir / "pre3d", size=16, spatial_dims=3)
    ep = export_params()
    res, _ = export_seg(ep, workdir, unet_spec(3, 16), data)
    info = coreml.inspect_package(res.package)
    assert res.input_kind == "multiarray"
    assert info["input"] == {"name": "volume", "kind": "multiarray", "shape": [1, 1, 16, 16, 16], "color": None}
    assert info["outputs"] == ["probabilities"]
    assert info["output_shapes"]["probabilities"] == [1, 3, 16, 16, 16]
    assert json.loads(info["metadata"]["class_names"]) == CLASSES
    assert info["metadata"]["output_layout"] == "(batch, class, D, H, W)"
    assert res.parity["images"] == N_TEST
    assert max(res.parity["traced_vs_eager_max_abs"], res.parity["onnx_vs_eager_max_abs"]) <= ep.parity_tolerance


def test_coreml_compatible_crops_instead_of_output_padding() -> None:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1),
        torch.nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1),
    ).eval()
    copy = coreml.coreml_compatible(net)
    assert copy is not net and isinstance(net[1], torch.nn.ConvTranspose3d), "the original is left as it was"
    assert not [m for m in copy.modules() if isinstance(m, torch.nn.ConvTranspose3d) and any(m.output_padding)]
    x = torch.rand(2, 1, 5, 6, 7)
    with torch.inference_mode():
        want, got = net(x), copy(x)
    assert got.shape == want.shape == (2, 2, 10, 12, 14)
    assert torch.abs(got - want).max().item() < 1e-6
    plain = torch.nn.Sequential(torch.nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1, output_padding=1))
    assert coreml.coreml_compatible(plain) is plain, "2D output_padding converts as it is"


@pytest.mark.slow
def test_parity_above_tolerance_refuses_the_export(workdir: Path) -> None:
    data = make_seg_preprocessed(workdir / "pre", size=32)
    with pytest.raises(export.ExportError, match="export.parity_tolerance"):
        export_seg(export_params(parity_tolerance=1e-12), workdir, unet_spec(2, 32), data)
    assert not (workdir / "export/export.json").exists(), "a failed export leaves no export.json for promote"


@pytest.mark.slow
def test_a_trace_that_differs_from_the_eager_model_is_refused(workdir: Path) -> None:
    """A network with data-dependent control flow: the trace (taken on the dark test image 0) keeps one branch, the
    eager model takes the other on the bright images, and export refuses at the default tolerance."""
    import torch

    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, len(CLASSES), 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * 4 if bool(x.mean() > 0.5) else y

    data = make_seg_preprocessed(workdir / "pre", size=32)
    model_dir, net, _ = make_seg_model(workdir, unet_spec(2, 32), Branchy())
    with warnings.catch_warnings(), pytest.raises(export.ExportError, match="parity check failed") as caught:
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        export.export_network(export_params(), unet_spec(2, 32), net, model_dir, data, workdir / "export", "seg")
    assert "test_x.npy" in str(caught.value)
    assert not (workdir / "export/export.json").exists()


def test_segmentation_data_with_a_classifier_is_refused_naming_both_files(workdir: Path) -> None:
    data = make_seg_preprocessed(workdir / "pre", size=32)
    model_dir = make_trained(workdir, dataclasses.replace(SPEC_2D, num_classes=3, class_names=tuple(CLASSES)))
    with pytest.raises(export.ExportError, match=r"model\.json: train\.arch=resnet10 .*meta\.json"):
        export.run(export_params(), model_dir, data, workdir / "export", "medpipe-segmenter")


@pytest.mark.parametrize(
    ("class_names", "num_classes"),
    [(["lung", "lesion"], 2), (["background", "lung", "lesion"], 2), ([], 0)],
)
def test_segmentation_meta_needs_background_first(tmp_path: Path, class_names: list[str], num_classes: int) -> None:
    data = make_seg_preprocessed(tmp_path / "pre", size=16, class_names=class_names)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "num_classes": num_classes}))
    with pytest.raises(export.ExportError, match=r"meta\.json: a segmentation task's class_names start with"):
        export.read_meta(data)
