"""The label table: a CSV that maps the value of a DICOM attribute (e.g. AccessionNumber) to a class index."""

from __future__ import annotations

import csv
from pathlib import Path


def read_labels(path: Path, key: str, column: str, n_classes: int | None) -> dict[str, int]:
    """The label table: label-key value -> class index (in [0, n_classes); any index >= 0 when None).

    Raises:
        ValueError: naming the file (and line) for a missing column, a bad or out-of-range label, or a key given
            two different labels.
    """
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {key, column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        table: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            k, raw = (row[key] or "").strip(), (row[column] or "").strip()
            try:
                label = int(raw)
            except ValueError:
                raise ValueError(f"{path}:{line}: {column}={raw!r} is not an integer class index") from None
            if not k or not 0 <= label < (n_classes or label + 1):
                expected = f"in [0, {n_classes - 1}]" if n_classes else ">= 0"
                raise ValueError(f"{path}:{line}: need a {key} and {column} {expected}, got {raw!r}")
            if table.setdefault(k, label) != label:
                raise ValueError(f"{path}:{line}: {key} given two different labels")
    return table

