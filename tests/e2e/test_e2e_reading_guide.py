"""What a pre-annotation shows in a real Label Studio: the model's guide, its proposed
pressure setting, the valve's keypoint and valve-id's note.

A real Label Studio (the suite's pinned server), the shipped ``label_config.xml``, the
guide pictures installed the way ``valve-id up`` installs them
(:func:`backend.tools.guides.install_guides`), and one task whose only prediction is built
by the backend's own result builders (:mod:`backend.service.prelabel`): "proGAV 2.0", the
proposed setting with its probability, the valve's centre, and the note of an X-ray flagged as
unfamiliar. Headless Chromium opens the task as an annotator would and must show the proGAV
2.0 guide and no other, its setting scale with the proposed setting selected, the picture
loaded through Label Studio (HTTP 200), the keypoint region and the note; clicking another
model then swaps the guide and the scale. The screenshot goes to
``docs/images/reading-guide.png`` (the README shows it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from backend.service.labelstudio import choice_result
from backend.service.prediction import Prediction
from backend.service.prelabel import location_result, note_result, setting_of
from backend.tools.guides import GUIDE_URL_PREFIX, install_guides
from backend.tools.stack.bootstrap import LabelStudioAdmin, ensure_project
from training.shared.labels import load_label_config
from training.synthetic import render_xray

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
SCREENSHOT = REPO / "docs" / "images" / "reading-guide.png"
MODEL_VERSION = "guide-test"
PRE_ANNOTATED = "proGAV 2.0"
CLICKED = "Codman Hakim"
PROPOSED_SETTING = ("12", 0.64)

_GUIDES_JS = """
const shown = e => e.getClientRects().length > 0;
const headers = [...document.querySelectorAll('.lsf-main-view :is(h1, h2, h3, h4, h5, h6)')]
  .filter(shown).map(h => h.textContent.trim()).filter(t => t.startsWith('How to read: '));
// Label Studio loads an <Image> into a blob: URL; the guide picture is the small one.
const pictures = [...document.querySelectorAll('.lsf-main-view img')].filter(shown)
  .map(i => { const r = i.getBoundingClientRect();
    return {loaded: i.complete && i.naturalWidth > 0, width: r.width, bottom: r.bottom,
            left: r.left}; })
  .filter(p => p.width > 0 && p.width <= 300);
const requested = performance.getEntriesByType('resource').map(e => e.name)
  .filter(n => n.includes('valve-id-guides/'));
return {headers, pictures, requested, viewportHeight: window.innerHeight};
"""
_STATUS_JS = """
const done = arguments[arguments.length - 1];
fetch(arguments[0], {credentials: 'same-origin'}).then(r => done(r.status), e => done(String(e)));
"""


def _xray_task(
    label_studio: Any, admin: LabelStudioAdmin, project_id: int
) -> tuple[int, tuple[float, float]]:
    """One synthetic proGAV 2.0 X-ray as a task served from local files; its id and the
    valve's true centre (pixels)."""
    folder = label_studio.files_root / "xrays"
    folder.mkdir()
    image, info = render_xray(np.random.default_rng(7), PRE_ANNOTATED, shape=(900, 1100))
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / "xray.png")
    admin.label_studio.create_local_storage(
        project_id, str(folder), title="x-rays", description="test X-ray"
    )
    admin.request(
        "POST",
        f"/api/projects/{project_id}/import",
        json=[{"image": "/data/local-files/?d=xrays/xray.png"}],
    )
    (task,) = admin.tasks(project_id)
    return int(task["id"]), (float(info["valve_x"]), float(info["valve_y"]))


def _shown(driver: Any) -> dict[str, Any]:
    return dict(driver.execute_script(_GUIDES_JS))


def test_the_pre_annotated_models_guide_shows_and_follows_a_click(
    label_studio: Any, tmp_path: Path, artifacts_dir: Path
) -> None:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    config = load_label_config(REPO / "label_config.xml")
    admin = LabelStudioAdmin(label_studio.url, label_studio.account.token)
    project_id, _ = ensure_project(admin, REPO / "label_config.xml", title="reading guide")
    install_guides(
        admin.label_studio,
        project_id,
        local_files_root=label_studio.files_root,
        source=REPO / "guides",
    )
    task_id, centre = _xray_task(label_studio, admin, project_id)
    answer = Prediction(
        PRE_ANNOTATED,
        {PRE_ANNOTATED: 0.9},
        0.04,
        {},
        MODEL_VERSION,
        "hash",
        centre_px=centre,
        image_size_px=(1100, 900),
        centre_source="locator",
        novelty=0.99,
        unfamiliar=True,
        settings={PRE_ANNOTATED: PROPOSED_SETTING},
    )
    setting = setting_of(answer, config, PRE_ANNOTATED)
    assert setting, "label_config.xml has no proGAV 2.0 setting scale"
    note = note_result(answer, config)
    assert note, "label_config.xml has no model_note text area"
    admin.request(
        "POST",
        "/api/predictions/",
        json={
            "task": task_id,
            "result": (
                choice_result(config, PRE_ANNOTATED)
                + setting
                + location_result(answer, config)
                + note
            ),
            "score": 0.9,
            "model_version": MODEL_VERSION,
        },
    )
    admin.update_project(project_id, model_version=MODEL_VERSION)

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        wait = WebDriverWait(
            driver, 90, poll_frequency=0.25, ignored_exceptions=[WebDriverException]
        )
        driver.get(f"{label_studio.url}/user/login/")
        wait.until(lambda d: d.find_element(By.ID, "email")).send_keys(
            label_studio.account.username
        )
        driver.find_element(By.ID, "password").send_keys(label_studio.account.password)
        driver.find_element(By.CSS_SELECTOR, "button.login-button").click()
        wait.until(lambda d: "/user/login" not in d.current_url)

        driver.get(f"{label_studio.url}/projects/{project_id}/data?labeling=1")
        wait.until(
            lambda d: (
                _shown(d)["headers"]
                and _shown(d)["pictures"]
                and all(p["loaded"] for p in _shown(d)["pictures"])
            )
        )
        time.sleep(0.5)  # let the layout settle before the picture is taken
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        first = _shown(driver)
        page_text = str(driver.execute_script("return document.body.innerText"))
        selected = [
            e.get_attribute("name")
            for e in driver.find_elements(By.CSS_SELECTOR, ".lsf-choice input")
            if e.is_selected()
        ]
        status = driver.execute_async_script(
            _STATUS_JS, f"{label_studio.url}{GUIDE_URL_PREFIX}progav-2.0.png"
        )
        missing = driver.execute_async_script(
            _STATUS_JS, f"{label_studio.url}/data/local-files/?d=valve-id-guides/nope.png"
        )

        # The annotator picks another model: its guide replaces the first.
        (hakim,) = [
            e
            for e in driver.find_elements(By.CSS_SELECTOR, ".lsf-choice")
            if e.text.strip().startswith(CLICKED)
        ]
        hakim.find_element(By.CSS_SELECTOR, "input").click()
        wait.until(lambda d: _shown(d)["headers"] == [f"How to read: {CLICKED}"])
        wait.until(lambda d: all(p["loaded"] for p in _shown(d)["pictures"]))
        second = _shown(driver)
    finally:
        # What the browser showed last, for a failure's diagnosis.
        driver.save_screenshot(str(artifacts_dir / "e2e-reading-guide-last.png"))
        (artifacts_dir / "e2e-reading-guide-last.txt").write_text(
            f"{_shown(driver)}\n\n{driver.execute_script('return document.body.innerText')}",
            encoding="utf-8",
        )
        driver.quit()

    # The proposed model and, in its scale (a drop-down under the guide's title), the proposed
    # setting; the note gives its probability.
    assert selected == [PRE_ANNOTATED], (selected, SCREENSHOT)
    assert f"How to read: {PRE_ANNOTATED}\nSetting (cmH2O)\n12\n" in page_text, page_text[-2000:]
    assert "Setting 12: probability 64%" in page_text, page_text[-2000:]
    # The note and the keypoint region are on screen with the choice.
    assert note[0]["value"]["text"][0] in page_text, page_text[-2000:]
    assert "Valve" in page_text.split("Regions", 1)[-1], page_text[-2000:]
    assert first["headers"] == [f"How to read: {PRE_ANNOTATED}"], (first, SCREENSHOT)
    (picture,) = first["pictures"]
    assert picture["loaded"], first
    assert any(n.endswith(f"{GUIDE_URL_PREFIX}progav-2.0.png") for n in first["requested"])
    assert status == 200, status
    assert missing == 404, missing  # the 200 is the file's, not any URL's
    # Compact and on screen beside the X-ray on a 1400 x 900 display.
    assert 200 <= picture["width"] <= 260, picture
    assert picture["bottom"] <= first["viewportHeight"], (picture, SCREENSHOT)
    assert picture["left"] > 1400 / 2, picture
    assert second["headers"] == [f"How to read: {CLICKED}"], second
    (picture,) = second["pictures"]
    assert picture["loaded"], second
    assert any(n.endswith(f"{GUIDE_URL_PREFIX}codman-hakim.png") for n in second["requested"])
