"""A deterministic synthetic chest-CT cohort as DICOM: the offline stand-in for a PACS export.

``python -m tasks.synth --output data/synthetic`` writes, for the ``synth`` params group::

    <output>/dicom/case0001/study1/slice001.dcm ...   CT Image Storage, Explicit VR Little Endian
    <output>/dicom/case0001/study1/seg.dcm            DICOM SEG of the study's series (highdicom, manual):
                                                      segment 1 "lung" (both lungs), 2 "lesion" (the nodule)
    <output>/dicom/labels.csv                         AccessionNumber,label  (one row per study, 0/1): inside the
                                                      data folder, as ingest.labels_csv expects (one DVC dependency)
    <output>/synth.json                               params and counts (also marks the folder as ours)

Each patient has 1..max_studies_per_patient studies; each study is one series of ``slices_per_study`` axial
slices of ``image_size``^2 pixels, int16 stored values with RescaleSlope 1 / RescaleIntercept -1024.
Anatomy, in HU: air -1000, an elliptical body with a subcutaneous fat layer (~-100) around soft tissue (~20-40),
two lungs (~-850) with small pulmonary vessels, the heart, a vertebra (cortex ~+800, marrow ~+250) and ribs
(~+600), with per-patient size, position and noise. A positive study has one nodule, a sphere of radius
6-16 mm at +40..+80 HU, in a lung (clear unless small enough to pass for a vessel) or in the mediastinal soft
tissue (subtle: 20-45 HU above its surroundings). The identifying attributes (names, ids, dates, institution)
are realistic-looking fakes so that de-identification has work to do. Same params, same bytes.

The masks are the painted shapes themselves, thresholded where the soft edge is half way (r <= 1 of each
ellipse): lung = the two lung ellipses less the heart painted over them, lesion = the nodule's cross-sections
(positive studies only; lesion wins over lung). Label values follow ``ingest.masks.classes`` = [lung, lesion].
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.schema import SynthParams

FAMILY = (
    "SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ HERNANDEZ LOPEZ WILSON "
    "ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN THOMPSON WHITE HARRIS SANCHEZ CLARK LEWIS ROBINSON"
).split()
GIVEN = {
    "F": "MARY PATRICIA JENNIFER LINDA ELIZABETH BARBARA SUSAN JESSICA SARAH KAREN NANCY LISA".split(),
    "M": "JAMES ROBERT JOHN MICHAEL DAVID WILLIAM RICHARD JOSEPH THOMAS CHARLES DANIEL MATTHEW".split(),
}
INSTITUTIONS = ("SAINT EXAMPLE GENERAL HOSPITAL", "NORTHFIELD UNIVERSITY MEDICAL CENTER", "LAKESIDE CLINIC")
PHYSICIANS = ("HOUSE^GREGORY", "GREY^MEREDITH", "KILDARE^JAMES", "QUINN^MICHAELA", "WELBY^MARCUS")
MARKER = "synth.json"
MASK_CLASSES = ("lung", "lesion")  # label values 1, 2: the default ingest.masks.classes
SEG_FILE = "seg.dcm"


@dataclass(frozen=True)
class SynthResult:
    """What :func:`run` wrote: counts and the two paths ingest reads."""

    dicom_dir: Path
    labels_csv: Path
    n_patients: int
    n_studies: int
    n_files: int  # CT slices
    n_positive: int
    n_seg: int = 0  # DICOM SEG files (one per study)


class _Canvas:
    """An (S, H, W) HU image painted with soft-edged (anti-aliased) ellipses, each only over its bounding box."""

    def __init__(self, n_slices: int, size: int, spacing: float, fill: float) -> None:
        self.img = np.full((n_slices, size, size), fill)
        self.coords = (np.arange(size) - (size - 1) / 2) * spacing  # mm of pixel centres, rows and columns

    def ellipse(
        self, cx: float, cy: float, ax: float | np.ndarray, ay: float | np.ndarray, hu: float, edge: float = 1.0
    ) -> None:
        """Blend ``hu`` into the ellipse centred (cx, cy) with semi-axes (ax, ay), all in mm.

        ``ax``/``ay`` may be (S,) arrays: one size per slice, 0 where the shape is absent from that slice.
        """
        n = self.img.shape[0]
        ax, ay = np.broadcast_to(np.asarray(ax, float), (n,)), np.broadcast_to(np.asarray(ay, float), (n,))
        if not np.any(ax > 0):
            return
        lo = np.minimum(ax, ay)[ax > 0].min()
        grow = 1.0 + 8.0 * edge / lo  # beyond r = grow the mask is below sigmoid(-8)
        c0, c1 = np.searchsorted(self.coords, [cx - grow * ax.max(), cx + grow * ax.max()])
        r0, r1 = np.searchsorted(self.coords, [cy - grow * ay.max(), cy + grow * ay.max()])
        if c0 >= c1 or r0 >= r1:
            return
        x, y = self.coords[None, None, c0:c1], self.coords[None, r0:r1, None]
        present = (ax > 0)[:, None, None]
        sx, sy = np.where(ax > 0, ax, 1.0)[:, None, None], np.where(ay > 0, ay, 1.0)[:, None, None]
        r = np.sqrt(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2)
        mask = present / (1.0 + np.exp(-np.clip((1.0 - r) * np.minimum(sx, sy) / edge, -30, 30)))
        window = self.img[:, r0:r1, c0:c1]
        window += mask * (hu - window)  # in place: (1 - mask) * old + mask * hu


def render_study(rng: np.random.Generator, anatomy: dict, size: int, n_slices: int, lesion: dict | None):
    """Render one study's slices.

    Args:
        rng: the study's generator (noise, vessel jitter).
        anatomy: the patient's shape parameters (mm, HU) from :func:`_sample_anatomy`.
        size: pixels per side.
        n_slices: slices in the study; slice k is at z = (k - (n - 1) / 2) * thickness mm from the table position.
        lesion: None, or a nodule ``{"x", "y", "z", "r", "hu"}`` in mm / HU.

    Returns:
        (stored int16 (S, H, W) with HU = stored - 1024, z positions (S,) in mm, pixel spacing mm, thickness mm)
    """
    a = anatomy
    ps, thick = a["fov"] / size, a["thickness"]
    z = (np.arange(n_slices) - (n_slices - 1) / 2) * thick
    taper = 1.0 - 0.25 * (z / 120.0) ** 2  # lungs narrow away from the middle slice
    cx, cy, bx, by, fat = a["cx"], a["cy"], a["bx"], a["by"], a["fat"]

    c = _Canvas(n_slices, size, ps, -1000.0)
    c.ellipse(cx, cy, bx, by, a["fat_hu"])
    c.ellipse(cx, cy, bx - fat, by - fat, a["soft_hu"])
    for k in range(a["n_ribs"]):  # along the inside of the chest wall, lateral arcs on both sides
        t = np.pi * (-0.35 + 0.7 * k / (a["n_ribs"] - 1))
        for side in (-1, 1):
            c.ellipse(cx + side * (bx - fat - 7) * np.cos(t), cy + (by - fat - 7) * np.sin(t), 5.0, 5.0, 600.0)
    for side in (-1, 1):
        c.ellipse(cx + side * a["lung_off"], cy - 0.05 * by, a["lung_x"] * taper, a["lung_y"] * taper, a["lung_hu"])
    c.ellipse(cx + 0.12 * bx, cy - 0.12 * by, a["heart"], 0.85 * a["heart"], a["heart_hu"])
    for vx, vy, vr in a["vessels"]:  # pulmonary vessels: small bright dots in the lungs of every patient
        jx, jy = rng.normal(0.0, 1.0, 2)
        c.ellipse(vx + jx, vy + jy, vr, vr, 35.0, edge=0.5)
    sx, sy, vert = cx, cy + 0.68 * by, a["vert"]
    c.ellipse(sx, sy, vert, 0.9 * vert, 800.0)  # vertebral body: cortex ...
    c.ellipse(sx, sy, vert - 3, 0.9 * vert - 3, 250.0)  # ... and marrow
    c.ellipse(sx, sy + vert + 9, 5.0, 10.0, 700.0)  # spinous process
    if lesion is not None:  # a sphere: its cross-section on each slice
        r_slice = np.sqrt(np.clip(lesion["r"] ** 2 - (z - lesion["z"]) ** 2, 0.0, None))
        r_slice[r_slice < 0.3] = 0.0
        c.ellipse(lesion["x"], lesion["y"], r_slice, r_slice, lesion["hu"], edge=0.7)
    img = c.img + rng.normal(0.0, a["noise"], c.img.shape)
    stored = np.clip(np.rint(img), -1024, 3071).astype(np.int16) + np.int16(1024)
    return stored, z + a["table_z"], ps, thick


def _inside(coords: np.ndarray, cx: float, cy: float, ax: np.ndarray, ay: np.ndarray) -> np.ndarray:
    """bool (S, H, W): pixel centres with r <= 1 of the ellipse centred (cx, cy) with per-slice semi-axes (mm)."""
    present = (ax > 0)[:, None, None]
    sx, sy = np.where(ax > 0, ax, 1.0)[:, None, None], np.where(ay > 0, ay, 1.0)[:, None, None]
    x, y = coords[None, None, :], coords[None, :, None]
    return present & (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2 <= 1.0)


def study_mask(anatomy: dict, size: int, n_slices: int, lesion: dict | None) -> np.ndarray:
    """The label map of what :func:`render_study` paints: 1 lung (both lungs less the heart), 2 lesion.

    Args:
        anatomy: the patient's shape parameters, as given to :func:`render_study`.
        size: pixels per side.
        n_slices: slices in the study.
        lesion: the study's nodule, or None.

    Returns:
        uint8 (S, H, W), on the same pixel grid and slices as :func:`render_study`'s image.
    """
    a = anatomy
    coords = (np.arange(size) - (size - 1) / 2) * (a["fov"] / size)
    z = (np.arange(n_slices) - (n_slices - 1) / 2) * a["thickness"]
    taper = 1.0 - 0.25 * (z / 120.0) ** 2
    cx, cy, bx, by = a["cx"], a["cy"], a["bx"], a["by"]
    lung = np.zeros((n_slices, size, size), bool)
    for side in (-1, 1):
        lung |= _inside(coords, cx + side * a["lung_off"], cy - 0.05 * by, a["lung_x"] * taper, a["lung_y"] * taper)
    heart = np.full(n_slices, a["heart"])
    lung &= ~_inside(coords, cx + 0.12 * bx, cy - 0.12 * by, heart, 0.85 * heart)  # painted over the lungs
    out = lung.astype(np.uint8)
    if lesion is not None:
        r_slice = np.sqrt(np.clip(lesion["r"] ** 2 - (z - lesion["z"]) ** 2, 0.0, None))
        r_slice[r_slice < 0.3] = 0.0
        out[_inside(coords, lesion["x"], lesion["y"], r_slice, r_slice)] = 2
    return out


def _sample_anatomy(rng: np.random.Generator) -> dict:
    """A patient's body shape and tissue values (mm, HU)."""
    bx, by = rng.uniform(135, 170), rng.uniform(95, 125)
    fat = rng.uniform(8, 28)
    lung_x, lung_y = rng.uniform(0.26, 0.32) * bx, rng.uniform(0.55, 0.65) * by
    lung_off = rng.uniform(0.42, 0.48) * bx
    cx, cy = rng.normal(0, 8), rng.normal(5, 8)
    vessels = []
    for side in (-1, 1):
        for _ in range(rng.integers(2, 6)):
            t, rr = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0.05, 0.7))
            vessels.append(
                (
                    cx + side * lung_off + rr * lung_x * np.cos(t),
                    cy - 0.05 * by + rr * lung_y * np.sin(t),
                    rng.uniform(0.8, 1.8),
                )
            )
    return {
        "fov": rng.uniform(360, 420),
        "thickness": float(rng.choice([2.5, 3.0, 5.0])),
        "table_z": rng.uniform(-180, -120),
        "cx": cx,
        "cy": cy,
        "bx": bx,
        "by": by,
        "fat": fat,
        "lung_x": lung_x,
        "lung_y": lung_y,
        "lung_off": lung_off,
        "heart": rng.uniform(0.2, 0.26) * bx,
        "vert": rng.uniform(14, 19),
        "n_ribs": int(rng.integers(3, 6)),
        "vessels": vessels,
        "fat_hu": rng.normal(-100, 10),
        "soft_hu": rng.uniform(20, 40),
        "lung_hu": rng.normal(-850, 25),
        "heart_hu": rng.uniform(30, 45),
        "noise": rng.uniform(10, 22),
    }


def _sample_lesion(rng: np.random.Generator, a: dict, n_slices: int) -> dict:
    """A nodule in the lateral part of a lung (80 %) or in the heart/mediastinum (20 %, subtle); mm and HU.

    Lung nodules are +40..+80 HU against ~-850; mediastinal ones 20..45 HU above the heart's value.
    """
    r = rng.uniform(6.0, 16.0)
    z = rng.uniform(-0.4, 0.4) * (n_slices - 1) * a["thickness"]
    t, rr = rng.uniform(-0.5 * np.pi, 0.5 * np.pi), np.sqrt(rng.uniform(0.0, 0.6))
    if rng.uniform() < 0.8:
        side = rng.choice([-1, 1])  # cos(t) >= 0: away from the midline, where the heart overlaps the lung
        x = a["cx"] + side * (a["lung_off"] + rr * a["lung_x"] * np.cos(t))
        y = a["cy"] - 0.05 * a["by"] + rr * a["lung_y"] * np.sin(t)
        hu = rng.uniform(40, 80)
    else:
        x = a["cx"] + 0.12 * a["bx"] + 0.6 * rr * a["heart"] * np.cos(2 * t)
        y = a["cy"] - 0.12 * a["by"] + 0.5 * rr * a["heart"] * np.sin(2 * t)
        hu = a["heart_hu"] + rng.uniform(20, 45)
    return {"x": x, "y": y, "z": z, "r": r, "hu": hu}


def _person(rng: np.random.Generator, index: int, seed: int) -> dict:
    """Fake identifying attributes of patient ``index`` (PN, LO, DA strings as DICOM wants them)."""
    sex = str(rng.choice(["F", "M"]))
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 65 * 365)))
    return {
        "patient_name": f"{rng.choice(FAMILY)}^{rng.choice(GIVEN[sex])}",
        "patient_id": f"MRN{(index * 7919 + seed * 104729) % 9_000_000 + 1_000_000:07d}",  # unique per index
        "patient_birth_date": birth.strftime("%Y%m%d"),
        "patient_sex": sex,
        "institution_name": str(rng.choice(INSTITUTIONS)),
        "referring_physician_name": str(rng.choice(PHYSICIANS)),
    }


def run(params: SynthParams, output: Path, progress: bool = True) -> SynthResult:
    """Generate the cohort into ``output`` (its ``dicom/`` folder is replaced if this generator made it).

    Args:
        params: the ``synth`` group.
        output: folder for ``dicom/`` (with its ``labels.csv``) and ``synth.json``.
        progress: show a tqdm progress bar.

    Raises:
        FileExistsError: ``output/dicom`` exists but was not written by this generator.
    """
    from tqdm import tqdm

    from tasks.dicom import CtSliceHeader, derive_uid, write_ct_slice
    from tasks.dicom.seg import write_seg

    output = Path(output)
    dicom_dir = output / "dicom"
    if dicom_dir.exists():
        if not (output / MARKER).exists():
            raise FileExistsError(
                f"{dicom_dir} exists and was not made by tasks.synth ({MARKER} missing); "
                "remove it or choose another --output"
            )
        shutil.rmtree(dicom_dir)
    dicom_dir.mkdir(parents=True)

    n_studies_of = [
        int(np.random.default_rng([params.seed, 0, i]).integers(1, params.max_studies_per_patient + 1))
        for i in range(params.n_patients)
    ]
    n_studies = sum(n_studies_of)
    labels = np.zeros(n_studies, dtype=int)
    labels[: round(params.positive_fraction * n_studies)] = 1
    labels = np.random.default_rng([params.seed, 1]).permutation(labels)

    rows, n_files, n_seg, s = [], 0, 0, 0
    base = dt.date(2016, 1, 1)
    for i in tqdm(range(params.n_patients), desc="synth", unit="patient", disable=not progress):
        rng = np.random.default_rng([params.seed, 2, i])
        person, anatomy = _person(rng, i + 1, params.seed), _sample_anatomy(rng)
        date = base + dt.timedelta(days=int(rng.integers(0, 7 * 365)))
        for j in range(n_studies_of[i]):
            study_rng = np.random.default_rng([params.seed, 3, i, j])
            lesion = _sample_lesion(study_rng, anatomy, params.slices_per_study)
            stored, zs, ps, thick = render_study(
                study_rng, anatomy, params.image_size, params.slices_per_study, lesion if labels[s] else None
            )
            accession = f"A{params.seed % 100:02d}{i + 1:05d}{j + 1:02d}"
            study_time = f"{int(study_rng.integers(7, 19)):02d}{int(study_rng.integers(0, 60)):02d}00"
            key = ("medpipe-synth", params.seed, i, j)
            study_uid, series_uid = derive_uid(*key, "study"), derive_uid(*key, "series")
            origin = -(params.image_size - 1) / 2 * ps
            study_dir = dicom_dir / f"case{i + 1:04d}" / f"study{j + 1}"
            slices = []
            for k in range(params.slices_per_study):
                header = CtSliceHeader(
                    **person,
                    accession_number=accession,
                    study_date=date.strftime("%Y%m%d"),
                    study_time=study_time,
                    study_id=str(j + 1),
                    study_description="CT CHEST WITHOUT CONTRAST",
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=derive_uid(*key, "sop", k),
                    frame_of_reference_uid=derive_uid(*key, "for"),
                    series_number=1,
                    instance_number=k + 1,
                    pixel_spacing=(ps, ps),
                    slice_thickness=thick,
                    image_position=(origin, origin, float(zs[k])),
                )
                slices.append(study_dir / f"slice{k + 1:03d}.dcm")
                write_ct_slice(slices[-1], stored[k], header)
                n_files += 1
            mask = study_mask(anatomy, params.image_size, params.slices_per_study, lesion if labels[s] else None)
            write_seg(slices, mask, MASK_CLASSES, study_dir / SEG_FILE, manual=True, series_number=100,
                      series_instance_uid=derive_uid(*key, "seg-series"), sop_instance_uid=derive_uid(*key, "seg"),
                      content_date=date.strftime("%Y%m%d"), content_time=study_time)  # fmt: skip
            n_seg += 1
            rows.append((accession, int(labels[s])))
            date += dt.timedelta(days=int(rng.integers(90, 720)))
            s += 1

    labels_csv = dicom_dir / "labels.csv"  # inside the data folder: one DVC dependency for ingest
    with labels_csv.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["AccessionNumber", "label"])
        writer.writerows(rows)
    result = SynthResult(dicom_dir, labels_csv, params.n_patients, n_studies, n_files, int(labels.sum()), n_seg)
    summary = {
        "generator": "tasks.synth",
        "params": params.model_dump(mode="json"),
        "patients": result.n_patients,
        "studies": n_studies,
        "files": n_files,
        "positive_studies": result.n_positive,
        "seg_files": n_seg,
        "mask_classes": list(MASK_CLASSES),
    }
    (output / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.synth --output data/synthetic [--params params.yaml]``."""
    from tasks.config import DEFAULT_PARAMS, HelpFormatter, load_params_or_exit
    from tasks.noise import silence_known_noise

    silence_known_noise()
    parser = argparse.ArgumentParser(prog="python -m tasks.synth", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                        help="the params file; this stage reads its synth group (cohort size, image size, seed)")
    parser.add_argument("--output", type=Path, required=True,
                        help="folder to write the synthetic DICOM cohort and its labels.csv into, e.g. data/synthetic")
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)
    res = run(params.synth, args.output)
    print(
        f"synth: {res.n_patients} patients, {res.n_studies} studies ({res.n_positive} positive), "
        f"{res.n_files} slices + {res.n_seg} SEG masks -> {res.dicom_dir}, labels -> {res.labels_csv}"
    )


if __name__ == "__main__":
    main()
