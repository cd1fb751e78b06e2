"""Segmentation benchmark: the pipeline's own stages on an image folder's published splits, beside a published table.

    python benchmarks/segmentation.py --splits 1 2 3 --out benchmarks/results/busi_seg.json     # BUSI (~90 min)
    python benchmarks/segmentation.py --data DIR --splits 1 --limit 16 --epochs 1 --bare-steps 2   # a smoke run

The data is any folder in the image-folder layout (default ``../shared/data/busi`` beside the checkout; see its
SOURCES.md): ``images/<id>.png``, ``masks/<id>.png``, ``manifest.csv``, ``splits/train{k}.txt`` and ``val{k}.txt``.
For each split k, in its own folder under ``--workdir``, the pipeline's stage functions run unchanged:
``tasks.ingest.run`` (``ingest.source: image_folder``, ``ingest.folder_split: k``: the ``val{k}`` ids become the
*test* split, ``train{k}`` is split by ingest into train and val, so model selection sees a part of ``train{k}``
only), ``tasks.preprocess.run`` (kind segmentation), ``tasks.train.run`` and ``tasks.evaluate.run`` (which hands a
segmentation task to :mod:`tasks.evaluate_seg`). The ``val{k}`` figures are read once, after training.

The recipe is ``benchmarks/seg_recipe.yaml``: params.yaml overrides in its groups, the same for every data set. Its
``preprocess``/``train``/``evaluate`` groups are the ``segment`` task's (written as ``tasks.segment.<group>.<key>``
overrides, so that :meth:`tasks.config.Params.for_task` merges them over the shared groups last); ``base`` and
``ingest`` are shared groups. ``--set`` and ``--epochs`` add to it and are part of the sweep's hash.

Tracking: MLflow on ``<workdir>/mlflow.db`` (sqlite) unless ``MLFLOW_TRACKING_URI`` is set; one parent run per
benchmark (``base.sweep``, default ``<dataset>-seg-recipe-<hash>``), one nested run per split (train opens it,
evaluate logs to it); the parent gets the mean figures.

Throughput: ``samples_per_s`` is the train stage's own (history, training passes only), mean over the epochs after
the first (the first pays for allocation); ``bare_loop_samples_per_s`` is a bare PyTorch loop with the same work per
step (:func:`timed_seg_steps`) in the same process, the mean of a timing right before and one right after training
(the machine's speed drifts over a split); the ratio is the pipeline's overhead.
``--limit N`` keeps the first N ids of each split file (a view of the folder, for smoke runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.medmnist import (  # noqa: E402
    _mean_or_none,
    check_data_hash,
    mean_sd,
    parse_sets,
    time_loop,
    write_figures,
)
from tasks.config import Params, load_params, read_yaml  # noqa: E402

RECIPE = Path(__file__).with_name("seg_recipe.yaml")
DEFAULT_DATA = REPO.parent / "shared/data/busi"
TASK = "segment"
TASK_GROUPS = ("preprocess", "train", "evaluate")  # recipe groups that are the segment task's
# The published table for BUSI's three splits (256x256, GPU, 300 epochs, mean ± sd over the splits), in percent, as
# ../shared/data/busi/SOURCES.md quotes it from FengheTan9/Medical-Image-Segmentation-Benchmarks' README.
PUBLISHED = {
    "source": "FengheTan9/Medical-Image-Segmentation-Benchmarks README (via shared/data/busi/SOURCES.md): same three "
              "BUSI splits, 256x256, GPU, 300 epochs, mean ± sd over splits; percent",
    "rows": [
        {"method": "U-Net", "dice": 76.97, "dice_sd": 3.10, "iou": 68.61},
        {"method": "TransUnet", "dice": 79.85, "dice_sd": None, "iou": None},
        {"method": "CMUNeXt", "dice": 79.86, "dice_sd": None, "iou": None},
        {"method": "Mobile U-ViT", "dice": 81.18, "dice_sd": 3.05, "iou": 72.88},
    ],
}  # fmt: skip


def task_overrides(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted overrides with ``preprocess.``/``train.``/``evaluate.`` keys moved under ``tasks.segment.``.

    ``{"train.epochs": 5, "ingest.folder_split": 1} -> {"tasks.segment.train.epochs": 5, "ingest.folder_split": 1}``:
    the segment task's own overrides in params.yaml would otherwise win over a shared-group override.
    """
    out = {}
    for key, value in flat.items():
        out[f"tasks.{TASK}.{key}" if key.split(".", 1)[0] in TASK_GROUPS else key] = value
    return out


def benchmark_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe file plus ``--set`` and ``--epochs``, as dotted overrides in the recipe's own terms
    (``train.epochs``); the sweep name hashes exactly these."""
    from tasks.tracking import flatten

    raw = read_yaml(args.recipe) or {}
    if not isinstance(raw, dict):
        raise SystemExit(f"{args.recipe}: expected a mapping of params groups (as in params.yaml)")
    recipe = {**flatten(raw), **parse_sets(args.set)}
    if args.epochs is not None:
        recipe["train.epochs"] = args.epochs
    if "ingest.folder_split" in recipe or "ingest.input" in recipe:
        raise SystemExit("ingest.folder_split and ingest.input are the benchmark's axes: give them with --splits and "
                         "--data, not in the recipe or --set")  # fmt: skip
    return recipe


def split_params(base: dict[str, Any], split: int) -> Params:
    """params.yaml with the benchmark's overrides and ``ingest.folder_split: split``, as the segment task sees it."""
    return load_params(REPO / "params.yaml", {**task_overrides(base), "ingest.folder_split": split}).for_task(TASK)


def limited_view(data: Path, splits: list[int], limit: int, dest: Path) -> Path:
    """A view of ``data`` whose split files keep their first ``limit`` ids (images, masks, manifest: symlinks).

    Raises:
        SystemExit: naming a split file that does not exist.
    """
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    (dest / "splits").mkdir(parents=True)
    for name in ("images", "masks", "manifest.csv"):
        if (data / name).exists():
            (dest / name).symlink_to((data / name).resolve())
    for k in splits:
        for stem in (f"train{k}", f"val{k}"):
            src = data / "splits" / f"{stem}.txt"
            if not src.is_file():
                raise SystemExit(f"{src}: split file not found (--splits {k} needs splits/train{k}.txt and val{k}.txt)")
            ids = [line.strip() for line in src.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
            (dest / "splits" / f"{stem}.txt").write_text("\n".join(ids[:limit]) + "\n")
    return dest


def timed_seg_steps(params: Params, data_dir: Path, steps: int = 30, warmup: int = 3) -> dict[str, Any]:
    """A bare PyTorch training loop with the recipe's work per step, timed per phase.

    The same network (:func:`tasks.train.model_spec` -> :func:`tasks.models.networks.build_model`), MONAI
    ``DiceCELoss`` with the recipe's weights, AdamW, batch size, the pipeline's augmentation call
    (:func:`tasks.models.augment.augment_batch` with the masks), EMA update (when ``train.ema`` > 0) and precision
    (``train.precision``: the same autocast), on the same preprocessed tensors (``train_x.npy`` float32 (N, C, *S),
    ``train_m.npy`` (N, *S)); nothing else (no LR scheduler, progress bar, loss read-back, validation, checkpoint or
    tracking).

    Returns:
        ``{"samples_per_s": float, "ms": {"data", "forward", "backward", "optimizer"}}`` (ms per step; "data" is the
        gather and augmentation, "optimizer" the AdamW step and EMA update).
    """
    import numpy as np
    import torch
    from monai.losses import DiceCELoss

    from tasks.models.augment import augment_batch
    from tasks.models.fit import autocast_context, configure_torch
    from tasks.models.networks import build_model
    from tasks.train import model_spec

    tp = params.train
    meta = json.loads((data_dir / "meta.json").read_text())
    spec = model_spec(tp, meta)
    device = configure_torch(params.base.seed, tp)
    x = torch.from_numpy(np.load(data_dir / "train_x.npy")).float()
    m = torch.from_numpy(np.load(data_dir / "train_m.npy"))
    model = build_model(spec).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    ema = None
    if tp.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tp.ema), use_buffers=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=tp.seg.dice_weight, lambda_ce=tp.seg.ce_weight,
                         label_smoothing=tp.label_smoothing, batch=tp.seg.batch_dice)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    bs = min(tp.batch_size, len(x))

    def batch():
        idx = torch.randint(0, len(x), (bs,), generator=gen)
        xb, mb = x[idx], m[idx]
        if tp.augment:
            xb, mb = augment_batch(xb, gen, tp.augmentation, masks=mb)
        return xb.to(device), mb.long().unsqueeze(1).to(device)

    return time_loop(model, opt, ema, loss_fn, batch, bs, device, steps, warmup,
                     autocast=autocast_context(tp.precision, device))  # fmt: skip


def pipeline_samples_per_s(history: list[dict[str, float]]) -> float:
    """The train stage's training throughput: mean ``samples_per_s`` over the epochs after the first (all, if one)."""
    values = [h["samples_per_s"] for h in history]
    return statistics.fmean(values[1:] if len(values) > 1 else values)


def prepare_split(p: Params, data: Path, out: Path) -> tuple[Any, Any, Path]:
    """Ingest split ``p.ingest.folder_split`` of the folder ``data`` into ``out/ingested`` and preprocess it (kind
    segmentation) into ``out/preprocessed``: what every benchmark of the folder trains and scores on.

    Returns:
        (ingest result, preprocess result, the preprocessed folder).
    """
    from tasks import ingest, preprocess

    k = p.ingest.folder_split
    print(f"\n== split {k}: ingest {data} (train{k}.txt -> train/val, val{k}.txt -> test)", flush=True)
    ing = ingest.run(p.ingest, out / "ingested", class_names=None, split_seed=p.base.split_seed, input_path=data,
                     progress=True)  # fmt: skip
    print(f"split {k}: preprocess to {p.preprocess.spatial_size}", flush=True)
    pre_dir = out / "preprocessed"
    pre = preprocess.run(p.preprocess, out / "ingested", pre_dir, class_names=None, positive_class=0,
                         kind="segmentation")  # fmt: skip
    return ing, pre, pre_dir


def run_split(args: argparse.Namespace, base: dict[str, Any], data: Path, work: Path, k: int,
              source_hash: str) -> dict[str, Any]:  # fmt: skip
    """Ingest, preprocess, train and evaluate split ``k`` in ``work/split{k}``; returns its per-split figures.

    ``source_hash`` (the folder's :func:`tasks.provenance.file_hash`) is tagged on the split's run.
    """
    from tasks import evaluate, provenance, tracking, train

    p = split_params(base, k)
    out = work / f"split{k}"
    t_split = time.perf_counter()
    ing, pre, pre_dir = prepare_split(p, data, out)
    data_hash = provenance.file_hash(pre_dir)
    prep_s = time.perf_counter() - t_split
    print(f"split {k}: {pre.counts} images {pre.meta['input_shape']}, masks {ing.summary.get('images_with_mask')}, "
          f"quarantined {ing.summary['quarantined']}; ingest + preprocess {prep_s:.0f} s; "
          f"training {p.train.epochs} epochs of {p.train.arch} {list(p.train.seg.channels)}", flush=True)
    bare_before = None
    if args.bare_steps > 0:  # timed before and after training: the mean cancels a drift of the machine's speed
        print(f"split {k}: bare PyTorch loop, {args.bare_steps} steps (before training)", flush=True)
        bare_before = timed_seg_steps(p, pre_dir, steps=args.bare_steps)
    info = train.RunInfo(p.base.experiment, p.base.dataset, p.base.sweep, p.base.seed)
    t = time.perf_counter()
    tr = train.run(p.train, pre_dir, out / "model", out / "ckpt", out / "history.csv", out / "ingested/summary.json",
                   info)  # fmt: skip
    train_s = time.perf_counter() - t
    recorded = check_data_hash(out / "model", data_hash)
    tracking.set_tags(tr.run_id, {"benchmark_split": str(k), "source_data_hash": source_hash})
    print(f"split {k}: evaluate on val{k}.txt (the test split)", flush=True)
    ev = evaluate.run(p.evaluate, out / "model", pre_dir, out / "evaluate")
    tracking.end_run(tr.run_id)  # evaluate is this run's last stage here (no export or promote)
    split_s = time.perf_counter() - t_split
    metrics = json.loads((out / "evaluate/metrics.json").read_text())
    details = json.loads((out / "evaluate/details.json").read_text())
    hd = f"hd{p.evaluate.seg.hd_percentile:g}"
    sps = pipeline_samples_per_s(tr.history)
    bare = breakdown = bare_runs = None
    if bare_before is not None:
        print(f"split {k}: bare PyTorch loop, {args.bare_steps} steps (after training)", flush=True)
        after = timed_seg_steps(p, pre_dir, steps=args.bare_steps)
        bare_runs = [bare_before["samples_per_s"], after["samples_per_s"]]
        bare = statistics.fmean(bare_runs)
        breakdown = {ph: (bare_before["ms"][ph] + after["ms"][ph]) / 2 for ph in after["ms"]}
    row = {
        "split": k, "run_id": tr.run_id, "data_hash": recorded, "counts": pre.counts,
        "dice": metrics["test_dice"], "iou": metrics["test_iou"], "hd95": metrics[f"test_{hd}"],
        "surface_dice": metrics["test_surface_dice"], "dice_original": metrics["test_dice_original"],
        "ap50": metrics.get("test_ap50"), "ap30": metrics.get("test_ap30"),
        "sens_at_1fp": metrics.get("test_sens_at_1fp"), "n_test": metrics["n_test"],
        "dice_ci": [ev.metrics.get("test_dice_ci_low"), ev.metrics.get("test_dice_ci_high")],
        "hd95_unit": details.get("units", {}).get(hd),
        "minutes": split_s / 60, "train_minutes": train_s / 60, "prep_minutes": prep_s / 60,
        "samples_per_s": sps, "bare_loop_samples_per_s": bare, "bare_loop_runs": bare_runs,
        "step_breakdown_ms": breakdown,
        "selected_epoch": tr.best_epoch, "epochs": p.train.epochs, "val_dice": tr.val_metrics.get("val_dice"),
    }  # fmt: skip
    speed = f"{row['minutes']:.1f} min (train {row['train_minutes']:.1f}), {sps:.1f} samples/s"
    if bare is not None:
        speed += f" (bare loop {bare:.1f}, ratio {sps / bare:.2f})"
    print(f"split {k}: test Dice {row['dice']:.4f} [{row['dice_ci'][0]:.4f}, {row['dice_ci'][1]:.4f}] IoU "
          f"{row['iou']:.4f} HD95 {row['hd95']:.1f} AP50 {_fmt(row['ap50'])} sens@1FP {_fmt(row['sens_at_1fp'])}; "
          f"selected epoch {tr.best_epoch}/{p.train.epochs}; {speed}", flush=True)
    return row


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _mean_sd_or_none(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(v is None for v in values):
        return None, None
    return mean_sd(values)  # type: ignore[arg-type]


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every split; returns the figures (the ``--out`` JSON)."""
    import torch

    from tasks import provenance, tracking

    data = Path(args.data).resolve()
    if not (data / "images").is_dir():
        raise SystemExit(f"{data}: not an image folder (expected images/<id>.png, masks/<id>.png, manifest.csv, "
                         "splits/train{k}.txt and val{k}.txt)")  # fmt: skip
    recipe = benchmark_recipe(args)
    name = data.name + (f"-limit{args.limit}" if args.limit else "")
    sweep = args.sweep or f"{name}-seg-recipe-{provenance.params_hash(recipe)[:6]}"  # new recipe, new sweep
    work = Path(args.workdir or REPO / "benchmarks/runs" / f"seg_{name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    source_hash = provenance.file_hash(data)  # the whole folder: images, masks, manifest, split files
    if args.limit:
        data = limited_view(data, args.splits, args.limit, work / "data")
    base = {**recipe, "base.dataset": name, "base.sweep": sweep, "base.experiment": args.experiment,
            "ingest.input": str(data)}  # fmt: skip
    os.chdir(REPO)  # the stages' git provenance is the checkout's
    params = split_params(base, args.splits[0])  # validates the recipe before any work
    machine = {"cpu_count": os.cpu_count(), "torch_threads": params.train.num_threads or os.cpu_count(),
               "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
               "load_average_at_start": list(os.getloadavg())}  # fmt: skip
    print(f"segmentation benchmark on {data} (splits {list(args.splits)}), sweep {sweep}, MLflow "
          f"{os.environ['MLFLOW_TRACKING_URI']}, work {work}; {machine['cpu_count']} CPUs, torch {torch.__version__}",
          flush=True)
    rows = [run_split(args, base, data, work, k, source_hash) for k in args.splits]
    tracking.end_sweep(args.experiment, sweep)

    figures: dict[str, Any] = {}
    for key in ("dice", "iou", "hd95", "surface_dice", "dice_original", "ap50", "ap30", "sens_at_1fp"):
        figures[f"{key}_mean"], figures[f"{key}_sd"] = _mean_sd_or_none([r[key] for r in rows])
    sps = statistics.fmean(r["samples_per_s"] for r in rows)
    bare = _mean_or_none([r["bare_loop_samples_per_s"] for r in rows])
    res = {
        "dataset": name, "data": str(Path(args.data).resolve()), "data_hash": source_hash, "splits": list(args.splits),
        "limit": args.limit,
        "sweep": sweep, "experiment": args.experiment, "tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
        **figures,
        "minutes_per_split": statistics.fmean(r["minutes"] for r in rows),
        "train_minutes_per_split": statistics.fmean(r["train_minutes"] for r in rows),
        "samples_per_s": sps, "bare_loop_samples_per_s": bare,
        "pipeline_bare_ratio": sps / bare if bare else None,
        "hd95_unit": rows[0]["hd95_unit"], "batch_size": params.train.batch_size,
        "spatial_size": list(params.preprocess.spatial_size or []), "epochs": params.train.epochs,
        "step_breakdown_ms": rows[-1]["step_breakdown_ms"],
        "recipe": {k: v for k, v in base.items() if k != "ingest.input"},  # the input: "data" above
        "published": PUBLISHED, "machine": machine, "per_split": rows,
    }  # fmt: skip
    parent = tracking.sweep_parent(args.experiment, sweep, create=False)
    if parent:
        tracking.log_metrics(parent, {k: v for k, v in res.items()
                                      if k.endswith(("_mean", "_sd", "_per_split", "samples_per_s", "_ratio"))
                                      and isinstance(v, (int, float))})  # fmt: skip
    return res


def _pm(mean: float | None, sd: float | None, scale: float = 100.0, digits: int = 2) -> str:
    if mean is None:
        return "–"
    return f"{mean * scale:.{digits}f}" + ("" if sd is None else f" ± {sd * scale:.{digits}f}")


# table columns: (JSON key, scale, digits): Dice/IoU/surface Dice in %, HD95 in its unit, detection as fractions
COLUMNS = (("dice", 100.0, 2), ("iou", 100.0, 2), ("hd95", 1.0, 1), ("surface_dice", 100.0, 2), ("ap50", 1.0, 3),
           ("ap30", 1.0, 3), ("sens_at_1fp", 1.0, 3))  # fmt: skip


def format_table(res: dict[str, Any]) -> str:
    """The printed comparison (Markdown): ours, mean ± sd over the splits and per split, beside the published rows."""
    n = len(res["splits"])
    unit = res["hd95_unit"] or "?"
    ours = " | ".join(_pm(res[f"{k}_mean"], res[f"{k}_sd"], scale, d) for k, scale, d in COLUMNS)
    lines = [
        f"{res['dataset']}, splits {res['splits']}: test = val{{k}}.txt, mean ± sd over {n} split(s); Dice/IoU in %, "
        f"HD95 in {unit} at {res['spatial_size']}",
        "",
        "| method | Dice | IoU | HD95 | surface Dice | AP50 | AP30 | sens@1FP |",
        "|---|---|---|---|---|---|---|---|",
        f"| medpipe (this recipe, {res['epochs']} epochs, CPU) | {ours} |",
    ]  # fmt: skip
    for r in res["per_split"]:
        cells = " | ".join(_pm(r[k], None, scale, d) for k, scale, d in COLUMNS)
        lines.append(f"| &nbsp; split {r['split']} (n={r['n_test']}, epoch {r['selected_epoch']}) | {cells} |")
    for p in res["published"]["rows"]:
        lines.append(f"| {p['method']} (published) | {_pm(p['dice'], p['dice_sd'], 1)} | {_pm(p['iou'], None, 1)} | "
                     "– | – | – | – | – |")
    lines += ["", f"published: {res['published']['source']}",
              f"train: {res['minutes_per_split']:.1f} min per split (train stage {res['train_minutes_per_split']:.1f}) "
              f"on {res['machine']['torch_threads']} threads, {res['samples_per_s']:.1f} samples/s"]  # fmt: skip
    if res["bare_loop_samples_per_s"]:
        b = res["step_breakdown_ms"]
        total = sum(b.values())
        lines[-1] += (f"; bare PyTorch loop {res['bare_loop_samples_per_s']:.1f} samples/s; pipeline/bare "
                      f"{res['pipeline_bare_ratio']:.2f}")
        lines.append(f"one bare step (batch {res['batch_size']}): " + ", ".join(
            f"{k} {v:.0f} ms ({v / total:.0%})" for k, v in b.items()))
    else:
        lines[-1] += " (bare loop not timed: --bare-steps 0)"
    lines.append(f"tracked as sweep {res['sweep']} in {res['tracking_uri']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, print the table and write the JSON."""
    from tasks.noise import silence_known_noise

    silence_known_noise()  # as every stage's main() does (MONAI's GPU-decoder probe in preprocess, ...)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the image folder (default ../shared/data/busi)")
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3], help="k of splits/train{k}.txt, val{k}.txt")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override in the recipe's terms (value read as JSON when it parses), e.g. "
                         "train.lr=0.001 or preprocess.spatial_size=[64,64]")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs override (part of the recipe hash)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N ids of each split file (smoke runs)")
    ap.add_argument("--sweep", default=None, help="MLflow parent run (default <dataset>-seg-recipe-<hash>)")
    ap.add_argument("--experiment", default="segmentation-benchmark")
    ap.add_argument("--workdir", default=None, help="working folder (default benchmarks/runs/seg_<dataset>)")
    ap.add_argument("--bare-steps", type=int, default=30, help="steps of the bare-loop timing; 0 skips it")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    if args.out:
        args.out = args.out.resolve()  # the run changes directory to the repository
    if args.workdir:
        args.workdir = str(Path(args.workdir).resolve())
    if args.limit is not None and args.limit < 2:
        ap.error("--limit: at least 2 ids per split file")
    res = run_benchmark(args)
    print()
    print(format_table(res))
    write_figures(args.out, res)


if __name__ == "__main__":
    main()
