"""Fabricated preprocess outputs for stage tests that start after preprocess (train, evaluate, export)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


def make_preprocessed(out: Path, n: tuple[int, int, int] = (48, 16, 20), size: int = 16, spatial_dims: int = 2,
                      seed: int = 0) -> Path:
    """Write {split}_x/y.npy, {split}_ids.csv and meta.json: a bright square marks the positive class."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    shape = (1,) + (size,) * spatial_dims
    counts = {}
    for split, count in zip(("train", "val", "test"), n, strict=False):
        y = np.arange(count) % 2
        x = (rng.random((count, *shape)) * 0.5).astype(np.float16)
        sl = (slice(None), slice(None)) + (slice(size // 4, size // 2),) * spatial_dims
        xp = x[y == 1]
        xp[sl] += 0.4
        x[y == 1] = xp
        np.save(out / f"{split}_x.npy", x)
        np.save(out / f"{split}_y.npy", y.astype(np.int64))
        with (out / f"{split}_ids.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image_id", "patient_id", "label"])
            w.writerows([f"{split}{i}", f"p-{split}-{i // 2}", y[i]] for i in range(count))
        counts[split] = count
    meta = {
        "spatial_dims": spatial_dims, "in_channels": 1, "input_shape": list(shape), "num_classes": 2,
        "class_names": ["normal", "lesion"], "positive_class": 1, "spatial_size": [size] * spatial_dims,
        "intensity": {"kind": "hu_window", "center": 40.0, "width": 400.0, "a_min": -160.0, "a_max": 240.0},
        "source_spacing_mm": [0.7] * spatial_dims, "counts": counts, "storage_dtype": "float16",
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out
