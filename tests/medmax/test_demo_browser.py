"""The demo in a real browser: `medmax demo` on a loopback port, driven by headless Chromium through Selenium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``; .ci/run
installs them); skipped, with that reason, only when they are missing. Nothing is downloaded: Selenium is
pointed at the system browser and driver.

Screenshots of each state go to ``$MEDMAX_ARTIFACTS/demo`` (default: a pytest temporary folder, logged).
``MEDMAX_DEMO_TEST_MODEL=DIR`` runs the same steps on another model folder (the README's screenshot
was taken this way on the quickstart's model).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_files

from medmax.synthetic import GENERATION_PREFIX, make_scans
from medmax.synthetic_volumes import lesion_volume, write_nifti

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ROOT = Path(__file__).resolve().parents[2]
DICOM = next(f for f in get_testdata_files() if os.path.basename(f) == "CT_small.dcm")
logger = logging.getLogger(__name__)

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no Chromium installed: apt-get install -y chromium chromium-driver")

PIXEL_SPREAD_JS = """
const img = arguments[0];
if (!img.complete || !img.naturalWidth) return -1;
const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
const d = ctx.getImageData(0, 0, c.width, c.height).data;
let n = 0, s = 0, s2 = 0;
for (let i = 0; i < d.length; i += 4) { const v = (d[i] + d[i + 1] + d[i + 2]) / 3; n++; s += v; s2 += v * v; }
const m = s / n; return Math.sqrt(s2 / n - m * m);
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    base = os.environ.get("MEDMAX_ARTIFACTS")
    folder = Path(base) / "demo" if base else tmp_path_factory.mktemp("artifacts") / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("demo screenshots in %s", folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_model_dir, artifacts):
    """`medmax demo` as a user starts it, on a free loopback port; -> its URL."""
    model = os.environ.get("MEDMAX_DEMO_TEST_MODEL") or str(tiny_model_dir)
    port = _free_port()
    log = open(artifacts / "server.log", "w")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "medmax", "demo", "--model", model, "--port", str(port),
                             "--max-upload-mb", "4"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the demo server exited: {(artifacts / 'server.log').read_text()[-2000:]}"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo server did not answer within 120 s"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1150"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("browser-files")
    scan = folder / "scan.png"
    make_scans(1, seed=3, size=96)[0].image.save(scan)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    volume = write_nifti(folder / "ct.nii.gz", lesion_volume(np.random.default_rng(0), shape=(6, 24, 32)).hu)
    return {"scan": str(scan), "dicom": DICOM, "broken": str(broken), "volume": str(volume)}


class Page:
    """The demo page as a person uses it."""

    def __init__(self, driver, artifacts: Path):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.By, self.artifacts = driver, By, artifacts
        self.wait = WebDriverWait(driver, 60, poll_frequency=0.1)

    def find(self, css):
        return self.d.find_element(self.By.CSS_SELECTOR, css)

    def all(self, css):
        return self.d.find_elements(self.By.CSS_SELECTOR, css)

    def status(self) -> str:
        return self.find("#status").text

    def set_number(self, elem_id: str, value) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} input[type=number]")
        box.clear()
        box.send_keys(str(value), Keys.TAB)

    def mode(self, name: str) -> None:
        self.find(f"#mode input[value='{name}']").click()

    def attach(self, *paths: str) -> None:
        self.find("#attach input[type=file]").send_keys("\n".join(paths))

    def ask(self, text: str, answer_number: int) -> str:
        """Type, submit and wait for the answer's status line; -> that status."""
        self.find("#ask textarea").send_keys(text)
        self.find("#ask button.submit-button").click()
        self.wait.until(lambda _: self.status().startswith(f"answer {answer_number} done"))
        return self.status()

    def remove_attachments(self) -> None:
        self.find("#attach button[aria-label='Clear']").click()

    def bot_texts(self) -> list[str]:
        return [e.text for e in self.all("#chat [data-testid=bot]") if e.text.strip()]

    def shot(self, name: str) -> None:
        self.d.save_screenshot(str(self.artifacts / f"{name}.png"))


def test_the_demo_in_a_browser(server, browser, files, artifacts):
    page = Page(browser, artifacts)
    try:
        _walk_through(page, server, files)
    except Exception:
        page.shot("failure")
        raise


def _walk_through(page: Page, server: str, files: dict) -> None:
    browser = page.d
    browser.get(server)
    # the page renders its parts one after another: wait for the settings too (a loaded machine showed the
    # question box before the sliders)
    page.wait.until(lambda _: page.all("#ask textarea") and page.all("#max-tokens input[type=number]"))
    page.set_number("max-tokens", 12)

    # ask about a scan and a DICOM file: both are previewed as the model sees them
    page.attach(files["scan"], files["dicom"])
    page.wait.until(lambda _: len(page.all("#preview img")) >= 2)
    page.shot("1-attached")
    status = page.ask("Is there a lesion in this scan?", 1)
    assert status.startswith("answer 1 done"), status
    (answer,) = page.bot_texts()
    assert answer.strip()
    page.shot("2-text-answer")

    # the same seed gives the same answer again
    page.find("#rerun").click()
    page.wait.until(lambda _: page.status().startswith("answer 2 done"))
    assert page.bot_texts() == [answer]

    # image mode: a drawn image, with real pixels, and its PNG and codes to download
    page.mode("image")
    page.ask(f"{GENERATION_PREFIX}A grey scan with a large bright lesion in the lower right.", 3)
    drawn = page.wait.until(lambda _: [img for img in page.all("#chat img") if "/answers/" in img.get_attribute("src")])
    page.wait.until(lambda _: browser.execute_script(PIXEL_SPREAD_JS, drawn[-1]) > 2)  # not a blank square
    offered = page.wait.until(lambda _: [a.get_attribute("download") for a in page.all("#downloads a[download]")])
    assert offered == ["image_0.png", "image_0.codes.json"]
    page.shot("3-image-answer")

    # interleaved mode answers too; the page now shows all three modes
    page.mode("interleaved")
    page.set_number("seed", 4)  # the seed the README's picture was taken with
    status = page.ask(f"{GENERATION_PREFIX}A grey scan with a small bright lesion in the upper left.", 4)
    assert status.startswith("answer 4 done"), status
    page.d.set_window_size(1400, 1700)  # tall enough for the whole conversation (the README's picture)
    time.sleep(0.5)
    page.shot("4-three-modes")
    page.d.set_window_size(1400, 1150)

    # a broken file: a clear message, and the server keeps serving
    page.attach(files["broken"])
    page.wait.until(lambda _: "broken.png" in page.status())
    assert "cannot be read as an image" in page.status()
    page.shot("5-broken-upload")
    page.remove_attachments()
    page.wait.until(lambda _: not page.all("#attach td.filename"))
    page.mode("text")
    assert page.ask("And now?", 5).startswith("answer 5 done")
    page.shot("6-after-the-error")

    # a NIfTI volume: its slices (all 6, fewer than the default 16) previewed as the model sees them, then asked about
    page.attach(files["volume"])
    page.wait.until(lambda _: len(page.all("#preview img")) == 6)
    page.shot("7-volume-attached")
    assert page.ask("Is there a lesion in this volume?", 6).startswith("answer 6 done")
