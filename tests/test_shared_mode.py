"""A shared studio against a second session that tries to reach the first one's files: links grant one
file and name no token, paths and models outside a session's own workspace are refused with one
sentence whether they exist or not, bare requests without a session are refused, uploads are limited.
Two `gradio_client` sessions on loopback; every wait is bounded."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from studio.errors import StudioError
from studio.paths import Workspace
from studio.ui.context import SESSION_TOKEN, Studio

TIMEOUT_S = 30  # any one HTTP call


def _status(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app in shared mode on loopback with the options `launch` gives it (uploads limited to 1 MB
    here), launched once for this file; each test's clients are new sessions."""
    from studio import limits
    from studio.ui import build_app, launch_options

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(limits, "MAX_UPLOAD_MB", 1)
        studio = Studio(Workspace(tmp_path_factory.mktemp("shared") / "ws"), "tiny", shared=True)
        app = build_app(studio)
        app.queue(default_concurrency_limit=4)
        _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                               **launch_options(studio))
    yield studio, app, url.rstrip("/")
    studio.manager.wait(timeout=240)
    app.close()


def _client(url, download=True):
    from gradio_client import Client

    return Client(url, verbose=False, **({} if download else {"download_files": False}))


def _workspace_of(studio, client) -> Workspace:
    return Workspace(studio.home.root / "sessions" / f"s-{client.session_hash}")


def test_links_grant_one_file_and_name_no_token(served, dataset_dir):
    studio, app, url = served
    alice = _client(url, download=False)
    ws = _workspace_of(studio, alice)
    shutil.copytree(dataset_dir, ws.dataset("bear").root)
    assert alice.predict(api_name="/workspace_lists")["datasets"] == ["bear"]

    link = alice.predict("a photo of a toy", "", 1.0, 0, 2, api_name="/render")
    served_path = link["path"] if isinstance(link, dict) else link.path
    assert alice.session_hash not in served_path and "sessions" not in served_path
    code, body = _status(f"{url}/gradio_api/file={served_path}")  # anyone with the link gets that file
    assert code == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    original = next((ws.root / "renders").glob("*.png"))
    assert original.read_bytes() == body

    # ... and nothing else: not the render in the workspace, not the dataset, not the photos, not a folder
    for target in (original, ws.dataset("bear").meta, next(ws.dataset("bear").images.glob("*.png")),
                   ws.root, studio.home.root / "sessions"):
        code, _ = _status(f"{url}/gradio_api/file={target}")
        assert code in (403, 404), (target, code)

    bob = _client(url)  # a second session downloads its own render; its file lies outside every workspace
    path = bob.predict("a photo of a toy", "", 1.0, 1, 2, api_name="/render")
    assert str(path).endswith(".png") and not str(path).startswith(str(studio.home.root))


def test_a_session_cannot_name_another_sessions_paths_or_probe_the_disk(served, dataset_dir, no_request):
    from gradio_client.exceptions import AppError

    studio, app, url = served
    alice, bob = _client(url), _client(url)
    theirs = _workspace_of(studio, alice).dataset("bear").root
    shutil.copytree(dataset_dir, theirs)
    shutil.copytree(dataset_dir, _workspace_of(studio, bob).dataset("mine").root)
    assert bob.predict(api_name="/workspace_lists")["datasets"] == ["mine"]

    answers = {}
    for model in ("/etc/passwd", "/etc/no-such-file", str(theirs), "../" + alice.session_hash, "../../../etc"):
        with pytest.raises(AppError) as caught:
            bob.predict("mine", "lora", 2, model, api_name="/train")
        answers[model] = str(caught.value).replace(model, "<name>")
    assert len(set(answers.values())) == 1, answers  # one sentence, whether the path exists or not
    assert "shared studio" in next(iter(answers.values()))
    assert bob.predict(api_name="/job_status")["status"] == "none"  # nothing started

    # the same rules in the Train tab's own path check, with the session's request in place
    _as(studio, bob.session_hash)
    sentences = set()
    for text in (str(theirs), "/etc/shadow", "/no/such/folder", "../../x", str(theirs / "images")):
        for check in (lambda t: studio.dataset_folder(t), lambda t: studio.user_folder(t, "the class image folder"),
                      lambda t: studio.confine({"class_data_dir": t})):
            with pytest.raises(StudioError) as caught:
                check(text)
            sentences.add(str(caught.value).replace(text, "<path>"))
    assert len(sentences) == 2  # one for datasets, one for class folders: never "exists" against "missing"
    from studio.ui import dataset_tab  # the Dataset tab's model fields: detector, outlier check, captioner

    photo = next(dataset_dir.glob("images/*.png"))
    said = set()
    for text in ("/etc/passwd", "/no/such/model", str(theirs)):
        for field in ("detector", "audit_model"):
            with pytest.raises(StudioError) as caught:
                dataset_tab._prepare([str(photo)], "sks", "toy", "a photo of {token} {class}", 64,
                                     **{field: text}, progress=lambda *a, **k: None, studio=studio)
            said.add(str(caught.value).replace(text, "<name>"))
        with pytest.raises(StudioError) as caught:
            dataset_tab._run_captioner([object()], None, text, "caption", "", "sks", "toy",
                                       progress=lambda *a, **k: None, studio=studio)
        said.add(str(caught.value).replace(text, "<name>"))
    assert len(said) == 3, said  # one sentence per field, the same for every path
    own = _workspace_of(studio, bob)
    assert studio.dataset_folder("mine") == own.dataset("mine").root
    assert studio.dataset_folder(str(own.dataset("mine").root)) == own.dataset("mine").root.resolve()
    assert studio.user_model("builtin") == "builtin"
    assert studio.user_model("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_the_host_list_allows_a_model_outside_the_workspace(tmp_path, monkeypatch, no_request):
    studio = Studio(Workspace(tmp_path / "ws"), "tiny", shared=True)
    model = tmp_path / "models" / "sd15.safetensors"
    _as(studio, "page")
    with pytest.raises(StudioError, match="STUDIO_ALLOWED_MODELS"):
        studio.user_model(str(model))
    monkeypatch.setenv("STUDIO_ALLOWED_MODELS", f"{model}, other/model")
    assert studio.user_model(str(model)) == str(model)
    single = Studio(Workspace(tmp_path / "solo"), "tiny")  # one person's own machine: any path they name
    assert single.user_model("/anywhere/model") == "/anywhere/model"
    assert single.dataset_folder("/anywhere/data") == type(tmp_path)("/anywhere/data")


def test_files_shown_from_a_workspace_elsewhere_are_copies_gradio_may_serve(tmp_path, monkeypatch, no_request):
    """A workspace outside the working directory and the temp folder (a Space's /data, say): Gradio may
    copy into its cache only from those two, so the studio hands it a copy in the temp folder."""
    import tempfile

    (tmp_path / "cwd").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    studio = Studio(Workspace(tmp_path / "data" / "ws"), "tiny", shared=True)
    _as(studio, "page")
    sample = studio.workspace.run("r").samples / "step-000001-0.png"
    sample.parent.mkdir(parents=True)
    sample.write_bytes(b"\x89PNG sample")
    shown = type(tmp_path)(studio.servable(sample))
    assert shown.read_bytes() == sample.read_bytes() and tmp_path / "tmp" in shown.parents
    assert "sessions" not in str(shown) and shown.name == sample.name
    assert studio.servable(sample) == str(shown)  # one copy per version of the file
    from studio import limits
    from studio.ui import context

    old = shown.parent
    os.utime(old, (0, 0))  # a copy older than Gradio keeps its own files
    monkeypatch.setitem(context._pruned, "at", 0.0)
    sample.write_bytes(b"\x89PNG a newer sample")  # a new version: a new copy, and the old one goes
    newer = type(tmp_path)(studio.servable(sample))
    assert newer.read_bytes() == sample.read_bytes() and not old.exists() and limits.UPLOAD_KEEP_S > 0
    single = Studio(Workspace(tmp_path / "data" / "solo"), "tiny")
    assert single.servable(sample) == str(sample)  # a single-user studio serves its workspace as it is


def test_requests_without_a_session_are_refused(served):
    studio, app, url = served
    for api_name in ("workspace_lists", "job_status", "train"):
        body = json.dumps({"data": ["x", "lora", 2, ""] if api_name == "train" else []}).encode()
        code, answer = _status(f"{url}/gradio_api/run/{api_name}", body, {"Content-Type": "application/json"})
        assert code >= 400 and b"needs its own session" in answer, (api_name, code, answer[:200])
    assert not (studio.home.root / "sessions" / "none").exists()


def test_a_token_must_match_in_full(tmp_path, no_request):
    studio = Studio(Workspace(tmp_path), "tiny", shared=True)
    _as(studio, "page")
    good = "0123456789abcdef" * 2
    assert studio.bind(good) == good
    for hostile in (good + "\n", good.upper(), good[:-1], good + "0", 12345, None, [good]):
        token = studio.bind(hostile)
        assert token != hostile and SESSION_TOKEN.fullmatch(token)
        assert studio.workspace.root.parent == tmp_path / "sessions" and "\n" not in str(studio.workspace.root)


def test_uploads_over_the_limit_are_refused_in_one_sentence(served, tmp_path):
    studio, app, url = served
    assert app.delete_cache is not None and all(app.delete_cache)  # Gradio's temp files are cleaned up
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * 1024 * 1024))  # 2 MB against the 1 MB limit here
    boundary = "studio-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"huge.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    code, answer = _status(f"{url}/gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert code == 413 and b"maximum allowed size" in answer and answer.count(b"\n") <= 1


def test_render_settings_out_of_range_are_one_sentence(served):
    from gradio_client.exceptions import AppError

    studio, app, url = served
    carol = _client(url)
    for steps, seed, what in ((0, 0, "Denoising steps"), (-1, 0, "Denoising steps"), (10**6, 0, "Denoising steps"),
                              (2, 2**64, "The seed"), (2, -1, "The seed")):
        with pytest.raises(AppError) as caught:
            carol.predict("a photo", "", 1.0, seed, steps, api_name="/render")
        message = str(caught.value)
        assert what in message and "from" in message and "Something went wrong" not in message, message
    assert not (_workspace_of(studio, carol).root / "renders").exists()  # refused before anything was drawn


def test_api_runs_checkpoint_by_time(served, dataset_dir):
    studio, app, url = served
    dave = _client(url)
    shutil.copytree(dataset_dir, _workspace_of(studio, dave).dataset("bear").root)
    run_id = dave.predict("bear", "lora", 1, "", api_name="/train")
    studio.manager.wait(timeout=240)
    from studio.config import load_run_config

    config = load_run_config(_workspace_of(studio, dave).run(run_id).config)
    assert config["checkpoint_minutes"] > 0 and config["checkpoint_minutes"] <= 10


# ----------------------------------------------------------------------------- helpers

def _as(studio: Studio, session_hash: str) -> None:
    """Run the following lines as if Gradio were serving this session's request."""
    from gradio.context import LocalContext

    LocalContext.request.set(SimpleNamespace(session_hash=session_hash))


@pytest.fixture
def no_request():
    from gradio.context import LocalContext

    yield
    LocalContext.request.set(None)
