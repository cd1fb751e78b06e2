"""Core ML conversion and inspection for the export stage: the input contract, ``ct.convert``, metadata, spec checks.

coremltools is imported inside the functions (it takes seconds). ``MLModel.predict`` exists only on macOS, so
everything here works from the model spec: conversion and saving run on Linux, and :func:`inspect_package` reads a
saved ``.mlpackage`` back without a Core ML runtime.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.models.networks import ModelSpec
from tasks.provenance import file_hash

if TYPE_CHECKING:
    import coremltools as ct

LABEL_OUTPUT, PROBS_OUTPUT = "classLabel", "classLabel_probs"  # coremltools' classifier output names
MANIFEST = "Manifest.json"
# the namespace of medpipe's package item identifiers (uuid5 of the item's path and content digest)
_ITEM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://medpipe.invalid/coreml/item")


@dataclass(frozen=True)
class InputContract:
    """What the Core ML model takes: ``kind`` is ``image`` (with ``color``) or ``multiarray``; shape (1, C, *S)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    color: str | None
    description: str


def input_contract(spec: ModelSpec, meta: dict[str, Any]) -> InputContract:
    """Choose the Core ML input for this model and data, with the description a developer reads in Xcode.

    2D data with 1 channel (or 3 channels of 8-bit source) becomes an 8-bit image the model scales by 1/255: for CT
    the caller renders the slice with the recorded window, as a DICOM viewer does. Anything else (volumes, other
    channel counts) is a float32 MLMultiArray of the preprocessed tensor.

    Args:
        spec: the trained model's spec (``input_shape`` is (C, *S)).
        meta: preprocess's meta.json; ``intensity`` is ``{"kind": "hu_window", "center", "width"}`` (HU) or
            ``{"kind": "uint8"}``.
    """
    c, spatial = spec.input_shape[0], tuple(spec.input_shape[1:])
    shape = (1, *spec.input_shape)
    dims = "x".join(map(str, spatial))
    inten = meta["intensity"]
    if inten["kind"] == "hu_window":
        lo = inten["center"] - inten["width"] / 2
        mapping = f"clip((HU {'-' if lo >= 0 else '+'} {abs(lo):g}) / {inten['width']:g}, 0, 1)"
    else:
        mapping = "stored 8-bit value / 255"
    if spec.spatial_dims == 2 and (c == 1 or (c == 3 and inten["kind"] == "uint8")):
        color = "GRAYSCALE" if c == 1 else "RGB"
        if inten["kind"] == "hu_window":
            text = (
                f"{dims} 8-bit grayscale image of the slice rendered with window center {inten['center']:g} HU / "
                f"width {inten['width']:g} HU (black <= {lo:g} HU, white >= {lo + inten['width']:g} HU, as a DICOM "
                f"viewer shows it). The model divides pixels by 255, i.e. {mapping} up to 8-bit quantisation."
            )
        else:
            text = f"{dims} 8-bit {color.lower()} image as stored; the model divides pixels by 255."
        return InputContract("image", "image", shape, color, text)
    why = "Core ML images are single 2D frames" if spec.spatial_dims == 3 else "Core ML images have 1 or 3 channels"
    name = "volume" if spec.spatial_dims == 3 else "input"
    text = f"float32 MLMultiArray {shape} in [0, 1]: {mapping}. A multi-array, not an image, because {why}."
    return InputContract(name, "multiarray", shape, None, text)


def _register_missing_torch_ops() -> None:
    """coremltools 9.0 has no ``adaptive_avg_pool3d``; MONAI's 3D ResNets end with it (output 1x1x1 = a mean)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import register_torch_op
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    def adaptive_avg_pool3d(context: Any, node: Any) -> None:
        x, size = _get_inputs(context, node, expected=2)
        if [int(s) for s in np.atleast_1d(size.val)] not in ([1], [1, 1, 1]):
            raise NotImplementedError(f"adaptive_avg_pool3d to {size.val}: only a global (1x1x1) pool converts")
        context.add(mb.reduce_mean(x=x, axes=[-3, -2, -1], keep_dims=True, name=node.name))

    try:
        register_torch_op(adaptive_avg_pool3d, torch_alias=["_adaptive_avg_pool3d"])
    except ValueError:
        pass  # already registered (an earlier call, or a coremltools that implements it)


def convert(traced: Any, contract: InputContract, class_names: list[str], target: str) -> ct.models.MLModel:
    """Convert a traced probability model (softmax output) to an fp32 ML Program classifier.

    Args:
        traced: ``torch.jit.trace`` of a module mapping (1, C, *S) float32 in [0, 1] to probabilities (1, K).
        contract: the input to give the Core ML model (see :func:`input_contract`).
        class_names: K labels, index = class id; outputs ``classLabel`` and ``classLabel_probs`` use them.
        target: minimum deployment target, a ``ct.target`` name such as ``iOS16`` (= macOS 13).
    """
    import coremltools as ct

    _register_missing_torch_ops()
    if contract.kind == "image":
        inp: Any = ct.ImageType(
            name=contract.name, shape=contract.shape, scale=1 / 255.0,
            color_layout=ct.colorlayout.GRAYSCALE if contract.color == "GRAYSCALE" else ct.colorlayout.RGB,
        )
    else:
        inp = ct.TensorType(name=contract.name, shape=contract.shape, dtype=np.float32)
    # naming the traced probabilities keeps coremltools from renaming its graph-numbered output ('206' -> 'var_206',
    # with a warning); the classifier's own outputs stay LABEL_OUTPUT and PROBS_OUTPUT
    return ct.convert(
        traced, inputs=[inp], outputs=[ct.TensorType(name="probabilities")],
        classifier_config=ct.ClassifierConfig(class_names),
        convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, target),
    )


def describe(
    mlmodel: ct.models.MLModel, contract: InputContract, class_names: list[str], *, author: str, license: str,
    short_description: str, version: str, metadata: dict[str, str],
) -> None:
    """Set what Xcode shows (author, license, descriptions) and the provenance in ``user_defined_metadata``."""
    mlmodel.author, mlmodel.license = author, license
    mlmodel.short_description, mlmodel.version = short_description, version
    mlmodel.input_description[contract.name] = contract.description
    mlmodel.output_description[LABEL_OUTPUT] = f"Most probable class: one of {', '.join(class_names)}"
    mlmodel.output_description[PROBS_OUTPUT] = "Probability of each class (softmax of the logits), by class name"
    mlmodel.user_defined_metadata.update(metadata)


def make_deterministic(package: Path) -> None:
    """Rewrite a saved ``.mlpackage`` so that its bytes are a function of the model alone.

    Two exports of the same model with coremltools 9.0 differ in two ways: each conversion draws a random UUID per
    item of ``Manifest.json``, and the spec ``model.mlmodel`` is serialised with its protobuf maps (the metadata, op
    attributes) in an order that changes from process to process. Here the spec is re-serialised with
    protobuf's deterministic (key-sorted) encoding, the same message byte for byte once parsed, and every item
    identifier becomes a ``uuid5`` of the item's path and content digest; the manifest keeps its layout (4-space
    JSON, sorted keys) and its root model entry, so ``ct.models.MLModel`` and ``ct.utils.load_spec`` read it as before.

    Args:
        package: a ``.mlpackage`` folder written by ``MLModel.save``.

    Raises:
        ValueError: naming the manifest when it lacks the entries a Core ML package has.
    """
    from coremltools.proto import Model_pb2

    manifest_path = package / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    entries, root = manifest.get("itemInfoEntries") or {}, manifest.get("rootModelIdentifier")
    if root not in entries:
        raise ValueError(f"{manifest_path}: rootModelIdentifier {root!r} names no entry of itemInfoEntries")
    spec_file = package / "Data" / entries[root]["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))
    ids = {
        old: str(uuid.uuid5(_ITEM_NAMESPACE, f"{e['path']}:{file_hash(package / 'Data' / e['path'], 64)}"))
        for old, e in entries.items()
    }
    manifest["itemInfoEntries"] = {ids[old]: e for old, e in entries.items()}
    manifest["rootModelIdentifier"] = ids[root]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def inspect_package(path: Path) -> dict[str, Any]:
    """Read a saved Core ML package's spec (no Core ML runtime needed): input, outputs, class labels, metadata."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    desc = spec.description
    inp = desc.input[0]
    if inp.type.WhichOneof("Type") == "imageType":
        color = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(inp.type.imageType.colorSpace)
        info = {"kind": "image", "shape": [inp.type.imageType.height, inp.type.imageType.width], "color": color}
    else:
        info = {"kind": "multiarray", "shape": list(inp.type.multiArrayType.shape), "color": None}
    labels: list[str] = []
    if spec.WhichOneof("Type") == "mlProgram":  # an ML Program keeps its labels in the `classify` op
        fn = spec.mlProgram.functions["main"]
        for op in fn.block_specializations[fn.opset].operations:
            if op.type == "classify":
                values = op.inputs["classes"].arguments[0].value.immediateValue.list.values
                labels = [v.immediateValue.tensor.strings.values[0] for v in values]
    return {
        "type": spec.WhichOneof("Type"), "specification_version": spec.specificationVersion,
        "input": {"name": inp.name, **info}, "outputs": [o.name for o in desc.output],
        "predicted_feature": desc.predictedFeatureName, "probabilities_output": desc.predictedProbabilitiesName,
        "class_labels": labels, "metadata": dict(desc.metadata.userDefined),
        "author": desc.metadata.author, "license": desc.metadata.license,
        "short_description": desc.metadata.shortDescription,
    }


def spec_mismatches(info: dict[str, Any], contract: InputContract, class_names: list[str]) -> list[str]:
    """Where an :func:`inspect_package` result differs from the intended input, outputs and labels (empty = none)."""
    want_shape = list(contract.shape[-2:]) if contract.kind == "image" else list(contract.shape)
    checks = {
        "type": (info["type"], "mlProgram"), "input name": (info["input"]["name"], contract.name),
        "input kind": (info["input"]["kind"], contract.kind), "input shape": (info["input"]["shape"], want_shape),
        "input color": (info["input"]["color"], contract.color),
        "outputs": (sorted(info["outputs"]), sorted([LABEL_OUTPUT, PROBS_OUTPUT])),
        "class labels": (info["class_labels"], list(class_names)),
    }
    return [f"{k}: {got!r} != expected {want!r}" for k, (got, want) in checks.items() if got != want]


def package_name(model_name: str) -> str:
    """``medpipe-classifier`` -> ``MedpipeClassifier.mlpackage`` (Xcode names the generated class after the file)."""
    name = "".join(p[:1].upper() + p[1:] for p in re.split(r"[^0-9A-Za-z]+", model_name) if p) or "Model"
    return f"{'Model' if name[0].isdigit() else ''}{name}.mlpackage"


def package_bytes(path: Path) -> int:
    """Size on disk of a ``.mlpackage`` folder (or a file)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
