"""End to end in a real browser: the four tabs as a person uses them, against `python app.py`.

The app runs as a subprocess on a free loopback port with its own empty workspace (and the
session's model cache), and headless Chromium drives it: upload photos (one EXIF-rotated, two
broken), prepare, save; start training with no dataset (an error toast), then with the saved one,
reload mid-run and still see the run, wait for the loss plot; generate base and adapted images
and move the scale slider; run a small evaluation. Screenshots of each tab are written to
docs/screenshots/ on every run (the README shows them).

Two more flows share the app and the browser: every preset picked in the Train tab trains its own
method and values (tiny model, one step); and the README's walkthrough as a newcomer's fresh browser
does it (the demo images, the built-in model, a 6-step run), with reloads that keep the forms and a
check that the idle page stops polling.

Needs Debian's chromium (`shutil.which("chromium")`); never downloads a browser. Without it the
test is skipped, unless STUDIO_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from studio.config import load_run_config

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"
SHOTS = REPO / "docs" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
START_TIMEOUT_S = 90
SECOND = 1000  # Playwright timeouts are in milliseconds


def _chromium() -> str:
    path = shutil.which("chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        reason = "the playwright package is not installed (pip install -r requirements-dev.txt)"
    else:
        if path:
            return path
        reason = "chromium is not installed (apt-get install chromium); the browser test needs it"
    if os.environ.get("STUDIO_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + ", and STUDIO_REQUIRE_BROWSER=1 requires it.")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Four upright photos, one stored sideways with EXIF orientation 6, and two broken files."""
    from PIL import Image, ImageOps

    files = sorted((DREAMBENCH / "bear_plushie").glob("*.jpg"))[:5]
    if len(files) < 5:
        pytest.fail(f"Test photos are missing: expected {DREAMBENCH}/bear_plushie/*.jpg beside the repo checkout.")
    out = tmp_path_factory.mktemp("upload")
    good = []
    for path in files:
        with Image.open(path) as im:
            im.draft("RGB", (256, 256))
            im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((256, 256))
        if len(good) < 4:
            im.save(out / path.name, quality=90)
            good.append(out / path.name)
        else:  # pixels stored rotated; the EXIF tag says "rotate 90° clockwise to view"
            exif = Image.Exif()
            exif[0x0112] = 6
            im.transpose(Image.Transpose.ROTATE_90).save(out / "sideways.jpg", quality=90, exif=exif)
            good.append(out / "sideways.jpg")
            upright = im
    not_image = out / "notes.png"
    not_image.write_text("shopping list: honey, more honey\n", encoding="utf-8")
    truncated = out / "cut-off.jpg"
    truncated.write_bytes(good[0].read_bytes()[:1500])
    return {"good": good, "not_image": not_image, "truncated": truncated, "upright": upright}


@pytest.fixture
def app_url(tmp_path_factory):
    """`python app.py` on a free port with a fresh workspace; killed (its whole group) at the end."""
    _chromium()
    port = _free_port()
    workspace = tmp_path_factory.mktemp("browser-workspace")
    cache = os.environ.get("STUDIO_CACHE") or str(tmp_path_factory.mktemp("studio-cache"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STUDIO_WORKSPACE": str(workspace), "STUDIO_CACHE": cache,
           "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("STUDIO_MODEL", None)
    log_path = workspace.parent / "app.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--host", "127.0.0.1"], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            stop()
            pytest.fail(f"app.py exited with {proc.returncode} before serving:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop()
            pytest.fail(f"app.py did not answer GET / within {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "proc": proc, "workspace": workspace, "log": log_path}
    stop()


@pytest.fixture
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(30 * SECOND)
        page = context.new_page()
        page.goto(app_url["url"])
        page.locator("#dataset-upload").wait_for()
        yield page
        context.close()
        browser.close()


# --- helpers: what a person does --------------------------------------------------------------------------------

def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def choose(page, elem_id: str, value: str) -> None:
    """Open a dropdown and click the option with this exact text."""
    page.locator(f"#{elem_id} input[role=combobox]").click()
    page.locator(f'#{elem_id} [role=option][aria-label="{value}"]').click()


def set_number(page, locator, value) -> None:
    locator.fill(str(value))
    locator.press("Tab")  # a Number sends its value on blur too


def screenshot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)  # let plots and images finish drawing
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def toast_texts(page) -> list[str]:
    return page.locator("[data-testid=toast-text]").all_inner_texts()


def close_toasts(page) -> None:
    for button in page.locator("[data-testid=toast-close]").all():
        button.click()


def _difference(a, b) -> float:
    from PIL import ImageChops, ImageStat

    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean)


# --- the flow -----------------------------------------------------------------------------------------------------

def test_concept_studio_in_a_browser(page, app_url, photos):
    from PIL import Image, ImageOps
    from playwright.sync_api import expect

    started = time.monotonic()
    workspace: Path = app_url["workspace"]

    # A fresh workspace: Start training before any dataset exists is a clear toast, and the app keeps serving.
    open_tab(page, "Train")
    page.locator("#train-start").click()
    expect(page.locator("[data-testid=toast-text]").filter(has_text="Choose a dataset first")).to_be_visible(
        timeout=15 * SECOND)
    close_toasts(page)
    with urllib.request.urlopen(app_url["url"], timeout=5) as resp:
        assert resp.status == 200

    # Dataset: five good photos (one EXIF-rotated) plus a text file named .png and a truncated JPEG.
    open_tab(page, "Dataset")
    uploads = [*photos["good"], photos["not_image"], photos["truncated"]]
    page.locator("#dataset-upload input[type=file]").set_input_files([str(p) for p in uploads])
    expect(page.locator("#dataset-upload tbody tr")).to_have_count(len(uploads), timeout=30 * SECOND)
    class_word = page.locator("#dataset-class-word textarea, #dataset-class-word input").first
    expect(class_word).to_have_value("shape")  # the built-in model's class word, until one types another
    class_word.fill("stuffed animal")
    page.locator("#dataset-prepare").click()
    gallery = page.locator("#dataset-gallery img")
    expect(gallery).to_have_count(5, timeout=30 * SECOND)
    problems = page.locator("#dataset-problems")
    expect(problems).to_contain_text("2 file(s) skipped, 5 kept")
    expect(problems).to_contain_text("'notes.png' is not an image file")
    expect(problems).to_contain_text("'cut-off.jpg' is damaged or truncated")
    expect(page.locator("#dataset-captions")).to_contain_text("sideways.jpg")
    expect(page.locator("#dataset-captions")).to_contain_text("a photo of sks stuffed animal")
    page.locator("#dataset-name input, #dataset-name textarea").first.fill("bear plushie")
    page.locator("#dataset-save").click()
    expect(page.locator("#dataset-saved")).to_contain_text("Saved 5 images", timeout=30 * SECOND)
    expect(page.locator("#dataset-saved")).to_contain_text("as dataset bear-plushie")
    saved = sorted((workspace / "datasets" / "bear-plushie" / "images").glob("*.png"))
    assert len(saved) == 5
    with Image.open(saved[-1]) as im:  # the sideways photo was saved upright
        sideways = im.convert("RGB")
    assert sideways.size == (64, 64)
    upright = ImageOps.fit(photos["upright"], (64, 64))
    assert _difference(sideways, upright) < _difference(sideways, upright.transpose(Image.Transpose.ROTATE_90))
    screenshot(page, "dataset")

    # Train: opening the tab lists the datasets on disk, so the one just saved is offered; a short run starts.
    open_tab(page, "Train")
    dataset_box = page.locator("#train-dataset input[role=combobox]")
    expect(dataset_box).to_have_value("bear-plushie", timeout=15 * SECOND)
    choose(page, "train-preset", "(none)")  # the plain defaults, not the built-in model's demo recipe
    # The preset fills the form (batch 1 instead of the demo's 8) before a person types over it.
    expect(page.locator("#train-batch_size input")).to_have_value("1", timeout=15 * SECOND)
    set_number(page, page.locator("#train-steps input"), 30)
    set_number(page, page.locator("#train-sample_every input"), 15)
    page.locator("#train-start").click()
    run_box = page.locator("#train-run input[role=combobox]")
    expect(run_box).to_have_value(re.compile(r"-lora$"), timeout=30 * SECOND)
    run_id = run_box.input_value()
    status = page.locator("#train-status")
    expect(status).to_contain_text(run_id)

    # A reload while it trains still shows the run: the job lives in the server, not the page. (A second
    # page, so this one stays as it is for the screenshot.)
    other = page.context.new_page()
    other.goto(app_url["url"])
    for reload in (False, True):
        if reload:
            other.reload()
        open_tab(other, "Train")
        expect(other.locator("#train-run input[role=combobox]")).to_have_value(run_id, timeout=15 * SECOND)
        expect(other.locator("#train-status")).to_contain_text(run_id, timeout=15 * SECOND)
        expect(other.locator("#train-status")).to_contain_text(re.compile(r"loading|running|completed", re.IGNORECASE))
    other.close()
    expect(status).to_contain_text("completed: Finished 30 steps.", timeout=240 * SECOND)
    expect(page.locator("#train-loss .js-plotly-plot")).to_be_visible(timeout=15 * SECOND)
    expect(page.locator("#train-loss")).to_contain_text("Training loss")
    expect(page.locator("#train-samples img").first).to_be_visible(timeout=15 * SECOND)
    assert (workspace / "runs" / run_id / "adapter").is_dir()
    screenshot(page, "train")

    # Playground: base and adapted side by side; moving the slider re-renders without reloading weights.
    open_tab(page, "Playground")
    choose(page, "play-adapter-0", run_id)
    expect(page.locator("#play-adapter-0 input[role=combobox]")).to_have_value(run_id)
    set_number(page, page.get_by_label("number input for Steps"), 8)
    page.locator("#play-generate").click()
    timing = page.locator("#play-timing")
    expect(timing).to_contain_text("Base and adapted rendered in", timeout=60 * SECOND)
    expect(page.locator("#play-base img")).to_be_visible()
    expect(page.locator("#play-adapted img")).to_be_visible()
    set_number(page, page.locator("#play-scale-0 input[type=number]"), 0.5)
    expect(timing).to_contain_text("(no reload)", timeout=60 * SECOND)
    expect(page.locator("#play-adapted img")).to_be_visible()
    screenshot(page, "playground")

    # Evaluate: the run against the base model on the saved dataset, kept small.
    page.locator("body").press("Escape")
    open_tab(page, "Evaluate")
    choose(page, "eval-runs", run_id)
    page.locator("#eval-runs input[role=combobox]").press("Escape")
    expect(page.locator("#eval-runs")).to_contain_text(run_id)
    expect(page.locator("#eval-dataset input[role=combobox]")).to_have_value("bear-plushie")
    set_number(page, page.get_by_label("Images per prompt"), 1)
    set_number(page, page.get_by_label("Denoising steps"), 2)
    page.get_by_label("Contexts (one per line)").fill("in a forest")
    page.locator("#eval-start").click()
    eval_status = page.locator("#eval-status")
    expect(eval_status).to_contain_text("of 1 run(s)", timeout=120 * SECOND)
    expect(page.locator("#eval-scatter .js-plotly-plot")).to_be_visible(timeout=15 * SECOND)
    expect(page.locator("#eval-heatmap .js-plotly-plot")).to_be_visible(timeout=15 * SECOND)
    expect(page.locator("#eval-grid img")).to_be_visible(timeout=15 * SECOND)
    table = page.locator("#eval-table")
    expect(table).to_contain_text(run_id, timeout=15 * SECOND)
    expect(table).to_contain_text("clip_t")
    expect(page.locator("#eval-recommendation")).to_contain_text("Recommended:")
    screenshot(page, "evaluate")
    # One click opens the recommended run and scale in the Playground.
    page.locator("#eval-open").click()
    expect(page.locator("#play-adapter-0 input[role=combobox]")).to_have_value(run_id, timeout=15 * SECOND)

    assert app_url["proc"].poll() is None, "the app stopped serving"
    assert not [t for t in toast_texts(page) if "went wrong" in t], toast_texts(page)
    print(f"\nbrowser flow took {time.monotonic() - started:.1f} s")


# --- every preset trains what it says ------------------------------------------------------------------------------

# What this test types after picking a preset, as a user keeping the run small would: the tiny model, two
# steps, (for prior preservation) one class image of one denoising step, and the dataset's 64 px where a
# preset names a resolution. Every other value must be the preset's own.
TYPED = {"steps": 1, "num_class_images": 1, "class_image_steps": 1}


def type_into(page, name: str, value) -> None:
    box = page.locator(f"#train-{name} input")
    if not box.is_visible():  # the setting is under "More options"
        page.get_by_text("More options", exact=True).click()
    set_number(page, box, value)


def wait_for_run(page, workspace: Path, previous: str | None = None) -> str:
    """The run the Start button just began: its id in 'Run shown' and its config.yaml on disk."""
    from playwright.sync_api import expect

    run_box = page.locator("#train-run input[role=combobox]")
    expect(run_box).not_to_have_value(previous or "", timeout=90 * SECOND)  # the first Start imports torch
    expect(page.locator("#train-status")).not_to_contain_text("Not started")
    run_id = run_box.input_value()
    config = workspace / "runs" / run_id / "config.yaml"
    deadline = time.monotonic() + 60
    while not config.exists():
        assert time.monotonic() < deadline, f"{config} was not written within 60 s"
        time.sleep(0.2)
    return run_id


def stop_run(page, run_id: str) -> None:
    """Cancel (config.yaml is what is checked) and wait until the run has ended, so the next can start."""
    from playwright.sync_api import expect

    page.locator("#train-cancel").click()
    expect(page.locator("#train-status")).to_contain_text(
        re.compile(rf"{re.escape(run_id)}.*(cancelled|completed): "), timeout=120 * SECOND)


def same(a, b) -> bool:
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-12 * abs(b))


def test_every_preset_trains_its_own_method(page, app_url, photos):
    import yaml
    from playwright.sync_api import expect

    from studio.config import TrainConfig, build_config, list_presets, load_preset
    from studio.data.dataset import prep_folder

    workspace: Path = app_url["workspace"]
    prep_folder(photos["good"][0].parent, workspace / "datasets" / "preset-check", "sks", "toy", 64)
    context = page.context.browser.new_context(viewport={"width": 1280, "height": 900})  # a browser of its own
    context.set_default_timeout(30 * SECOND)
    page = context.new_page()
    page.goto(app_url["url"])
    open_tab(page, "Train")
    choose(page, "train-dataset", "preset-check")
    method_box = page.locator("#train-method input[role=combobox]")
    # From the plain defaults, so that each preset picked below visibly changes the form (its step count
    # differs from the one typed before it) and the test sees its update arrive before typing.
    choose(page, "train-preset", "(none)")
    expect(page.locator("#train-batch_size input")).to_have_value(str(TrainConfig().batch_size), timeout=30 * SECOND)
    type_into(page, "steps", TYPED["steps"])
    previous = None
    for name in list_presets():
        preset, form = load_preset(name), build_config(name).to_dict()
        choose(page, "train-preset", name)
        # The form shows the preset: its method and its values, before anything is typed.
        expect(method_box).to_have_value(form["method"], timeout=30 * SECOND)  # a busy server answers slowly
        expect(page.locator("#train-steps input")).to_have_value(str(form["steps"]), timeout=30 * SECOND)
        # (Steps were typed as 2 before: once they show the preset's, the whole update has arrived.)
        assert same(float(page.locator("#train-learning_rate input").input_value()), form["learning_rate"])
        page.locator("#model-box textarea, #model-box input").first.fill("tiny")
        typed = dict(TYPED) if form["prior_preservation"] else {"steps": TYPED["steps"]}
        if form["resolution"]:  # a preset for real models' 512 px: the 64-px dataset's own size instead
            typed["resolution"] = 64
        for key, value in typed.items():
            type_into(page, key, value)
        page.locator("#train-start").click()
        run_id = wait_for_run(page, workspace, previous)
        assert run_id.endswith(form["method"]), run_id
        config = load_run_config(workspace / "runs" / run_id / "config.yaml")
        assert config["method"] == form["method"], (name, config["method"])
        assert config["model"] == "tiny" and config["dataset"].endswith("preset-check")
        for key, value in {**preset, **typed}.items():
            if key != "model":
                assert same(config[key], typed.get(key, value)), (name, key, config[key], value)
        stop_run(page, run_id)
        previous = run_id

    # The user's edit after a preset wins over it: DreamBooth's prior preservation and rate, but a LoRA.
    choose(page, "train-preset", "dreambooth")
    expect(method_box).to_have_value("full")
    choose(page, "train-method", "lora")
    for key, value in TYPED.items():
        type_into(page, key, value)
    page.locator("#train-start").click()
    run_id = wait_for_run(page, workspace, previous)
    config = load_run_config(workspace / "runs" / run_id / "config.yaml")
    dreambooth = load_preset("dreambooth")
    assert config["method"] == "lora" and config["prior_preservation"] is True
    assert same(config["learning_rate"], dreambooth["learning_rate"])
    stop_run(page, run_id)
    context.close()


def test_the_train_tab_shows_the_chosen_methods_settings_and_trains_them(page, app_url, photos):
    """Each method's own settings show while it is chosen and no others; what is typed into them is what the
    run trains with (config.yaml on disk), and no other method's setting reaches the run."""
    from playwright.sync_api import expect

    from studio import adapters
    from studio.data.dataset import prep_folder
    from studio.ui.train_tab import METHOD

    workspace: Path = app_url["workspace"]
    prep_folder(photos["good"][0].parent, workspace / "datasets" / "method-check", "sks", "toy", 64)
    context = page.context.browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30 * SECOND)
    page = context.new_page()
    page.goto(app_url["url"])
    open_tab(page, "Train")
    choose(page, "train-dataset", "method-check")
    choose(page, "train-preset", "(none)")
    page.locator("#model-box textarea, #model-box input").first.fill("tiny")
    for method in ("lora", "lokr", "oft", "embedding", "full"):
        choose(page, "train-method", method)
        own = set(adapters.get(method).setting_names())
        for name in METHOD:
            control = page.locator(f"#train-{name}")
            if name in own:
                expect(control).to_be_visible()
            else:
                expect(control).to_be_hidden()
    typed = {"oft": {"oft_block_size": 16}, "lokr": {"lokr_factor": 4, "rank": 2}, "embedding": {}}
    previous = None
    for method, values in typed.items():
        choose(page, "train-method", method)
        type_into(page, "steps", 1)
        for name, value in values.items():
            type_into(page, name, value)
        if method == "embedding":
            box = page.locator("#train-initializer_token textarea, #train-initializer_token input").first
            box.fill("toy")
            box.press("Tab")
            values = {"initializer_token": "toy"}
        page.locator("#train-start").click()
        run_id = wait_for_run(page, workspace, previous)
        config = load_run_config(workspace / "runs" / run_id / "config.yaml")
        assert config["method"] == method
        for name, value in values.items():
            assert config[name] == value, (method, name, config[name])
        assert not set(config) & (set(METHOD) - set(adapters.get(method).setting_names())), (method, sorted(config))
        stop_run(page, run_id)
        previous = run_id
    context.close()


# --- the README's walkthrough, in the UI ---------------------------------------------------------------------------

DEMO = REPO / "assets" / "demo-concept"
WALKTHROUGH_STEPS = 6  # typed into the form instead of the README's count, to keep the test short


def readme_walkthrough() -> dict:
    """What the README's walkthrough says to do: its train recipe, generate prompts and guidance, evaluate contexts."""
    import shlex

    from studio.config import coerce, load_preset

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Walkthrough"):]
    section = section[:section.index("\n## ")]
    commands = [shlex.split(c.replace("\\\n", " ")) for c in re.findall(r"python -m studio ((?:\\\n|[^\n])+)", section)]
    train = next(c for c in commands if c[0] == "train")
    recipe = {}
    if "--preset" in train:
        recipe |= load_preset(train[train.index("--preset") + 1])
    for flag, key in (("--method", "method"), ("--steps", "steps")):
        if flag in train:
            recipe[key] = coerce(key, train[train.index(flag) + 1])
    for i, word in enumerate(train):
        if word == "--set":
            key, value = train[i + 1].split("=", 1)
            recipe[key] = coerce(key, value)
    generate = next(c for c in commands if c[0] == "generate")
    evaluate = next(c for c in commands if c[0] == "evaluate")
    prep = next(c for c in commands if c[0] == "prep")
    return dict(recipe=recipe, prompt=generate[generate.index("--prompt") + 1],
                guidance=float(generate[generate.index("--guidance") + 1]) if "--guidance" in generate else 7.5,
                contexts=[evaluate[i + 1] for i, w in enumerate(evaluate) if w == "--context"],
                eval_guidance=float(evaluate[evaluate.index("--guidance") + 1]) if "--guidance" in evaluate else None,
                token=prep[prep.index("--token") + 1], class_word=prep[prep.index("--class-word") + 1],
                text=section)


def image_of(page, elem_id: str):
    """The picture an image component shows, fetched as the browser has it."""
    import io

    from PIL import Image

    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    if not src.startswith("data:"):
        src = urllib.parse.urljoin(page.url, src)
    body = page.request.get(src).body() if not src.startswith("data:") else None
    if body is None:
        import base64

        body = base64.b64decode(src.split(",", 1)[1])
    return Image.open(io.BytesIO(body)).convert("RGB")


def idle_requests(page, seconds: float, settle: float = 2.0) -> list[str]:
    """Requests the page sends to the server in `seconds` while nobody touches it, after `settle` seconds in which
    a tick already on its way when the run finished (one join and one data request) may still arrive."""
    page.wait_for_timeout(settle * SECOND)
    sent = []
    listener = lambda request: sent.append(request.url) if "/gradio_api/" in request.url else None  # noqa: E731
    page.on("request", listener)
    page.wait_for_timeout(seconds * SECOND)
    page.remove_listener("request", listener)
    return sent


def test_readme_walkthrough_in_the_ui(page, app_url):
    """'The same steps work in the UI: Dataset (upload the six images, token sks, class shape), Train, Playground,
    Evaluate': a newcomer's fresh browser, the README's settings, a shorter run."""
    import pandas as pd
    import yaml
    from playwright.sync_api import expect

    from studio.config import build_config, list_presets
    from studio.events import read_events

    readme = readme_walkthrough()
    assert "The same steps work in the UI" in readme["text"]
    workspace: Path = app_url["workspace"]
    context = page.context.browser.new_context(viewport={"width": 1280, "height": 900})  # nothing kept from before
    context.set_default_timeout(30 * SECOND)
    page = context.new_page()
    page.goto(app_url["url"])

    # Dataset: the six images; the trigger word and class word the built-in model needs are already there.
    page.locator("#dataset-upload input[type=file]").set_input_files([str(p) for p in sorted(DEMO.glob("*.png"))])
    expect(page.locator("#dataset-upload tbody tr")).to_have_count(6, timeout=30 * SECOND)
    expect(page.locator("#dataset-token textarea, #dataset-token input").first).to_have_value(readme["token"])
    expect(page.locator("#dataset-class-word textarea, #dataset-class-word input").first).to_have_value(
        readme["class_word"])
    page.locator("#dataset-prepare").click()
    expect(page.locator("#dataset-gallery img")).to_have_count(6, timeout=30 * SECOND)
    page.locator("#dataset-name input, #dataset-name textarea").first.fill("crescent")
    page.locator("#dataset-save").click()
    expect(page.locator("#dataset-saved")).to_contain_text("Saved 6 images", timeout=30 * SECOND)
    expect(page.locator("#dataset-saved")).not_to_contain_text("Warning")
    captions = sorted((workspace / "datasets" / "crescent" / "images").glob("*.txt"))
    assert [c.read_text() for c in captions] == [f"a photo of {readme['token']} {readme['class_word']}"] * 6

    # Train: the built-in model starts from the walkthrough's recipe; only the step count is typed.
    open_tab(page, "Train")
    choose(page, "train-dataset", "crescent")  # the README: "choose crescent"
    recipe = readme["recipe"]
    assert "demo" in list_presets(), "presets/demo.yaml (the walkthrough's recipe) is missing"
    expect(page.locator("#train-preset input[role=combobox]")).to_have_value("demo")
    demo = build_config("demo").to_dict()
    expect(page.locator("#train-method input[role=combobox]")).to_have_value(demo["method"])
    expect(page.locator("#train-batch_size input")).to_have_value(str(demo["batch_size"]))
    type_into(page, "steps", WALKTHROUGH_STEPS)
    # Before Start, the page says what it knows of the time: nothing was timed here yet.
    plan = page.locator("#train-plan")
    expect(plan).to_contain_text(f"{WALKTHROUGH_STEPS} steps. No run at these settings was timed on this machine")
    shown_before = page.locator("#train-run input[role=combobox]").input_value()
    page.locator("#train-start").click()
    run_id = wait_for_run(page, workspace, shown_before)
    run = workspace / "runs" / run_id
    config = load_run_config(run / "config.yaml")
    assert config["model"] == "builtin" and config["steps"] == WALKTHROUGH_STEPS
    resolved = ("model", "dataset", "steps", "resolution")  # the run writes these resolved, or typed them
    assert {k: v for k, v in config.items() if k not in resolved} == {
        k: v for k, v in demo.items() if k not in resolved}
    # What the README's train command sets, the UI run has too (checked at the end, after the whole walk).
    differs = {k: (config[k], v) for k, v in recipe.items() if k != "steps" and not same(config[k], v)}

    # A reload while it trains keeps the form as typed, and the run.
    page.reload()
    open_tab(page, "Train")
    expect(page.locator("#train-run input[role=combobox]")).to_have_value(run_id, timeout=15 * SECOND)
    expect(page.locator("#train-steps input")).to_have_value(str(WALKTHROUGH_STEPS))
    expect(page.locator("#train-dataset input[role=combobox]")).to_have_value("crescent")
    status = page.locator("#train-status")
    expect(status).to_contain_text(f"completed: Finished {WALKTHROUGH_STEPS} steps.", timeout=240 * SECOND)
    assert (run / "adapter").is_dir() and list((run / "samples").glob("*.png"))
    # The next Start at these settings is forecast from this run's probe.
    probe = next(e for e in read_events(run / "events.jsonl") if e.kind == "estimate")
    expect(plan).to_contain_text(f"{WALKTHROUGH_STEPS} steps at {probe.unit_s:.2f} s a step, as run '{run_id}' at "
                                 "these settings measured it", timeout=15 * SECOND)
    # Idle, the page stops asking the server for news.
    assert not (sent := idle_requests(page, 4)), sent

    # Playground: the README's prompt and guidance; the LoRA changes the picture.
    open_tab(page, "Playground")
    choose(page, "play-adapter-0", run_id)
    prompt_box = page.locator("#play-prompt textarea, #play-prompt input").first
    # Picking the run puts its own words in the prompt; a person sees that before writing their own.
    expect(prompt_box).to_have_value(f"a photo of {readme['token']} {readme['class_word']}", timeout=15 * SECOND)
    prompt_box.fill(readme["prompt"])
    set_number(page, page.get_by_label("number input for Guidance"), readme["guidance"])
    page.locator("#play-generate").click()
    expect(page.locator("#play-timing")).to_contain_text("rendered in", timeout=90 * SECOND)
    base, adapted = image_of(page, "play-base"), image_of(page, "play-adapted")
    assert base.size == adapted.size
    assert _difference(base, adapted) > 1.0, "the LoRA did not change the picture"
    # Typing a scale re-renders; a reload brings back the adapter, its scale and the prompt.
    scale_box = page.locator("#play-scale-0 input[type=number]")
    set_number(page, scale_box, 0.7)
    deadline = time.monotonic() + 90
    while _difference(image_of(page, "play-adapted"), adapted) < 0.1:
        assert time.monotonic() < deadline, "typing scale 0.7 did not redraw the picture"
        page.wait_for_timeout(500)
    page.reload()
    open_tab(page, "Playground")
    expect(page.locator("#play-adapter-0 input[role=combobox]")).to_have_value(run_id, timeout=15 * SECOND)
    expect(page.locator("#play-scale-0 input[type=number]")).to_have_value("0.7")
    expect(page.locator("#play-prompt textarea, #play-prompt input").first).to_have_value(readme["prompt"])

    # Evaluate: the README's contexts and CLIP are the defaults; fewer images are typed.
    page.locator("body").press("Escape")
    open_tab(page, "Evaluate")
    contexts = page.get_by_label("Contexts (one per line)")
    if any(workspace.joinpath("evals").glob("*")):
        # This app's other tests evaluated first, and a fresh page shows the settings of the evaluation on
        # display; a newcomer's first page has none, and then the README's contexts are the defaults.
        contexts.fill("\n".join(readme["contexts"]))
        set_number(page, page.locator("#eval-guidance input"), readme["eval_guidance"] or readme["guidance"])
    expect(contexts).to_have_value("\n".join(readme["contexts"]))
    expect(page.get_by_label("CLIP model")).to_have_value("builtin")
    choose(page, "eval-runs", run_id)
    page.locator("#eval-runs input[role=combobox]").press("Escape")
    choose(page, "eval-dataset", "crescent")
    set_number(page, page.get_by_label("Images per prompt"), 1)
    set_number(page, page.get_by_label("Denoising steps"), 4)
    # as many prompts of each kind as there are contexts, so both contexts are drawn
    set_number(page, page.get_by_label("Prompts per kind (0: all)"), len(readme["contexts"]))
    before = set(workspace.joinpath("evals").glob("*")) if workspace.joinpath("evals").is_dir() else set()
    eval_plan = page.locator("#eval-plan")
    expect(eval_plan).to_contain_text(re.compile(r"\d+ images \(\d+ points × \d+ prompts × 1 seeds\)"))
    # The plan follows each typed value as its update arrives: read it once it has stopped changing.
    told, steady_since = eval_plan.inner_text(), time.monotonic()
    while time.monotonic() - steady_since < 2.0:
        page.wait_for_timeout(250)
        if (now := eval_plan.inner_text()) != told:
            told, steady_since = now, time.monotonic()
    told_images = int(re.search(r"(\d+) images", told)[1])
    page.locator("#eval-start").click()
    eval_status = page.locator("#eval-status")
    # The status line may still show an earlier evaluation's result: wait for this one's folder to finish.
    deadline = time.monotonic() + 180
    while not [f for f in set(workspace.joinpath("evals").glob("*")) - before if (f / "summary.csv").is_file()]:
        assert time.monotonic() < deadline, "the evaluation did not finish within 180 s"
        page.wait_for_timeout(500)
    expect(eval_status).to_contain_text("of 1 run(s)", timeout=30 * SECOND)
    (folder,) = set(workspace.joinpath("evals").glob("*")) - before
    images = pd.read_csv(folder / "results.csv")
    drawn = sum(1 for e in read_events(folder / "events.jsonl") if e.kind == "progress" and e.total)
    assert drawn == told_images, "the count said before Start is what was drawn"
    for context_words in readme["contexts"]:
        assert images["prompt"].str.contains(context_words, regex=False).any(), context_words
    summary = pd.read_csv(folder / "summary.csv").set_index("point")
    for point in ("base model", next(p for p in summary.index if p.startswith(run_id))):
        assert pd.notna(summary.loc[point, "image_similarity"]) and pd.notna(summary.loc[point, "prompt_similarity"])
    settings = yaml.safe_load((folder / "evaluation.yaml").read_text())["config"]
    # The built-in model's guidance: the evaluate command's, or else the one its generate commands use.
    assert settings["guidance"] == (readme["eval_guidance"] or readme["guidance"])
    assert settings["seeds"] == 1 and settings["steps"] == 4
    expect(page.locator("#eval-table")).to_contain_text(run_id, timeout=15 * SECOND)
    # The next evaluation at these settings is forecast from this one's probe.
    expect(eval_plan).to_contain_text(f"as evaluation '{folder.name}' measured it", timeout=15 * SECOND)

    # A reload keeps the evaluation's settings beside its results.
    page.reload()
    open_tab(page, "Evaluate")
    expect(page.get_by_label("Images per prompt")).to_have_value("1", timeout=15 * SECOND)
    expect(page.get_by_label("Denoising steps")).to_have_value("4")
    expect(page.locator("#eval-runs")).to_contain_text(run_id)
    expect(page.locator("#eval-table")).to_contain_text(run_id, timeout=15 * SECOND)
    context.close()
    assert not differs, f"the demo preset and the README's train command disagree (UI run, README): {differs}"
