"""MedMNIST as an ingest source: official layout, splits kept, 2D gray/RGB and 3D, through preprocess and train.

Fabricated files in the official layout test the code paths; the real AdrenalMNIST3D file in ../shared/data
(skipped where absent) checks that the published file reads as documented.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tasks import ingest, preprocess
from tasks.sources import medmnist
from tasks.config import ParamsError

SHARED = Path(__file__).resolve().parents[2] / "shared/data/medmnist"
REAL = Path(os.environ.get("MEDMNIST_ROOT", SHARED)) / "adrenalmnist3d.npz"


def fake_npz(path: Path, image_shape: tuple[int, ...], n: tuple[int, int, int] = (20, 6, 8), classes: int = 2) -> Path:
    """An official-layout .npz: {split}_images uint8 (N, *image_shape), {split}_labels uint8 (N, 1)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *image_shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8).reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def mm_params(make_params, path: Path | None, **over):
    return make_params({
        "ingest.source": "medmnist", "ingest.medmnist_path": path and str(path), "ingest.labels_csv": None,
        "base.class_names": None, "preprocess.spatial_size": None, **over,
    })  # fmt: skip


@pytest.mark.parametrize(
    ("image_shape", "classes", "input_shape"),
    [((28, 28), 2, [1, 28, 28]), ((28, 28, 3), 7, [3, 28, 28]), ((28, 28, 28), 2, [1, 28, 28, 28])],
    ids=["2d-gray", "2d-rgb-7-classes", "3d"],
)
def test_official_splits_are_kept_and_shapes_come_from_the_data(
    make_params, tmp_path: Path, image_shape: tuple[int, ...], classes: int, input_shape: list[int]
) -> None:
    npz = fake_npz(tmp_path / "set.npz", image_shape, classes=classes)
    params = mm_params(make_params, npz)
    res = ingest.run(params, tmp_path / "ingested", progress=False)
    s = res.summary
    assert (s["files_found"], s["used"], s["quarantined"]) == (34, 34, 0)
    assert {k: v["images"] for k, v in s["splits"].items()} == {"train": 20, "val": 6, "test": 8}
    assert s["class_names"] == [str(i) for i in range(classes)]
    pre = preprocess.run(params, tmp_path / "ingested", tmp_path / "pre")
    assert pre.meta["input_shape"] == input_shape and pre.meta["num_classes"] == classes
    assert pre.meta["intensity"]["kind"] == "uint8"
    x = np.load(tmp_path / "pre/train_x.npy").astype(np.float32)
    raw = np.load(npz)["train_images"].astype(np.float32) / 255
    raw = np.moveaxis(raw, -1, 1) if image_shape[-1] == 3 else raw[:, None]
    assert np.abs(x - raw).max() < 2e-3, "order and values survive ingest + preprocess (float16 storage)"
    assert np.array_equal(np.load(tmp_path / "pre/test_y.npy"), np.arange(8) % classes)


def test_found_by_official_name_in_medmnist_root(make_params, tmp_path: Path, monkeypatch) -> None:
    fake_npz(tmp_path / "adrenalmnist3d_64.npz", (8, 8, 8))
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    params = mm_params(make_params, None, **{"ingest.medmnist_name": "adrenalmnist3d", "ingest.medmnist_size": 64})
    assert ingest.run(params, tmp_path / "out", progress=False).summary["series_built"] == 34


def test_missing_file_says_where_to_put_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    with pytest.raises(medmnist.MedMNISTError, match=r"adrenalmnist3d_64\.npz.*MEDMNIST_ROOT"):
        medmnist.resolve(None, "adrenalmnist3d", 64)


def test_source_without_a_file_fails_naming_the_keys(make_params) -> None:
    with pytest.raises(ParamsError, match="ingest.*medmnist_path.*medmnist_name"):
        make_params({"ingest.source": "medmnist"})


def test_class_names_must_match_the_data(make_params, tmp_path: Path) -> None:
    npz = fake_npz(tmp_path / "set.npz", (8, 8), classes=3)
    with pytest.raises(ValueError, match="base.class_names"):
        ingest.run(mm_params(make_params, npz, **{"base.class_names": ["a", "b"]}), tmp_path / "out", progress=False)


@pytest.mark.data
@pytest.mark.skipif(not REAL.exists(), reason=f"real MedMNIST data absent: put adrenalmnist3d.npz in {REAL.parent} "
                    "or set MEDMNIST_ROOT")
def test_real_adrenalmnist3d_reads_as_published(make_params, tmp_path: Path) -> None:
    res = ingest.run(mm_params(make_params, REAL), tmp_path / "ingested", progress=False)
    assert {k: v["images"] for k, v in res.summary["splits"].items()} == {"train": 1188, "val": 98, "test": 298}
    assert res.summary["class_names"] == ["0", "1"]
    meta = preprocess.run(mm_params(make_params, REAL), tmp_path / "ingested", tmp_path / "pre").meta
    assert meta["input_shape"] == [1, 28, 28, 28] and meta["spatial_dims"] == 3
    assert json.loads((tmp_path / "ingested/summary.json").read_text())["source"] == "medmnist"
