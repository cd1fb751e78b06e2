"""Core ML conversion and inspection for the export stage: the input contract, ``ct.convert``, metadata, spec checks.

Two kinds of model: a classifier (``classLabel`` + ``classLabel_probs``, coremltools' classifier outputs) and a
segmenter (one MLMultiArray ``probabilities``, float32 (1, K, *S): the softmax over the K classes at every pixel or
voxel, channel k = ``class_names[k]``, 0 = background; the class names travel in ``user_defined_metadata``).

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
SEG_OUTPUT = "probabilities"  # a segmenter's per-class probability map, MLMultiArray float32 (1, K, *S)
CLASSIFICATION, SEGMENTATION = "classification", "segmentation"  # task kinds (meta.json ``task_kind``)
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


def convert(
    traced: Any, contract: InputContract, class_names: list[str], target: str, task_kind: str = CLASSIFICATION
) -> ct.models.MLModel:
    """Convert a traced probability model (softmax output) to an fp32 ML Program classifier or segmenter.

    Args:
        traced: ``torch.jit.trace`` of a module mapping (1, C, *S) float32 in [0, 1] to probabilities: (1, K) for a
            classifier, (1, K, *S) for a segmenter (softmax over axis 1).
        contract: the input to give the Core ML model (see :func:`input_contract`).
        class_names: K labels, index = class id; a classifier's outputs ``classLabel`` and ``classLabel_probs`` use
            them (a segmenter's go to the metadata, see :func:`describe`).
        target: minimum deployment target, a ``ct.target`` name such as ``iOS16`` (= macOS 13).
        task_kind: ``classification`` or ``segmentation`` (output :data:`SEG_OUTPUT`, float32 (1, K, *S)).
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
    if task_kind == SEGMENTATION:
        # float32 stated: an ML Program's outputs default to float16 when compute precision is (a later fp16 export)
        return ct.convert(
            traced, inputs=[inp], outputs=[ct.TensorType(name=SEG_OUTPUT, dtype=np.float32)],
            convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
            minimum_deployment_target=getattr(ct.target, target),
        )
    if task_kind != CLASSIFICATION:
        raise ValueError(f"task_kind: expected {CLASSIFICATION!r} or {SEGMENTATION!r}, got {task_kind!r}")
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
    short_description: str, version: str, metadata: dict[str, str], task_kind: str = CLASSIFICATION,
) -> None:
    """Set what Xcode shows (author, license, descriptions) and the provenance in ``user_defined_metadata``."""
    mlmodel.author, mlmodel.license = author, license
    mlmodel.short_description, mlmodel.version = short_description, version
    mlmodel.input_description[contract.name] = contract.description
    if task_kind == SEGMENTATION:
        mlmodel.output_description[SEG_OUTPUT] = segmentation_output_text(class_names, contract.shape[2:])
    else:
        mlmodel.output_description[LABEL_OUTPUT] = f"Most probable class: one of {', '.join(class_names)}"
        mlmodel.output_description[PROBS_OUTPUT] = "Probability of each class (softmax of the logits), by class name"
    mlmodel.user_defined_metadata.update(metadata)


def segmentation_output_text(class_names: list[str], spatial: tuple[int, ...]) -> str:
    """What a segmenter's ``probabilities`` output holds, as Xcode shows it (and ``output_layout`` records it)."""
    axes = "D, H, W" if len(spatial) == 3 else "H, W"
    shape = ", ".join(map(str, (1, len(class_names), *spatial)))
    channels = ", ".join(f"{k} = {name}" for k, name in enumerate(class_names))
    return (f"float32 MLMultiArray ({shape}) = (batch, class, {axes}): softmax probability of each class at each "
            f"{'voxel' if len(spatial) == 3 else 'pixel'} of the model input; class axis {channels}. The label map is "
            "the argmax over the class axis; metadata map_back says how to take it to the original image.")


def coreml_compatible(model: Any) -> Any:
    """A copy of ``model`` with the layers coremltools 9.0 cannot convert replaced by equivalent ones.

    coremltools converts ``output_padding`` of a transposed convolution only in 1D and 2D ("output_padding is
    supported only for ConvTranspose1D or ConvTranspose2D"), and MONAI's 3D U-Nets upsample with
    ``ConvTranspose3d(stride=2, padding=1, output_padding=1)``. Such a layer equals the same kernel with no padding
    (the full transposed convolution) cropped by ``padding`` at the start and ``padding - output_padding`` at the
    end of each spatial axis: the same weights and arithmetic, so the export's parity check against the eager model
    covers the rewrite. Layers with ``output_padding > padding`` (a crop cannot add) are left as they are.

    Args:
        model: a torch module (not modified).

    Returns:
        The module itself when nothing needs replacing, otherwise a deep copy with the replacements.
    """
    import copy

    import torch

    class CroppedConvTranspose3d(torch.nn.Module):
        def __init__(self, conv: torch.nn.ConvTranspose3d) -> None:
            super().__init__()
            self.crop = [(p, p - o) for p, o in zip(conv.padding, conv.output_padding, strict=True)]
            self.conv = torch.nn.ConvTranspose3d(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding=0, output_padding=0,
                groups=conv.groups, bias=conv.bias is not None, dilation=conv.dilation,
            )
            self.conv.load_state_dict(conv.state_dict())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            (b0, e0), (b1, e1), (b2, e2) = self.crop
            return y[:, :, b0 : y.shape[2] - e0, b1 : y.shape[3] - e1, b2 : y.shape[4] - e2]

    def needs(m: Any) -> bool:
        return (isinstance(m, torch.nn.ConvTranspose3d) and any(m.output_padding) and m.padding_mode == "zeros"
                and all(p >= o for p, o in zip(m.padding, m.output_padding, strict=True)))

    if not any(needs(m) for m in model.modules()):
        return model
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if needs(m):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, CroppedConvTranspose3d(m))
    return out.eval()


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
    shapes = {o.name: list(o.type.multiArrayType.shape) for o in desc.output
              if o.type.WhichOneof("Type") == "multiArrayType"}
    dtypes = {o.name: ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(o.type.multiArrayType.dataType)
              for o in desc.output if o.type.WhichOneof("Type") == "multiArrayType"}
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
        "output_shapes": shapes, "output_dtypes": dtypes,
        "predicted_feature": desc.predictedFeatureName, "probabilities_output": desc.predictedProbabilitiesName,
        "class_labels": labels, "metadata": dict(desc.metadata.userDefined),
        "author": desc.metadata.author, "license": desc.metadata.license,
        "short_description": desc.metadata.shortDescription,
    }


def spec_mismatches(
    info: dict[str, Any], contract: InputContract, class_names: list[str], task_kind: str = CLASSIFICATION
) -> list[str]:
    """Where an :func:`inspect_package` result differs from the intended input, outputs and labels (empty = none).

    A classifier is checked for its two outputs and the labels of its ``classify`` op; a segmenter for its one
    output :data:`SEG_OUTPUT`, float32 (1, K, *S) with K = ``len(class_names)`` and S the input's spatial size, and
    for ``class_names`` (JSON) and ``task_kind`` in its metadata.
    """
    want_shape = list(contract.shape[-2:]) if contract.kind == "image" else list(contract.shape)
    checks: dict[str, tuple[Any, Any]] = {
        "type": (info["type"], "mlProgram"), "input name": (info["input"]["name"], contract.name),
        "input kind": (info["input"]["kind"], contract.kind), "input shape": (info["input"]["shape"], want_shape),
        "input color": (info["input"]["color"], contract.color),
    }
    if task_kind == SEGMENTATION:
        meta = info["metadata"]
        try:
            meta_names = json.loads(meta.get("class_names", "null"))
        except json.JSONDecodeError:
            meta_names = meta.get("class_names")
        checks.update({
            "outputs": (info["outputs"], [SEG_OUTPUT]),
            "output shape": (info["output_shapes"].get(SEG_OUTPUT), [1, len(class_names), *contract.shape[2:]]),
            "output dtype": (info["output_dtypes"].get(SEG_OUTPUT), "FLOAT32"),
            "metadata class_names": (meta_names, list(class_names)),
            "metadata task_kind": (meta.get("task_kind"), SEGMENTATION),
        })
    else:
        checks.update({
            "outputs": (sorted(info["outputs"]), sorted([LABEL_OUTPUT, PROBS_OUTPUT])),
            "class labels": (info["class_labels"], list(class_names)),
        })
    return [f"{k}: {got!r} != expected {want!r}" for k, (got, want) in checks.items() if got != want]


def package_name(model_name: str) -> str:
    """``medpipe-classifier`` -> ``MedpipeClassifier.mlpackage`` (Xcode names the generated class after the file)."""
    name = "".join(p[:1].upper() + p[1:] for p in re.split(r"[^0-9A-Za-z]+", model_name) if p) or "Model"
    return f"{'Model' if name[0].isdigit() else ''}{name}.mlpackage"


def package_bytes(path: Path) -> int:
    """Size on disk of a ``.mlpackage`` folder (or a file)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
