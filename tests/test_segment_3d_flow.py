"""3D segmentation end to end: the Prefect flow (real engine) runs the segment task alone through DVC on a tiny
synthetic cohort of 8-slice volumes whose masks are multi-frame DICOM SEG objects. Training samples 8x16x16 patches
(MONAI ``RandCropByPosNegLabel``), validation and evaluation run a sliding window of the patch size over whole
volumes, predictions go back as multi-frame DICOM SEG, and the Core ML package takes the volume as an MLMultiArray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests._repo import TINY, copy_repo, run_pipeline_flow

pytestmark = pytest.mark.slow

PATCH = [8, 16, 16]
TINY_SEGMENT_3D = {
    **TINY,
    "synth.slices_per_study": 8,
    "synth.image_size": 32,
    "tasks": {
        "segment": {"kind": "segmentation", "model_name": "medpipe-segmenter",
                    "preprocess": {"spatial_size": [8, 32, 32]},
                    "train": {"arch": "unet", "epochs": 12, "batch_size": 4, "select_metric": "dice", "lr": 0.01,
                              "ema": 0.0, "seg": {"channels": [8, 16, 32], "patch_size": PATCH}},
                    "promote": {"metric": "val_dice"}},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("seg3d"), TINY_SEGMENT_3D)


@pytest.fixture(scope="module")
def result(repo):
    return run_pipeline_flow(repo)


def test_volumes_train_on_patches_and_register(repo, result):
    ran = [s["stage"] for s in result["stages"] if s["ran"]]
    assert ran == ["synth", "ingest", *[f"{s}@segment" for s in ("preprocess", "train", "evaluate", "export",
                                                                  "promote")]]  # fmt: skip
    meta = json.loads((repo / "data/preprocessed/segment/meta.json").read_text())
    assert meta["spatial_dims"] == 3 and meta["input_shape"] == [1, 8, 32, 32]
    spec = json.loads((repo / "models/segment/train/model.json").read_text())
    assert spec["roi_size"] == PATCH  # the sliding window of validation and evaluation is the training patch
    reg = result["tasks"]["segment"]["registry"]
    assert (reg["model_name"], reg["version"], reg["alias"]) == ("medpipe-segmenter", "1", "champion")


def test_3d_segmenter_beats_the_floor(repo, result):
    """Whole-volume Dice of a model trained on patches clears a floor an untrained one misses (untrained: < 0.3)."""
    m = result["tasks"]["segment"]["metrics"]
    details = json.loads((repo / "reports/segment/evaluate/details.json").read_text())
    assert details["metrics"]["test_dice_lung"]["value"] >= 0.6, details["metrics"]["test_dice_lung"]
    for key in ("test_dice", "test_iou", "test_hd95", "test_surface_dice", "test_dice_original", "test_ap50"):
        assert key in m and np.isfinite(m[key]), key


def test_3d_predictions_come_back_as_multiframe_dicom_seg(repo, result):
    from tasks.dicom.seg import read_seg

    out = repo / "reports/segment/evaluate/outputs"
    geometry = json.loads((repo / "data/preprocessed/segment/test_geometry.json").read_text())
    preds = np.load(out / "predictions.npz")
    files = sorted((out / "dicom_seg").glob("*.dcm"))
    assert len(files) == len(geometry) == len(preds.files) > 0
    for path in files:
        seg, g = read_seg(path), geometry[path.stem]
        assert len(g["sop_instance_uids"]) == 8  # one frame reference per source slice
        label_map, _ = seg.to_label_map(g["sop_instance_uids"], ["lung", "lesion"])
        pred = preds[path.stem]
        assert pred.shape == (8, 32, 32) and label_map.reshape(pred.shape).tolist() == pred.tolist(), path.stem


def test_3d_segmenter_package_takes_the_volume(repo, result):
    from tasks.coreml.convert import inspect_package

    (pkg,) = (repo / "models/segment/export").glob("*.mlpackage")
    info = inspect_package(pkg)
    assert info["input"]["kind"] == "multiarray" and info["input"]["shape"] == [1, 1, 8, 32, 32], info
    assert info["output_shapes"]["probabilities"] == [1, 3, 8, 32, 32], info
