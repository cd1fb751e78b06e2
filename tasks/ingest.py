"""Stage 1: a data set (a DICOM folder, a MedMNIST .npz) to de-identified arrays, a manifest and a split.

``python -m tasks.ingest --params params.yaml --output data/ingested [--input PATH] [--labels CSV]``

The source (:mod:`tasks.sources.dicom_folder`, :mod:`tasks.sources.medmnist`) yields image records: for DICOM every
file under the input folder is read, de-identified (PS3.15 basic profile), grouped by series and stacked along the
slice normal. This stage labels them from the label table (:mod:`tasks.sources.labels`), splits them by patient
(:mod:`tasks.sources.split`, seeded by ``base.split_seed``) and writes them. A file that cannot be used is
quarantined with a reason; an error that is not the file's (a bug, the environment) stops the stage with the file
named (:class:`tasks.sources.dicom_folder.UnexpectedReadError`). Every output is a function of the inputs (no
timings, no absolute paths). Writes::

    <output>/arrays/<image_id>.npy   float32, (H, W) for a one-slice series, (D, H, W) otherwise; HU for CT
    <output>/manifest.csv            one row per image, columns MANIFEST_COLUMNS (pseudonymous ids only)
    <output>/quarantine.csv          file (the pseudonym of its path), reason, detail
    <output>/summary.json            counts (found = used + quarantined), per split and label, secret source
    <output>/deid_audit.json         PS3.15 actions applied (counts per action), images flagged for burned-in text
    <output>/dicom/<series>/<sop>.dcm  the de-identified instances (only with ingest.deid.write_dicom)
    <ingest.local_report>            LOCAL, outside <output>: file pseudonym -> real path, reason, image ids

Nothing of the PS3.15 basic profile's identifying attributes reaches these files: ids are HMAC pseudonyms,
the series UID is remapped, the study date is shifted per patient (or left empty), nothing else is copied.

Paths are identifiers too: a PACS export names folders ``<PatientName>_<PatientID>`` and files
``<SOPInstanceUID>.dcm``. So the outputs (which DVC tracks and pushes; train logs summary.json and deid_audit.json
to MLflow) name an input file only by its pseudonym ``F<hex>``, a keyed HMAC of its path relative to the input
folder (:meth:`tasks.dicom.pseudonym.Pseudonymizer.path`); the way back is the local report alone, so that the data
owner can find a quarantined file: a file of this machine, git-ignored under ``reports/``, no DVC output, never
logged, and refused inside the output or input folder. The input folder itself is recorded (summary.json, and
from there MLflow) only as params name it: ``ingest.input`` when it is the folder ingested and a relative path
(it is in params.yaml and MLflow's params already); an absolute path or another folder (``--input``) is not
recorded. A file that stops the run (UnexpectedReadError) is named by its relative path on stderr only.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.dicom.pseudonym import Pseudonymizer
from tasks.schema import IngestParams
from tasks.sources.labels import read_labels
from tasks.sources.records import ImageRecord

MANIFEST_COLUMNS = (
    "image_id", "patient_id", "study_id", "series_uid", "study_date", "label", "split", "path", "sha256",
    "shape", "spacing", "modality", "unit", "n_instances", "channels", "selection", "patient_id_from",
    "notes", "mask_path", "mask_labels", "mask_source", "geometry_path",
)  # fmt: skip
# n_instances: the files behind the image (its DICOM instances, and its mask file when it has one)
# mask_path: masks/<image_id>.npy, a uint8 label map of the image's spatial shape (value v = ingest.masks.classes[v-1]);
# empty when the image has no (usable) mask. mask_labels: the label values it holds (JSON list). geometry_path:
# geometry/<image_id>.json, what maps a prediction back and writes it as DICOM SEG (pseudonymised UIDs only)
# notes: what the reader did beyond the standard path, "; "-joined fixed sentences (a gzip-wrapped file unwrapped,
# an empty LUT item ignored, MONOCHROME2 assumed for an ACR-NEMA file, ...: tasks.dicom.DicomImage.notes)
# patient_id_from: what the patient pseudonym was made from (tasks.dicom.pseudonym.PATIENT_ID_FROM): "PatientID", or
# when the instance had none (empty or absent) "StudyInstanceUID" / "SOPInstanceUID" / "file" (a patient of its own);
# "" for a source without patient ids (MedMNIST: each image is its own patient)
QUARANTINE_COLUMNS = ("file", "reason", "detail")  # file: the pseudonym of its path (the local report has the path)
LOCAL_REPORT_COLUMNS = ("file", "path", "reason", "image_ids")  # path: relative to the input folder
# Reasons decided here, beyond a single file's tasks.dicom.REASONS:
INGEST_REASONS = (
    "duplicate_instance",  # a second file with a SOPInstanceUID already seen
    "series_not_selected",  # a valid series that ingest.series does not ask for (the detail says why)
    "no_label",  # a label CSV is given but has no row for the study's label-key value
)  # plus tasks.dicom.series.SERIES_REASONS: a series that cannot be one volume


@dataclass(frozen=True)
class IngestResult:
    """Where ingest wrote its outputs, and its summary (the content of summary.json)."""

    output: Path
    manifest: Path
    quarantine: Path
    summary: dict[str, Any]


OUTPUT_NAMES = ("arrays", "masks", "geometry", "dicom", "manifest.csv", "quarantine.csv", "summary.json",
                "deid_audit.json")


def _prepare_output(output: Path) -> None:
    """Empty ``output`` of a previous ingest's files, so that nothing stale (a DICOM run's deid_audit.json under a
    MedMNIST run, arrays of images no longer in the manifest) survives into this one.

    A folder holding anything else is refused unless it holds a summary.json (an ingest output with extra files);
    an interrupted ingest leaves only these names, so its folder is accepted again.
    """
    import shutil

    if output.exists():
        foreign = sorted(p.name for p in output.iterdir() if p.name not in OUTPUT_NAMES)
        if foreign and not (output / "summary.json").exists():
            raise FileExistsError(
                f"{output} holds {foreign[:3]} and no summary.json: not an ingest output; refusing to write there"
            )
        for name in OUTPUT_NAMES:
            previous = output / name
            if previous.is_dir():
                shutil.rmtree(previous)
            elif previous.exists():
                previous.unlink()
    (output / "arrays").mkdir(parents=True)


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def portable_path(path: Path | str) -> str:
    """How a configured input path is recorded in outputs and MLflow: as given when relative (a project path such
    as ``data/synthetic/dicom``); an absolute path is not recorded (it names a machine, and real exports name folders
    after patients)."""
    return Path(path).as_posix() if not Path(path).is_absolute() else "<absolute path, not recorded>"


NOT_CONFIGURED = "<not ingest.{key}, not recorded>"


def recorded_inputs(ip: IngestParams, input_path: Path, labels_csv: Path | None) -> tuple[str, str | None]:
    """How summary.json (and from it MLflow) names the input folder and the label table: as params name them
    (:func:`portable_path` of ``ingest.input`` / ``ingest.labels_csv`` in it), which params.yaml and MLflow's params
    hold already, when they are what was ingested; another folder or table (``--input``, ``--labels``), which may be
    named after a patient, is not recorded.

    Returns:
        (input, label table or None when there is none).
    """
    configured = input_path.resolve() == Path(ip.input).resolve()
    recorded = portable_path(ip.input) if configured else NOT_CONFIGURED.format(key="input")
    if labels_csv is None:
        return recorded, None
    table = None if ip.labels_csv is None else (input_path / ip.labels_csv).resolve()
    if configured and Path(labels_csv).resolve() == table:
        return recorded, portable_path(Path(ip.input) / ip.labels_csv)
    return recorded, NOT_CONFIGURED.format(key="labels_csv")


def _check_local_report(report: Path, output: Path, input_path: Path) -> None:
    """Refuse a local report inside the output (DVC would track it, a remote and MLflow receive it) or the input
    (a file of the data set: a DVC dependency, and a not_dicom file of the next run)."""
    where = report.resolve()
    for name, folder in (("output", output), ("input", input_path)):
        if folder.resolve() == where or folder.resolve() in where.parents:
            raise ValueError(
                f"ingest.local_report: {report} lies inside the ingest {name} {folder}; it maps pseudonyms to real "
                "paths, which name patients: put it outside (default reports/ingest/local_paths.csv, git-ignored)"
            )


def write_local_report(
    path: Path, paths: dict[str, str], quarantine: list[tuple[str, str, str]], images: list[ImageRecord]
) -> None:
    """Write the local report: one row per input file, sorted by path: its pseudonym, its path relative to the
    input folder, its quarantine reason ("" when used) and the ids of the images it is part of (space-separated).

    The only file that maps pseudonyms back to real paths: a local file (never an output, never logged).
    """
    reasons = {file: reason for file, reason, _ in quarantine}
    used: dict[str, list[str]] = {}
    for im in images:
        for file in im.files:
            used.setdefault(file, []).append(im.image_id)
    rows = [(file, rel, reasons.get(file, ""), " ".join(sorted(used.get(file, []))))
            for file, rel in sorted(paths.items(), key=lambda kv: kv[1])]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_csv(path, LOCAL_REPORT_COLUMNS, rows)


def run(
    ip: IngestParams,
    output: Path,
    *,
    class_names: list[str] | None = None,
    split_seed: int = 42,
    input_path: Path | None = None,
    labels_csv: Path | None = None,
    progress: bool = True,
) -> IngestResult:
    """Ingest a data set into ``output``.

    Args:
        ip: the ``ingest`` params group.
        output: the stage's output folder (created; a previous ingest output there is replaced).
        class_names: ``base.class_names`` (None: from the data).
        split_seed: ``base.split_seed``, the patient split's seed.
        input_path: the DICOM folder or MedMNIST .npz; default ``ip.input``.
        labels_csv: the label table; default ``ip.labels_csv`` inside the input folder (None there: no labels).
        progress: show tqdm progress bars.

    Returns:
        The output paths and the summary written to summary.json.

    Raises:
        ValueError: a bad label table, too few patients to split, or an output folder that holds the input.
        FileNotFoundError: the input or the label table does not exist.
        FileExistsError: ``output`` holds other files and is not an ingest output.
    """
    output = Path(output)
    pseudo = Pseudonymizer.from_params(ip.deid)
    input_path = Path(input_path or ip.input)
    if output.resolve() == input_path.resolve() or output.resolve() in input_path.resolve().parents:
        raise ValueError(f"output {output} holds the input {input_path}: ingest replaces its output folder; "
                         "choose another output")  # fmt: skip
    local_report = (Path(ip.local_report) if ip.local_report is not None and ip.source in ("dicom", "image_folder")
                    else None)  # fmt: skip
    if local_report is not None:
        _check_local_report(local_report, output, input_path)
    if labels_csv is None and ip.labels_csv is not None:
        # inside the folder ingested, however it is spelled (main() sets labels_csv null for another folder)
        labels_csv = input_path / ip.labels_csv
    table: dict[str, int] | None = None
    if labels_csv is not None:  # read first: a bad table fails before any DICOM is decoded
        if not Path(labels_csv).is_file():
            raise FileNotFoundError(
                f"{labels_csv}: label table not found (ingest.labels_csv, relative to ingest.input, or --labels)"
            )
        table = read_labels(Path(labels_csv), ip.label_key, ip.label_column, len(class_names) if class_names else None)

    if ip.source == "dicom":
        from tasks.dicom import is_dicom_keyword
        from tasks.sources.dicom_folder import collect_dicom

        if not input_path.is_dir():
            raise FileNotFoundError(f"{input_path}: input folder not found (ingest.input or --input)")
        if not is_dicom_keyword(ip.label_key):
            raise ValueError(f"ingest.label_key: {ip.label_key!r} is not a DICOM keyword")
        _prepare_output(output)
        write_dir = output / "dicom" if ip.deid.write_dicom else None
        skip = {Path(labels_csv).resolve()} if labels_csv is not None else set()
        n_found, images, quarantine, warnings, audit, paths, patient_id_from = collect_dicom(
            input_path, ip, pseudo, progress, write_dir, skip
        )
    elif ip.source == "image_folder":  # images/<id>.*, masks/<id>.*, manifest.csv, splits/
        from tasks.sources.image_folder import collect_folder

        if table is not None:
            raise ValueError("ingest.labels_csv: an image folder's labels are its manifest.csv; set labels_csv: null")
        if not input_path.is_dir():
            raise FileNotFoundError(f"{input_path}: input folder not found (ingest.input or --input)")
        _prepare_output(output)
        got = collect_folder(input_path, ip, progress, class_names)
        n_found, images, quarantine, warnings = got.n_found, got.images, got.quarantine, got.warnings
        audit, paths, patient_id_from = None, got.paths, got.patient_id_from
        class_names = class_names or got.class_names  # summary.json: the folder's names (benign/malignant), not 0/1
    else:  # a MedMNIST .npz: already labelled, official splits kept
        from tasks.sources import medmnist

        if table is not None:
            raise ValueError("ingest.labels_csv: a MedMNIST source carries its own labels; set labels_csv: null")
        try:
            n_found, images, warnings = medmnist.collect(input_path, progress)
        except medmnist.MedMNISTError as exc:
            raise ValueError(str(exc)) from None
        quarantine, audit, paths, patient_id_from = [], None, {}, {}
        if class_names and max(im.label for im in images) >= len(class_names):
            raise ValueError(
                f"base.class_names: {len(class_names)} names, but {input_path} has labels up to "
                f"{max(im.label for im in images)}; give one name per class or null (from the data)"
            )

    unmatched = 0
    if table is not None:
        kept = []
        for im in images:
            if im.label_value in table:
                im.label = table[im.label_value]
                kept.append(im)
            else:
                detail = f"image {im.image_id}: no row for its {ip.label_key} in the label table"
                quarantine += [(file, "no_label", detail) for file in im.files]
        unmatched = len(set(table) - {im.label_value for im in kept})
        images = kept

    from tasks.sources.split import check_patient_disjoint, split_by_patient

    # a source with official splits has set them already; one with an official test split only (an image folder's
    # splits/val{k}.txt) leaves the rest for train/val: split by patient, without a test share
    fixed_test = any(im.split == "test" for im in images) and not any(im.split in ("train", "val") for im in images)
    todo = [im for im in images if not im.split] if fixed_test else images
    if todo and not all(im.split for im in todo):
        labels = None if any(im.label is None for im in todo) else [im.label for im in todo]
        try:
            splits = split_by_patient(
                [im.patient_id for im in todo], labels, ip.val_fraction, 0.0 if fixed_test else ip.test_fraction,
                split_seed,
            )
        except ValueError as exc:
            if labels is not None:
                raise
            # unlabelled (inference, curation): the manifest is still written, without a split
            warnings.append(f"no train/val/test split: {exc}")
            splits = [""] * len(images)
        for im, split in zip(todo, splits, strict=True):
            im.split = str(split)
    check_patient_disjoint([im.patient_id for im in images], [im.split for im in images])

    if ip.source == "medmnist":
        _prepare_output(output)
    rows = []
    from tqdm import tqdm

    ordered = sorted(images, key=lambda r: (r.patient_id, r.study_date, r.image_id))
    for im in tqdm(ordered, desc="ingest: write", unit="img", disable=not progress or len(ordered) < 200):
        rel = f"arrays/{im.image_id}.npy"
        # 8-bit sources stay 8-bit (MedMNIST 64^3 is 0.4 GB as uint8, 1.7 GB as float32); HU etc. as float32
        pixels = np.ascontiguousarray(im.pixels, dtype=np.uint8 if im.unit == "uint8" else np.float32)
        np.save(output / rel, pixels)
        mask_rel = geometry_rel = mask_labels = ""
        if im.mask is not None:
            mask_rel = f"masks/{im.image_id}.npy"
            (output / "masks").mkdir(exist_ok=True)
            np.save(output / mask_rel, np.ascontiguousarray(im.mask, dtype=np.uint8))
            mask_labels = json.dumps([int(v) for v in np.unique(im.mask) if v])
        if im.geometry is not None:
            geometry_rel = f"geometry/{im.image_id}.json"
            (output / "geometry").mkdir(exist_ok=True)
            (output / geometry_rel).write_text(json.dumps(im.geometry, sort_keys=True) + "\n")
        rows.append((
            im.image_id, im.patient_id, im.study_id, im.series_uid, im.study_date,
            "" if im.label is None else im.label, im.split, rel, hashlib.sha256(pixels.tobytes()).hexdigest(),
            json.dumps(list(pixels.shape)), json.dumps(im.spacing and [round(s, 6) for s in im.spacing]),
            im.modality, im.unit, len(im.files), im.channels, im.selection, patient_id_from.get(im.image_id, ""),
            "; ".join(im.notes), mask_rel, mask_labels, im.mask_source if im.mask is not None else "", geometry_rel,
        ))  # fmt: skip
    _write_csv(output / "manifest.csv", MANIFEST_COLUMNS, rows)
    quarantine.sort()
    _write_csv(output / "quarantine.csv", QUARANTINE_COLUMNS, quarantine)
    if local_report is not None:
        write_local_report(local_report, paths, quarantine, images)

    if audit is not None:
        (output / "deid_audit.json").write_text(json.dumps(audit, indent=2) + "\n")
    summary = summarise(n_found, images, quarantine, pseudo, warnings)
    labelled = [im.label for im in images if im.label is not None]
    recorded_input, recorded_labels = recorded_inputs(ip, input_path, labels_csv)
    summary.update(
        class_names=list(class_names or [str(i) for i in range(max(labelled, default=-1) + 1)]),
        source=ip.source,
        input=recorded_input,
        labels_csv=recorded_labels,
        labels_unmatched=unmatched,
        mask_classes=list(ip.masks.classes),  # a segmentation task's foreground classes (value v = classes[v-1])
        images_with_mask=sum(im.mask is not None for im in images),
        images_without_patient_id=sum(patient_id_from.get(im.image_id, "PatientID") != "PatientID" for im in images),
        # what made this output (train logs it with its own params); workers and the local report change nothing
        params={
            **ip.model_dump(mode="json", exclude={"workers", "local_report"}),
            "input": recorded_input,
            "split_seed": split_seed,
        },
    )
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return IngestResult(output, output / "manifest.csv", output / "quarantine.csv", summary)


def summarise(
    n_found: int, images: list[ImageRecord], quarantine: list[tuple[str, str, str]], pseudo: Pseudonymizer,
    warnings: list[str],
) -> dict[str, Any]:  # fmt: skip
    """The counts of summary.json; raises RuntimeError if used + quarantined != files found."""
    used = len({f for im in images for f in im.files})  # a split multi-frame file backs several images
    if used + len(quarantine) != n_found:
        raise RuntimeError(f"ingest bookkeeping: {used} used + {len(quarantine)} quarantined != {n_found} found")

    def label_counts(group: list[ImageRecord]) -> dict[str, int]:
        return dict(sorted(Counter("none" if im.label is None else str(im.label) for im in group).items()))

    splits = {}
    for name in ("train", "val", "test"):
        members = [im for im in images if im.split == name]
        splits[name] = {
            "images": len(members),
            "patients": len({im.patient_id for im in members}),
            "labels": label_counts(members),
        }
    return {
        "files_found": n_found,
        "used": used,
        "quarantined": len(quarantine),
        "all_files_accounted": True,  # used + quarantined == files_found (checked above)
        "quarantined_by_reason": dict(sorted(Counter(r for _, r, _ in quarantine).items())),
        "series_built": len(images),
        "patients": len({im.patient_id for im in images}),
        "studies": len({im.study_id for im in images}),
        "labels": label_counts(images),
        "splits": splits,
        "secret": pseudo.secret_source,
        "dates": f"shifted back 1..{pseudo.max_date_shift_days} days per patient" if pseudo.shift_dates else "removed",
        "warnings": warnings,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A short human table of a summary.json mapping."""
    lines = [
        f"files found {summary['files_found']}: used {summary['used']}, quarantined {summary['quarantined']}"
        + (f" {summary['quarantined_by_reason']}" if summary["quarantined"] else ""),
        f"images {summary['series_built']} from {summary['patients']} patients, {summary['studies']} studies; "
        f"labels {summary['labels']}",
        f"{'split':<6}{'images':>8}{'patients':>10}  labels",
    ]
    for name, s in summary["splits"].items():
        lines.append(f"{name:<6}{s['images']:>8}{s['patients']:>10}  {s['labels']}")
    lines.append(f"secret: {summary['secret']}; {len(summary['warnings'])} warning(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI: parse arguments, load params, call :func:`run`, print the summary."""
    import sys

    from tasks.config import DEFAULT_PARAMS, HelpFormatter, load_params_or_exit
    from tasks.noise import silence_known_noise

    silence_known_noise()
    parser = argparse.ArgumentParser(prog="python -m tasks.ingest", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                        help="the params file; reads its ingest group and base.class_names / base.split_seed")
    parser.add_argument("--output", type=Path, required=True,
                        help="folder for the de-identified manifest, splits, quarantine.csv and summary.json, "
                             "e.g. data/ingested")  # fmt: skip
    parser.add_argument("--input", type=Path, default=None,
                        help="a DICOM folder or a MedMNIST .npz to ingest instead of params' ingest.input "
                             "(default: ingest.input)")  # fmt: skip
    parser.add_argument("--labels", type=Path, default=None,
                        help="label CSV (default: ingest.labels_csv inside ingest.input; with another --input and no "
                             "--labels the folder is ingested without labels)")  # fmt: skip
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)
    ip = params.ingest
    if args.input is not None and args.input.resolve() != Path(ip.input).resolve():
        if args.labels is None:
            print(f"ingest: {args.input} without labels (give --labels CSV to label it)", file=sys.stderr)
        # ingest.input stays the configured one: summary.json then records that another folder was ingested,
        # without its path (which may name a patient)
        ip = ip.model_copy(update={"labels_csv": None})
    try:
        result = run(
            ip,
            args.output,
            class_names=params.base.class_names,
            split_seed=params.base.split_seed,
            input_path=args.input,
            labels_csv=args.labels,
        )
    except (ValueError, OSError, NotImplementedError) as exc:  # bad inputs: say which, without a traceback
        print(f"ingest: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if result.summary["secret"] == "development-default":
        print(
            f"WARNING: {ip.deid.secret_env} is not set: pseudonyms use the development default "
            "secret (fine for synthetic data, not for real patients)",
            file=sys.stderr,
        )
    print(format_summary(result.summary))
    if result.summary["files_found"] == 0:
        print(f"ingest: no files found under {args.input or ip.input}", file=sys.stderr)
        raise SystemExit(1)
    if result.summary["series_built"] == 0:
        print(f"ingest: no usable image among {result.summary['files_found']} file(s); the reasons are in "
              f"{result.quarantine}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
