"""The spatial transforms preprocess applies to a segmentation task's images and masks, and their inverse.

Preprocess resizes each image (longest side to ``max(spatial_size)``, the same factor on every axis) and pads or crops
it to ``spatial_size`` (MONAI ``Resized`` + ``ResizeWithPadOrCropd``); the mask gets the same, nearest-neighbour.
:func:`map_back` returns a prediction at the model's resolution to its image's own grid with MONAI's inverse of the
same transforms, so evaluate scores on both grids and writes predictions where the image lives.
"""

from __future__ import annotations

import numpy as np

ORIGINAL_MASKS = "test_masks_original.npz"  # segmentation: each test mask on its image's own grid, by image_id
TEST_GEOMETRY = "test_geometry.json"  # segmentation: ingest's geometry of each test image (DICOM SEG of predictions)


def seg_spatial(spatial_size: list[int] | None, keys: tuple[str, ...] = ("image", "mask")) -> list:
    """The spatial part of preprocess's ``build_seg_transforms`` (also what :func:`map_back` inverts, on the mask
    alone): area resampling for ``image``, nearest-neighbour for ``mask``."""
    from monai import transforms as mt

    if spatial_size is None:
        return []
    modes = tuple("area" if k == "image" else "nearest-exact" for k in keys)
    return [
        mt.Resized(keys=list(keys), spatial_size=max(spatial_size), size_mode="longest", mode=modes),
        mt.ResizeWithPadOrCropd(keys=list(keys), spatial_size=spatial_size, mode="constant"),
    ]


def map_back(label_map: np.ndarray, orig_shape: list[int], spatial_size: list[int] | None) -> np.ndarray:
    """A label map at the model's resolution, returned to its image's original grid (nearest-neighbour).

    MONAI's own inverse of the preprocess spatial transforms: they are applied to a blank image of the original
    shape (recording what they did), and that record inverts the prediction (un-pad/crop, then resize back).

    Args:
        label_map: integer (*spatial_size) prediction.
        orig_shape: the ingested image's spatial shape (``{split}_ids.csv`` column ``orig_shape``).
        spatial_size: ``preprocess.spatial_size`` the data was made with (meta.json ``spatial_size`` when resized).

    Returns:
        uint8 (*orig_shape) label map.
    """
    import torch
    from monai import transforms as mt
    from monai.data import MetaTensor

    if spatial_size is None or list(label_map.shape) == list(orig_shape) and list(orig_shape) == list(spatial_size):
        return label_map.astype(np.uint8)
    spatial = mt.Compose(seg_spatial(list(spatial_size), keys=("mask",)))
    done = spatial({"mask": MetaTensor(torch.zeros((1, *orig_shape)))})
    pred = MetaTensor(torch.as_tensor(label_map[None].astype(np.float32)), meta=done["mask"].meta)
    pred.applied_operations = done["mask"].applied_operations
    back = spatial.inverse({"mask": pred})["mask"]
    out = np.asarray(back[0].detach().cpu().numpy()).round().astype(np.uint8)
    if list(out.shape) != list(orig_shape):
        raise RuntimeError(f"map_back: got {out.shape}, expected {orig_shape}")
    return out
