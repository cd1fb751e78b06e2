"""MedMNIST benchmark: the pipeline's own stages on a MedMNIST set for N seeds, beside the MedMNIST v2 table.

    python benchmarks/medmnist.py --dataset adrenalmnist3d --size 28 --seeds 0 1 2 --out bench.json
    python benchmarks/medmnist.py --data ../shared/data/medmnist/adrenalmnist3d_64.npz --size 64
    python benchmarks/medmnist.py --dataset pneumoniamnist --seeds 0 --epochs 1 --bare-steps 0   # a smoke run

The set is found by name (``--dataset`` and ``--size``) in ``$MEDMNIST_ROOT`` (default ``../shared/data/medmnist``
beside the checkout when it exists) by :func:`tasks.sources.medmnist.resolve`, or given as a file (``--data``); it
becomes ``ingest.input`` (``ingest.source: medmnist``, ``ingest.labels_csv: null``). The recipe is
``benchmarks/recipe.yaml``: params.yaml overrides that are the same for every MedMNIST set (2D or 3D; channels and
classes come from the data). ingest and preprocess run once; train and evaluate run per seed, each seed an MLflow
run nested under one parent run for the sweep (``base.sweep``), so the MLflow UI compares them and
``python -m tasks.reporting.report --sweep NAME`` regenerates the results table from the tracked runs. Model and
threshold selection see the validation split only; the test split is evaluated once per seed.

Seeds: ``--seeds`` sets ``base.seed`` only (weight init, data order, augmentation), so "mean ± sd over seeds" is
training variance at a fixed split: the official MedMNIST train/val/test splits are kept as published (the
patient-split seed ``base.split_seed`` does not apply to them) and the bootstrap's seed
(``evaluate.bootstrap_seed``) stays fixed. MedMNIST offers no split grid: re-splitting would leave the published
table's protocol. Provenance: each run's ``dvc_data_hash`` tag is the sha256 of the preprocessed tensors it read
(run outside DVC, :func:`tasks.provenance.data_hash` hashes the files), checked here against the benchmark's own
hash of them; the source file's hash is tagged as ``source_data_hash``.

Printed: per seed test AUC / ACC with bootstrap 95% CIs (each MedMNIST image is its own "patient": the sets
publish no patient ids), train minutes and samples/s, a bare PyTorch loop's samples/s on the same model and
tensors (the ratio is the pipeline's overhead; ``--bare-steps 0`` skips it); then mean ± sd over seeds beside every
published row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.config import Params, load_params, read_yaml  # noqa: E402
from tasks.reporting.paper import paper_rows  # noqa: E402

RECIPE = Path(__file__).with_name("recipe.yaml")
SEED_NOTE = "base.seed only (weight init, data order, augmentation): training variance at a fixed split"


def recipe_overrides(path: Path = RECIPE) -> dict[str, Any]:
    """The recipe as dotted params overrides (``{"train.epochs": 60, ...}``)."""
    from tasks.tracking import flatten

    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise SystemExit(f"{path}: expected a mapping of params groups (as in params.yaml)")
    return flatten(raw)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["train.lr=0.001", "base.class_names=null"]`` -> dotted overrides.

    A value is read as JSON when it parses (numbers, ``true``/``false``, ``null``, ``[28, 28]``), else kept as a
    string (``evaluate.threshold=val``); the schema then validates it.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.001")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def resolve_input(data: str | None, flag: str, size: int) -> Path:
    """The MedMNIST .npz: ``data`` when given, else ``$MEDMNIST_ROOT/<official name>`` (exits with the reason)."""
    from tasks.sources import medmnist as source

    try:
        return source.resolve(data, flag, size).resolve()
    except source.MedMNISTError as exc:
        raise SystemExit(f"medmnist benchmark: {exc}") from None


def timed_steps(
    params: Params, data_dir: Path, steps: int = 100, warmup: int = 3, recipe_work: bool = False
) -> dict[str, Any]:
    """A bare PyTorch training loop on the same model, optimiser, batch size and cached tensors as the pipeline,
    timed per phase.

    With ``recipe_work`` False it does nothing but gather, forward, backward and step (no augmentation, EMA,
    progress bar, metrics, checkpoints or tracking); with True it also runs the recipe's batched augmentation and
    EMA update, so that what the pipeline adds beyond it is its own plumbing.

    Returns:
        ``{"samples_per_s": float, "ms": {"data", "forward", "backward", "optimizer"}}`` (ms per step).
    """
    import numpy as np
    import torch

    from tasks.models.augment import augment_batch
    from tasks.models.fit import autocast_context, configure_torch
    from tasks.models.networks import ModelSpec, build_model

    meta = json.loads((data_dir / "meta.json").read_text())
    tp = params.train
    spec = ModelSpec(tp.family, tp.arch, meta["spatial_dims"], meta["in_channels"], meta["num_classes"],
                     tuple(meta["input_shape"]), tuple(meta["class_names"]), tp.width, tp.stem_stride,
                     tp.svm.feature_size)  # fmt: skip
    device = configure_torch(params.base.seed, tp)
    x = torch.from_numpy(np.load(data_dir / "train_x.npy")).float()
    y = torch.from_numpy(np.load(data_dir / "train_y.npy"))
    fmt = torch.channels_last_3d if spec.spatial_dims == 3 and spec.family == "cnn" else torch.contiguous_format
    model = build_model(spec).to(device).to(memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    ema = None
    if recipe_work and tp.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tp.ema), use_buffers=True)
    gen = torch.Generator().manual_seed(0)
    bs = min(tp.batch_size, len(y))

    def batch():
        idx = torch.randint(0, len(y), (bs,), generator=gen)
        xb = augment_batch(x[idx], gen, tp.augmentation) if recipe_work and tp.augment else x[idx]
        return xb.to(device).contiguous(memory_format=fmt), y[idx].to(device)

    return time_loop(model, opt, ema, torch.nn.CrossEntropyLoss(), batch, bs, device, steps, warmup,
                     autocast=autocast_context(tp.precision, device))  # fmt: skip


def time_loop(model, opt, ema, loss_fn, batch, bs: int, device, steps: int, warmup: int,
              autocast=None) -> dict[str, Any]:  # fmt: skip
    """Time ``warmup + steps`` bare training steps (the last ``steps`` count), per phase: ``batch()`` (gather and
    augmentation, returning inputs and targets on the device), forward + loss, backward, optimiser step + EMA update.
    ``autocast``: the forward's context factory (:func:`tasks.models.fit.autocast_context`, as the trainer uses it;
    None: float32); the loss takes float32 logits, as in the trainer.

    Returns:
        ``{"samples_per_s": float, "ms": {"data", "forward", "backward", "optimizer"}}`` (ms per step).
    """
    import contextlib

    import torch

    autocast = autocast or contextlib.nullcontext
    totals = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        xb, yb = batch()
        t1 = time.perf_counter()
        with autocast():
            logits = model(xb)
        loss = loss_fn(logits.float(), yb)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t4 = time.perf_counter()
        if step >= warmup:
            for k, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                totals[k] += dt
    return {"samples_per_s": bs * steps / sum(totals.values()), "ms": {k: 1000 * v / steps for k, v in totals.items()}}


def write_figures(path: Path | None, res: dict[str, Any]) -> None:
    """Write a benchmark's figures as JSON to ``path`` (parents created) and say where; nothing for None."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"figures -> {path}")


def default_medmnist_root() -> None:
    """Without $MEDMNIST_ROOT, use ../shared/data/medmnist beside the checkout when it exists."""
    if not os.environ.get("MEDMNIST_ROOT"):
        shared = REPO.parent / "shared/data/medmnist"
        if shared.is_dir():
            os.environ["MEDMNIST_ROOT"] = str(shared)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]


def check_data_hash(model_dir: Path, expected: str) -> str:
    """The data hash train recorded for ``model_dir`` (and tagged as the run's ``dvc_data_hash``), checked against
    ``expected``, the hash of the files it was given.

    Raises:
        RuntimeError: naming the provenance file when the two differ (the run would point at other data).
    """
    from tasks.train import PROVENANCE

    path = model_dir / PROVENANCE
    recorded = json.loads(path.read_text())["data_hash"]
    if recorded != expected:
        raise RuntimeError(f"{path}: data_hash {recorded} (also the run's dvc_data_hash tag), but the tensors it "
                           f"trained on hash to {expected}")
    return recorded


def benchmark_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe file plus ``--set`` and ``--epochs``, as dotted overrides; the sweep name hashes exactly these."""
    recipe = {**recipe_overrides(args.recipe), **parse_sets(args.set)}
    if args.epochs is not None:
        recipe["train.epochs"] = args.epochs
    if "base.seed" in recipe:
        raise SystemExit("base.seed is the benchmark's seed axis: give it with --seeds, not in the recipe or --set")
    return recipe


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Ingest and preprocess once, then train and evaluate per seed; returns the figures (the ``--out`` JSON)."""
    from tasks import evaluate, ingest, preprocess, provenance, tracking, train

    flag = args.dataset.lower()
    npz = resolve_input(args.data, flag, args.size)
    recipe = benchmark_recipe(args)
    sweep = args.sweep or f"{flag}-{args.size}-recipe-{provenance.params_hash(recipe)[:6]}"  # new recipe, new sweep
    base = {
        **recipe, "base.dataset": f"{flag}_{args.size}", "base.sweep": sweep, "base.experiment": args.experiment,
        "ingest.source": "medmnist", "ingest.labels_csv": None, "ingest.input": str(npz),
    }  # fmt: skip
    work = Path(args.work or REPO / "benchmarks/runs" / f"{flag}_{args.size}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)  # the MLflow store (mlflow/) is the project's unless MLFLOW_TRACKING_URI says otherwise
    params = load_params(REPO / "params.yaml", {**base, "base.seed": args.seeds[0]})
    source_hash = provenance.file_hash(npz)
    t = time.perf_counter()
    ing = ingest.run(params.ingest, work / "ingested", class_names=params.base.class_names,
                     split_seed=params.base.split_seed, input_path=npz, progress=True)  # fmt: skip
    pre_dir = work / "preprocessed"
    pre = preprocess.run(params.preprocess, work / "ingested", pre_dir, params.base.class_names,
                         params.base.positive_class)  # fmt: skip
    prep_s = time.perf_counter() - t
    data_hash = provenance.file_hash(pre_dir)  # what every seed's train run must be tagged with
    print(f"{flag} {args.size}: {pre.meta['input_shape']} x {pre.counts} ({ing.summary['source']} {npz.name}, "
          f"{source_hash}), ingest + preprocess {prep_s:.0f} s; training data {data_hash}\n"
          f"seeds {list(args.seeds)} vary {SEED_NOTE} (official MedMNIST splits; "
          f"evaluate.bootstrap_seed {params.evaluate.bootstrap_seed} fixed)", flush=True)

    rows = []
    for seed in args.seeds:
        p = load_params(REPO / "params.yaml", {**base, "base.seed": seed})
        info = train.RunInfo(p.base.experiment, p.base.dataset, p.base.sweep, p.base.seed)
        out = work / f"seed{seed}"
        t = time.perf_counter()
        tr = train.run(p.train, pre_dir, out / "model", out / "ckpt", out / "history.csv",
                       work / "ingested/summary.json", info)  # fmt: skip
        train_s = time.perf_counter() - t
        recorded = check_data_hash(out / "model", data_hash)
        tracking.set_tags(tr.run_id, {"source_data_hash": source_hash, "source_file": npz.name})
        ev = evaluate.run(p.evaluate, out / "model", pre_dir, out / "evaluate")
        tracking.end_run(tr.run_id)  # evaluate is this run's last stage here (no export or promote)
        bare = bare_recipe = breakdown = None
        if args.bare_steps > 0:
            bare = timed_steps(p, pre_dir, steps=args.bare_steps)["samples_per_s"]
            timed = timed_steps(p, pre_dir, steps=args.bare_steps, recipe_work=True)
            bare_recipe, breakdown = timed["samples_per_s"], timed["ms"]
        sps = statistics.fmean(h["samples_per_s"] for h in tr.history)
        m = ev.metrics
        row = {
            "seed": seed, "run_id": tr.run_id, "best_epoch": tr.best_epoch, "data_hash": recorded,
            "auc": m["test_auc"], "auc_ci": [m["test_auc_ci_low"], m["test_auc_ci_high"]],
            "acc": m["test_accuracy"], "acc_ci": [m["test_accuracy_ci_low"], m["test_accuracy_ci_high"]],
            "threshold": m["test_threshold"], "val_auc": tr.val_metrics.get("val_auc"),
            "minutes": train_s / 60, "samples_per_s": sps, "bare_loop_samples_per_s": bare,
            "bare_loop_with_augment_ema_samples_per_s": bare_recipe, "step_breakdown_ms": breakdown,
        }  # fmt: skip
        rows.append(row)
        speed = f"{row['minutes']:.1f} min, {sps:.0f} samples/s"
        if bare is not None and bare_recipe is not None:
            speed += (f" (bare loop {bare:.0f}, ratio {sps / bare:.2f}; with augmentation + EMA {bare_recipe:.0f}, "
                      f"ratio {sps / bare_recipe:.2f})")
        print(f"seed {seed}: test AUC {row['auc']:.3f} [{row['auc_ci'][0]:.3f}, {row['auc_ci'][1]:.3f}]  "
              f"ACC {row['acc']:.3f} [{row['acc_ci'][0]:.3f}, {row['acc_ci'][1]:.3f}]  {speed}", flush=True)
    tracking.end_sweep(args.experiment, sweep)
    auc_m, auc_sd = mean_sd([r["auc"] for r in rows])
    acc_m, acc_sd = mean_sd([r["acc"] for r in rows])
    return {
        "dataset": flag, "size": args.size, "seeds": list(args.seeds), "sweep": sweep, "experiment": args.experiment,
        "seeds_vary": SEED_NOTE, "split": "official MedMNIST train/val/test (base.split_seed does not apply)",
        "split_seed": params.base.split_seed, "bootstrap_seed": params.evaluate.bootstrap_seed,
        "input": {"file": npz.name, "hash": source_hash}, "data_hash": data_hash,
        "auc_mean": auc_m, "auc_sd": auc_sd, "acc_mean": acc_m, "acc_sd": acc_sd,
        "minutes_per_seed": statistics.fmean(r["minutes"] for r in rows),
        "samples_per_s": statistics.fmean(r["samples_per_s"] for r in rows),
        "bare_loop_samples_per_s": _mean_or_none([r["bare_loop_samples_per_s"] for r in rows]),
        "bare_loop_with_augment_ema_samples_per_s": _mean_or_none(
            [r["bare_loop_with_augment_ema_samples_per_s"] for r in rows]),
        "threads": params.train.num_threads or os.cpu_count(), "step_breakdown_ms": rows[-1]["step_breakdown_ms"],
        "batch_size": params.train.batch_size,
        # the overrides (the input path is machine-specific: it is recorded above as its file name and hash)
        "recipe": {k: v for k, v in base.items() if k != "ingest.input"}, "per_seed": rows,
    }  # fmt: skip


def format_table(res: dict[str, Any]) -> str:
    """The printed comparison: ours (mean ± sd, per-seed CIs) beside every published row for the set."""
    lines = [f"{res['dataset']} ({res['size']}), {len(res['seeds'])} seeds {res['seeds']}: mean ± sd over "
             f"{res['seeds_vary']} ({res['split']}; evaluate.bootstrap_seed {res['bootstrap_seed']})",
             f"{'method':<28}{'test AUC':>18}{'test ACC':>18}"]
    lines.append(f"{'medpipe (this recipe)':<28}{res['auc_mean']:>10.3f} ± {res['auc_sd']:.3f}"
                 f"{res['acc_mean']:>11.3f} ± {res['acc_sd']:.3f}")
    for r in res["per_seed"]:
        lines.append(f"{'  seed ' + str(r['seed']) + ' (95% CI)':<28}"
                     f"{r['auc']:>7.3f} [{r['auc_ci'][0]:.3f},{r['auc_ci'][1]:.3f}]"
                     f"{r['acc']:>7.3f} [{r['acc_ci'][0]:.3f},{r['acc_ci'][1]:.3f}]")
    for method, auc, acc in paper_rows(res["dataset"]):
        lines.append(f"{method:<28}{auc:>10.3f}{'':>8}{acc:>11.3f}")
    b = res["step_breakdown_ms"]
    if b:
        total = sum(b.values())
        lines.append(f"one training step (batch {res['batch_size']}): " + ", ".join(
            f"{k} {v:.0f} ms ({v / total:.0%})" for k, v in b.items()))
    lines.append(f"tracked as sweep {res['sweep']}: python -m tasks.reporting.report --experiment {res['experiment']} "
                 f"--sweep {res['sweep']}; training data {res['data_hash']} (the runs' dvc_data_hash)")
    speed = (f"train: {res['minutes_per_seed']:.1f} min/seed on {res['threads']} threads, "
             f"{res['samples_per_s']:.0f} samples/s")
    bare, bare_recipe = res["bare_loop_samples_per_s"], res["bare_loop_with_augment_ema_samples_per_s"]
    if bare and bare_recipe:
        speed += (f"; bare PyTorch loop {bare:.0f} samples/s; pipeline/bare {res['samples_per_s'] / bare:.2f}; "
                  f"bare loop with the same augmentation + EMA {bare_recipe:.0f} samples/s, pipeline/that "
                  f"{res['samples_per_s'] / bare_recipe:.2f}")
    else:
        speed += " (bare loop not timed: --bare-steps 0)"
    lines.append(speed)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="adrenalmnist3d", help="MedMNIST flag, e.g. adrenalmnist3d, pneumoniamnist")
    ap.add_argument("--size", type=int, default=28, choices=[28, 64, 128, 224])
    ap.add_argument("--data", default=None, help="the .npz (default: $MEDMNIST_ROOT/<official name>)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="training seeds (base.seed); the split and the bootstrap seed stay fixed")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra params override (value read as JSON when it parses), e.g. train.lr=0.001")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs override (part of the recipe hash)")
    ap.add_argument("--sweep", default=None, help="MLflow parent run (default <dataset>-<size>-recipe-<hash>)")
    ap.add_argument("--experiment", default="medmnist-benchmark")
    ap.add_argument("--work", default=None, help="working folder (default benchmarks/runs/<dataset>_<size>)")
    ap.add_argument("--bare-steps", type=int, default=100, help="steps of the bare-loop timing; 0 skips it")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    if args.out:
        args.out = args.out.resolve()  # the run changes directory to the repository
    if args.data is None:
        default_medmnist_root()
    res = run_benchmark(args)
    print()
    print(format_table(res))
    write_figures(args.out, res)


if __name__ == "__main__":
    main()
