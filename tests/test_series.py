"""tasks.series: ordering slices along the normal, and refusing what cannot be one volume."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tasks.dicom import DicomImage, SourceIds
from tasks.series import stack_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _slice(z: float | None, value: float, number: int | None = None, shape=(4, 5), orientation=AXIAL,
           study: str = "1.2.3") -> DicomImage:  # fmt: skip
    return DicomImage(
        pixels=np.full(shape, value, np.float32), modality="CT", unit="HU", rows=shape[0], columns=shape[1],
        n_frames=1, pixel_spacing=(0.5, 0.6), slice_thickness=2.0,
        image_position=None if z is None else (0.0, 0.0, z), image_orientation=orientation,
        window_center=None, window_width=None, instance_number=number, photometric="MONOCHROME2",
        transfer_syntax="1.2.840.10008.1.2.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        ids=SourceIds("MRN", study, "1.2.3.4", f"1.2.3.4.{value}", "20200101", "ACC"),
    )  # fmt: skip


def test_single_slice_is_2d() -> None:
    out = stack_series([_slice(0.0, 7.0)])
    assert out.pixels.shape == (4, 5) and out.spacing == [0.5, 0.6] and out.warning is None


def test_sorted_along_the_normal_with_spacing() -> None:
    out = stack_series([_slice(z, z) for z in (5.0, -1.0, 2.0, 8.0)])
    assert out.pixels.shape == (4, 4, 5) and list(out.pixels[:, 0, 0]) == [-1.0, 2.0, 5.0, 8.0]
    assert out.spacing == [3.0, 0.5, 0.6] and out.warning is None


def test_sagittal_normal() -> None:
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal = -x
    images = [
        replace(_slice(0.0, v, orientation=sagittal), image_position=(x, 0.0, 0.0)) for v, x in ((2.0, 1.0), (1.0, 3.0))
    ]
    assert list(stack_series(images).pixels[:, 0, 0]) == [1.0, 2.0]  # x=3 comes first along -x


def test_instance_number_fallback_is_reported() -> None:
    out = stack_series([_slice(None, v, number=n) for v, n in ((1.0, 2), (0.0, 1))])
    assert list(out.pixels[:, 0, 0]) == [0.0, 1.0] and "InstanceNumber" in out.warning


def test_uneven_spacing_is_reported() -> None:
    assert "uneven" in stack_series([_slice(z, z) for z in (0.0, 1.0, 3.0)]).warning


@pytest.mark.parametrize(
    ("images", "match"),
    [([_slice(0.0, 1.0), _slice(0.0, 2.0)], "share a position"),
     ([_slice(0.0, 1.0), _slice(1.0, 2.0, shape=(4, 4))], "Rows x Columns"),
     ([_slice(0.0, 1.0), _slice(1.0, 2.0, study="9.9")], "StudyInstanceUID"),
     ([_slice(0.0, 1.0), _slice(1.0, 2.0, orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))], "ImageOrientationPatient"),
     ([_slice(None, 1.0), _slice(None, 2.0)], "nor InstanceNumber")],
)  # fmt: skip
def test_unstackable_series_raise(images: list[DicomImage], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        stack_series(images)
    assert "9.9" not in str(info.value) and "MRN" not in str(info.value)  # causes, never values
