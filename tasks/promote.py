"""Stage 6: register the exported model in MLflow and alias it ``champion`` or ``challenger``.

Inputs: ``<model>/`` from train (val_metrics.json; the weights' hash finds the MLflow run), ``<export>/`` from
export (the .mlpackage, model.onnx, export.json) and evaluate's metrics.json. The new version is a pyfunc
(:mod:`tasks.coreml.pyfunc`) holding the Core ML package and its ONNX sibling. Its tags are what a reviewer reads in
the registry list (:func:`version_tags`: the promotion metric and its test counterpart, the threshold, the alias and
why, the git commit, the data and params hashes, the weights' sha256); the full record (every validation and test
metric, the export record) is ``registry/<name>-v<version>.json`` in the version's run.

Promotion rule: the new version becomes ``champion`` when its ``promote.metric`` (a validation metric, from
val_metrics.json; the test set stays out of model selection) beats the champion's tag of the same name, or when
there is no champion yet; otherwise it becomes ``challenger``. A champion without that tag cannot be compared and
is kept: the new version is the challenger and a person decides. A run inside a DVC experiment
(``DVC_EXP_NAME`` set: the flow's overrides, ``dvc exp run``) is registered but never takes ``champion``.
Output: ``registry.json``. This is the last stage, so it ends the MLflow run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks import provenance, tracking
from tasks.schema import PromoteParams


@dataclass(frozen=True)
class PromoteResult:
    model_name: str
    version: str
    alias: str
    run_id: str
    metric: str
    value: float
    previous_champion: str | None
    previous_value: float | None
    reason: str


def _read_json(path: Path, producer: str) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (did the {producer} stage run?)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def decide(value: float, champion: str | None, champion_value: float | None, greater_is_better: bool,
           metric: str) -> tuple[str, str]:
    """The alias for a new version with ``value``, and why.

    Args:
        value: the new version's metric (NaN never wins).
        champion: the current champion's version, or None.
        champion_value: its tag ``metric``, or None when it has none.
        greater_is_better: direction of ``metric``.
        metric: the metric's name, for the reason.

    Returns:
        (``champion`` or ``challenger``, a one-line reason).
    """
    if champion is None:
        return tracking.CHAMPION, "no champion yet"
    if champion_value is None:
        return tracking.CHALLENGER, f"champion v{champion} has no {metric} tag to compare with; a person decides"
    if math.isnan(value):
        return tracking.CHALLENGER, f"{metric} is NaN"
    if math.isnan(champion_value):
        return tracking.CHAMPION, f"{metric} {value:.4f} replaces champion v{champion}'s NaN"
    better = value > champion_value if greater_is_better else value < champion_value
    relation = "beats" if better else "does not beat"
    return (tracking.CHAMPION if better else tracking.CHALLENGER), (
        f"{metric} {value:.4f} {relation} champion v{champion} ({champion_value:.4f})"
    )


def recorded(value: float) -> float:
    """``value`` as a version tag records it (6 significant digits): what the next promotion compares with, so a
    candidate is compared at the same precision (0.9445942... would otherwise "beat" its own recorded 0.944594)."""
    return float(f"{value:.6g}")


def version_tags(metric: str, val: dict[str, float], test: dict[str, float], record: dict[str, Any],
                 model_hash: str, promotion: str) -> dict[str, str]:
    """The tags of a new model version: what a reviewer reads in the registry list (at most
    :data:`tasks.tracking.MAX_VERSION_TAGS`; everything else goes to the version's JSON artifact).

    Args:
        metric: ``promote.metric`` (a validation metric; its tag is what the next promotion compares with).
        val: val_metrics.json. test: evaluate's metrics.json (its test counterpart and ``threshold`` are tagged).
        record: export.json (its ``metadata`` holds the data and params hashes).
        model_hash: the weights' sha256 (also in the Core ML package's metadata).
        promotion: the alias given and why.
    """
    counterpart = "test_" + metric.removeprefix("val_")
    tags = {
        metric: f"{val[metric]:.6g}",
        **({counterpart: f"{test[counterpart]:.6g}"} if counterpart in test else {}),
        **({"threshold": f"{test['threshold']:.6g}"} if "threshold" in test else {}),
        "promotion": promotion,
        "git_commit": provenance.git_commit(),
        "dvc_data_hash": record["metadata"].get("dvc_data_hash", "unknown"),
        "params_hash": record["metadata"].get("params_hash", "unknown"),
        "model_sha256": model_hash,
    }
    return tags


def run(pp: PromoteParams, model_dir: Path, export_dir: Path, metrics_path: Path, output: Path,
        model_name: str) -> PromoteResult:  # fmt: skip
    """Register the exported model as a new version, alias it, write ``output`` and end the MLflow run.

    Args:
        pp: the ``promote`` params group. model_dir: train's output (val_metrics.json; the model's hash finds its
            MLflow run). export_dir: export's output. metrics_path: evaluate's metrics.json. output: registry.json.
        model_name: the task's ``model_name`` (``tasks.<task>.model_name``), the registered model.
    """
    from tasks.coreml import pyfunc as coreml_pyfunc
    from tasks.models.networks import weights_hash

    name, metric = model_name, pp.metric
    val_path = model_dir / "val_metrics.json"
    val = _numbers(_read_json(val_path, "train"))
    if metric not in val:
        raise KeyError(f"{val_path}: no {metric!r} (promote.metric); it has {sorted(val)}")
    test = _numbers(_read_json(metrics_path, "evaluate"))
    record = _read_json(export_dir / "export.json", "export")
    artifacts = {
        coreml_pyfunc.ARTIFACT_PACKAGE: export_dir / record["package"],
        coreml_pyfunc.ARTIFACT_ONNX: export_dir / record["onnx"],
        coreml_pyfunc.ARTIFACT_EXPORT_JSON: export_dir / "export.json",
    }
    for key, path in artifacts.items():
        if not path.exists():
            raise FileNotFoundError(f"{path}: {key} named in {export_dir / 'export.json'} is missing; rerun export")
    model_hash = weights_hash(model_dir)
    run_id = tracking.run_for_model(model_hash, model_dir)

    champion = tracking.alias_version(name, tracking.CHAMPION)
    champion_value = tracking.champion_metric(name, metric) if champion else None
    alias, reason = decide(recorded(val[metric]), champion, champion_value, pp.greater_is_better, metric)
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment and alias == tracking.CHAMPION:  # overrides are trials: what is committed becomes the champion
        alias, reason = tracking.CHALLENGER, (f"DVC experiment {experiment}: experiments never take @champion "
                                              f"(would have: {reason}); `dvc exp apply` and commit it to promote")
    tags = version_tags(metric, val, test, record, model_hash, f"@{alias}: {reason}")
    details = {
        "alias": alias, "reason": reason, "previous_champion": champion, "previous_value": champion_value,
        "validation": val, "test": test, "export": {k: v for k, v in record.items() if k != "metadata"},
        "provenance": record["metadata"],
    }
    version = tracking.log_and_register_pyfunc(
        run_id, name, Path(coreml_pyfunc.__file__), {k: v for k, v in artifacts.items()}, tags,
        tuple(record["input_shape"]), list(record["class_names"]), coreml_pyfunc.pip_requirements(), details,
        task_kind=record.get("task_kind", "classification"),
    )
    tracking.set_alias(name, alias, version)
    result = PromoteResult(name, version, alias, run_id, metric, val[metric], champion, champion_value, reason)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(asdict(result), indent=2) + "\n")
    tracking.set_tags(run_id, {"registered_model": name, "registered_version": version, "registered_alias": alias})
    tracking.end_run(run_id)
    return result


def main(argv: list[str] | None = None) -> None:
    from tasks.config import HelpFormatter, load_params_or_exit
    from tasks.noise import silence_known_noise

    silence_known_noise()
    ap = argparse.ArgumentParser(prog="python -m tasks.promote", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter,
                                 epilog="Settings (metric, greater_is_better) are the params file's `promote` group; "
                                        "the registered model's name is the task's model_name.")  # fmt: skip
    ap.add_argument("--params", default="params.yaml", help="the params file")
    ap.add_argument("--task", default="classify",
                    help="the task (params.yaml `tasks`): its model_name, and its overrides of the promote group")
    ap.add_argument("--model", type=Path, default=Path("models/classify/train"),
                    help="train's output folder: val_metrics.json has promote.metric; the weights' hash finds the "
                         "MLflow run")
    ap.add_argument("--export", type=Path, default=Path("models/classify/export"),
                    help="export's output folder: the .mlpackage, model.onnx and export.json that the registered "
                         "pyfunc serves")
    ap.add_argument("--metrics", type=Path, default=Path("reports/classify/evaluate/metrics.json"),
                    help="evaluate's headline test metrics; the version is tagged with the test counterpart of "
                         "promote.metric and the threshold")
    ap.add_argument("--output", type=Path, default=Path("models/classify/registry.json"),
                    help="where the registered version, its alias and the reason are written")
    args = ap.parse_args(argv)
    params = load_params_or_exit(args.params, task=args.task)
    res = run(params.promote, args.model, args.export, args.metrics, args.output, params.task.model_name)
    print(f"promote: {res.model_name} version {res.version} -> @{res.alias} ({res.reason}); "
          f"load with mlflow.pyfunc.load_model('models:/{res.model_name}@{res.alias}')")


if __name__ == "__main__":
    main()
