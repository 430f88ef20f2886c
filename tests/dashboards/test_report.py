"""The HTML report and comparison page of a real pipeline, rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from dashboards.report import comparison, feature_card, run_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _dom(path: Path, fragment: str = "") -> str:
    """The DOM after scripts ran, from Debian's chromium in headless mode."""
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"]
    out = subprocess.run(
        [CHROMIUM, *args, f"file://{path}{fragment}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_card_escapes_and_highlights() -> None:
    example = {"text": "a<script>«x&y»z", "activation": 1.5}
    card = feature_card({"feature_id": 3, "freq": 0.1, "max_act": 2.0, "nearest_feature": 1,
                         "nearest_cos": 0.5, "cluster_id": 0, "top_logits": ["<b>"],
                         "top_examples": [example]})  # fmt: skip
    assert "<mark>x&amp;y</mark>" in card and "&lt;script&gt;" in card and "&lt;b&gt;" in card


def test_report_without_history_or_features_still_renders() -> None:
    empty = pa.table({"feature_id": pa.array([], pa.int32()), "freq": pa.array([], pa.float64())})
    page = run_report({"run_id": "r", "run_name": "n"}, {}, {"loss": []}, empty)
    assert "loss: no data" in page and "0 dead" in page
    assert "no runs with L0" in comparison([])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_pipeline_report_renders_cards_and_searches_in_chromium(study) -> None:
    from tasks import tracking

    run = study["trained"]["run_id"]
    page = Path(study["report"]["report"])
    dom = _dom(page)
    cards = re.findall(r"<div class=\"card\" id=\"f(\d+)\"", dom)
    assert len(cards) == 64
    assert 'id="shown">64<' in dom and "<mark>" in dom and "<polyline" in dom
    # the search box, filled from the URL: only the cards containing the text stay visible
    filtered = _dom(page, "#q=feature%207")  # ids 0..63: "feature 7" is in one card only
    assert re.search(r'id="shown">1<', filtered)
    assert filtered.count('style="display: none;"') == 63
    assert re.search(r'<div class="card" id="f7"( style="")?>', filtered)
    arts = {a.path for a in tracking.client().list_artifacts(run, "report")}
    assert arts == {f"report/{run}.html"}
    compare = _dom(Path(study["report"]["comparison"]))
    assert compare.count("<circle") >= 2 and run in compare  # one point per run, two plots
