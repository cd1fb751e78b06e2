"""`dvc plots show` draws the pipeline's plots (five of the classifier, three of the segmenter) on a page that needs
no network."""

from __future__ import annotations

import json
import re

import pytest

from tests._repo import copy_repo, dvc

PLOTS = {"classify-training-loss", "classify-validation-metrics", "classify-roc", "classify-precision-recall",
         "classify-confusion", "segment-training-loss", "segment-validation-dice", "segment-test-dice-per-case"}

# the columns the stages write (tasks/train.py history, tasks/evaluate.py curves and predictions, tasks/evaluate_seg.py
# per-case table), a few rows each
FILES = {
    "reports/classify/train/history.csv": "epoch,train_loss,val_accuracy,val_f1,val_auc\n1,0.7,0.5,0.4,0.6\n"
                                          "2,0.5,0.7,0.6,0.8\n",
    "reports/classify/evaluate/outputs/roc.csv": "fpr,tpr,threshold\n0.0,0.0,1.0\n0.2,0.8,0.5\n1.0,1.0,0.0\n",
    "reports/classify/evaluate/outputs/pr.csv": "recall,precision\n1.0,0.5\n0.8,0.9\n0.0,1.0\n",
    "reports/classify/evaluate/outputs/predictions.csv": "image_id,patient_id,actual,predicted\na,p,lesion,lesion\n"
                                                         "b,q,normal,lesion\n",
    "reports/segment/train/history.csv": "epoch,train_loss,val_dice,val_loss\n1,0.9,0.4,0.8\n2,0.6,0.7,0.5\n",
    "reports/segment/evaluate/outputs/per_case.csv": "case,patient_id,dice\nI1,P1,0.81\nI2,P2,0.64\nI3,P2,0.9\n",
}  # fmt: skip


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The HTML `dvc plots show` writes in a fresh copy of this repo (the page template generated as by
    `make install`)."""
    from tasks.reporting.plots_page import write_page

    repo = copy_repo(tmp_path_factory.mktemp("plots"))
    write_page(repo / ".dvc" / "plots.html")
    for rel, text in FILES.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    dvc(repo, "plots", "show", "-o", "out")
    return (repo / "out" / "index.html").read_text(encoding="utf-8")


def test_page_loads_nothing_from_the_network(page: str) -> None:
    loads = re.findall(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not loads, "the plots page fetches from the network"
    assert "cdn.jsdelivr" not in page
    assert "window.vegaEmbed=" in page.replace(" ", ""), "vega-embed must be inlined and global for DVC's divs"


def test_each_plot_once(page: str) -> None:
    ids = re.findall(r'<div id\s*=\s*"([^"]+)"', page)
    assert sorted(ids) == sorted(PLOTS), "the stage-level plots entries would add duplicates of these"
    assert page.count("vegaEmbed('#") + page.count('vegaEmbed("#') == len(PLOTS)


def test_specs_render_offline(page: str) -> None:
    """Each embedded Vega-Lite spec renders to SVG with the same (inlined) library, with its data points."""
    import vl_convert

    specs = re.findall(r"var spec = (\{.*?\});\s*\n", page, re.S)
    assert len(specs) == len(PLOTS)
    for text in specs:
        spec = json.loads(text)
        svg = vl_convert.vegalite_to_svg(spec)
        assert svg.startswith("<svg") and len(svg) > 1000
