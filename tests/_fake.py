"""Fabricated stage outputs for tests that start after preprocess (train, evaluate, export, promote)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from tasks.models.networks import ModelSpec

SPEC_2D = ModelSpec("cnn", "resnet10", 2, 1, 2, (1, 32, 32), ("normal", "lesion"))
# what train records in provenance.json; fabricated models carry these fixed values
PROVENANCE = {"params_hash": "0123456789ab", "data_hash": "sha256:0123456789abcdef"}


def make_preprocessed(out: Path, n: tuple[int, int, int] = (48, 16, 20), size: int = 16, spatial_dims: int = 2,
                      seed: int = 0) -> Path:
    """Write {split}_x/y.npy, {split}_ids.csv and meta.json as preprocess does: a bright square marks the positive
    class (label 1) on uniform noise in [0, 0.5); two images per patient; labels alternate 0, 1, 0, 1, ...

    Args:
        out: the folder (created). n: images in train, val and test. size: pixels per spatial axis.
        spatial_dims: 2 (C, H, W) or 3 (C, D, H, W). seed: the noise; labels and shapes do not depend on it.
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    shape = (1,) + (size,) * spatial_dims
    counts = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
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


def make_trained(root: Path, spec: ModelSpec = SPEC_2D, val_auc: float = 0.8, seed: int = 0,
                 experiment: str = "medpipe-test") -> Path:
    """Write what train leaves in ``<root>/model`` (model.json, model.pt with fresh weights from ``seed``,
    val_metrics.json, provenance.json) and open its MLflow run in the current tracking store, tagged with the
    weights' hash as train tags it (later stages find the run by that hash). Returns the model folder."""
    import torch

    from tasks import tracking
    from tasks.models.networks import build_model, weights_hash

    out = root / "model"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(build_model(spec).state_dict(), out / "model.pt")
    spec.save(out / "model.json")
    (out / "val_metrics.json").write_text(json.dumps({"val_auc": val_auc, "val_accuracy": 0.7, "val_f1": 0.6}))
    (out / "provenance.json").write_text(json.dumps(PROVENANCE))
    rid = tracking.start_run(experiment, "test", {"model_family": spec.family}, {"train.arch": spec.arch})
    tracking.tag_model(rid, weights_hash(out))
    return out
