"""The status page in a real headless browser, against swapd with fake llama-server children.

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) driven by
selenium, which is pointed at those binaries and never downloads a driver. Without them
the test skips, saying what to install, so ``nox`` passes on a fresh machine; CI sets
``$SWAPD_REQUIRE_BROWSER=1``, which turns that skip into a failure. swapd runs
in-process on a free loopback port; the blocking WebDriver calls run in a worker thread
so the server keeps serving meanwhile. Every wait is a deadline, not a measurement.

Screenshots (loading, ready, failed, phone-sized, dark) go to ``$SWAPD_UI_ARTIFACTS``
when it is set, else to the test's tmp path, for people to look at.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from swapd.config import parse_config
from swapd.serve import open_server
from tests.conftest import FAKE_LLAMA_SERVER
from tests.support.tiny_gguf import write_header_only

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,900")
REQUIRE_BROWSER_VAR = "SWAPD_REQUIRE_BROWSER"
"""Set (to anything but 0) where the browser must be there: a missing one fails the test."""
INSTALL_BROWSER = "apt-get install chromium chromium-driver"
WAIT_S = 15.0
"""Deadline for anything the page should show (it reacts within ~100 ms here)."""

ADMIN_KEY = "ui-test-admin-key"
SLOW = "qwen3-27b"  # loads in 1.5 s
BROKEN = "llama-70b"  # exits at start: no GPU memory
OOM = "CUDA error: out of memory"

T = TypeVar("T")


def ui_config(tmp_path: Path) -> str:
    # Header-only model files: swapd checks a model file is a GGUF before starting it.
    write_header_only(*(tmp_path / name for name in ("qwen.gguf", "llama.gguf", "embed.gguf")))
    config = {
        "listen": "127.0.0.1:0",
        "state_dir": str(tmp_path / "state"),
        "llama_server": {"command": [sys.executable, str(FAKE_LLAMA_SERVER)]},
        "timeouts": {"start": "20s", "stop": "5s"},
        "security": {"admin_key_env": "SWAPD_UI_TEST_ADMIN_KEY"},
        "profiles": {
            SLOW: {"model": "qwen.gguf", "display_name": "Qwen3 27B (balanced)",
                   "aliases": ["qwen"], "flags": {"ctx-size": 65536, "fake-load-ms": 1500}},
            BROKEN: {"model": "llama.gguf", "display_name": "Llama 3.3 70B",
                     "aliases": ["llama"],
                     "flags": {"ctx-size": 131072, "fake-exit-at-start": 1,
                               "fake-stderr": OOM}},
            "embed-small": {"model": "embed.gguf", "display_name": "Nomic embed (small)",
                            "flags": {"ctx-size": 8192}},
        },
        # Never contacted: nothing here asks for a fallback.
        "fallbacks": [{"name": "lxc", "base_url": "http://127.0.0.1:9/v1",
                       "model": "fallback-slm"}],
    }
    return json.dumps(config)  # JSON is YAML


def require_browser(paths: Sequence[str] = (CHROMIUM, CHROMEDRIVER)) -> None:
    """Skip the test when Debian's browser is missing, or fail it where CI requires one."""
    missing = [path for path in paths if not Path(path).is_file()]
    if not missing:
        return
    why = (f"{', '.join(missing)} not found: the status page test needs Debian's chromium "
           f"and chromium-driver ({INSTALL_BROWSER}; .ci/run installs them)")
    if os.environ.get(REQUIRE_BROWSER_VAR, "") not in ("", "0"):
        pytest.fail(f"{why}. ${REQUIRE_BROWSER_VAR} is set, so it may not skip", pytrace=False)
    pytest.skip(why)


def start_chromium(profile_dir: Path) -> WebDriver:
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


@asynccontextmanager
async def open_browser(profile_dir: Path) -> AsyncIterator[WebDriver]:
    """Headless Chromium through Debian's chromedriver; both are gone when this exits."""
    driver = await trio.to_thread.run_sync(start_chromium, profile_dir)
    try:
        yield driver
    finally:
        with trio.CancelScope(shield=True):  # quit() bounds itself (WebDriver timeouts)
            await trio.to_thread.run_sync(driver.quit)  # chromium, then chromedriver


def wait_for(driver: WebDriver, what: str, check: Callable[[WebDriver], T]) -> T:
    def attempt(d: WebDriver) -> T | None:
        try:
            return check(d)
        except StaleElementReferenceException:  # re-rendered between find and read
            return None

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        attempt, f"the page never showed {what}")  # type: ignore[no-any-return]


def card(driver: WebDriver, profile: str) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f'li.profile[data-profile="{profile}"]')


def card_shows(profile: str, state: str, pill_start: str) -> Callable[[WebDriver], bool]:
    def check(driver: WebDriver) -> bool:
        element = card(driver, profile)
        return (element.get_attribute("data-state") == state
                and element.find_element(By.CSS_SELECTOR, ".pill").text.startswith(pill_start))
    return check


def click_button(driver: WebDriver, profile: str, action: str) -> None:
    card(driver, profile).find_element(By.CSS_SELECTOR, f'button[data-action="{action}"]').click()


def screenshot(driver: WebDriver, path: Path) -> None:
    """The whole page, not just the viewport."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SWAPD_UI_ARTIFACTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def enter_key(driver: WebDriver, shots: Path) -> None:
    """The page asks for the admin key once, for all its calls, and keeps it."""
    dialog = wait_for(driver, "the key dialog",
                      lambda d: d.find_element(By.ID, "key-dialog").get_attribute("open")
                      is not None and d.find_element(By.ID, "key-dialog"))
    assert len(driver.find_elements(By.CSS_SELECTOR, "dialog[open]")) == 1
    screenshot(driver, shots / "0-key.png")
    dialog.find_element(By.ID, "key-input").send_keys(ADMIN_KEY)
    dialog.find_element(By.CSS_SELECTOR, 'button[value="ok"]').click()
    assert driver.execute_script("return localStorage.getItem('swapd.key')") == ADMIN_KEY


def loading_shown(driver: WebDriver) -> bool:
    """Card, badge and progress all say "loading" at once (the load lasts 1.5 s)."""
    element = card(driver, SLOW)
    pill = element.find_element(By.CSS_SELECTOR, ".pill").text
    progress = driver.find_element(By.CSS_SELECTOR, "#now .progress-text").text
    return (element.get_attribute("data-state") == "starting"
            and re.fullmatch(r"loading \d+ %", pill) is not None
            and driver.find_element(By.ID, "state-badge").text.lower() == "starting"
            and re.match(r"\d+ % · (ready in ~|any moment)", progress) is not None)


def check_loading(driver: WebDriver, shots: Path) -> None:
    click_button(driver, SLOW, "load")
    # The remembered load time (1.5 s) gives a percentage and an ETA from the first load.
    wait_for(driver, f"{SLOW} loading with a percentage and an ETA", loading_shown)
    screenshot(driver, shots / "1-loading.png")


def check_ready(driver: WebDriver, shots: Path) -> None:
    wait_for(driver, f"{SLOW} ready", card_shows(SLOW, "ready", "ready"))
    wait_for(driver, "the state badge at ready",
             lambda d: d.find_element(By.ID, "state-badge").text.lower() == "ready")
    assert driver.find_element(By.ID, "now-model").text == "Qwen3 27B (balanced)"
    assert driver.find_element(By.ID, "stat-pid").text.isdigit()
    wait_for(driver, "the load in the swap history",
             lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history-chart li")) == 1)
    screenshot(driver, shots / "2-ready.png")


def check_failed(driver: WebDriver, shots: Path) -> None:
    click_button(driver, BROKEN, "load")
    wait_for(driver, f"{BROKEN} failed", card_shows(BROKEN, "failed", "failed"))
    failure = wait_for(driver, "the failure with its stderr",
                       lambda d: OOM in d.find_element(By.ID, "failure").text
                       and d.find_element(By.ID, "failure"))
    assert failure.is_displayed()
    assert failure.find_element(By.ID, "failure-code").text == "exit code 1"
    assert "exit code 1" in card(driver, BROKEN).find_element(By.CSS_SELECTOR, ".profile-note").text
    wait_for(driver, "the stderr line highlighted in the log",
             lambda d: any(OOM in line.text for line in
                           d.find_elements(By.CSS_SELECTOR, "#log .ln.tail")))
    # The swap away from qwen and the failed load, with their durations.
    wait_for(driver, "two swaps in the history",
             lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history-chart li")) == 2)
    assert driver.find_element(By.CSS_SELECTOR, "#history-chart li .value.fail").text.startswith(
        "failed after ")
    # Requests per model: the chat requests sent while qwen was ready.
    wait_for(driver, "requests per model",
             lambda d: "3" in d.find_element(By.ID, "requests-chart").text)
    screenshot(driver, shots / "3-failed.png")


def check_phone_and_dark(driver: WebDriver, shots: Path) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    wait_for(driver, "the page laid out for a phone without sideways scrolling",
             lambda d: d.execute_script(
                 "return document.documentElement.scrollWidth <= window.innerWidth"))
    screenshot(driver, shots / "4-phone.png")
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    wait_for(driver, "dark colours", lambda d: d.execute_script(
        "return getComputedStyle(document.body).backgroundColor") == "rgb(13, 15, 20)")
    screenshot(driver, shots / "5-dark.png")


def check_accessible_basics(driver: WebDriver) -> None:
    for button in driver.find_elements(By.TAG_NAME, "button"):
        if button.is_displayed():
            assert button.text.strip() or button.get_attribute("aria-label"), button
    assert driver.find_element(By.CSS_SELECTOR, "label[for='key-input']")
    assert not driver.find_elements(By.CSS_SELECTOR, "[onclick], div[role='button']")


@pytest.mark.parametrize("required", ["", "0", "1"])
def test_a_missing_browser_skips_unless_ci_requires_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, required: str) -> None:
    monkeypatch.setenv(REQUIRE_BROWSER_VAR, required)
    absent = str(tmp_path / "chromium")
    outcome = pytest.fail.Exception if required == "1" else pytest.skip.Exception
    with pytest.raises(outcome) as raised:
        require_browser((absent, CHROMEDRIVER))
    message = str(raised.value)
    assert absent in message and "apt-get install chromium chromium-driver" in message
    assert (REQUIRE_BROWSER_VAR in message) == (required == "1")


@pytest.fixture
def browser() -> None:
    """A sync fixture, so the skip or failure is reported as itself, not inside trio's run."""
    require_browser()


def test_ci_installs_the_browser_and_requires_it() -> None:
    script = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert INSTALL_BROWSER.replace("install", "install -y -qq") in script
    assert f"export {REQUIRE_BROWSER_VAR}=1\n" in script


async def test_status_page_loads_a_model_and_shows_a_failure(
        browser: None, tmp_path: Path, artifacts: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPD_UI_TEST_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must never fetch a driver
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "load_times.json").write_text(json.dumps({SLOW: 1.5}))
    config = parse_config(ui_config(tmp_path), base_dir=tmp_path)

    async def in_thread(step: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(partial(step, *args))

    async with (open_server(config) as running,
                httpx.AsyncClient(base_url=running.url, timeout=30) as client,
                open_browser(tmp_path / "chromium") as driver):
        await in_thread(driver.get, running.url + "/")
        await in_thread(enter_key, driver, artifacts)
        await in_thread(wait_for, driver, "three idle models",
                        lambda d: [c.get_attribute("data-state") for c in d.find_elements(
                            By.CSS_SELECTOR, "li.profile")] == ["idle"] * 3)
        await in_thread(wait_for, driver, "the live event stream",
                        lambda d: d.find_element(By.ID, "conn").text == "live")
        await in_thread(check_loading, driver, artifacts)
        await in_thread(check_ready, driver, artifacts)
        for _ in range(3):
            answer = await client.post("/v1/chat/completions", json={
                "model": "qwen", "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200
        await in_thread(check_failed, driver, artifacts)
        await in_thread(check_accessible_basics, driver)
        await in_thread(check_phone_and_dark, driver, artifacts)
        # Script errors only: the 401s and the failed load's 503 are expected.
        errors = [entry for entry in await in_thread(driver.get_log, "browser")
                  if entry["level"] == "SEVERE" and entry["source"] != "network"]
        assert not errors, errors


async def test_status_page_draws_each_gpu_with_its_resident_models(
        browser: None, tmp_path: Path, artifacts: Path) -> None:
    """residency.mode: budget: one bar for GPU 0, a segment per resident model."""
    write_header_only(tmp_path / "chat.gguf", tmp_path / "embed.gguf")
    config = parse_config(json.dumps({
        "listen": "127.0.0.1:0", "state_dir": str(tmp_path / "state"),
        "llama_server": {"command": [sys.executable, str(FAKE_LLAMA_SERVER)]},
        "gpus": [{"id": 0, "memory": "24GiB"}],
        "residency": {"mode": "budget", "reserve": "512MiB"},
        "profiles": {
            "chat": {"model": "chat.gguf", "display_name": "Qwen3 27B", "memory": "17.5GiB"},
            "embed": {"model": "embed.gguf", "display_name": "Qwen3 embed",
                      "memory": "700MiB"},
        }}), base_dir=tmp_path)

    def bar_shown(driver: WebDriver) -> bool:
        section = driver.find_element(By.ID, "gpus")
        segments = section.find_elements(By.CSS_SELECTOR, ".seg.gpu.ready")
        return section.is_displayed() and len(segments) == 2 and "free" in section.text

    async with (open_server(config) as running,
                httpx.AsyncClient(base_url=running.url, timeout=30) as client,
                open_browser(tmp_path / "chromium") as driver):
        for name in ("chat", "embed"):
            assert (await client.post("/swapd/load", json={"model": name})).status_code == 200
        await trio.to_thread.run_sync(driver.get, running.url + "/")
        await trio.to_thread.run_sync(wait_for, driver, "a bar for GPU 0 with two models",
                                      bar_shown)
        # Both cards say ready: each resident model has its own state.
        await trio.to_thread.run_sync(wait_for, driver, "both models ready",
                                      lambda d: all(card_shows(n, "ready", "ready")(d)
                                                    for n in ("chat", "embed")))
        text = driver.find_element(By.ID, "gpus").text
        # 24 GiB less the 512 MiB reserve; 17.5 + 0.7 GiB used, the rest free.
        assert "GPU 0" in text and "23.5 GiB for models" in text, text
        assert "Qwen3 27B 17.5 GiB" in text and "Qwen3 embed 700 MiB" in text, text
        assert "5.3 GiB free" in text, text
        await trio.to_thread.run_sync(screenshot, driver, artifacts / "6-gpus.png")
