"""A folder of image files, with optional masks, labels and splits, as a source of image records for ingest.

Layout (that of ``../shared/data/busi``; any folder in it works, with or without masks)::

    images/<id>.<ext>     ext: png, jpg, jpeg (2D, 8-bit), nii, nii.gz (nibabel), nrrd (pynrrd): 2D or 3D
    masks/<id>.<ext>      optional label map of the image with the same id: 0 background, v = ingest.masks.classes[v-1]
                          (an 8-bit {0, 255} mask is binary: 255 -> 1)
    manifest.csv          optional: column ``id``; optional ``label`` (class name or integer) and ``patient_id``
    splits/train{k}.txt   optional, one id per line: used when ``ingest.folder_split`` is k (with val{k}.txt)
    splits/val{k}.txt

An id is the file's path under ``images/`` (or ``masks/``) without its extension. Hidden files (``.DS_Store``) are
not looked at; every other file under ``images/`` and ``masks/`` is either used or quarantined (file pseudonym,
reason, detail), so that used + quarantined = found.

Arrays (``ImageRecord.pixels``, ``.mask``):

* PNG/JPEG: uint8 (H, W), ``unit`` "uint8" (preprocess maps it /255). RGB is converted to grayscale (ITU-R 601-2
  luma; lossless when the channels are equal) with a note, unless ``ingest.color`` is "rgb": then every image is
  (3, H, W) channel-first (grayscale replicated, with a note). 16-bit and float images are quarantined
  (``unsupported_format``): preprocess would window them as HU.
* NIfTI/NRRD: float32, (S, H, W) = the file's voxel axes (k, j, i) reversed, or (H, W) = (j, i) for a 2D image (a
  third axis of length 1 is dropped), as DICOM's (slice, row, column). ``unit`` "stored" (the values as stored,
  NIfTI scaling applied; preprocess windows anything but "uint8" with ``preprocess.window_*``). ``spacing`` (mm)
  follows the same axis order. Geometry is given in DICOM's patient space (LPS): NIfTI (RAS+) and RAS/LAS NRRD
  spaces are converted, so an image and a mask in different formats compare.

Masks are never resampled: one that does not fit its image (PNG/JPEG: size; NIfTI/NRRD: shape, spacing, origin,
direction) is quarantined ``mask_geometry`` and the image kept without a mask (:func:`tasks.sources.masks.
geometry_mismatch`); values are checked by :func:`tasks.sources.masks.check_mask_values` (notes).

Names: outputs never carry a file's name (a private folder may name files after patients): files are ``F<hex>``
(:meth:`~tasks.dicom.pseudonym.Pseudonymizer.path` of the path relative to the folder), images ``I<hex>``, patients
``P<hex>`` (of the manifest's ``patient_id``, else of the file: one patient per image), studies ``S<hex>``, as for
DICOM. :attr:`FolderCollection.paths` maps file pseudonyms back for ingest's local report.
"""

from __future__ import annotations

import csv
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.sources.masks import Geometry, check_mask_values, geometry_mismatch

if TYPE_CHECKING:
    from tasks.schema import IngestParams
    from tasks.sources.records import ImageRecord

QuarantineRow = tuple[str, str, str]

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD"}
# Reasons of this source (plus tasks.sources.masks.MASK_REASONS and ingest's "no_label"); only ever add to them.
FOLDER_REASONS = {
    "unreadable": "the image file could not be read or decoded",
    "unsupported_format": "an extension other than png/jpg/jpeg/nii/nii.gz/nrrd, or an image that is not 8-bit "
    "(PNG/JPEG) or not 2D/3D (NIfTI/NRRD)",
    "duplicate_id": "a second file with an id already seen in the same folder (a.png and a.jpg): the first kept",
    "no_label": "manifest.csv has a label column but no row for the image's id",
}
# NRRD spaces (and NIfTI's RAS+) -> the sign flips that take their coordinates to LPS
_TO_LPS = {"RAS": (-1.0, -1.0, 1.0), "LAS": (1.0, -1.0, 1.0), "LPS": (1.0, 1.0, 1.0)}
_NRRD_SPACES = {"right-anterior-superior": "RAS", "left-anterior-superior": "LAS", "left-posterior-superior": "LPS",
                "ras": "RAS", "las": "LAS", "lps": "LPS"}  # fmt: skip


class ReadError(Exception):
    """A file that cannot be used, with a quarantine ``reason`` and a ``detail`` (no file names)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Loaded:
    """One decoded file: the array in the module's axis order, its geometry and what the reader did."""

    array: np.ndarray
    fmt: str
    geometry: Geometry
    info: dict[str, Any]  # JSON-able: ImageRecord.geometry
    notes: list[str] = field(default_factory=list)


@dataclass
class FolderCollection:
    """What :func:`collect_folder` found.

    Attributes:
        n_found: files counted (used + quarantined); files of ids in no split file are not counted.
        images: the records (``split`` "test" for ``val{k}`` ids, "" otherwise).
        quarantine: (file pseudonym, reason, detail) rows.
        warnings: what ingest's summary should say.
        class_names: the manifest's label names, index = label (sorted; None when the labels are integers, when
            ``class_names`` was given, or without labels).
        paths: file pseudonym -> path relative to the folder (ingest's local report only; never an output).
        patient_id_from: image id -> "PatientID" (the manifest's patient_id) or "file" (one patient per image).
    """

    n_found: int
    images: list[ImageRecord]
    quarantine: list[QuarantineRow]
    warnings: list[str]
    class_names: list[str] | None
    paths: dict[str, str]
    patient_id_from: dict[str, str]


def _library_message(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def split_name(rel: str) -> tuple[str, str | None]:
    """``"sub/a.nii.gz"`` -> ``("sub/a", "NIfTI")``; the format is None for an extension this source does not read."""
    low = rel.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if low.endswith(ext):
            return rel[: -len(ext)], FORMATS[ext]
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel, None


def _pil_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot decode (the file's fault): not an image (UnidentifiedImageError, an
    OSError), truncated data (OSError), a broken chunk (SyntaxError, ValueError, struct.error, EOFError), an image
    larger than Pillow's bomb limit (DecompressionBombError)."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


def read_image_2d(path: Path, fmt: str, color: str) -> Loaded:
    """Read an 8-bit PNG/JPEG image: uint8 (H, W), or (3, H, W) when ``color`` is "rgb".

    Raises:
        ReadError: ``unreadable`` (Pillow cannot decode it), ``unsupported_format`` (16-bit, float, ...).
    """
    from PIL import Image

    notes: list[str] = []
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                raise ReadError("unsupported_format", f"{fmt} of mode {mode}: only 8-bit grayscale or RGB images are "
                                "read (convert it to 8-bit)")  # fmt: skip
            if mode in ("LA", "RGBA", "PA") or (mode == "P" and "transparency" in img.info):
                notes.append("alpha channel ignored")
            if mode == "LA":
                img = img.getchannel("L")
            elif mode not in ("L", "RGB"):  # 1, P, RGBA, CMYK, YCbCr
                img = img.convert("L" if mode == "1" else "RGB")
            arr = np.asarray(img)
            luma = np.asarray(img.convert("L")) if img.mode == "RGB" else None
    except ReadError:
        raise
    except _pil_errors() as exc:
        raise ReadError("unreadable", _library_message(exc)) from None
    if arr.ndim == 3 and color != "rgb":
        equal = bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all())
        notes.append("RGB with equal channels read as grayscale" if equal
                     else "RGB converted to grayscale (ITU-R 601-2 luma)")  # fmt: skip
        arr = arr[..., 0] if equal else luma
    elif arr.ndim == 3:
        arr = np.moveaxis(arr, -1, 0)
    elif color == "rgb":
        notes.append("grayscale replicated to 3 channels (ingest.color: rgb)")
        arr = np.repeat(arr[None], 3, axis=0)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    size = list(arr.shape[-2:])
    return Loaded(arr, fmt, Geometry(shape=tuple(size)), {"format": fmt, "size": size}, notes)


def read_mask_2d(path: Path, fmt: str) -> Loaded:
    """Read a PNG/JPEG label map as it is stored (H, W): gray values, palette indices, or one of equal RGB channels.

    Raises:
        ReadError: ``mask_unreadable`` (not decodable, or a colour mask whose channels differ).
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("LA", "RGBA", "PA"):
                img = img.convert("RGB" if img.mode == "RGBA" else "L" if img.mode == "LA" else "P")
            arr = np.asarray(img)
    except _pil_errors() as exc:
        raise ReadError("mask_unreadable", _library_message(exc)) from None
    if arr.ndim == 3:
        if not ((arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()):
            raise ReadError("mask_unreadable", "a colour mask (RGB channels differ): give a one-channel label map "
                            "(0 background, 1..K classes, or 0/255)")  # fmt: skip
        arr = arr[..., 0]
    size = list(arr.shape)
    return Loaded(np.ascontiguousarray(arr), fmt, Geometry(shape=tuple(size)), {"format": fmt, "size": size})


def _volume(data: np.ndarray, affine: np.ndarray | None, space: str | None, fmt: str, info: dict[str, Any]) -> Loaded:
    """A volume in file axis order (i, j[, k]) and its 4x4 index -> ``space`` affine to the module's layout.

    Raises:
        ReadError: ``unsupported_format`` for more than three non-singleton axes.
    """
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise ReadError("unsupported_format", f"{fmt} of shape {list(shape)}: one 2D or 3D image per file")
    order = list(range(data.ndim))[::-1]  # stored axis r = file axis order[r]
    arr = np.ascontiguousarray(np.transpose(data, order))
    notes: list[str] = []
    spacing = origin = direction = None
    if affine is not None:
        flip = np.asarray(_TO_LPS.get(space or "", (1.0, 1.0, 1.0)))
        if space is not None and space not in _TO_LPS:
            notes.append(f"{fmt} space {space!r} is not RAS/LAS/LPS: coordinates compared as stored")
        lin = flip[:, None] * affine[:3, :3]
        norms = np.linalg.norm(lin, axis=0)
        spacing = tuple(float(norms[c]) for c in order)
        unit = np.divide(lin, norms, out=np.zeros_like(lin), where=norms > 0)
        direction = tuple(float(v) for c in order for v in unit[:, c])
        origin = tuple(float(v) for v in flip * affine[:3, 3])
        info.update(
            affine=np.round(affine, 6).tolist(),  # the file's own: voxel (i, j, k) -> its space (NIfTI: RAS)
            space="LPS" if space in _TO_LPS else space,  # of spacing/origin/direction
            spacing=[round(s, 6) for s in spacing],
            origin=[round(v, 6) for v in origin],
            direction=[round(v, 6) for v in direction],
        )
    elif info.get("spacing"):
        spacing = tuple(float(info["spacing"][c]) for c in order)
        info["spacing"] = [round(s, 6) for s in spacing]
    info.update(format=fmt, shape=list(arr.shape), axes="(S, H, W) = file axes (k, j, i)" if arr.ndim == 3
                else "(H, W) = file axes (j, i)")  # fmt: skip
    return Loaded(arr, fmt, Geometry(tuple(arr.shape), spacing, origin, direction), info, notes)


def read_volume(path: Path, fmt: str, reason: str = "unreadable") -> Loaded:
    """Read a NIfTI (nibabel) or NRRD (pynrrd) file: values as stored (NIfTI scaling applied), axes and geometry as
    the module docstring says.

    Args:
        reason: the quarantine reason of a file that does not read (``unreadable``, ``mask_unreadable``).

    Raises:
        ReadError: ``reason`` or ``unsupported_format``.
    """
    info: dict[str, Any] = {}
    if fmt == "NIfTI":
        import nibabel as nib
        from nibabel.filebasedimages import ImageFileError

        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj)
        except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
            raise ReadError(reason, _library_message(exc)) from None
        return _volume(data, np.asarray(img.affine, float), "RAS", fmt, info)
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except (nrrd.NRRDError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise ReadError(reason, _library_message(exc)) from None
    dirs = header.get("space directions")
    if dirs is None:
        info["spacing"] = [float(s) for s in header.get("spacings", [])] or None
        return _volume(data, None, None, fmt, info)
    dirs = np.asarray(dirs, dtype=float)
    if dirs.ndim != 2 or len(dirs) != data.ndim or not np.all(np.isfinite(dirs)):
        raise ReadError("unsupported_format", f"NRRD with non-spatial axes (kinds {header.get('kinds')}): one "
                        "2D or 3D image per file")  # fmt: skip
    affine = np.eye(4)
    sdim = min(dirs.shape[1], 3)
    affine[:sdim, : data.ndim] = dirs[:, :sdim].T
    origin = np.asarray(header.get("space origin", np.zeros(sdim)), dtype=float)
    affine[:sdim, 3] = origin[:sdim]
    space = header.get("space")  # None: "space dimension" only, no anatomical frame
    return _volume(data, affine, None if space is None else _NRRD_SPACES.get(str(space).lower(), str(space)), fmt, info)


def read_file(path: Path, fmt: str, *, mask: bool, color: str = "reject") -> Loaded:
    """Read an image (``mask`` False) or a mask file of any supported format; see :class:`Loaded`."""
    if fmt in ("PNG", "JPEG"):
        return read_mask_2d(path, fmt) if mask else read_image_2d(path, fmt, color)
    return read_volume(path, fmt, "mask_unreadable" if mask else "unreadable")


def read_manifest(path: Path) -> tuple[dict[str, dict[str, str]], bool, bool]:
    """manifest.csv: id -> row (stripped values); and whether it has a ``label`` / ``patient_id`` column.

    Raises:
        ValueError: naming the file (and line) for a missing ``id`` column, an empty or repeated id.
    """
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or ()]
        if "id" not in columns:
            raise ValueError(f"{path}: needs an 'id' column (one row per images/<id>.<ext>); found {columns}")
        rows: dict[str, dict[str, str]] = {}
        first: dict[str, int] = {}
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not row["id"]:
                raise ValueError(f"{path}:{line}: empty id")
            if row["id"] in rows:
                raise ValueError(f"{path}:{line}: id repeated (first on line {first[row['id']]})")
            rows[row["id"]], first[row["id"]] = row, line
    return rows, "label" in columns, "patient_id" in columns


def map_labels(path: Path, rows: dict[str, dict[str, str]], class_names: list[str] | None
               ) -> tuple[dict[str, int | None], list[str] | None]:  # fmt: skip
    """The manifest's ``label`` column as class indices (an empty cell: None, unlabelled).

    Args:
        class_names: ``base.class_names``: a label is one of them or an index into them. None: integer labels are
            indices as they are; otherwise the sorted distinct names are the classes.

    Returns:
        (id -> index or None, the class names taken from the data, or None).

    Raises:
        ValueError: naming the manifest, the line and the class list for a label that is neither.
    """
    values = {i: r.get("label", "") for i, r in rows.items()}
    present = sorted({v for v in values.values() if v})
    if class_names is None:
        if all(v.isdigit() for v in present):
            return {i: int(v) if v else None for i, v in values.items()}, None
        index = {name: k for k, name in enumerate(present)}
        return {i: index[v] if v else None for i, v in values.items()}, present
    out: dict[str, int | None] = {}
    for line, (i, v) in enumerate(values.items(), start=2):
        if not v:
            out[i] = None
        elif v in class_names:
            out[i] = class_names.index(v)
        elif v.isdigit() and int(v) < len(class_names):
            out[i] = int(v)
        else:
            raise ValueError(
                f"{path}:{line}: label {v!r} is neither one of base.class_names {class_names} nor an "
                f"index into them; set base.class_names to the folder's classes {present} or null"
            )
    return out, None


def read_split(root: Path, k: int) -> dict[str, str]:
    """``splits/train{k}.txt`` and ``val{k}.txt``: id -> "" (train, split further by ingest) or "test" (val{k}).

    Raises:
        ValueError: a missing split file (named), or an id in both.
    """
    out: dict[str, str] = {}
    for name, split in ((f"train{k}.txt", ""), (f"val{k}.txt", "test")):
        path = root / "splits" / name
        if not path.is_file():
            raise ValueError(f"{path}: split file not found (ingest.folder_split: {k} needs splits/train{k}.txt "
                             f"and splits/val{k}.txt in {root})")  # fmt: skip
        for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            i = text.strip()
            if not i or i.startswith("#"):
                continue
            if out.get(i, split) != split:
                raise ValueError(f"{path}:{line}: id also in splits/train{k}.txt: train and test would share it")
            out[i] = split
    return out


def _list(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))  # fmt: skip


def collect_folder(root: Path, ip: IngestParams, progress: bool = True, class_names: list[str] | None = None
                   ) -> FolderCollection:  # fmt: skip
    """Read an image folder (module docstring) into ingest's image records.

    Args:
        root: the folder (``ingest.input``).
        ip: the ``ingest`` group: ``color``, ``deid`` (the pseudonym secret), ``folder_split`` (k: use
            ``splits/train{k}.txt`` / ``val{k}.txt``; val{k} ids get split "test", train{k} ids "" and ids in
            neither are left out, not counted as found), ``masks.classes`` (the mask's foreground classes).
        class_names: ``base.class_names`` (None: the manifest's label names, sorted).

    Returns:
        A :class:`FolderCollection`.

    Raises:
        FileNotFoundError: no ``images/`` folder under ``root``.
        ValueError: a bad manifest.csv or split file, or labels that do not fit ``class_names`` (message names the
            file and line).
    """
    from tqdm import tqdm

    from tasks.dicom.pseudonym import Pseudonymizer, patient_key
    from tasks.sources.records import ImageRecord

    root = Path(root)
    if not (root / "images").is_dir():
        raise FileNotFoundError(f"{root / 'images'}: no images folder (an image folder holds images/<id>.<ext>, "
                                "optional masks/<id>.<ext>, manifest.csv and splits/)")  # fmt: skip
    pseudo = Pseudonymizer.from_params(ip.deid)
    classes, k = list(ip.masks.classes), ip.folder_split
    split_of = read_split(root, k) if k is not None else None
    manifest_path = root / "manifest.csv"
    rows, has_label, has_patient = read_manifest(manifest_path) if manifest_path.is_file() else ({}, False, False)
    labels, names = map_labels(manifest_path, rows, class_names) if has_label else ({}, None)

    quarantine: list[QuarantineRow] = []
    warnings: list[str] = []
    paths: dict[str, str] = {}
    left_out: Counter[str] = Counter()

    def found(sub: str) -> dict[str, tuple[str, str]]:
        """id -> (pseudonym, format) of the readable files of ``sub``; the rest quarantined."""
        out: dict[str, tuple[str, str]] = {}
        for name in _list(root / sub):
            ident, fmt = split_name(name)
            if split_of is not None and ident not in split_of and fmt is not None:
                left_out[sub] += 1
                continue
            rel = f"{sub}/{name}"
            file = pseudo.path(rel)
            paths[file] = rel
            if fmt is None:
                quarantine.append((file, "unsupported_format", f"{sub}/ file with an extension other than "
                                   f"{', '.join(sorted(FORMATS))}"))  # fmt: skip
            elif ident in out:
                quarantine.append((file, "duplicate_id", f"same id as {out[ident][0]} (kept) in {sub}/"))
            else:
                out[ident] = (file, fmt)
        return out

    image_files, mask_files = found("images"), found("masks")
    n_found = len(paths)
    if left_out:
        warnings.append(
            f"ingest.folder_split {k}: {left_out['images']} image(s) and {left_out['masks']} mask(s) "
            f"whose id is in neither splits/train{k}.txt nor val{k}.txt left out (not counted as found)"
        )
    if split_of is not None and (missing := sum(i not in image_files for i in split_of)):
        warnings.append(f"{missing} id(s) of splits/train{k}.txt + val{k}.txt have no image file")
    if rows and (missing := sum(i not in image_files for i in rows)):
        warnings.append(f"{missing} id(s) of manifest.csv have no image file under images/")

    images: list[ImageRecord] = []
    patient_id_from: dict[str, str] = {}
    own_patient = 0
    bar = tqdm(total=n_found, desc=f"ingest: {root.name}", unit="file", disable=not progress)
    for ident, (file, fmt) in image_files.items():
        mask_entry = mask_files.pop(ident, None)
        bar.update(1 + (mask_entry is not None))
        if has_label and ident not in rows:
            quarantine.append((file, "no_label", "manifest.csv has a label column but no row for this image's id"))
            if mask_entry:
                quarantine.append((mask_entry[0], "mask_orphan", f"its image {file} was quarantined (no_label)"))
            continue
        try:
            image = read_file(root / paths[file], fmt, mask=False, color=ip.color)
        except ReadError as exc:
            quarantine.append((file, exc.reason, exc.detail))
            if mask_entry:
                quarantine.append((mask_entry[0], "mask_orphan", f"its image {file} was quarantined ({exc.reason})"))
            continue
        notes, files = list(image.notes), [file]
        mask, mask_source = None, ""
        if mask_entry is not None:
            mfile, mfmt = mask_entry
            try:
                loaded = read_file(root / paths[mfile], mfmt, mask=True)
                problem = geometry_mismatch(image.geometry, loaded.geometry)
            except ReadError as exc:
                quarantine.append((mfile, exc.reason, exc.detail))
            else:
                if problem:
                    quarantine.append((mfile, "mask_geometry", f"{problem} ({mfmt} mask of {fmt} image {file})"))
                else:
                    mask, mask_notes = check_mask_values(loaded.array, classes)
                    mask_source, files = mfmt, [file, mfile]
                    notes += loaded.notes + [f"mask: {n}" for n in mask_notes]
        row = rows.get(ident, {})
        if has_patient and row.get("patient_id"):
            key, key_from = row["patient_id"], "PatientID"
        else:
            (key, _), key_from = patient_key("", file=file), "file"
            own_patient += 1
        series_uid = pseudo.uid(f"image-folder:{paths[file]}")
        image_id = "I" + pseudo.pseudonym("image", series_uid)
        images.append(ImageRecord(
            image_id=image_id, patient_id=pseudo.patient_id(key), study_id=pseudo.study_id(series_uid),
            series_uid=series_uid, study_date="",
            pixels=image.array if fmt in ("PNG", "JPEG") else image.array.astype(np.float32),
            spacing=list(image.geometry.spacing) if image.geometry.spacing else None, modality="OT",
            unit="uint8" if fmt in ("PNG", "JPEG") else "stored", files=files, label_value=None,
            label=labels.get(ident), split="" if split_of is None else split_of[ident],
            channels=3 if image.array.ndim == 3 and fmt in ("PNG", "JPEG") else 1, notes=notes, mask=mask,
            mask_source=mask_source, geometry=image.info,
        ))  # fmt: skip
        patient_id_from[image_id] = key_from
    for mfile, _ in mask_files.values():  # masks whose id has no image
        bar.update()
        quarantine.append((mfile, "mask_orphan", "no image under images/ has this mask's id"))
    bar.close()
    if own_patient:
        warnings.append(f"{own_patient} image(s) without a manifest patient_id: each is a patient of its own (the "
                        "split and the bootstrap treat them as independent)")  # fmt: skip
    if names is not None:
        warnings.append(f"class names from manifest.csv labels: {names}")
    return FolderCollection(n_found, images, quarantine, warnings, names, paths, patient_id_from)


def collect(root: Path, ip: IngestParams, progress: bool = True, class_names: list[str] | None = None
            ) -> tuple[int, list[ImageRecord], list[QuarantineRow], list[str]]:  # fmt: skip
    """:func:`collect_folder` as (files found, image records, quarantine rows, warnings), the shape of the other
    sources; the manifest's class names (when taken from the data) are in a warning, and in
    :attr:`FolderCollection.class_names` of :func:`collect_folder`."""
    got = collect_folder(root, ip, progress, class_names)
    return got.n_found, got.images, got.quarantine, got.warnings
