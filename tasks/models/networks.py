"""Model factory: one place that turns a :class:`ModelSpec` into a torch module.

The spec is written next to the weights (``model.json``) so that evaluate and export rebuild exactly the network
train produced. 2D or 3D is a property of the data (``spatial_dims``), not of the code path. The task kind follows
from the architecture: ResNet/DenseNet classify (logits (B, K)), the MONAI segmentation networks (:data:`SEG_ARCHS`)
segment (logits (B, K, *S), K including background).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: --help and dvc bookkeeping should not pay for it
    import numpy as np
    import torch.nn as nn

SEG_ARCHS = ("unet", "basicunet", "segresnet", "dynunet")  # MONAI segmentation networks (train.arch)
DEFAULT_SEG_CHANNELS = (16, 32, 64, 128)


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a trained network.

    Attributes:
        family: ``cnn`` (MONAI CNN), ``rnn`` (2D CNN per slice + GRU over slices) or ``svm``.
        arch: MONAI architecture name: a classifier (``resnet*``, ``densenet121``) or a segmentation network
            (:data:`SEG_ARCHS`).
        spatial_dims: 2 for images (C, H, W), 3 for volumes (C, D, H, W).
        in_channels: number of input channels.
        num_classes: number of output logits (segmentation: output channels, background included).
        input_shape: the (C, *spatial) shape the network was trained on.
        class_names: label names, index = class id.
        width: ResNet widen factor (1.0 = MONAI's 64/128/256/512 channels).
        stem_stride: stride of the ResNet's first convolution.
        feature_size: the SVM's pooled size per spatial axis (``train.svm.feature_size``).
        channels: feature channels per resolution level of a segmentation network (``train.seg.channels``);
            empty = :data:`DEFAULT_SEG_CHANNELS`. The number of levels sets the downsampling: 2^(levels-1) per axis.
        task_kind: ``classification`` or ``segmentation``; ``None`` (the default) infers it from ``arch``.
        roi_size: sliding-window size for inference (``train.seg.roi_size``); ``None``: the whole image in 2D, the
            trained spatial size in 3D (:func:`predict_seg_proba`).
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
    channels: tuple[int, ...] = ()
    task_kind: str | None = None
    roi_size: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        inferred = "segmentation" if self.arch in SEG_ARCHS else "classification"
        if self.task_kind is None:
            object.__setattr__(self, "task_kind", inferred)  # frozen: set once, here
        elif self.task_kind != inferred:
            raise ValueError(f"train.arch: {self.arch!r} is a {inferred} network, but the task is {self.task_kind}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.roi_size is not None:
            object.__setattr__(self, "roi_size", tuple(int(r) for r in self.roi_size))

    @property
    def is_segmentation(self) -> bool:
        return self.task_kind == "segmentation"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        if not path.exists():
            raise FileNotFoundError(f"{path}: model spec not found (did the train stage run?)")
        raw = json.loads(path.read_text())
        raw["input_shape"] = tuple(raw["input_shape"])
        raw["class_names"] = tuple(raw.get("class_names", ()))
        raw["channels"] = tuple(raw.get("channels", ()))  # absent in model.json files written before segmentation
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


def _monai_segnet(arch: str, spatial_dims: int, in_channels: int, num_classes: int,
                  channels: tuple[int, ...]) -> nn.Module:
    """A MONAI segmentation network with ``len(channels)`` resolution levels (stride 2 between levels).

    Spatial sizes must be divisible by 2^(levels-1) (``basicunet``: always 16, it has 4 fixed downsamplings, and
    its instance norm needs more than one voxel at 1/16 resolution: e.g. 32x32, or 16x32x32).
    """
    from monai.networks import nets

    ch = tuple(channels) or DEFAULT_SEG_CHANNELS
    if len(ch) < 2:
        raise ValueError(f"train.seg.channels: {list(ch)} needs at least 2 levels")
    if arch == "unet":
        # residual units (2 per level), instance norm: MONAI's UNet as in its tutorials
        return nets.UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, channels=ch,
                         strides=(2,) * (len(ch) - 1), num_res_units=2)
    if arch == "basicunet":
        # BasicUNet has exactly five encoder levels and one last decoder width: extend by doubling, decode at ch[0]
        enc = (*ch, *(ch[-1] * 2 ** (i + 1) for i in range(max(0, 5 - len(ch)))))[:5]
        return nets.BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                              features=(*enc, ch[0]))
    if arch == "segresnet":
        # SegResNet doubles init_filters per level; group norm with 8 groups needs init_filters % 8 == 0
        return nets.SegResNet(spatial_dims=spatial_dims, init_filters=ch[0], in_channels=in_channels,
                              out_channels=num_classes, blocks_down=(1, 2, 2, 4, 4, 4)[: len(ch)],
                              blocks_up=(1,) * (len(ch) - 1))
    if arch == "dynunet":
        strides = [1] + [2] * (len(ch) - 1)
        return nets.DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                            kernel_size=[3] * len(ch), strides=strides, upsample_kernel_size=strides[1:],
                            filters=list(ch), res_block=True)
    raise ValueError(f"train.arch: unknown segmentation architecture {arch!r} (expected one of {SEG_ARCHS})")


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

    Input: float32 tensor (B, C, H, W) or (B, C, D, H, W), intensities in [0, 1]. Output: logits (B, num_classes)
    for a classifier, (B, num_classes, *S) for a segmentation network (same spatial size as the input).
    """
    if spec.is_segmentation:
        if spec.family != "cnn":
            raise ValueError(f"train.family: a segmentation network ({spec.arch}) needs family cnn, not {spec.family}")
        return _monai_segnet(spec.arch, spec.spatial_dims, spec.in_channels, spec.num_classes, spec.channels)
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


def predict_seg_proba(model: nn.Module, spec: ModelSpec, x, batch_size: int = 8,
                      roi_size: tuple[int, ...] | list[int] | None = None) -> np.ndarray:
    """Per-voxel class probabilities of a segmentation network.

    A 3D volume (or any input when ``roi_size`` or ``spec.roi_size`` is set) goes through MONAI's
    :func:`monai.inferers.sliding_window_inference` (overlap 0.25, Gaussian blending): windows of ``roi_size``, else
    ``spec.roi_size``, else the spatial size the network was trained on (``spec.input_shape[1:]``), so a volume
    larger than the training patches is covered. A 2D image without either goes through the network whole.

    Args:
        model: a segmentation network from :func:`build_model` / :func:`load_trained`, in eval mode.
        spec: its spec.
        x: array or tensor (N, C, *S), values in [0, 1] (float16 or float32).
        batch_size: images per forward pass (sliding window: windows per forward pass).
        roi_size: sliding-window size per spatial axis; ``None``: ``spec.roi_size``, then see above.

    Returns:
        float32 numpy array (N, num_classes, *S), softmax over axis 1.
    """
    import numpy as np
    import torch

    if not spec.is_segmentation:
        raise ValueError(f"predict_seg_proba: {spec.arch} is not a segmentation network (use predict_proba)")
    device = next(model.parameters()).device
    window = roi_size or spec.roi_size or (spec.input_shape[1:] if spec.spatial_dims == 3 else None)
    window = tuple(window) if window else None
    out = []
    with torch.inference_mode():
        if window is None:
            for i in range(0, len(x), batch_size):
                xb = torch.as_tensor(np.asarray(x[i : i + batch_size]), device=device).float()
                out.append(torch.softmax(model(xb).float(), dim=1).cpu().numpy())
        else:
            from monai.inferers import sliding_window_inference

            for i in range(len(x)):  # one volume at a time: its windows are the batch
                xb = torch.as_tensor(np.asarray(x[i : i + 1]), device=device).float()
                logits = sliding_window_inference(xb, window, batch_size, model, overlap=0.25, mode="gaussian")
                out.append(torch.softmax(torch.as_tensor(logits).float(), dim=1).cpu().numpy())
    if not out:
        return np.zeros((0, spec.num_classes, *spec.input_shape[1:]), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)
