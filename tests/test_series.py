"""tasks.dicom.series: ordering slices along the normal, refusing what cannot be one volume, choosing series."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest

from tasks.dicom import DicomImage, SourceIds
from tasks.dicom.series import SERIES_REASONS, SeriesError, orientation_of, select_series, stack_series
from tasks.schema import SeriesParams

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # normal +y
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal -x
_N = np.array([1.0, 1.0, 1.0]) / np.sqrt(3)  # an oblique normal, 55 deg from every axis
_ROW = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
OBLIQUE = (*_ROW, *np.cross(_N, _ROW))  # row x col = _N
_C, _S = np.cos(np.radians(15)), np.sin(np.radians(15))
TILTED = (1.0, 0.0, 0.0, 0.0, _C, -_S)  # a 15 deg gantry tilt: normal (0, sin, cos), slices still step along z
IDENTIFYING = ("MRN", "9.9", "ACC", "1.2.3")


def _slice(z: float | None, value: float, number: int | None = None, shape=(4, 5), orientation=AXIAL,
           study: str = "1.2.3", **changes) -> DicomImage:  # fmt: skip
    image = DicomImage(
        pixels=np.full(shape, value, np.float32), modality="CT", unit="HU", rows=shape[0], columns=shape[1],
        n_frames=1, pixel_spacing=(0.5, 0.6), slice_thickness=2.0,
        image_position=None if z is None else (0.0, 0.0, z), image_orientation=orientation,
        window_center=None, window_width=None, instance_number=number, photometric="MONOCHROME2",
        transfer_syntax="1.2.840.10008.1.2.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        ids=SourceIds("MRN", study, "1.2.3.4", f"1.2.3.4.{value}", "20200101", "ACC"),
    )  # fmt: skip
    return replace(image, **changes)


def _ids(image: DicomImage, **changes) -> DicomImage:
    return replace(image, ids=replace(image.ids, **changes))


def _along(normal, steps, orientation, values=None) -> list[DicomImage]:
    """Slices at ``steps`` mm along ``normal`` from (10, -5, 3), pixel value = step unless ``values``."""
    origin = np.array([10.0, -5.0, 3.0])
    values = steps if values is None else values
    return [
        _slice(0.0, v, orientation=orientation, image_position=tuple(origin + s * np.asarray(normal)))
        for s, v in zip(steps, values, strict=True)
    ]


def _enhanced(zs, positions: bool = True, **changes) -> DicomImage:
    """One enhanced multi-frame instance; frame k holds the value zs[k] and lies at z = zs[k]."""
    frames = np.stack([np.full((4, 5), z, np.float32) for z in zs])
    image = _slice(zs[0], 0.0, pixels=frames, n_frames=len(zs), slice_thickness=5.0)
    changes.setdefault("frame_positions", tuple((0.0, 0.0, z) for z in zs) if positions else None)
    return replace(image, **changes)


# --- stacking ----------------------------------------------------------------------------------------------------


def test_single_slice_is_2d() -> None:
    out = stack_series([_slice(0.0, 7.0)])
    assert out.pixels.shape == (4, 5) and out.spacing == [0.5, 0.6] and out.warning is None


def test_single_colour_slice_keeps_its_channels() -> None:
    rgb = _slice(0.0, 0.0, pixels=np.arange(60, dtype=np.float32).reshape(4, 5, 3), channels=3)
    out = stack_series([rgb])
    assert out.pixels.shape == (4, 5, 3) and out.pixels[1, 2, 2] == 23.0


def test_sorted_along_the_normal_with_spacing() -> None:
    out = stack_series([_slice(z, z) for z in (5.0, -1.0, 2.0, 8.0)])
    assert out.pixels.shape == (4, 4, 5) and list(out.pixels[:, 0, 0]) == [-1.0, 2.0, 5.0, 8.0]
    assert out.spacing == [3.0, 0.5, 0.6] and out.warning is None


def test_positions_win_over_a_misleading_instance_number() -> None:
    zs = [12.5, -2.5, 7.5, 0.0, 10.0, 5.0, 2.5]  # shuffled; InstanceNumber counts the other way, with a jump
    images = [_slice(z, z, number=1000 - int(z * 4) if z < 10 else int(z)) for z in zs]
    out = stack_series(images)
    assert list(out.pixels[:, 0, 0]) == sorted(zs) and out.spacing == [2.5, 0.5, 0.6]


def test_spacing_comes_from_positions_not_slice_thickness() -> None:
    images = [_slice(z, z, slice_thickness=5.0) for z in (0.0, 1.25, 2.5, 3.75)]  # overlapping reconstruction
    assert stack_series(images).spacing == [1.25, 0.5, 0.6]


@pytest.mark.parametrize(
    ("orientation", "normal"),
    [(SAGITTAL, (-1.0, 0.0, 0.0)), (CORONAL, (0.0, 1.0, 0.0)), (OBLIQUE, tuple(_N))],
    ids=["sagittal", "coronal", "oblique"],
)
def test_non_axial_series_sort_along_their_normal(orientation, normal) -> None:
    steps = [3.0, 0.0, 6.0, 1.5, 4.5]
    out = stack_series(_along(normal, steps, orientation))
    assert list(out.pixels[:, 0, 0]) == sorted(steps) and out.spacing == pytest.approx([1.5, 0.5, 0.6])


def test_sagittal_order_is_along_minus_x() -> None:
    images = [
        replace(_slice(0.0, v, orientation=SAGITTAL), image_position=(x, 0.0, 0.0)) for v, x in ((2.0, 1.0), (1.0, 3.0))
    ]
    assert list(stack_series(images).pixels[:, 0, 0]) == [1.0, 2.0]  # x=3 comes first along -x


def test_enhanced_multiframe_frames_are_sorted_by_their_positions() -> None:
    zs = [4.0, 0.0, 8.0, 2.0, 6.0]
    out = stack_series([_enhanced(zs)])
    assert out.pixels.shape == (5, 4, 5) and list(out.pixels[:, 0, 0]) == sorted(zs)
    assert out.spacing == [2.0, 0.5, 0.6]  # not SliceThickness 5.0


def test_multiframe_without_positions_keeps_stored_order() -> None:
    out = stack_series([_enhanced([3.0, 1.0, 2.0], positions=False)])
    assert list(out.pixels[:, 0, 0]) == [3.0, 1.0, 2.0] and out.spacing == [5.0, 0.5, 0.6]
    assert stack_series([_enhanced([3.0, 1.0], positions=False, pixel_spacing=None)]).spacing is None


def test_instance_number_fallback_is_reported() -> None:
    out = stack_series([_slice(None, v, number=n) for v, n in ((1.0, 2), (0.0, 1))])
    assert list(out.pixels[:, 0, 0]) == [0.0, 1.0] and "InstanceNumber" in out.warning
    assert out.spacing == [2.0, 0.5, 0.6] and "SliceThickness" in out.warning


def test_uneven_spacing_is_reported() -> None:
    assert "uneven" in stack_series([_slice(z, z) for z in (0.0, 1.0, 3.0)]).warning


def test_max_gap_factor_decides_what_is_missing() -> None:
    images = [_slice(z, z) for z in (0.0, 1.0, 2.0, 3.8, 4.8)]  # one step of 1.8 x the median
    with pytest.raises(SeriesError) as info:
        stack_series(images)
    assert info.value.reason == "series_missing_slices"
    assert "uneven" in stack_series(images, max_gap_factor=2.0).warning


def test_missing_slices_say_how_many_and_where() -> None:
    with pytest.raises(SeriesError) as info:
        stack_series([_slice(z, z) for z in (6.0, 0.0, 1.0, 5.0, 2.0, 7.0)])  # 3 and 4 are missing
    assert "about 2 slice(s) missing between sorted slice indices 2-3 of 6" in info.value.detail


_MIXED = [_slice(0.0, 1.0), _slice(1.0, 2.0)]

_CASES = [
    ("series_missing_slices", [_slice(z, z) for z in (0.0, 1.0, 2.0, 5.0, 6.0)], "2 slice(s) missing"),
    ("series_missing_slices", [_enhanced([0.0, 1.0, 2.0, 5.0, 6.0])], "2 slice(s) missing"),
    ("series_duplicate_positions", [_slice(0.0, 1.0), _slice(0.0, 2.0), _slice(1.0, 3.0)], "1 of 3 slices repeat"),
    ("series_duplicate_positions", [_enhanced([0.0, 1.0, 1.0])], "repeat a position"),
    ("series_duplicate_positions", [_slice(None, 1.0, number=3), _slice(None, 2.0, number=3)], "InstanceNumber"),
    ("series_inconsistent_orientation", [_slice(0.0, 1.0), _slice(1.0, 2.0, orientation=CORONAL)], "2 Image"),
    ("series_inconsistent_spacing", [_slice(0.0, 1.0), _slice(1.0, 2.0, pixel_spacing=(0.5, 0.7))], "PixelSpacing"),
    ("series_inconsistent_spacing", [_slice(0.0, 1.0), _slice(1.0, 2.0, pixel_spacing=None)], "PixelSpacing"),
    ("series_inconsistent_shape", [_slice(0.0, 1.0), _slice(1.0, 2.0, shape=(4, 4))], "2 Rows x Columns"),
    ("series_inconsistent_shape", [_enhanced([0.0, 1.0], frame_positions=((0.0, 0.0, 0.0),))], "1 frame positions"),
    ("series_gantry_tilt", [_slice(0.0, 1.0, gantry_tilt=15.0), _slice(1.0, 2.0, gantry_tilt=15.0)], "15 deg"),
    ("series_gantry_tilt", [_enhanced([0.0, 1.0], gantry_tilt=-15.0)], "15 deg"),
    ("series_gantry_tilt", [_slice(z, z, orientation=TILTED) for z in (0.0, 2.0, 4.0)], "15 deg off the slice normal"),
    ("series_gantry_tilt", [_slice(0.0, 1.0, image_position=(0, 0.3, 1)), _slice(0.0, 0.0)], "off the slice normal"),
    ("series_no_geometry", [_slice(None, 1.0), _slice(None, 2.0)], "2 of 2 slices lack"),
    ("series_no_geometry", [_slice(0.0, 1.0, number=1), _slice(None, 2.0, number=2)], "1 of 2 slices lack"),
    ("series_no_geometry", [_slice(z, z, orientation=(1.0, 0.0, 0.0) * 2) for z in (0.0, 1.0)], "orthogonal"),
    ("series_no_geometry", [_enhanced([0.0, 1.0], image_orientation=None)], "without ImageOrientationPatient"),
    ("series_mixed", [_MIXED[0], _slice(1.0, 2.0, study="9.9")], "StudyInstanceUID (2 distinct"),
    ("series_mixed", [_MIXED[0], _ids(_MIXED[1], patient_id="MRN2")], "PatientID"),
    ("series_mixed", [_MIXED[0], replace(_MIXED[1], modality="MR")], "Modality"),
    ("series_mixed", [_MIXED[0], _ids(_MIXED[1], label_value="ACC2")], "label-key value"),
    ("series_multiframe_mix", [_slice(0.0, 1.0), _enhanced([1.0, 2.0])], "1 multi-frame instance(s) among 2"),
    ("series_multiframe_mix", [_enhanced([0.0, 1.0]), _enhanced([2.0, 3.0])], "2 multi-frame"),
]  # fmt: skip


def test_the_case_table_covers_every_reason() -> None:
    assert {reason for reason, _, _ in _CASES} == set(SERIES_REASONS)


@pytest.mark.parametrize(("reason", "images", "detail"), _CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(_CASES)])
def test_unstackable_series_raise(reason: str, images: list[DicomImage], detail: str) -> None:
    with pytest.raises(SeriesError) as info:
        stack_series(images)
    assert info.value.reason == reason and detail in info.value.detail
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working
    assert not any(value in str(info.value) for value in IDENTIFYING)  # causes, never values


def test_series_error_is_picklable_and_knows_its_reasons() -> None:
    copy = pickle.loads(pickle.dumps(SeriesError("series_mixed", "2 studies")))
    assert (copy.reason, copy.detail) == ("series_mixed", "2 studies")
    with pytest.raises(ValueError, match="unknown SeriesError reason"):
        SeriesError("series_bad", "")


# --- selection ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iop", "expected"),
    [(AXIAL, "axial"), (CORONAL, "coronal"), (SAGITTAL, "sagittal"), (OBLIQUE, "oblique"), (TILTED, "axial"),
     ((1.0, 0.0, 0.0, 0.0, np.cos(np.radians(40)), np.sin(np.radians(40))), "oblique")],
    ids=["axial", "coronal", "sagittal", "oblique", "axial-15deg", "oblique-40deg"],
)  # fmt: skip
def test_orientation_of(iop, expected: str) -> None:
    assert orientation_of(iop) == expected


@pytest.mark.parametrize(
    ("params", "image", "n_slices", "expected"),
    [(SeriesParams(modalities=["CT"]), _slice(0.0, 1.0, modality="MR"), 30, "skipped: modality MR not in [CT]"),
     (SeriesParams(body_parts=["chest"]), _slice(0.0, 1.0, body_part="HEAD"), 30,
      "skipped: body part HEAD not in [CHEST]"),
     (SeriesParams(body_parts=["CHEST"]), _slice(0.0, 1.0), 30, "skipped: body part <absent> not in [CHEST]"),
     (SeriesParams(orientation="axial"), _slice(0.0, 1.0, orientation=CORONAL), 30,
      "skipped: orientation coronal, want axial"),
     (SeriesParams(orientation="sagittal"), _slice(0.0, 1.0, orientation=OBLIQUE), 30,
      "skipped: orientation oblique, want sagittal"),
     (SeriesParams(orientation="axial"), _slice(0.0, 1.0, orientation=None), 1,
      "skipped: orientation unknown (no ImageOrientationPatient), want axial"),
     (SeriesParams(min_slices=20), _slice(0.0, 1.0), 1, "skipped: 1 slice < min_slices 20"),
     (SeriesParams(min_slices=20), _slice(0.0, 1.0), 19, "skipped: 19 slices < min_slices 20")],
    ids=["modality", "body-part", "body-part-absent", "orientation", "oblique", "no-orientation", "min-1", "min-19"],
)  # fmt: skip
def test_select_series_skips_with_a_reason(params: SeriesParams, image: DicomImage, n_slices: int, expected) -> None:
    assert select_series([image], n_slices, params) == (False, expected)


def test_select_series_uses_a_matching_series() -> None:
    params = SeriesParams(modalities=["ct", "MR"], body_parts=["chest"], orientation="axial", min_slices=3)
    images = [_slice(z, z, body_part="CHEST") for z in (0.0, 1.0, 2.0)]
    n_slices = stack_series(images).pixels.shape[0]
    assert select_series(images, n_slices, params) == (True, "used: CT, CHEST, axial, 3 slices")
    assert select_series([_slice(None, 1.0, orientation=None)], 1, SeriesParams()) == (True, "used: CT, 1 slice")
