"""The web app end to end in a real browser: headless Chromium (Debian's chromium + chromium-driver, which .ci/run
installs) driven by Selenium against `naclip serve`'s app on a free 127.0.0.1 port, with a tiny random-weights
model. Set NACLIP_SCREENSHOT=docs/webapp.png to save the README's screenshot of the result page."""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

pytest.importorskip("flask", reason="the web app needs Flask: pip install 'naclip-kernels[segmenter]'")
pytest.importorskip("open_clip", reason="the segmenter needs open_clip: pip install 'naclip-kernels[segmenter]'")
pytest.importorskip("selenium", reason="the browser test needs selenium: pip install 'naclip-kernels[test]'")

from naclip.server import ASSETS_DIR, ServerConfig, create_app  # noqa: E402
from tests.test_server import ServerThread, tiny_segmenter  # noqa: E402

CHROMIUM = os.environ.get("NACLIP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("NACLIP_CHROMEDRIVER", "/usr/bin/chromedriver")


def _executable(path: str, name: str) -> str:
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found ({path}); install Debian's chromium and chromium-driver packages "
                    "(.ci/run does)")
    return found


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = _executable(CHROMIUM, "chromium")
    driver_path = _executable(CHROMEDRIVER, "chromedriver")
    profile = tempfile.mkdtemp(prefix="naclip-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary          # with an explicit driver too, Selenium Manager downloads nothing
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,900", "--hide-scrollbars", "--force-device-scale-factor=1",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def app_url():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segmenter = tiny_segmenter()
    config = ServerConfig(model_info={"model": "tiny ViT (test)", "pretrained": "random weights", "device": "cpu",
                                      "dtype": "float32"})
    with ServerThread(create_app(segmenter, config)) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        yield srv.url


def _wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_upload_segment_and_see_the_overlay_and_legend(browser, app_url):
    from selenium.webdriver.common.by import By

    browser.get(app_url + "/")
    assert "NACLIP" in browser.title
    browser.find_element(By.ID, "image-input").send_keys(str(ASSETS_DIR / "cat.jpg"))
    _wait(browser, lambda d: d.find_element(By.ID, "preview-name").text == "cat.jpg")
    classes = browser.find_element(By.ID, "classes")
    classes.clear()
    classes.send_keys("cat, wall, floor/carpet")
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=slide]").click()
    assert browser.find_element(By.ID, "pamr").is_selected()
    browser.find_element(By.ID, "submit").click()

    # The overlay image is loaded (a decoded data: URL), and the legend lists the classes.
    _wait(browser, lambda d: d.execute_script(
        "const img = document.getElementById('overlay');"
        "return !document.getElementById('results').hidden && img.complete && img.naturalWidth > 0;"))
    size = browser.execute_script("const i = document.getElementById('overlay'); return [i.naturalWidth, i.naturalHeight];")
    assert size == [451, 300]
    assert browser.execute_script("return document.getElementById('label-map').naturalWidth") == 451
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#legend .legend-name")]
    assert sorted(names) == ["cat", "floor", "wall"]
    shares = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#legend .share")]
    assert all(s.endswith("%") for s in shares)
    assert abs(sum(float(s[:-1]) for s in shares) - 100.0) < 0.5
    stages = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#timings th")]
    assert {"decode image", "encode", "pamr", "total"} <= set(stages), stages
    assert not browser.find_element(By.ID, "error").is_displayed()

    shot = os.environ.get("NACLIP_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        # Fit the window to the whole page (the window is taller than its viewport by the browser's frame).
        height, frame = browser.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]")
        browser.set_window_size(1280, min(int(height) + int(frame), 1600))
        browser.execute_script("window.scrollTo(0, 0)")
        assert browser.save_screenshot(shot)


def test_sample_and_errors_are_shown_on_the_page(browser, app_url):
    from selenium.webdriver.common.by import By

    browser.get(app_url + "/")
    browser.find_element(By.CSS_SELECTOR, "button.sample[data-sample=coffee]").click()
    classes = browser.find_element(By.ID, "classes")
    assert "coffee cup" in classes.get_attribute("value")          # the sample's suggested classes
    classes.clear()
    browser.find_element(By.ID, "submit").click()                    # no classes: the server's message appears
    error = browser.find_element(By.ID, "error")
    _wait(browser, lambda d: error.is_displayed())
    assert "at least one class" in error.text

    classes.send_keys("coffee cup, table")
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=whole]").click()
    browser.find_element(By.ID, "pamr").click()                      # off
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#legend .legend-name")]
          and sorted(e.text for e in d.find_elements(By.CSS_SELECTOR, "#legend .legend-name")) == ["coffee cup",
                                                                                                 "table"])
    assert not error.is_displayed()
    assert "whole image" in browser.find_element(By.ID, "result-info").text
    assert "PAMR off" in browser.find_element(By.ID, "result-info").text

    # A file that is not an image: the server's message is shown, and the page keeps working.
    bogus = Path(tempfile.mkdtemp(prefix="naclip-test-")) / "notes.txt"
    bogus.write_text("not an image\n" * 10)
    browser.find_element(By.ID, "image-input").send_keys(str(bogus))
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda d: error.is_displayed())
    assert "not an image" in error.text
