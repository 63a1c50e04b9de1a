"""The page in a real headless Chromium (Debian's chromium and chromium-driver, which .ci/run
installs; nothing is downloaded): upload an X-ray and read the probability and heatmap, drop a
non-X-ray and see the warning, and upload bad files and see why they were refused.

Screenshots go to $CXR_SCREENSHOTS when set (those in docs/page-and-guard.md come from
`CXR_WEB_MODEL=models/model.pt CXR_WEB_XRAY=<a real X-ray> CXR_SCREENSHOTS=docs pytest
tests/test_browser.py`), else to the test's temporary folder.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from cxr.classifier import Classifier, decide
from tests.conftest import Server, start_web

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Chromium as root in a container, with no network beyond loopback: no sandbox, no GPU, and
# none of the background connections that would be refused.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--window-size=1000,1100")  # fmt: skip


@pytest.fixture(scope="module")
def model(request: pytest.FixtureRequest) -> Path:
    """$CXR_WEB_MODEL, else the tiny trained project's model (built only then)."""
    if os.environ.get("CXR_WEB_MODEL"):
        return Path(os.environ["CXR_WEB_MODEL"]).resolve()
    return request.getfixturevalue("trained") / "models/model.pt"


@pytest.fixture(scope="module")
def web(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_web(model, tmp_path_factory.mktemp("page"))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(
            "needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        )
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CXR_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(browser: WebDriver, web: Server) -> None:
    browser.get(web.url)
    WebDriverWait(browser, 30).until(lambda b: "Model: " in b.find_element(By.ID, "model").text)


def settled(browser: WebDriver, count: int) -> list[WebElement]:
    """The result cards, once `count` of them have an answer (newest first)."""

    def done(b: WebDriver) -> list[WebElement] | bool:
        cards = b.find_elements(By.CSS_SELECTOR, ".result:not([data-state='pending'])")
        return cards if len(cards) == count else False

    return WebDriverWait(browser, 120).until(done)


def drop_file(browser: WebDriver, path: Path) -> None:
    """Drag and drop a file onto the drop zone, as a user's drop event delivers it."""
    browser.execute_script(
        """
        const [name, data] = arguments;
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        """,
        path.name,
        base64.b64encode(path.read_bytes()).decode("ascii"),
    )


def passing_xray(model: Path) -> Path:
    """$CXR_WEB_XRAY, else a test X-ray of the tiny project that the guard lets through."""
    if os.environ.get("CXR_WEB_XRAY"):
        return Path(os.environ["CXR_WEB_XRAY"]).resolve()
    classifier = Classifier.load(model)
    files = sorted((model.parents[1] / "data/raw/test/PNEUMONIA").iterdir())
    decisions = decide(classifier, np.stack([classifier.load_image(f) for f in files]))
    return next(f for f, d in zip(files, decisions, strict=True) if d.in_distribution)


def test_an_xray_gets_probability_label_and_heatmap(
    browser: WebDriver, web: Server, model: Path, screenshots: Path
):
    xray = passing_xray(model)
    classifier = Classifier.load(model)
    (expected,) = decide(classifier, classifier.load_image(xray)[np.newaxis])
    open_page(browser, web)
    browser.find_element(By.ID, "files").send_keys(str(xray))
    (card,) = settled(browser, 1)
    assert card.get_attribute("data-state") == "assessed"
    assert card.find_element(By.TAG_NAME, "h2").text == xray.name
    assert float(card.find_element(By.CLASS_NAME, "probability").text) == round(
        expected.probability, 3
    )
    assert card.find_element(By.CLASS_NAME, "label").text == expected.label
    for image in ("img.original", "img.overlay"):  # decoded and drawn by the browser
        width = browser.execute_script(
            "return arguments[0].naturalWidth", card.find_element(By.CSS_SELECTOR, image)
        )
        assert width == classifier.card.image_size
    assert not card.find_elements(By.CLASS_NAME, "warning")
    assert browser.save_screenshot(str(screenshots / "web_xray.png"))


def test_a_dropped_photo_gets_the_warning_instead_of_a_diagnosis(
    browser: WebDriver, web: Server, tmp_path: Path, screenshots: Path
):
    photo = tmp_path / "portrait.png"  # a photograph that matplotlib ships
    Image.open(cbook.get_sample_data("grace_hopper.jpg")).save(photo)
    open_page(browser, web)
    drop_file(browser, photo)
    (card,) = settled(browser, 1)
    assert card.get_attribute("data-state") == "flagged"
    warning = card.find_element(By.CLASS_NAME, "warning").text
    assert warning.startswith("Not assessed: this image is not like the chest X-rays")
    assert not card.find_elements(By.CLASS_NAME, "probability")
    assert not card.find_elements(By.CSS_SELECTOR, "img.overlay")
    assert card.find_elements(By.CSS_SELECTOR, "img.original")
    assert browser.save_screenshot(str(screenshots / "web_warning.png"))


def test_bad_files_are_refused_with_a_message_and_the_page_still_works(
    browser: WebDriver, web: Server, model: Path, tmp_path: Path, screenshots: Path
):
    xray = passing_xray(model)
    files = {
        "notes.txt": b"not an image",
        "empty.png": b"",
        "report.pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        "cut.jpeg": xray.read_bytes()[: xray.stat().st_size // 2],
        "huge.png": bytes(50 * 1024 * 1024),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    shutil.copy(xray, tmp_path / "fine.jpeg")
    open_page(browser, web)
    paths = [str(tmp_path / name) for name in [*files, "fine.jpeg"]]
    browser.find_element(By.ID, "files").send_keys("\n".join(paths))
    cards = settled(browser, len(paths))
    by_name = {c.find_element(By.TAG_NAME, "h2").text: c for c in cards}
    errors = {name: by_name[name].find_element(By.CLASS_NAME, "error").text for name in files}
    assert errors == {
        "notes.txt": "notes.txt: not a readable image file (a JPEG or PNG image is expected)",
        "empty.png": "empty.png: the file is empty",
        "report.pdf": "report.pdf: a PDF document, not an image; upload the X-ray as JPEG or PNG",
        "cut.jpeg": errors["cut.jpeg"],
        "huge.png": "huge.png: file too large (50.0 MB, the limit is 20 MB).",
    }
    assert errors["cut.jpeg"].startswith("cut.jpeg: image file is truncated")
    assert by_name["fine.jpeg"].get_attribute("data-state") in ("assessed", "flagged")
    assert browser.save_screenshot(str(screenshots / "web_errors.png"))
