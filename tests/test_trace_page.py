"""The per-item trace page (issue 13): written by the report stage, read in a real headless browser (chromium)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from schemas.tables import SENTENCE_SCORES, SENTENCES
from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths, text_key, write_parquet
from tasks.report import run_report
from tests.browser import chromium
from tests.test_report import METHODS, _write_metrics, build_synthetic_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<img src=x onerror=\"window.pwned = 1\"></script><!-- not a comment"


@pytest.fixture()
def traced_run(tmp_path) -> RunPaths:
    """The report's synthetic run, with a context unit made of markup (it must show as text and run nothing)."""
    cfg = RunConfig(run="t", runs_dir=tmp_path / "runs")
    paths = RunPaths(cfg.runs_dir / cfg.run)
    paths.root.mkdir(parents=True)
    build_synthetic_run(paths)
    _write_metrics(paths, dict.fromkeys(METHODS, 0.5), half_width=0.1)
    sentences = pl.read_parquet(paths.table("sentences"))
    scores = pl.read_parquet(paths.table("sentence_scores"))
    extra = {"item_id": "q1", "sent_idx": 3, "key": text_key(HOSTILE)}
    write_parquet(sentences.to_dicts() + [extra | {"text": HOSTILE, "char_start": 0, "char_end": 1, "label":
                                                   "irrelevant", "truthful": True}], paths.table("sentences"),
                  SENTENCES)
    write_parquet(scores.to_dicts() + [extra | {"layer": 2, "probe": "logistic", "p_conflict": 0.05,
                                                "flagged": False}], paths.table("sentence_scores"),
                  SENTENCE_SCORES)
    run_report(cfg, paths)
    return paths


def test_the_page_holds_the_evaluated_items_as_data_that_cannot_end_its_script(traced_run):
    page = traced_run.artifact("trace").read_text(encoding="utf-8")
    blob = page.split('<script id="data" type="application/json">', 1)[1].split("</script>", 1)[0]
    data = json.loads(blob)
    assert [i["id"] for i in data["items"]] == ["q0", "q1", "q2", "q3"]  # the test split only, in id order
    q1 = data["items"][1]
    assert [u["text"] for u in q1["units"]][-1] == HOSTILE and [u["marked"] for u in q1["units"]] == [
        True, False, False, False]
    assert [m["method"] for m in q1["methods"]] == METHODS
    assert data["header"]["probe"]["layer"] == 2 and {r["method"] for r in data["header"]["metrics"]} == set(METHODS)
    assert "[trace.html](trace.html)" in traced_run.report.read_text()


def test_the_page_loads_searches_and_shows_an_item_in_chromium(traced_run, tmp_path):
    browser = chromium()
    try:
        browser.get(traced_run.artifact("trace").resolve().as_uri())
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#list li")) == 4)
        assert browser.find_element(By.ID, "count").text == "4 of 4 items"
        assert "layer 2" in browser.find_element(By.ID, "facts").text

        search = browser.find_element(By.ID, "search")
        search.send_keys("fact 2")
        visible = [li for li in browser.find_elements(By.CSS_SELECTOR, "#list li") if li.is_displayed()]
        assert [li.text.splitlines()[0] for li in visible] == ["Where is fact 2?"]
        assert browser.find_element(By.ID, "count").text == "1 of 4 items"
        search.clear()
        search.send_keys("q1")
        (item,) = [li for li in browser.find_elements(By.CSS_SELECTOR, "#list li") if li.is_displayed()]
        item.click()
        pane = browser.find_element(By.ID, "item")
        assert pane.find_element(By.TAG_NAME, "h2").text == "Where is fact 1?"
        units = pane.find_elements(By.CSS_SELECTOR, ".unit")
        assert [u.text for u in units] == ["Fact 1 is in Rome.", "Filler 1 is blue.", "Other 1 is false.", HOSTILE]
        assert ["marked" in u.get_attribute("class") for u in units] == [True, False, False, False]
        assert browser.execute_script("return window.pwned === undefined")  # the markup in a unit ran nothing
        rows = pane.find_elements(By.CSS_SELECTOR, "table tr")[1:]
        assert [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows] == ["correct"] * len(METHODS)

        shot = tmp_path / "trace.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 10_000
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()
