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
        ({"base.split_seed": -1}, "base.split_seed: Input should be greater than or equal to 0"),
        ({"train.augmentation.flip_prob": 2}, "train.augmentation.flip_prob: Input should be less than or equal to 1"),
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


def test_schema_defaults_equal_params_yaml():
    """Code that builds a group without the file gets what the pipeline gets: one schema, one truth."""
    from tasks.config import Params

    assert Params().model_dump(mode="json") == load_params(REPO / "params.yaml").model_dump(mode="json")


def test_top_level_typo_is_an_error():
    with pytest.raises(ParamsError) as err:
        load_params(REPO / "params.yaml", {"trian.epochs": 5})
    assert "trian: unknown key" in str(err.value)


def test_apply_overrides_sets_nested_keys_and_refuses_a_scalar_on_the_way():
    from tasks.config import apply_overrides

    raw = {"train": {"epochs": 3, "svm": {"C": 1.0}}}
    assert apply_overrides(raw, {"train.svm.C": 2.5, "train.epochs": 7}) is raw
    assert raw == {"train": {"epochs": 7, "svm": {"C": 2.5}}}
    with pytest.raises(ParamsError, match="train.epochs.x: epochs is not a group"):
        apply_overrides(raw, {"train.epochs.x": 1})


def test_write_overrides_keeps_comments_and_validates_before_writing(tmp_path):
    from tasks.config import write_overrides

    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    params = write_overrides(path, {"train.epochs": 2})
    assert params.train.epochs == 2
    text = path.read_text()
    assert "# medpipe settings: the one source of truth" in text  # comments survive the round trip
    changed = [(a, b) for a, b in zip(original.splitlines(), text.splitlines(), strict=True) if a != b]
    assert changed == [("  epochs: 30", "  epochs: 2")], changed  # one value changed in place; null stays null
    write_overrides(path, {"base.class_names": ["a", "b"]})
    assert load_params(path).base.class_names == ["a", "b"] and load_params(path).train.epochs == 2
    before = path.read_text()
    with pytest.raises(ParamsError, match="train.epochs"):
        write_overrides(path, {"train.epochs": -3})
    assert path.read_text() == before, "an invalid override must not be written"


def test_labels_csv_must_lie_inside_the_input():
    for bad in ("/data/labels.csv", "../labels.csv"):
        with pytest.raises(ParamsError, match="ingest.labels_csv"):
            load_params(REPO / "params.yaml", {"ingest.labels_csv": bad})
    assert load_params(REPO / "params.yaml", {"ingest.labels_csv": None}).ingest.labels_csv is None
    with pytest.raises(ParamsError, match="MedMNIST .npz carries its own labels"):
        load_params(REPO / "params.yaml", {"ingest.source": "medmnist"})


def test_config_cli_validates_the_whole_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((REPO / "params.yaml").read_text() + "\ntrian:\n  epochs: 5\n")
    out = subprocess.run([sys.executable, "-m", "tasks.config", "--quiet", str(bad)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "trian: unknown key" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "tasks.config", "--quiet", str(REPO / "params.yaml")], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == ""
