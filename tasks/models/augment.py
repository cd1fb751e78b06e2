"""Batched 2D/3D training augmentation on torch tensors.

Why not MONAI's ``RandFlipd`` / ``RandAffined`` dictionary transforms here: they transform one sample at a time in
a Python loop, which on a 2-core CPU costs more than the forward pass of a small 3D CNN. The same operations are
applied to a whole batch at once instead: random flips, a small random rotation/scale/shift resampled by MONAI's
batched :class:`monai.networks.layers.AffineTransform`, and intensity scale/shift jitter, all drawn from a seeded
``torch.Generator`` so that training is repeatable.

Segmentation: label maps passed as ``masks`` get the same flips and the same affine, resampled nearest-neighbour
(labels stay labels), and no intensity jitter. Masks draw no random numbers of their own, so a batch without masks
sees exactly the draws it saw before masks existed.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import overload

import torch

from tasks.schema import AugmentParams


def _rotation(angles: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Rotation matrices (B, d, d) from angles (B, 1) in 2D or (B, 3) in 3D (radians)."""
    b = angles.shape[0]
    if spatial_dims == 2:
        c, s = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    rot = torch.eye(3).expand(b, 3, 3)
    for axis in range(3):
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        m = torch.eye(3).repeat(b, 1, 1)
        i, j = [k for k in range(3) if k != axis]
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
        rot = rot @ m
    return rot


@lru_cache(maxsize=2)
def _warp(mode: str = "bilinear"):
    """MONAI's batched affine resampler, ``theta`` (B, d, d+1) in normalised [-1, 1] coordinates.

    ``mode``: ``bilinear`` for images, ``nearest`` for label maps. Outside the field of view: zeros (background).
    """
    from monai.networks.layers import AffineTransform

    return AffineTransform(normalized=True, reverse_indexing=False, align_corners=False, mode=mode,
                           padding_mode="zeros")


def _warp_masks(masks: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resampling of integer label maps (B, *S) with the images' ``theta``; same dtype back."""
    return _warp("nearest")(masks.unsqueeze(1).float(), theta)[:, 0].round().to(masks.dtype)


@overload
def augment_batch(x: torch.Tensor, gen: torch.Generator, cfg: AugmentParams, masks: None = None) -> torch.Tensor: ...
@overload
def augment_batch(x: torch.Tensor, gen: torch.Generator, cfg: AugmentParams,
                  masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
def augment_batch(x: torch.Tensor, gen: torch.Generator, cfg: AugmentParams,
                  masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Randomly flip, rotate/scale/translate and intensity-jitter a batch (and the same geometry on its masks).

    Args:
        x: float32 (B, C, H, W) or (B, C, D, H, W), values in [0, 1].
        gen: CPU generator that draws every random number (seeded by the caller).
        cfg: magnitudes (``train.augmentation``).
        masks: optional integer label maps (B, H, W) or (B, D, H, W) aligned with ``x``: flipped and warped with
            the same draws, nearest-neighbour, background (0) where the warp leaves the field of view.

    Returns:
        ``x`` augmented: same shape and dtype, clipped to [0, 1]; with ``masks``: ``(x, masks)``, masks with
        their shape and integer dtype. Neither input is modified in place.
    """
    b, spatial_dims = x.shape[0], x.ndim - 2
    if masks is not None:
        if masks.shape != (b, *x.shape[2:]):
            raise ValueError(f"augment_batch: masks {tuple(masks.shape)} do not match images {tuple(x.shape)} "
                             "(expected (B, *S) label maps)")
        if masks.is_floating_point():
            raise ValueError(f"augment_batch: masks must be integer label maps, got {masks.dtype}")
        masks = masks.clone()
    # flips: one independent coin per sample and spatial axis, applied to the selected samples only
    flips = (torch.rand(b, spatial_dims, generator=gen) < cfg.flip_prob).to(x.device)
    x = x.clone()
    for axis in range(spatial_dims):
        if bool(flips[:, axis].any()):
            x[flips[:, axis]] = x[flips[:, axis]].flip(2 + axis)
            if masks is not None:
                masks[flips[:, axis]] = masks[flips[:, axis]].flip(1 + axis)
    # affine: rotation * isotropic scale, plus translation, in normalised coordinates
    n_angles = 1 if spatial_dims == 2 else 3
    angles = (torch.rand(b, n_angles, generator=gen) * 2 - 1) * math.radians(cfg.rotate_deg)
    scale = 1 + (torch.rand(b, 1, 1, generator=gen) * 2 - 1) * cfg.scale
    shift = (torch.rand(b, spatial_dims, 1, generator=gen) * 2 - 1) * cfg.translate * 2
    theta = torch.cat([_rotation(angles, spatial_dims) * scale, shift], dim=2).to(x)
    # resampling is the one costly step (~10% of a small 3D CNN's training step): only affine_prob of the batch
    warp = (torch.rand(b, generator=gen) < cfg.affine_prob).to(x.device)
    if bool(warp.all()):
        x = _warp()(x, theta)
        if masks is not None:
            masks = _warp_masks(masks, theta.to(x))
    elif bool(warp.any()):
        x = x.clone()
        x[warp] = _warp()(x[warp], theta[warp])
        if masks is not None:
            masks[warp] = _warp_masks(masks[warp], theta[warp])
    # intensity jitter per sample (images only)
    view = (b, *([1] * (x.ndim - 1)))
    gain = 1 + (torch.rand(view, generator=gen) * 2 - 1) * cfg.intensity_scale
    bias = (torch.rand(view, generator=gen) * 2 - 1) * cfg.intensity_shift
    x = (x * gain.to(x) + bias.to(x)).clamp_(0, 1)
    return x if masks is None else (x, masks)
