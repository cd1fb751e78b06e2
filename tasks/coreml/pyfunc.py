"""The MLflow pyfunc that serves a medpipe export: the Core ML package plus its portable ONNX sibling.

MLflow has no Core ML flavor, so the registered model is a :class:`mlflow.pyfunc.PythonModel` whose artifacts are
the export stage's files:

``coreml_package``  ``<Name>.mlpackage`` (what ships to Apple devices)
``onnx_model``      ``model.onnx``, the same softmax-wrapped network (what runs anywhere)
``export_json``     ``export.json`` (class names, input shape, parity figures)

``predict`` takes preprocessed inputs, float32 (N, C, *S) in [0, 1] exactly as ``data/preprocessed/*_x.npy`` (or,
MLflow's DataFrame form of a tensor signature, a one-column DataFrame whose cells are flattened samples). What it
returns depends on export.json's ``task_kind``:

- classification: a DataFrame, one row per sample: ``prob_<class>`` for each class and ``label``.
- segmentation: float32 (N, K, *S), the softmax probability of each class (axis 1, index = ``class_names``,
  0 = background) at each pixel/voxel of the model's input grid; with ``params={"output": "labels"}`` instead the
  uint8 label maps (N, *S) (the argmax over the classes). Both are at the model's resolution: export.json's
  ``metadata.map_back`` says how preprocess resized and padded, to map a prediction back to the original image.

It runs the ONNX model with onnxruntime; on macOS, ``MEDPIPE_PYFUNC_BACKEND=coreml`` runs the ``.mlpackage`` with
Core ML instead.

This file is logged as MLflow "model from code" (``python_model=<this file>``): MLflow executes it on load, so it
imports nothing from ``tasks`` and nothing heavy at import time (no torch, no coremltools).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import set_model

ARTIFACT_PACKAGE = "coreml_package"
ARTIFACT_ONNX = "onnx_model"
ARTIFACT_EXPORT_JSON = "export_json"
BACKEND_ENV = "MEDPIPE_PYFUNC_BACKEND"
SEGMENTATION = "segmentation"  # export.json task_kind of a segmenter (absent = classification)
SEG_OUTPUTS = ("probabilities", "labels")  # a segmenter's predict(params={"output": ...})


def as_batch(model_input: Any, input_shape: tuple[int, ...]) -> np.ndarray:
    """Coerce a pyfunc input to a float32 batch (N, C, *S).

    Args:
        model_input: an array (N, C, *S), a single sample (C, *S), a flat array (N, C * prod(S)), a DataFrame with
            C * prod(S) numeric columns (one sample per row) or a DataFrame whose single column holds arrays.
        input_shape: the (C, *S) shape the model was exported for.

    Raises:
        ValueError: naming the received and the expected shape.
    """
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 1 and len(model_input) and isinstance(model_input.iloc[0, 0], (list, np.ndarray)):
            x = np.stack([np.asarray(v, dtype=np.float32) for v in model_input.iloc[:, 0]])
        else:
            x = model_input.to_numpy(dtype=np.float32)
    else:
        x = np.asarray(model_input, dtype=np.float32)
    size = int(np.prod(input_shape))
    if x.shape == tuple(input_shape):
        x = x[None]
    elif x.ndim == 2 and x.shape[1] == size:
        x = x.reshape(len(x), *input_shape)
    if x.shape[1:] != tuple(input_shape):
        raise ValueError(
            f"medpipe model input: got shape {x.shape}, expected (N, {', '.join(map(str, input_shape))}) float32 "
            "in [0, 1] (the preprocess stage's *_x.npy layout)"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


class CoreMLModel(mlflow.pyfunc.PythonModel):
    """A classifier's class probabilities and label, or a segmenter's per-class probability (or label) maps, for
    preprocessed images or volumes."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Read export.json and open the ONNX session (or the Core ML model on macOS when asked)."""
        with open(context.artifacts[ARTIFACT_EXPORT_JSON]) as fh:
            self.export = json.load(fh)
        self.task_kind: str = self.export.get("task_kind", "classification")
        self.class_names: list[str] = list(self.export["class_names"])
        self.input_shape: tuple[int, ...] = tuple(self.export["input_shape"])
        self.backend = os.environ.get(BACKEND_ENV, "onnx")
        if self.backend == "coreml":
            if sys.platform != "darwin":
                raise RuntimeError(f"{BACKEND_ENV}=coreml: Core ML runs only on macOS; unset it to use ONNX Runtime")
            import coremltools as ct

            self.mlmodel = ct.models.MLModel(context.artifacts[ARTIFACT_PACKAGE])
        elif self.backend == "onnx":
            import onnxruntime as ort

            self.session = ort.InferenceSession(
                context.artifacts[ARTIFACT_ONNX], providers=["CPUExecutionProvider"]
            )
            self.onnx_input = self.session.get_inputs()[0].name
        else:
            raise ValueError(f"{BACKEND_ENV}={self.backend!r}: expected 'onnx' or 'coreml'")

    def _coreml_probabilities(self, x: np.ndarray) -> np.ndarray:
        """Core ML's probabilities, sample by sample: (N, K) for a classifier, (N, K, *S) for a segmenter."""
        coreml = self.export["coreml"]
        name, kind = coreml["input_name"], coreml["input_kind"]
        rows = []
        for sample in x:
            if kind == "image":
                from PIL import Image

                pixels = np.clip(np.rint(sample * 255.0), 0, 255).astype(np.uint8)
                feed: Any = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1))
            else:
                feed = sample[None]
            out = self.mlmodel.predict({name: feed})[coreml["probabilities_output"]]
            if self.task_kind == SEGMENTATION:  # MLMultiArray (1, K, *S)
                rows.append(np.asarray(out, dtype=np.float32)[0])
            else:
                rows.append([float(out[c]) for c in self.class_names])
        return np.asarray(rows, dtype=np.float32)

    # np.ndarray: MLflow has already enforced the logged tensor signature, float32 (-1, C, *S); it infers no schema
    # from this hint (any other hint but list[...] makes it warn). Called directly, as_batch takes the other forms.
    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame | np.ndarray:
        """A classifier's probabilities per class (columns ``prob_<class>``) and argmax ``label``, one row per sample;
        a segmenter's float32 probability maps (N, K, *S), or with ``params={"output": "labels"}`` its uint8 label
        maps (N, *S).

        Raises:
            ValueError: a wrong input shape, or an unknown ``output`` param.
        """
        x = as_batch(model_input, self.input_shape)
        want = (params or {}).get("output", SEG_OUTPUTS[0])
        if self.task_kind == SEGMENTATION and want not in SEG_OUTPUTS:
            raise ValueError(f"medpipe segmenter: params output={want!r}; expected one of {list(SEG_OUTPUTS)}")
        if self.backend == "coreml":
            probs = self._coreml_probabilities(x)
        else:
            probs = self.session.run(None, {self.onnx_input: x})[0]
        if self.task_kind == SEGMENTATION:
            return probs.argmax(axis=1).astype(np.uint8) if want == "labels" else np.asarray(probs, np.float32)
        out = pd.DataFrame(probs, columns=[f"prob_{c}" for c in self.class_names])
        out["label"] = [self.class_names[i] for i in probs.argmax(axis=1)]
        return out


def pip_requirements() -> list[str]:
    """What serving this model needs, pinned to the versions installed here (no torch, no coremltools)."""
    from importlib.metadata import version

    return [f"{dist}=={version(dist)}" for dist in ("mlflow", "numpy", "pandas", "onnxruntime")]


# MLflow "model from code": loading the logged copy of this file registers the model object.
set_model(CoreMLModel())
