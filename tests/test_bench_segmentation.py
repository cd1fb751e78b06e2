"""benchmarks/segmentation.py: the recipe reaches the segment task, and a tiny image folder runs end to end.

The smoke run uses the real stages (ingest of an image folder with splits, preprocess, train, evaluate), MLflow on
sqlite in tmp_path and the bare-loop timing; only sizes are shrunk (32x32, a 3-level UNet, 1 epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import segmentation as bench

N_TRAIN, N_TEST, SIZE = 18, 6, 48


def _disk_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 48x48 uint8 noisy image with one bright disk, and its {0, 255} mask."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    r = rng.uniform(6, 11)
    cy, cx = rng.uniform(r + 2, SIZE - r - 2, size=2)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    image = rng.normal(60, 15, (SIZE, SIZE)) + 140 * mask
    return np.clip(image, 0, 255).astype(np.uint8), (255 * mask).astype(np.uint8)


@pytest.fixture
def disk_folder(tmp_path: Path) -> Path:
    """images/, masks/, manifest.csv and splits/train1.txt (18 ids) + val1.txt (6 ids): the BUSI layout."""
    root = tmp_path / "disks"
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"case_{i:02d}" for i in range(N_TRAIN + N_TEST)]
    rows = ["id,label"]
    for i, ident in enumerate(ids):
        image, mask = _disk_case(rng)
        Image.fromarray(image).save(root / "images" / f"{ident}.png")
        Image.fromarray(mask).save(root / "masks" / f"{ident}.png")
        rows.append(f"{ident},{'benign' if i % 2 else 'malignant'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "splits" / "train1.txt").write_text("\n".join(ids[:N_TRAIN]) + "\n")
    (root / "splits" / "val1.txt").write_text("\n".join(ids[N_TRAIN:]) + "\n")
    return root


def test_recipe_groups_are_the_segment_tasks() -> None:
    """params.yaml's tasks.segment entry (128x128, 12 epochs, batch 16) must not win over the recipe's groups."""
    args = argparse.Namespace(recipe=bench.RECIPE, set=["train.lr=0.0005"], epochs=7)
    recipe = bench.benchmark_recipe(args)
    assert recipe["train.epochs"] == 7 and recipe["train.lr"] == 0.0005
    p = bench.split_params(recipe, 2)
    raw = bench.read_yaml(bench.RECIPE)
    assert p.task_name == "segment" and p.task.kind == "segmentation"
    assert list(p.preprocess.spatial_size) == raw["preprocess"]["spatial_size"] == [256, 256]
    assert p.train.epochs == 7 and p.train.lr == 0.0005
    assert p.train.batch_size == raw["train"]["batch_size"]
    assert list(p.train.seg.channels) == raw["train"]["seg"]["channels"]
    assert p.train.arch == "unet" and p.train.select_metric == "dice"
    assert p.ingest.folder_split == 2 and p.ingest.source == "image_folder"
    assert list(p.ingest.masks.classes) == ["lesion"]


def test_the_split_axes_are_refused_in_the_recipe() -> None:
    args = argparse.Namespace(recipe=bench.RECIPE, set=["ingest.folder_split=3"], epochs=None)
    with pytest.raises(SystemExit, match="--splits"):
        bench.benchmark_recipe(args)


def test_limited_view_keeps_the_first_ids(disk_folder: Path, tmp_path: Path) -> None:
    view = bench.limited_view(disk_folder, [1], 4, tmp_path / "view")
    assert (view / "splits/train1.txt").read_text().split() == [f"case_{i:02d}" for i in range(4)]
    assert (view / "splits/val1.txt").read_text().split() == [f"case_{i:02d}" for i in range(N_TRAIN, N_TRAIN + 4)]
    assert (view / "images" / "case_00.png").is_file() and (view / "manifest.csv").is_file()
    with pytest.raises(SystemExit, match="val2.txt|train2.txt"):
        bench.limited_view(disk_folder, [2], 4, tmp_path / "view2")


@pytest.mark.slow
def test_tiny_folder_end_to_end(disk_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's main on 24 disk images: every JSON key, finite figures, one split row, the tracked runs."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MEDPIPE_PROGRESS", "0")
    monkeypatch.chdir(tmp_path)  # main changes directory to the repository; monkeypatch restores it
    out = tmp_path / "figures.json"
    bench.main([
        "--data", str(disk_folder), "--splits", "1", "--epochs", "1", "--bare-steps", "2",
        "--workdir", str(tmp_path / "work"), "--out", str(out),
        "--set", "preprocess.spatial_size=[32, 32]", "--set", "train.seg.channels=[4, 8, 16]",
        "--set", "train.batch_size=4", "--set", "evaluate.bootstrap=20",
    ])  # fmt: skip
    res = json.loads(out.read_text())
    for key in ("dice_mean", "dice_sd", "iou_mean", "hd95_mean", "ap50_mean", "sens_at_1fp_mean",
                "minutes_per_split", "samples_per_s", "bare_loop_samples_per_s", "pipeline_bare_ratio"):
        assert isinstance(res[key], (int, float)) and math.isfinite(res[key]), key
    assert 0.0 <= res["dice_mean"] <= 1.0 and res["dice_sd"] == 0.0  # one split: sd 0
    assert res["samples_per_s"] > 0 and res["bare_loop_samples_per_s"] > 0
    assert res["pipeline_bare_ratio"] == pytest.approx(res["samples_per_s"] / res["bare_loop_samples_per_s"])
    (row,) = res["per_split"]
    for key in ("split", "dice", "iou", "hd95", "surface_dice", "dice_original", "ap50", "ap30", "sens_at_1fp",
                "n_test", "minutes", "samples_per_s", "bare_loop_samples_per_s", "selected_epoch"):
        assert row[key] is not None, key
    assert row["split"] == 1 and row["n_test"] == N_TEST and row["selected_epoch"] == 1
    assert res["recipe"]["preprocess.spatial_size"] == [32, 32] and res["recipe"]["train.epochs"] == 1
    assert [p["method"] for p in res["published"]["rows"]] == ["U-Net", "TransUnet", "CMUNeXt", "Mobile U-ViT"]
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["torch"]
    assert res["data_hash"].startswith("sha256:")
    # the per-split run is nested under the benchmark's parent run, which got the mean figures
    from tasks import tracking

    children = tracking.sweep_children("segmentation-benchmark", res["sweep"])
    assert [c.info.run_id for c in children] == [row["run_id"]]
    assert children[0].data.tags["source_data_hash"] == res["data_hash"]
    parent = tracking.sweep_parent("segmentation-benchmark", res["sweep"], create=False)
    assert tracking.client().get_run(parent).data.metrics["dice_mean"] == pytest.approx(res["dice_mean"])
    # the interleaved overhead timing on the split's preprocessed tensors
    from benchmarks import overhead

    ab = tmp_path / "overhead.json"
    overhead.main(["--data", str(tmp_path / "work/split1/preprocessed"), "--steps", "2", "--rounds", "3",
                   "--set", "train.batch_size=4", "--set", "train.seg.channels=[4, 8, 16]", "--out", str(ab)])
    timed = json.loads(ab.read_text())
    assert len(timed["pipeline_samples_per_s"]) == len(timed["bare_samples_per_s"]) == 3
    assert timed["ratio"] == pytest.approx(
        statistics.median(timed["pipeline_samples_per_s"]) / statistics.median(timed["bare_samples_per_s"]))
    assert (timed["steps"], timed["batch_size"]) == (2, 4)
