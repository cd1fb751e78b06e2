"""augment: the batched training augmentation keeps shape, dtype and range, is repeatable under a seeded generator,
and is the identity when every magnitude is zero."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tasks.config import Params
from tasks.models.augment import augment_batch
from tasks.schema import AugmentParams

SHAPES = {"2d": (16, 1, 16, 16), "3d": (8, 2, 8, 10, 12)}  # (B, C, *S); 3D with 2 channels and unequal axes
OFF = {"flip_prob": 0.0, "affine_prob": 0.0, "intensity_scale": 0.0, "intensity_shift": 0.0}


@pytest.fixture()
def augmentation(make_params: Callable[..., Params]) -> Callable[..., AugmentParams]:
    """``augmentation(flip_prob=1.0)``: params.yaml's ``train.augmentation`` with these keys overridden."""

    def _make(**over: Any) -> AugmentParams:
        return make_params({f"train.augmentation.{k}": v for k, v in over.items()}).train.augmentation

    return _make


def _batch(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dims", SHAPES)
def test_shape_dtype_and_range_are_kept(dims: str, augmentation: Callable[..., AugmentParams]) -> None:
    # strong magnitudes (gain up to 1.9, offset up to +-0.5) on a batch whose first half is all ones: an unclipped
    # result would leave [0, 1] in about half of those samples
    cfg = augmentation(flip_prob=0.5, affine_prob=1.0, intensity_scale=0.9, intensity_shift=0.5)
    x = _batch(SHAPES[dims])
    x[: len(x) // 2] = 1.0
    before = x.clone()
    out = augment_batch(x, _gen(0), cfg)
    assert out.shape == x.shape and out.dtype == x.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)
    assert torch.equal(x, before), "the input batch is not modified in place"


@pytest.mark.parametrize("dims", SHAPES)
def test_same_seed_same_batch_other_seed_other_batch(dims: str, augmentation: Callable[..., AugmentParams]) -> None:
    cfg = augmentation()  # params.yaml's magnitudes
    x = _batch(SHAPES[dims])
    a, b, c = (augment_batch(x, _gen(s), cfg) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dims", SHAPES)
def test_zero_magnitudes_are_the_identity(dims: str, augmentation: Callable[..., AugmentParams]) -> None:
    x = _batch(SHAPES[dims])
    # rotation, scale and translation stay at params.yaml's values: affine_prob 0 must switch them off
    assert torch.equal(augment_batch(x, _gen(3), augmentation(**OFF)), x)


@pytest.mark.parametrize("dims", SHAPES)
def test_flip_prob_one_flips_every_spatial_axis(dims: str, augmentation: Callable[..., AugmentParams]) -> None:
    x = _batch(SHAPES[dims])
    out = augment_batch(x, _gen(3), augmentation(**{**OFF, "flip_prob": 1.0}))
    assert torch.equal(out, x.flip(list(range(2, x.ndim))))


@pytest.mark.parametrize("dims", SHAPES)
def test_an_identity_affine_resamples_to_the_input(dims: str, augmentation: Callable[..., AugmentParams]) -> None:
    # every sample warped, by a zero rotation, unit scale and zero shift: the resampler's grid is the pixel grid
    cfg = augmentation(**{**OFF, "affine_prob": 1.0, "rotate_deg": 0.0, "scale": 0.0, "translate": 0.0})
    x = _batch(SHAPES[dims])
    torch.testing.assert_close(augment_batch(x, _gen(3), cfg), x, atol=1e-5, rtol=0)


def test_the_default_augments_only_some_samples(augmentation: Callable[..., AugmentParams]) -> None:
    """affine_prob 0.5 and flip_prob 0.5 leave a sample untouched in geometry with probability 1/2 * 1/4; with
    intensity jitter off, such samples come back unchanged while the others do not."""
    x = _batch((64, 1, 16, 16))
    out = augment_batch(x, _gen(0), augmentation(intensity_scale=0.0, intensity_shift=0.0))
    unchanged = [bool(torch.equal(o, i)) for o, i in zip(out, x, strict=True)]
    assert 0 < sum(unchanged) < len(unchanged)
