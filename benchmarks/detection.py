"""Lesion-detection benchmark: MONAI RetinaNet on the segmentation benchmark's data, scored as the pipeline scores.

    python benchmarks/detection.py --splits 1 2 3 --out benchmarks/results/busi_det.json        # BUSI
    python benchmarks/detection.py --data DIR --splits 1 --limit 12 --epochs 1                    # a smoke run

Issue 11: lesion detection is the connected components of the segmenter's probability map unless a real detector
measures better on the BUSI benchmark. This script is the real detector's side of that comparison.

Data: for each split k, in ``--workdir/split{k}``, the same stage calls as ``benchmarks/segmentation.py`` with its
recipe (``seg_recipe.yaml`` via :func:`benchmarks.segmentation.benchmark_recipe` and
:func:`~benchmarks.segmentation.split_params`): ``tasks.ingest.run`` (``val{k}.txt`` ids = the test split; ingest
holds out part of ``train{k}`` as val) and ``tasks.preprocess.run`` (kind segmentation), giving the same
``{train,val,test}_x.npy`` (N, 1, 256, 256) and ``_m.npy`` label maps. Truth boxes are the connected components of
each lesion mask (:func:`tasks.segmetrics.true_instances`).

Model: MONAI's ``RetinaNet`` + ``RetinaNetDetector`` (ATSS matcher, hard-negative sampler, NMS) over a small
ResNet-FPN (MONAI ``ResNet`` + ``FeaturePyramidNetwork``), random init, trained with AdamW, linear warm-up + cosine,
and left-right flips (boxes flipped with MONAI's ``flip_boxes``); settings in ``det_recipe.yaml``. The training
budget is ``train.minutes`` per split (the recipe's 24: as many epochs as the first epoch's time says fit, so that a
split with ingest, preprocess and scoring stays within the issue's 30 minutes on 2 cores) or a fixed ``--epochs``.
The epoch kept is the one with the best AP50 on ingest's val part of ``train{k}``; the test split is scored once,
at the end.

Score: :func:`tasks.segmetrics.detection_metrics` with the split's ``evaluate.seg`` settings (IoU 0.5 and 0.3,
FROC at 0.5/1/2 false positives per image), exactly as :mod:`tasks.evaluate_seg` scores the connected components, at
the same 256x256 grid: the figures compare directly with ``ap50``/``ap30``/``sens_at_1fp`` of
``benchmarks/results/busi_seg.json`` (``--compare``; printed beside). A box is fed as a ``LesionInstance`` whose mask
is the box's region (FROC's hit rule uses the mask's centroid: here the box centre). No MLflow: a benchmark script.
``--limit N`` keeps the first N ids of each split file (a view of the folder, for smoke runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import segmentation as seg  # noqa: E402
from benchmarks.medmnist import parse_sets, write_figures  # noqa: E402
from tasks.config import apply_overrides, read_yaml  # noqa: E402

RECIPE = Path(__file__).with_name("det_recipe.yaml")
COMPARE = Path(__file__).with_name("results") / "busi_seg.json"
FIGURES = ("ap50", "ap30", "sens_at_0.5fp", "sens_at_1fp", "sens_at_2fp", "froc")


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Backbone(_Group):
    layers: list[int] = Field(min_length=4, max_length=4)
    block_inplanes: list[int] = Field(min_length=4, max_length=4)
    conv1_stride: int = Field(2, ge=1)
    returned_layers: list[int] = Field(min_length=1)
    fpn_channels: int = Field(64, ge=8, multiple_of=8)  # the heads' GroupNorm has 8 groups

    @field_validator("returned_layers")
    @classmethod
    def _consecutive(cls, v: list[int]) -> list[int]:  # anchor scales 1, 2, 4, ... assume one stride-2 step per level
        if v != list(range(v[0], v[-1] + 1)) or v[0] < 1 or v[-1] > 4:
            raise ValueError(f"backbone.returned_layers: consecutive ascending layer numbers in 1..4, got {v}")
        return v


class Anchors(_Group):
    base_shapes: list[list[float]] = Field(min_length=1)


class Matcher(_Group):
    num_candidates: int = Field(4, ge=1)
    center_in_gt: bool = False


class Sampler(_Group):
    batch_size_per_image: int = Field(64, ge=1)
    positive_fraction: float = Field(0.3, gt=0, lt=1)
    min_neg: int = Field(16, ge=0)
    pool_size: float = Field(20, ge=1)


class BoxSelector(_Group):
    score_thresh: float = Field(0.02, ge=0, lt=1)
    topk_candidates_per_level: int = Field(1000, ge=1)
    nms_thresh: float = Field(0.22, gt=0, le=1)
    detections_per_img: int = Field(10, ge=1)


class DetTrain(_Group):
    epochs: int = Field(30, ge=1)
    minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    flip_prob: float = Field(0.5, ge=0, le=1)
    flip_axes: list[int] = [1]
    num_threads: int = Field(0, ge=0)


class DetRecipe(_Group):
    """``det_recipe.yaml``: the detector, its training and inference settings (the data is seg_recipe.yaml's)."""

    backbone: Backbone
    anchors: Anchors
    matcher: Matcher = Matcher()
    sampler: Sampler = Sampler()
    box_selector: BoxSelector = BoxSelector()
    train: DetTrain = DetTrain()


def load_recipe(path: Path, sets: dict[str, Any]) -> DetRecipe:
    """The recipe file with dotted ``sets`` applied (``{"train.lr": 0.002}``), validated.

    Raises:
        SystemExit: naming the file and the offending key.
    """
    from pydantic import ValidationError

    raw = read_yaml(path) or {}
    try:
        return DetRecipe.model_validate(apply_overrides(raw, sets))
    except (ValidationError, ValueError, TypeError) as err:
        raise SystemExit(f"{path} (with --set {sets}): {err}") from err


def resnet_fpn(backbone, returned_layers: list[int], out_channels: int, spatial_dims: int):
    """A ResNet-FPN feature extractor: MONAI's ``FeaturePyramidNetwork`` (with ``LastLevelMaxPool``) on the outputs
    of a MONAI ``ResNet``'s ``layer{k}``, k in ``returned_layers``; returns ``{"0": (B, out_channels, ...), ...}``,
    highest resolution first.

    This is what MONAI's ``resnet_fpn_feature_extractor`` / ``BackboneWithFPN`` build, written out because (1) those
    take the layer outputs with torchvision's ``IntermediateLayerGetter`` and torchvision is not a medpipe dependency,
    (2) they fix the FPN width at 256 channels. Layers after the last returned one are not kept.
    """
    from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
    from torch import nn

    class ResNetFPN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            pool = [] if backbone.no_max_pool else [backbone.maxpool]
            self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act, *pool)
            self.layers = nn.ModuleList(getattr(backbone, f"layer{k}") for k in range(1, max(returned_layers) + 1))
            widths = [layer[-1].bn2.num_features for layer in self.layers]  # ResNetBlock: expansion 1
            self.fpn = FeaturePyramidNetwork(spatial_dims, [widths[k - 1] for k in returned_layers], out_channels,
                                             extra_blocks=LastLevelMaxPool(spatial_dims))  # fmt: skip
            self.out_channels = out_channels  # RetinaNet reads it

        def forward(self, x):
            x, feats = self.stem(x), {}
            for k, layer in enumerate(self.layers, start=1):
                x = layer(x)
                if k in returned_layers:
                    feats[str(len(feats))] = x
            return self.fpn(feats)

    return ResNetFPN()


def _atss_detector_class():
    """MONAI's ``RetinaNetDetector`` with the anchor matching for its ATSS matcher only.

    MONAI 1.6's ``compute_anchor_matched_idxs`` first checks ``isinstance(matcher, torchvision Matcher)``, which
    raises OptionalImportError without torchvision (not a medpipe dependency) even when the matcher is MONAI's own
    ``ATSSMatcher``. This override is that method's ATSS branch, as its NotImplementedError message suggests.
    """
    import torch
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

    class ATSSRetinaNetDetector(RetinaNetDetector):
        def compute_anchor_matched_idxs(self, anchors, targets, num_anchor_locs_per_level):
            matched = []
            for anchors_i, targets_i in zip(anchors, targets, strict=True):
                boxes = targets_i[self.target_box_key].to(anchors_i.device)
                if boxes.numel() == 0:  # no lesion: every anchor is background (-1)
                    matched.append(torch.full((anchors_i.size(0),), -1, dtype=torch.int64, device=anchors_i.device))
                    continue
                _, idx = self.proposal_matcher(boxes, anchors_i, num_anchor_locs_per_level, self.num_anchors_per_loc)
                matched.append(idx)
            return matched

    return ATSSRetinaNetDetector


def build_detector(r: DetRecipe, in_channels: int, spatial_dims: int = 2):
    """MONAI RetinaNetDetector over a ResNet-FPN (:func:`resnet_fpn`), random init, one foreground class, with the
    recipe's ATSS matcher, hard-negative sampler and box selector."""
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet

    b = r.backbone
    backbone = resnet.ResNet(block=resnet.ResNetBlock, layers=b.layers, block_inplanes=b.block_inplanes,
                             spatial_dims=spatial_dims, n_input_channels=in_channels, conv1_t_size=7,
                             conv1_t_stride=b.conv1_stride, feed_forward=False)  # fmt: skip
    extractor = resnet_fpn(backbone, b.returned_layers, b.fpn_channels, spatial_dims)
    shapes = [tuple(s) for s in r.anchors.base_shapes]
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=[2**i for i in range(len(b.returned_layers) + 1)],
                                             base_anchor_shapes=shapes)  # fmt: skip
    network = RetinaNet(spatial_dims=spatial_dims, num_classes=1, num_anchors=len(shapes), feature_extractor=extractor,
                        size_divisible=b.conv1_stride * 2 * 2 ** max(b.returned_layers))  # fmt: skip
    detector = _atss_detector_class()(network, anchors)
    detector.set_atss_matcher(r.matcher.num_candidates, r.matcher.center_in_gt)
    detector.set_hard_negative_sampler(**r.sampler.model_dump())
    detector.set_box_selector_parameters(**r.box_selector.model_dump())
    return detector


def truth_boxes(masks, label: int) -> list:
    """Per image, float32 (n, 2d) boxes of the connected components of ``masks[i] == label`` (MONAI StandardMode,
    first array axis first, stop exclusive: :func:`tasks.segmetrics.true_instances`'s boxes)."""
    import numpy as np

    from tasks.segmetrics import true_instances

    d = masks.ndim - 1
    return [np.array([t.box for t in true_instances(m == label)], np.float32).reshape(-1, 2 * d) for m in masks]


def flip_batch(x, boxes: list, axes: list[int], prob: float, gen):
    """Flip each image (C, *S) of ``x`` (B, C, *S) along each of ``axes`` (spatial) with probability ``prob``, and its
    boxes with it (MONAI ``flip_boxes``). Returns ``(x, boxes)``, new objects."""
    import torch
    from monai.apps.detection.transforms.box_ops import flip_boxes

    x, out = x.clone(), []
    for i, b in enumerate(boxes):
        chosen = [a for a in axes if float(torch.rand((), generator=gen)) < prob]
        if chosen:
            x[i] = x[i].flip([1 + a for a in chosen])
            b = flip_boxes(b, x.shape[2:], chosen) if len(b) else b
        out.append(b)
    return x, out


def box_instances(boxes, scores, shape: tuple[int, ...]) -> list:
    """Detector output -> :class:`tasks.segmetrics.LesionInstance` list, highest score first.

    ``box`` is kept as the detector's float box (``detection_metrics`` casts boxes to float32 anyway); ``mask`` is the
    box's region (bool, ``shape``), whose centroid, the box centre, is what the FROC hit rule reads.
    """
    import numpy as np

    from tasks.segmetrics import LesionInstance

    d = len(shape)
    found = []
    for box, score in zip(np.asarray(boxes, np.float32), np.asarray(scores, np.float32), strict=True):
        lo = np.clip(np.floor(box[:d]), 0, np.array(shape) - 1).astype(int)
        hi = np.maximum(np.minimum(np.ceil(box[d:]), shape).astype(int), lo + 1)
        mask = np.zeros(shape, bool)
        mask[tuple(slice(a, z) for a, z in zip(lo, hi, strict=True))] = True
        found.append(LesionInstance(box, float(score), mask))
    return sorted(found, key=lambda inst: -inst.score)


def detect(detector, x, batch_size: int = 8) -> list[list]:
    """Boxes of every image of ``x`` (N, C, *S) float16/32 array, as LesionInstance lists (eval mode, no grad)."""
    import torch

    detector.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = torch.as_tensor(x[i : i + batch_size]).float()
            for res in detector(xb):
                out.append(box_instances(res[detector.target_box_key].numpy(), res[detector.pred_score_key].numpy(),
                                         tuple(xb.shape[2:])))  # fmt: skip
    return out


def planned_epochs(minutes: float, epoch_seconds: float) -> int:
    """Epochs of ``epoch_seconds`` (training + validation) that fit in ``minutes``; at least 1."""
    return max(1, int(minutes * 60 // max(epoch_seconds, 1e-9)))


def train_detector(r: DetRecipe, data: dict, label: int, sp, seed: int, tag: str = "") -> tuple[Any, dict[str, Any]]:
    """Train on ``data["train_x"/"train_m"]``; keep the epoch with the best val AP50 (``val_x``/``val_m``).

    Args:
        r: the recipe. data: the preprocessed arrays (x float16 (N, C, *S) in [0, 1], m uint8 (N, *S)).
        label: the lesion's label value in the masks. sp: ``evaluate.seg`` (iou_thresholds, fp_rates).
        seed: torch seed (weights, order, flips). tag: printed before each epoch's bar.

    Returns:
        ``(detector with the selected weights, info)``; info: selected_epoch, val_ap50, epochs, train_s, history.
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    from tasks.models.fit import progress_bar_disabled
    from tasks.segmetrics import detection_metrics

    t = r.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(data["train_x"])
    boxes = truth_boxes(data["train_m"], label)
    val_truth = [m == label for m in data["val_m"]]
    det = build_detector(r, x.shape[1], x.ndim - 2)
    opt = torch.optim.AdamW([p for p in det.network.parameters() if p.requires_grad], lr=t.lr,
                            weight_decay=t.weight_decay)  # fmt: skip
    bs = min(t.batch_size, len(x))
    per_epoch = math.ceil(len(x) / bs)
    plan = {"epochs": t.epochs, "warm": t.warmup_epochs * per_epoch}

    def lr_factor(step: int) -> float:  # the epoch count may be re-planned after epoch 1 (--minutes)
        total = plan["epochs"] * per_epoch
        if step < plan["warm"]:
            return (step + 1) / plan["warm"]
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - plan["warm"]) / max(1, total - plan["warm"]))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history, best, best_ap, best_epoch = [], None, -math.inf, 0  # val AP50 NaN (no lesion) reads -1
    t0 = time.perf_counter()
    epoch = 0
    while epoch < plan["epochs"]:
        epoch += 1
        det.train()
        te = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        sums = {"cls": 0.0, "box": 0.0}
        bar = tqdm(range(0, len(x), bs), desc=f"{tag}epoch {epoch}/{plan['epochs']}", leave=False,
                   disable=progress_bar_disabled())  # fmt: skip
        for i in bar:
            idx = order[i : i + bs]
            xb, bb = flip_batch(x[idx].float(), [boxes[j] for j in idx], t.flip_axes, t.flip_prob, gen)
            targets = [{det.target_box_key: torch.from_numpy(np.ascontiguousarray(b)),
                        det.target_label_key: torch.zeros(len(b), dtype=torch.long)} for b in bb]  # fmt: skip
            losses = det(xb, targets)
            loss = losses[det.cls_key] + losses[det.box_reg_key]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums["cls"] += losses[det.cls_key].item() * len(idx)
            sums["box"] += losses[det.box_reg_key].item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val = detection_metrics(detect(det, data["val_x"]), val_truth, (0.5,), sp.fp_rates)
        ap = val["ap50"] if not math.isnan(val["ap50"]) else -1.0
        if ap > best_ap:
            best_ap, best_epoch = ap, epoch
            best = {k: v.detach().clone() for k, v in det.network.state_dict().items()}
        row = {"epoch": epoch, "cls_loss": sums["cls"] / len(x), "box_loss": sums["box"] / len(x), "val_ap50": ap,
               "val_sens_at_1fp": val.get("sens_at_1fp"), "seconds": time.perf_counter() - te,
               "lr": opt.param_groups[0]["lr"]}  # fmt: skip
        history.append(row)
        print(f"{tag}epoch {epoch}/{plan['epochs']}: loss cls {row['cls_loss']:.4f} box {row['box_loss']:.4f}, "
              f"val AP50 {ap:.4f}, {row['seconds']:.1f} s", flush=True)
        if epoch == 1 and t.minutes:  # a time budget: as many epochs as fit, planned from the first one
            plan["epochs"] = planned_epochs(t.minutes, row["seconds"])
            print(f"{tag}--minutes {t.minutes:g}: {plan['epochs']} epochs planned", flush=True)
    det.network.load_state_dict(best)
    info = {"selected_epoch": best_epoch, "val_ap50": best_ap, "epochs": plan["epochs"],
            "train_s": time.perf_counter() - t0, "history": history,
            "parameters": sum(p.numel() for p in det.network.parameters())}  # fmt: skip
    return det, info


def run_split(r: DetRecipe, base: dict[str, Any], data: Path, work: Path, k: int) -> dict[str, Any]:
    """Ingest + preprocess split ``k`` as the segmentation benchmark does, train RetinaNet, score the test split."""
    import numpy as np

    from tasks.segmetrics import detection_metrics

    p = seg.split_params(base, k)  # the segment task's params, as benchmarks/segmentation.run_split builds them
    out = work / f"split{k}"
    t_split = time.perf_counter()
    _, pre, pre_dir = seg.prepare_split(p, data, out)
    prep_s = time.perf_counter() - t_split
    sp = p.evaluate.seg
    names = list(pre.meta["class_names"])
    if sp.detect_class not in names:
        raise SystemExit(f"evaluate.seg.detect_class: {sp.detect_class!r} is not one of the classes {names[1:]} "
                         f"({pre_dir / 'meta.json'})")  # fmt: skip
    label = names.index(sp.detect_class)
    arrays = {f"{s}_{a}": np.load(pre_dir / f"{s}_{a}.npy") for s in ("train", "val", "test") for a in ("x", "m")}
    print(f"split {k}: {pre.counts} images {pre.meta['input_shape']}; ingest + preprocess {prep_s:.0f} s; RetinaNet "
          f"{r.train.epochs if not r.train.minutes else f'{r.train.minutes:g} min'}", flush=True)
    det, info = train_detector(r, arrays, label, sp, p.base.seed, tag=f"split {k}: ")
    test = detection_metrics(detect(det, arrays["test_x"]), [m == label for m in arrays["test_m"]],
                             sp.iou_thresholds, sp.fp_rates)  # fmt: skip
    row = {"split": k, **{f: test.get(f) for f in FIGURES}, "n_test": len(arrays["test_x"]),
           "n_test_lesions": test["n_lesions"], "n_test_detections": test["n_detections"],
           "n_train": len(arrays["train_x"]), "n_val": len(arrays["val_x"]),
           "minutes": (time.perf_counter() - t_split) / 60, "train_minutes": info["train_s"] / 60,
           "prep_minutes": prep_s / 60, "selected_epoch": info["selected_epoch"], "epochs": info["epochs"],
           "val_ap50": info["val_ap50"], "parameters": info["parameters"], "history": info["history"]}  # fmt: skip
    print(f"split {k}: test AP50 {row['ap50']:.4f} AP30 {row['ap30']:.4f} sens@1FP {row['sens_at_1fp']:.4f} "
          f"(n={row['n_test']}, {row['n_test_lesions']} lesions); selected epoch {row['selected_epoch']}/"
          f"{row['epochs']} (val AP50 {row['val_ap50']:.4f}); {row['minutes']:.1f} min", flush=True)
    return row


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(v is None or math.isnan(v) for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)  # type: ignore[arg-type]


def read_compare(path: Path | None, dataset: str) -> dict[str, Any] | None:
    """The connected-component figures of a segmentation benchmark JSON on the same data set, or None."""
    if path is None or not path.is_file():
        return None
    res = json.loads(path.read_text())
    if res.get("dataset") != dataset:
        return None
    keys = ("ap50", "ap30", "sens_at_1fp")
    return {"source": str(path), "sweep": res.get("sweep"), "splits": res.get("splits"), "epochs": res.get("epochs"),
            **{f"{k}_{s}": res.get(f"{k}_{s}") for k in keys for s in ("mean", "sd")},
            "per_split": [{"split": r["split"], **{k: r.get(k) for k in keys}} for r in res.get("per_split", [])]}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every split; returns the figures (the ``--out`` JSON)."""
    import torch

    from tasks import provenance

    data = Path(args.data).resolve()
    if not (data / "images").is_dir():
        raise SystemExit(f"{data}: not an image folder (expected images/<id>.png, masks/<id>.png, manifest.csv, "
                         "splits/train{k}.txt and val{k}.txt)")  # fmt: skip
    sets = parse_sets(args.set)
    if args.epochs is not None:  # a fixed epoch count replaces the recipe's time budget (unless --minutes too)
        sets["train.epochs"], sets["train.minutes"] = args.epochs, None
    if args.minutes is not None:
        sets["train.minutes"] = args.minutes
    recipe = load_recipe(args.recipe, sets)
    data_recipe = seg.benchmark_recipe(argparse.Namespace(recipe=args.seg_recipe, set=args.seg_set, epochs=None))
    name = data.name + (f"-limit{args.limit}" if args.limit else "")
    work = Path(args.workdir or REPO / "benchmarks/runs" / f"det_{name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    source_hash = provenance.file_hash(data)
    if args.limit:
        data = seg.limited_view(data, args.splits, args.limit, work / "data")
    base = {**data_recipe, "base.dataset": name, "ingest.input": str(data)}
    seg.split_params(base, args.splits[0])  # validates the data recipe before any work
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "platform": platform.platform(),
               "load_average_at_start": list(os.getloadavg())}  # fmt: skip
    print(f"detection benchmark (MONAI RetinaNet) on {data} (splits {list(args.splits)}), work {work}; "
          f"{machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads", flush=True)
    rows = [run_split(recipe, base, data, work, k) for k in args.splits]
    figures: dict[str, Any] = {}
    for f in FIGURES:
        figures[f"{f}_mean"], figures[f"{f}_sd"] = _mean_sd([r[f] for r in rows])
    return {
        "dataset": name, "data": str(Path(args.data).resolve()), "data_hash": source_hash, "splits": list(args.splits),
        "limit": args.limit, "detector": "MONAI RetinaNet (monai.apps.detection), ResNet-FPN, random init", **figures,
        "minutes_per_split": statistics.fmean(r["minutes"] for r in rows),
        "train_minutes_per_split": statistics.fmean(r["train_minutes"] for r in rows),
        "epochs": rows[0]["epochs"] if len({r["epochs"] for r in rows}) == 1 else [r["epochs"] for r in rows],
        "spatial_size": list(seg.split_params(base, args.splits[0]).preprocess.spatial_size or []),
        "metric": "tasks.segmetrics.detection_metrics with the segment task's evaluate.seg settings",
        "recipe": recipe.model_dump(),  # the data's recipe: the segmentation recipe less the segmenter's training
        "data_recipe": {k: v for k, v in base.items() if k != "ingest.input" and not k.startswith("train.")},
        "connected_components": read_compare(args.compare, name), "machine": machine, "per_split": rows,
    }  # fmt: skip


def _pm(mean: float | None, sd: float | None) -> str:
    return "–" if mean is None else f"{mean:.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def format_table(res: dict[str, Any]) -> str:
    """The printed comparison (Markdown): RetinaNet mean ± sd and per split, beside the connected components."""
    cols = ("ap50", "ap30", "sens_at_0.5fp", "sens_at_1fp", "sens_at_2fp")
    lines = [f"{res['dataset']}, splits {res['splits']}: test = val{{k}}.txt, mean ± sd over {len(res['splits'])} "
             f"split(s), at {res['spatial_size']}; {res['metric']}", "",
             "| detector | AP50 | AP30 | sens@0.5FP | sens@1FP | sens@2FP |", "|---|---|---|---|---|---|",
             f"| MONAI RetinaNet ({res['epochs']} epochs, CPU) | "
             + " | ".join(_pm(res[f"{c}_mean"], res[f"{c}_sd"]) for c in cols) + " |"]  # fmt: skip
    for r in res["per_split"]:
        lines.append(f"| &nbsp; split {r['split']} (n={r['n_test']}, epoch {r['selected_epoch']}, val AP50 "
                     f"{r['val_ap50']:.3f}) | " + " | ".join(_pm(r[c], None) for c in cols) + " |")  # fmt: skip
    cc = res["connected_components"]
    if cc:
        lines.append(f"| segmenter's connected components ({Path(cc['source']).name}, splits {cc['splits']}, "
                     f"{cc['epochs']} epochs) | {_pm(cc['ap50_mean'], cc['ap50_sd'])} | "
                     f"{_pm(cc['ap30_mean'], cc['ap30_sd'])} | – | {_pm(cc['sens_at_1fp_mean'], cc['sens_at_1fp_sd'])}"
                     " | – |")  # fmt: skip
    lines.append(f"{res['minutes_per_split']:.1f} min per split (training {res['train_minutes_per_split']:.1f}) on "
                 f"{res['machine']['torch_threads']} threads")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, print the table and write the JSON."""
    from tasks.noise import silence_known_noise

    silence_known_noise()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(seg.DEFAULT_DATA), help="the image folder (default ../shared/data/busi)")
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3], help="k of splits/train{k}.txt, val{k}.txt")
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="the detector's recipe (default det_recipe.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="detector recipe override, e.g. train.lr=0.002 or backbone.fpn_channels=32")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs, instead of the recipe's time budget")
    ap.add_argument("--minutes", type=float, default=None,
                    help="train.minutes: training budget per split; the epochs are planned from the first one's time")
    ap.add_argument("--seg-recipe", type=Path, default=seg.RECIPE,
                    help="the data's recipe (ingest, preprocess, evaluate.seg): the segmentation benchmark's")
    ap.add_argument("--seg-set", action="append", default=[], metavar="KEY=VALUE",
                    help="data recipe override in its terms, e.g. preprocess.spatial_size=[64,64]")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N ids of each split file (smoke runs)")
    ap.add_argument("--workdir", default=None, help="working folder (default benchmarks/runs/det_<dataset>)")
    ap.add_argument("--compare", type=Path, default=COMPARE,
                    help="segmentation benchmark JSON whose connected-component figures are printed beside")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 2:
        ap.error("--limit: at least 2 ids per split file")
    res = run_benchmark(args)
    print()
    print(format_table(res))
    write_figures(args.out, res)


if __name__ == "__main__":
    main()
