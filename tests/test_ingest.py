"""tasks.ingest: manifest, arrays, quarantine and summary from a DICOM folder; nothing identifying written."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tasks import ingest
from tasks.config import ParamsError, load_params
from tasks.dicom.pseudonym import Pseudonymizer
from tasks.dicom import read_dicom
from tasks.sources.split import check_patient_disjoint

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _copy_cohort(tiny_cohort, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(tiny_cohort.dicom_dir, dest / "dicom")
    shutil.copy(tiny_cohort.labels_csv, dest / "labels.csv")
    return dest / "dicom", dest / "labels.csv"


def test_outputs_add_up(ingested_cohort, tiny_cohort) -> None:
    out, s = ingested_cohort.output, ingested_cohort.summary
    rows = _rows(ingested_cohort.manifest)
    assert tuple(rows[0]) == ingest.MANIFEST_COLUMNS
    assert s["files_found"] == tiny_cohort.n_files == s["used"] + s["quarantined"] and s["quarantined"] == 0
    assert s["series_built"] == len(rows) == tiny_cohort.n_studies and s["patients"] == tiny_cohort.n_patients
    assert sum(v["images"] for v in s["splits"].values()) == len(rows)
    assert {k: v for k, v in s["labels"].items()} == {
        "0": tiny_cohort.n_studies - tiny_cohort.n_positive,
        "1": tiny_cohort.n_positive,
    }
    assert json.loads((out / "summary.json").read_text()) == s
    assert sorted(p.name for p in (out / "arrays").iterdir()) == sorted(f"{r['image_id']}.npy" for r in rows)
    for r in rows:
        arr = np.load(out / r["path"])
        assert arr.dtype == np.float32 and list(arr.shape) == json.loads(r["shape"]) == [64, 64]
        assert hashlib.sha256(arr.tobytes()).hexdigest() == r["sha256"]
        assert len(json.loads(r["spacing"])) == 2 and r["modality"] == "CT" and r["unit"] == "HU"
        assert r["split"] in ("train", "val", "test") and r["label"] in ("0", "1") and r["n_instances"] == "1"
        assert -1024 <= arr.min() < -900 and 300 < arr.max() < 2000
    check_patient_disjoint([r["patient_id"] for r in rows], [r["split"] for r in rows])
    assert _rows(ingested_cohort.quarantine) == []


def _originals(dicom_dir: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(dicom_dir.rglob("*.dcm"))]


def test_nothing_identifying_is_written(ingested_cohort, tiny_cohort, params) -> None:
    out = ingested_cohort.output
    text = "\n".join((out / n).read_text() for n in ("manifest.csv", "summary.json", "quarantine.csv"))
    text += "\n".join(p.name for p in (out / "arrays").iterdir())
    originals = _originals(tiny_cohort.dicom_dir)
    forbidden = set()
    for ds in originals:
        name = str(ds.PatientName)
        forbidden |= {
            name,
            *name.split("^"),
            ds.PatientID,
            ds.PatientBirthDate,
            ds.AccessionNumber,
            ds.InstitutionName,
            str(ds.ReferringPhysicianName),
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            ds.FrameOfReferenceUID,
            ds.StudyDate,
        }
    leaked = sorted(v for v in forbidden if v and v in text)
    assert not leaked, f"identifying values in the ingest outputs: {leaked}"

    # every study date is shifted back by its patient's offset, in [1, max_date_shift_days] days
    pseudo = Pseudonymizer.from_params(params.ingest.deid)
    by_patient = {pseudo.patient_id(ds.PatientID): ds.PatientID for ds in originals}
    originals_of = {(ds.PatientID, ds.StudyDate) for ds in originals}
    for r in _rows(ingested_cohort.manifest):
        pid = by_patient[r["patient_id"]]
        shift = pseudo.date_shift_days(pid)
        assert 1 <= shift <= params.ingest.deid.max_date_shift_days
        original = (dt.date.fromisoformat(r["study_date"]) + dt.timedelta(days=shift)).strftime("%Y%m%d")
        assert (pid, original) in originals_of


def test_bad_files_are_quarantined_with_reasons(tiny_cohort, params, tmp_path: Path) -> None:
    dicom_dir, labels = _copy_cohort(tiny_cohort, tmp_path)
    good = sorted(dicom_dir.rglob("*.dcm"))
    raw = good[0].read_bytes()
    (dicom_dir / "bad").mkdir()
    (dicom_dir / "bad" / "cut.dcm").write_bytes(raw[: len(raw) // 2])
    (dicom_dir / "bad" / "notes.txt").write_text("not an image\n")
    ds = pydicom.dcmread(good[1])
    del ds.PixelData
    ds.save_as(dicom_dir / "bad" / "IM0001", enforce_file_format=True)  # no extension: still found

    res = ingest.run(params, tmp_path / "out", dicom_dir, labels, progress=False)
    quarantine = {r["path"]: r["reason"] for r in _rows(res.quarantine)}
    assert quarantine == {"bad/cut.dcm": "truncated", "bad/notes.txt": "not_dicom", "bad/IM0001": "no_pixel_data"}
    s = res.summary
    assert (s["files_found"], s["used"], s["quarantined"]) == (len(good) + 3, len(good), 3)
    assert s["quarantined_by_reason"] == {"no_pixel_data": 1, "not_dicom": 1, "truncated": 1}
    assert len(_rows(res.manifest)) == tiny_cohort.n_studies


def test_duplicates_and_missing_labels_are_quarantined(tiny_cohort, params, tmp_path: Path) -> None:
    dicom_dir, labels = _copy_cohort(tiny_cohort, tmp_path)
    first = sorted(dicom_dir.rglob("*.dcm"))[0]
    shutil.copy(first, first.with_name("zz_copy.dcm"))
    rows = labels.read_text().splitlines()
    dropped = read_dicom(sorted(dicom_dir.rglob("*.dcm"))[-1], "AccessionNumber").ids.label_value
    labels.write_text("\n".join(r for r in rows if not r.startswith(f"{dropped},")) + "\n")

    res = ingest.run(params, tmp_path / "out", dicom_dir, labels, progress=False)
    reasons = sorted(r["reason"] for r in _rows(res.quarantine))
    assert reasons == ["duplicate_instance", "no_label"]
    assert res.summary["used"] + res.summary["quarantined"] == res.summary["files_found"]
    assert dropped not in res.quarantine.read_text()


def test_volumes_are_stacked_along_the_normal(make_params, tmp_path: Path) -> None:
    from tasks.synth import run as synthesize

    params = make_params({"synth.n_patients": 8, "synth.image_size": 32, "synth.slices_per_study": 3})
    cohort = synthesize(params.synth, tmp_path / "cohort", progress=False)
    for study in cohort.dicom_dir.glob("*/*"):  # reverse the file order so that names do not give the order
        files = sorted(study.glob("*.dcm"))
        for f in files:
            f.rename(f.with_suffix(".tmp"))
        for f, g in zip(files, reversed(files), strict=True):
            f.with_suffix(".tmp").rename(g)
    res = ingest.run(params, tmp_path / "out", cohort.dicom_dir, cohort.labels_csv, progress=False)
    assert res.summary["series_built"] == cohort.n_studies and res.summary["used"] == cohort.n_files
    study = next(cohort.dicom_dir.glob("*/*"))
    slices = sorted((read_dicom(p) for p in study.glob("*.dcm")), key=lambda im: im.image_position[2])
    expected = np.stack([im.pixels for im in slices])
    rows = _rows(res.manifest)
    match = [r for r in rows if np.array_equal(np.load(res.output / r["path"]), expected)]
    assert len(match) == 1 and json.loads(match[0]["shape"]) == [3, 32, 32]
    spacing = json.loads(match[0]["spacing"])
    assert spacing[0] == pytest.approx(slices[0].slice_thickness) and match[0]["n_instances"] == "3"


def test_parallel_equals_serial_and_secret_changes_pseudonyms(
    tiny_cohort, make_params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDPIPE_DEID_SECRET", raising=False)
    serial = ingest.run(make_params(), tmp_path / "a", tiny_cohort.dicom_dir, tiny_cohort.labels_csv, False)
    parallel = ingest.run(make_params({"ingest.workers": 2}), tmp_path / "b", tiny_cohort.dicom_dir,
                          tiny_cohort.labels_csv, False)  # fmt: skip
    assert serial.manifest.read_bytes() == parallel.manifest.read_bytes()
    assert serial.summary["secret"] == "development-default"

    monkeypatch.setenv("MEDPIPE_DEID_SECRET", "a-real-secret-value")
    keyed = ingest.run(make_params(), tmp_path / "c", tiny_cohort.dicom_dir, tiny_cohort.labels_csv, False)
    assert keyed.summary["secret"] == "env:MEDPIPE_DEID_SECRET"
    assert {r["patient_id"] for r in _rows(keyed.manifest)}.isdisjoint(r["patient_id"] for r in _rows(serial.manifest))
    for path in keyed.output.rglob("*"):
        if path.is_file():
            assert b"a-real-secret-value" not in path.read_bytes(), path


def test_without_labels_everything_is_used_and_split(tiny_cohort, make_params, tmp_path: Path) -> None:
    res = ingest.run(make_params({"ingest.labels_csv": None}), tmp_path / "out", tiny_cohort.dicom_dir, None, False)
    rows = _rows(res.manifest)
    assert len(rows) == tiny_cohort.n_studies and {r["label"] for r in rows} == {""}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert res.summary["labels"] == {"none": len(rows)} and res.summary["labels_csv"] is None


@pytest.mark.parametrize(
    ("content", "match"),
    [("Accession,label\nA1,0\n", "missing column"), ("AccessionNumber,label\nA1,2\n", ":2: need"),
     ("AccessionNumber,label\nA1,yes\n", "not an integer"), ("AccessionNumber,label\nA1,0\nA1,1\n", "two different")],
)  # fmt: skip
def test_bad_label_table_fails_naming_the_file(tiny_cohort, params, tmp_path: Path, content: str, match: str) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        ingest.run(params, tmp_path / "out", tiny_cohort.dicom_dir, labels, progress=False)
    assert str(labels) in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [({"ingest.workers": 0}, "ingest.workers"), ({"ingest.val_fraction": 0.7}, "ingest.val_fraction"),
     ({"ingest.source": "png"}, "ingest.source"), ({"ingest.deid.max_date_shift_days": 0}, "ingest.deid.max"),
     ({"ingest.deid.secret": "x"}, "ingest.deid.secret"), ({"ingest.labels": "x.csv"}, "ingest.labels")],
)  # fmt: skip
def test_invalid_params_name_the_key(override: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(REPO / "params.yaml", override)


def test_cli(tiny_cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("MEDPIPE_DEID_SECRET", raising=False)
    ingest.main(["--params", str(REPO / "params.yaml"), "--output", str(tmp_path / "out"),
                 "--input", str(tiny_cohort.dicom_dir), "--labels", str(tiny_cohort.labels_csv)])  # fmt: skip
    captured = capsys.readouterr()
    assert f"files found {tiny_cohort.n_files}: used {tiny_cohort.n_files}" in captured.out
    assert "development default" in captured.err
    assert (tmp_path / "out" / "manifest.csv").exists()


def test_refuses_an_output_folder_that_is_not_an_ingest_output(tiny_cohort, params, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an ingest output"):
        ingest.run(params, tmp_path / "out", tiny_cohort.dicom_dir, tiny_cohort.labels_csv, progress=False)


def test_cli_reports_bad_input_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ingest.main(["--params", str(REPO / "params.yaml"), "--output", str(tmp_path / "out"),
                     "--input", str(tmp_path / "missing"), "--labels", str(tmp_path / "missing.csv")])  # fmt: skip
    assert info.value.code == 2
    assert "missing.csv: label table not found" in capsys.readouterr().err
