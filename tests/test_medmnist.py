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

from tasks.config import ParamsError
from tasks.sources import medmnist

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


def mm_params(make_params, path: Path, **over):
    return make_params({
        "ingest.source": "medmnist", "ingest.input": str(path), "ingest.labels_csv": None,
        "base.class_names": None, "preprocess.spatial_size": None, **over,
    })  # fmt: skip


@pytest.mark.parametrize(
    ("image_shape", "classes", "input_shape"),
    [((28, 28), 2, [1, 28, 28]), ((28, 28, 3), 7, [3, 28, 28]), ((28, 28, 28), 2, [1, 28, 28, 28])],
    ids=["2d-gray", "2d-rgb-7-classes", "3d"],
)
def test_official_splits_are_kept_and_shapes_come_from_the_data(
    make_params,
    run_ingest,
    run_preprocess,
    tmp_path: Path,
    image_shape: tuple[int, ...],
    classes: int,
    input_shape: list[int],
) -> None:
    npz = fake_npz(tmp_path / "set.npz", image_shape, classes=classes)
    params = mm_params(make_params, npz)
    res = run_ingest(params, tmp_path / "ingested")
    s = res.summary
    assert (s["files_found"], s["used"], s["quarantined"]) == (34, 34, 0)
    assert {k: v["images"] for k, v in s["splits"].items()} == {"train": 20, "val": 6, "test": 8}
    assert s["class_names"] == [str(i) for i in range(classes)] and s["source"] == "medmnist"
    assert not (tmp_path / "ingested" / "deid_audit.json").exists()  # nothing was de-identified
    pre = run_preprocess(params, tmp_path / "ingested", tmp_path / "pre")
    assert pre.meta["input_shape"] == input_shape and pre.meta["num_classes"] == classes
    assert pre.meta["intensity"]["kind"] == "uint8"
    x = np.load(tmp_path / "pre/train_x.npy").astype(np.float32)
    raw = np.load(npz)["train_images"].astype(np.float32) / 255
    raw = np.moveaxis(raw, -1, 1) if image_shape[-1] == 3 else raw[:, None]
    assert np.abs(x - raw).max() < 2e-3, "order and values survive ingest + preprocess (float16 storage)"
    assert np.array_equal(np.load(tmp_path / "pre/test_y.npy"), np.arange(8) % classes)


def test_found_by_official_name_in_medmnist_root(make_params, run_ingest, tmp_path: Path, monkeypatch) -> None:
    fake_npz(tmp_path / "adrenalmnist3d_64.npz", (8, 8, 8))
    fake_npz(tmp_path / "adrenalmnist3d.npz", (4, 4, 4), n=(4, 4, 4))  # the 28 px name: not the one asked for
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    path = medmnist.resolve(None, "AdrenalMNIST3D", 64)
    assert path == tmp_path / "adrenalmnist3d_64.npz"
    assert medmnist.resolve(str(tmp_path / "adrenalmnist3d.npz"), "ignored", 64) == tmp_path / "adrenalmnist3d.npz"
    res = run_ingest(mm_params(make_params, path), tmp_path / "out")
    assert res.summary["series_built"] == 34  # 20 + 6 + 8: the 64 px file, not the 28 px one (4 + 4 + 4)
    assert {np.load(p).shape for p in (tmp_path / "out" / "arrays").iterdir()} == {(8, 8, 8)}


@pytest.mark.parametrize(
    ("flag", "size", "match"),
    [("adrenalmnist3d", 64, r"adrenalmnist3d_64\.npz not found in .*MEDMNIST_ROOT"),
     ("pathmnist", 28, r"pathmnist\.npz not found"), ("adrenalmnist3d", 32, r"size 32 is not one of"),
     (None, 28, "give a MedMNIST flag")],
)  # fmt: skip
def test_missing_file_says_where_to_put_it(tmp_path: Path, monkeypatch, flag, size: int, match: str) -> None:
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    with pytest.raises(medmnist.MedMNISTError, match=match):
        medmnist.resolve(None, flag, size)
    with pytest.raises(medmnist.MedMNISTError, match=r"missing\.npz does not exist"):
        medmnist.resolve(str(tmp_path / "missing.npz"), flag, size)


def test_a_label_table_is_refused_naming_the_key(make_params) -> None:
    with pytest.raises(ParamsError, match=r"ingest\b.*labels_csv: a MedMNIST \.npz carries its own labels"):
        make_params({"ingest.source": "medmnist"})  # labels_csv: labels.csv from params.yaml


@pytest.mark.parametrize("what", ["folder", "missing", "not-npz", "wrong-layout", "multi-label"])
def test_an_unusable_input_fails_naming_it(make_params, run_ingest, tmp_path: Path, what: str) -> None:
    path, match = {
        "folder": (tmp_path, "ingest.input: .* is not a file"),
        "missing": (tmp_path / "nope.npz", "ingest.input: .*nope.npz is not a file"),
        "not-npz": (tmp_path / "text.npz", r"text\.npz: not a readable \.npz"),
        "wrong-layout": (tmp_path / "odd.npz", r"odd\.npz: missing arrays \['val_images'"),
        "multi-label": (tmp_path / "chest.npz", r"chest\.npz: multi-label targets"),
    }[what]
    if what == "not-npz":
        path.write_text("hello")
    elif what == "wrong-layout":
        np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    elif what == "multi-label":
        fake_npz(path, (4, 4))
        arrays = dict(np.load(path))
        arrays["train_labels"] = np.zeros((20, 14), np.uint8)
        np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        run_ingest(mm_params(make_params, path), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_class_names_must_match_the_data(make_params, run_ingest, tmp_path: Path) -> None:
    npz = fake_npz(tmp_path / "set.npz", (8, 8), classes=3)
    with pytest.raises(ValueError, match=r"base\.class_names: 2 names, but .*set\.npz has labels up to 2"):
        run_ingest(mm_params(make_params, npz, **{"base.class_names": ["a", "b"]}), tmp_path / "out")
    res = run_ingest(mm_params(make_params, npz, **{"base.class_names": ["a", "b", "c"]}), tmp_path / "out")
    assert res.summary["class_names"] == ["a", "b", "c"]


def test_a_medmnist_ingest_replaces_a_dicom_one(make_params, run_ingest, ingested_cohort, tmp_path: Path) -> None:
    """Re-using an output folder leaves nothing of the previous source (its audit, its de-identified DICOM)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(ingested_cohort.output, out)
    (out / "dicom").mkdir()  # as with ingest.deid.write_dicom
    assert (out / "deid_audit.json").exists()
    run_ingest(mm_params(make_params, fake_npz(tmp_path / "set.npz", (8, 8))), out)
    assert sorted(p.name for p in out.iterdir()) == ["arrays", "manifest.csv", "quarantine.csv", "summary.json"]
    assert len(list((out / "arrays").iterdir())) == 34


@pytest.mark.data
@pytest.mark.skipif(
    not REAL.exists(), reason=f"real MedMNIST data absent: put adrenalmnist3d.npz in {REAL.parent} or set MEDMNIST_ROOT"
)
def test_real_adrenalmnist3d_reads_as_published(make_params, run_ingest, run_preprocess, tmp_path: Path) -> None:
    res = run_ingest(mm_params(make_params, REAL), tmp_path / "ingested")
    assert {k: v["images"] for k, v in res.summary["splits"].items()} == {"train": 1188, "val": 98, "test": 298}
    assert res.summary["class_names"] == ["0", "1"]
    meta = run_preprocess(mm_params(make_params, REAL), tmp_path / "ingested", tmp_path / "pre").meta
    assert meta["input_shape"] == [1, 28, 28, 28] and meta["spatial_dims"] == 3
    assert json.loads((tmp_path / "ingested/summary.json").read_text())["source"] == "medmnist"
