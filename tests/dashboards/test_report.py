"""The HTML report and comparison page of a real pipeline, rendered by headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from dashboards.report import PAGE, RICH, comparison, run_report

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


def _cards(dom: str) -> str:
    """The rendered cards of a report's DOM (not its script or data)."""
    return dom.split('id="cards"')[1].split("<script")[0]


def _table(n: int, text=lambda i: f"tok{i} «hit{i}» after") -> pa.Table:
    """n features whose frequency falls with the id; each with 3 examples and 2 logits."""
    ex = pa.struct([("text", pa.string()), ("activation", pa.float32()),
                    ("seq_id", pa.int64()), ("pos", pa.int32())])  # fmt: skip
    return pa.table({
        "feature_id": pa.array(range(n), pa.int32()),
        "freq": [1.0 / (i + 1) for i in range(n)],
        "max_act": [2.0] * n,
        "top_examples": pa.array([[{"text": text(i), "activation": 2.0 - j / 10, "seq_id": 0,
                                    "pos": j} for j in range(3)] for i in range(n)],
                                  pa.list_(ex)),
        "top_logits": [[f"lg{i}", "<b>"] for i in range(n)],
        "nearest_feature": [(i + 1) % n for i in range(n)],
        "nearest_cos": [0.5] * n,
        "cluster_id": [i % 7 for i in range(n)],
    })  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_cards_escape_and_highlight_in_chromium(tmp_path: Path) -> None:
    table = _table(1, text=lambda i: "a<script>«x&y»z</script><!--")
    page = tmp_path / "r.html"
    page.write_text(run_report({"run_id": "r", "run_name": "n"}, {}, {}, table))
    dom = _dom(page)
    assert "<mark>x&amp;y</mark>" in dom and "a&lt;script&gt;" in dom and "&lt;b&gt;" in dom
    assert "<b>" not in dom.split('id="cards"')[1]  # a logit's markup stays text


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_every_feature_is_searchable_and_paged(tmp_path: Path) -> None:
    """5,000 features: pages of PAGE cards, most frequent first; the search covers features far
    beyond the RICH most frequent, which keep all their examples (the others keep 2)."""
    n = 5000
    page = tmp_path / "r.html"
    page.write_text(run_report({"run_id": "r", "run_name": "n"}, {}, {}, _table(n)))
    dom = _dom(page)
    ids = [int(i) for i in re.findall(r'<div class="card" id="f(\d+)"', dom)]
    assert ids == list(range(PAGE)) and f'id="shown">{n}<' in dom
    assert f"page 1 of {n // PAGE}" in dom and _cards(dom).count('class="ex"') == 3 * PAGE
    third = _dom(page, "#page=3")
    ids = [int(i) for i in re.findall(r'<div class="card" id="f(\d+)"', third)]
    assert ids == list(range(2 * PAGE, 3 * PAGE)) and f"page 3 of {n // PAGE}" in third
    found = _dom(page, "#q=hit4321%C2%BB")  # the 4,322nd most frequent, by its example
    assert re.findall(r'<div class="card" id="f(\d+)"', found) == ["4321"]
    assert 'id="shown">1<' in found and _cards(found).count('class="ex"') == 2  # beyond RICH
    assert RICH < 4321


def test_report_without_history_or_features_still_renders() -> None:
    empty = pa.table({"feature_id": pa.array([], pa.int32()), "freq": pa.array([], pa.float64())})
    page = run_report({"run_id": "r", "run_name": "n"}, {}, {"loss": []}, empty)
    assert "loss: no data" in page and "0 dead" in page
    assert "no runs with L0" in comparison([])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_pipeline_report_renders_cards_and_searches_in_chromium(study) -> None:
    from tasks.support import tracking

    run = study["trained"]["run_id"]
    page = Path(study["report"]["report"])
    dom = _dom(page)
    cards = re.findall(r"<div class=\"card\" id=\"f(\d+)\"", dom)
    assert len(cards) == 64
    assert 'id="shown">64<' in dom and "<mark>" in dom and "<polyline" in dom
    # the search box, filled from the URL: only the cards containing the text are shown
    filtered = _dom(page, "#q=feature%207")  # ids 0..63: "feature 7" is in one card only
    assert re.search(r'id="shown">1<', filtered)
    assert re.findall(r"<div class=\"card\" id=\"f(\d+)\"", filtered) == ["7"]
    arts = {a.path for a in tracking.client().list_artifacts(run, "report")}
    assert arts == {f"report/{run}.html"}
    compare = _dom(Path(study["report"]["comparison"]))
    assert compare.count("<circle") >= 2 and run in compare  # one point per run, two plots


def test_loglog_plot_puts_points_of_the_law_on_its_line() -> None:
    from dashboards.report import loglog_plot

    law = (3.0, -0.25)
    pts = [(10.0**e, law[0] * (10.0**e) ** law[1], f"p{e}") for e in (9, 10, 11, 12)]
    svg = loglog_plot([("#c33", pts)], "C", "loss", fit=law, mark=(1e13, law[0] * 1e13 ** law[1]))
    dots = [(float(x), float(y)) for x, y in re.findall(r"cx='([\d.]+)' cy='([\d.]+)' r='4'", svg)]
    ring = re.search(r"cx='([\d.]+)' cy='([\d.]+)' r='7'", svg)
    x1, y1, x2, y2 = map(float, re.search(
        r"x1='([\d.]+)' y1='([\d.]+)' x2='([\d.]+)' y2='([\d.]+)'", svg).groups())  # fmt: skip
    assert len(dots) == 4 and ring is not None
    for x, y in [*dots, (float(ring[1]), float(ring[2]))]:  # on the dashed fit line, to 0.2 px
        assert y == pytest.approx(y1 + (y2 - y1) * (x - x1) / (x2 - x1), abs=0.2)
    assert dots == sorted(dots) and dots[0][1] < dots[-1][1]  # y falls: svg y grows downwards


def test_scaling_page_shows_fits_recommendation_and_families() -> None:
    from dashboards.report import scaling_page

    points = [
        {"run_id": f"r{i}", "d_sae": 2**i, "tokens": 1000 * 2**i, "lr": 1e-3, "compute": 4.0**i,
         "loss": 4.0**-i, "fvu": 0.5 * 2.0**-i, "l0": 10.0, "frontier": True,
         "fvu_frontier": True, "best_lr": True}
        for i in range(1, 5)
    ]  # fmt: skip
    fits = [
        {"quantity": q, "coef": 1.0, "exponent": b, "exponent_lo": b - 0.01,
         "exponent_hi": b + 0.01, "n_points": 4, "at_budget": 1e4 if q == "d_sae" else 0.5}
        for q, b in [("loss", -1.0), ("fvu", -0.5), ("d_sae", 0.5), ("tokens", 0.5), ("lr", 0.0)]
    ]  # fmt: skip
    family = {"parent": 3, "small_d_sae": 2, "large_d_sae": 4, "children": [(0, 0.9), (2, 0.7)],
              "parent_examples": ["def «main»("],
              "child_examples": [["«import» os"], ["x"]]}  # fmt: skip
    page = scaling_page(points, fits, 2560.0, [family], "relu")
    assert (
        page.count("<svg") == 5 and page.count("r='4'") == 8 + 8 + 4 + 4 + 4
    )  # loss, fvu: all + frontier
    assert "recommend d_sae ≈ 10,000" in page and "<mark>main</mark>" in page
    assert "feature 3 of d_sae=2 → 2 features of d_sae=4" in page
    assert "child 2 (cos 0.70)" in page


def test_comparison_data_parses_as_json_whatever_the_text() -> None:
    """The page's data block is JSON a script can read (it was HTML-escaped: &quot; did not
    parse), and no value can close the element."""
    import re

    from dashboards.report import comparison

    runs = [{"run_id": "a", "run_name": 'x "y" </script><!-- & z', "eval_l0": 3.0}]
    page = comparison(runs, extra=("run_name",))
    block = re.search(r"<script type='application/json' id='data'>(.*?)</script>", page, re.S)
    assert block is not None and "</script>" not in block.group(1)
    data = json.loads(block.group(1))
    assert data[0]["run_name"] == 'x "y" </script><!-- & z' and data[0]["eval_l0"] == 3.0
