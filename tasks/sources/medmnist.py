"""MedMNIST v2 / MedMNIST+ ``.npz`` files as a data source for ingest.

A file is found from an explicit path, or by its official name (``{flag}.npz`` for 28 px, ``{flag}_{size}.npz``
for 64/128/224) in the folder named by ``MEDMNIST_ROOT`` (the ``root`` of the ``medmnist`` package), or, where
the machine is online and the ``medmnist`` package is installed, through its download. The official
train/val/test splits are kept as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tasks.sources.records import ImageRecord

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)


class MedMNISTError(ValueError):
    """A MedMNIST file that cannot be found or used; the message says what to do."""


@dataclass(frozen=True)
class MedMNISTSplit:
    """One official split: images uint8 (N, C, *S) channel-first, labels int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray


def official_filename(flag: str, size: int) -> str:
    """``adrenalmnist3d`` + 64 -> ``adrenalmnist3d_64.npz`` (28 px files carry no suffix)."""
    if size not in SIZES:
        raise MedMNISTError(f"MedMNIST size {size} is not one of {SIZES}")
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def resolve(path: str | None, flag: str | None, size: int) -> Path:
    """Find the .npz that ``ingest.input`` should name (the benchmarks' ``--data`` / ``--dataset`` / ``--size``).

    Args:
        path: an explicit file; used as it is when given.
        flag: the MedMNIST flag (``adrenalmnist3d``, any case), looked up as its official file name.
        size: image side in pixels, one of :data:`SIZES`.

    Returns:
        ``path``, else ``$MEDMNIST_ROOT/<official name>`` (default root ``~/.medmnist``), else the file the
        ``medmnist`` package downloads there (online, with the package installed).

    Raises:
        MedMNISTError: naming the path looked at and where to put the file.
    """
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise MedMNISTError(f"MedMNIST file {p} does not exist")
        return p
    if not flag:
        raise MedMNISTError("give a MedMNIST flag (e.g. adrenalmnist3d) or the path of its .npz")
    name = official_filename(flag.lower(), size)
    root = Path(os.environ.get("MEDMNIST_ROOT", "~/.medmnist")).expanduser()
    if (root / name).exists():
        return root / name
    try:  # online, with the medmnist package: its own download (MD5-checked)
        import medmnist
        from medmnist import INFO

        cls = getattr(medmnist, INFO[flag.lower()]["python_class"])
        cls(split="test", size=size, root=str(root), download=True)
        if (root / name).exists():
            return root / name
    except Exception as exc:  # offline, package missing, unknown flag
        reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = "the download did not produce the file"
    raise MedMNISTError(
        f"MedMNIST file {name} not found in {root} and could not be downloaded ({reason}). "
        f"Put the official {name} there (or set MEDMNIST_ROOT to its folder, or give the file's path)."
    )


def load(path: Path) -> tuple[dict[str, MedMNISTSplit], dict[str, int]]:
    """Read an official MedMNIST .npz.

    Returns:
        ``({split: MedMNISTSplit}, info)`` with info = ``{"spatial_dims", "in_channels", "num_classes"}``.
        2D gray (N, H, W) and 3D (N, D, H, W) images get a channel axis; RGB (N, H, W, 3) becomes (N, 3, H, W).

    Raises:
        MedMNISTError: missing keys, or a multi-label set (ChestMNIST), which single-label training cannot use.
    """
    try:
        npz = np.load(path)
    except (OSError, ValueError) as exc:
        raise MedMNISTError(f"{path}: not a readable .npz ({exc})") from None
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
    if missing:
        raise MedMNISTError(f"{path}: missing arrays {missing} (expected the official MedMNIST layout)")
    splits: dict[str, MedMNISTSplit] = {}
    for s in SPLITS:
        images, labels = npz[f"{s}_images"], npz[f"{s}_labels"]
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise MedMNISTError(f"{path}: multi-label targets {labels.shape} are not supported (single-label only)")
        if images.ndim == 4 and images.shape[-1] == 3:  # 2D RGB
            images = np.moveaxis(images, -1, 1)
        else:  # 2D gray (N, H, W) or 3D (N, D, H, W)
            images = images[:, None]
        splits[s] = MedMNISTSplit(np.ascontiguousarray(images, dtype=np.uint8), labels.reshape(-1).astype(np.int64))
    all_labels = np.concatenate([sp.labels for sp in splits.values()])
    info = {
        "spatial_dims": splits["train"].images.ndim - 2,
        "in_channels": int(splits["train"].images.shape[1]),
        "num_classes": int(all_labels.max()) + 1,
    }
    return splits, info


def collect(path: Path, progress: bool = True) -> tuple[int, list[ImageRecord], list[str]]:
    """Read a MedMNIST file into ingest's image records, keeping the official splits.

    MedMNIST publishes no patient identifiers, so each image is its own pseudonymous "patient" (``mm-<split>-<i>``):
    the official splits are kept as published, and bootstrap intervals resample images.

    Args:
        path: the official ``.npz`` (``ingest.input``; :func:`resolve` finds one by name in ``$MEDMNIST_ROOT``).

    Returns:
        (images found, records with ``split`` and ``label`` set, warnings). ``pixels`` are uint8,
        (*S) for one channel or (C, *S) channel-first for RGB.
    """
    from tqdm import tqdm

    from tasks.sources.records import ImageRecord

    if not Path(path).is_file():
        raise MedMNISTError(f"ingest.input: {path} is not a file (give the official MedMNIST .npz)")
    splits, info = load(path)
    records: list[ImageRecord] = []
    total = sum(len(s.labels) for s in splits.values())
    bar = tqdm(total=total, desc=f"ingest: {path.name}", unit="img", disable=not progress)
    for split, data in splits.items():
        for i, (img, label) in enumerate(zip(data.images, data.labels, strict=True)):
            image_id = f"mm-{split}-{i:05d}"
            records.append(ImageRecord(
                image_id=image_id, patient_id=image_id, study_id=image_id, series_uid=image_id, study_date="",
                pixels=img[0] if info["in_channels"] == 1 else img, spacing=None, modality="MedMNIST",
                unit="uint8", files=[f"{path.name}#{split}/{i}"], label_value=None, label=int(label), split=split,
                channels=info["in_channels"],
            ))  # fmt: skip
            bar.update()
    bar.close()
    return total, records, []
