"""Paths are identifiers: a PACS export names folders ``<PatientName>_<PatientID>`` and files ``<SOPInstanceUID>.dcm``.

Ingest must name an input file in its outputs (everything under data/ingested, which DVC tracks and whose summary.json
and deid_audit.json train logs to MLflow) only by its keyed pseudonym; the pseudonym -> real path mapping goes to the
local report ``ingest.local_report`` alone, outside the output. And an instance without a PatientID (empty or absent)
is a patient of its own (or shares one with its study), never the patient of every other such instance.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pydicom
import pytest

from tasks.dicom.pseudonym import Pseudonymizer


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _export_like_a_pacs(src: Path, dest: Path) -> tuple[set[str], dict[str, str]]:
    """Copy the cohort under ``src`` to ``dest`` as a PACS export lays it out, plus files that end in quarantine
    (their names identify too): a second copy of an instance (duplicate), a truncated instance and a text file.

    Returns:
        (every identifying string of the export: names, name parts, ids, UIDs, folder and file names,
        the real relative path of each quarantined file -> its expected reason).
    """
    dest.mkdir(parents=True)
    shutil.copy(src / "labels.csv", dest / "labels.csv")
    forbidden: set[str] = set()
    files = sorted(src.rglob("*.dcm"))
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        name, pid = str(ds.PatientName), str(ds.PatientID)
        folder = f"{name}_{pid}"
        (dest / folder).mkdir(exist_ok=True)
        shutil.copy(f, dest / folder / f"{ds.SOPInstanceUID}.dcm")
        forbidden |= {name, *(p for p in name.split("^") if len(p) >= 4), pid, folder, ds.StudyInstanceUID,
                      ds.SeriesInstanceUID, ds.SOPInstanceUID, f"{ds.SOPInstanceUID}.dcm"}  # fmt: skip
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    second = pydicom.dcmread(files[1], stop_before_pixels=True)
    folder1 = f"{first.PatientName}_{first.PatientID}"
    folder2 = f"{second.PatientName}_{second.PatientID}"
    (dest / folder1 / "again").mkdir()
    shutil.copy(files[0], dest / folder1 / "again" / f"{first.SOPInstanceUID}.dcm")
    raw = files[1].read_bytes()
    (dest / folder2 / f"{second.SOPInstanceUID}.1.dcm").write_bytes(raw[: len(raw) // 2])
    (dest / folder2 / f"{second.PatientID} notes.txt").write_text("not an image\n")
    quarantined = {
        # sorted() puts "<folder>/<uid>.dcm" before "<folder>/again/<uid>.dcm": the copy in again/ is the duplicate
        f"{folder1}/again/{first.SOPInstanceUID}.dcm": "duplicate_instance",
        f"{folder2}/{second.SOPInstanceUID}.1.dcm": "truncated",
        f"{folder2}/{second.PatientID} notes.txt": "not_dicom",
    }
    forbidden.add(f"{second.SOPInstanceUID}.1.dcm")
    return forbidden, quarantined


def test_no_identifying_path_reaches_any_output(tiny_cohort, make_params, run_ingest, tmp_path: Path) -> None:
    """Identifiers in folder and file names reach no file under the ingest output (text or binary, nor any output
    file's name); the local report, outside it, maps each pseudonym back to the real relative path."""
    export = tmp_path / "export"
    forbidden, quarantined = _export_like_a_pacs(tiny_cohort.dicom_dir, export)
    report = tmp_path / "local" / "paths.csv"
    params = make_params({"ingest.input": str(export), "ingest.deid.write_dicom": True,
                          "ingest.local_report": str(report)})  # fmt: skip
    res = run_ingest(params, tmp_path / "out")
    n_files = tiny_cohort.n_files + tiny_cohort.n_seg  # the slices and their SEGs
    assert res.summary["quarantined"] == len(quarantined) and res.summary["used"] == n_files

    outputs = {p.relative_to(res.output).as_posix(): p.read_bytes() for p in res.output.rglob("*") if p.is_file()}
    assert {"manifest.csv", "quarantine.csv", "summary.json", "deid_audit.json"} <= set(outputs)
    assert any(name.startswith("dicom/") for name in outputs)  # the de-identified copies are scanned too
    hits = sorted({f"{name}: {v}" for name, blob in outputs.items() for v in forbidden if v.encode() in blob}
                  | {f"file name {name}: {v}" for name in outputs for v in forbidden if v in name})  # fmt: skip
    assert not hits, f"{len(hits)} identifying strings in the ingest output: {hits[:8]}"
    # what MLflow receives from ingest: summary.json and deid_audit.json as artifacts, summary["params"] as params
    mlflow_bound = (res.output / "summary.json").read_text() + (res.output / "deid_audit.json").read_text()
    assert not [v for v in forbidden if v in mlflow_bound]
    assert res.summary["input"] == res.summary["params"]["input"] == "<absolute path, not recorded>"
    assert "local_report" not in res.summary["params"]  # changes nothing in the output, like workers

    # quarantine.csv names files by pseudonym; the local report says which real file each one is
    pseudo = Pseudonymizer.from_params(params.ingest.deid)
    rows = _rows(res.quarantine)
    assert tuple(rows[0]) == ("file", "reason", "detail")
    assert {r["file"]: r["reason"] for r in rows} == {pseudo.path(rel): why for rel, why in quarantined.items()}
    local = _rows(report)
    assert tuple(local[0]) == ("file", "path", "reason", "image_ids")
    assert len(local) == res.summary["files_found"] == len({r["file"] for r in local})
    by_file = {r["file"]: r for r in local}
    for r in local:
        assert (export / r["path"]).is_file() and r["file"] == pseudo.path(r["path"])
    for rel, why in quarantined.items():
        assert by_file[pseudo.path(rel)]["path"] == rel and by_file[pseudo.path(rel)]["reason"] == why
    (dup,) = [r for r in rows if r["reason"] == "duplicate_instance"]
    original = dup["detail"].rsplit(" ", 1)[-1]  # "same SOPInstanceUID as F..."
    dup_rel = next(rel for rel, why in quarantined.items() if why == "duplicate_instance")
    assert by_file[original]["path"] == dup_rel.replace("/again/", "/") and by_file[original]["image_ids"]
    manifest = _rows(res.manifest)
    used = {i for r in local for i in r["image_ids"].split()}
    assert used == {r["image_id"] for r in manifest}
    assert all(r["reason"] == "" for r in local if r["image_ids"])


def test_the_same_file_has_the_same_pseudonym_wherever_the_export_lies(tiny_cohort, make_params, run_ingest,
                                                                       tmp_path: Path) -> None:  # fmt: skip
    """The pseudonym is of the path relative to the input folder: moving the export changes no output byte."""
    forbidden, _ = _export_like_a_pacs(tiny_cohort.dicom_dir, tmp_path / "a" / "export")
    shutil.copytree(tmp_path / "a" / "export", tmp_path / "b" / "elsewhere")
    outs = []
    for name, folder in (("a", tmp_path / "a" / "export"), ("b", tmp_path / "b" / "elsewhere")):
        params = make_params({"ingest.input": str(folder), "ingest.local_report": str(tmp_path / f"{name}.csv")})
        outs.append(run_ingest(params, tmp_path / f"out-{name}"))
    for text in ("quarantine.csv", "manifest.csv", "summary.json"):
        assert (outs[0].output / text).read_bytes() == (outs[1].output / text).read_bytes(), text
    assert _rows(tmp_path / "a.csv") == _rows(tmp_path / "b.csv")


@pytest.mark.parametrize("where", ["output", "input"])
def test_the_local_report_may_not_lie_in_the_output_or_the_input(tiny_cohort, make_params, run_ingest,
                                                                 tmp_path: Path, where: str) -> None:  # fmt: skip
    """Inside the output, DVC would track it (and a remote receive it); inside the input, it would be a file of the
    data set (a DVC dependency, and a not_dicom file of the next run)."""
    export = shutil.copytree(tiny_cohort.dicom_dir, tmp_path / "export")
    inside = {"output": tmp_path / "out" / "reports" / "paths.csv", "input": export / "paths.csv"}[where]
    params = make_params({"ingest.input": str(export), "ingest.local_report": str(inside)})
    with pytest.raises(ValueError, match=rf"ingest\.local_report: .*paths\.csv lies inside the ingest {where}"):
        run_ingest(params, tmp_path / "out")
    assert not inside.exists() and not (tmp_path / "out").exists()  # refused before anything is written


def test_no_local_report_when_null(tiny_cohort, make_params, run_ingest, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a relative local_report would land here
    params = make_params({"ingest.input": str(tiny_cohort.dicom_dir), "ingest.local_report": None})
    res = run_ingest(params, tmp_path / "out")
    assert res.summary["used"] == tiny_cohort.n_files + tiny_cohort.n_seg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_default_local_report_is_git_ignored_and_no_dvc_output() -> None:
    """The default lies under reports/ (git-ignored: /reports/*) and no stage of dvc.yaml declares it."""
    import subprocess

    from tasks.schema import IngestParams
    from tests.conftest import REPO

    default = IngestParams().local_report
    assert default is not None and not Path(default).is_absolute()
    assert subprocess.run(["git", "check-ignore", "-q", default], cwd=REPO).returncode == 0
    assert default not in (REPO / "dvc.yaml").read_text() and not default.startswith("data/ingested")


# --- empty or missing PatientID ------------------------------------------------------------------------------


def _without_patient_ids(src: Path, dest: Path) -> dict[str, str]:
    """A copy of the cohort where four instances have no usable PatientID. Returns case -> its file's SOP UID:

    * ``empty_s1``: PatientID "" in study S1; ``absent_s1``: a second series of S1 (new SOP/series UIDs), no PatientID
      element: the two are one patient (their study's);
    * ``absent_s2``: no PatientID element in another study S2: a patient of its own;
    * ``no_study``: neither PatientID nor StudyInstanceUID: a patient of its own (its SOPInstanceUID's).
    """
    shutil.copytree(src, dest)
    files = sorted(dest.rglob("slice*.dcm"))  # the CT slices (each study also holds its seg.dcm)
    by_study: dict[str, Path] = {}
    for f in files:
        by_study.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID), f)
    s1, s2, s3 = list(by_study.values())[:3]
    sops = {}
    ds = pydicom.dcmread(s1)
    ds.PatientID = ""
    ds.save_as(s1)
    sops["empty_s1"] = str(ds.SOPInstanceUID)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["sop-a"])
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["series-a"])
    del ds.PatientID
    ds.save_as(s1.with_name("second_series.dcm"))
    sops["absent_s1"] = str(ds.SOPInstanceUID)
    ds = pydicom.dcmread(s2)
    del ds.PatientID
    ds.save_as(s2)
    sops["absent_s2"] = str(ds.SOPInstanceUID)
    ds = pydicom.dcmread(s3)
    del ds.PatientID, ds.StudyInstanceUID
    ds.save_as(s3)
    sops["no_study"] = str(ds.SOPInstanceUID)
    return sops


def test_instances_without_a_patient_id_are_not_one_patient(tiny_cohort, make_params, run_ingest,
                                                            tmp_path: Path) -> None:  # fmt: skip
    sops = _without_patient_ids(tiny_cohort.dicom_dir, tmp_path / "dicom")
    params = make_params({"ingest.input": str(tmp_path / "dicom"), "ingest.local_report": str(tmp_path / "r.csv")})
    res = run_ingest(params, tmp_path / "out")
    assert res.summary["quarantined"] == 0 and res.summary["series_built"] == tiny_cohort.n_studies + 1
    rows = _rows(res.manifest)
    pseudo = Pseudonymizer.from_params(params.ingest.deid)
    # the manifest row of each case, found through the de-identified series UID
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "dicom").rglob("*.dcm")]
    series = {case: pseudo.uid(str(ds.SeriesInstanceUID)) for ds in headers for case, sop in sops.items()
              if str(ds.SOPInstanceUID) == sop}  # fmt: skip
    by_case = {case: next(r for r in rows if r["series_uid"] == uid) for case, uid in series.items()}
    assert len(by_case) == 4
    patient = {case: r["patient_id"] for case, r in by_case.items()}
    assert patient["empty_s1"] == patient["absent_s1"]  # one study, one patient
    assert len({patient["empty_s1"], patient["absent_s2"], patient["no_study"]}) == 3  # never a shared one
    assert pseudo.patient_id("") not in {r["patient_id"] for r in rows}  # the old shared pseudonym
    assert {case: r["patient_id_from"] for case, r in by_case.items()} == {
        "empty_s1": "StudyInstanceUID", "absent_s1": "StudyInstanceUID", "absent_s2": "StudyInstanceUID",
        "no_study": "SOPInstanceUID",
    }  # fmt: skip
    others = [r for r in rows if r not in by_case.values()]
    assert others and {r["patient_id_from"] for r in others} == {"PatientID"}
    assert res.summary["images_without_patient_id"] == 4
    # a patient without an id still has its dates shifted (by its own offset), not dropped
    assert all(r["study_date"] for r in by_case.values())
