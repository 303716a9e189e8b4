"""The dashboard in real headless Chromium (Debian's chromium + chromedriver, driven by
selenium): it lists the functions, shows a new invocation without a reload, the invoke
form answers, replay works, the key prompt guards it.

Marked `browser`: skipped where Chromium is missing, a failure in CI (conftest.py).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import wait_until, write_function
from .live import LiveServer, running

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# selenium comes with the test extra; a missing browser skips each test (never the
# module, whose tests would then not be collected, so CI could not see the skip)
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "browser-key-0123456789"
HELLO = """
    import json, os, sys
    event = json.loads(sys.stdin.read() or "{}")
    params = json.loads(os.environ["FN_CONTEXT"])["parameters"]
    sys.stderr.write("greeting " + event.get("name", "world") + "\\n")
    print(json.dumps({"message": "Hello, " + event.get("name", "world") + "!", "params": params}))
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="fnserve-chromium-")
    # no sandbox as root; the rest keeps Chromium from reaching for the network
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # its own session: a Ctrl-C to pytest reaches it only through driver.quit()
    service = Service(CHROMEDRIVER, popen_kw={"start_new_session": True})
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def functions(fn_dir: Path) -> Path:
    write_function(fn_dir, "hello.py", HELLO)
    write_function(fn_dir, "fail.py", "import sys\nsys.exit(4)\n")
    write_function(fn_dir, "broken.py", "print('{}')\n")
    write_function(fn_dir, "fnserve.toml", '[functions.broken]\npython = "/nonexistent/python3"\n')
    return fn_dir


def wait(driver: Any, condition: Any, timeout: float = 15) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def click(driver: Any, css: str) -> None:
    """Click the element `css` names; the page redraws a table when its figures change,
    so an element found a moment ago may be gone: find it again."""
    def attempt(d: Any) -> bool:
        try:
            d.find_element(By.CSS_SELECTOR, css).click()
        except StaleElementReferenceException:
            return False
        return True

    wait(driver, attempt)


def stored(server: LiveServer, request_id: str) -> Any:
    """The record of `request_id`, once the history's writer has written it."""
    def fetch() -> Any:
        response = server.get(f"/invocations/{request_id}")
        return response.json() if response.status_code == 200 else None

    record = wait_until(fetch, timeout=10)
    assert record, f"{request_id} was not recorded"
    return record


def rows(driver: Any, body: str) -> list[Any]:
    """The data rows of a table body (not its "loading…" placeholder)."""
    key = "function" if body == "functions-body" else "request-id"
    return list(driver.find_elements(By.CSS_SELECTOR, f"#{body} tr[data-{key}]"))


def row_for(driver: Any, request_id: str) -> Any:
    found = driver.find_elements(By.CSS_SELECTOR,
                                 f'#invocations-body tr[data-request-id="{request_id}"]')
    return found[0] if found else None


def test_lists_functions_and_shows_new_invocations_live(
        browser: Any, functions: Path, tmp_path: Path) -> None:
    with running(LiveServer(functions, "--history", str(tmp_path / "h.sqlite3"))) as server:
        browser.get(server.url("/"))
        names = wait(browser, lambda d: [r.get_attribute("data-function")
                                         for r in rows(d, "functions-body")])
        assert names == ["broken", "fail", "hello"]
        broken = browser.find_element(By.CSS_SELECTOR, 'tr[data-function="broken"]')
        assert "error" in broken.text and "/nonexistent/python3" in broken.text
        browser.execute_script("window.notReloaded = true;")

        response = server.post("/function/hello", json={"name": "Ada"})
        rid = response.headers["X-Request-Id"]
        row = wait(browser, lambda d: row_for(d, rid))
        assert "hello" in row.text and "200" in row.text and "ok" in row.text
        assert browser.execute_script("return window.notReloaded") is True
        count = wait(browser, lambda d: d.find_element(
            By.CSS_SELECTOR, 'tr[data-function="hello"] .invocations').text == "1")
        assert count

        click(browser, f'#invocations-body tr[data-request-id="{rid}"]')  # opens the record
        wait(browser, lambda d: d.find_element(By.ID, "detail-id").text == rid)
        assert '"name": "Ada"' in browser.find_element(By.ID, "detail-request").text
        assert "Hello, Ada!" in browser.find_element(By.ID, "detail-response").text
        assert "greeting Ada" in browser.find_element(By.ID, "detail-stderr").text
        assert response.headers["traceparent"].split("-")[1] in \
            browser.find_element(By.ID, "detail-facts").text


def test_invoke_form_and_replay(browser: Any, functions: Path, tmp_path: Path) -> None:
    with running(LiveServer(functions, "--history", str(tmp_path / "h.sqlite3"))) as server:
        browser.get(server.url("/"))
        wait(browser, lambda d: rows(d, "functions-body"))
        click(browser, '[data-invoke="hello"]')
        event = browser.find_element(By.ID, "invoke-event")
        event.clear()
        event.send_keys('{"name": "Grace"}')
        browser.find_element(By.ID, "invoke-params").send_keys("lang=en")
        browser.find_element(By.ID, "invoke-run").click()
        result = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#invoke-result pre"))
        assert "Hello, Grace!" in result.text and '"lang": "en"' in result.text
        meta = browser.find_element(By.CSS_SELECTOR, "#invoke-result .meta").text
        assert "200" in meta
        rid = browser.find_element(By.CSS_SELECTOR, "#invoke-result .request-id").text
        assert stored(server, rid)["parameters"] == {"lang": "en"}

        # a bad event is refused in the page, nothing runs
        event.clear()
        event.send_keys("{nope")
        browser.find_element(By.ID, "invoke-run").click()
        assert wait(browser, lambda d: "not JSON" in d.find_element(By.ID, "invoke-error").text)

        wait(browser, lambda d: row_for(d, rid))
        click(browser, f'#invocations-body tr[data-request-id="{rid}"]')
        wait(browser, lambda d: d.find_element(By.ID, "detail-id").text == rid)
        browser.find_element(By.ID, "replay-button").click()
        replayed = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#replay-result pre"))
        assert "Hello, Grace!" in replayed.text
        new_id = browser.find_element(By.CSS_SELECTOR, "#replay-result .request-id").text
        assert new_id and new_id != rid
        record = stored(server, new_id)
        assert record["source"] == "replay" and record["replay_of"] == rid
        assert record["request"] == '{"name": "Grace"}' and record["parameters"] == {"lang": "en"}
        assert "replay" in wait(browser, lambda d: row_for(d, new_id)).text


def test_key_prompt_guards_the_dashboard(browser: Any, functions: Path,
                                         tmp_path: Path) -> None:
    with running(LiveServer(functions, "--history", str(tmp_path / "h.sqlite3"),
                            "--api-key", KEY)) as server:
        browser.delete_all_cookies()
        browser.get(server.url("/"))
        assert browser.find_elements(By.ID, "login-form")
        assert not browser.find_elements(By.ID, "functions")
        browser.find_element(By.ID, "key").send_keys("wrong-key")
        browser.find_element(By.ID, "login-form").submit()
        error = wait(browser, lambda d: d.find_elements(By.ID, "login-error"))
        assert "not this server's key" in error[0].text

        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "login-form").submit()
        names = wait(browser, lambda d: [r.get_attribute("data-function")
                                         for r in rows(d, "functions-body")])
        assert names == ["broken", "fail", "hello"]
        assert browser.execute_script("return document.cookie") == ""  # HttpOnly
        cookie = browser.get_cookie("fnserve_dashboard")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        # the page's own requests work with the cookie: invoke from the form
        click(browser, '[data-invoke="fail"]')
        browser.find_element(By.ID, "invoke-run").click()
        meta = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#invoke-result .meta"))
        assert "502" in meta.text

        browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
        assert wait(browser, lambda d: d.find_elements(By.ID, "login-form"))
