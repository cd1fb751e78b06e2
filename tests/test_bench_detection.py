"""benchmarks/detection.py: MONAI RetinaNet on the segmentation benchmark's data, scored by the pipeline's metric.

The fast tests check the two adapters the comparison rests on (flips move boxes with the image; boxes fed to
``tasks.segmetrics.detection_metrics`` score as the truth they are); the slow one runs ``main`` on a tiny image folder
of bright disks through the real ingest and preprocess stages and a tiny RetinaNet, which must find the disks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import detection as bench

N_TRAIN, N_TEST, SIZE = 28, 8, 64


def make_disk_folder(root: Path, seed: int = 0) -> Path:
    """images/, masks/, manifest.csv, splits/train1.txt + val1.txt (the BUSI layout) of 64x64 noisy images with one
    bright disk each (radius 7-13 px) and its {0, 255} mask."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    ids = [f"case_{i:02d}" for i in range(N_TRAIN + N_TEST)]
    rows = ["id,label"]
    for i, ident in enumerate(ids):
        r = rng.uniform(7, 13)
        cy, cx = rng.uniform(r + 2, SIZE - r - 2, size=2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        image = np.clip(rng.normal(60, 15, (SIZE, SIZE)) + 140 * mask, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{ident}.png")
        Image.fromarray((255 * mask).astype(np.uint8)).save(root / "masks" / f"{ident}.png")
        rows.append(f"{ident},{'benign' if i % 2 else 'malignant'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "splits" / "train1.txt").write_text("\n".join(ids[:N_TRAIN]) + "\n")
    (root / "splits" / "val1.txt").write_text("\n".join(ids[N_TRAIN:]) + "\n")
    return root


# a RetinaNet small enough for 64x64 images and a few CPU seconds (strides 4, 8 and a pooled 16; anchors 8..32 px)
TINY = ["--set", "backbone.block_inplanes=[8, 16, 32, 64]", "--set", "backbone.returned_layers=[1, 2]",
        "--set", "backbone.fpn_channels=16", "--set", "anchors.base_shapes=[[12, 12]]", "--set", "train.batch_size=4",
        "--set", "train.lr=0.003", "--seg-set", "preprocess.spatial_size=[64, 64]"]  # fmt: skip


def test_recipe_loads_and_rejects_unknown_keys() -> None:
    r = bench.load_recipe(bench.RECIPE, {"train.lr": 0.002})
    assert r.train.lr == 0.002 and r.backbone.layers == [2, 2, 2, 2] and r.box_selector.detections_per_img >= 2
    with pytest.raises(SystemExit, match="lrr"):
        bench.load_recipe(bench.RECIPE, {"train.lrr": 0.002})


def test_a_time_budget_plans_whole_epochs() -> None:
    assert bench.planned_epochs(24, 90.0) == 16 and bench.planned_epochs(0.01, 90.0) == 1


def test_flips_move_the_boxes_with_the_image() -> None:
    """An off-centre L-shaped lesion and a speck, flipped on both axes: the flipped boxes bound the flipped mask."""
    import torch

    mask = np.zeros((40, 56), np.uint8)
    mask[3:12, 5:9] = mask[3:6, 5:20] = 1
    mask[30, 50] = 1
    boxes = bench.truth_boxes(mask[None], 1)
    assert boxes[0].tolist() == [[3, 5, 12, 20], [30, 50, 31, 51]]
    x = torch.from_numpy(mask[None, None].astype(np.float32))
    for axes in ([0], [1], [0, 1]):
        fx, fb = bench.flip_batch(x, boxes, axes, 1.0, torch.Generator().manual_seed(0))
        assert not torch.equal(fx, x)
        want = bench.truth_boxes((fx[:, 0].numpy() > 0.5).astype(np.uint8), 1)[0]
        assert sorted(fb[0].tolist()) == sorted(want.tolist()), axes
    same_x, same_b = bench.flip_batch(x, boxes, [0, 1], 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same_x, x) and np.array_equal(same_b[0], boxes[0])


def test_boxes_are_scored_by_the_pipelines_detection_metric() -> None:
    """The truth boxes as detections: AP50 1 and every lesion found; shifted by more than half a box: AP50 0."""
    from tasks.segmetrics import detection_metrics

    masks = np.zeros((3, 48, 48), np.uint8)
    masks[0, 5:15, 5:20] = 1
    masks[0, 30:40, 30:44] = 1
    masks[1, 20:30, 10:25] = 1  # image 2 has no lesion
    truth = bench.truth_boxes(masks, 1)
    exact = [bench.box_instances(b, np.linspace(0.9, 0.8, len(b)), (48, 48)) for b in truth]
    assert [len(p) for p in exact] == [2, 1, 0] and exact[0][0].score == pytest.approx(0.9)
    assert exact[1][0].mask.sum() == 10 * 15  # the box's region
    m = detection_metrics(exact, list(masks), (0.5, 0.3), (0.5, 1, 2))
    assert m["ap50"] == pytest.approx(1.0) and m["ap30"] == pytest.approx(1.0) and m["sens_at_1fp"] == 1.0
    shifted = [bench.box_instances(b + np.array([0, 9, 0, 9], np.float32), np.full(len(b), 0.9), (48, 48))
               for b in truth]  # fmt: skip
    assert detection_metrics(shifted, list(masks), (0.5,), (1,))["ap50"] == pytest.approx(0.0)


@pytest.mark.slow
def test_tiny_folder_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main on 36 disk images: every JSON key, figures in [0, 1], one split row, and the disks are found."""
    monkeypatch.setenv("MEDPIPE_PROGRESS", "0")
    folder = make_disk_folder(tmp_path / "disks")
    compare = tmp_path / "seg.json"
    compare.write_text(json.dumps({"dataset": "disks", "splits": [1], "epochs": 3, "ap50_mean": 0.25, "ap50_sd": 0.0,
                                   "per_split": [{"split": 1, "ap50": 0.25, "ap30": 0.5, "sens_at_1fp": 0.75}]}))
    out = tmp_path / "figures.json"
    bench.main(["--data", str(folder), "--splits", "1", "--epochs", "8", "--workdir", str(tmp_path / "work"),
                "--out", str(out), "--compare", str(compare), *TINY])  # fmt: skip
    res = json.loads(out.read_text())
    for key in ("ap50_mean", "ap50_sd", "ap30_mean", "sens_at_0.5fp_mean", "sens_at_1fp_mean", "sens_at_2fp_mean",
                "minutes_per_split", "train_minutes_per_split"):
        assert isinstance(res[key], (int, float)) and math.isfinite(res[key]), key
    assert res["ap50_sd"] == 0.0 and res["epochs"] == 8 and res["spatial_size"] == [64, 64]
    (row,) = res["per_split"]
    for key in ("ap50", "ap30", "sens_at_0.5fp", "sens_at_1fp", "sens_at_2fp", "val_ap50"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["split"] == 1 and row["n_test"] == N_TEST and row["n_test_lesions"] == N_TEST
    assert row["n_train"] + row["n_val"] == N_TRAIN and 1 <= row["selected_epoch"] <= 8
    assert row["val_ap50"] == max(h["val_ap50"] for h in row["history"])  # selection on val, never on test
    assert res["connected_components"]["ap50_mean"] == 0.25 and res["recipe"]["backbone"]["fpn_channels"] == 16
    assert res["recipe"]["train"]["minutes"] is None  # --epochs replaces the recipe's time budget
    assert res["data_recipe"]["preprocess.spatial_size"] == [64, 64] and "train.epochs" not in res["data_recipe"]
    # a broken detector (boxes in the wrong axis order, no learning, wrong targets) does not find bright disks
    # (measured: AP50 0.87, AP30 1, sens@1FP 1 from epoch 5 on)
    assert row["ap50"] >= 0.5 and row["ap30"] >= 0.6 and row["sens_at_1fp"] >= 0.6, row
