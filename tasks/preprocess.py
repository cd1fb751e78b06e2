"""Stage 2: turn ingested arrays into fixed-shape, normalised tensors, cached per split.

MONAI dictionary transforms, driven by params: load the array, add a channel axis, map intensities to [0, 1]
(an HU window for CT, /255 for 8-bit sources), resize keeping the aspect ratio and pad/crop to the fixed
``spatial_size``. The result is written once so that training never decodes DICOM or resamples again:

``<output>/{split}_x.npy``  float16 (N, C, *spatial_size), values in [0, 1]
``<output>/{split}_y.npy``  int64 (N,) class index (-1 where the manifest has no label)
``<output>/{split}_ids.csv`` image_id, patient_id, label — row order of the arrays
``<output>/meta.json``      spatial_dims, in_channels, num_classes, class_names, spatial_size, intensity, counts,
                           source_spacing_mm (null unless every image shares it), task_kind, params

A segmentation task (``--task`` of kind segmentation) uses the images that have a mask (ingest's ``mask_path``) and
applies the same spatial transforms to image and mask (area resampling for the image, nearest-neighbour for the
mask), adding:

``<output>/{split}_m.npy``  uint8 (N, *spatial_size) label maps, 0 = background, v = ingest.masks.classes[v-1]
``{split}_ids.csv`` columns ``orig_shape`` (the ingested spatial shape) and ``spacing`` (mm):
:func:`tasks.spatial.map_back` returns a prediction to the original image grid with MONAI's inverse of the same
transforms.
``<output>/test_masks_original.npz``  each test mask on its own image's grid (key: image_id), for scoring there
``<output>/test_geometry.json``       ingest's geometry of each test image (writing predictions as DICOM SEG)
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.schema import PreprocessParams
from tasks.spatial import ORIGINAL_MASKS, TEST_GEOMETRY, seg_spatial

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PreprocessResult:
    meta: dict[str, Any]
    counts: dict[str, int]


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Read ingest's manifest.csv, checking the columns this stage needs."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found (did the ingest stage run?)")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"image_id", "patient_id", "label", "split", "path"}
    missing = need - set(rows[0].keys() if rows else need)
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
    if not rows:
        raise ValueError(f"{path}: manifest has no rows (every input file was quarantined? see quarantine.csv)")
    return rows


def intensity_spec(params: PreprocessParams, unit: str) -> dict[str, Any]:
    """How stored values map to the model's [0, 1] input: an HU window, or /255 for 8-bit sources."""
    if unit == "uint8":
        return {"kind": "uint8", "a_min": 0.0, "a_max": 255.0}
    lo = params.window_center - params.window_width / 2
    return {
        "kind": "hu_window",
        "center": params.window_center,
        "width": params.window_width,
        "a_min": lo,
        "a_max": lo + params.window_width,
    }


def build_transforms(intensity: dict[str, Any], spatial_size: list[int] | None, channels: int = 1):
    """The MONAI dictionary transform chain applied to each ``{"image": path}`` item.

    ``channels`` > 1: the stored arrays are channel-first already (ingest's manifest column ``channels``).
    """
    from monai import transforms as mt

    chain = [
        mt.LoadImaged(keys="image", reader="NumpyReader", image_only=True),
        mt.EnsureChannelFirstd(keys="image", channel_dim=0 if channels > 1 else "no_channel"),
        mt.ScaleIntensityRanged(
            keys="image", a_min=intensity["a_min"], a_max=intensity["a_max"], b_min=0.0, b_max=1.0, clip=True
        ),
    ]
    if spatial_size is not None:
        chain += [
            mt.Resized(keys="image", spatial_size=max(spatial_size), size_mode="longest", mode="area"),
            mt.ResizeWithPadOrCropd(keys="image", spatial_size=spatial_size, mode="constant"),
        ]
    chain.append(mt.EnsureTyped(keys="image", dtype=np.float32, data_type="numpy", track_meta=False))
    return mt.Compose(chain)


def build_seg_transforms(intensity: dict[str, Any], spatial_size: list[int] | None, channels: int = 1):
    """:func:`build_transforms` for ``{"image": path, "mask": path}`` items: the same spatial transforms on both,
    area resampling for the image and nearest-neighbour for the label map (whose values are kept exactly)."""
    from monai import transforms as mt

    keys = ["image", "mask"]
    chain = [
        mt.LoadImaged(keys=keys, reader="NumpyReader", image_only=True),
        mt.EnsureChannelFirstd(keys="image", channel_dim=0 if channels > 1 else "no_channel"),
        mt.EnsureChannelFirstd(keys="mask", channel_dim="no_channel"),
        mt.ScaleIntensityRanged(
            keys="image", a_min=intensity["a_min"], a_max=intensity["a_max"], b_min=0.0, b_max=1.0, clip=True
        ),
        *seg_spatial(spatial_size),
        mt.EnsureTyped(keys="image", dtype=np.float32, data_type="numpy", track_meta=False),
        mt.EnsureTyped(keys="mask", dtype=np.uint8, data_type="numpy", track_meta=False),
    ]
    return mt.Compose(chain)


def _spatial_size(params: PreprocessParams, sample_ndim: int, source: Path) -> list[int] | None:
    size = params.spatial_size
    if size is not None and len(size) != sample_ndim:
        raise ValueError(
            f"preprocess.spatial_size: {size} has {len(size)} axes but the images in {source} have {sample_ndim} "
            f"spatial axes; give {sample_ndim} sizes or null to keep the native size"
        )
    return size


def spatial_axes(rows: list[dict[str, str]], channels: int, inputs: Path) -> int:
    """The number of spatial axes (2 or 3) every image shares, from the manifest's ``shape`` column (the array's
    header where the column is empty); raises naming images of each kind when 2D and 3D images are mixed."""
    axes: dict[int, list[str]] = {}
    for r in rows:
        shape = json.loads(r["shape"]) if r.get("shape") else np.load(inputs / r["path"], mmap_mode="r").shape
        axes.setdefault(len(shape) - (channels > 1), []).append(r["image_id"])
    if len(axes) > 1:
        shown = "; ".join(f"{n}D: {len(ids)} image(s), e.g. {ids[0]}" for n, ids in sorted(axes.items()))
        raise ValueError(
            f"{inputs / 'manifest.csv'}: images differ in their number of spatial axes (column shape: "
            f"{shown}); select one kind with ingest.series (e.g. min_slices) or ingest.multiframe"
        )
    return next(iter(axes))


def class_names_of(class_names: list[str] | None, inputs: Path) -> list[str]:
    """``base.class_names``, or (null there) the names ingest derived from the data (its summary.json)."""
    if class_names:
        return list(class_names)
    path = inputs / "summary.json"
    names = json.loads(path.read_text()).get("class_names") if path.exists() else None
    if not names:
        raise ValueError(f"base.class_names is null and {path} names no classes; give base.class_names")
    return list(names)


def common_value(rows: list[dict[str, str]], column: str, default: str, source: Path) -> str:
    """The one value of ``column`` shared by every manifest row; raises naming rows that differ.

    One intensity mapping and one channel count serve every image, so a manifest that mixes units (HU beside
    raw MR values or 8-bit pixels) or channel counts cannot be preprocessed as one set.
    """
    values: dict[str, list[str]] = {}
    for r in rows:
        values.setdefault(r.get(column) or default, []).append(r["image_id"])
    if len(values) > 1:
        shown = "; ".join(f"{v!r}: {len(ids)} image(s), e.g. {ids[0]}" for v, ids in sorted(values.items()))
        raise ValueError(
            f"{source}: images differ in {column} ({shown}); select one kind with ingest.series "
            "(e.g. modalities: [CT]) so that one intensity mapping fits every image"
        )
    return next(iter(values))


def mask_class_names(inputs: Path) -> list[str]:
    """A segmentation task's classes: ``background`` and the mask classes ingest read with (its summary.json)."""
    path = inputs / "summary.json"
    names = json.loads(path.read_text()).get("mask_classes") if path.exists() else None
    if not names:
        raise ValueError(f"{path}: names no mask classes (ingest.masks.classes); rerun ingest")
    return ["background", *names]


def run(
    pp: PreprocessParams, inputs: Path, output: Path, class_names: list[str] | None = None, positive_class: int = 1,
    kind: str = "classification",
) -> PreprocessResult:  # fmt: skip
    """Preprocess every manifest row into per-split cached arrays.

    Args:
        pp: the ``preprocess`` params group.
        inputs: the ingest output folder (manifest.csv, arrays/, masks/).
        output: where the cached tensors and meta.json go.
        class_names: ``base.class_names`` (None: the names ingest derived from the data). Segmentation: unused (the
            classes are ``background`` + ingest's mask classes).
        positive_class: ``base.positive_class``, recorded in meta.json for train and evaluate.
        kind: the task's kind (``tasks.<task>.kind``): ``classification`` or ``segmentation`` (images with a mask).
    """
    from tqdm import tqdm

    rows = read_manifest(inputs / "manifest.csv")
    seg = kind == "segmentation"
    if seg:
        n_all = len(rows)
        rows = [r for r in rows if r.get("mask_path")]
        if not rows:
            raise ValueError(f"{inputs / 'manifest.csv'}: none of the {n_all} images has a mask (column mask_path); "
                             "a segmentation task needs masks (DICOM SEG, RTSTRUCT, NIfTI/NRRD or an image folder's "
                             "masks/); see quarantine.csv for masks that were refused")
    unit = common_value(rows, "unit", "HU", inputs / "manifest.csv")
    channels = int(common_value(rows, "channels", "1", inputs / "manifest.csv"))
    spatial = _spatial_size(pp, spatial_axes(rows, channels, inputs), inputs)
    intensity = intensity_spec(pp, unit)
    transform = build_seg_transforms(intensity, spatial, channels) if seg else build_transforms(intensity, spatial,
                                                                                                 channels)
    class_names = mask_class_names(inputs) if seg else class_names_of(class_names, inputs)
    positive_class = 0 if seg else positive_class
    output.mkdir(parents=True, exist_ok=True)
    for stale in [*output.glob("*_m.npy"), output / ORIGINAL_MASKS, output / TEST_GEOMETRY]:  # not a seg task's
        stale.unlink(missing_ok=True)

    counts: dict[str, int] = {}
    shape: tuple[int, ...] | None = None
    for split in SPLITS:
        members = [r for r in rows if r["split"] == split]
        counts[split] = len(members)
        xs, ms, orig = [], [], []
        for row in tqdm(members, desc=f"preprocess {split}", unit="img", leave=False):
            item = {"image": str(inputs / row["path"])}
            if seg:
                item["mask"] = str(inputs / row["mask_path"])
            out = transform(item)
            x = out["image"]
            if seg:
                ms.append(out["mask"][0])
            orig.append(json.loads(row["shape"])[-(len(x.shape) - 1):] if row.get("shape") else list(x.shape[1:]))
            if shape is None:
                shape = tuple(x.shape)
            elif tuple(x.shape) != shape:
                raise ValueError(
                    f"{inputs / row['path']}: preprocessed shape {x.shape} differs from {shape}; "
                    "set preprocess.spatial_size so every image gets the same shape"
                )
            xs.append(x.astype(np.float16))
        x_arr = np.stack(xs) if xs else np.zeros((0, *(shape or (1, 1, 1))), np.float16)
        y_arr = np.array([int(r["label"]) if r["label"] not in ("", None) else -1 for r in members], np.int64)
        np.save(output / f"{split}_x.npy", x_arr)
        np.save(output / f"{split}_y.npy", y_arr)
        if seg:
            m_arr = np.stack(ms) if ms else np.zeros((0, *(shape or (1, 1, 1))[1:]), np.uint8)
            np.save(output / f"{split}_m.npy", m_arr.astype(np.uint8))
        if seg and split == "test":  # evaluate scores on each image's own grid too, and writes DICOM SEG from geometry
            np.savez_compressed(output / ORIGINAL_MASKS,
                                **{r["image_id"]: np.load(inputs / r["mask_path"]) for r in members})  # fmt: skip
            geometry = {r["image_id"]: json.loads((inputs / r["geometry_path"]).read_text())
                        for r in members if r.get("geometry_path")}  # fmt: skip
            (output / TEST_GEOMETRY).write_text(json.dumps(geometry, sort_keys=True) + "\n")
        with (output / f"{split}_ids.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image_id", "patient_id", "label", "orig_shape", "spacing"])
            w.writerows([r["image_id"], r["patient_id"], r["label"], json.dumps(o), r.get("spacing") or "null"]
                        for r, o in zip(members, orig, strict=True))  # fmt: skip

    if counts["train"] == 0 or counts["val"] == 0:
        raise ValueError(f"{inputs / 'manifest.csv'}: the train and val splits must not be empty ({counts})")
    assert shape is not None
    # the source voxel size (mm) where every image shares it; null where it varies or is unknown
    spacings = {r.get("spacing") or "null" for r in rows}
    spacing = json.loads(spacings.pop()) if len(spacings) == 1 else None
    meta = {
        "spatial_dims": len(shape) - 1,
        "in_channels": shape[0],
        "input_shape": list(shape),
        "num_classes": len(class_names),
        "class_names": class_names,
        "positive_class": positive_class,
        "spatial_size": list(shape[1:]),
        "intensity": intensity,
        "source_spacing_mm": spacing,
        "counts": counts,
        "storage_dtype": "float16",
        "task_kind": kind,
        # resized to spatial_size (longest side), then padded/cropped: map_back() returns predictions to each image
        "resized": spatial is not None,
        # what made these tensors (train logs them to its MLflow run with its own params)
        "params": {**pp.model_dump(mode="json"), "class_names": class_names, "positive_class": positive_class,
                   "task_kind": kind},
    }
    (output / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return PreprocessResult(meta=meta, counts=counts)


def main(argv: list[str] | None = None) -> None:
    from tasks.config import HelpFormatter, load_params_or_exit
    from tasks.noise import silence_known_noise

    silence_known_noise()
    ap = argparse.ArgumentParser(prog="python -m tasks.preprocess", description=__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--params", default="params.yaml",
                    help="the params file; reads its preprocess group and base.class_names / base.positive_class")
    ap.add_argument("--task", default="classify",
                    help="the task (params.yaml `tasks`): its kind, and its overrides of the preprocess group")
    ap.add_argument("--input", type=Path, default=Path("data/ingested"),
                    help="ingest's output folder (the manifest and splits)")
    ap.add_argument("--output", type=Path, default=Path("data/preprocessed/classify"),
                    help="folder for the cached tensors (<split>_x.npy, <split>_y.npy, <split>_ids.csv) and meta.json")
    args = ap.parse_args(argv)
    params = load_params_or_exit(args.params, task=args.task)
    result = run(params.preprocess, args.input, args.output, params.base.class_names, params.base.positive_class,
                 params.task.kind)
    print(
        f"preprocess: {result.meta['spatial_dims']}D tensors {result.meta['input_shape']} "
        f"({result.meta['intensity']['kind']}), counts {result.counts} -> {args.output}"
    )


if __name__ == "__main__":
    main()
