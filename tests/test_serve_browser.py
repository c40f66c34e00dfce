"""The upload page of ``fastervit serve`` in a real browser: Debian's chromium, headless, driven by Debian's
chromedriver through the W3C WebDriver protocol (plain HTTP, spoken with httpx; no browser download, no selenium).

Needs ``apt-get install -y chromium chromium-driver``; runs in ``make test-full`` only. The screenshot is kept under
the test's tmp folder and copied to ``runs/serve/screenshot.png``.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import experiment_module
from PIL import Image

import open_fastervit
from open_fastervit.paths import data_path
from open_fastervit.predict import predict

free_port, server_process = (getattr(experiment_module("serve_load"), name)
                              for name in ("free_port", "server_process"))

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
TINY_KWARGS = dict(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(7, 7, 3, 3))
NAMES = [f"class {i} ({name})" for i, name in enumerate("abcdefghij")]
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.full


class WebDriver:
    """The few W3C WebDriver commands the test needs, over chromedriver's HTTP endpoint."""

    def __init__(self, port: int, profile: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,900"]
        capabilities = {"alwaysMatch": {"browserName": "chrome",
                                        "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}
        answer = self._call("POST", "/session", {"capabilities": capabilities})
        self.session = f"/session/{answer['sessionId']}"

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        response = httpx.request(method, self.base + path, json=body, timeout=60)
        value = response.json()["value"]
        if response.status_code != 200:
            raise AssertionError(f"webdriver {method} {path}: {value}")
        return value

    def get(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def upload(self, css: str, path: Path) -> None:
        found = self._call("POST", f"{self.session}/element", {"using": "css selector", "value": css})
        assert ELEMENT in found, f"webdriver: no element reference in {found}"
        element = found[ELEMENT]
        self._call("POST", f"{self.session}/element/{element}/value", {"text": str(path)})

    def run(self, script: str) -> object:
        return self._call("POST", f"{self.session}/execute/sync", {"script": script, "args": []})

    def screenshot(self) -> bytes:
        return base64.b64decode(self._call("GET", f"{self.session}/screenshot"))

    def quit(self) -> None:
        self._call("DELETE", self.session)


def wait_until(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not reached in {timeout} s")


def test_upload_page_shows_top5_bars(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get update && apt-get install -y chromium chromium-driver")
    torch.manual_seed(0)
    model = open_fastervit.load_model("fastervit_0", pretrained=False, model_kwargs=TINY_KWARGS, num_classes=10)
    with torch.no_grad():
        for p in model.get_classifier().parameters():
            p.mul_(40)  # clearly different bars
    weights = tmp_path / "tiny.safetensors"
    open_fastervit.save_weights(model, weights, metadata={"model_kwargs": TINY_KWARGS, "img_size": 64,
                                                          "class_names": NAMES})
    image = data_path("imagenet-stubs") / "koala.jpg"
    want = predict([image], checkpoint=weights, topk=5, device="cpu")[0]

    driver_port = free_port()
    chromedriver = subprocess.Popen([CHROMEDRIVER, f"--port={driver_port}"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _ready(driver_port))
        with server_process(weights, free_port(), "--device", "cpu", "--log-level", "warning",
                            log=tmp_path / "server.log") as url:
            browser = WebDriver(driver_port, tmp_path / "profile")
            try:
                browser.get(url + "/")
                wait_until(lambda: "fastervit_0" in str(browser.run("return document.getElementById('model')"
                                                                    ".textContent")))
                browser.upload("#file", image)
                rows = wait_until(lambda: browser.run(
                    "return [...document.querySelectorAll('#results .row')].map(r => ["
                    "r.querySelector('.label').textContent, r.querySelector('.pct').textContent, "
                    "r.querySelector('.bar span').style.width])"))
                png = browser.screenshot()
            finally:
                browser.quit()
    finally:
        chromedriver.terminate()
        chromedriver.wait(timeout=20)

    shot = tmp_path / "screenshot.png"
    shot.write_bytes(png)
    (REPO / "runs" / "serve").mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, REPO / "runs" / "serve" / "screenshot.png")
    percentages = [f"{100 * p:.1f}%" for p in want.probs]
    assert [r[0] for r in rows] == want.labels
    assert [r[1] for r in rows] == percentages
    assert [float(r[2].rstrip("%")) for r in rows] == pytest.approx([float(p[:-1]) for p in percentages])  # bar widths
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    bar_green = (np.abs(pixels - np.array([0x22, 0xAA, 0x77])).sum(-1) < 30).sum()
    assert bar_green > 500, "no bars in the screenshot"


def _ready(port: int) -> bool:
    try:
        return bool(httpx.get(f"http://127.0.0.1:{port}/status", timeout=1).json()["value"]["ready"])
    except (httpx.HTTPError, ValueError, KeyError):
        return False
