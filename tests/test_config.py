"""params.yaml: the real file validates; bad values fail before any work, naming the key and the expected form."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def test_real_params_validate():
    p = load_params(REPO / "params.yaml")
    assert p.train.family in ("cnn", "rnn", "svm")
    assert p.base.class_names[p.base.positive_class]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"train.epochs": 0}, "train.epochs: Input should be greater than or equal to 1"),
        ({"train.epochs": "many"}, "train.epochs: Input should be a valid integer"),
        ({"train.family": "xgboost"}, "train.family: Input should be 'cnn', 'rnn' or 'svm'"),
        ({"train.learning_rate": 0.1}, "train.learning_rate: unknown key"),
        ({"preprocess.spatial_size": [64]}, "preprocess.spatial_size"),
        ({"base.positive_class": 5}, "positive_class=5 is not an index of class_names"),
        ({"evaluate.threshold": 1.5}, "evaluate.threshold: Input should be less than or equal to 1"),
    ],
)
def test_bad_params_name_the_key(override, needle):
    with pytest.raises(ParamsError) as err:
        load_params(REPO / "params.yaml", override)
    assert needle in str(err.value)


def test_stage_cli_fails_before_work(tmp_path):
    bad = tmp_path / "params.yaml"
    text, n = re.subn(r"(?m)^  epochs: \d+", "  epochs: -3", (REPO / "params.yaml").read_text())
    assert n == 1
    bad.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "tasks.train", "--params", str(bad), "--input", str(tmp_path / "nothing"),
         "--output", str(tmp_path / "model")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert "train.epochs" in out.stderr and "greater than or equal to 1" in out.stderr
    assert not (tmp_path / "model").exists(), "nothing may be written when params are invalid"
