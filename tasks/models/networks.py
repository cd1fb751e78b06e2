"""Model factory: one place that turns a :class:`ModelSpec` into a torch module.

The spec is written next to the weights (``model.json``) so that evaluate and export rebuild exactly the network
train produced. 2D or 3D is a property of the data (``spatial_dims``), not of the code path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: --help and dvc bookkeeping should not pay for it
    import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a trained network.

    Attributes:
        family: ``cnn`` (MONAI CNN), ``rnn`` (2D CNN per slice + GRU over slices) or ``svm``.
        arch: MONAI architecture name for the CNN encoder.
        spatial_dims: 2 for images (C, H, W), 3 for volumes (C, D, H, W).
        in_channels: number of input channels.
        num_classes: number of output logits.
        input_shape: the (C, *spatial) shape the network was trained on.
        class_names: label names, index = class id.
        width: ResNet widen factor (1.0 = MONAI's 64/128/256/512 channels).
        stem_stride: stride of the ResNet's first convolution.
        feature_size: the SVM's pooled size per spatial axis (``train.svm.feature_size``).
    """

    family: str
    arch: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...] = field(default_factory=tuple)
    width: float = 1.0
    stem_stride: int = 1
    feature_size: int = 16

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        if not path.exists():
            raise FileNotFoundError(f"{path}: model spec not found (did the train stage run?)")
        raw = json.loads(path.read_text())
        raw["input_shape"] = tuple(raw["input_shape"])
        raw["class_names"] = tuple(raw.get("class_names", ()))
        return cls(**raw)


def _monai_cnn(
    arch: str, spatial_dims: int, in_channels: int, num_classes: int, width: float = 1.0, stem_stride: int = 1
) -> nn.Module:
    from monai.networks import nets

    if arch.startswith("resnet"):
        factory = getattr(nets, arch)
        return factory(
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=num_classes,
            # small inputs (28..128 px): a 3x3 stem without max-pool keeps resolution that a 7x7/2 + max-pool
            # would lose; stem_stride 2 trades some of it for 2^dims fewer FLOPs in every later layer
            conv1_t_size=3,
            conv1_t_stride=stem_stride,
            no_max_pool=True,
            widen_factor=width,
        )
    if arch == "densenet121":
        return nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes)
    raise ValueError(f"train.arch: unknown architecture {arch!r}")


def _slice_rnn(arch: str, in_channels: int, num_classes: int, width: float = 1.0, stem_stride: int = 1) -> nn.Module:
    import torch
    import torch.nn as nn

    class SliceRNN(nn.Module):
        """Reads a volume (B, C, D, H, W) as a sequence of D slices: a 2D CNN encodes each slice, a GRU reads
        the sequence in both directions, and a linear head classifies the mean of its states."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = _monai_cnn(arch, 2, in_channels, 128, width, stem_stride)
            self.gru = nn.GRU(128, 64, batch_first=True, bidirectional=True)
            self.head = nn.Linear(128, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, d, h, w = x.shape
            slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
            feats = self.encoder(slices).reshape(b, d, -1)
            states, _ = self.gru(torch.relu(feats))
            return self.head(states.mean(dim=1))

    return SliceRNN()


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the (untrained) torch module for ``spec``.

    Input: float32 tensor (B, C, H, W) or (B, C, D, H, W), intensities in [0, 1]. Output: logits (B, num_classes).
    """
    if spec.family == "cnn":
        return _monai_cnn(
            spec.arch, spec.spatial_dims, spec.in_channels, spec.num_classes, spec.width, spec.stem_stride
        )
    if spec.family == "rnn":
        if spec.spatial_dims != 3:
            raise ValueError("train.family: rnn reads a volume as a slice sequence and needs 3D data")
        return _slice_rnn(spec.arch, spec.in_channels, spec.num_classes, spec.width, spec.stem_stride)
    raise ValueError(f"train.family: {spec.family!r} is not a torch model family")


def weights_hash(model_dir: Path) -> str:
    """The sha256 of the trained weights in ``model_dir`` (model.pt, or model.joblib for the SVM).

    The MLflow run that trained a model is tagged with it, so later stages find the run from the model itself.
    """
    import hashlib

    for name in ("model.pt", "model.joblib"):
        if (model_dir / name).exists():
            return hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
    raise FileNotFoundError(f"{model_dir}: no model.pt or model.joblib (did the train stage finish?)")


def load_trained(model_dir: Path) -> tuple[ModelSpec, object]:
    """Rebuild the trained model in ``model_dir`` (model.json + model.pt, or model.joblib for the SVM).

    Returns:
        (spec, model): a torch module in eval mode, or a fitted scikit-learn pipeline for ``family == "svm"``.
    """
    spec = ModelSpec.load(model_dir / "model.json")
    if spec.family == "svm":
        import joblib

        return spec, joblib.load(model_dir / "model.joblib")
    import torch

    weights = model_dir / "model.pt"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: weights not found (did the train stage finish?)")
    model = build_model(spec)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return spec, model.eval()


def predict_proba(model: object, spec: ModelSpec, x, batch_size: int = 64):
    """Class probabilities for preprocessed inputs.

    Args:
        model: what :func:`load_trained` returned (torch module or sklearn pipeline).
        spec: its spec.
        x: array or tensor (N, C, *S), values in [0, 1] (float16 or float32).
        batch_size: inference batch size (torch models).

    Returns:
        float64 numpy array (N, num_classes).
    """
    import numpy as np
    import torch

    if spec.family == "svm":
        from tasks.models.svm import pool_features

        return model.predict_proba(pool_features(np.asarray(x, np.float32), spec.feature_size))
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = torch.as_tensor(np.asarray(x[i : i + batch_size]), device=device).float()
            # softmax in float64: rows then sum to 1 within scikit-learn's tolerance (log_loss checks it)
            out.append(torch.softmax(model(xb).double(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, spec.num_classes))
