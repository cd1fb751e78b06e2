"""Segmentation and detection end to end: the Prefect flow (real engine) runs both default tasks through DVC on a
tiny synthetic cohort whose masks are DICOM SEG objects; the segmenter is trained, evaluated (Dice floor, detection),
written back as DICOM SEG, exported to Core ML and registered beside the classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests._repo import TINY_SEGMENT, copy_repo, dvc, run_pipeline_flow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("seg"), TINY_SEGMENT)


@pytest.fixture(scope="module")
def result(repo):
    return run_pipeline_flow(repo)


def test_both_tasks_run_and_register_a_champion(repo, result):
    ran = [s["stage"] for s in result["stages"] if s["ran"]]
    per_task = ("preprocess", "train", "evaluate", "export", "promote")
    assert ran == ["synth", "ingest", *[f"{s}@classify" for s in per_task], *[f"{s}@segment" for s in per_task]]
    for task, name in (("classify", "medpipe-classifier"), ("segment", "medpipe-segmenter")):
        reg = result["tasks"][task]["registry"]
        assert (reg["model_name"], reg["version"], reg["alias"]) == (name, "1", "champion")
        assert reg == json.loads((repo / f"models/{task}/registry.json").read_text())
    assert result["tasks"]["segment"]["kind"] == "segmentation"


def test_segmenter_beats_the_floor(repo, result):
    """A trained segmenter clears a Dice floor an untrained or broken one misses (untrained: ~0.1-0.2)."""
    m = result["tasks"]["segment"]["metrics"]
    details = json.loads((repo / "reports/segment/evaluate/details.json").read_text())
    assert m == json.loads((repo / "reports/segment/evaluate/metrics.json").read_text())
    assert m["n_test"] > 0
    assert details["metrics"]["test_dice_lung"]["value"] >= 0.6, details["metrics"]["test_dice_lung"]
    assert m["test_dice"] >= 0.4, m
    for key in ("test_iou", "test_hd95", "test_surface_dice", "test_dice_original", "test_ap50", "test_sens_at_1fp"):
        assert key in m and np.isfinite(m[key]), key
    ci = details["metrics"]["test_dice"]
    assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]
    # the original grid (64 px) and the model's (32 px) agree roughly: the mapping back is right
    assert abs(m["test_dice_original"] - m["test_dice"]) < 0.15, m
    per_case = (repo / "reports/segment/evaluate/outputs/per_case.csv").read_text().splitlines()
    assert len(per_case) == m["n_test"] + 1
    assert {p.name for p in (repo / "reports/segment/evaluate/outputs/overlays").glob("*.png")} == {
        "best.png", "median.png", "worst.png"}


def test_predictions_come_back_as_dicom_seg(repo, result):
    """Every test prediction is a DICOM SEG that references its source series; read back, it equals the prediction
    on the image's own grid, with the image's geometry."""
    from tasks.dicom.seg import read_seg

    outputs = repo / "reports/segment/evaluate/outputs"
    preds = np.load(outputs / "predictions.npz")
    geometry = json.loads((repo / "data/preprocessed/segment/test_geometry.json").read_text())
    files = sorted((outputs / "dicom_seg").glob("*.dcm"))
    assert len(files) == len(preds.files) == result["tasks"]["segment"]["metrics"]["n_test"]
    classes = ["lung", "lesion"]
    for path in files:
        image_id = path.stem
        seg, g = read_seg(path), geometry[image_id]
        assert seg.series_uid == g["series_instance_uid"] and seg.frame_of_reference == g["frame_of_reference_uid"]
        label_map, _ = seg.to_label_map(g["sop_instance_uids"], classes)
        pred = preds[image_id]
        assert label_map.reshape(pred.shape).tolist() == pred.tolist(), image_id
        assert np.allclose(seg.pixel_spacing, g["pixel_spacing"])


def test_segmenter_package_spec(repo, result):
    """The Core ML segmenter: one per-class probability map at the model's size, the class names in its metadata."""
    from tasks.coreml.convert import inspect_package

    (pkg,) = (repo / "models/segment/export").glob("*.mlpackage")
    info = inspect_package(pkg)
    assert info["output_shapes"]["probabilities"] == [1, 3, 32, 32], info
    assert json.loads(info["metadata"]["class_names"]) == ["background", "lung", "lesion"]
    assert info["metadata"]["task_kind"] == "segmentation"


def test_same_seed_same_dice(repo, result):
    """Retraining with the same seed and data gives the same validation and test Dice."""
    before = json.loads((repo / "reports/segment/evaluate/metrics.json").read_text())
    val_before = json.loads((repo / "models/segment/train/val_metrics.json").read_text())
    dvc(repo, "repro", "--force", "--single-item", "train@segment")
    dvc(repo, "repro", "--force", "--single-item", "evaluate@segment")
    assert json.loads((repo / "models/segment/train/val_metrics.json").read_text()) == val_before
    assert json.loads((repo / "reports/segment/evaluate/metrics.json").read_text()) == before


def _writer_constants(repo, tmp) -> set[str]:
    """Every text value of a prediction SEG written from dummy UIDs and ids onto a real test image's grid."""
    import pydicom

    from tasks.dicom.seg import write_prediction_seg

    geometry = next(iter(json.loads((repo / "data/preprocessed/segment/test_geometry.json").read_text()).values()))
    n = len(geometry["sop_instance_uids"])
    dummy = {**geometry, "patient_id": "DUMMY", "sop_instance_uids": [f"1.2.3.{i + 1}" for i in range(n)],
             "series_instance_uid": "1.2.3.100", "study_instance_uid": "1.2.3.200",
             "frame_of_reference_uid": "1.2.3.300"}
    shape = (geometry["rows"], geometry["columns"]) if n == 1 else (n, geometry["rows"], geometry["columns"])
    path = write_prediction_seg(dummy, np.ones(shape, np.uint8), ["lung", "lesion"], tmp / "blank.dcm",
                                algorithm_name="medpipe unet", algorithm_version="0")  # fmt: skip
    found = set()
    for elem in pydicom.dcmread(path).iterall():
        if elem.VR not in ("SQ", "OB", "OW", "UN"):
            raw = elem.value if isinstance(elem.value, (list, tuple)) or elem.VM > 1 else [elem.value]
            found |= {str(v).strip() for v in raw}
    return found


def test_no_identifying_value_reaches_the_segmentation_outputs(repo, result, tmp_path_factory):
    """The PHI scan of test_pipeline.py over what the segmentation task adds: the ingested masks and geometry, its
    tensors, the predicted masks (npz and DICOM SEG), reports, the exported packages and the MLflow store."""
    from tasks.config import load_params
    from tasks.dicom.pseudonym import Pseudonymizer
    from tests.test_pipeline import _identifying_values

    pseudo = Pseudonymizer.from_params(load_params(repo / "params.yaml").ingest.deid)
    values = _identifying_values(repo / "data/synthetic/dicom", pseudo)
    assert len(values) > 100, "the cohort should carry names, ids, UIDs and dates to look for"
    # the cohort's SEGs and the predicted ones are both written by highdicom: text it writes into every SEG
    # (e.g. the contributing equipment's purpose, "Software library used to create this instance") is the software's,
    # not a patient's; found by writing a SEG from a geometry whose every UID and id is a dummy
    values -= _writer_constants(repo, tmp_path_factory.mktemp("blank"))
    outputs = [p for d in ("data/ingested/masks", "data/ingested/geometry", "data/preprocessed/segment",
                           "models/segment", "reports/segment", "mlflow")
               for p in (repo / d).rglob("*") if p.is_file()]  # fmt: skip
    assert any(p.suffix == ".dcm" for p in outputs) and any(p.name == "test_geometry.json" for p in outputs)
    encoded = [(v, v.encode()) for v in values]
    hits = [f"{p.relative_to(repo)}: {v}" for p in outputs for v, b in encoded if b in p.read_bytes()]
    assert not hits, f"{len(hits)} identifying values in the outputs: {hits[:10]}"
