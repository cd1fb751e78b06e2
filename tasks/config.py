"""The typed, validated schema of ``params.yaml``.

Every stage loads its settings through :func:`load_params`; unknown keys, wrong types and out-of-range values
fail before any work is done, with a message that names the file, the dotted key and the expected form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """Raised when params.yaml (or an override) does not match the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseParams(_Strict):
    seed: int = Field(42, ge=0)
    dataset: str = "synthetic-ct"
    experiment: str = "medpipe"
    sweep: str | None = None  # a name: each run is nested under one MLflow parent run of that name (seed/model grids)
    model_name: str = "medpipe-classifier"
    # index = label value; null: taken from the data (a MedMNIST set's class count, or the label CSV's values)
    class_names: list[str] | None = Field(default_factory=lambda: ["normal", "lesion"], min_length=2)
    positive_class: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _positive_in_range(self) -> BaseParams:
        if self.class_names is not None and self.positive_class >= len(self.class_names):
            raise ValueError(
                f"positive_class={self.positive_class} is not an index of class_names {self.class_names}"
            )
        return self


class SynthParams(_Strict):
    n_patients: int = Field(240, ge=4)
    max_studies_per_patient: int = Field(2, ge=1)
    image_size: int = Field(128, ge=32, le=1024)
    slices_per_study: int = Field(1, ge=1)
    positive_fraction: float = Field(0.5, gt=0, lt=1)
    seed: int = Field(7, ge=0)


_PRIVATE_SAFELIST = r"^[^/\\]{1,64}/[0-9A-Fa-f]{3}[13579BDFbdf]/[0-9A-Fa-f]{2}$"


class DeidParams(_Strict):
    """PS3.15 Annex E basic profile options (tasks/dicom/profile.py)."""

    secret_env: str = "MEDPIPE_DEID_SECRET"
    shift_dates: bool = True  # Retain Longitudinal Temporal Information with Modified Dates; False: dates removed
    max_date_shift_days: int = Field(365, ge=1)
    retain_device_identity: bool = False  # Retain Device Identity option (serial numbers, station names, ...)
    clean_descriptors: bool = False  # Clean Descriptors option: keep descriptions holding no identifying value
    # private elements kept (all others are removed), each "<private creator>/<group>/<element byte>", e.g.
    # "SIEMENS CSA HEADER/0029/10" keeps (0029,xx10) of the block that creator reserved
    keep_private: list[Annotated[str, Field(pattern=_PRIVATE_SAFELIST)]] = Field(default_factory=list)
    write_dicom: bool = False  # also write the de-identified instances under <output>/dicom


class SeriesParams(_Strict):
    """Which series become images when a study holds several (tasks/series.py); the manifest says why."""

    modalities: list[str] = Field(default_factory=list)  # e.g. [CT, MR]; empty: any
    body_parts: list[str] = Field(default_factory=list)  # BodyPartExamined values, any case; empty: any
    orientation: Literal["any", "axial", "coronal", "sagittal"] = "any"
    min_slices: int = Field(1, ge=1)
    max_gap_factor: float = Field(1.5, gt=1)  # a gap over this x the median slice step is a missing slice


class IngestParams(_Strict):
    source: Literal["dicom", "medmnist"] = "dicom"
    dicom_dir: str = "data/synthetic/dicom"
    labels_csv: str | None = "data/synthetic/labels.csv"
    label_key: str = "AccessionNumber"
    label_column: str = "label"
    medmnist_path: str | None = None  # an official MedMNIST .npz; null: medmnist_name + medmnist_size
    medmnist_name: str | None = None  # a MedMNIST flag, e.g. adrenalmnist3d, found in $MEDMNIST_ROOT
    medmnist_size: Literal[28, 64, 128, 224] = 28
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    deid: DeidParams = DeidParams()
    series: SeriesParams = SeriesParams()
    color: Literal["reject", "rgb"] = "reject"  # RGB/YBR/PALETTE COLOR: quarantine (grayscale task) or keep as RGB
    voi: bool = False  # apply the file's VOI LUT / first window after the Modality LUT (display units, not HU)
    multiframe: Literal["stack", "split"] = "stack"  # a multi-frame instance: one volume, or one image per frame
    workers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _medmnist_named(self) -> IngestParams:
        if self.source == "medmnist" and not (self.medmnist_path or self.medmnist_name):
            raise ValueError("source: medmnist needs medmnist_path (a .npz) or medmnist_name (e.g. adrenalmnist3d)")
        return self


class PreprocessParams(_Strict):
    window_center: float = 40.0
    window_width: float = Field(400.0, gt=0)
    spatial_size: list[int] | None = Field(default_factory=lambda: [64, 64], min_length=2, max_length=3)

    @model_validator(mode="after")
    def _positive_sizes(self) -> PreprocessParams:
        if self.spatial_size is not None and any(s < 8 for s in self.spatial_size):
            raise ValueError(f"spatial_size entries must be >= 8, got {self.spatial_size}")
        return self


class SvmParams(_Strict):
    C: float = Field(1.0, gt=0)
    kernel: Literal["rbf", "linear", "poly", "sigmoid"] = "rbf"
    feature_size: int = Field(16, ge=2, le=64)


class TrainParams(_Strict):
    family: Literal["cnn", "rnn", "svm"] = "cnn"
    arch: Literal["resnet10", "resnet18", "resnet34", "densenet121"] = "resnet18"
    width: float = Field(1.0, gt=0, le=4)  # ResNet widen factor: 0.25 -> 16/32/64/128 channels
    stem_stride: int = Field(1, ge=1, le=4)  # ResNet stem stride: 2 halves every feature map (4x/8x fewer FLOPs)
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_epochs: int = Field(1, ge=0)  # linear LR warm-up, then cosine decay to 0 (per optimiser step)
    weight_decay: float = Field(1e-4, ge=0)
    augment: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    ema: float = Field(0.0, ge=0, lt=1)  # decay of an exponential moving average of the weights; 0 = off
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(0, ge=0)
    # the validation metric that picks the epoch; loss = cross-entropy (lower is better), steadier on small splits
    select_metric: Literal["auc", "accuracy", "f1", "loss"] = "auc"
    svm: SvmParams = SvmParams()


class EvaluateParams(_Strict):
    # on the positive-class probability (binary); "val": the accuracy-optimal threshold train found on validation
    threshold: Annotated[float, Field(ge=0, le=1)] | Literal["val"] = 0.5
    bootstrap: int = Field(1000, ge=0)
    ci: float = Field(0.95, gt=0, lt=1)


class ExportParams(_Strict):
    author: str = "medpipe contributors"
    license: str = "Apache-2.0"
    description: str = "Binary classifier trained by medpipe"
    parity_tolerance: float = Field(1e-4, gt=0)
    parity_images: int = Field(64, ge=0)
    deployment_target: Literal["iOS16", "iOS17", "iOS18"] = "iOS16"
    onnx_opset: int = Field(17, ge=13, le=20)


class PromoteParams(_Strict):
    metric: str = "val_auc"
    greater_is_better: bool = True


class Params(_Strict):
    """All of params.yaml. Each stage reads ``params.base`` and its own group."""

    base: BaseParams = BaseParams()
    synth: SynthParams = SynthParams()
    ingest: IngestParams = IngestParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    promote: PromoteParams = PromoteParams()


def _union_tag(part: Any) -> bool:
    """Whether a pydantic error-location part names a union member (``constrained-float``, ``literal['val']``)."""
    return isinstance(part, str) and (part.startswith(("constrained-", "literal[", "list[")) or part in _TYPE_TAGS)


_TYPE_TAGS = {"float", "int", "str", "bool", "none"}


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"] if not _union_tag(p)) or "<root>"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (not in the schema; check the spelling)"
    return f"{key}: {msg} (got {err.get('input')!r})"


def validate_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping.

    Args:
        raw: the parsed YAML mapping.
        source: where it came from, used in the error message.

    Raises:
        ParamsError: naming every offending dotted key and the expected form.
    """
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = "\n  ".join(_describe(e) for e in exc.errors())
        raise ParamsError(f"{source}: invalid params:\n  {lines}") from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {dotted}: {part} is not a group")
    node[parts[-1]] = value


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate params.yaml, applying dotted-key overrides (``{"train.epochs": 1}``)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return validate_params(raw, str(path))


def load_params_or_exit(path: Path | str = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """:func:`load_params` for a CLI: on bad params print the message and exit with status 2, before any work."""
    import sys

    try:
        return load_params(path, overrides)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def params_hash(params: Params) -> str:
    """A short, stable hash of the full params (for tags)."""
    import hashlib
    import json

    blob = json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def main() -> None:
    """``python -m tasks.config [params.yaml]``: validate and print the params, or fail naming the key."""
    import sys

    params = load_params_or_exit(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PARAMS)
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))


if __name__ == "__main__":
    main()
