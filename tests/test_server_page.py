"""The chat page at / in headless Chromium (Debian's `chromium`, driven by Playwright): an answer
streams in, the stop button ends a long one, the next turn reuses the conversation's KV cache, and a
screenshot is written to tmp_path (and to $PYLLM_SCREENSHOT_DIR when set)."""

import os
import re
import shutil
import time
from pathlib import Path

import pytest

import pyllm
from test_server import metric, serving, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

if not os.environ.get("CI"):  # CI installs both (.ci/run); elsewhere the browser test is optional
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def page_url(smollm2_dir):
    llm = pyllm.LLM(str(smollm2_dir), show_progress=False)
    with serving(llm, smollm2_dir.name) as (url, _):
        yield url


@pytest.fixture
def page(page_url):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.set_default_timeout(60_000)
            page.goto(page_url)
            yield page
        finally:
            browser.close()


def ask(page, text: str, max_tokens: int):
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#input", text)
    page.press("#input", "Enter")
    return page.locator(".assistant").last


def test_chat_page_streams_stops_and_reuses(page, page_url, smollm2_dir, tmp_path):
    page.wait_for_function(f"document.getElementById('model').textContent === {smollm2_dir.name!r}")
    page.fill("#temperature", "0")

    answer = ask(page, "What is the capital of France?", 32)
    page.wait_for_selector(".assistant[data-done]")
    assert answer.get_attribute("data-done") in ("stop", "length")
    assert "Paris" in answer.locator(".text").inner_text()
    assert re.search(r"[\d.]+ tokens/s · \d+ tokens", answer.locator(".meta").inner_text())

    story = ask(page, "Write a very long story about a dragon and a knight.", 400)
    lengths = [0]
    deadline = time.monotonic() + 60
    while lengths[-1] < 60:  # the answer grows piece by piece while streaming
        assert time.monotonic() < deadline, "the answer did not stream"
        time.sleep(0.05)
        lengths.append(len(story.locator(".text").inner_text()))
    assert len(set(lengths)) >= 3
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    page.wait_for_selector(".assistant:nth-of-type(4)[data-done='stopped']")
    stopped_text = story.locator(".text").inner_text()
    wait_until(lambda: metric(page_url, "pyllm_running_sequences") == 0, 5)  # the server dropped it
    assert story.locator(".text").inner_text() == stopped_text and page.is_enabled("#send")

    follow_up = ask(page, "Thanks! Now summarize it in one sentence.", 24)
    page.wait_for_selector(".assistant:nth-of-type(6)[data-done]")
    reused = re.search(r"(\d+) of (\d+) prompt tokens reused", follow_up.locator(".meta").inner_text())
    assert reused and 0 < int(reused[1]) < int(reused[2])

    shot = tmp_path / "chat-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("PYLLM_SCREENSHOT_DIR"):
        Path(os.environ["PYLLM_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, os.environ["PYLLM_SCREENSHOT_DIR"])


def test_chat_page_shows_token_probabilities(page, smollm2_dir):
    page.wait_for_function(f"document.getElementById('model').textContent === {smollm2_dir.name!r}")
    page.fill("#temperature", "0")
    page.check("#probs")
    answer = ask(page, "What is the capital of France?", 12)
    page.wait_for_selector(".assistant[data-done]")
    tokens = answer.locator(".tok")
    assert tokens.count() == int(re.search(r"· (\d+) tokens", answer.locator(".meta").inner_text())[1])
    assert "Paris" in answer.locator(".text").inner_text()
    tokens.first.hover()
    title = tokens.first.get_attribute("title")
    assert re.match(r'^".*": \d+\.\d%\n', title) and len(title.splitlines()) == 4  # itself and 3 rivals
    assert 0 < float(tokens.first.get_attribute("data-probability")) <= 1
