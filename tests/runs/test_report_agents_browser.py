"""report.html of a multi-turn run (test_report_agents.py's hand-made run directory) in headless Chromium:
the search box finds text that only a trajectory's tool result or environment message holds, the messages
are drawn apart (each role its own background), and the hostile markup in them stays text.

Skipped where Debian's chromium and chromedriver are missing, as test_report_browser.py is."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_report_agents import EVIL_TOOL_RESULT, write_run

from grpo.runs.report import write_report

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)",
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1280,1000"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    report = write_report(write_run(tmp_path_factory.mktemp("agent-browser") / "run"))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(report.as_uri())
        yield driver
    finally:
        driver.quit()


def visible_rows(driver) -> int:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#samples tr.sample'))"
        ".filter(r => r.offsetParent !== null).length;"
    )


@pytest.mark.parametrize("query", ["higher", "onerror=alert", "tool · add", "environment"])
def test_the_search_finds_text_inside_trajectories(browser, query):
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, "sample-search")
    box.clear()
    box.send_keys(query)
    assert visible_rows(browser) == 1  # the multi-turn sample, not the single-turn one beside it
    assert browser.find_element(By.ID, "sample-count").text == "1 of 2 samples"
    box.clear()
    box.send_keys(" ")  # (clear() sends no input event)
    assert visible_rows(browser) == 2


def test_the_roles_are_drawn_apart_and_the_markup_stays_text(browser):
    from selenium.webdriver.common.by import By

    messages = browser.find_elements(By.CSS_SELECTOR, "#samples .trajectory .msg")
    assert len(messages) == 4 and all(m.is_displayed() for m in messages)
    backgrounds = [m.value_of_css_property("background-color") for m in messages]
    assert backgrounds[0] == backgrounds[3] and len(set(backgrounds)) == 3  # model, tool, environment
    assert messages[1].find_element(By.TAG_NAME, "pre").text == EVIL_TOOL_RESULT
    assert browser.title == "grpo run · run"
    assert (
        browser.execute_script("return document.querySelectorAll('#samples img, #samples style').length") == 0
    )
