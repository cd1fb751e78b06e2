"""Stage 1: a folder of DICOM files (any names, any nesting) to de-identified arrays, a manifest and a split.

``python -m tasks.ingest --params params.yaml --output data/ingested [--input DIR] [--labels CSV]``

Every file under the input folder is read (both cores, :mod:`tasks.dicom`), pseudonymised (:mod:`tasks.deid`),
grouped by series and stacked along the slice normal, labelled from the label CSV and split by patient
(:mod:`tasks.split`). A file that cannot be used is quarantined with a reason; it never stops the stage. Writes::

    <output>/arrays/<image_id>.npy   float32, (H, W) for a one-slice series, (D, H, W) otherwise; HU for CT
    <output>/manifest.csv            one row per image, columns MANIFEST_COLUMNS (pseudonymous ids only)
    <output>/quarantine.csv          path (relative to the input folder), reason, detail
    <output>/summary.json            counts (found = used + quarantined), per split and label, secret source
    <output>/deid_audit.json         PS3.15 actions applied (counts per action), images flagged for burned-in text
    <output>/dicom/<series>/<sop>.dcm  the de-identified instances (only with ingest.deid.write_dicom)

Nothing of the PS3.15 basic profile's identifying attributes reaches these files: ids are HMAC pseudonyms,
the series UID is remapped, the study date is shifted per patient (or left empty), nothing else is copied.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import IngestParams, Params
from tasks.deid import Pseudonymizer
from tasks.dicom import DicomError, DicomImage  # light: tasks.dicom imports pydicom only when reading/writing

MANIFEST_COLUMNS = (
    "image_id", "patient_id", "study_id", "series_uid", "study_date", "label", "split", "path", "sha256",
    "shape", "spacing", "modality", "unit", "n_instances", "channels", "selection",
)  # fmt: skip
QUARANTINE_COLUMNS = ("path", "reason", "detail")
# Reasons decided here, beyond a single file's tasks.dicom.REASONS:
INGEST_REASONS = (
    "duplicate_instance",  # a second file with a SOPInstanceUID already seen
    "series_not_selected",  # a valid series that ingest.series does not ask for (the detail says why)
    "no_label",  # a label CSV is given but has no row for the study's label-key value
)  # plus tasks.series.SERIES_REASONS: a series that cannot be one volume


@dataclass
class Instance:
    """One readable file after de-identification (the raw label-key value stays in memory only)."""

    rel: str
    image: DicomImage  # its ``ids`` are never written
    patient_id: str
    study_id: str
    series_uid: str
    study_date: str


@dataclass
class ImageRecord:
    """One output image (a series): pixels plus its manifest fields."""

    image_id: str
    patient_id: str
    study_id: str
    series_uid: str
    study_date: str
    pixels: np.ndarray
    spacing: list[float] | None
    modality: str
    unit: str
    files: list[str]
    label_value: str | None = field(repr=False)
    label: int | None = None
    split: str = ""
    channels: int = 1  # > 1: pixels are channel-first (C, *S)
    selection: str = ""  # why the series was used (tasks.series.select_series)


@dataclass(frozen=True)
class IngestResult:
    """Where ingest wrote its outputs, and its summary (the content of summary.json)."""

    output: Path
    manifest: Path
    quarantine: Path
    summary: dict[str, Any]


def _read_one(path: Path, label_key: str | None, color: str, voi: bool, deidentify: Any,
              write_dir: Path | None) -> DicomImage | DicomError:  # fmt: skip
    """Worker: a DicomImage or the DicomError explaining why not (returned, so that pool.map keeps going)."""
    from tasks.dicom import read_dicom

    try:
        return read_dicom(path, label_key, color=color, voi=voi, deidentify=deidentify, write_dir=write_dir)
    except DicomError as exc:
        return exc
    except Exception as exc:  # a bug or an unforeseen file: quarantine it, never crash the stage
        return DicomError("unreadable", f"unexpected {type(exc).__name__}: {exc}"[:300])


def read_all(
    files: list[Path], params: IngestParams, pseudo: Pseudonymizer, write_dir: Path | None, progress: bool = True
) -> list[DicomImage | DicomError]:
    """Read, de-identify (PS3.15 basic profile) and decode ``files`` with ``params.workers`` processes.

    Returns:
        DicomImage | DicomError per file, in the order of ``files``.
    """
    from tqdm import tqdm

    from tasks.dicom.profile import deidentify

    read = partial(_read_one, label_key=params.label_key, color=params.color, voi=params.voi,
                   deidentify=partial(deidentify, pseudo=pseudo, opts=params.deid), write_dir=write_dir)
    bar = partial(tqdm, total=len(files), desc="ingest: read", unit="file", disable=not progress)
    workers = params.workers
    if workers <= 1 or len(files) < 2 * workers:
        return list(bar(map(read, files)))
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(bar(pool.map(read, files, chunksize=max(1, min(32, len(files) // (8 * workers))))))


def _channel_first(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Colour (..., 3) to channel-first (3, ...), scaled to [0, 255] by its range (8, 16 or 32 bits)."""
    if channels == 1:
        return pixels
    if pixels.dtype != np.uint8:
        scale = {np.dtype(np.uint16): 257.0, np.dtype(np.uint32): 16843009.0}.get(pixels.dtype, 1.0)  # (2^b-1)/255
        pixels = np.rint(pixels / scale).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(pixels, -1, 0))


def _burned_in(im: DicomImage) -> str | None:
    """Why an instance needs a look for text in its pixels before it is shared, or None."""
    if im.burned_in_annotation == "YES":
        return "BurnedInAnnotation YES"
    if im.burned_in_annotation != "NO" and im.modality in _BURNED_IN_PRONE:
        return f"BurnedInAnnotation absent for {im.modality}"
    if im.has_overlay:
        return "overlay plane present"
    return None


_BURNED_IN_PRONE = frozenset({"US", "SC", "OT", "XC", "ES", "GM", "SM", "DOC", "XA", "RF", "DX", "CR", "MG", "IO"})


def collect_dicom(
    input_dir: Path, params: IngestParams, pseudo: Pseudonymizer, progress: bool = True, write_dir: Path | None = None
) -> tuple[int, list[ImageRecord], list[tuple[str, str, str]], list[str], dict[str, Any]]:
    """Read, de-identify, stack and select every file under ``input_dir``.

    Args:
        write_dir: where de-identified instances are written (``<series uid>/<sop uid>.dcm``), or None.

    Returns:
        (files found, images, quarantine rows (relative path, reason, detail), warnings, audit), where the audit
        holds the PS3.15 action counts and the images flagged for burned-in annotation review.
    """
    from tasks.dicom.profile import PROFILE_TABLE, audit_counts
    from tasks.series import SeriesError, select_series, stack_series

    files = sorted(p for p in input_dir.rglob("*") if p.is_file())
    results = read_all(files, params, pseudo, write_dir, progress)
    quarantine: list[tuple[str, str, str]] = []
    series: dict[str, list[Instance]] = defaultdict(list)
    seen_sop: dict[str, str] = {}
    counts = []
    for path, res in zip(files, results, strict=True):
        rel = path.relative_to(input_dir).as_posix()
        if isinstance(res, DicomError):
            quarantine.append((rel, res.reason, res.detail))
            continue
        counts.append(Counter(res.deid_counts or {}))
        ids = res.ids
        if ids.sop_uid and ids.sop_uid in seen_sop:
            quarantine.append((rel, "duplicate_instance", f"same SOPInstanceUID as {seen_sop[ids.sop_uid]}"))
            _unwrite(write_dir, pseudo, ids)
            continue
        seen_sop[ids.sop_uid] = rel
        inst = Instance(
            rel=rel,
            image=res,
            patient_id=pseudo.patient_id(ids.patient_id),
            study_id=pseudo.study_id(ids.study_uid),
            series_uid=pseudo.uid(ids.series_uid or ids.sop_uid or rel),  # no series UID: an image of its own
            study_date=pseudo.shift_date(ids.study_date, ids.patient_id),
        )
        series[inst.series_uid].append(inst)

    images, warnings, flagged = [], [], []
    for uid, members in sorted(series.items()):
        image_id = "I" + pseudo.pseudonym("image", uid)
        first = members[0]
        try:
            pixels, spacing, warning = stack_series([m.image for m in members], params.series.max_gap_factor)
        except SeriesError as exc:
            reason, why = exc.reason, exc.detail
        else:
            n_slices = pixels.shape[0] if pixels.ndim == 3 + (first.image.channels == 3) else 1
            used, why = select_series([m.image for m in members], n_slices, params.series)
            reason = None if used else "series_not_selected"
        if reason is not None:
            quarantine += [(m.rel, reason, f"series {image_id}: {why}") for m in members]
            for m in members:
                _unwrite(write_dir, pseudo, m.image.ids)
            continue
        if warning:
            warnings.append(f"{image_id}: {warning}")
        flags = sorted({f for m in members if (f := _burned_in(m.image))})
        if flags:
            flagged.append({"image_id": image_id, "files": len(members), "why": flags})
        record = partial(
            ImageRecord, patient_id=first.patient_id, study_id=first.study_id, series_uid=uid,
            study_date=first.study_date, spacing=spacing, modality=first.image.modality,
            unit="uint8" if first.image.channels == 3 else first.image.unit, files=[m.rel for m in members],
            label_value=first.image.ids.label_value, channels=first.image.channels, selection=why,
        )  # fmt: skip
        frames = len(members) == 1 and first.image.n_frames > 1 and params.multiframe == "split"
        if frames:  # one 2D image per frame of a multi-frame instance
            for k in range(pixels.shape[0]):
                images.append(record(image_id=f"{image_id}-f{k:04d}",
                                     pixels=_channel_first(pixels[k], first.image.channels),
                                     spacing=spacing and spacing[-2:]))  # fmt: skip
        else:
            images.append(record(image_id=image_id, pixels=_channel_first(pixels, first.image.channels)))
    audit = {
        "profile": f"DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile (table {PROFILE_TABLE})",
        "options": {
            "retain_longitudinal_modified_dates": params.deid.shift_dates,
            "retain_device_identity": params.deid.retain_device_identity,
            "clean_descriptors": params.deid.clean_descriptors,
            "private_safelist": list(params.deid.keep_private),
        },
        "files_deidentified": len(counts),
        "actions": audit_counts(counts),
        "burned_in_review": flagged,
        "secret": pseudo.secret_source,
    }
    return len(files), images, quarantine, warnings, audit


def _unwrite(write_dir: Path | None, pseudo: Pseudonymizer, ids: Any) -> None:
    """Remove the de-identified copy of an instance that ended in quarantine (it must not look used)."""
    if write_dir is not None:
        series = pseudo.uid(ids.series_uid) if ids.series_uid else "no-series"
        (write_dir / series / f"{pseudo.uid(ids.sop_uid)}.dcm").unlink(missing_ok=True)


def read_labels(path: Path, key: str, column: str, n_classes: int | None) -> dict[str, int]:
    """The label table: label-key value -> class index (in [0, n_classes); any index >= 0 when None).

    Raises:
        ValueError: naming the file (and line) for a missing column, a bad or out-of-range label, or a key given
            two different labels.
    """
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {key, column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        table: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            k, raw = (row[key] or "").strip(), (row[column] or "").strip()
            try:
                label = int(raw)
            except ValueError:
                raise ValueError(f"{path}:{line}: {column}={raw!r} is not an integer class index") from None
            if not k or not 0 <= label < (n_classes or label + 1):
                expected = f"in [0, {n_classes - 1}]" if n_classes else ">= 0"
                raise ValueError(f"{path}:{line}: need a {key} and {column} {expected}, got {raw!r}")
            if table.setdefault(k, label) != label:
                raise ValueError(f"{path}:{line}: {key} given two different labels")
    return table


def _prepare_output(output: Path) -> None:
    if output.exists() and any(output.iterdir()) and not (output / "summary.json").exists():
        raise FileExistsError(f"{output} is not empty and holds no summary.json: not an ingest output; refusing")
    import shutil

    for previous in ("arrays", "dicom"):
        if (output / previous).exists():
            shutil.rmtree(output / previous)
    (output / "arrays").mkdir(parents=True)


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def run(
    params: Params,
    output: Path,
    input_dir: Path | None = None,
    labels_csv: Path | None = None,
    progress: bool = True,
) -> IngestResult:
    """Ingest a DICOM folder into ``output``.

    Args:
        params: all params; reads ``base`` (seed, class names) and ``ingest``.
        output: the stage's output folder (created; a previous ingest output there is replaced).
        input_dir: DICOM folder; default ``params.ingest.dicom_dir``.
        labels_csv: label table; default ``params.ingest.labels_csv`` (None there: no labels).
        progress: show tqdm progress bars.

    Returns:
        The output paths and the summary written to summary.json.

    Raises:
        ValueError: a bad label table, or too few patients to split.
        FileNotFoundError: the input folder or label table does not exist.
    """
    t0 = time.perf_counter()
    ip = params.ingest
    output = Path(output)
    pseudo = Pseudonymizer.from_params(ip.deid)
    if labels_csv is None and ip.labels_csv is not None:
        labels_csv = Path(ip.labels_csv)
    table: dict[str, int] | None = None
    if labels_csv is not None:  # read first: a bad table fails before any DICOM is decoded
        if not Path(labels_csv).is_file():
            raise FileNotFoundError(f"{labels_csv}: label table not found (ingest.labels_csv or --labels)")
        names = params.base.class_names
        table = read_labels(Path(labels_csv), ip.label_key, ip.label_column, len(names) if names else None)

    if ip.source == "dicom":
        from tasks.dicom import is_dicom_keyword

        input_dir = Path(input_dir or ip.dicom_dir)
        if not input_dir.is_dir():
            raise FileNotFoundError(f"{input_dir}: input folder not found (ingest.dicom_dir or --input)")
        if not is_dicom_keyword(ip.label_key):
            raise ValueError(f"ingest.label_key: {ip.label_key!r} is not a DICOM keyword")
        _prepare_output(output)
        write_dir = output / "dicom" if ip.deid.write_dicom else None
        n_found, images, quarantine, warnings, audit = collect_dicom(input_dir, ip, pseudo, progress, write_dir)
    else:  # a MedMNIST .npz: already labelled, official splits kept
        from tasks import medmnist

        if table is not None:
            raise ValueError("ingest.labels_csv: a MedMNIST source carries its own labels; set labels_csv: null")
        try:
            input_dir, n_found, images, warnings = medmnist.collect(ip, progress)
        except medmnist.MedMNISTError as exc:
            raise ValueError(str(exc)) from None
        quarantine, audit = [], None
        n_classes = params.base.class_names and len(params.base.class_names)
        if n_classes and max(im.label for im in images) >= n_classes:
            raise ValueError(f"base.class_names: {len(params.base.class_names)} names, but {input_dir} has labels up "
                             f"to {max(im.label for im in images)}; give one name per class or null (from the data)")

    unmatched = 0
    if table is not None:
        kept = []
        for im in images:
            if im.label_value in table:
                im.label = table[im.label_value]
                kept.append(im)
            else:
                detail = f"image {im.image_id}: no row for its {ip.label_key} in the label table"
                quarantine += [(rel, "no_label", detail) for rel in im.files]
        unmatched = len(set(table) - {im.label_value for im in kept})
        images = kept

    from tasks.split import check_patient_disjoint, split_by_patient

    if images and not all(im.split for im in images):  # a source with official splits has set them already
        labels = None if any(im.label is None for im in images) else [im.label for im in images]
        try:
            splits = split_by_patient(
                [im.patient_id for im in images], labels, ip.val_fraction, ip.test_fraction, params.base.seed
            )
        except ValueError as exc:
            if labels is not None:
                raise
            # unlabelled (inference, curation): the manifest is still written, without a split
            warnings.append(f"no train/val/test split: {exc}")
            splits = [""] * len(images)
        for im, split in zip(images, splits, strict=True):
            im.split = str(split)
    check_patient_disjoint([im.patient_id for im in images], [im.split for im in images])

    if ip.source != "dicom":
        _prepare_output(output)
    rows = []
    from tqdm import tqdm

    ordered = sorted(images, key=lambda r: (r.patient_id, r.study_date, r.image_id))
    for im in tqdm(ordered, desc="ingest: write", unit="img", disable=not progress or len(ordered) < 200):
        rel = f"arrays/{im.image_id}.npy"
        # 8-bit sources stay 8-bit (MedMNIST 64^3 is 0.4 GB as uint8, 1.7 GB as float32); HU etc. as float32
        pixels = np.ascontiguousarray(im.pixels, dtype=np.uint8 if im.unit == "uint8" else np.float32)
        np.save(output / rel, pixels)
        rows.append((
            im.image_id, im.patient_id, im.study_id, im.series_uid, im.study_date,
            "" if im.label is None else im.label, im.split, rel, hashlib.sha256(pixels.tobytes()).hexdigest(),
            json.dumps(list(pixels.shape)), json.dumps(im.spacing and [round(s, 6) for s in im.spacing]),
            im.modality, im.unit, len(im.files), im.channels, im.selection,
        ))  # fmt: skip
    _write_csv(output / "manifest.csv", MANIFEST_COLUMNS, rows)
    quarantine.sort()
    _write_csv(output / "quarantine.csv", QUARANTINE_COLUMNS, quarantine)

    if audit is not None:
        (output / "deid_audit.json").write_text(json.dumps(audit, indent=2) + "\n")
    summary = summarise(n_found, images, quarantine, pseudo, warnings)
    labelled = [im.label for im in images if im.label is not None]
    summary.update(
        class_names=list(params.base.class_names or [str(i) for i in range(max(labelled, default=-1) + 1)]),
        source=ip.source,
        input=str(input_dir),
        labels_csv=labels_csv and str(labels_csv),
        labels_unmatched=unmatched,
        wall_s=round(time.perf_counter() - t0, 3),
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
    lines.append(f"secret: {summary['secret']}; {len(summary['warnings'])} warning(s); {summary['wall_s']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI: parse arguments, load params, call :func:`run`, print the summary."""
    import sys

    from tasks.config import DEFAULT_PARAMS, load_params_or_exit

    parser = argparse.ArgumentParser(prog="python -m tasks.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--output", type=Path, required=True, help="output folder, e.g. data/ingested")
    parser.add_argument("--input", type=Path, default=None, help="DICOM folder (default: ingest.dicom_dir)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="label CSV (default: ingest.labels_csv, which belongs to ingest.dicom_dir: with another "
                             "--input and no --labels the folder is ingested without labels)")  # fmt: skip
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)
    other_folder = args.input is not None and args.input.resolve() != Path(params.ingest.dicom_dir).resolve()
    if other_folder and args.labels is None:
        params = load_params_or_exit(args.params, {"ingest.labels_csv": None})
        print(f"ingest: {args.input} without labels (give --labels CSV to label it)", file=sys.stderr)
    try:
        result = run(params, args.output, args.input, args.labels)
    except (ValueError, OSError, NotImplementedError) as exc:  # bad inputs: say which, without a traceback
        print(f"ingest: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if result.summary["secret"] == "development-default":
        print(
            f"WARNING: {params.ingest.deid.secret_env} is not set: pseudonyms use the development default "
            "secret (fine for synthetic data, not for real patients)",
            file=sys.stderr,
        )
    print(format_summary(result.summary))
    if result.summary["series_built"] == 0:
        print(f"ingest: no usable image; see {result.quarantine}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
