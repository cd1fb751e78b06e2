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
from tasks.config import SynthParams
from tasks.dicom import CT_IMAGE_STORAGE, read_dicom


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


def test_files_are_valid_ct_with_identifying_attributes(tiny_cohort) -> None:
    files = sorted(tiny_cohort.dicom_dir.rglob("*.dcm"))
    assert len(files) == tiny_cohort.n_files == tiny_cohort.n_studies  # one slice per study here
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
    hu = np.stack([read_dicom(p).pixels for p in sorted(tiny_cohort.dicom_dir.rglob("*.dcm"))])
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
                  for p in tiny_cohort.dicom_dir.rglob("*.dcm")}  # fmt: skip
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
    study = sorted(res.dicom_dir.glob("case0001/study1/*.dcm"))
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
    files = sorted(res.dicom_dir.rglob("*.dcm"))
    assert record["params"] == SynthParams().model_dump(mode="json")
    assert (record["patients"], record["studies"], record["files"]) == (240, res.n_studies, len(files))
    assert len({p.parent.parent.name for p in files}) == 240 and 240 < res.n_studies <= 480  # 1-2 studies each
    assert record["positive_studies"] == res.n_positive == round(0.5 * res.n_studies)
