"""The Playground in a real browser: adapters added by file beside a run, their scales dragged and typed.

`python app.py` runs on the tiny model (STUDIO_MODEL=tiny) with a workspace holding a copy of the
session's trained run (its trigger and class words changed to 'sks' / 'shape', so the prompt visibly
follows the run). A kohya-style LoRA file (built from kohya's key rules, see tests/test_community.py)
with one stray key is uploaded with the "Add a LoRA or embedding file" button; an SDXL-style file is
refused in one sentence. Every check is on what the page shows and on files on disk: the rendered
images (fetched from the page's own image URLs), the files kept in the workspace.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.test_browser import CHROMIUM_ARGS, SECOND, START_TIMEOUT_S, _chromium, _free_port, toast_texts

REPO = Path(__file__).resolve().parents[1]
RUN = "shape-lora"


@pytest.fixture(scope="module")
def lora_files(tiny_model, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from tests.test_community import kohya_lora

    out = tmp_path_factory.mktemp("files")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    state, _, _ = kohya_lora(pipe)
    state["lora_unet_not_a_layer_of_sd.lora_down.weight"] = torch.zeros(2, 2)
    save_file(state, str(out / "kohya-style.safetensors"))
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280)},
              str(out / "xl-style.safetensors"))
    return out


@pytest.fixture(scope="module")
def app(trained_run, tmp_path_factory):
    """The app on the tiny model, its workspace holding the run; stopped (its process group) at the end."""
    from studio.adapters import read_meta, write_meta

    _chromium()
    workspace = tmp_path_factory.mktemp("play-workspace")
    shutil.copytree(trained_run, workspace / "runs" / RUN)
    meta = read_meta(workspace / "runs" / RUN / "adapter")
    meta.class_word = "shape"
    write_meta(workspace / "runs" / RUN / "adapter", meta)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STUDIO_WORKSPACE": str(workspace), "STUDIO_MODEL": "tiny",
           "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log_path = workspace.parent / "play-app.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--host", "127.0.0.1"], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            assert proc.poll() is None, f"app.py exited:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"app.py did not serve:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield {"url": url, "workspace": workspace, "log": log_path}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.set_default_timeout(30 * SECOND)
        page = context.new_page()
        page.goto(app["url"])
        page.get_by_role("tab", name="Playground", exact=True).wait_for()
        yield page
        context.close()
        browser.close()


def shown_image(page, elem_id: str):
    """The image an <img> of the page shows, fetched from its own URL."""
    from PIL import Image

    src = page.locator(f"#{elem_id} img").get_attribute("src")
    if src.startswith("/"):
        src = page.url.rstrip("/") + src
    with urllib.request.urlopen(src, timeout=10) as resp:
        return Image.open(io.BytesIO(resp.read())).convert("RGB")


def difference(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def wait_for_new_image(page, elem_id: str, before: str | None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        img = page.locator(f"#{elem_id} img")
        if img.count() and img.get_attribute("src") not in (None, before):
            return
        page.wait_for_timeout(200)
    raise AssertionError(f"#{elem_id} did not show a new image within {timeout_s} s")


def upload(page, path: Path) -> None:
    """Click the upload button and pick the file in the file chooser, as a person does."""
    with page.expect_file_chooser() as chooser:
        page.locator("#play-upload").click()
    chooser.value.set_files(str(path))


def src(page, elem_id: str) -> str | None:
    img = page.locator(f"#{elem_id} img")
    return img.get_attribute("src") if img.count() else None


def test_files_added_in_the_playground_change_the_image_and_their_scale_moves(page, app, lora_files):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Playground", exact=True).click()
    # The run: picking it puts its own words in the prompt.
    page.locator("#play-adapter-0 input[role=combobox]").click()
    page.locator(f'#play-adapter-0 [role=option][aria-label="{RUN}"]').click()
    expect(page.locator("#play-prompt textarea")).to_have_value("a photo of sks shape", timeout=60 * SECOND)
    page.get_by_label("number input for Steps").fill("4")
    page.get_by_label("number input for Steps").press("Tab")

    # A file for another family: one sentence, and nothing is kept.
    upload(page, lora_files / "xl-style.safetensors")
    expect(page.locator("[data-testid=toast-text]").filter(has_text="is a LoRA for SDXL and the base model is SD 1.x")
           ).to_be_visible(timeout=60 * SECOND)
    assert not (app["workspace"] / "adapter-files" / "xl-style.safetensors").exists()
    for button in page.locator("[data-testid=toast-close]").all():
        button.click()

    # The kohya file: a second adapter row, its report with the stray key, a copy kept in the workspace.
    upload(page, lora_files / "kohya-style.safetensors")
    expect(page.locator("#play-adapter-1 input[role=combobox]")).to_have_value("file: kohya-style.safetensors",
                                                                                timeout=60 * SECOND)
    note = page.locator("#play-note-1")
    expect(note).to_contain_text("kohya LoRA")
    expect(note).to_contain_text("1 key(s) match no layer of this base model")
    expect(note).to_contain_text("lora_unet_not_a_layer_of_sd.lora_down.weight")
    kept = app["workspace"] / "adapter-files" / "kohya-style.safetensors"
    assert kept.read_bytes() == (lora_files / "kohya-style.safetensors").read_bytes()

    page.locator("#play-generate").click()
    timing = page.locator("#play-timing")
    expect(timing).to_contain_text("Base and adapted rendered in", timeout=90 * SECOND)
    base, both = shown_image(page, "play-base"), shown_image(page, "play-adapted")
    assert difference(both, base) > 1.0

    # Typing a scale (no Tab, no drag): the adapted image is drawn again, in place.
    before = src(page, "play-adapted")
    number = page.locator("#play-scale-1 input[type=number]")
    number.fill("0")
    wait_for_new_image(page, "play-adapted", before)
    expect(timing).to_contain_text("(no reload)", timeout=30 * SECOND)
    run_only = shown_image(page, "play-adapted")
    assert difference(run_only, both) > 0.5  # the file's share is gone

    # Moving the slider itself (keyboard on the range, as a person using the keys would): drawn again.
    before = src(page, "play-adapted")
    slider = page.locator("#play-scale-1 input[type=range]")
    slider.focus()
    for _ in range(20):  # 0 -> 1.0 in steps of 0.05
        slider.press("ArrowRight")
    expect(number).to_have_value("1", timeout=10 * SECOND)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the last render is the one at 1.0
        wait_for_new_image(page, "play-adapted", before)
        before = src(page, "play-adapted")
        if difference(shown_image(page, "play-adapted"), both) == 0:
            break
        page.wait_for_timeout(500)
    assert difference(shown_image(page, "play-adapted"), both) == 0  # back at 1: the same image as before

    # Take it home: the run's file under its name, the prompt syntax, the workflow to download.
    page.get_by_text("Take it home: ComfyUI, AUTOMATIC1111/Forge, diffusers").click()
    page.locator("#play-home").click()
    home = page.locator("#play-home-text")
    expect(home).to_contain_text(f"<lora:{RUN}:1>", timeout=30 * SECOND)
    expect(home).to_contain_text("ComfyUI/models/loras")
    links = page.locator("#play-home-files a")
    expect(links).to_have_count(2, timeout=30 * SECOND)
    hrefs = [a.get_attribute("href") for a in links.all()]
    workflow_url = next(h for h in hrefs if h.endswith("-comfyui-workflow.json"))
    lora_url = next(h for h in hrefs if h.endswith(f"{RUN}.safetensors"))
    get = lambda h: urllib.request.urlopen(h if h.startswith("http") else page.url.rstrip("/") + h, timeout=10).read()  # noqa: E731
    import json

    workflow = json.loads(get(workflow_url))
    (loader,) = [n for n in workflow.values() if n["class_type"] == "LoraLoader"]
    assert loader["inputs"]["lora_name"] == f"{RUN}.safetensors" and loader["inputs"]["strength_model"] == 1.0
    assert get(lora_url) == (app["workspace"] / "runs" / RUN / "adapter" / "pytorch_lora_weights_kohya.safetensors").read_bytes()
    assert not [t for t in toast_texts(page) if "went wrong" in t], toast_texts(page)
