"""Take docs/mlflow_runs.png: the runs table at the address `make ui` prints (not part of the tests).

    pip install playwright            # the Python package only; it drives the system's Chromium
    python docs/screenshot_runs.py --uri sqlite:///mlflow.db --out docs/mlflow_runs.png

Starts `python -m recall.ui` (what `make ui` runs) on 127.0.0.1 and a free port, opens the first address it prints
(the experiment's runs in MLflow's "Model training" view) in headless Chromium, closes the assistant panel, widens
the Run Name, Dataset and Source columns so their text shows, takes the screenshot, and stops the server by its
PID (its process group).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
WIDTHS = {"Run Name": 330, "Dataset": 360, "Source": 300}  # pixels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(uri: str, port: int, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`python -m recall.ui` in its own process group; returns it and the first runs address it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "recall.ui", "--uri", uri, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        found = re.search(r"(http://127\.0\.0\.1:\d+/#/experiments/\d+/runs\?workflowType=machine_learning)", line)
        if found:
            return proc, found.group(1)
    stop(proc)
    raise RuntimeError("recall.ui printed no runs address")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def widen(page, header: str, width: int) -> None:
    """Drag the right edge of a column header of MLflow's runs table (ag-grid) until the column is `width` wide."""
    cell = page.locator(".ag-header-cell", has_text=header).first
    box = cell.bounding_box()
    if box is None:
        return
    x, y = box["x"] + box["width"] - 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + (width - box["width"]), y, steps=8)
    page.mouse.up()
    page.wait_for_timeout(300)


def screenshot(url: str, out: str, width: int = 1700, height: int = 760, wait_for: str = "seed 0") -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.get_by_text(wait_for, exact=False).first.wait_for(timeout=120_000)
        page.wait_for_timeout(2000)
        close = page.get_by_label("Close", exact=True)  # the MLflow Assistant panel
        if close.count():
            close.first.click()
            page.wait_for_timeout(800)
        for header, pixels in WIDTHS.items():
            widen(page, header, pixels)
        page.mouse.move(5, height - 5)  # no hover highlight
        page.wait_for_timeout(800)
        page.screenshot(path=out, full_page=False)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", default="docs/mlflow_runs.png")
    args = parser.parse_args()
    proc, url = start_ui(args.uri, free_port())
    try:
        print(url)
        screenshot(url, args.out)
    finally:
        stop(proc)
    print(args.out)


if __name__ == "__main__":
    main()
