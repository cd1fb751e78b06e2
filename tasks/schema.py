"""The params schema: one pydantic model per ``params.yaml`` group, the tasks and their merged views.

:class:`Params` is all of ``params.yaml``; every group is strict (an unknown key is an error) and its defaults equal
``params.yaml``'s values. :meth:`Params.for_task` gives a task's view: each shared group with the task's overrides
deep-merged in and validated as a whole, with the checks a task's kind needs. Loading, overrides and the command line
are :mod:`tasks.config`'s.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """Raised when params.yaml (or an override) does not match the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseParams(_Strict):
    # three seeds, so that a grid over one does not move the others: the patient split (fixed across a seed grid;
    # a split grid is an explicit grid over this key), training (weight init, data order, augmentation) and, in
    # evaluate, the bootstrap (evaluate.bootstrap_seed)
    split_seed: int = Field(42, ge=0)
    seed: int = Field(42, ge=0)
    dataset: str = "synthetic-ct"
    experiment: str = "medpipe"
    sweep: str | None = None  # a name: each run is nested under one MLflow parent run of that name (seed/model grids)
    # index = label value of the classification task; null: taken from the data (a MedMNIST set's class count, or
    # the label CSV's values)
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


class SanityParams(_Strict):
    """Decode sanity checks after every decode (tasks/dicom/sanity.py: the thresholds' measurements); each refusal
    is a quarantine reason of its own (implausible_values, constant_image, corrupt_stream)."""

    enabled: bool = True  # false: not checked (to time them); the codestream header check always runs
    max_mode_fraction: float = Field(0.99, gt=0.5, le=1)  # constant_image: a larger share of pixels hold one value
    max_jump_fraction: float = Field(0.25, gt=0, le=1)  # corrupt_stream: a compressed grayscale image's row band
    # with a larger share of neighbours more than 1/8 of the BitsStored range apart (real images: <= 0.19)


class MaskParams(_Strict):
    """Masks read with the images (DICOM SEG, RTSTRUCT, NIfTI/NRRD, PNG): which labels they may hold."""

    # foreground label names: mask value v = classes[v - 1], 0 = background; DICOM SEG segment labels and RTSTRUCT
    # ROI names are matched to them (any case). A segmentation task's classes are ["background", *classes].
    classes: list[str] = Field(default_factory=lambda: ["lung", "lesion"], min_length=1)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        lowered = [v.strip().lower() for v in value]
        if any(not v for v in lowered) or len(set(lowered)) != len(lowered) or "background" in lowered:
            raise ValueError(f"{value}: give distinct, non-empty foreground names (background is implied)")
        return value


class IngestParams(_Strict):
    source: Literal["dicom", "medmnist", "image_folder"] = "dicom"
    # the data set, one path (so that it is one DVC dependency): a folder of DICOM files (any nesting) holding
    # the label table too, an official MedMNIST .npz, or an image folder (images/<id>.png|jpg|nii.gz|nrrd, optional
    # masks/<id>.*, manifest.csv and splits/; tasks/sources/image_folder.py)
    input: str = "data/synthetic/dicom"
    # the label table, a relative path inside `input` (it is then part of the same DVC dependency); null: none
    labels_csv: str | None = "labels.csv"
    label_key: str = "AccessionNumber"
    label_column: str = "label"
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    deid: DeidParams = DeidParams()
    series: SeriesParams = SeriesParams()
    # RGB/YBR/PALETTE COLOR DICOM: quarantine (grayscale task) or keep as RGB; an image folder's colour PNG/JPEG:
    # converted to grayscale with a note, or kept as RGB
    color: Literal["reject", "rgb"] = "reject"
    voi: bool = False  # apply the file's VOI LUT / first window after the Modality LUT (display units, not HU)
    multiframe: Literal["stack", "split"] = "stack"  # a multi-frame instance: one volume, or one image per frame
    # ImageType values whose images are quarantined (excluded_image_type); one matching value of a file's ImageType
    # excludes it. Default: scouts. Others: DERIVED, SECONDARY, MPR, PROJECTION IMAGE, ...
    exclude_image_types: list[str] = Field(default_factory=lambda: ["LOCALIZER"])
    sanity: SanityParams = SanityParams()
    masks: MaskParams = MaskParams()
    # image_folder with splits/train{k}.txt and val{k}.txt: use split k (val{k} = the test split, train{k} is split
    # into train/val by patient); null: medpipe's own patient split
    folder_split: int | None = Field(None, ge=1)
    workers: int = Field(2, ge=1)
    # where ingest writes the only mapping from its file pseudonyms (quarantine.csv) back to the real paths, which
    # name patients in real exports: a LOCAL report, git-ignored (/reports/*), no DVC output, never logged; outside
    # the ingest output and input (checked by ingest.run, which knows the output); null: not written
    local_report: str | None = "reports/ingest/local_paths.csv"

    @field_validator("labels_csv")
    @classmethod
    def _labels_inside_input(cls, value: str | None) -> str | None:
        if value is not None:
            parts = PurePosixPath(value.replace("\\", "/")).parts
            if not parts or PurePosixPath(value).is_absolute() or ".." in parts or ":" in parts[0]:
                raise ValueError(
                    f"{value!r} must be a relative path inside ingest.input (e.g. labels.csv), so that the label "
                    "table is part of the stage's one DVC dependency; copy it into the data folder"
                )
        return value

    @field_validator("exclude_image_types")
    @classmethod
    def _image_type_values(cls, value: list[str]) -> list[str]:
        out = [v.strip().upper() for v in value]
        bad = [v for v in out if not (0 < len(v) <= 16 and all(c.isascii() and (c.isalnum() or c in " _") for c in v))]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an ImageType value (DICOM CS: up to 16 of A-Z 0-9 space _), "
                             "e.g. LOCALIZER")
        return out

    @model_validator(mode="after")
    def _medmnist_has_no_label_table(self) -> IngestParams:
        if self.source == "medmnist" and self.labels_csv is not None:
            raise ValueError("labels_csv: a MedMNIST .npz carries its own labels; set labels_csv: null")
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


class AugmentParams(_Strict):
    """Magnitudes of the batched training augmentation (tasks/models/augment.py); used when train.augment."""

    flip_prob: float = Field(0.5, ge=0, le=1)  # per sample and spatial axis
    affine_prob: float = Field(0.5, ge=0, le=1)  # share of samples that get the random rotation/scale/shift
    rotate_deg: float = Field(10.0, ge=0, le=180)
    scale: float = Field(0.1, ge=0, lt=1)  # isotropic zoom in [1 - scale, 1 + scale]
    translate: float = Field(0.05, ge=0, le=0.5)  # shift, as a fraction of the field of view per axis
    intensity_scale: float = Field(0.1, ge=0, lt=1)  # gain in [1 - s, 1 + s]
    intensity_shift: float = Field(0.05, ge=0, le=1)  # offset in [-s, s] (inputs are in [0, 1])


class SvmParams(_Strict):
    C: float = Field(1.0, gt=0)
    kernel: Literal["rbf", "linear", "poly", "sigmoid"] = "rbf"
    feature_size: int = Field(16, ge=2, le=64)


CLASSIFIER_ARCHS = ("resnet10", "resnet18", "resnet34", "densenet121")
SEGMENTER_ARCHS = ("unet", "basicunet", "segresnet", "dynunet")


class SegTrainParams(_Strict):
    """Segmentation networks and loss (a segmentation task's ``train.seg``)."""

    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128], min_length=2)  # per resolution level
    loss: Literal["dicece"] = "dicece"  # MONAI DiceCELoss: soft Dice + cross-entropy
    dice_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    # Dice over the whole batch per class (nnU-Net's "batch Dice"), not per image: a small structure absent from most
    # images still gets a strong gradient (per image, a 40-pixel nodule's Dice term hardly moved training)
    batch_dice: bool = True
    # sliding-window ROI for validation/inference ((H, W) or (D, H, W)); null: train.seg.patch_size if set, else the
    # whole preprocessed image at once
    roi_size: list[int] | None = Field(None, min_length=2, max_length=3)
    # patch training (3D volumes first): every training sample is a random crop of this size ((H, W) or (D, H, W)),
    # taken after the augmentation, centred on a foreground voxel with probability pos_fraction, else on background
    # (MONAI RandCropByPosNegLabel); null: whole images. Each size <= preprocess.spatial_size on its axis
    patch_size: list[int] | None = Field(None, min_length=2, max_length=3)
    pos_fraction: float = Field(0.5, ge=0, le=1)


class TrainParams(_Strict):
    family: Literal["cnn", "rnn", "svm"] = "cnn"
    # classifiers: resnet10 | resnet18 | resnet34 | densenet121; segmenters: unet | basicunet | segresnet | dynunet
    arch: Literal["resnet10", "resnet18", "resnet34", "densenet121", "unet", "basicunet", "segresnet",
                  "dynunet"] = "resnet18"  # fmt: skip
    width: float = Field(0.5, gt=0, le=4)  # ResNet widen factor: 0.25 -> 16/32/64/128 channels
    stem_stride: int = Field(1, ge=1, le=4)  # ResNet stem stride: 2 halves every feature map (4x/8x fewer FLOPs)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_epochs: int = Field(1, ge=0)  # linear LR warm-up, then cosine decay to 0 (per optimiser step)
    weight_decay: float = Field(1e-2, ge=0)
    augment: bool = True
    augmentation: AugmentParams = AugmentParams()
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    ema: float = Field(0.98, ge=0, lt=1)  # decay of an exponential moving average of the weights; 0 = off
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(0, ge=0)
    # bf16: training forward passes under torch.autocast(bfloat16) (weights, optimiser, loss and validation stay
    # float32); on CPUs with AVX512-BF16/AMX ~1.6x faster per step (benchmarks/segmentation.py), emulated elsewhere
    precision: Literal["fp32", "bf16"] = "fp32"
    # the validation metric that picks the epoch; loss = cross-entropy (lower is better), steadier on small splits
    select_metric: Literal["auc", "accuracy", "f1", "loss", "dice"] = "auc"  # dice: segmentation (mean foreground)
    svm: SvmParams = SvmParams()
    seg: SegTrainParams = SegTrainParams()


class SegEvaluateParams(_Strict):
    """Segmentation and lesion-detection evaluation (a segmentation task's ``evaluate.seg``)."""

    hd_percentile: float = Field(95, gt=0, le=100)  # HD95: the 95th percentile Hausdorff distance (mm)
    surface_tolerance_mm: float = Field(2.0, gt=0)  # surface Dice: boundary within this distance counts
    detect_class: str | None = "lesion"  # the mask class whose connected components are lesions; null: no detection
    min_lesion_voxels: int = Field(10, ge=1)  # predicted components smaller than this are dropped
    score: Literal["max", "mean"] = "max"  # a lesion's score: max or mean probability inside it
    iou_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.3], min_length=1)
    fp_rates: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)  # FROC: FPs per image
    overlays: int = Field(3, ge=0)  # PNG overlays of the best, median and worst cases (0: none)
    write_dicom_seg: bool = True  # DICOM inputs: the predicted test masks as DICOM SEG referencing their source


class EvaluateParams(_Strict):
    # on the positive-class probability (binary); "val": the accuracy-optimal threshold train found on validation
    threshold: Annotated[float, Field(ge=0, le=1)] | Literal["val"] = 0.5
    bootstrap: int = Field(1000, ge=0)
    bootstrap_seed: int = Field(0, ge=0)  # the resampling's own seed (not base.seed: training seeds leave it)
    ci: float = Field(0.95, gt=0, lt=1)
    seg: SegEvaluateParams = SegEvaluateParams()


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


TASK_GROUPS = ("preprocess", "train", "evaluate", "export", "promote")


class TaskParams(_Strict):
    """One task the pipeline runs: its kind, its registered model, and what it sets differently from the shared
    stage groups (deep-merged over them by :meth:`Params.for_task`, then validated as those groups)."""

    kind: Literal["classification", "segmentation"]
    model_name: str = Field(min_length=1)  # MLflow registered model (and the Core ML package's name)
    description: str | None = None  # the exported model's description (default: the export group's)
    preprocess: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    promote: dict[str, Any] = Field(default_factory=dict)


def _default_tasks() -> dict[str, TaskParams]:
    return {
        "classify": TaskParams(kind="classification", model_name="medpipe-classifier"),
        "segment": TaskParams(
            kind="segmentation", model_name="medpipe-segmenter",
            description="Lung and lesion segmenter trained by medpipe",
            preprocess={"spatial_size": [128, 128]},
            train={"family": "cnn", "arch": "unet", "epochs": 20, "batch_size": 8, "lr": 0.01,
                   "select_metric": "dice", "augmentation": {"rotate_deg": 10.0, "intensity_scale": 0.1}},
            promote={"metric": "val_dice"},
        ),
    }  # fmt: skip


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` deep-merged in (mappings merge key by key; anything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Params(_Strict):
    """All of params.yaml. Each stage reads its own group and the few ``base`` keys dvc.yaml lists for it.

    The defaults here equal params.yaml's values (tests/test_config.py checks it), so code that builds a group
    without a file (a test, a notebook) gets what the pipeline gets.

    ``tasks`` names the tasks the pipeline runs (dvc.yaml runs preprocess .. promote once per task, ``<stage>@<task>``).
    A per-task stage loads ``load_params(..., task=NAME)``: the shared groups with that task's overrides merged in,
    and :attr:`task` set.
    """

    base: BaseParams = BaseParams()
    synth: SynthParams = SynthParams()
    ingest: IngestParams = IngestParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    promote: PromoteParams = PromoteParams()
    tasks: dict[str, TaskParams] = Field(default_factory=_default_tasks, min_length=1)

    _task: tuple[str, TaskParams] | None = PrivateAttr(None)

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: dict[str, TaskParams]) -> dict[str, TaskParams]:
        bad = [k for k in value if not (k.isascii() and k.replace("_", "").replace("-", "").isalnum())]
        if bad:
            raise ValueError(f"task name {bad[0]!r}: use letters, digits, - and _ (it names DVC stages and folders)")
        names = [t.model_name for t in value.values()]
        if len(set(names)) != len(names):
            raise ValueError(f"model_name values {names}: each task registers its own model; make them distinct")
        return value

    @property
    def task(self) -> TaskParams:
        """The task this Params was made for by :meth:`for_task` (raises outside a per-task stage)."""
        if self._task is None:
            raise AttributeError("Params.task: load the params with task=NAME (a per-task stage's --task)")
        return self._task[1]

    @property
    def task_name(self) -> str:
        return self._task[0] if self._task is not None else ""

    def for_task(self, name: str) -> Params:
        """These params as task ``name`` sees them: each shared group with the task's overrides merged in.

        Raises:
            ParamsError: ``name`` is not a task, or a merged group is invalid (naming ``tasks.<name>.<group>.<key>``).
        """
        if name not in self.tasks:
            raise ParamsError(f"tasks.{name}: no such task (params.yaml has tasks {sorted(self.tasks)})")
        entry = self.tasks[name]
        groups, errors = {}, []
        for group in TASK_GROUPS:
            current = getattr(self, group)
            over = getattr(entry, group)
            if not over:
                groups[group] = current
                continue
            try:
                groups[group] = type(current).model_validate(_merge(current.model_dump(), over))
            except ValidationError as exc:
                errors += [describe_error({**e, "loc": ("tasks", name, group, *e["loc"])}) for e in exc.errors()]
        if not errors:
            errors = _kind_errors(name, entry, groups)
        if errors:
            raise ParamsError("invalid params:\n  " + "\n  ".join(errors))
        if entry.description is not None:
            groups["export"] = groups["export"].model_copy(update={"description": entry.description})
        out = self.model_copy(update=groups)
        out._task = (name, entry)
        return out


def _kind_errors(name: str, entry: TaskParams, groups: dict[str, Any]) -> list[str]:
    """What a task's merged groups set that its kind cannot use (a classifier arch for a segmenter, ...)."""
    tp, out = groups["train"], []
    where = f"tasks.{name}.train"
    if entry.kind == "segmentation":
        if tp.family != "cnn" or tp.arch not in SEGMENTER_ARCHS:
            out.append(f"{where}.arch: a segmentation task needs family cnn and arch one of {list(SEGMENTER_ARCHS)} "
                       f"(got family {tp.family}, arch {tp.arch})")
        if tp.select_metric not in ("dice", "loss"):
            out.append(f"{where}.select_metric: a segmentation task selects on dice or loss (got {tp.select_metric})")
        patch, size = tp.seg.patch_size, groups["preprocess"].spatial_size
        if patch is not None and size is not None and (len(patch) != len(size) or
                                                      any(p > s for p, s in zip(patch, size, strict=False))):
            out.append(f"{where}.seg.patch_size: {patch} must have one size per axis of preprocess.spatial_size "
                       f"{size}, each no larger")
        if not groups["promote"].metric.startswith("val_dice") and groups["promote"].metric != "val_loss":
            out.append(f"tasks.{name}.promote.metric: a segmentation task promotes on val_dice (got "
                       f"{groups['promote'].metric})")
    else:
        if tp.family != "svm" and tp.arch not in CLASSIFIER_ARCHS:
            out.append(f"{where}.arch: a classification task needs one of {list(CLASSIFIER_ARCHS)} (got {tp.arch})")
        if tp.select_metric == "dice":
            out.append(f"{where}.select_metric: dice is a segmentation metric; use auc, accuracy, f1 or loss")
    return out


def _union_tag(part: Any) -> bool:
    """Whether a pydantic error-location part names a union member (``constrained-float``, ``literal['val']``)."""
    return isinstance(part, str) and (part.startswith(("constrained-", "literal[", "list[")) or part in _TYPE_TAGS)


_TYPE_TAGS = {"float", "int", "str", "bool", "none"}


def describe_error(err: dict[str, Any]) -> str:
    """One pydantic error as ``dotted.key: message (got value)``, union-member tags left out of the key."""
    key = ".".join(str(p) for p in err["loc"] if not _union_tag(p)) or "<root>"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (not in the schema; check the spelling)"
    got = err.get("input")
    return f"{key}: {msg}" + ("" if isinstance(got, dict) else f" (got {got!r})")
