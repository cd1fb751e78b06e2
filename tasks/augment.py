"""Batched 2D/3D training augmentation on torch tensors.

Why not MONAI's ``RandFlipd`` / ``RandAffined`` here: those transform one sample at a time in a Python loop, which
on a 2-core CPU costs more than the forward pass of a small 3D CNN. The same operations (random flips, a small
random affine resampled with ``affine_grid``/``grid_sample`` as MONAI's ``Affine`` does, intensity scale/shift
jitter) are applied here to a whole batch at once, with a seeded ``torch.Generator`` so training is repeatable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05


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


def augment_batch(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Randomly flip, rotate/scale/translate and intensity-jitter a batch.

    Args:
        x: float32 (B, C, H, W) or (B, C, D, H, W), values in [0, 1].
        gen: CPU generator that draws every random number (seeded by the caller).
        cfg: magnitudes.

    Returns:
        Tensor of the same shape and dtype, clipped to [0, 1].
    """
    b, spatial_dims = x.shape[0], x.ndim - 2
    # flips: one independent coin per sample and spatial axis, applied with where() to stay batched
    flips = torch.rand(b, spatial_dims, generator=gen) < cfg.flip_prob
    for axis in range(spatial_dims):
        mask = flips[:, axis].to(x.device).view(b, *([1] * (x.ndim - 1)))
        x = torch.where(mask, x.flip(2 + axis), x)
    # affine: rotation * isotropic scale, plus translation, in normalised coordinates
    n_angles = 1 if spatial_dims == 2 else 3
    angles = (torch.rand(b, n_angles, generator=gen) * 2 - 1) * math.radians(cfg.rotate_deg)
    scale = 1 + (torch.rand(b, 1, 1, generator=gen) * 2 - 1) * cfg.scale
    shift = (torch.rand(b, spatial_dims, 1, generator=gen) * 2 - 1) * cfg.translate * 2
    theta = torch.cat([_rotation(angles, spatial_dims) * scale, shift], dim=2).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # intensity jitter per sample
    view = (b, *([1] * (x.ndim - 1)))
    gain = 1 + (torch.rand(view, generator=gen) * 2 - 1) * cfg.intensity_scale
    bias = (torch.rand(view, generator=gen) * 2 - 1) * cfg.intensity_shift
    return (x * gain.to(x) + bias.to(x)).clamp_(0, 1)
