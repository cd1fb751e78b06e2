"""A folder of DICOM files (any names, any nesting) as a source of image records for ingest.

Every file is read (``ingest.workers`` processes, :mod:`tasks.dicom`), de-identified with the PS3.15 basic profile
(:mod:`tasks.dicom.profile`), grouped by series, stacked along the slice normal (:mod:`tasks.dicom.series`) and
selected (``ingest.series``). A file that cannot be used becomes a quarantine row (relative path, reason, detail);
an error that is not the file's (a bug, the environment) stops the run with the file named
(:class:`UnexpectedReadError`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import IngestParams
from tasks.dicom import DicomError, DicomImage  # light: tasks.dicom imports pydicom only when reading/writing
from tasks.dicom.pseudonym import Pseudonymizer
from tasks.sources.records import ImageRecord

QuarantineRow = tuple[str, str, str]


@dataclass
class Instance:
    """One readable file after de-identification (the raw label-key value stays in memory only)."""

    rel: str
    image: DicomImage  # its ``ids`` are never written
    patient_id: str
    study_id: str
    series_uid: str
    study_date: str


class UnexpectedReadError(RuntimeError):
    """Reading a file raised an exception that says nothing about the file: a bug in medpipe, or the environment
    (a full disk, a missing library). The run stops; the message names the file (relative to the input folder),
    the cause is chained (and, from a worker process, shown as its remote traceback)."""


def _read_one(path: Path, *, root: Path, label_key: str | None, color: str, voi: bool, deidentify: Any,
              write_dir: Path | None) -> DicomImage | DicomError:  # fmt: skip
    """Worker: read, de-identify and decode one file (and write its de-identified copy to ``write_dir``).

    Returns:
        The image, or the DicomError that quarantines the file (returned, so that pool.map keeps going).

    Raises:
        UnexpectedReadError: any other exception, with the file's path relative to ``root``.
    """
    from tasks.dicom import read_instance, write_deidentified

    try:
        image, ds = read_instance(path, label_key, color=color, voi=voi, deidentify=deidentify)
        if write_dir is not None:
            write_deidentified(ds, write_dir)
        return image
    except DicomError as exc:
        return exc
    except Exception as exc:  # not the file's fault: stop the run, name the file (no values: the cause is chained)
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        raise UnexpectedReadError(
            f"{rel}: reading it raised {type(exc).__name__}, which is not an error a bad DICOM file causes "
            "(those are quarantined): a bug in medpipe or a problem of the environment; see the cause above"
        ) from exc


def read_all(
    files: list[Path], root: Path, params: IngestParams, pseudo: Pseudonymizer, write_dir: Path | None,
    progress: bool = True,
) -> list[DicomImage | DicomError]:  # fmt: skip
    """Read, de-identify (PS3.15 basic profile) and decode ``files`` with ``params.workers`` processes.

    Args:
        files: the files to read, under ``root``.
        root: the input folder (errors name files relative to it).
        write_dir: where de-identified instances are written (``<series uid>/<sop uid>.dcm``), or None.

    Returns:
        DicomImage | DicomError per file, in the order of ``files``.

    Raises:
        UnexpectedReadError: a file's read failed for a reason that is not the file's (the first such file).
    """
    from tqdm import tqdm

    from tasks.dicom.profile import deidentify

    read = partial(_read_one, root=root, label_key=params.label_key, color=params.color, voi=params.voi,
                   deidentify=partial(deidentify, pseudo=pseudo, opts=params.deid), write_dir=write_dir)
    bar = partial(tqdm, total=len(files), desc="ingest: read", unit="file", disable=not progress)
    workers = params.workers
    if workers <= 1 or len(files) < 2 * workers:
        return list(bar(map(read, files)))
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:  # on an error, map's iterator cancels what is queued
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
    input_dir: Path, params: IngestParams, pseudo: Pseudonymizer, progress: bool = True, write_dir: Path | None = None,
    skip: set[Path] | frozenset[Path] = frozenset(),
) -> tuple[int, list[ImageRecord], list[QuarantineRow], list[str], dict[str, Any]]:
    """Read, de-identify, stack and select every file under ``input_dir``.

    Args:
        write_dir: where de-identified instances are written (``<series uid>/<sop uid>.dcm``), or None.
        skip: resolved paths that are not candidate images (the label table inside the data folder).

    Returns:
        (files found, images, quarantine rows (relative path, reason, detail), warnings, audit), where the audit
        holds the PS3.15 action counts and the images flagged for burned-in annotation review.

    Raises:
        UnexpectedReadError: a file's read failed for a reason that is not the file's (a bug, the environment).
    """
    from tasks.dicom.profile import PROFILE_TABLE, audit_counts
    from tasks.dicom.series import SeriesError, select_series, stack_series

    files = sorted(p for p in input_dir.rglob("*") if p.is_file() and p.resolve() not in skip)
    results = read_all(files, input_dir, params, pseudo, write_dir, progress)
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

