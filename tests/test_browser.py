"""The page at `/` in a real browser: Debian's chromium, driven through its chromedriver by selenium.

Nothing downloads a browser or a driver: the Service names /usr/bin/chromedriver (so Selenium Manager never
runs, and it is made to fail if anything calls it), and chromium resolves no host name (every outside URL
fails), so the page works only if the app serves all of it. Skips where chromium, chromedriver or
selenium is missing. CIFAR_CAM_SCREENSHOT=1 writes docs/images/serve_page.png (the README's screenshot;
CIFAR_CAM_SCREENSHOT_CKPT and CIFAR_CAM_SCREENSHOT_IMAGE serve another model and upload another image).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "images" / "serve_page.png"
STATIC = REPO / "src" / "cifar_cam" / "serve" / "static"
WAIT_S = 30

for _binary in (CHROMIUM, CHROMEDRIVER):
    if not os.access(_binary, os.X_OK):
        pytest.skip(f"{_binary} is missing (apt-get install chromium chromium-driver)", allow_module_level=True)
pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
pytest.importorskip("httpx", reason="httpx is not installed (pip install -e .[dev])")

import httpx  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.common.selenium_manager import SeleniumManager  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


# -- the app on loopback, in a thread ------------------------------------------------------------
@pytest.fixture(scope="module")
def base_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The app over the tiny trained run (or $CIFAR_CAM_SCREENSHOT_CKPT), served by uvicorn in a background
    thread on a free loopback port."""
    from cifar_cam.inference.predictor import Predictor
    from cifar_cam.serve.app import create_app
    from cifar_cam.serve.server import running
    from cifar_cam.serve.settings import Settings

    ckpt = os.environ.get("CIFAR_CAM_SCREENSHOT_CKPT")
    if not ckpt:  # the test run's one server (conftest.served)
        yield request.getfixturevalue("served").url
        return
    with running(create_app(Predictor.load(ckpt), Settings()), log_level="warning") as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser(base_url: str) -> Iterator[webdriver.Chrome]:
    """Headless chromium that can reach nothing but the loopback app."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):  # no outside host resolves
        options.add_argument(arg)

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("Selenium Manager was called: it would download a driver or a browser")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SeleniumManager, "binary_paths", no_download)
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# -- helpers ------------------------------------------------------------------------------------
def _test_png(path: Path) -> Path:
    """A 32x32 RGB PNG with some structure (a bright square on a gradient, a little noise)."""
    import cv2

    rng = np.random.default_rng(17)
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0] = np.linspace(30, 220, 32, dtype=np.uint8)[None, :]
    img[..., 2] = np.linspace(200, 40, 32, dtype=np.uint8)[:, None]
    img[8:22, 10:24] = (240, 200, 60)
    img = np.clip(img + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


def _api_predict(base_url: str, path: Path) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(f"{base_url}/v1/predict", files={"file": (path.name, f, "image/png")},
                          params={"topk": 3}, timeout=30)


def _open_page(browser: webdriver.Chrome, base_url: str) -> None:
    browser.get(base_url + "/")
    # the model card has filled the layer choice
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.execute_script("return document.getElementById('model').textContent.indexOf('Loading') < 0"))


def _upload(browser: webdriver.Chrome, path: Path) -> None:
    browser.find_element(By.ID, "file").send_keys(str(path))


def _wait(browser: webdriver.Chrome, script: str, what: str) -> None:
    try:
        WebDriverWait(browser, WAIT_S).until(lambda d: d.execute_script(script))
    except TimeoutException:
        status = browser.find_element(By.ID, "status").text
        pytest.fail(f"timed out after {WAIT_S} s waiting for {what}; #status says: {status!r}")


OVERLAY_DRAWN = ("const o = document.getElementById('overlay');"
                 "return !o.hidden && o.complete && o.naturalWidth > 0 && o.getBoundingClientRect().width > 0;")


# -- tests --------------------------------------------------------------------------------------
def test_page_shows_the_prediction_and_the_overlay(base_url: str, browser: webdriver.Chrome, tmp_path: Path
                                                   ) -> None:
    shown = os.environ.get("CIFAR_CAM_SCREENSHOT_IMAGE")  # the README's shot: a real model and test image
    image = Path(shown) if shown else _test_png(tmp_path / "square.png")
    expected = _api_predict(base_url, image)
    assert expected.status_code == 200, expected.text
    top1 = expected.json()["classes"][0]

    _open_page(browser, base_url)
    layers = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#layer option")]
    assert "layer4" in layers and browser.find_element(By.ID, "layer").get_attribute("value") == "layer4"
    _upload(browser, image)
    _wait(browser, "return document.getElementById('top1').textContent.trim().length > 0", "#top1")
    _wait(browser, OVERLAY_DRAWN, "the Grad-CAM overlay to load")

    assert top1 in browser.find_element(By.ID, "top1").text
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars li")
    assert len(bars) == 3 and top1 in bars[0].text and "%" in bars[0].text
    assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")
    # the model input: a 32x32 canvas shown enlarged, pixelated
    canvas = browser.execute_script(
        "const c = document.getElementById('input'); const r = c.getBoundingClientRect();"
        "return [c.width, c.height, c.hidden, r.width, getComputedStyle(c).imageRendering];")
    assert canvas[:3] == [32, 32, False] and canvas[3] >= 128 and canvas[4] == "pixelated", canvas
    # the opacity slider drives the overlay's opacity
    slider = browser.find_element(By.ID, "opacity")
    slider.send_keys(Keys.HOME)
    assert browser.execute_script("return getComputedStyle(document.getElementById('overlay')).opacity") == "0"
    slider.send_keys(Keys.END)
    assert browser.execute_script("return getComputedStyle(document.getElementById('overlay')).opacity") == "1"
    for _ in range(6):
        slider.send_keys(Keys.ARROW_LEFT)  # back to 70%, as the screenshot shows it
    assert browser.find_element(By.ID, "opacity-value").text == "70%"
    # everything the page loaded came from the app
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith((base_url, "data:", "blob:")) for u in urls), urls
    assert "http://" not in browser.page_source.replace(base_url, "") and "https://" not in browser.page_source
    for asset in STATIC.iterdir():  # and none of its files names another host
        assert not re.search(r"https?://|(src|href|url)\(?\s*=?\s*[\"']?//", asset.read_text()), asset

    out = SCREENSHOT if os.environ.get("CIFAR_CAM_SCREENSHOT") == "1" else tmp_path / "serve_page.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    browser.execute_script("document.activeElement.blur()")
    out.write_bytes(browser.find_element(By.TAG_NAME, "body").screenshot_as_png)  # the page, not the empty rest
    assert out.stat().st_size > 1000


def test_page_asks_again_for_another_layer_and_takes_a_dropped_file(base_url: str, browser: webdriver.Chrome,
                                                                     tmp_path: Path) -> None:
    image = _test_png(tmp_path / "square.png")
    top1 = _api_predict(base_url, image).json()["classes"][0]
    _open_page(browser, base_url)
    # a file dropped on the drop zone (a synthetic drop event carrying the PNG's bytes)
    browser.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
        "const dt = new DataTransfer(); dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
        "document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,"
        " cancelable: true}));", base64.b64encode(image.read_bytes()).decode())
    _wait(browser, OVERLAY_DRAWN, "the overlay of the dropped file")
    assert top1 in browser.find_element(By.ID, "top1").text
    first = browser.find_element(By.ID, "overlay").get_attribute("src")
    layers = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#layer option")]
    if "layer3" not in layers:
        pytest.skip(f"the model gives CAM at {layers} only")
    Select(browser.find_element(By.ID, "layer")).select_by_value("layer3")
    _wait(browser, "return document.getElementById('overlay-caption').textContent.includes('layer3')"
                   " && document.getElementById('overlay').complete", "the layer3 overlay")
    assert browser.find_element(By.ID, "overlay").get_attribute("src") != first


@pytest.mark.parametrize("kind", ["not_an_image", "too_big"])
def test_page_says_when_an_upload_is_refused(base_url: str, browser: webdriver.Chrome, tmp_path: Path, kind: str
                                             ) -> None:
    fake = tmp_path / "notes.png"
    if kind == "too_big":  # a real PNG, then more bytes than the server's serve.max_upload_mb
        import httpx

        limit = httpx.get(f"{base_url}/v1/model", timeout=30).json()["input"]["max_upload_mb"]
        fake.write_bytes(_test_png(tmp_path / "square.png").read_bytes()
                         + os.urandom(int((limit + 0.5) * 1024 * 1024)))
    else:
        fake.write_text("these are my notes, not a picture\n")
    refused = _api_predict(base_url, fake)
    assert 400 <= refused.status_code < 500, refused.text
    detail = refused.json()["detail"]

    _open_page(browser, base_url)
    _upload(browser, fake)
    _wait(browser, "return document.getElementById('status').classList.contains('error')", "the refusal")
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("aria-live") in ("polite", "assertive") and status.is_displayed()
    assert "Refused" in status.text and str(refused.status_code) in status.text
    assert detail in status.text
    assert browser.find_element(By.ID, "top1").text == ""
    assert not browser.execute_script("return !document.getElementById('overlay').hidden")


def test_page_works_from_the_keyboard(base_url: str, browser: webdriver.Chrome) -> None:
    _open_page(browser, base_url)
    # Tab from the top reaches the drop zone, the file input and every control, in that order
    seen = []
    for _ in range(8):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        seen.append(browser.execute_script("return document.activeElement.id"))
    order = [i for i in seen if i in ("drop", "file", "layer", "topk", "opacity")]
    assert order[:5] == ["drop", "file", "layer", "topk", "opacity"], seen
    # Enter and Space on the focused drop zone open the file picker (input.click(); recorded, not opened)
    browser.execute_script("window.picks = 0; document.getElementById('file').click = () => { window.picks++; };")
    drop = browser.find_element(By.ID, "drop")
    drop.send_keys(Keys.ENTER)
    drop.send_keys(Keys.SPACE)
    assert browser.execute_script("return window.picks") == 2


# -- serve.gallery and serve.api_key -------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app with serve.api_key and serve.gallery (a small gradcam run dir), on another loopback port."""
    from cifar_cam.inference.predictor import Predictor
    from cifar_cam.serve.app import create_app
    from cifar_cam.serve.server import running
    from cifar_cam.serve.settings import Settings
    from test_serve import make_gallery

    root = make_gallery(tmp_path_factory.mktemp("gallery") / "run")
    settings = Settings(api_key="s3cret", gallery=str(root))
    with running(create_app(Predictor.load(request.getfixturevalue("trained_run")), settings),
                 log_level="warning") as (url, _):
        yield url


def test_page_asks_for_the_api_key_then_shows_the_gallery(keyed_url: str, browser: webdriver.Chrome,
                                                           tmp_path: Path) -> None:
    browser.get(keyed_url + "/")  # the page and its assets load without the key
    _wait(browser, "return !document.getElementById('key-form').hidden", "the API key field")
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    assert browser.find_element(By.ID, "gallery-section").is_displayed() is False
    key = browser.find_element(By.ID, "api-key")
    assert browser.execute_script("return document.activeElement.id") == "api-key"
    key.send_keys("wrong", Keys.ENTER)
    _wait(browser, "return document.getElementById('status').textContent.includes('refused')", "the refusal")
    key.clear()
    key.send_keys("s3cret", Keys.ENTER)
    _wait(browser, "return document.getElementById('key-form').hidden", "the key to be accepted")
    _wait(browser, "return !document.getElementById('gallery-section').hidden", "the gallery")
    assert "Model's mistakes" in browser.find_element(By.ID, "h-gallery").text
    buttons = browser.find_elements(By.CSS_SELECTOR, "#gallery button")
    assert [b.get_attribute("data-rank") for b in buttons] == ["1", "2", "0"]  # most confident first
    _wait(browser, "return [...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)",
          "the thumbnails")
    buttons[0].click()
    shown = ("return [...document.querySelectorAll('#mistake-images img')].length === 2 && "
             "[...document.querySelectorAll('#mistake-images img')].every(i => i.complete && i.naturalWidth > 0)"
             " && !document.getElementById('mistake').hidden")
    _wait(browser, shown, "the selected mistake")
    caption = browser.find_element(By.ID, "mistake-caption").text
    assert "true cat" in caption and "predicted dog1" in caption and "93.0%" in caption, caption
    assert buttons[0].get_attribute("aria-pressed") == "true"
    big = browser.execute_script("return document.querySelector('#mistake-images img').getBoundingClientRect().width")
    assert big > 150
    # from the keyboard: focus the third thumbnail, Enter
    browser.execute_script("arguments[0].focus()", buttons[2])
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    _wait(browser, "return document.getElementById('mistake-caption').textContent.includes('dog0')", "mistake #0")
    _wait(browser, shown, "mistake #0's images")
    assert buttons[2].get_attribute("aria-pressed") == "true" and buttons[0].get_attribute("aria-pressed") == "false"
    # the key goes with uploads as well
    image = _test_png(tmp_path / "square.png")
    _upload(browser, image)
    _wait(browser, OVERLAY_DRAWN, "the overlay, with the key")
    assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")


def test_page_hides_the_gallery_without_one(base_url: str, browser: webdriver.Chrome) -> None:
    _open_page(browser, base_url)
    _wait(browser, "return performance.getEntriesByType('resource').some(e => e.name.endsWith('/v1/gallery'))",
          "the page to ask for the gallery")  # 404 here: no serve.gallery
    assert browser.find_element(By.ID, "gallery-section").is_displayed() is False
    assert browser.find_element(By.ID, "key-form").is_displayed() is False
