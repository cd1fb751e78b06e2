"""The training loop's overhead over a bare PyTorch loop, timed A/B/A/B on the same tensors in one process.

    python benchmarks/overhead.py --data benchmarks/runs/seg_busi/split1/preprocessed --out FILE.json
    python benchmarks/overhead.py --data DIR --steps 4 --rounds 2          # a smoke run

A full benchmark run compares the train stage's mean samples/s over ~20 minutes with a bare loop timed in two
30-step windows; on a shared 2-core machine the speed drifts (one BUSI run's epochs ranged 21-31 samples/s with
nothing else running), so that ratio carries the drift. Here the two alternate in short rounds: round r times one
epoch of the pipeline's own trainer (:class:`tasks.models.segfit.SegFit`'s ``train_epoch``: batch gather and
augmentation, autocast, loss, backward, AdamW, LR schedule, EMA, loss read-back, voxel accuracy, progress bar) over
the first ``steps x batch`` training samples, then ``steps`` steps of the bare loop
(:func:`benchmarks.segmentation.timed_seg_steps`: the same network, loss, augmentation, EMA and precision, nothing
else). The ratio is median(pipeline) / median(bare) over the rounds; per-round figures are kept.

The recipe is ``benchmarks/seg_recipe.yaml`` (``--recipe``) as :func:`benchmarks.segmentation.split_params` builds it;
``--data`` is a preprocessed folder of a segmentation task (``train_x.npy``, ``train_m.npy``, ``meta.json``), e.g. one
a segmentation benchmark run left in its work folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.medmnist import parse_sets, recipe_overrides, write_figures  # noqa: E402
from benchmarks.segmentation import RECIPE, split_params, timed_seg_steps  # noqa: E402


def interleaved_overhead(params: Any, data_dir: Path, steps: int, rounds: int, warmup: int = 1) -> dict[str, Any]:
    """Alternate one trainer epoch of ``steps`` batches and ``steps`` bare steps, ``warmup + rounds`` times; the
    first ``warmup`` rounds are not counted (the trainer's first epoch pays for allocation, as the bare loop's first
    two steps do, which it leaves out; the benchmark's mean leaves out the first epoch likewise).

    Returns:
        ``{"pipeline_samples_per_s": [...], "bare_samples_per_s": [...], "ratio": median / median, "steps",
        "batch_size"}``.
    """
    import numpy as np
    import torch

    from tasks.models.fit import Splits, configure_torch
    from tasks.models.segfit import SegFit
    from tasks.train import model_spec

    tp = params.train
    meta = json.loads((data_dir / "meta.json").read_text())
    n = steps * tp.batch_size
    x = torch.from_numpy(np.load(data_dir / "train_x.npy", mmap_mode="r")[:n].astype(np.float32))
    m = torch.from_numpy(np.load(data_dir / "train_m.npy", mmap_mode="r")[:n].astype(np.int64))
    if len(x) < n:
        raise SystemExit(f"{data_dir}: {len(x)} training samples, {n} needed for {steps} steps of {tp.batch_size}")
    y = torch.zeros(n, dtype=torch.long)
    data = Splits(x, y, x[: tp.batch_size], y[: tp.batch_size], meta, train_m=m, val_m=m[: tp.batch_size])
    device = configure_torch(params.base.seed, tp)
    pipe, bare = [], []
    with tempfile.TemporaryDirectory() as ckpt:
        job = SegFit(tp, model_spec(tp, meta), data, params.base.seed, 0, device, Path(ckpt), "overhead")
        for r in range(warmup + rounds):
            done = job.train_epoch(r)
            a = done["samples"] / done["seconds"]
            b = timed_seg_steps(params, data_dir, steps=steps, warmup=2)["samples_per_s"]
            what = "warm-up, not counted" if r < warmup else f"round {r + 1 - warmup}/{rounds}"
            print(f"{what}: pipeline {a:.1f} samples/s, bare loop {b:.1f} (ratio {a / b:.3f})", flush=True)
            if r >= warmup:
                pipe.append(a)
                bare.append(b)
    return {"pipeline_samples_per_s": pipe, "bare_samples_per_s": bare, "steps": steps, "batch_size": tp.batch_size,
            "warmup_rounds": warmup, "ratio": statistics.median(pipe) / statistics.median(bare)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, time the rounds, print the figures and write the JSON."""
    from tasks.noise import silence_known_noise

    silence_known_noise()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a segmentation task's preprocessed folder")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--steps", type=int, default=24, help="batches per round, for each of the two loops")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup-rounds", type=int, default=1, help="first rounds timed but not counted")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override in the recipe's terms, e.g. train.batch_size=4")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    params = split_params({**recipe_overrides(args.recipe), **parse_sets(args.set)}, 1)
    res = interleaved_overhead(params, args.data.resolve(), args.steps, args.rounds, args.warmup_rounds)
    res["recipe"] = str(args.recipe.resolve().relative_to(REPO)) if args.recipe.resolve().is_relative_to(REPO) else str(
        args.recipe)
    print(f"pipeline/bare (median of {args.rounds} interleaved rounds): {res['ratio']:.3f}")
    write_figures(args.out, res)


if __name__ == "__main__":
    main()
