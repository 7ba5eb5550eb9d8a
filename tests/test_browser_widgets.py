"""End to end: notebook 12's guidance panel in a real browser.

nbval runs every cell but never moves a slider, and tests/test_widgets.py drives the panel from
Python, not through the page. This test starts JupyterLab on a free loopback port (a copy of the
notebook in a temporary folder, so the repository's notebook is never saved over), opens it in
headless Chromium driven by Playwright, runs all cells from the Run menu, waits for the panel's
image, moves the guidance slider with the keyboard (arrow, page up, end, on the slider's handle)
and checks that the image (its PNG bytes, read back from the page) changes.

Chromium is the system's (Debian's ``chromium`` package; ``$LDM_CHROMIUM`` may name another
binary): Playwright's own browser downloads are not reachable here. The test is skipped, saying
so, only where no Chromium is installed; .ci/run installs it when it can.

Screenshots go to ``$LDM_SCREENSHOTS`` or, by default, ``build/screenshots/`` in the repository
(``build/`` is gitignored): ``12_panel_before.png``, ``12_panel_after.png``, ``12_notebook.png``,
and ``12_failure.png`` when something went wrong.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "12_cfg_experiments.ipynb"
IMAGE = "img.ldm-cfg-image"  # CSS classes set by ldm_lib.widgets
HANDLE = ".ldm-cfg-guidance .noUi-handle"
STATUS = ".ldm-cfg-status"
DONE = ".jp-OutputArea-output:has-text('notebook ran in')"  # the last cell's output
STDERR = "application/vnd.jupyter.stderr"  # how JupyterLab marks tracebacks (and warnings)
# Keys pressed on the guidance slider's handle (noUiSlider's keyboard support), one redraw each:
# a step of 0.5, five steps, the end of the range: w = 4 -> 4.5 -> 7 -> 20.
KEYS = ("ArrowRight", "PageUp", "End")
FINAL_SCALE = 20.0
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Generous limits, so a loaded machine is slow rather than red; undisturbed the test takes about a minute.
SERVER_START_S = 90
RUN_ALL_S = 300
REDRAW_S = 120


def _chromium() -> str | None:
    for candidate in (os.environ.get("LDM_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _screenshot_dir() -> Path:
    folder = Path(os.environ.get("LDM_SCREENSHOTS") or ROOT / "build" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_settings(folder: Path) -> None:
    """JupyterLab settings for a quiet, offline session: no news or update checks, no autosave."""
    settings = {
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    }
    for name, values in settings.items():
        path = folder / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 serving ``root``, with a random token; stopped by ``stop``."""

    def __init__(self, root: Path, state: Path) -> None:
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.log_path = state / "jupyterlab.log"
        _write_settings(state / "settings")
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            JUPYTER_CONFIG_DIR=str(state / "config"),
            JUPYTER_DATA_DIR=str(state / "data"),  # the kernel spec stays the venv's (sys.prefix)
            JUPYTER_RUNTIME_DIR=str(state / "runtime"),
        )
        jupyter = Path(sys.executable).with_name("jupyter")
        command = [
            str(jupyter),
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--port-retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={state / 'settings'}",
            f"--LabApp.workspaces_dir={state / 'workspaces'}",
        ]
        if os.geteuid() == 0:  # containers and CI machines often run as root
            command.append("--allow-root")
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}?token={self.token}"

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"JupyterLab exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url("/api/status"), timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"JupyterLab did not answer within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Ask the server to shut down (it stops its kernels), then terminate, then kill."""
        if self.process.poll() is None:
            try:
                request = urllib.request.Request(self.url("/api/shutdown"), method="POST")
                urllib.request.urlopen(request, timeout=5).close()
            except OSError:
                pass
            for stop in (None, self.process.terminate, self.process.kill):
                if stop is not None:
                    stop()
                try:
                    self.process.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log.close()


def _image_bytes(page) -> bytes:
    """The PNG bytes the panel's <img> shows (its src is a blob: URL made from the widget's value)."""
    encoded = page.eval_on_selector(
        IMAGE,
        """async (img) => {
            const data = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
            let text = "";
            for (let i = 0; i < data.length; i += 0x8000) {
                text += String.fromCharCode.apply(null, data.subarray(i, i + 0x8000));
            }
            return btoa(text);
        }""",
    )
    return base64.b64decode(encoded)


def _wait_for_run_all(page, timeout: float) -> None:
    """Wait for the last cell's output; fail early, with the traceback, if a cell raised."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.locator(DONE).count():
            return
        stderr = page.locator(f".jp-OutputArea-output[data-mime-type='{STDERR}']").all_inner_texts()
        tracebacks = [t for t in stderr if "Traceback (most recent call last)" in t]
        if tracebacks:
            pytest.fail("a cell of the notebook raised:\n" + tracebacks[0][-3000:])
        page.wait_for_timeout(500)
    pytest.fail(f"Run All did not finish within {timeout} s")


def test_guidance_slider_redraws_the_panel_image_in_jupyterlab(tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install chromium; .ci/run does it as root), "
            "so the browser test cannot run; set LDM_CHROMIUM to use another Chromium binary"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:  # the lock pins it: a venv without it is out of date
        pytest.fail(f"playwright is not installed ({error}); it is in requirements.lock: rebuild .venv")

    start = time.monotonic()
    root, state = tmp_path / "root", tmp_path / "state"
    (root / "notebooks").mkdir(parents=True)
    state.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, root / "notebooks" / NOTEBOOK)
    shots = _screenshot_dir()
    server = JupyterLab(root, state)
    try:
        server.wait_until_up(SERVER_START_S)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(state / "chromium-profile"),  # a fresh, temporary user-data-dir
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1000},
            )
            page = browser.new_page()
            page.set_default_timeout(REDRAW_S * 1000)
            try:
                page.goto(server.url(f"/lab/tree/notebooks/{NOTEBOOK}"))
                page.wait_for_selector(".jp-Notebook .jp-Cell")
                page.wait_for_selector(".jp-StatusBar-TextItem:has-text('| Idle')")  # the kernel is up

                page.click(".lm-MenuBar-itemLabel:text-is('Run')")
                page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
                _wait_for_run_all(page, RUN_ALL_S)

                image, status = page.locator(IMAGE), page.locator(STATUS)
                panel = page.locator(f".jp-OutputArea-output:has({IMAGE})")
                status.scroll_into_view_if_needed()  # the panel's last line: all of it is on screen
                image.wait_for(state="visible")
                assert "w = 4," in status.text_content(), status.text_content()
                src_before, png_before = image.get_attribute("src"), _image_bytes(page)
                panel.screenshot(path=str(shots / "12_panel_before.png"))

                handle = page.locator(HANDLE)
                assert handle.get_attribute("aria-valuenow") == "4.0"
                handle.focus()
                for key in KEYS:
                    handle.press(key)
                assert handle.get_attribute("aria-valuenow") == str(FINAL_SCALE)
                page.wait_for_function(  # the kernel redrew for the last value
                    "([selector, text]) => document.querySelector(selector).textContent.includes(text)",
                    arg=[STATUS, f"w = {FINAL_SCALE:g},"],
                )
                page.wait_for_function(
                    "([selector, src]) => document.querySelector(selector).src !== src",
                    arg=[IMAGE, src_before],
                )
                png_after = _image_bytes(page)
                panel.screenshot(path=str(shots / "12_panel_after.png"))
                page.screenshot(path=str(shots / "12_notebook.png"))
            except BaseException:
                page.screenshot(path=str(shots / "12_failure.png"))
                raise
            finally:
                browser.close()
    except BaseException:
        print(f"JupyterLab log (tail):\n{server.log_tail()}")
        raise
    finally:
        server.stop()

    before, after_image = Image.open(io.BytesIO(png_before)), Image.open(io.BytesIO(png_after))
    assert before.format == after_image.format == "PNG"
    assert before.size == after_image.size == (4 * 32 * 4, 32 * 4)  # four 32-px images, upscaled 4x
    assert png_before != png_after, "moving the guidance slider did not change the image"
    print(f"browser test: {time.monotonic() - start:.0f} s; screenshots in {shots}")
