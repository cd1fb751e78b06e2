"""Stage 5: export the trained network to Core ML (an ML Program ``.mlpackage``) with a portable ONNX sibling.

Inputs: ``<model>/`` from train (model.json, model.pt, val_metrics.json, provenance.json; the weights' hash finds
the MLflow run) and ``<data>/`` from preprocess (meta.json, test_x.npy). Outputs (``<output>/``), byte for byte the
same when the inputs are (:func:`tasks.coreml.convert.make_deterministic` pins what coremltools randomises):

``<Name>.mlpackage``  Core ML classifier (``classLabel`` + ``classLabel_probs``) or segmenter (``probabilities``,
                      float32 (1, K, *S)), fp32, with provenance metadata
``model.onnx``        the same softmax-wrapped network, dynamic batch (for MLflow serving and non-Apple targets)
``export.json``       package size, parity figures, input contract (a function of the inputs: durations go to
                      MLflow, not here)

A segmenter is recognised by meta.json's ``task_kind: segmentation`` (class_names[0] = ``background``), which must
agree with model.json's (a segmentation architecture); its Core ML output is the per-class softmax map at the
model's input resolution, and the metadata carries the class names, the input spatial size, the spacing and the
preprocess rule that maps a prediction back to the original image (``map_back``).

The Core ML input is what a device has at hand. 2D single-channel data takes an 8-bit grayscale image: the caller
renders the slice with the recorded window (center/width, what a DICOM viewer shows) and the model divides by 255,
which reproduces preprocessing's ``clip((HU - (center - width/2)) / width, 0, 1)`` up to 8-bit quantisation.
Volumes, and channel counts a Core ML image cannot carry, take a float32 MLMultiArray of the preprocessed tensor.

Core ML's ``predict`` runs only on macOS, so on Linux the package is checked by its spec (input, outputs, labels,
metadata) and numerically through its sources: traced and ONNX Runtime probabilities against the eager model on
the test images, failing above ``export.parity_tolerance``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks import tracking
from tasks.coreml import convert as coreml
from tasks.models.networks import ModelSpec, weights_hash
from tasks.schema import ExportParams

if TYPE_CHECKING:
    import torch

EXPORT_JSON = "export.json"
ONNX_FILE = "model.onnx"
ONNX_INPUT, ONNX_OUTPUT = "input", "probabilities"
META_KEYS = ("spatial_dims", "in_channels", "num_classes", "class_names", "spatial_size", "intensity")


class ExportError(RuntimeError):
    """The model cannot be exported, or the export does not match its source."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`run` wrote: ``task_kind`` is ``classification`` or ``segmentation``; parity as in export.json."""

    package: Path
    onnx: Path
    input_kind: str
    package_bytes: int
    parity: dict[str, float]
    durations_s: dict[str, float]
    task_kind: str = coreml.CLASSIFICATION


def read_meta(data_dir: Path) -> dict[str, Any]:
    """Read and check preprocess's ``meta.json``; fails naming the file and the missing key."""
    path = data_dir / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (did the preprocess stage run?)")
    meta = json.loads(path.read_text())
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ExportError(f"{path}: missing key(s) {missing}")
    if meta["intensity"].get("kind") not in ("hu_window", "uint8"):
        raise ExportError(f"{path}: intensity.kind must be 'hu_window' or 'uint8', got {meta['intensity']!r}")
    kind = meta.get("task_kind", coreml.CLASSIFICATION)
    if kind not in (coreml.CLASSIFICATION, coreml.SEGMENTATION):
        raise ExportError(f"{path}: task_kind must be {coreml.CLASSIFICATION!r} or {coreml.SEGMENTATION!r}, "
                          f"got {kind!r}")
    if kind == coreml.SEGMENTATION:
        names = list(meta["class_names"])
        if not names or names[0] != "background" or meta["num_classes"] != len(names):
            raise ExportError(f"{path}: a segmentation task's class_names start with 'background' and num_classes "
                              f"counts it; got class_names {names}, num_classes {meta['num_classes']}")
    return meta


def task_kind_of(spec: ModelSpec, meta: dict[str, Any], model_json: Path, meta_json: Path) -> str:
    """``segmentation`` or ``classification``, from meta.json's ``task_kind`` and the model's architecture.

    Raises:
        ExportError: naming both files when they disagree (a segmentation network on classification data, or the
            reverse).
    """
    data_kind = meta.get("task_kind", coreml.CLASSIFICATION)
    spec_kind = spec.task_kind  # ModelSpec infers it from train.arch
    if data_kind != spec_kind:
        raise ExportError(f"{model_json}: train.arch={spec.arch} is a {spec_kind} model but {meta_json} has task_kind "
                          f"{data_kind!r}; train and preprocess must belong to the same task")
    return data_kind


def map_back_rule(meta: dict[str, Any]) -> dict[str, Any]:
    """How a prediction at the model's resolution goes back to an image's original grid, from meta.json's
    ``resized`` (absent = resized): the rule of preprocess's spatial transforms and where the per-image sizes are.
    ``tasks.spatial.map_back`` is the Python implementation (MONAI's inverse of the recorded transforms)."""
    if meta.get("resized") is False:
        return {"rule": "none: the model input is the image at its ingested size", "spatial_size": None}
    return {
        "rule": "forward: MONAI Resized(spatial_size=max(spatial_size), size_mode='longest') (area for the image, "
                "nearest for masks), then ResizeWithPadOrCrop(spatial_size) (centred, constant 0). Inverse: undo "
                "the centred pad/crop to the resized shape, then resize to orig_shape (nearest for label maps)",
        "spatial_size": list(meta["spatial_size"]),
        "per_image": "{split}_ids.csv column orig_shape (the ingested spatial shape) and spacing (mm)",
        "implementation": "tasks.spatial.map_back",
    }


def load_test_images(data_dir: Path, limit: int) -> np.ndarray:
    """The first ``limit`` (0 = all) test images as float32 (N, C, *S) in [0, 1]."""
    path = data_dir / "test_x.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (did the preprocess stage run?)")
    x = np.load(path, mmap_mode="r")
    return np.asarray(x[:limit] if limit else x, dtype=np.float32)


def with_softmax(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap a logits model so that it outputs class probabilities: softmax over axis 1 of (B, K) or (B, K, *S)."""
    import torch

    class Probabilities(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.net(x), dim=1)

    return Probabilities(model).eval()


def predict_torch(model: Any, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """Probabilities of an eager or traced module on float32 (N, C, *S), in batches."""
    import torch

    with torch.inference_mode():
        return np.concatenate(
            [model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)]
        ) if len(x) else np.zeros((0, 0), np.float32)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """Write ``model`` to ONNX with input ``input`` (N, C, *S) and output ``probabilities``, batch dynamic."""
    import torch

    with warnings.catch_warnings():
        # torch >= 2.9 defaults to the torch.export-based exporter, which needs onnxscript (not a dependency);
        # the TorchScript-based exporter handles these CNN/GRU graphs and only warns that it is legacy.
        warnings.simplefilter("ignore", DeprecationWarning)
        # MONAI's InstanceNorm (no running stats) always normalises by the input's own statistics, so exporting it
        # "with train=True" is exact (the parity check compares it with the eager model); the warning is noise
        warnings.filterwarnings("ignore", message=".*'instance_norm' is set to train=True", category=UserWarning)
        torch.onnx.export(
            model, (example,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}}, opset_version=opset, dynamo=False,
        )


def predict_onnx(path: Path, x: np.ndarray, batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {ONNX_INPUT: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def provenance(
    model_dir: Path, spec: ModelSpec, meta: dict[str, Any], contract: coreml.InputContract
) -> dict[str, str]:
    """The Core ML ``user_defined_metadata``: where the model came from and what its input means (strings only).

    Only values that are a function of the stage's inputs: the weights' sha256 (the MLflow run that trained the
    model carries it as a tag, and the registry version carries the git commit) and the params and data hashes
    train recorded in its provenance.json.
    """
    inten = meta["intensity"]
    spacing = meta.get("spacing") or meta.get("spacing_mm") or meta.get("source_spacing_mm")
    window = {"window_center": f"{inten['center']:g}", "window_width": f"{inten['width']:g}"}
    record_path = model_dir / "provenance.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    out = {
        "model_sha256": weights_hash(model_dir), "dvc_data_hash": record.get("data_hash", "unknown"),
        "params_hash": record.get("params_hash", "unknown"), "family": spec.family, "arch": spec.arch,
        "task_kind": meta.get("task_kind", coreml.CLASSIFICATION),
        "class_names": json.dumps(list(meta["class_names"])), "input_shape": json.dumps(list(contract.shape)),
        "input_kind": contract.kind, "intensity": json.dumps(inten), "spacing_mm": json.dumps(spacing),
        **(window if inten["kind"] == "hu_window" else {}),
    }
    if out["task_kind"] == coreml.SEGMENTATION:
        k, spatial = len(meta["class_names"]), list(meta["spatial_size"])
        out.update({
            "spatial_size": json.dumps(spatial), "output_name": coreml.SEG_OUTPUT,
            "output_shape": json.dumps([1, k, *spatial]),
            "output_layout": "(batch, class, D, H, W)" if len(spatial) == 3 else "(batch, class, H, W)",
            "output_meaning": "softmax probability per class; label map = argmax over the class axis (0 = "
                              "background)",
            "map_back": json.dumps(map_back_rule(meta), sort_keys=True),
        })
    return out


def _check_svm(spec: ModelSpec) -> None:
    from importlib.metadata import version

    raise ExportError(
        f"train.family={spec.family}: the SVM baseline has no Core ML export. coremltools 9.0 disables its "
        f"scikit-learn converter for scikit-learn > 1.5.1 (installed: {version('scikit-learn')}), and even where it "
        "runs it yields a NeuralNetwork-era pipeline model with no ONNX sibling to check parity against. "
        "Set train.family to cnn or rnn to export."
    )


def run(ep: ExportParams, model_dir: Path, data_dir: Path, output: Path, model_name: str) -> ExportResult:
    """Export the trained model; see the module docstring for what is written and checked.

    Args:
        ep: the task's ``export`` params group. model_dir: train's output. data_dir: preprocess's output (meta.json
            and the test images used for the parity check). output: the export folder. model_name: the task's
            ``model_name`` (names the ``.mlpackage``).

    Raises:
        ExportError: for an SVM, a spec that does not match (input shape, class names, task kind), or parity above
            ``export.parity_tolerance``.
    """
    spec = ModelSpec.load(model_dir / "model.json")
    if spec.family == "svm":
        _check_svm(spec)
    check_model_and_data(spec, model_dir, data_dir)  # before loading: a mismatch names the files, not the weights
    from tasks.models.networks import load_trained

    return export_network(ep, spec, load_trained(model_dir)[1], model_dir, data_dir, output, model_name)


def check_model_and_data(spec: ModelSpec, model_dir: Path, data_dir: Path) -> tuple[dict[str, Any], str, list[str]]:
    """Check that the model in ``model_dir`` was trained on data shaped like ``data_dir``'s.

    Returns:
        (meta.json, task kind, class names).

    Raises:
        ExportError: naming both files where task kind, input shape or class names differ.
    """
    meta = read_meta(data_dir)
    kind = task_kind_of(spec, meta, model_dir / "model.json", data_dir / "meta.json")
    expected = (meta["in_channels"], *meta["spatial_size"])
    if tuple(spec.input_shape) != tuple(expected):
        raise ExportError(f"{model_dir / 'model.json'}: input_shape {spec.input_shape} != {data_dir / 'meta.json'} "
                          f"in_channels + spatial_size {expected}; rerun train on this data")
    class_names = list(spec.class_names or meta["class_names"])
    if class_names != list(meta["class_names"]):
        raise ExportError(f"{model_dir / 'model.json'}: class_names {class_names} != {data_dir / 'meta.json'} "
                          f"class_names {meta['class_names']}")
    return meta, kind, class_names


def export_network(
    ep: ExportParams, spec: ModelSpec, net: torch.nn.Module, model_dir: Path, data_dir: Path, output: Path,
    model_name: str,
) -> ExportResult:
    """Export ``net``, the trained network of ``model_dir`` (described by ``spec``); :func:`run` without the loading.

    Args:
        ep, model_dir, data_dir, output, model_name: as for :func:`run` (model_dir gives the provenance and, by the
            weights' hash, the MLflow run).
        spec: model_dir's model.json.
        net: the network in eval mode, mapping float32 (B, C, *S) in [0, 1] to logits (B, K) or (B, K, *S).

    Raises:
        ExportError: a spec that does not match the data or the saved package, or parity above the tolerance.
    """
    t0 = time.perf_counter()
    meta, kind, class_names = check_model_and_data(spec, model_dir, data_dir)
    run_id = tracking.run_for_model(weights_hash(model_dir), model_dir)
    contract = coreml.input_contract(spec, meta)
    x = load_test_images(data_dir, ep.parity_images)
    if x.shape[1:] != tuple(spec.input_shape):
        raise ExportError(f"{data_dir / 'test_x.npy'}: shape {x.shape[1:]} per image != model {spec.input_shape}")
    durations: dict[str, float] = {}

    import torch

    t = time.perf_counter()
    model = with_softmax(net)
    example = torch.from_numpy(x[:1].copy()) if len(x) else torch.rand(1, *spec.input_shape)
    with torch.no_grad():  # the Core ML copy: layers coremltools cannot convert become equivalent ones (parity checks)
        traced = torch.jit.trace(coreml.coreml_compatible(model), example, check_trace=False)
    durations["trace"] = time.perf_counter() - t

    output.mkdir(parents=True, exist_ok=True)
    package, onnx_path = output / coreml.package_name(model_name), output / ONNX_FILE
    for old in (package, onnx_path, output / EXPORT_JSON):
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    t = time.perf_counter()
    export_onnx(model, example, onnx_path, ep.onnx_opset)
    durations["onnx"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        mlmodel = coreml.convert(traced, contract, class_names, ep.deployment_target, kind)
    except Exception as exc:  # coremltools raises NotImplementedError/ValueError/RuntimeError per op
        raise ExportError(f"coremltools could not convert train.arch={spec.arch} ({spec.spatial_dims}D "
                          f"{spec.family}): {type(exc).__name__}: {exc}") from exc
    user_meta = provenance(model_dir, spec, meta, contract)
    val_path = model_dir / "val_metrics.json"
    val_threshold = json.loads(val_path.read_text()).get("val_threshold") if val_path.exists() else None
    # classLabel is the argmax; an app that wants the validated operating point compares classLabel_probs with this
    if val_threshold is not None and kind == coreml.CLASSIFICATION:
        user_meta["val_threshold"] = f"{val_threshold:.6g}"
    coreml.describe(
        mlmodel, contract, class_names, author=ep.author, license=ep.license, metadata=user_meta,
        short_description=f"{ep.description} ({spec.family}/{spec.arch}, {spec.spatial_dims}D)",
        version=user_meta["model_sha256"][:12], task_kind=kind,
    )
    mlmodel.save(str(package))
    coreml.make_deterministic(package)  # no random item ids, no per-process protobuf map order
    durations["coreml"] = time.perf_counter() - t

    t = time.perf_counter()
    info = coreml.inspect_package(package)
    mismatches = coreml.spec_mismatches(info, contract, class_names, kind)
    if mismatches:
        raise ExportError(f"{package}: the saved Core ML spec does not match the export:\n  " + "\n  ".join(mismatches))
    batch = 4 if kind == coreml.SEGMENTATION else 16  # a segmenter's outputs are K maps per image
    eager = predict_torch(model, x, batch)
    parity = {
        "images": len(x), "tolerance": ep.parity_tolerance,
        "traced_vs_eager_max_abs": float(np.abs(predict_torch(traced, x, batch) - eager).max()) if len(x) else 0.0,
        "onnx_vs_eager_max_abs": float(np.abs(predict_onnx(onnx_path, x, batch) - eager).max()) if len(x) else 0.0,
    }
    # export.json records the differences to 2 significant digits: the order of magnitude is the information, and
    # the last bits of a float32 difference can move with the CPU's kernels and thread count
    recorded = dict(parity)
    for k in ("traced_vs_eager_max_abs", "onnx_vs_eager_max_abs"):
        recorded[k] = float(f"{parity[k]:.2g}")
    durations["verify"] = time.perf_counter() - t
    worst = max(parity["traced_vs_eager_max_abs"], parity["onnx_vs_eager_max_abs"])
    if worst > ep.parity_tolerance:
        raise ExportError(f"{output}: parity check failed on {len(x)} images of {data_dir / 'test_x.npy'}: {parity} "
                          f"(export.parity_tolerance={ep.parity_tolerance})")
    durations["total"] = time.perf_counter() - t0

    seg = kind == coreml.SEGMENTATION
    record = {
        "task_kind": kind, "package": package.name, "package_bytes": coreml.package_bytes(package),
        "onnx": onnx_path.name,
        "onnx_bytes": onnx_path.stat().st_size, "onnx_opset": ep.onnx_opset,
        "onnx_io": {"input": ONNX_INPUT, "output": ONNX_OUTPUT},
        "family": spec.family, "arch": spec.arch, "class_names": class_names, "input_shape": list(spec.input_shape),
        "coreml": {
            "input_name": contract.name, "input_kind": contract.kind, "input_color": contract.color,
            "input_shape": list(contract.shape), "input_description": contract.description,
            "label_output": None if seg else coreml.LABEL_OUTPUT,
            "probabilities_output": coreml.SEG_OUTPUT if seg else coreml.PROBS_OUTPUT,
            "output_shape": info["output_shapes"].get(coreml.SEG_OUTPUT) if seg else [len(class_names)],
            "deployment_target": ep.deployment_target, "specification_version": info["specification_version"],
        },
        "metadata": user_meta, "parity": recorded,
    }
    (output / EXPORT_JSON).write_text(json.dumps(record, indent=2) + "\n")
    tracking.log_metrics(run_id, {
        "export_package_bytes": record["package_bytes"], "export_onnx_bytes": record["onnx_bytes"],
        "export_parity_traced_max_abs": parity["traced_vs_eager_max_abs"],
        "export_parity_onnx_max_abs": parity["onnx_vs_eager_max_abs"],
        **{f"export_seconds_{k}": v for k, v in durations.items()},
    })
    tracking.set_tags(run_id, {"export.input_kind": contract.kind, "export.package": package.name})
    tracking.log_artifacts(run_id, [output / EXPORT_JSON], artifact_path="export")
    return ExportResult(package, onnx_path, contract.kind, record["package_bytes"], parity, durations, kind)


def main(argv: list[str] | None = None) -> None:
    from tasks.config import HelpFormatter, load_params_or_exit
    from tasks.noise import silence_known_noise

    silence_known_noise()
    ap = argparse.ArgumentParser(prog="python -m tasks.export", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter,
                                 epilog="Settings (deployment target, parity tolerance, ONNX opset, author, ...) are "
                                        "the params file's `export` group with the task's overrides; the task's "
                                        "model_name names the package.")
    ap.add_argument("--params", default="params.yaml", help="the params file")
    ap.add_argument("--task", default="classify",
                    help="the task (params.yaml `tasks`): its model_name names the package, its overrides of the "
                         "export group apply")
    ap.add_argument("--model", type=Path, default=Path("models/classify/train"),
                    help="train's output folder: model.json, model.pt, val_metrics.json, provenance.json")
    ap.add_argument("--data", type=Path, default=Path("data/preprocessed/classify"),
                    help="preprocess's output folder: meta.json (the input contract) and test_x.npy (the parity "
                         "check's images)")
    ap.add_argument("--output", type=Path, default=Path("models/classify/export"),
                    help="where the .mlpackage, model.onnx and export.json go")
    args = ap.parse_args(argv)
    params = load_params_or_exit(args.params, task=args.task)
    try:
        res = run(params.export, args.model, args.data, args.output, params.task.model_name)
    except ExportError as exc:
        raise SystemExit(f"export: {exc}") from None
    par = res.parity
    print(f"export: {res.task_kind} {res.package} ({res.package_bytes / 1e6:.1f} MB, {res.input_kind} input), "
          f"{res.onnx}; max |diff| "
          f"traced {par['traced_vs_eager_max_abs']:.2e}, onnx {par['onnx_vs_eager_max_abs']:.2e} "
          f"in {res.durations_s['total']:.1f} s")


if __name__ == "__main__":
    main()
