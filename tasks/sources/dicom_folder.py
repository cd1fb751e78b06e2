"""A folder of DICOM files (any names, any nesting) as a source of image records for ingest.

Every file is read (``ingest.workers`` processes, :mod:`tasks.dicom`), de-identified with the PS3.15 basic profile
(:mod:`tasks.dicom.profile`), grouped by series, stacked along the slice normal (:mod:`tasks.dicom.series`) and
selected (``ingest.series``). A file that cannot be used becomes a quarantine row (file pseudonym, reason, detail;
the real paths go to ``ingest.local_report`` only); an error that is not the file's (a bug, the environment) stops
the run with the file named on stderr (:class:`UnexpectedReadError`).

DICOM SEG and RTSTRUCT files are masks, not images: each is read (:mod:`tasks.dicom.seg`,
:mod:`tasks.dicom.rtstruct`), its UIDs mapped with the same pseudonymiser as the images', and attached to the
image of the series it references after its geometry is checked against the image's (:mod:`tasks.sources.dicom_masks`,
:func:`tasks.sources.masks.geometry_mismatch`, per frame: size, spacing, orientation, position, frame of reference).
A mask that does not fit is quarantined (``mask_geometry``), never resampled; an unreadable one is
``mask_unreadable``, one that references no ingested image ``mask_orphan``. An attached mask file is one of the
image's ``files``. Every DICOM image gets its ``geometry`` (pseudonymised UIDs, positions, orientation, spacing):
what a prediction needs to be written back as SEG (:func:`tasks.dicom.seg.write_prediction_seg`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tasks.dicom import DicomError, DicomImage  # light: tasks.dicom imports pydicom only when reading/writing
from tasks.dicom.pseudonym import Pseudonymizer
from tasks.dicom.sanity import SanityLimits
from tasks.schema import IngestParams
from tasks.sources.dicom_masks import MaskFile, attach_masks
from tasks.sources.records import ImageRecord

QuarantineRow = tuple[str, str, str]


class ReadImage(NamedTuple):
    """A decoded image file and what ingest needs besides :class:`DicomImage`."""

    image: DicomImage
    frame_of_reference: str  # the de-identified (remapped) FrameOfReferenceUID, "" when absent


@dataclass
class Instance:
    """One readable file after de-identification (the raw label-key value stays in memory only)."""

    rel: str  # the path relative to the input folder: identifying, never written (only to the local report)
    file: str  # its pseudonym (tasks.dicom.pseudonym.Pseudonymizer.path): how outputs name the file
    image: DicomImage  # its ``ids`` are never written
    patient_id: str
    patient_id_from: str  # what the patient pseudonym was made from (tasks.dicom.pseudonym.PATIENT_ID_FROM)
    study_id: str
    series_uid: str
    study_date: str
    frame_of_reference: str = ""  # pseudonymised FrameOfReferenceUID


class UnexpectedReadError(RuntimeError):
    """Reading a file raised an exception that says nothing about the file: a bug in medpipe, or the environment
    (a full disk, a missing library). The run stops; the message names the file (relative to the input folder),
    the cause is chained (and, from a worker process, shown as its remote traceback)."""


def _read_one(path: Path, *, root: Path, label_key: str | None, color: str, voi: bool, deidentify: Any,
              write_dir: Path | None, exclude_image_types: tuple[str, ...] = (),
              sanity: SanityLimits | None = SanityLimits()) -> DicomImage | DicomError:  # fmt: skip  # noqa: B008
    """Worker: read, de-identify, decode and sanity-check one file (and write its de-identified copy to
    ``write_dir``); :func:`_read_image` without the frame of reference."""
    got = _read_image(path, root=root, label_key=label_key, color=color, voi=voi, deidentify=deidentify,
                      write_dir=write_dir, exclude_image_types=exclude_image_types, sanity=sanity)  # fmt: skip
    return got if isinstance(got, DicomError) else got.image


def _read_file(path: Path, *, uid_map: Any, **kwargs: Any) -> ReadImage | MaskFile | DicomError:
    """Worker: :func:`_read_image`, or, for a SEG / RTSTRUCT file (not an image), its mask content with its UIDs
    mapped by ``uid_map`` (``Pseudonymizer.uid``: the mapping the profile applies to the images)."""
    got = _read_image(path, **kwargs)
    if not isinstance(got, DicomError) or got.reason not in ("not_an_image", "no_pixel_data"):
        return got
    from tasks.dicom.seg import SEG_STORAGE, SegError, load_mask_dataset, read_seg

    loaded = load_mask_dataset(path)
    if loaded is None:
        return got
    sop_class, ds = loaded
    if sop_class == SEG_STORAGE:
        try:
            return MaskFile("SEG", read_seg(ds).with_uids(uid_map))
        except SegError as exc:
            return MaskFile("SEG", error=str(exc))
    from tasks.dicom.rtstruct import RtStructError, read_contours

    try:
        return MaskFile("RTSTRUCT", read_contours(ds).with_uids(uid_map))
    except RtStructError as exc:
        return MaskFile("RTSTRUCT", error=str(exc))


def _read_image(path: Path, *, root: Path, label_key: str | None, color: str, voi: bool, deidentify: Any,
                write_dir: Path | None, exclude_image_types: tuple[str, ...] = (),
                sanity: SanityLimits | None = SanityLimits()) -> ReadImage | DicomError:  # fmt: skip  # noqa: B008
    """Worker: read, de-identify, decode and sanity-check one file (and write its de-identified copy to
    ``write_dir``).

    Args:
        exclude_image_types: ImageType values whose images are quarantined (``ingest.exclude_image_types``).
        sanity: the decode sanity thresholds (``ingest.sanity``), None when switched off.

    Returns:
        The image and its (de-identified) FrameOfReferenceUID, or the DicomError that quarantines the file
        (returned, so that pool.map keeps going).

    Raises:
        UnexpectedReadError: any other exception, with the file's path relative to ``root``.
    """
    from tasks.dicom import read_instance, write_deidentified
    from tasks.dicom.seg import frame_of_reference_of

    try:
        image, ds = read_instance(path, label_key, color=color, voi=voi, deidentify=deidentify,
                                  exclude_image_types=exclude_image_types, sanity=sanity)  # fmt: skip
        if write_dir is not None:
            try:
                write_deidentified(ds, write_dir)
            except RecursionError:  # pydicom writes nested sequences recursively: the file's nesting, not a bug
                raise DicomError("malformed", "writing the de-identified copy: sequences nested too deeply") from None
        return ReadImage(image, frame_of_reference_of(ds))
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
) -> list[ReadImage | MaskFile | DicomError]:  # fmt: skip
    """Read, de-identify (PS3.15 basic profile), decode and sanity-check (``params.sanity``; ImageType excluded by
    ``params.exclude_image_types``) ``files`` with ``params.workers`` processes; SEG and RTSTRUCT files are read as
    masks (:class:`MaskFile`, UIDs mapped by ``pseudo``).

    Args:
        files: the files to read, under ``root``.
        root: the input folder (errors name files relative to it).
        write_dir: where de-identified instances are written (``<series uid>/<sop uid>.dcm``), or None.

    Returns:
        ReadImage | MaskFile | DicomError per file, in the order of ``files``.

    Raises:
        UnexpectedReadError: a file's read failed for a reason that is not the file's (the first such file).
    """
    from tqdm import tqdm

    from tasks.dicom.profile import deidentify

    limits = params.sanity
    read = partial(_read_file, uid_map=pseudo.uid, root=root, label_key=params.label_key, color=params.color,
                   voi=params.voi,
                   deidentify=partial(deidentify, pseudo=pseudo, opts=params.deid), write_dir=write_dir,
                   exclude_image_types=tuple(params.exclude_image_types),
                   sanity=SanityLimits(limits.max_mode_fraction, limits.max_jump_fraction) if limits.enabled else None)
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


class Collected(NamedTuple):
    """What :func:`collect_dicom` found: the images and quarantine rows, and what only ingest's local report and
    its manifest column ``patient_id_from`` need."""

    n_found: int  # files found (= files used + quarantine rows, once ingest has matched labels)
    images: list[ImageRecord]  # their ``files`` are file pseudonyms
    quarantine: list[QuarantineRow]  # (file pseudonym, reason, detail)
    warnings: list[str]
    audit: dict[str, Any]  # PS3.15 action counts, images flagged for burned-in annotation review
    paths: dict[str, str]  # file pseudonym -> path relative to the input folder (identifying: local report only)
    patient_id_from: dict[str, str]  # image id -> what its patient pseudonym was made from (PATIENT_ID_FROM)


def collect_dicom(
    input_dir: Path, params: IngestParams, pseudo: Pseudonymizer, progress: bool = True, write_dir: Path | None = None,
    skip: set[Path] | frozenset[Path] = frozenset(),
) -> Collected:
    """Read, de-identify, stack and select every file under ``input_dir``.

    Paths are identifiers (a PACS export names folders ``<PatientName>_<PatientID>`` and files
    ``<SOPInstanceUID>.dcm``): quarantine rows, details and images name a file only by its pseudonym
    (``Pseudonymizer.path`` of the path relative to ``input_dir``); :attr:`Collected.paths` maps them back.
    An instance without a PatientID is a patient of its own, or its study's (``tasks.dicom.pseudonym.patient_key``).

    Args:
        write_dir: where de-identified instances are written (``<series uid>/<sop uid>.dcm``), or None.
        skip: resolved paths that are not candidate images (the label table inside the data folder).

    Returns:
        The images, quarantine rows, warnings, de-identification audit and the pseudonym -> path map.

    Raises:
        UnexpectedReadError: a file's read failed for a reason that is not the file's (a bug, the environment).
    """
    from tasks.dicom.profile import PROFILE_TABLE, audit_counts
    from tasks.dicom.pseudonym import patient_key
    from tasks.dicom.series import SeriesError, select_series, stack_series

    files = sorted(p for p in input_dir.rglob("*") if p.is_file() and p.resolve() not in skip)
    results = read_all(files, input_dir, params, pseudo, write_dir, progress)
    quarantine: list[QuarantineRow] = []
    series: dict[str, list[Instance]] = defaultdict(list)
    seen_sop: dict[str, str] = {}
    paths: dict[str, str] = {}
    masks: list[tuple[str, MaskFile]] = []
    seen_mask: dict[str, str] = {}  # mapped SOPInstanceUID of a mask -> its file
    counts = []
    for path, res in zip(files, results, strict=True):
        rel = path.relative_to(input_dir).as_posix()
        file = pseudo.path(rel)
        if file in paths:  # 64-bit pseudonyms: never seen, but two files must not be counted as one
            raise RuntimeError(f"ingest: two input files have the pseudonym {file}; report this as a bug")
        paths[file] = rel
        if isinstance(res, DicomError):
            quarantine.append((file, res.reason, _without_path(res.detail, path, rel, file)))
            continue
        if isinstance(res, MaskFile):
            if res.error:
                quarantine.append((file, "mask_unreadable", f"{res.kind}: {_without_path(res.error, path, rel, file)}"))
            elif res.data.sop_uid and res.data.sop_uid in seen_mask:
                quarantine.append((file, "duplicate_instance", f"same SOPInstanceUID as {seen_mask[res.data.sop_uid]}"))
            else:
                seen_mask[res.data.sop_uid] = file
                masks.append((file, res))
            continue
        res, frame_of_reference = res
        counts.append(Counter(res.deid_counts or {}))
        ids = res.ids
        if ids.sop_uid and ids.sop_uid in seen_sop:
            quarantine.append((file, "duplicate_instance", f"same SOPInstanceUID as {seen_sop[ids.sop_uid]}"))
            _unwrite(write_dir, pseudo, ids)
            continue
        seen_sop[ids.sop_uid] = file
        key, key_from = patient_key(ids.patient_id, ids.study_uid, ids.sop_uid, file)
        inst = Instance(
            rel=rel,
            file=file,
            image=res,
            patient_id=pseudo.patient_id(key),
            patient_id_from=key_from,
            study_id=pseudo.study_id(ids.study_uid),
            series_uid=pseudo.uid(ids.series_uid or ids.sop_uid or rel),  # no series UID: an image of its own
            study_date=pseudo.shift_date(ids.study_date, key),  # a patient without an id: its own shift
            frame_of_reference=frame_of_reference,
        )
        series[inst.series_uid].append(inst)

    images, warnings, flagged = [], [], []
    patient_id_from: dict[str, str] = {}
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
            quarantine += [(m.file, reason, f"series {image_id}: {why}") for m in members]
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
            unit="uint8" if first.image.channels == 3 else first.image.unit, files=[m.file for m in members],
            label_value=first.image.ids.label_value, channels=first.image.channels, selection=why,
            notes=sorted({n for m in members for n in m.image.notes}),
        )  # fmt: skip
        frames = len(members) == 1 and first.image.n_frames > 1 and params.multiframe == "split"
        n_before = len(images)
        if frames:  # one 2D image per frame of a multi-frame instance
            for k in range(pixels.shape[0]):
                images.append(record(image_id=f"{image_id}-f{k:04d}",
                                     pixels=_channel_first(pixels[k], first.image.channels),
                                     spacing=spacing and spacing[-2:]))  # fmt: skip
        else:
            images.append(record(image_id=image_id, pixels=_channel_first(pixels, first.image.channels),
                                 geometry=dicom_geometry(members, pseudo)))  # fmt: skip
        patient_id_from.update((im.image_id, first.patient_id_from) for im in images[n_before:])
    classes = list(getattr(getattr(params, "masks", None), "classes", ["lung", "lesion"]))
    quarantine += attach_masks(masks, images, classes)
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
    return Collected(len(files), images, quarantine, warnings, audit, paths, patient_id_from)


def _without_path(detail: str, path: Path, rel: str, file: str) -> str:
    """A quarantine detail with the file's path (absolute, relative, or its name) replaced by its pseudonym: a
    library's message may quote the file it read. Forms under 8 characters are left (a number in the message is
    more likely than a path; "IM0001" identifies no one)."""
    forms = {str(path), path.as_posix(), str(path.absolute()), rel, path.name}
    for form in sorted((f for f in forms if len(f) >= 8), key=len, reverse=True):
        detail = detail.replace(form, file)
    return detail


def _unwrite(write_dir: Path | None, pseudo: Pseudonymizer, ids: Any) -> None:
    """Remove the de-identified copy of an instance that ended in quarantine (it must not look used)."""
    if write_dir is not None:
        series = pseudo.uid(ids.series_uid) if ids.series_uid else "no-series"
        (write_dir / series / f"{pseudo.uid(ids.sop_uid)}.dcm").unlink(missing_ok=True)



def dicom_geometry(members: list[Instance], pseudo: Pseudonymizer) -> dict[str, Any]:
    """The JSON-able geometry of a stacked series (``ImageRecord.geometry``): pseudonymised UIDs only.

    Slices are in stacked order (:func:`tasks.dicom.series.stack_series`: along the slice normal, else by
    InstanceNumber), so ``sop_instance_uids[k]`` and ``image_positions[k]`` are slice k of the image.

    Returns:
        ``kind`` ("dicom"; "dicom-multiframe" for one multi-frame instance, "dicom-no-geometry" for slices without
        positions, orientation, spacing or SOPInstanceUIDs: no SEG is written or attached for those),
        ``modality``, ``sop_class_uid``, ``study_instance_uid``, ``series_instance_uid``,
        ``frame_of_reference_uid``, ``patient_id`` (pseudonyms), ``sop_instance_uids``, ``image_positions`` (mm,
        or None), ``image_orientation``, ``pixel_spacing`` ((row, column) mm), ``slice_thickness`` (mm), ``rows``,
        ``columns``, ``number_of_frames``.
    """
    from tasks.dicom.series import SeriesError, slice_normal

    ims = [m.image for m in members]
    order = list(range(len(ims)))
    if len(ims) > 1 and all(im.image_position and im.image_orientation for im in ims):
        try:
            normal = slice_normal(ims[0].image_orientation)
        except SeriesError:
            normal = None
        if normal is not None:
            along = np.array([im.image_position for im in ims], float) @ normal
            order = [int(k) for k in np.argsort(along, kind="stable")]  # as tasks.dicom.series._order
    elif len(ims) > 1 and all(im.instance_number is not None for im in ims):
        order = [int(k) for k in np.argsort([im.instance_number for im in ims], kind="stable")]
    first, ordered = ims[0], [ims[k] for k in order]
    positions = None
    if first.n_frames > 1:  # frames of one instance, sorted as stack_series sorts them when they have positions
        if first.frame_positions and first.image_orientation and len(first.frame_positions) == first.n_frames:
            frames = np.array(first.frame_positions, float)
            try:
                along = frames @ slice_normal(first.image_orientation)
                positions = [frames[k].tolist() for k in np.argsort(along, kind="stable")]
            except SeriesError:
                positions = None
    elif all(im.image_position for im in ordered):
        positions = [list(im.image_position) for im in ordered]
    uids = [pseudo.uid(im.ids.sop_uid) if im.ids.sop_uid else "" for im in ordered]
    # "dicom": a SEG can reference the slices (tasks.dicom.seg.prediction_source_datasets); a multi-frame source
    # needs frame references, which those minimal sources do not make, and slices without positions cannot be placed
    kind = "dicom-multiframe" if first.n_frames > 1 else "dicom"
    if kind == "dicom" and not (positions and first.image_orientation and first.pixel_spacing and all(uids)):
        kind = "dicom-no-geometry"
    return {
        "kind": kind,
        "modality": first.modality,
        "sop_class_uid": first.sop_class_uid,
        "study_instance_uid": pseudo.uid(first.ids.study_uid) if first.ids.study_uid else "",
        "series_instance_uid": members[0].series_uid,
        "frame_of_reference_uid": members[0].frame_of_reference,
        "patient_id": members[0].patient_id,
        "sop_instance_uids": uids,
        "image_positions": positions,
        "image_orientation": list(first.image_orientation) if first.image_orientation else None,
        "pixel_spacing": list(first.pixel_spacing) if first.pixel_spacing else None,
        "slice_thickness": first.slice_thickness,
        "rows": first.rows,
        "columns": first.columns,
        "number_of_frames": first.n_frames,
    }
