"""Masks in the DICOM world: DICOM SEG written and read with highdicom, RTSTRUCT rasterised onto an image's grid,
SEG / RTSTRUCT files attached to their images by ingest after a geometry check (or quarantined with the reason),
and a prediction written back as SEG from ingest's pseudonymised geometry alone."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tasks import synth
from tasks.dicom.pseudonym import Pseudonymizer
from tasks.dicom.rtstruct import RtStructError, read_rtstruct
from tasks.dicom.seg import RTSTRUCT_STORAGE, SEG_STORAGE, read_seg, write_prediction_seg, write_seg
from tasks.schema import SynthParams
from tasks.sources.dicom_folder import collect_dicom

CLASSES = ["lung", "lesion"]
SMALL = SynthParams(n_patients=4, image_size=32, slices_per_study=3, seed=11)


def _geometry(n: int = 3, rows: int = 16, columns: int = 20) -> dict:
    """A pseudonymised DICOM geometry as ingest writes it (geometry/<image_id>.json)."""
    return {
        "kind": "dicom",
        "modality": "CT",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "2.25.1001",
        "series_instance_uid": "2.25.1002",
        "frame_of_reference_uid": "2.25.1003",
        "patient_id": "P0123456789abcdef",
        "sop_instance_uids": [f"2.25.{2000 + k}" for k in range(n)],
        "image_positions": [[-12.0, -8.5, 40.0 + 2.5 * k] for k in range(n)],
        "image_orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "pixel_spacing": [0.7, 0.8],
        "slice_thickness": 2.5,
        "rows": rows,
        "columns": columns,
        "number_of_frames": 1,
    }


def _label_map(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.uint8)
    out[..., 2:9, 3:12] = 1
    out[(rng.random(shape) < 0.05) & (out == 1)] = 2
    return out


@pytest.mark.parametrize("n", [1, 3])
def test_prediction_seg_round_trip(n: int, tmp_path: Path) -> None:
    """A prediction written from a geometry dict (no source files) reads back with the same values, the same
    per-frame references and positions, spacing, orientation and frame of reference; it carries only pseudonyms."""
    g = _geometry(n)
    pred = _label_map((n, 16, 20), seed=n)
    path = write_prediction_seg(g, pred if n > 1 else pred[0], CLASSES, tmp_path / "pred.dcm",
                                algorithm_name="medpipe-segmenter", algorithm_version="0123abcd")  # fmt: skip
    seg = read_seg(path)
    assert seg.series_uid == g["series_instance_uid"] and seg.study_uid == g["study_instance_uid"]
    assert seg.frame_of_reference == g["frame_of_reference_uid"]
    assert set(seg.source_sop_uids) == set(g["sop_instance_uids"])
    for uid, pos in zip(seg.source_sop_uids, seg.positions, strict=True):
        assert np.allclose(pos, g["image_positions"][g["sop_instance_uids"].index(uid)])
    assert seg.pixel_spacing == (0.7, 0.8) and seg.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert seg.segment_labels == {1: "lung", 2: "lesion"}
    labels, notes = seg.to_label_map(g["sop_instance_uids"], ["LUNG", "Lesion"])  # names match in any case
    assert notes == [] and np.array_equal(labels, pred)

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SEG_STORAGE and ds.SegmentationType == "BINARY"
    assert str(ds.PatientName) == ds.PatientID == g["patient_id"]
    assert all(not str(ds.get(k, "")) for k in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate",
                                                "ReferringPhysicianName", "InstitutionName"))  # fmt: skip
    item = ds.SegmentSequence[0]
    assert item.SegmentAlgorithmType == "AUTOMATIC"
    assert item.SegmentAlgorithmName == "medpipe-segmenter"
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"  # SCT Lung
    assert ds.SegmentSequence[1].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # altered struct.


def test_seg_labels_outside_the_classes_and_overlaps_are_noted(tmp_path: Path) -> None:
    """Segments whose label is not a class are left out with a note; an empty prediction still round-trips."""
    g = _geometry(2)
    pred = _label_map((2, 16, 20))
    seg = read_seg(write_prediction_seg(g, pred, ["lung", "heart"], tmp_path / "a.dcm", algorithm_name="m"))
    labels, notes = seg.to_label_map(g["sop_instance_uids"], CLASSES)
    assert np.array_equal(labels, np.where(pred == 1, 1, 0)) and len(notes) == 1 and "'heart'" in notes[0]
    empty = read_seg(write_prediction_seg(g, np.zeros((2, 16, 20), np.uint8), CLASSES, tmp_path / "b.dcm",
                                          algorithm_name="m"))  # fmt: skip
    labels, notes = empty.to_label_map(g["sop_instance_uids"], CLASSES)
    assert not labels.any() and labels.shape == (2, 16, 20)
    with pytest.raises(ValueError, match="does not fit"):
        write_prediction_seg(g, np.zeros((3, 16, 20), np.uint8), CLASSES, tmp_path / "c.dcm", algorithm_name="m")


@pytest.fixture
def cohort(tmp_path: Path) -> synth.SynthResult:
    """A small 3D synthetic cohort (3 slices per study) with its SEGs, in this test's folder."""
    return synth.run(SMALL, tmp_path / "cohort", progress=False)


def _collect(dicom_dir: Path, make_params: Callable, **overrides) -> tuple:
    ip = make_params({"ingest.input": str(dicom_dir), **overrides}).ingest
    pseudo = Pseudonymizer.from_params(ip.deid)
    got = collect_dicom(dicom_dir, ip, pseudo, progress=False, skip={(dicom_dir / "labels.csv").resolve()})
    return got, pseudo


def test_ingest_attaches_the_synthetic_masks(cohort: synth.SynthResult, make_params) -> None:
    """Every synthetic study's image gets its SEG as a uint8 mask of its shape: lung-dark under label 1, a lesion
    exactly in the positive studies; the geometry holds only pseudonymised UIDs, one per slice."""
    got, pseudo = _collect(cohort.dicom_dir, make_params)
    with cohort.labels_csv.open(newline="") as fh:
        label_of = {r["AccessionNumber"]: int(r["label"]) for r in csv.DictReader(fh)}
    assert got.quarantine == [] and len(got.images) == cohort.n_studies
    raw_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in cohort.dicom_dir.rglob("*.dcm")}  # fmt: skip
    for im in got.images:
        assert im.mask_source == "SEG" and im.mask is not None
        assert im.mask.shape == im.pixels.shape == (3, 32, 32) and im.mask.dtype == np.uint8
        assert im.pixels[im.mask == 1].mean() < -600  # HU of lung
        assert bool((im.mask == 2).any()) == bool(label_of[im.label_value])
        assert len(im.files) == 4  # three slices and the SEG: all used
        g = im.geometry
        assert len(g["sop_instance_uids"]) == len(g["image_positions"]) == 3
        assert np.all(np.diff([p[2] for p in g["image_positions"]]) > 0)  # stacked order: along the normal
        assert not raw_uids & {*g["sop_instance_uids"], g["series_instance_uid"], g["study_instance_uid"],
                               g["frame_of_reference_uid"]}  # fmt: skip
        assert g["series_instance_uid"] == im.series_uid and g["patient_id"] == im.patient_id


def test_ingest_run_writes_masks_and_keeps_the_books(tiny_cohort, make_params, run_ingest, tmp_path: Path) -> None:
    """tasks.ingest.run on the (2D) tiny cohort: the SEG files count as used, every image has its mask file."""
    params = make_params({"ingest.input": str(tiny_cohort.dicom_dir)})
    res = run_ingest(params, tmp_path / "out")
    s = res.summary
    assert s["files_found"] == tiny_cohort.n_files + tiny_cohort.n_seg == s["used"] and s["quarantined"] == 0
    with res.manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == tiny_cohort.n_studies
    for r in rows:
        mask = np.load(tmp_path / "out" / r["mask_path"])
        assert mask.shape == np.load(tmp_path / "out" / r["path"]).shape and mask.dtype == np.uint8
        assert (2 in mask) == (r["label"] == "1")


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _spacing(ds: pydicom.Dataset) -> None:
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [1.5, 1.5]


def _origin(ds: pydicom.Dataset) -> None:
    for item in ds.PerFrameFunctionalGroupsSequence:
        pos = item.PlanePositionSequence[0]
        pos.ImagePositionPatient = [float(pos.ImagePositionPatient[0]) + 4.0, *pos.ImagePositionPatient[1:]]


def _frame_of_reference(ds: pydicom.Dataset) -> None:
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid(entropy_srcs=["another frame"])


def _no_segments(ds: pydicom.Dataset) -> None:
    del ds.SegmentSequence


def _other_series(ds: pydicom.Dataset) -> None:
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["no such series"])


@pytest.mark.parametrize(
    ("change", "reason", "detail"),
    [
        (_spacing, "mask_geometry", "spacing 1.5x1.5 mm vs image"),
        (_origin, "mask_geometry", "origin"),
        (_frame_of_reference, "mask_geometry", "frame of reference differs"),
        (_no_segments, "mask_unreadable", "SEG"),
        (_other_series, "mask_orphan", "no image of it was ingested"),
    ],
    ids=["spacing", "origin", "frame_of_reference", "unreadable", "orphan"],
)
def test_a_seg_that_does_not_fit_is_quarantined_and_the_image_kept(
    change: Callable, reason: str, detail: str, cohort: synth.SynthResult, make_params
) -> None:
    bad = sorted(cohort.dicom_dir.rglob(synth.SEG_FILE))[0]
    _edit(bad, change)
    got, pseudo = _collect(cohort.dicom_dir, make_params)
    rel = bad.relative_to(cohort.dicom_dir).as_posix()
    ((file, why, text),) = got.quarantine
    assert (file, why) == (pseudo.path(rel), reason) and detail in text, text
    assert len(got.images) == cohort.n_studies  # every image kept
    without = [im for im in got.images if im.mask is None]
    assert len(without) == 1 and pseudo.path(rel) not in without[0].files
    assert sum(im.mask is not None for im in got.images) == cohort.n_studies - 1


def test_a_copied_seg_is_a_duplicate_instance(cohort: synth.SynthResult, make_params) -> None:
    seg = sorted(cohort.dicom_dir.rglob(synth.SEG_FILE))[0]
    shutil.copy(seg, seg.with_name("zz_copy.dcm"))
    got, _ = _collect(cohort.dicom_dir, make_params)
    assert [r for _, r, _ in got.quarantine] == ["duplicate_instance"]
    assert all(im.mask is not None for im in got.images)


def _ring(cx: float, cy: float, z: float, r: float, n: int = 72) -> list[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t), np.full(n, z)]).ravel().round(3).tolist()


def _write_rtstruct(study: Path, path: Path, rois: dict[str, list[list[float]]], frame: str | None = None) -> None:
    """A minimal RT Structure Set (pydicom) over the series in ``study``: ROIs of closed planar contours (mm)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence

    first = pydicom.dcmread(sorted(study.glob("slice*.dcm"))[0], stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(path)])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality = RTSTRUCT_STORAGE, "RTSTRUCT"
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):  # fmt: skip
        setattr(ds, key, first.get(key, ""))
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(path), "series"])
    ds.SeriesNumber, ds.InstanceNumber = 200, 1
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "test", first.StudyDate, "120000"
    for_uid = frame or first.FrameOfReferenceUID
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = Sequence([series])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = for_uid
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])
    roi_items, contour_items = [], []
    for number, (name, rings) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, for_uid
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_items.append(roi)
        contours = []
        for ring in rings:
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints, c.ContourData = "CLOSED_PLANAR", len(ring) // 3, ring
            contours.append(c)
        item = Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = number, [255, 0, 0]
        item.ContourSequence = Sequence(contours)
        contour_items.append(item)
    ds.StructureSetROISequence = Sequence(roi_items)
    ds.ROIContourSequence = Sequence(contour_items)
    ds.save_as(path, enforce_file_format=True)


def _discs(study: Path) -> tuple[dict[str, list[list[float]]], np.ndarray]:
    """ROIs (a 'Lung' disc on every slice, a 'LESION' disc and a 'Heart' on the middle one) and the label map
    they should give on the study's grid (pixel centres within the radius)."""
    slices = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in study.glob("slice*.dcm")),
                    key=lambda d: float(d.ImagePositionPatient[2]))  # fmt: skip
    x0, y0, _ = (float(v) for v in slices[0].ImagePositionPatient)
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    xs, ys = x0 + col_mm * np.arange(cols), y0 + row_mm * np.arange(rows)
    zs = [float(d.ImagePositionPatient[2]) for d in slices]
    expected = np.zeros((len(zs), rows, cols), np.uint8)
    lung_c, lung_r, les_c, les_r = (-40.0, 10.0), 70.0, (-50.0, 0.0), 25.0
    inside = lambda c, r: (xs[None, :] - c[0]) ** 2 + (ys[:, None] - c[1]) ** 2 <= r**2  # noqa: E731
    for k in range(len(zs)):
        expected[k][inside(lung_c, lung_r)] = 1
    expected[1][inside(les_c, les_r)] = 2
    rois = {
        "Lung": [_ring(*lung_c, z, lung_r) for z in zs],
        "LESION": [_ring(*les_c, zs[1], les_r)],
        "Heart": [_ring(60.0, 0.0, zs[1], 30.0)],
    }
    return rois, expected


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_rtstruct_is_rasterised_onto_its_image(cohort: synth.SynthResult, make_params) -> None:
    """An RTSTRUCT of known discs (a 72-gon each) replaces a study's SEG: ingest attaches it with Dice > 0.9 per
    class against the discs drawn on the pixel grid; the ROI outside the class list is noted."""
    study = sorted(cohort.dicom_dir.glob("*/*/"))[0]
    (study / synth.SEG_FILE).unlink()
    rois, expected = _discs(study)
    _write_rtstruct(study, study / "rtstruct.dcm", rois)
    got, pseudo = _collect(cohort.dicom_dir, make_params)
    assert got.quarantine == []
    (im,) = [im for im in got.images if im.mask_source == "RTSTRUCT"]
    assert pseudo.path((study / "rtstruct.dcm").relative_to(cohort.dicom_dir).as_posix()) in im.files
    for value in (1, 2):
        assert _dice(im.mask == value, expected == value) > 0.9
    assert any("'Heart'" in n and "not in the class list" in n for n in im.notes), im.notes
    # the same through the public reader, on the geometry ingest recorded (UIDs mapped alike)
    ds = pydicom.dcmread(study / "rtstruct.dcm")
    for seq in ds.ReferencedFrameOfReferenceSequence:
        seq.FrameOfReferenceUID = pseudo.uid(seq.FrameOfReferenceUID)
        seq.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID = pseudo.uid(
            seq.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID)  # fmt: skip
    for roi in ds.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = pseudo.uid(roi.ReferencedFrameOfReferenceUID)
    labels, _ = read_rtstruct(ds, im.geometry, CLASSES)
    assert np.array_equal(labels, im.mask)
    shifted = dict(im.geometry, image_positions=[[x, y, z + 1.0] for x, y, z in im.geometry["image_positions"]])
    with pytest.raises(RtStructError, match="not on a slice"):
        read_rtstruct(ds, shifted, CLASSES)


def test_rtstruct_in_another_frame_of_reference_is_quarantined(cohort: synth.SynthResult, make_params) -> None:
    study = sorted(cohort.dicom_dir.glob("*/*/"))[0]
    (study / synth.SEG_FILE).unlink()
    rois, _ = _discs(study)
    _write_rtstruct(study, study / "rtstruct.dcm", rois, frame=pydicom.uid.generate_uid(entropy_srcs=["elsewhere"]))
    got, pseudo = _collect(cohort.dicom_dir, make_params)
    ((file, reason, detail),) = got.quarantine
    assert file == pseudo.path((study / "rtstruct.dcm").relative_to(cohort.dicom_dir).as_posix())
    assert reason == "mask_geometry" and "frame of reference" in detail
    assert len(got.images) == cohort.n_studies and sum(im.mask is None for im in got.images) == 1


def test_prediction_from_ingest_geometry_references_the_source_instances(cohort: synth.SynthResult, make_params,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    """evaluate's path: a predicted mask on an ingested image, written as SEG from the image's geometry alone, reads
    back onto the same slices with the same values, and holds no identifying value of the source files."""
    got, _ = _collect(cohort.dicom_dir, make_params)
    im = next(im for im in got.images if (im.mask == 2).any())
    pred = np.roll(im.mask, 1, axis=-1)  # any label map of the image's shape
    path = write_prediction_seg(im.geometry, pred, CLASSES, tmp_path / "pred.dcm", algorithm_name="medpipe-test")
    seg = read_seg(path)
    labels, notes = seg.to_label_map(im.geometry["sop_instance_uids"], CLASSES)
    assert notes == [] and np.array_equal(labels, pred)
    assert seg.series_uid == im.series_uid and seg.frame_of_reference == im.geometry["frame_of_reference_uid"]
    raw = [pydicom.dcmread(p, stop_before_pixels=True) for p in cohort.dicom_dir.rglob("slice*.dcm")]
    keys = ("PatientName", "PatientID", "AccessionNumber", "StudyDate", "StudyInstanceUID", "SeriesInstanceUID",
            "SOPInstanceUID", "FrameOfReferenceUID", "PatientBirthDate", "InstitutionName")
    forbidden = {str(ds.get(k, "")) for ds in raw for k in keys}
    text = path.read_bytes()
    assert not [v for v in forbidden if v and v.encode() in text]


def test_write_seg_from_source_files_is_byte_identical(cohort: synth.SynthResult, tmp_path: Path) -> None:
    """write_seg with fixed UIDs and dates writes the same bytes twice (synth relies on it) and refuses a label
    map that does not fit the sources."""
    study = sorted(cohort.dicom_dir.glob("*/*/"))[0]
    slices = sorted(study.glob("slice*.dcm"))
    mask = _label_map((3, 32, 32))
    kwargs = dict(manual=True, series_number=9, series_instance_uid="2.25.1", sop_instance_uid="2.25.2",
                  content_date="20200102", content_time="030405")  # fmt: skip
    a = write_seg(slices, mask, CLASSES, tmp_path / "a.dcm", **kwargs)
    b = write_seg(list(reversed(slices)), mask, CLASSES, tmp_path / "b.dcm", **kwargs)  # any order of sources
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="label value 3"):
        write_seg(slices, mask + 1, CLASSES, tmp_path / "c.dcm", **kwargs)


def test_a_third_party_seg_is_read() -> None:
    """pydicom-data's liver.dcm (a SEG made by another tool) reads into planes on its referenced instances."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("liver.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed (pip install -e '.[dev]')")
    seg = read_seg(path)
    assert seg.segment_labels == {1: "Liver"} and seg.planes.shape == (3, 512, 512, 1)
    assert seg.positions is not None and seg.positions.shape == (3, 3) and seg.frame_of_reference
    labels, notes = seg.to_label_map(list(reversed(seg.source_sop_uids)), ["lung", "liver"])
    assert notes == [] and set(np.unique(labels)) == {0, 2}
    assert np.array_equal(labels[::-1] == 2, seg.planes[..., 0])  # each plane on the slice its instance is
