"""The results table of a sweep, regenerated from the tracked MLflow runs: Markdown, LaTeX and a ROC plot.

    python -m tasks.reporting.report --sweep adrenalmnist3d-28-benchmark --experiment medmnist-benchmark
    python -m tasks.reporting.report --sweep seeds-2026-11 --out reports/results     # a `dvc exp run --queue` grid

Runs nested under the sweep's parent run are grouped by configuration (every param but the seed); each group
gets test AUC and ACC as mean ± sd over seeds with the per-seed bootstrap 95% CIs, and, for a MedMNIST set, the
published MedMNIST v2 rows beside it. Writes ``<out>/<sweep>.md``, ``.tex`` and ``_roc.png`` (one ROC curve per
seed, from each run's logged predictions). Output depends only on the runs' logged values, in a fixed order, so
re-running with nothing changed writes the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import tracking
from tasks.reporting.paper import paper_rows

IGNORED_PARAMS = ("base.seed", "base.sweep")


@dataclass
class Group:
    """The runs of one configuration (all params equal but the seed)."""

    label: str
    dataset: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float]:
        values = [r[key] for r in self.runs]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(experiment: str, sweep: str) -> list[Group]:
    """Evaluated child runs of the sweep, grouped by configuration, seeds ascending."""
    groups: dict[str, Group] = {}
    for run in tracking.sweep_children(experiment, sweep):
        m, p, tags = run.data.metrics, run.data.params, run.data.tags
        if "test_auc" not in m:  # not evaluated (still training, failed, or the sweep's parent)
            continue
        config = {k: v for k, v in sorted(p.items()) if k not in IGNORED_PARAMS and not k.startswith("data.")}
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        dataset = p.get("base.dataset", "?")
        label = f"{tags.get('model_family', '?')}/{tags.get('arch', '?')}"
        g = groups.setdefault(key, Group(label=f"{label} [{key}]", dataset=dataset))
        g.runs.append({
            "seed": int(p.get("base.seed", 0)), "run_id": run.info.run_id,
            "auc": m["test_auc"], "auc_lo": m.get("test_auc_ci_low", float("nan")),
            "auc_hi": m.get("test_auc_ci_high", float("nan")), "acc": m["test_accuracy"],
            "acc_lo": m.get("test_accuracy_ci_low", float("nan")),
            "acc_hi": m.get("test_accuracy_ci_high", float("nan")),
            "val_auc": m.get("selected_val_auc", m.get("val_auc", float("nan"))),
            "minutes": m.get("train_minutes", float("nan")),
        })  # fmt: skip
    for g in groups.values():
        g.runs.sort(key=lambda r: r["seed"])
    if len({g.label.split(" [")[0] for g in groups.values()}) == len(groups):  # hashes only where labels clash
        for g in groups.values():
            g.label = g.label.split(" [")[0]
    return sorted(groups.values(), key=lambda g: g.label)


def medmnist_flag(dataset: str) -> str:
    """``adrenalmnist3d_28`` -> ``adrenalmnist3d``."""
    return re.sub(r"_(28|64|128|224)$", "", dataset.lower())


def markdown(sweep: str, groups: list[Group]) -> str:
    lines = [f"# Results: {sweep}", "", "| method | seeds | test AUC | test ACC | per-seed AUC [95% CI] | "
             "per-seed ACC [95% CI] |", "|---|---|---|---|---|---|"]
    datasets = sorted({g.dataset for g in groups})
    for g in groups:
        (am, asd), (cm, csd) = g.stat("auc"), g.stat("acc")
        per_auc = "; ".join(f"{r['auc']:.3f} [{r['auc_lo']:.3f}, {r['auc_hi']:.3f}]" for r in g.runs)
        per_acc = "; ".join(f"{r['acc']:.3f} [{r['acc_lo']:.3f}, {r['acc_hi']:.3f}]" for r in g.runs)
        seeds = ",".join(str(r["seed"]) for r in g.runs)
        lines.append(f"| **medpipe {g.label}** ({g.dataset}) | {seeds} | **{am:.3f} ± {asd:.3f}** | "
                     f"**{cm:.3f} ± {csd:.3f}** | {per_auc} | {per_acc} |")
    for ds in datasets:
        for method, auc, acc in paper_rows(medmnist_flag(ds)):
            lines.append(f"| {method} (MedMNIST v2) | | {auc:.3f} | {acc:.3f} | | |")
    lines += ["", "Mean ± sd over seeds; intervals are per-seed bootstrap 95% CIs on the test split. MedMNIST v2 rows: "
              "Yang et al., Scientific Data 2023."]
    return "\n".join(lines) + "\n"


def latex(sweep: str, groups: list[Group]) -> str:
    esc = lambda s: re.sub(r"([_%&#$])", r"\\\1", s)  # noqa: E731
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{lcc}", r"\toprule",
             r"Method & Test AUC & Test ACC \\", r"\midrule"]
    for g in groups:
        (am, asd), (cm, csd) = g.stat("auc"), g.stat("acc")
        lines.append(rf"medpipe {esc(g.label)} ({len(g.runs)} seeds) & $\mathbf{{{am:.3f} \pm {asd:.3f}}}$ & "
                     rf"$\mathbf{{{cm:.3f} \pm {csd:.3f}}}$ \\")
    rows = [row for ds in sorted({g.dataset for g in groups}) for row in paper_rows(medmnist_flag(ds))]
    if rows:
        lines.append(r"\midrule")
        lines += [rf"{esc(m)} & {auc:.3f} & {acc:.3f} \\" for m, auc, acc in rows]
    caption = esc(f"{sweep}: mean ± sd over seeds on the test split").replace("±", r"$\pm$")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def roc_png(path: Path, groups: list[Group]) -> None:
    """One ROC curve per seed and configuration, from each run's logged ``evaluate/predictions.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    with tempfile.TemporaryDirectory() as tmp:
        for g in groups:
            for r in g.runs:
                local = tracking.download_artifact(r["run_id"], "evaluate/predictions.csv", Path(tmp) / r["run_id"])
                with local.open(newline="") as fh:
                    rows = list(csv.DictReader(fh))
                prob_cols = [c for c in rows[0] if c.startswith("p_")]
                if len(prob_cols) != 2:
                    continue  # multi-class: no single ROC curve
                positive = prob_cols[1][2:]
                y = np.array([row["actual"] == positive for row in rows], dtype=int)
                fpr, tpr, _ = roc_curve(y, np.array([float(row[prob_cols[1]]) for row in rows]))
                ax.plot(fpr, tpr, lw=1.2, label=f"{g.label} seed {r['seed']} (AUC {r['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Test ROC per seed")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def run(experiment: str, sweep: str, output: Path) -> list[Path]:
    """Write the sweep's Markdown, LaTeX and ROC PNG; returns their paths."""
    groups = collect(experiment, sweep)
    if not groups:
        raise ValueError(f"sweep {sweep!r} in experiment {experiment!r} ({tracking.tracking_uri()}) has no "
                         "evaluated runs")
    output.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^0-9A-Za-z._-]+", "_", sweep)
    md, tex, png = output / f"{stem}.md", output / f"{stem}.tex", output / f"{stem}_roc.png"
    md.write_text(markdown(sweep, groups))
    tex.write_text(latex(sweep, groups))
    roc_png(png, groups)
    return [md, tex, png]


def main(argv: list[str] | None = None) -> None:
    from tasks.config import HelpFormatter

    ap = argparse.ArgumentParser(prog="python -m tasks.reporting.report", description=__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--sweep", required=True, help="the sweep name (base.sweep of its runs)")
    ap.add_argument("--experiment", default="medpipe", help="MLflow experiment the sweep ran in (base.experiment)")
    ap.add_argument("--out", type=Path, default=Path("reports/results"),
                    help="folder for <sweep>.md, <sweep>.tex and <sweep>_roc.png")
    args = ap.parse_args(argv)
    try:
        paths = run(args.experiment, args.sweep, args.out)
    except ValueError as exc:
        raise SystemExit(f"report: {exc}") from None
    print(paths[0].read_text())
    print("written: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
