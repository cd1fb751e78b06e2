"""Third-party messages that alarm without informing, silenced in this one place, each with the reason.

Every stage's ``main()`` calls :func:`silence_known_noise` first (before the heavy imports that print them). Only
the exact messages below are dropped; every other warning of these libraries, and every warning of ours, still shows.

What is silenced, and why:

* **coremltools, "Failed to load _ML...Proxy: No module named 'coremltools.libcoremlpython'"** (8 lines per
  import on Linux): the native Core ML runtime exists only on macOS. medpipe never calls ``MLModel.predict`` on
  Linux; it checks a package by its spec and by traced/ONNX parity (tasks/export.py), so nothing is missing.
* **coremltools, "Torch version 2.13.0 has not been tested with coremltools"**: the conversion of this torch is
  checked on every export (traced vs eager vs ONNX, max abs difference in export.json and MLflow), which is a
  stronger statement than the version table.
* **coremltools, "scikit-learn version ... is not supported ... Disabling scikit-learn conversion API"**: medpipe
  does not use coremltools' scikit-learn converter (the SVM baseline has no Core ML export; export says so).
* **MONAI, "nvImageCodec is not available" / "NvImgCodecPydicomReader ... did not register"**: MONAI probes for
  NVIDIA's GPU DICOM decoder whenever ``LoadImage`` is built, even with ``reader="NumpyReader"``; medpipe decodes
  DICOM with pydicom in tasks/dicom and never uses MONAI's DICOM readers.
* **MLflow, "Validating input example against model signature"** (INFO, once per registered version): the example
  is a blank sample medpipe logs so the signature can be checked; a failed check is a WARNING and still shows.
* **MLflow's artifact download progress bars** (three per promote, each a few thousandths of a second): set off
  with ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false`` unless the caller set that variable.

Fixed at the source instead (not silenced): coremltools' output renaming (the Core ML outputs are named in
tasks/coreml/convert.py), MLflow's missing input example (tasks/tracking.py logs one), sklearn's
``UndefinedMetricWarning`` per bootstrap resample (tasks/metrics.auc returns NaN itself for one-class samples),
DVC's "'models/checkpoints' is empty" (the resume checkpoint is scratch, not a DVC output).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# (logger name, message pattern): records logged straight to these loggers whose message matches are dropped
LOG_NOISE: tuple[tuple[str, str], ...] = (
    ("coremltools", r"Failed to load _ML\w*Proxy: No module named 'coremltools\.libcoremlpython'"),
    ("coremltools", r"Torch version \S+ has not been tested with coremltools"),
    ("coremltools", r"scikit-learn version \S+ is not supported\..*Disabling scikit-learn conversion API"),
    ("monai.data.nvimgcodec_pydicom_plugin", r"nvImageCodec is not available"),
    ("mlflow.pyfunc", r"^Validating input example against model signature$"),
)
# (warning category, message pattern) for warnings.warn
WARNING_NOISE: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register"),
)
ENV_DEFAULTS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


class _DropMatching(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in self.patterns)


def silence_known_noise() -> None:
    """Install the filters above (idempotent; call before importing coremltools or MONAI)."""
    by_logger: dict[str, list[str]] = {}
    for name, pattern in LOG_NOISE:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(patterns))
    for category, pattern in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
