"""Headless Chromium opens every tab of the app, uses it like a person and saves a screenshot of each tab.

Needs Debian's chromium (/usr/bin/chromium) and the playwright Python package; `scripts/install_browser.sh`
installs both. The screenshots go to docs/screenshots/, where docs/app.md shows them.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from promptkd.webui import build_app

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM = os.environ.get("PROMPTKD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Bounds for waits on model loading and generation; they only stop a hung test.
WAIT_MS = 300_000
VIEWPORT = {"width": 1400, "height": 1000}

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed: run `bash scripts/install_browser.sh`"),
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"Chromium not found at {CHROMIUM}: run `bash scripts/install_browser.sh`"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, promptkd_home):
    """Serve an app whose runs folder contains one short finished distillation run, so every chart has data."""
    runs = tmp_path_factory.mktemp("browser") / "runs"
    command = [
        sys.executable, "-m", "promptkd", "distill", "--teacher", "tiny-llama", "--student", "tiny-llama:layers=0",
        "--strategy", "ta_filter+entropy_weighted", "--top-k", "20", "--max-steps", "4", "--train-limit", "8",
        "--per-device-batch-size", "2", "--max-new-tokens", "8", "--max-length", "128", "--probe-every", "1",
        "--learning-rate", "1e-4", "--mixed-precision", "no", "--output-dir", str(runs), "--run-name", "demo-ta-filter",
    ]
    env = dict(os.environ, PROMPTKD_HOME=str(promptkd_home))
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]

    demo = build_app(root=runs)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)
        page.goto(app_url)
        yield page
        browser.close()


def choose(page, elem_id: str, text: str) -> None:
    """Type into a Gradio dropdown and pick the first matching option with Enter."""
    field = page.locator(f"#{elem_id} input[role=combobox]")
    field.click()
    field.press("Control+A")
    field.press_sequentially(text)
    field.press("Enter")
    page.keyboard.press("Escape")


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_train_tab(page):
    expect(page.get_by_role("tab", name="Train")).to_be_visible()
    expect(page.locator("#train-launch")).to_be_visible()
    expect(page.get_by_text("Strategy", exact=True)).to_be_visible()
    for strategy in ("baseline", "entropy_weighted", "soft_blend", "dynamic_blend", "ta_filter"):
        expect(page.get_by_label(strategy, exact=True)).to_be_visible()
    # The page load attaches the newest run: its status, curves and probe heatmap render.
    expect(page.locator("#train-status")).to_contain_text("demo-ta-filter · completed")
    expect(page.locator("#train-curves .js-plotly-plot")).to_be_visible()
    expect(page.locator("#train-curves")).to_contain_text("student loss")
    expect(page.locator("#train-heatmap .js-plotly-plot")).to_be_visible()
    screenshot(page, "train")


def test_compare_tab(page):
    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#compare-button")).to_be_visible()
    choose(page, "compare-record", "14502")
    expect(page.locator("#compare-instruction textarea")).to_have_value("List the colors of the rainbow")

    removers = page.locator("#compare-models .token-remove")
    while removers.count():
        removers.first.click()
    choose(page, "compare-models", "tiny-llama")
    choose(page, "compare-models", "tiny-llama:layers=0")
    page.locator("#compare-button").click()
    expect(page.locator("#compare-output-1 textarea")).not_to_have_value("")
    expect(page.locator("#compare-output-2 textarea")).not_to_have_value("")
    expect(page.locator("#compare-scores")).to_contain_text("tiny-llama:layers=0")
    screenshot(page, "compare")


def test_inspect_tab(page):
    page.get_by_role("tab", name="Inspect").click()
    expect(page.locator("#inspect-button")).to_be_visible()
    choose(page, "inspect-record", "14502")
    expect(page.locator("#inspect-response textarea")).to_have_value(re.compile("^Red, orange"))
    page.locator("#inspect-response textarea").fill("Typed text")
    page.locator("#inspect-use-reference").click()
    expect(page.locator("#inspect-response textarea")).to_have_value(re.compile("^Red, orange"))
    choose(page, "inspect-teacher", "tiny-llama")
    choose(page, "inspect-student-a", "tiny-llama:layers=0")
    page.locator("#inspect-button").click()
    expect(page.locator("#inspect-entropy")).to_contain_text("Red")
    expect(page.locator("#inspect-heatmap .js-plotly-plot")).to_be_visible()
    expect(page.locator("#inspect-table")).to_contain_text("kept tokens")
    screenshot(page, "inspect")


def test_runs_tab(page):
    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-refresh").click()
    expect(page.locator("#runs-table")).to_contain_text("demo-ta-filter")
    expect(page.locator("#runs-table")).to_contain_text("completed")
    choose(page, "runs-overlay", "demo-ta-filter")
    expect(page.locator("#runs-overlay-plot .js-plotly-plot")).to_be_visible()
    expect(page.get_by_role("button", name="Resume")).to_be_visible()
    screenshot(page, "runs")
