"""The playground page (GET / of `monotile serve`) in headless Chromium: it asks for the API
key the server wants, lists the served runs, streams an answer into the page piece by piece,
and the text it shows is exactly what the API answers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next(filter(None, map(shutil.which, BROWSERS)), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs chromium and chromedriver on PATH (Debian: apt-get install chromium "
           "chromium-driver)")

KEY = "playground-test-key"
PROMPT = "ROMEO:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, body: dict | None = None, key: str | None = KEY):
    """GET (or POST a JSON body to) base+path -> (status, parsed JSON)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """`monotile serve` on the tiny text run, behind an API key: its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PYTHONWARNINGS="default")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "monotile", "serve", str(tiny_run.dir),
                                 "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"monotile serve exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no /health in 60 s:\n{log_path.read_text()}"
            try:
                if api(base, "/health")[0] == 200:
                    break
            except OSError:  # not listening yet
                pass
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def text_of(driver, element_id: str) -> str:
    """An element's textContent: exact, where Selenium's .text folds whitespace."""
    return driver.execute_script("return document.getElementById(arguments[0]).textContent",
                                 element_id)


def enter_key(driver, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key, Keys.TAB)  # leaving the field fires `change`: the page lists again


def test_page_without_the_api_key_shows_the_servers_error(server, browser):
    from selenium.webdriver.common.by import By
    browser.get(server + "/")
    assert "monotile" in browser.title
    error = wait(browser, lambda d: d.find_element(By.ID, "error").text)
    assert "Could not list the models" in error
    assert not browser.find_elements(By.CSS_SELECTOR, "#model option[value]:not([value=''])")


def test_chat_streams_into_the_page_the_text_the_api_answers(server, browser, tiny_run,
                                                             tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    status, models = api(server, "/v1/models")
    assert status == 200
    text_models = [m for m in models["data"] if m["task"] == "text"]
    assert text_models, models
    model = text_models[0]
    # the page chats with a chat run and has any other continue the message it is sent
    chat = model["chat_template"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    ask = {"model": model["id"], "messages": [{"role": "user", "content": PROMPT}]} if chat \
        else {"model": model["id"], "prompt": PROMPT}
    # as many tokens as the context leaves after the prompt: the longest stream it allows
    status, out = api(server, path, {**ask, "max_tokens": 1})
    assert status == 200
    max_tokens = tiny_run.configs["model"].context - out["usage"]["prompt_tokens"]

    browser.get(server + "/")
    enter_key(browser, KEY)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR,
                                            f"#model option[value='{model['id']}']"))
    Select(browser.find_element(By.ID, "model")).select_by_value(model["id"])
    assert text_of(browser, "error") == ""
    for field, value in (("temperature", "0"), ("max-tokens", str(max_tokens))):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)

    # Record the answer's length at each change, in the page itself: polling from here could
    # miss the steps of a fast stream. Streamed text grows in steps; a single step is no stream.
    browser.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
          const answers = document.querySelectorAll('#chat-log .assistant');
          const n = answers.length ? answers[answers.length - 1].textContent.length : 0;
          if (n && n !== window.lengths[window.lengths.length - 1]) window.lengths.push(n);
        }).observe(document.getElementById('chat-log'),
                   {childList: true, subtree: true, characterData: true});""")
    browser.find_element(By.ID, "chat-input").send_keys(PROMPT)
    browser.find_element(By.ID, "chat-send").click()
    wait(browser, lambda d: text_of(d, "usage") or text_of(d, "error"))
    assert text_of(browser, "error") == ""
    lengths = browser.execute_script("return window.lengths")
    assert len(lengths) >= 2 and lengths == sorted(lengths), lengths
    usage = text_of(browser, "usage")
    assert "tokens" in usage, usage

    answers = browser.find_elements(By.CSS_SELECTOR, "#chat-log .assistant")
    assert len(answers) == 1
    shown = answers[0].get_attribute("textContent")
    assert shown and len(shown) == lengths[-1]
    # greedy decoding repeats itself: the API, asked the same without streaming, agrees
    status, out = api(server, path, {**ask, "temperature": 0, "max_tokens": max_tokens})
    assert status == 200
    choice = out["choices"][0]
    assert shown == (choice["message"]["content"] if chat else choice["text"])
    assert f"{out['usage']['completion_tokens']} completion" in usage

    png = tmp_path / "playground.png"
    assert browser.save_screenshot(str(png))
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
