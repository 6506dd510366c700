"""The station's live page in a real browser: headless Chromium loads it, uploads a defective part through the
page's own upload input, and shows the decision the API gives for that image.

Needs Playwright's Python package (requirements.txt) and a Chromium: the system one (Debian:
``apt-get install -y chromium``; nothing is downloaded), else one Playwright installed
(``python -m playwright install --with-deps chromium``). Skipped with the reason when there is none.
"""

import shutil

import httpx
import pytest

from checkpoint_fixture import session_checkpoint_fixture
from serve_fixture import StationProcess, port_open

trained = session_checkpoint_fixture()

CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
    None,
)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed: pip install playwright"
)


def launch(playwright):
    """The system Chromium, else a browser Playwright installed itself; skip when there is neither."""
    # --no-sandbox: Chromium's sandbox refuses to start as root (CI containers).
    try:
        return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
    except sync_api.Error as error:
        if CHROMIUM is not None:
            raise
        pytest.skip(
            "no Chromium: apt-get install -y chromium (Debian) or python -m playwright install --with-deps "
            f"chromium ({str(error).splitlines()[0]})"
        )


def test_the_page_uploads_a_part_and_shows_the_apis_decision(trained, tmp_path):
    defective = sorted(p for p in (trained.data_dir / "test").rglob("*.png") if p.parent.name != "good")[0]
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)  # first: a machine without a browser skips before starting a station
        try:
            with StationProcess(trained.ckpt, tmp_path / "station") as station:
                expected = httpx.post(
                    f"{station.url}/predict",
                    content=defective.read_bytes(),
                    headers={"Content-Type": "image/png"},
                    timeout=60,
                ).json()
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{station.url}/")
                page.wait_for_function("!document.getElementById('model').textContent.startsWith('loading')")
                assert "PatchAEModule" in page.text_content("#model")

                page.set_input_files("#upload", str(defective))
                page.wait_for_function("document.getElementById('manual-decision').textContent.length > 0")
                assert page.text_content("#manual-decision") == expected["decision"]
                assert page.text_content("#manual-error") == ""
                page.wait_for_function(
                    "(() => { const img = document.getElementById('manual-overlay');"
                    " return !img.hidden && img.complete && img.naturalWidth > 0; })()"
                )
                # The upload and the API's request both reach the counters and the latest parts.
                page.wait_for_function(
                    "Number(document.getElementById('count-normal').textContent)"
                    " + Number(document.getElementById('count-anomalous').textContent) === 2"
                )
                page.wait_for_function("document.querySelectorAll('#latest .part').length === 2")
                badges = page.locator("#latest .part .badge").all_text_contents()
                assert badges == [expected["decision"]] * 2
                assert page.locator("#histogram rect").count() == 20
                screenshot = tmp_path / "station.png"
                page.screenshot(path=str(screenshot), full_page=True)
                assert screenshot.stat().st_size > 10_000
        finally:
            browser.close()
    assert station.stopped_cleanly() and not port_open(station.port)
