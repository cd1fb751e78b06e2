"""tasks.ingest: manifest, arrays, quarantine and summary from a DICOM folder; nothing identifying written."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tasks import ingest
from tasks.config import ParamsError, load_params, write_overrides
from tasks.dicom import read_dicom
from tasks.dicom.pseudonym import Pseudonymizer
from tasks.sources.split import check_patient_disjoint

REPO = Path(__file__).resolve().parents[1]
TEXT_OUTPUTS = ("manifest.csv", "summary.json", "quarantine.csv", "deid_audit.json")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in its tmp_path: the default ingest.local_report is relative (reports/ingest/...), and a test
    must not overwrite the real one of this working copy."""
    monkeypatch.chdir(tmp_path)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _copy_cohort(tiny_cohort, make_params, dest: Path, **overrides):
    """A private copy of the tiny cohort's folder (labels.csv inside) and params whose ``ingest.input`` is it."""
    shutil.copytree(tiny_cohort.dicom_dir, dest)
    return dest, make_params({"ingest.input": str(dest), **overrides})


def test_outputs_add_up(ingested_cohort, tiny_cohort, cohort_params) -> None:
    out, s = ingested_cohort.output, ingested_cohort.summary
    rows = _rows(ingested_cohort.manifest)
    assert tuple(rows[0]) == ingest.MANIFEST_COLUMNS
    # the label table inside the folder is not a candidate image: found = the DICOM files
    assert s["files_found"] == tiny_cohort.n_files + tiny_cohort.n_seg == s["used"] and s["quarantined"] == 0
    assert s["series_built"] == len(rows) == tiny_cohort.n_studies and s["patients"] == tiny_cohort.n_patients
    assert sum(v["images"] for v in s["splits"].values()) == len(rows)
    assert sum(v["patients"] for v in s["splits"].values()) == tiny_cohort.n_patients  # disjoint by patient
    assert s["labels"] == {"0": tiny_cohort.n_studies - tiny_cohort.n_positive, "1": tiny_cohort.n_positive}
    assert s["class_names"] == ["normal", "lesion"] and s["labels_unmatched"] == 0
    assert json.loads((out / "summary.json").read_text()) == s
    # what made this output: the ingest group (minus workers) and the split seed; no timings
    assert s["params"]["split_seed"] == cohort_params.base.split_seed and "workers" not in s["params"]
    assert s["params"]["labels_csv"] == "labels.csv" and "wall_s" not in s and "local_report" not in s["params"]
    assert s["images_without_patient_id"] == 0
    assert sorted(p.name for p in (out / "arrays").iterdir()) == sorted(f"{r['image_id']}.npy" for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["arrays", "deid_audit.json", "geometry", "manifest.csv", "masks",
                                                     "quarantine.csv", "summary.json"]  # fmt: skip
    for r in rows:
        arr = np.load(out / r["path"])
        assert arr.dtype == np.float32 and list(arr.shape) == json.loads(r["shape"]) == [64, 64]
        assert hashlib.sha256(arr.tobytes()).hexdigest() == r["sha256"]
        assert len(json.loads(r["spacing"])) == 2 and r["modality"] == "CT" and r["unit"] == "HU"
        assert r["split"] in ("train", "val", "test") and r["label"] in ("0", "1") and r["n_instances"] == "2"
        assert r["patient_id_from"] == "PatientID"  # every synthetic instance has one
        assert -1024 <= arr.min() < -900 and 300 < arr.max() < 2000
    check_patient_disjoint([r["patient_id"] for r in rows], [r["split"] for r in rows])
    assert _rows(ingested_cohort.quarantine) == []


def test_labels_are_those_of_the_table(ingested_cohort, tiny_cohort, cohort_params) -> None:
    """Each image carries the label its AccessionNumber has in labels.csv (matched through the pseudonymised ids)."""
    with tiny_cohort.labels_csv.open(newline="") as fh:
        table = {r["AccessionNumber"]: r["label"] for r in csv.DictReader(fh)}
    pseudo = Pseudonymizer.from_params(cohort_params.ingest.deid)
    expected = {}
    for p in sorted(tiny_cohort.dicom_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        expected[pseudo.study_id(ds.StudyInstanceUID)] = table[ds.AccessionNumber]
    got = {r["study_id"]: r["label"] for r in _rows(ingested_cohort.manifest)}
    assert got == expected


def _originals(dicom_dir: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(dicom_dir.rglob("slice*.dcm"))]


def test_nothing_identifying_is_written(ingested_cohort, tiny_cohort, params) -> None:
    out = ingested_cohort.output
    text = "\n".join((out / n).read_text() for n in TEXT_OUTPUTS)
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


def _add_bad_files(dicom_dir: Path) -> int:
    """Three unusable files under ``dicom_dir/bad``; returns how many good DICOM files the folder holds."""
    good = sorted(dicom_dir.rglob("*.dcm"))
    raw = good[0].read_bytes()
    (dicom_dir / "bad").mkdir()
    (dicom_dir / "bad" / "cut.dcm").write_bytes(raw[: len(raw) // 2])
    (dicom_dir / "bad" / "notes.txt").write_text("not an image\n")
    ds = pydicom.dcmread(good[1])
    del ds.PixelData
    ds.save_as(dicom_dir / "bad" / "IM0001", enforce_file_format=True)  # no extension: still found
    return len(good)


def test_bad_files_are_quarantined_with_reasons(tiny_cohort, make_params, run_ingest, tmp_path: Path) -> None:
    """Each bad file is a quarantine row named by its path's pseudonym; the local report gives the path back."""
    dicom_dir, params = _copy_cohort(tiny_cohort, make_params, tmp_path / "dicom",
                                     **{"ingest.local_report": str(tmp_path / "local.csv")})  # fmt: skip
    n_good = _add_bad_files(dicom_dir)
    res = run_ingest(params, tmp_path / "out")
    quarantine = {r["file"]: r["reason"] for r in _rows(res.quarantine)}
    pseudo = Pseudonymizer.from_params(params.ingest.deid)
    expected = {"bad/cut.dcm": "truncated", "bad/notes.txt": "not_dicom", "bad/IM0001": "no_pixel_data"}
    assert quarantine == {pseudo.path(rel): reason for rel, reason in expected.items()}
    local = {r["path"]: r["reason"] for r in _rows(tmp_path / "local.csv")}
    assert len(local) == n_good + 3 and {k: v for k, v in local.items() if v} == expected
    s = res.summary
    assert (s["files_found"], s["used"], s["quarantined"]) == (n_good + 3, n_good, 3)
    assert s["quarantined_by_reason"] == {"no_pixel_data": 1, "not_dicom": 1, "truncated": 1}
    assert len(_rows(res.manifest)) == tiny_cohort.n_studies


def test_no_absolute_input_path_in_the_outputs(tiny_cohort, make_params, run_ingest, tmp_path: Path) -> None:
    """An absolute input (and label table) leaves no trace of where it lay: paths are relative to the input."""
    dicom_dir, params = _copy_cohort(tiny_cohort, make_params, tmp_path / "PATIENT_EXPORT" / "dicom")
    _add_bad_files(dicom_dir)  # quarantine rows and their details too
    assert dicom_dir.is_absolute()
    res = run_ingest(params, tmp_path / "out")
    assert res.summary["quarantined"] == 3  # the check below reads a non-empty quarantine
    texts = {name: (res.output / name).read_text() for name in TEXT_OUTPUTS}
    for needle in {str(dicom_dir), str(dicom_dir.resolve()), "PATIENT_EXPORT", str(tmp_path)}:
        assert not [name for name, text in texts.items() if needle in text], needle
    assert res.summary["input"] == res.summary["params"]["input"] == ingest.portable_path(dicom_dir)
    assert res.summary["input"] == res.summary["labels_csv"] == "<absolute path, not recorded>"


def test_a_relative_input_is_recorded_as_given(tiny_cohort, make_params, run_ingest, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    shutil.copytree(tiny_cohort.dicom_dir, tmp_path / "data" / "cohort")
    monkeypatch.chdir(tmp_path)
    res = run_ingest(make_params({"ingest.input": "data/cohort"}), Path("out"))
    assert res.summary["input"] == res.summary["params"]["input"] == "data/cohort"
    assert res.summary["labels_csv"] == "data/cohort/labels.csv"
    assert res.summary["series_built"] == tiny_cohort.n_studies


def test_duplicates_and_missing_labels_are_quarantined(tiny_cohort, make_params, run_ingest, tmp_path: Path) -> None:
    dicom_dir, params = _copy_cohort(tiny_cohort, make_params, tmp_path / "dicom")
    labels = dicom_dir / "labels.csv"
    first = sorted(dicom_dir.rglob("slice*.dcm"))[0]
    shutil.copy(first, first.with_name("zz_copy.dcm"))
    rows = labels.read_text().splitlines()
    dropped = read_dicom(sorted(dicom_dir.rglob("slice*.dcm"))[-1], "AccessionNumber").ids.label_value
    labels.write_text("\n".join(r for r in rows if not r.startswith(f"{dropped},")) + "\n")

    res = run_ingest(params, tmp_path / "out")
    reasons = sorted(r["reason"] for r in _rows(res.quarantine))
    assert reasons == ["duplicate_instance", "no_label", "no_label"]  # the unlabelled image's slice and its SEG
    assert res.summary["used"] + res.summary["quarantined"] == res.summary["files_found"]
    assert res.summary["series_built"] == tiny_cohort.n_studies - 1
    assert dropped not in res.quarantine.read_text()


def test_label_rows_without_an_image_are_counted(tiny_cohort, make_params, run_ingest, tmp_path: Path) -> None:
    dicom_dir, params = _copy_cohort(tiny_cohort, make_params, tmp_path / "dicom")
    with (dicom_dir / "labels.csv").open("a") as fh:
        fh.write("A-NO-SUCH-STUDY,1\nA-NOR-THIS,0\n")
    assert run_ingest(params, tmp_path / "out").summary["labels_unmatched"] == 2


def test_volumes_are_stacked_along_the_normal(make_params, run_ingest, tmp_path: Path) -> None:
    from tasks.synth import run as synthesize

    shrink = {"synth.n_patients": 8, "synth.image_size": 32, "synth.slices_per_study": 3}
    cohort = synthesize(make_params(shrink).synth, tmp_path / "cohort", progress=False)
    for study in cohort.dicom_dir.glob("*/*"):  # reverse the file order so that names do not give the order
        files = sorted(study.glob("slice*.dcm"))
        for f in files:
            f.rename(f.with_suffix(".tmp"))
        for f, g in zip(files, reversed(files), strict=True):
            f.with_suffix(".tmp").rename(g)
    res = run_ingest(make_params({**shrink, "ingest.input": str(cohort.dicom_dir)}), tmp_path / "out")
    assert res.summary["series_built"] == cohort.n_studies and res.summary["used"] == cohort.n_files + cohort.n_seg
    study = next(cohort.dicom_dir.glob("*/*"))
    slices = sorted((read_dicom(p) for p in study.glob("slice*.dcm")), key=lambda im: im.image_position[2])
    expected = np.stack([im.pixels for im in slices])
    assert not np.array_equal(expected, expected[::-1])  # the order is visible in the pixels
    rows = _rows(res.manifest)
    match = [r for r in rows if np.array_equal(np.load(res.output / r["path"]), expected)]
    assert len(match) == 1 and json.loads(match[0]["shape"]) == [3, 32, 32]
    spacing = json.loads(match[0]["spacing"])
    assert spacing[0] == pytest.approx(slices[0].slice_thickness) and match[0]["n_instances"] == "4"  # + SEG


def test_secret_changes_pseudonyms_and_is_never_written(
    tiny_cohort, cohort_params, run_ingest, ingested_cohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDPIPE_DEID_SECRET", "a-real-secret-value")
    keyed = run_ingest(cohort_params, tmp_path / "c")
    assert keyed.summary["secret"] == "env:MEDPIPE_DEID_SECRET"
    assert {r["patient_id"] for r in _rows(keyed.manifest)}.isdisjoint(
        r["patient_id"] for r in _rows(ingested_cohort.manifest)
    )
    for path in keyed.output.rglob("*"):
        if path.is_file():
            assert b"a-real-secret-value" not in path.read_bytes(), path


def test_without_labels_everything_is_used_and_split(tiny_cohort, cohort_params, make_params, run_ingest,
                                                     tmp_path: Path) -> None:  # fmt: skip
    params = make_params({"ingest.input": str(tiny_cohort.dicom_dir), "ingest.labels_csv": None})
    res = run_ingest(params, tmp_path / "out")
    rows = _rows(res.manifest)
    assert len(rows) == tiny_cohort.n_studies and {r["label"] for r in rows} == {""}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert res.summary["labels"] == {"none": len(rows)} and res.summary["labels_csv"] is None
    # the table is no longer set apart as the label table: it is a file of the folder, and not DICOM
    pseudo = Pseudonymizer.from_params(params.ingest.deid)
    assert {r["file"]: r["reason"] for r in _rows(res.quarantine)} == {pseudo.path("labels.csv"): "not_dicom"}
    assert res.summary["class_names"] == cohort_params.base.class_names


@pytest.mark.parametrize(
    ("content", "match"),
    [("Accession,label\nA1,0\n", "missing column"), ("AccessionNumber,label\nA1,2\n", ":2: need"),
     ("AccessionNumber,label\nA1,yes\n", "not an integer"), ("AccessionNumber,label\nA1,0\nA1,1\n", "two different")],
)  # fmt: skip
def test_bad_label_table_fails_naming_the_file(cohort_params, run_ingest, tmp_path: Path, content: str,
                                               match: str) -> None:  # fmt: skip
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        run_ingest(cohort_params, tmp_path / "out", labels_csv=labels)
    assert str(labels) in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_missing_label_table_inside_the_input_is_an_error(tiny_cohort, make_params, run_ingest,
                                                          tmp_path: Path) -> None:  # fmt: skip
    params = make_params({"ingest.input": str(tiny_cohort.dicom_dir), "ingest.labels_csv": "tables/labels.csv"})
    with pytest.raises(FileNotFoundError, match=r"tables/labels\.csv: label table not found.*ingest\.labels_csv"):
        run_ingest(params, tmp_path / "out")


@pytest.mark.parametrize(
    ("override", "key"),
    [({"ingest.workers": 0}, r"ingest\.workers"), ({"ingest.val_fraction": 0.7}, r"ingest\.val_fraction"),
     ({"ingest.source": "png"}, r"ingest\.source"), ({"ingest.deid.max_date_shift_days": 0}, r"ingest\.deid\.max"),
     ({"ingest.deid.secret": "x"}, r"ingest\.deid\.secret"), ({"ingest.labels": "x.csv"}, r"ingest\.labels"),
     ({"ingest.dicom_dir": "x"}, r"ingest\.dicom_dir: unknown key"),
     ({"ingest.labels_csv": "../labels.csv"}, r"ingest\.labels_csv: Value error, '\.\./labels\.csv' must be a rel"),
     ({"ingest.labels_csv": "/data/labels.csv"}, r"ingest\.labels_csv: Value error, '/data/labels\.csv' must be a"),
     ({"base.split_seed": -1}, r"base\.split_seed")],
)  # fmt: skip
def test_invalid_params_name_the_key(override: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key):
        load_params(REPO / "params.yaml", override)


def test_cli(tiny_cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("MEDPIPE_DEID_SECRET", raising=False)
    ingest.main(["--params", str(REPO / "params.yaml"), "--output", str(tmp_path / "out"),
                 "--input", str(tiny_cohort.dicom_dir), "--labels", str(tiny_cohort.labels_csv)])  # fmt: skip
    captured = capsys.readouterr()
    n_files = tiny_cohort.n_files + tiny_cohort.n_seg
    assert f"files found {n_files}: used {n_files}" in captured.out
    assert "development default" in captured.err and "without labels" not in captured.err
    # the local report, at params' default (relative to the working directory, as ingest.input), lists every file
    local = _rows(tmp_path / "reports" / "ingest" / "local_paths.csv")
    assert sorted(r["path"] for r in local) == sorted(p.relative_to(tiny_cohort.dicom_dir).as_posix()
                                                      for p in tiny_cohort.dicom_dir.rglob("*.dcm"))  # fmt: skip
    rows = _rows(tmp_path / "out" / "manifest.csv")
    assert len(rows) == tiny_cohort.n_studies and {r["label"] for r in rows} == {"0", "1"}


def test_cli_ingests_another_folder_without_labels(tiny_cohort, tmp_path: Path) -> None:
    """``python -m tasks.ingest --input OTHER --output X``: OTHER is not ingest.input, so its labels are not
    guessed; the folder is ingested unlabelled and stderr says so."""
    other = tmp_path / "other"
    shutil.copytree(tiny_cohort.dicom_dir, other)
    (other / "labels.csv").unlink()  # a plain folder of DICOM files
    env = {**os.environ, "MEDPIPE_DEID_SECRET": ""}
    cmd = [sys.executable, "-m", "tasks.ingest", "--params", str(REPO / "params.yaml"), "--input", str(other),
           "--output", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"ingest: {other} without labels (give --labels CSV to label it)" in proc.stderr
    rows = _rows(tmp_path / "out" / "manifest.csv")
    assert len(rows) == tiny_cohort.n_studies and {r["label"] for r in rows} == {""}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["labels_csv"] is None and summary["params"]["labels_csv"] is None
    # another folder than ingest.input: its path (it may name a patient) is not recorded
    assert summary["input"] == summary["params"]["input"] == "<not ingest.input, not recorded>"
    assert summary["labels"] == {"none": tiny_cohort.n_studies} and summary["quarantined"] == 0


def test_cli_the_configured_folder_spelled_differently_keeps_its_labels(
    tiny_cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    write_overrides(params, {"ingest.input": str(tiny_cohort.dicom_dir), "ingest.workers": 1,
                             "synth.n_patients": 12})  # fmt: skip
    spelled = tiny_cohort.dicom_dir / ".." / tiny_cohort.dicom_dir.name
    ingest.main(["--params", str(params), "--output", str(tmp_path / "out"), "--input", str(spelled)])
    assert "without labels" not in capsys.readouterr().err
    rows = _rows(tmp_path / "out" / "manifest.csv")
    assert len(rows) == tiny_cohort.n_studies and {r["label"] for r in rows} == {"0", "1"}


def test_refuses_an_output_folder_that_is_not_an_ingest_output(cohort_params, run_ingest, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an ingest output"):
        run_ingest(cohort_params, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_refuses_an_output_folder_that_holds_the_input(tiny_cohort, make_params, run_ingest, tmp_path: Path) -> None:
    dicom_dir, params = _copy_cohort(tiny_cohort, make_params, tmp_path / "data" / "dicom")
    for output in (tmp_path / "data", dicom_dir):
        with pytest.raises(ValueError, match="holds the input"):
            run_ingest(params, output)
    assert len(list(dicom_dir.rglob("*.dcm"))) == tiny_cohort.n_files + tiny_cohort.n_seg


def test_an_interrupted_ingest_does_not_block_the_next(make_params, run_ingest, cohort_params, tiny_cohort,
                                                       tmp_path: Path) -> None:  # fmt: skip
    from tasks.synth import run as synthesize

    few = make_params({"synth.n_patients": 4, "synth.image_size": 32, "synth.max_studies_per_patient": 1})
    cohort = synthesize(few.synth, tmp_path / "few", progress=False)
    few = make_params({"ingest.input": str(cohort.dicom_dir)})
    with pytest.raises(ValueError, match="cannot split 4 patients"):  # after the output folder was prepared
        run_ingest(few, tmp_path / "out")
    res = run_ingest(cohort_params, tmp_path / "out")
    assert res.summary["series_built"] == tiny_cohort.n_studies


def test_cli_reports_bad_input_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ingest.main(["--params", str(REPO / "params.yaml"), "--output", str(tmp_path / "out"),
                     "--input", str(tmp_path / "missing"), "--labels", str(tmp_path / "missing.csv")])  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.csv: label table not found" in err and "Traceback" not in err


def test_cli_says_an_empty_folder_holds_no_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        ingest.main(["--params", str(REPO / "params.yaml"), "--output", str(tmp_path / "out"),
                     "--input", str(tmp_path / "empty")])  # fmt: skip
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"no files found under {tmp_path / 'empty'}" in err and "quarantine" not in err


def test_cli_names_the_count_when_no_file_is_usable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit) as info:
        ingest.main(["--params", str(REPO / "params.yaml"), "--output", str(tmp_path / "out"),
                     "--input", str(tmp_path / "junk")])  # fmt: skip
    assert info.value.code == 1
    assert "no usable image among 1 file(s)" in capsys.readouterr().err
