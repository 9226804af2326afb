"""report.html of a real `grpo train` run, opened in headless Chromium (Debian's chromium and chromedriver,
driven by selenium, with the network off): no console errors, the plots and tables are drawn, the search box
filters the samples, the plots are not blank on screen, and the hostile markup in the prompts stays text.

`make test` installs Chromium when it is missing and it runs as root; elsewhere this file is skipped."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from tiny_run import train_tiny_run

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
    "--force-device-scale-factor=1",
]


@pytest.fixture(scope="module")
def browser(tiny_model, tmp_path_factory):
    """Chromium with a fresh profile, showing the report of a 3-step run."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    output, _ = train_tiny_run(tiny_model, tmp_path_factory.mktemp("browser"))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get((output / "report.html").as_uri())
        yield driver
    finally:
        driver.quit()


def visible_rows(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#samples tr.sample'))"
        ".filter(r => r.offsetParent !== null).map(r => r.textContent);"
    )


def test_the_page_loads_without_console_errors_and_runs_nothing_from_the_run(browser):
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
    assert browser.title == "grpo run · run", "the prompts' <script> must not have run"
    assert (
        browser.execute_script("return document.querySelectorAll('#samples img, #samples style').length") == 0
    )
    assert "<script>document.title='pwned'</script>" in browser.find_element("css selector", "#samples").text


def test_the_plots_and_tables_are_drawn(browser):
    from selenium.webdriver.common.by import By

    plots = browser.find_elements(By.CSS_SELECTOR, "figure.plot svg")
    assert len(plots) >= 9
    for plot in plots:
        assert plot.size["width"] > 300 and plot.size["height"] > 100
    for selector in (
        "table.summary",
        "table.numbers",
        "table.config",
        "table.samples",
        "#diagnostics .finding",
    ):
        element = browser.find_element(By.CSS_SELECTOR, selector)
        assert element.is_displayed() and element.size["width"] > 0 and element.size["height"] > 0, selector


def test_the_search_box_filters_the_samples(browser):
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, "sample-search")
    count = browser.find_element(By.ID, "sample-count")
    everything = visible_rows(browser)
    assert len(everything) == 24 and count.text == "24 samples"  # 3 steps × 8 completions
    questions = sorted({row.split("What is ")[1][:6] for row in everything})  # "a + b?"
    assert len(questions) > 1
    query = "What is " + questions[0]
    box.send_keys(query)
    shown = visible_rows(browser)
    assert shown and len(shown) < 24 and all(query in row for row in shown)
    assert shown == [row for row in everything if query in row]
    assert count.text == f"{len(shown)} of 24 samples"
    box.send_keys(" no such text")
    assert visible_rows(browser) == [] and count.text == "0 of 24 samples"
    assert browser.execute_script(
        "return Array.from(document.querySelectorAll('#samples details.step')).every(d => d.hidden)"
    ), "steps without a match are hidden"
    box.clear()
    box.send_keys(" ")  # clear() sends no input event; a blank query shows everything
    assert len(visible_rows(browser)) == 24 and count.text == "24 samples"


def test_the_plots_are_not_blank_on_screen(browser):
    from PIL import Image
    from selenium.webdriver.common.by import By

    plots = browser.find_elements(By.CSS_SELECTOR, "figure.plot svg")
    ratio = browser.execute_script("return window.devicePixelRatio")
    for plot in plots:
        rect = browser.execute_script(
            "arguments[0].scrollIntoView({block: 'center'}); const r = arguments[0].getBoundingClientRect();"
            "return [r.left, r.top, r.right, r.bottom];",
            plot,
        )
        screenshot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        left, top, right, bottom = (round(v * ratio) for v in rect)
        pixels = np.asarray(screenshot.crop((left, top, right, bottom)), dtype=float)
        assert pixels.shape[0] * pixels.shape[1] > 10_000
        dark = (pixels.mean(axis=2) < 128).mean()  # axes, ticks and labels on a white background
        coloured = (pixels.max(axis=2) - pixels.min(axis=2) > 60).mean()  # the data: coloured lines, markers
        name = plot.find_element(By.XPATH, "..").get_attribute("id")
        assert pixels.std() > 10 and 0.005 < dark < 0.5 and coloured > 0.002, (name, dark, coloured)
