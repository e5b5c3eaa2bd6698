"""The tracked sweep as people see it: the MLflow UI, in headless Chromium driven by Playwright.

Playwright drives the system's Chromium (Debian's ``chromium``; Playwright's own browser download is not
used). Without one the test skips, saying why, except where ``VJEPA_RAY_REQUIRE_BROWSER=1`` (CI) makes
that a failure.
"""

from __future__ import annotations

import csv
import os
import shutil

import pytest

pytestmark = pytest.mark.slow

REQUIRE_BROWSER_ENV = "VJEPA_RAY_REQUIRE_BROWSER"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 120_000  # the UI's first load on a busy 2-core machine


def chromium_or_skip() -> str:
    """The Chromium executable; skips (fails where a browser is required) when it or Playwright is missing."""
    missing = None
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        missing = "no chromium on PATH (apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[test]')"
    if missing is not None:
        if os.environ.get(REQUIRE_BROWSER_ENV) == "1":
            pytest.fail(f"{missing}, and {REQUIRE_BROWSER_ENV}=1 requires the browser test")
        pytest.skip(missing)
    return executable


def metrics_shown_per_run(page, uri: str, experiment_id: str, parent_name: str,
                          metrics: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Opens the experiment's runs table, unfolds the parent run's children and shows the ``metrics`` columns;
    returns ``{run name: {metric: the cell's text}}`` for every run in the table."""
    page.goto(f"{uri}/#/experiments/{experiment_id}/runs", timeout=UI_TIMEOUT_MS)
    parent = page.locator("[role=row]", has_text=parent_name).first
    parent.wait_for(timeout=UI_TIMEOUT_MS)
    assistant = page.get_by_role("button", name="Close", exact=True)
    if assistant.count():
        assistant.first.click()  # MLflow 3's assistant panel covers the table's right half
    parent.locator("button").first.click()  # the expander in front of the run name: the trials appear
    page.get_by_role("button", name="Columns", exact=True).click()
    for metric in metrics:
        page.get_by_role("dialog").get_by_text(metric, exact=True).click()
    page.keyboard.press("Escape")
    shown = {}
    links = page.locator("[role=row] a")
    for metric in metrics:
        page.locator(f"[role=gridcell][col-id*='{metric}']").first.wait_for(timeout=UI_TIMEOUT_MS)
    for i in range(links.count()):
        name = links.nth(i).inner_text().strip()
        # ag-grid may split a row between pinned and scrolling containers: the row index joins them.
        index = links.nth(i).locator("xpath=ancestor::*[@role='row'][1]").get_attribute("row-index")
        row = page.locator(f"[role=row][row-index='{index}']")
        shown[name] = {metric: row.locator(f"[role=gridcell][col-id*='{metric}']").first.inner_text().strip()
                       for metric in metrics}
    return shown


def test_mlflow_ui_lists_the_sweeps_trials_under_it_with_their_top1_and_collapse_flag(tracked_sweep, tmp_path):
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with open(tracked_sweep.folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    experiment = tracked_sweep.experiment
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            shown = metrics_shown_per_run(page, tracked_sweep.mlflow_uri, experiment["experiment_id"],
                                          experiment["name"], ("probe_top1", "collapsed"))
            page.screenshot(path=str(tmp_path / "mlflow_sweep.png"))
        finally:
            browser.close()
    # The parent with the best top-1 and its count of collapsed trials, and under it every trial with its
    # own top-1 (the UI rounds to a few digits) and flag; a collapsed trial has no top-1.
    assert set(shown) == {experiment["name"], *(r["trial_id"] for r in rows)}
    finished = [r for r in rows if r["status"] == "finished"]
    parent = shown[experiment["name"]]
    assert float(parent["probe_top1"]) == pytest.approx(max(float(r["probe_top1"]) for r in finished), abs=0.01)
    assert float(parent["collapsed"]) == sum(r["status"] == "collapsed" for r in rows) > 0
    for row in rows:
        cells = shown[row["trial_id"]]
        if row["status"] == "collapsed":
            assert float(cells["collapsed"]) == 1 and not any(c.isdigit() for c in cells["probe_top1"]), cells
        else:
            assert float(cells["collapsed"]) == 0
            assert float(cells["probe_top1"]) == pytest.approx(float(row["probe_top1"]), abs=0.01)
