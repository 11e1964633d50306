"""In a browser: a single-file checkpoint and a separate VAE as a user names them, trained on, and the run
reopened on its file in the Evaluate tab and the Playground. Uses tests/test_browser.py's app, page and helpers."""

from __future__ import annotations

import re
import time
from pathlib import Path

from studio.config import load_run_config
from tests import ldm_files
from tests.test_browser import (SECOND, app_url, choose, open_tab, page, photos, type_into,  # noqa: F401 (fixtures)
                                wait_for_run)
from tests.test_single_file import RESOLUTION, _vae, tiny_pipeline


def test_a_checkpoint_file_and_a_vae_typed_in_train_reopen_in_evaluate_and_playground(page, app_url, photos):
    from playwright.sync_api import expect
    from safetensors.torch import save_file

    from studio import adapters, single_file
    from studio.data.dataset import prep_folder

    workspace: Path = app_url["workspace"]
    files = workspace / "downloads"
    files.mkdir()
    checkpoint, vae_file = files / "community-model.safetensors", files / "vae-ft-mse.safetensors"
    ldm_files.write(tiny_pipeline("sd1"), "sd1", checkpoint, metadata=RESOLUTION)
    vae = _vae()
    save_file({k.removeprefix("first_stage_model."): v
               for k, v in ldm_files.vae_state_dict(vae.state_dict(), vae.config).items()}, str(vae_file))
    prep_folder(photos["good"][0].parent, workspace / "datasets" / "file-check", "sks", "toy", 64)
    page.reload()
    open_tab(page, "Train")
    choose(page, "train-dataset", "file-check")
    page.locator("#model-box textarea, #model-box input").first.fill(str(checkpoint))
    type_into(page, "steps", 2)
    vae_box = page.locator("#train-vae textarea, #train-vae input").first
    if not vae_box.is_visible():  # the setting is under "More options"
        page.get_by_text("More options", exact=True).click()
    vae_box.fill(str(vae_file))
    vae_box.press("Tab")
    page.locator("#train-start").click()
    run_id = wait_for_run(page, workspace)
    config = load_run_config(workspace / "runs" / run_id / "config.yaml")
    assert config["model"] == str(checkpoint.resolve()) and config["vae"] == str(vae_file.resolve())
    expect(page.locator("#train-status")).to_contain_text(re.compile(rf"{re.escape(run_id)}.*completed"),
                                                          timeout=600 * SECOND)  # a loaded 2-core machine: ~60 s a step
    meta = adapters.read_meta(adapters.find_adapter_dir(workspace / "runs" / run_id))
    assert meta.base_hash == single_file.content_hash(checkpoint) and meta.vae == str(vae_file.resolve())

    # Another base in the box; picking the run in the Evaluate tab puts its checkpoint back.
    page.locator("#model-box textarea, #model-box input").first.fill("tiny")
    open_tab(page, "Evaluate")
    page.get_by_role("button", name="Refresh lists").click()
    time.sleep(1)
    choose(page, "eval-runs", run_id)
    expect(page.locator("#model-box textarea, #model-box input").first).to_have_value(str(checkpoint.resolve()),
                                                                                    timeout=30 * SECOND)

    # The same in the Playground: picking the run as an adapter puts its checkpoint in the model box.
    page.locator("#model-box textarea, #model-box input").first.fill("tiny")
    page.locator("#model-box textarea, #model-box input").first.press("Tab")
    open_tab(page, "Playground")
    choose(page, "play-adapter-0", run_id)
    expect(page.locator("#model-box textarea, #model-box input").first).to_have_value(str(checkpoint.resolve()),
                                                                                    timeout=30 * SECOND)
