"""Take the README's screenshot of `mlflow ui` comparing the demo's RECALL runs (not part of the tests).

    mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5055 --workers 1 &
    pip install playwright            # the Python package only; it drives the system's Chromium
    python docs/screenshot.py http://127.0.0.1:5055 docs/mlflow_compare.png

Opens the `toy` experiment in MLflow's "Model training" view, filters the RECALL parent runs and shows the
chart view (metrics over steps, one line per run).
"""

from __future__ import annotations

import sys

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
CHART_VIEW_TOGGLE = (296, 120)  # pixel position in MLflow 3.17's runs page at 1600×1000
CHARTS = "miou/"  # old_no_bg, new, all over steps
FILTER = "tags.method = 'recall' and attributes.run_name LIKE '%seed 0'"


def main(base: str, out: str, experiment_id: str = "1") -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{base}/#/experiments/{experiment_id}/runs")
        page.wait_for_timeout(4000)
        for text in ("Model training", "Got it"):
            button = page.get_by_text(text, exact=True)
            if button.count():
                button.first.click()
                page.wait_for_timeout(1500)
        close = page.get_by_label("Close")
        if close.count():
            close.first.click()
        page.goto(f"{base}/#/experiments/{experiment_id}/runs")
        page.wait_for_timeout(3000)
        search = page.get_by_placeholder("metrics.rmse < 1 and params.model = \"tree\"")
        if search.count():
            search.first.fill(FILTER)
            search.first.press("Enter")
            page.wait_for_timeout(3000)
        page.mouse.click(*CHART_VIEW_TOGGLE)  # the second of the list / chart / evaluation toggles
        page.wait_for_timeout(4000)
        charts = page.get_by_placeholder("Search metric charts")
        if charts.count():
            charts.first.fill(CHARTS)
            page.wait_for_timeout(4000)
        page.screenshot(path=out, full_page=False)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
