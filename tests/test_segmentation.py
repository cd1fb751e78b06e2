"""Segmentation: the MONAI networks (2D/3D) and their spec, joint image/mask augmentation, SegFit (learns, resumes,
repeats), and the segmentation and detection metrics on cases whose answers are known by hand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tasks.config import Params, load_params
from tasks.models.augment import augment_batch
from tasks.models.fit import FitState, Splits, configure_torch
from tasks.models.networks import ModelSpec, build_model, predict_seg_proba
from tasks.models.segfit import SegFit, crop_patches, seg_model_spec
from tasks.schema import AugmentParams, TrainParams
from tasks.segmetrics import (
    detection_metrics,
    dice_per_class,
    lesion_instances,
    segmentation_metrics,
)

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("unet", "basicunet", "segresnet", "dynunet")
SIZES = {2: (32, 32), 3: (16, 32, 32)}  # BasicUNet: divisible by 16 (it downsamples 4x), > 1 voxel at 1/16


def _spec(arch: str, dims: int, num_classes: int = 3) -> ModelSpec:
    return ModelSpec(family="cnn", arch=arch, spatial_dims=dims, in_channels=1, num_classes=num_classes,
                     input_shape=(1, *SIZES[dims]), class_names=("background", "lung", "lesion")[:num_classes],
                     channels=(8, 16, 32))  # fmt: skip


# -- networks ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("arch", ARCHS)
def test_network_maps_images_to_per_class_logits(arch: str, dims: int, tmp_path: Path) -> None:
    spec = replace(_spec(arch, dims), roi_size=(8,) * dims)
    assert spec.task_kind == "segmentation" and spec.is_segmentation
    torch.manual_seed(0)
    model = build_model(spec).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, *SIZES[dims]))
    assert tuple(out.shape) == (2, 3, *SIZES[dims])
    spec.save(tmp_path / "model.json")
    assert ModelSpec.load(tmp_path / "model.json") == spec  # channels, task kind and roi_size round-trip


def test_spec_infers_task_kind_and_rejects_a_contradiction(tmp_path: Path) -> None:
    clf = ModelSpec(family="cnn", arch="resnet18", spatial_dims=2, in_channels=1, num_classes=2, input_shape=(1, 8, 8))
    assert clf.task_kind == "classification" and not clf.is_segmentation
    # a model.json written before segmentation existed has neither channels nor task_kind
    (tmp_path / "model.json").write_text('{"family": "cnn", "arch": "resnet18", "spatial_dims": 2, "in_channels": 1, '
                                         '"num_classes": 2, "input_shape": [1, 8, 8]}')
    assert ModelSpec.load(tmp_path / "model.json") == clf
    with pytest.raises(ValueError, match="segmentation network"):
        ModelSpec(family="cnn", arch="unet", spatial_dims=2, in_channels=1, num_classes=2, input_shape=(1, 8, 8),
                  task_kind="classification")


@pytest.mark.parametrize("dims, roi", [(2, None), (2, (16, 16)), (3, None), (3, (8, 8, 8))])
def test_predict_seg_proba_is_a_softmax_over_the_whole_image(dims: int, roi: tuple[int, ...] | None) -> None:
    spec = _spec("unet", dims)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = np.random.default_rng(0).random((3, 1, *SIZES[dims])).astype(np.float16)
    proba = predict_seg_proba(model, spec, x, batch_size=2, roi_size=roi)
    assert proba.shape == (3, 3, *SIZES[dims]) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    if roi is None and dims == 2:  # the whole-image path equals the network's own softmax
        with torch.no_grad():
            ref = torch.softmax(model(torch.as_tensor(x[:1]).float()), 1).numpy()
        np.testing.assert_allclose(proba[:1], ref, atol=1e-5)  # batch of 2 vs 1: float noise


# -- augmentation with masks ---------------------------------------------------------------------------------------
@pytest.fixture()
def augmentation(make_params: Callable[..., Params]) -> Callable[..., AugmentParams]:
    def _make(**over: Any) -> AugmentParams:
        return make_params({f"train.augmentation.{k}": v for k, v in over.items()}).train.augmentation

    return _make


def _shapes(b: int, size: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Label maps (B, *S): an off-centre box (label 1) and a smaller box (label 2) inside it, per sample."""
    rng = np.random.default_rng(seed)
    m = np.zeros((b, *size), np.uint8)
    for i in range(b):
        lo = rng.integers(2, 6, len(size))
        m[(i, *(slice(a, a + s // 2) for a, s in zip(lo, size, strict=True)))] = 1
        m[(i, *(slice(a + 2, a + 5) for a in lo))] = 2
    return torch.from_numpy(m)


@pytest.mark.parametrize("dims", (2, 3))
def test_masks_follow_their_images(dims: int, augmentation: Callable[..., AugmentParams]) -> None:
    size = (24, 24) if dims == 2 else (12, 16, 16)
    masks = _shapes(8, size)
    x = (masks.float() / 2).unsqueeze(1)  # the image is its label map: 0, 0.5, 1
    cfg = augmentation(flip_prob=0.5, affine_prob=1.0, rotate_deg=20.0, scale=0.15, translate=0.1,
                       intensity_scale=0.0, intensity_shift=0.0)  # fmt: skip
    out_x, out_m = augment_batch(x, torch.Generator().manual_seed(3), cfg, masks=masks)
    assert out_m.dtype == torch.uint8 and out_m.shape == masks.shape
    assert set(out_m.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(out_m, masks), "the masks were transformed"
    # bilinear image vs nearest-neighbour mask: they disagree only on a thin rim at label edges
    agree = (torch.round(out_x[:, 0] * 2).to(torch.uint8) == out_m).float().mean()
    assert agree > 0.95, f"image and mask agree on {float(agree):.3f} of voxels only"
    # a mask that did not follow its image (the untransformed one) would disagree far more
    assert (torch.round(out_x[:, 0] * 2).to(torch.uint8) == masks).float().mean() < agree - 0.1


@pytest.mark.parametrize("dims", (2, 3))
def test_masks_draw_no_random_numbers(dims: int, augmentation: Callable[..., AugmentParams]) -> None:
    size = (24, 24) if dims == 2 else (12, 16, 16)
    masks = _shapes(6, size)
    x = torch.rand((6, 1, *size), generator=torch.Generator().manual_seed(1))
    cfg = augmentation(affine_prob=0.5)  # some samples warped, some not: both code paths
    alone = augment_batch(x, torch.Generator().manual_seed(5), cfg)
    with_masks, _ = augment_batch(x, torch.Generator().manual_seed(5), cfg, masks=masks)
    assert torch.equal(alone, with_masks)
    with pytest.raises(ValueError, match="integer label maps"):
        augment_batch(x, torch.Generator().manual_seed(5), cfg, masks=masks.float())


# -- SegFit ---------------------------------------------------------------------------------------------------------
def _seg_train_params(**over: Any) -> TrainParams:
    """params.yaml's segment task's ``train`` group, shrunk: 8 epochs of a 3-level UNet on 32x32 disks."""
    base = {"epochs": 8, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0, "ema": 0.9, "num_threads": 2,
            "seg": {"channels": [8, 16, 32]}}  # fmt: skip
    overrides = {f"tasks.segment.train.{k}": v for k, v in {**base, **over}.items()}
    return load_params(REPO / "params.yaml", overrides, task="segment").train


def _disks(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images (N, 1, S, S) of one bright disk each, and the disks as label maps (N, S, S) int64."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    x, m = np.zeros((n, 1, size, size), np.float32), np.zeros((n, size, size), np.int64)
    for i in range(n):
        r = rng.uniform(4, 8)
        cy, cx = rng.uniform(r + 1, size - r - 1, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        m[i] = disk
        x[i, 0] = np.clip(0.2 + 0.5 * disk + rng.normal(0, 0.08, (size, size)), 0, 1)
    return torch.from_numpy(x), torch.from_numpy(m)


@pytest.fixture(scope="module")
def disk_data() -> Splits:
    x, m = _disks(40)
    y = torch.zeros(40, dtype=torch.long)  # image labels are not used by segmentation
    return Splits(x[:32], y[:32], x[32:], y[32:], {}, train_m=m[:32], val_m=m[32:])


def _job(tp: TrainParams, data: Splits, ckpt_dir: Path, seed: int = 0) -> SegFit:
    meta = {"spatial_dims": 2, "input_shape": [1, 32, 32], "num_classes": 2, "class_names": ["background", "disk"]}
    device = configure_torch(seed, tp)  # seeds the weights' initialisation too
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return SegFit(tp, seg_model_spec(tp, meta), data, seed, 0, device, ckpt_dir, "fingerprint")


def _fit(tp: TrainParams, data: Splits, ckpt_dir: Path, seed: int = 0) -> FitState:
    job = _job(tp, data, ckpt_dir, seed)
    return job.fit(0, lambda rec: None, {})


@pytest.fixture(scope="module")
def trained(disk_data: Splits, tmp_path_factory: pytest.TempPathFactory) -> FitState:
    return _fit(_seg_train_params(), disk_data, tmp_path_factory.mktemp("segfit"))


def test_untrained_network_misses_the_floor(disk_data: Splits, tmp_path: Path) -> None:
    val, pred = _job(_seg_train_params(), disk_data, tmp_path).validate()
    assert val["dice"] < 0.3, val
    assert pred.shape == (8, 32, 32)


def test_segfit_learns_disks(trained: FitState) -> None:
    assert trained.best_val["val_dice"] > 0.7, trained.best_val
    assert set(trained.best_val) == {"val_dice", "val_dice_disk", "val_loss"}
    assert len(trained.history) == 8 and {"train_loss", "val_dice", "val_loss", "lr"} <= set(trained.history[0])
    # selection picked the best validation Dice of all epochs
    assert trained.best_val["val_dice"] == max(r["val_dice"] for r in trained.history)


def test_same_seed_same_dice(trained: FitState, disk_data: Splits, tmp_path: Path) -> None:
    again = _fit(_seg_train_params(), disk_data, tmp_path)
    assert [r["val_dice"] for r in again.history] == [r["val_dice"] for r in trained.history]
    other = _fit(_seg_train_params(epochs=2), disk_data, tmp_path / "other", seed=1)
    assert [r["val_dice"] for r in other.history] != [r["val_dice"] for r in trained.history[:2]]


def test_resume_after_interruption_gives_the_uninterrupted_result(trained: FitState, disk_data: Splits,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    class Interrupted(Exception):
        pass

    def stop_at_3(rec: dict[str, float]) -> None:
        if rec["epoch"] == 3:
            raise Interrupted

    tp = _seg_train_params()
    with pytest.raises(Interrupted):
        _job(tp, disk_data, tmp_path).fit(0, stop_at_3, {})  # checkpoint after epoch 2
    job = _job(tp, disk_data, tmp_path, seed=0)
    assert job.resume() is not None and job.state.resumed_from == 2
    state = job.fit(job.state.resumed_from, lambda rec: None, {})
    assert [r["val_dice"] for r in state.history] == [r["val_dice"] for r in trained.history]
    assert state.best_epoch == trained.best_epoch
    for k, v in trained.best_state.items():
        assert torch.equal(state.best_state[k], v), k


@pytest.mark.slow
def test_segfit_3d_validates_with_a_sliding_window(tmp_path: Path) -> None:
    # two labels (a box and a smaller box inside it) in 16x32x32 volumes; validation windows of 8x16x16
    masks = _shapes(6, (16, 32, 32)).long()
    x = (masks.float() / 2).unsqueeze(1)
    y = torch.zeros(6, dtype=torch.long)
    data = Splits(x[:4], y[:4], x[4:], y[4:], {}, train_m=masks[:4], val_m=masks[4:])
    tp = _seg_train_params(epochs=2, batch_size=2, seg={"channels": [8, 16], "roi_size": [8, 16, 16]},
                           select_metric="loss")  # fmt: skip
    meta = {"spatial_dims": 3, "input_shape": [1, 16, 32, 32], "num_classes": 3,
            "class_names": ["background", "lung", "lesion"]}  # fmt: skip
    spec = seg_model_spec(tp, meta)
    assert spec.roi_size == (8, 16, 16) and spec.channels == (8, 16)  # train.seg goes into model.json
    job = SegFit(tp, spec, data, 0, 0, configure_torch(0, tp), tmp_path, "fingerprint")
    assert job.channels_last  # the 3D CPU layout of TorchFit
    state = job.fit(0, lambda rec: None, {})
    assert len(state.history) == 2
    assert set(state.best_val) == {"val_dice", "val_dice_lung", "val_dice_lesion", "val_loss"}
    assert all(0 <= state.history[-1][f"val_dice_{c}"] <= 1 for c in ("lung", "lesion"))
    # selection on loss: the kept epoch has the lowest validation loss
    assert state.best_val["val_loss"] == min(r["val_loss"] for r in state.history)


def test_bf16_precision_runs_the_forward_in_bfloat16_and_learns(disk_data: Splits, tmp_path: Path) -> None:
    job = _job(_seg_train_params(precision="bf16"), disk_data, tmp_path)
    dtypes: set[torch.dtype] = set()
    job.model.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    state = job.fit(0, lambda rec: None, {})
    assert torch.bfloat16 in dtypes  # the training forwards ran under autocast
    assert all(v.dtype == torch.float32 for v in state.best_state.values() if v.is_floating_point())
    assert state.best_val["val_dice"] > 0.7, state.best_val


def test_voxel_accuracy_is_the_argmax_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 3, (4, 1, 16, 16), generator=gen)
    job = SegFit.__new__(SegFit)  # correct() reads nothing of the job
    expected = float((logits.argmax(1) == target[:, 0]).float().mean()) * 4
    assert job.correct(logits, target) == pytest.approx(expected)


def test_patches_crop_image_and_mask_alike_and_find_the_foreground() -> None:
    masks = torch.zeros(6, 16, 32, 32, dtype=torch.uint8)
    masks[:5, 10:13, 20:24, 4:8] = 1  # a small lesion; the last volume has none
    x = torch.rand(6, 1, 16, 32, 32) * 0.5 + masks.unsqueeze(1).float()  # the image shows its mask
    xp, mp = crop_patches(x, masks, (8, 16, 16), pos_fraction=1.0, gen=torch.Generator().manual_seed(0))
    assert xp.shape == (6, 1, 8, 16, 16) and mp.shape == (6, 8, 16, 16) and mp.dtype == torch.uint8
    assert type(xp) is torch.Tensor and type(mp) is torch.Tensor  # no MONAI MetaTensor into the training step
    assert torch.equal((xp[:, 0] >= 1).to(torch.uint8), mp)  # the same crop of image and mask
    assert all(bool(mp[i].any()) for i in range(5))  # pos_fraction 1: every patch holds lesion voxels
    assert not mp[5].any()  # no foreground: a crop anywhere, no error
    again = crop_patches(x, masks, (8, 16, 16), pos_fraction=1.0, gen=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], xp)  # seeded by the job's generator: reproducible
    none = crop_patches(x, masks, (8, 16, 16), pos_fraction=0.0, gen=torch.Generator().manual_seed(0))[1]
    assert int(none.sum()) < int(mp.sum())  # background-centred crops mostly miss the small lesion


@pytest.mark.slow
def test_segfit_3d_trains_on_patches_and_validates_whole_volumes(tmp_path: Path) -> None:
    masks = _shapes(6, (16, 32, 32)).long()
    x = (masks.float() / 2).unsqueeze(1)
    y = torch.zeros(6, dtype=torch.long)
    data = Splits(x[:4], y[:4], x[4:], y[4:], {}, train_m=masks[:4], val_m=masks[4:])
    over = {"epochs": 2, "batch_size": 2, "ema": 0.9, "num_threads": 2,
            "seg": {"channels": [8, 16], "patch_size": [8, 16, 16]}}
    tp = load_params(REPO / "params.yaml", {"tasks.segment.preprocess.spatial_size": [16, 32, 32],
                                            **{f"tasks.segment.train.{k}": v for k, v in over.items()}},
                     task="segment").train  # fmt: skip
    meta = {"spatial_dims": 3, "input_shape": [1, 16, 32, 32], "num_classes": 3,
            "class_names": ["background", "lung", "lesion"]}  # fmt: skip
    spec = seg_model_spec(tp, meta)
    assert spec.roi_size == (8, 16, 16)  # validation and inference window = the training patch
    job = SegFit(tp, spec, data, 0, 0, configure_torch(0, tp), tmp_path, "fingerprint")
    xb, mb = job.batch(torch.arange(2))
    assert xb.shape == (2, 1, 8, 16, 16) and mb.shape == (2, 1, 8, 16, 16)
    state = job.fit(0, lambda rec: None, {})
    assert len(state.history) == 2 and np.isfinite(state.history[-1]["val_dice"])


def test_patch_larger_than_the_image_fails_naming_the_key() -> None:
    from tasks.config import ParamsError

    over = {"tasks.segment.train.seg.patch_size": [96, 96]}  # the segment task preprocesses to 128x128: fine
    load_params(REPO / "params.yaml", over, task="segment")
    with pytest.raises(ParamsError, match=r"tasks\.segment\.train\.seg\.patch_size"):
        load_params(REPO / "params.yaml", {"tasks.segment.train.seg.patch_size": [96, 256]}, task="segment")
    with pytest.raises(ParamsError, match=r"tasks\.segment\.train\.seg\.patch_size"):
        load_params(REPO / "params.yaml", {"tasks.segment.train.seg.patch_size": [8, 64, 64]}, task="segment")


def test_segfit_refuses_a_classification_select_metric(disk_data: Splits, tmp_path: Path) -> None:
    tp = _seg_train_params().model_copy(update={"select_metric": "auc"})
    with pytest.raises(ValueError, match="train.select_metric"):
        _job(tp, disk_data, tmp_path)


# -- segmentation metrics ------------------------------------------------------------------------------------------
def _box(shape: tuple[int, ...], lo: tuple[int, ...], size: int, label: int = 1) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(a, a + size) for a in lo)] = label
    return m


@pytest.mark.parametrize("shape", [(32, 32), (20, 20, 20)])
def test_perfect_prediction(shape: tuple[int, ...]) -> None:
    truth = _box(shape, (4,) * len(shape), 8) + _box(shape, (6,) * len(shape), 3)  # lung 1 with lesion 2 in it
    cases, means = segmentation_metrics(truth[None], truth[None], ["background", "lung", "lesion"])
    for c in ("lung", "lesion"):
        assert cases[0][f"dice_{c}"] == pytest.approx(1.0) and cases[0][f"iou_{c}"] == pytest.approx(1.0)
        assert cases[0][f"hd95_{c}"] == 0.0 and cases[0][f"surface_dice_{c}"] == pytest.approx(1.0)
    assert means["dice"] == pytest.approx(1.0) and means["n_cases"] == 1


@pytest.mark.parametrize("shift", [1, 2, 4])
def test_shifted_square_has_its_known_overlap(shift: int) -> None:
    size = 10
    truth, pred = _box((32, 32), (10, 10), size), _box((32, 32), (10 + shift, 10), size)
    cases, _ = segmentation_metrics(pred[None], truth[None], ["background", "x"])
    assert cases[0]["iou_x"] == pytest.approx((size - shift) / (size + shift), abs=1e-6)
    assert cases[0]["dice_x"] == pytest.approx((size - shift) / size, abs=1e-6)
    assert 0 < cases[0]["hd95_x"] <= shift
    # HD95 in mm: half-millimetre voxels halve it
    mm, _ = segmentation_metrics(pred[None], truth[None], ["background", "x"], spacing=(0.5, 0.5))
    assert mm[0]["hd95_x"] == pytest.approx(cases[0]["hd95_x"] / 2)


def test_empty_class_conventions() -> None:
    shape = (16, 16)
    empty, square = np.zeros(shape, np.uint8), _box(shape, (4, 4), 6)
    pred = np.stack([empty, square, empty])  # case 0: both empty; 1: false positive; 2: missed
    truth = np.stack([empty, empty, square])
    cases, means = segmentation_metrics(pred, truth, ["background", "lesion"])
    assert [c["dice_lesion"] for c in cases] == [1.0, 0.0, 0.0]
    assert [c["surface_dice_lesion"] for c in cases] == [1.0, 0.0, 0.0]
    assert cases[0]["hd95_lesion"] == 0.0 and np.isnan(cases[1]["hd95_lesion"]) and np.isnan(cases[2]["hd95_lesion"])
    assert means["hd95_undefined_lesion"] == 2 and means["hd95_lesion"] == 0.0
    assert means["dice_lesion"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(dice_per_class(pred, truth, 2)[:, 0], [1.0, 0.0, 0.0])


def test_bootstrap_over_groups() -> None:
    """The per-case CIs evaluate_seg reports: tasks.metrics.bootstrap_mean_ci, resampling patients."""
    from tasks.metrics import bootstrap_mean_ci

    assert bootstrap_mean_ci(np.full(4, 0.5), ["0", "1", "2", "3"], 200, 0.95, 0) == (0.5, 0.5)
    lo, hi = bootstrap_mean_ci(np.array([0.2, 0.4, 0.6, 0.8]), ["a", "a", "b", "b"], 200, 0.95, 0)
    # two patients: every resample is patient a's mean, b's mean, or their average
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.7)
    # an undefined value (NaN HD95) is left out of the mean, not counted as 0
    lo, hi = bootstrap_mean_ci(np.array([1.0, np.nan, 1.0]), ["a", "b", "c"], 200, 0.95, 0)
    assert (lo, hi) == (1.0, 1.0)


# -- detection -----------------------------------------------------------------------------------------------------
def test_lesion_instances_filter_and_score() -> None:
    p = np.zeros((2, 32, 32), np.float32)
    p[1, 2:8, 2:8] = 0.6
    p[1, 4, 4] = 0.9
    p[1, 20:22, 20:22] = 0.95  # 4 voxels: below min_voxels
    found = lesion_instances(p, min_voxels=10, score="max", channel=1)
    assert len(found) == 1 and found[0].score == pytest.approx(0.9)
    assert found[0].box.tolist() == [2, 2, 8, 8] and found[0].mask.sum() == 36
    mean = lesion_instances(p[1], min_voxels=10, score="mean")[0].score
    assert mean == pytest.approx((35 * 0.6 + 0.9) / 36)
    assert len(lesion_instances(p[1], min_voxels=1)) == 2


def _square(shape: tuple[int, int], r: int, c: int, s: int = 10) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r : r + s, c : c + s] = True
    return m


def test_detection_ap_and_froc_on_known_maps() -> None:
    shape = (64, 64)
    # image 1: lesions A (5,5) and B (40,40); detections: A exactly (0.9), a false positive (0.8); B missed
    # image 2: lesion C (20,20); detections: C shifted 4 px (box IoU 60/140 = 0.43; centre inside C) (0.7) and a
    # false positive (0.95)
    t1, t2 = _square(shape, 5, 5) | _square(shape, 40, 40), _square(shape, 20, 20)
    p1, p2 = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    p1[_square(shape, 5, 5)], p1[_square(shape, 5, 40)] = 0.9, 0.8
    p2[_square(shape, 20, 24)], p2[_square(shape, 45, 5)] = 0.7, 0.95
    preds = [lesion_instances(p1), lesion_instances(p2)]
    out = detection_metrics(preds, [t1, t2], iou_thresholds=(0.5, 0.3), fp_rates=(0.5, 1, 2))
    assert (out["n_images"], out["n_lesions"], out["n_detections"]) == (2, 3, 4)
    # by score: FP, TP(A), FP, C; 101-point interpolated AP. IoU 0.5: C is a FP -> precision 1/2 up to recall 1/3
    assert out["ap50"] == pytest.approx(0.5 * 34 / 101)
    # IoU 0.3: C is a TP -> precision 1/2 up to recall 2/3 (recall points 0.00..0.66)
    assert out["ap30"] == pytest.approx(0.5 * 67 / 101)
    # FROC: 0.5 FP/image reaches A only; 1 FP/image reaches A and C (2 of 3 lesions)
    assert out["sens_at_0.5fp"] == pytest.approx(1 / 3)
    assert out["sens_at_1fp"] == pytest.approx(2 / 3) and out["sens_at_2fp"] == pytest.approx(2 / 3)


def test_detection_in_3d_and_without_lesions() -> None:
    shape = (16, 16, 16)
    truth = np.zeros(shape, bool)
    truth[4:10, 4:10, 4:10] = True
    prob = truth.astype(np.float32) * 0.8
    out = detection_metrics([lesion_instances(prob)], [truth])
    assert out["ap50"] == pytest.approx(1.0) and out["sens_at_1fp"] == pytest.approx(1.0)
    none = detection_metrics([lesion_instances(prob)], [np.zeros(shape, bool)])
    assert none["n_lesions"] == 0 and np.isnan(none["ap50"]) and np.isnan(none["sens_at_1fp"])
