"""tasks.preprocess: the HU window and /255, resize keeping the aspect ratio then pad/crop, refusals that name
the column or key, and the real ingest output through it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.ingest import MANIFEST_COLUMNS

SPLITS = ("train", "val", "test")


def fake_ingested(out: Path, images: list[np.ndarray], unit: str | list[str] = "HU", channels: int | list[int] = 1,
                  spacing: list[float] | None = None) -> Path:  # fmt: skip
    """An ingest output (arrays/, manifest.csv, summary.json) holding ``images``, one per patient, split
    train/val/test in turn, labels 0/1 in turn; ``unit``/``channels`` per image or for all."""
    (out / "arrays").mkdir(parents=True)
    units = unit if isinstance(unit, list) else [unit] * len(images)
    chans = channels if isinstance(channels, list) else [channels] * len(images)
    rows = []
    for i, (img, u, c) in enumerate(zip(images, units, chans, strict=True)):
        image_id = f"I{i:03d}"
        np.save(out / "arrays" / f"{image_id}.npy", img)
        row = dict.fromkeys(MANIFEST_COLUMNS, "")
        row.update(image_id=image_id, patient_id=f"P{i:03d}", label=i % 2, split=SPLITS[i % 3],
                   path=f"arrays/{image_id}.npy", shape=json.dumps(list(img.shape)), unit=u, channels=c,
                   spacing=json.dumps(spacing), modality="CT" if u == "HU" else "OT")  # fmt: skip
        rows.append(row)
    with (out / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps({"class_names": ["0", "1"]}))
    return out


def _train_x(out: Path) -> np.ndarray:
    return np.load(out / "train_x.npy").astype(np.float32)


@pytest.mark.parametrize(("center", "width"), [(40.0, 400.0), (-600.0, 1500.0), (1000.0, 2.0)])
def test_hu_window_maps_its_bounds_to_0_and_1(make_params, run_preprocess, tmp_path: Path, center: float,
                                              width: float) -> None:  # fmt: skip
    lo, hi = center - width / 2, center + width / 2
    values = [lo - 500, lo, lo + width / 4, center, hi, hi + 500]  # below, at, inside, centre, at, above the window
    expected = [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    img = np.zeros((16, 16), np.float32)
    img[0, :6] = values
    params = make_params({"preprocess.window_center": center, "preprocess.window_width": width,
                          "preprocess.spatial_size": [16, 16]})  # fmt: skip
    res = run_preprocess(params, fake_ingested(tmp_path / "in", [img] * 3), tmp_path / "out")
    x = _train_x(tmp_path / "out")
    assert x.shape == (1, 1, 16, 16)
    assert x[0, 0, 0, :6].tolist() == expected  # exact: float16 holds these
    assert res.meta["intensity"] == {"kind": "hu_window", "center": center, "width": width, "a_min": lo, "a_max": hi}


def test_uint8_maps_0_255_to_0_1(make_params, run_preprocess, tmp_path: Path) -> None:
    img = np.zeros((16, 16), np.uint8)
    img[0, :4] = [0, 51, 128, 255]
    params = make_params({"preprocess.spatial_size": [16, 16]})  # the HU window must not apply
    res = run_preprocess(params, fake_ingested(tmp_path / "in", [img] * 3, unit="uint8"), tmp_path / "out")
    assert res.meta["intensity"]["kind"] == "uint8"
    assert _train_x(tmp_path / "out")[0, 0, 0, :4] == pytest.approx([0.0, 0.2, 128 / 255, 1.0], abs=1e-3)


def _halves(shape: tuple[int, ...], hu_left: float = 240.0, hu_right: float = -160.0) -> np.ndarray:
    """Left half of the last axis at the window top (-> 1), right half at its bottom (-> 0)."""
    img = np.full(shape, hu_right, np.float32)
    img[..., : shape[-1] // 2] = hu_left
    return img


@pytest.mark.parametrize(
    ("shape", "size", "ones"),
    [
        # (32, 64) -> longest side 16 -> (8, 16), aspect kept; pad 4 rows above and below
        ((32, 64), [16, 16], np.s_[4:12, 0:8]),
        # (32, 32) -> (16, 16); crop the central 8 columns: 4 of the left half, 4 of the right
        ((32, 32), [16, 8], np.s_[:, 0:4]),
        # (64, 32) -> (16, 8); pad 4 columns left and right
        ((64, 32), [16, 16], np.s_[:, 4:8]),
        # 3D (8, 16, 32) -> (4, 8, 16); pad 2 slices front and back, 2 rows above and below
        ((8, 16, 32), [8, 12, 16], np.s_[2:6, 2:10, 0:8]),
    ],
    ids=["pad-rows", "crop-columns", "pad-columns", "3d"],
)
def test_resize_keeps_the_aspect_ratio_then_pads_or_crops(
    make_params, run_preprocess, tmp_path: Path, shape: tuple[int, ...], size: list[int], ones: tuple
) -> None:
    """The left half of the image is at the window top (1), the rest and the padding at its bottom (0): where the
    ones land after resize + pad/crop shows the aspect ratio kept and the image centred."""
    params = make_params({"preprocess.spatial_size": size})
    res = run_preprocess(params, fake_ingested(tmp_path / "in", [_halves(shape)] * 3), tmp_path / "out")
    want = np.zeros(size, np.float32)
    want[ones] = 1.0
    x = _train_x(tmp_path / "out")
    assert x.shape == (1, 1, *size) and res.meta["input_shape"] == [1, *size]
    np.testing.assert_array_equal(x[0, 0], want)


def test_native_size_is_kept_without_spatial_size(make_params, run_preprocess, tmp_path: Path) -> None:
    params = make_params({"preprocess.spatial_size": None})
    res = run_preprocess(params, fake_ingested(tmp_path / "in", [_halves((12, 20))] * 3), tmp_path / "out")
    assert res.meta["input_shape"] == [1, 12, 20] and _train_x(tmp_path / "out")[0, 0, :, :10].min() == 1.0


@pytest.mark.parametrize(
    ("units", "channels", "column", "odd"),
    [
        (["HU", "HU", "uint8"], 1, "unit", "'uint8': 1 image(s), e.g. I002"),
        (["HU", "MR", "HU"], 1, "unit", "'MR': 1 image(s), e.g. I001"),
        ("uint8", [1, 3, 1], "channels", "'3': 1 image(s), e.g. I001"),
    ],
    ids=["hu-and-uint8", "hu-and-other", "gray-and-rgb"],
)
def test_a_manifest_mixing_units_or_channels_is_refused_naming_the_column(
    make_params, run_preprocess, tmp_path: Path, units, channels, column: str, odd: str
) -> None:
    chans = channels if isinstance(channels, list) else [channels] * 3
    images = [np.zeros((3, 16, 16) if c == 3 else (16, 16), np.float32) for c in chans]
    inputs = fake_ingested(tmp_path / "in", images, unit=units, channels=channels)
    with pytest.raises(ValueError, match=rf"manifest\.csv: images differ in {column} \(") as info:
        run_preprocess(make_params({"preprocess.spatial_size": [16, 16]}), inputs, tmp_path / "out")
    assert odd in str(info.value)  # names an image of the odd kind
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("shape", "size", "axes"), [((16, 16), [16, 16, 16], "3 axes but the images in"), ((8, 16, 16), [16, 16], "2 axes")]
)
def test_spatial_size_with_the_wrong_number_of_axes_is_refused(
    make_params, run_preprocess, tmp_path: Path, shape, size: list[int], axes: str
) -> None:
    inputs = fake_ingested(tmp_path / "in", [np.zeros(shape, np.float32)] * 3)
    with pytest.raises(ValueError, match=rf"preprocess\.spatial_size: .*{axes}.*give {len(shape)} sizes"):
        run_preprocess(make_params({"preprocess.spatial_size": size}), inputs, tmp_path / "out")


def test_2d_and_3d_images_together_are_refused(make_params, run_preprocess, tmp_path: Path) -> None:
    inputs = fake_ingested(tmp_path / "in", [np.zeros(s, np.float32) for s in ((16, 16), (4, 16, 16), (16, 16))])
    with pytest.raises(ValueError, match=r"manifest\.csv: images differ in their number of spatial axes \(column "
                       r"shape: 2D: 2 image\(s\), e.g. I000; 3D: 1 image\(s\), e.g. I001\)"):  # fmt: skip
        run_preprocess(make_params({"preprocess.spatial_size": [16, 16]}), inputs, tmp_path / "out")


def test_images_of_different_shapes_need_a_spatial_size(make_params, run_preprocess, tmp_path: Path) -> None:
    inputs = fake_ingested(tmp_path / "in", [np.zeros(s, np.float32) for s in ((16, 16), (16, 16), (16, 24))])
    with pytest.raises(ValueError, match=r"I002\.npy: preprocessed shape .* set preprocess\.spatial_size"):
        run_preprocess(make_params({"preprocess.spatial_size": None}), inputs, tmp_path / "out")


@pytest.mark.parametrize(("spacings", "recorded"), [([[0.7, 0.7]] * 3, [0.7, 0.7]),
                                                    ([[0.7, 0.7], [0.7, 0.7], [0.8, 0.8]], None)])  # fmt: skip
def test_source_spacing_is_recorded_only_when_shared(make_params, run_preprocess, tmp_path: Path, spacings,
                                                     recorded) -> None:  # fmt: skip
    inputs = fake_ingested(tmp_path / "in", [np.zeros((16, 16), np.float32)] * 3)
    manifest = inputs / "manifest.csv"
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row, spacing in zip(rows, spacings, strict=True):
        row["spacing"] = json.dumps(spacing)
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    res = run_preprocess(make_params({"preprocess.spatial_size": [16, 16]}), inputs, tmp_path / "out")
    assert res.meta["source_spacing_mm"] == recorded


def test_the_ingested_cohort_through_preprocess(ingested_cohort, cohort_params, run_preprocess, tmp_path: Path) -> None:
    res = run_preprocess(cohort_params, ingested_cohort.output, tmp_path / "pre")
    with ingested_cohort.manifest.open(newline="") as fh:
        manifest = list(csv.DictReader(fh))
    size = cohort_params.preprocess.spatial_size
    for split in SPLITS:
        members = [r for r in manifest if r["split"] == split]
        x, y = np.load(tmp_path / "pre" / f"{split}_x.npy"), np.load(tmp_path / "pre" / f"{split}_y.npy")
        assert x.dtype == np.float16 and x.shape == (len(members), 1, *size)
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0  # bone saturates the soft-tissue window
        assert y.tolist() == [int(r["label"]) for r in members]
        with (tmp_path / "pre" / f"{split}_ids.csv").open(newline="") as fh:
            assert [r["image_id"] for r in csv.DictReader(fh)] == [r["image_id"] for r in members]
    assert res.counts == {split: ingested_cohort.summary["splits"][split]["images"] for split in SPLITS}
    assert res.meta["class_names"] == cohort_params.base.class_names and res.meta["intensity"]["kind"] == "hu_window"
    assert res.meta["params"]["spatial_size"] == size
    assert len({r["spacing"] for r in manifest}) > 1 and res.meta["source_spacing_mm"] is None  # per-patient FOV
    assert json.loads((tmp_path / "pre" / "meta.json").read_text()) == res.meta
