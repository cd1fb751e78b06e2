"""tasks.synth: a deterministic, valid, plausible synthetic CT cohort."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tasks import synth
from tasks.dicom import CT_IMAGE_STORAGE, read_dicom
from tasks.schema import SynthParams


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_same_params_give_byte_identical_files(tmp_path: Path) -> None:
    params = SynthParams(n_patients=5, image_size=32, slices_per_study=2, seed=3)
    synth.run(params, tmp_path / "a", progress=False)
    synth.run(params, tmp_path / "b", progress=False)
    synth.run(params, tmp_path / "b", progress=False)  # regenerating in place replaces, same bytes
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert a == b and len(a) > 5
    synth.run(params.model_copy(update={"seed": 4}), tmp_path / "c", progress=False)
    assert _digests(tmp_path / "c") != a


def _slices(root: Path) -> list[Path]:
    """The CT slices of a cohort (each study folder also holds its seg.dcm)."""
    return sorted(root.rglob("slice*.dcm"))


def test_files_are_valid_ct_with_identifying_attributes(tiny_cohort) -> None:
    files = _slices(tiny_cohort.dicom_dir)
    assert len(files) == tiny_cohort.n_files == tiny_cohort.n_studies  # one slice per study here
    segs = sorted(tiny_cohort.dicom_dir.rglob(synth.SEG_FILE))
    assert len(segs) == tiny_cohort.n_seg == tiny_cohort.n_studies  # one SEG per study, next to its series
    assert {p.parent for p in segs} == {p.parent for p in files}
    assert len(list(tiny_cohort.dicom_dir.rglob("*.dcm"))) == len(files) + len(segs)
    patients, sops = set(), set()
    for path in files:
        ds = pydicom.dcmread(path, force=False)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.Modality == "CT"
        assert ds.pixel_array.dtype == np.int16 and ds.pixel_array.shape == (64, 64)
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "InstitutionName",
            "ReferringPhysicianName",
            "StudyDate",
            "StudyInstanceUID",
        ):
            assert str(ds.get(keyword, "")).strip(), keyword
        patients.add(ds.PatientID)
        sops.add(ds.SOPInstanceUID)
    assert len(patients) == tiny_cohort.n_patients and len(sops) == len(files)


def test_hu_values_are_plausible(tiny_cohort) -> None:
    hu = np.stack([read_dicom(p).pixels for p in _slices(tiny_cohort.dicom_dir)])
    assert hu.min() >= -1024 and hu.max() < 2000
    assert 0.4 < np.mean(hu < -950) < 0.75  # air around the body
    assert 0.05 < np.mean((hu > -950) & (hu < -700)) < 0.4  # lungs
    assert 0.1 < np.mean((hu > -30) & (hu < 100)) < 0.6  # soft tissue
    assert 0.002 < np.mean(hu > 300) < 0.05  # bone


def test_labels_csv_matches_the_studies(tiny_cohort) -> None:
    with tiny_cohort.labels_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["AccessionNumber", "label"]
    assert tiny_cohort.labels_csv == tiny_cohort.dicom_dir / "labels.csv"  # inside the data folder (ingest.input)
    accessions = {str(pydicom.dcmread(p, stop_before_pixels=True).AccessionNumber)
                  for p in _slices(tiny_cohort.dicom_dir)}  # fmt: skip
    assert {r["AccessionNumber"] for r in rows} == accessions and len(rows) == tiny_cohort.n_studies
    labels = [int(r["label"]) for r in rows]
    assert set(labels) == {0, 1} and sum(labels) == tiny_cohort.n_positive == round(0.5 * len(rows))


@pytest.mark.parametrize("seed", range(6))
def test_a_lesion_is_a_local_soft_tissue_blob(seed: int) -> None:
    rng = np.random.default_rng(seed)
    anatomy = synth._sample_anatomy(rng)
    lesion = synth._sample_lesion(rng, anatomy, 1)
    with_lesion, *_ = synth.render_study(np.random.default_rng(0), anatomy, 128, 1, lesion)
    without, _, spacing, _ = synth.render_study(np.random.default_rng(0), anatomy, 128, 1, None)
    diff = with_lesion.astype(int) - without
    changed = diff > 0.5 * diff.max()  # the nodule's half-maximum outline
    assert diff.min() == 0 and diff.max() > 15  # it only adds, and visibly
    assert 0.6 < changed.sum() * spacing**2 / (np.pi * lesion["r"] ** 2) < 1.5  # its area is pi r^2
    ys, xs = np.nonzero(changed[0])
    assert np.ptp(ys) * spacing < 2.5 * lesion["r"] and np.ptp(xs) * spacing < 2.5 * lesion["r"]  # one blob
    peak_hu = with_lesion.ravel()[diff.argmax()] - 1024.0
    assert -50 < peak_hu < 160  # soft tissue, not bone or air


def test_volumes_have_ordered_distinct_slices(tmp_path: Path) -> None:
    res = synth.run(SynthParams(n_patients=4, image_size=32, slices_per_study=5), tmp_path, progress=False)
    study = sorted(res.dicom_dir.glob("case0001/study1/slice*.dcm"))
    z = [read_dicom(p).image_position[2] for p in study]
    assert len(z) == 5 and np.allclose(np.diff(z), read_dicom(study[0]).slice_thickness)


def test_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "precious.dcm").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not made by tasks.synth"):
        synth.run(SynthParams(n_patients=4, image_size=32), tmp_path, progress=False)
    assert (tmp_path / "dicom" / "precious.dcm").exists()


@pytest.mark.slow
def test_default_cohort_is_what_synth_json_says(tmp_path: Path) -> None:
    res = synth.run(SynthParams(), tmp_path, progress=False)  # 240 patients, 128 px
    record = json.loads((tmp_path / synth.MARKER).read_text())
    files = _slices(res.dicom_dir)
    assert record["params"] == SynthParams().model_dump(mode="json")
    assert (record["patients"], record["studies"], record["files"]) == (240, res.n_studies, len(files))
    assert len({p.parent.parent.name for p in files}) == 240 and 240 < res.n_studies <= 480  # 1-2 studies each
    assert record["positive_studies"] == res.n_positive == round(0.5 * res.n_studies)
    assert record["seg_files"] == res.n_seg == res.n_studies


@pytest.mark.parametrize("seed", range(4))
def test_masks_are_the_painted_shapes(seed: int) -> None:
    """The lung label covers lung-dark pixels, the lesion label the nodule's half-maximum outline (the shapes the
    renderer paints, thresholded at r <= 1); a study without a nodule has no lesion label."""
    rng = np.random.default_rng(seed)
    anatomy = synth._sample_anatomy(rng)
    lesion = synth._sample_lesion(rng, anatomy, 3)
    with_lesion, *_ = synth.render_study(np.random.default_rng(0), anatomy, 128, 3, lesion)
    without, *_ = synth.render_study(np.random.default_rng(0), anatomy, 128, 3, None)
    mask = synth.study_mask(anatomy, 128, 3, lesion)
    assert mask.shape == with_lesion.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2}
    hu = without.astype(float) - 1024
    lung = mask == 1
    assert lung.sum() > 0.05 * lung.size
    assert np.mean(hu[lung] < -600) > 0.9  # lung-dark inside the label
    assert np.mean(lung[(hu > -950) & (hu < -650)]) > 0.7  # lung-dark tissue (not air) is mostly labelled lung
    changed = (with_lesion.astype(int) - without) > 0.5 * (with_lesion.astype(int) - without).max()
    lesion_px = mask == 2
    dice = 2 * (changed & lesion_px).sum() / (changed.sum() + lesion_px.sum())
    assert dice > 0.8, dice
    assert not (synth.study_mask(anatomy, 128, 3, None) == 2).any()


def test_seg_files_hold_the_masks(tmp_path: Path) -> None:
    """Each study's seg.dcm is a DICOM SEG referencing that study's slices, with segments lung and lesion; read
    back on the slices it equals study_mask; positives (labels.csv) have lesion voxels, negatives none."""
    from tasks.dicom.seg import SEG_STORAGE, read_seg

    params = SynthParams(n_patients=4, image_size=32, slices_per_study=3, seed=5)
    res = synth.run(params, tmp_path, progress=False)
    with res.labels_csv.open(newline="") as fh:
        label_of = {r["AccessionNumber"]: int(r["label"]) for r in csv.DictReader(fh)}
    for seg_path in sorted(res.dicom_dir.rglob(synth.SEG_FILE)):
        slices = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(seg_path.parent.glob("slice*.dcm"))]
        ds = pydicom.dcmread(seg_path)
        assert ds.SOPClassUID == SEG_STORAGE and ds.SegmentationType == "BINARY"
        seg = read_seg(seg_path)
        assert seg.series_uid == slices[0].SeriesInstanceUID
        assert seg.frame_of_reference == slices[0].FrameOfReferenceUID
        assert [seg.segment_labels[n] for n in sorted(seg.segment_labels)] == ["lung", "lesion"]
        labels, notes = seg.to_label_map([s.SOPInstanceUID for s in slices], ["lung", "lesion"])
        assert notes == [] and labels.shape == (3, 32, 32)
        assert (labels == 1).sum() > 0.05 * labels.size
        assert bool((labels == 2).any()) == bool(label_of[str(slices[0].AccessionNumber)])
