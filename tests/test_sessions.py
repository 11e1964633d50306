"""A shared studio: each browser session (and each API client) has its own workspace and jobs; several
clients at once on loopback interleave training, rendering and evaluation without errors, and a job
beyond the accelerator waits its turn with a visible position."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from studio.paths import Workspace
from studio.ui.context import Studio

LIMIT_S = 240  # every wait below is bounded by this


def _as_request(session_hash: str):
    """Run the following lines as if Gradio were serving this session's request."""
    from gradio.context import LocalContext

    LocalContext.request.set(SimpleNamespace(session_hash=session_hash))


@pytest.fixture
def no_request():
    from gradio.context import LocalContext

    yield
    LocalContext.request.set(None)


def test_two_sessions_never_see_each_others_files(tmp_path, dataset_dir, no_request):
    studio = Studio(Workspace(tmp_path), "tiny", shared=True)
    _as_request("page-a")
    token_a = studio.bind(None)
    shutil.copytree(dataset_dir, studio.workspace.dataset("bear").root)
    _as_request("page-b")
    token_b = studio.bind("not-a-token")  # malformed tokens are replaced, never used as a path
    assert token_a != token_b and len(token_b) == 32
    assert studio.workspace.list_datasets() == []
    _as_request("page-a2")  # page A refreshed: a new Gradio session, the same browser token
    studio.bind(token_a)
    assert studio.workspace.list_datasets() == ["bear"]
    assert studio.workspace.root == tmp_path / "sessions" / token_a
    from gradio.context import LocalContext

    LocalContext.request.set(None)  # building the page: no session, an empty workspace
    assert studio.workspace.list_datasets() == []
    single = Studio(Workspace(tmp_path / "solo"), "tiny")
    assert single.workspace.root == tmp_path / "solo" and single.session is None


def test_the_token_cannot_name_a_path(tmp_path, no_request):
    studio = Studio(Workspace(tmp_path), "tiny", shared=True)
    _as_request("page")
    for hostile in ("../../etc", "/tmp/x", "a" * 31 + "/", "0" * 32 + "\x00"):
        token = studio.bind(hostile)
        assert token != hostile and studio.workspace.root.parent == tmp_path / "sessions"


# ----------------------------------------------------------------------------- live, several clients

@pytest.fixture
def served(tmp_path):
    """The app in shared mode on loopback, launched as `python app.py --share` would (without the tunnel)."""
    from studio.ui import build_app, launch_options

    studio = Studio(Workspace(tmp_path / "ws"), "tiny", shared=True)
    app = build_app(studio)
    app.queue(default_concurrency_limit=4)
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                           **launch_options(studio))
    yield studio, url
    studio.manager.cancel(None)
    app.close()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _wait_for(client, done, what: str) -> dict:
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        status = client.predict(api_name="/job_status")
        if done(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen in {LIMIT_S} s")


def test_clients_interleave_training_rendering_and_evaluation(served, dataset_dir):
    from gradio_client.exceptions import AppError

    studio, url = served
    alice, bob, carol = _client(url), _client(url), _client(url)
    for client, name in ((alice, "bear"), (bob, "bear-b")):
        folder = studio.home.root / "sessions" / f"s-{client.session_hash}" / "datasets" / name
        shutil.copytree(dataset_dir, folder)
    assert alice.predict(api_name="/workspace_lists")["datasets"] == ["bear"]
    assert bob.predict(api_name="/workspace_lists")["datasets"] == ["bear-b"]
    assert carol.predict(api_name="/workspace_lists") == {"datasets": [], "runs": []}

    run_a = alice.predict("bear", "lora", 12, "", api_name="/train")
    run_b = bob.predict("bear-b", "lora", 4, "", api_name="/train")  # the accelerator is busy: it waits
    status_b = bob.predict(api_name="/job_status")
    assert status_b["label"] == run_b and status_b["status"] in ("queued", "running", "completed")
    if status_b["status"] == "queued":
        assert status_b["position"] == 1
    with pytest.raises(AppError, match="already running|waiting for the accelerator"):
        alice.predict("bear", "lora", 3, "", api_name="/train")  # one job per session

    with ThreadPoolExecutor(3) as pool:  # renders while the training jobs run
        renders = list(pool.map(lambda seed: carol.predict("a photo of a toy", "", 1.0, seed, 2, api_name="/render"),
                                range(3)))
    assert len(renders) == 3 and all(str(r).endswith(".png") for r in renders)
    with pytest.raises(AppError, match="No trained adapter found"):
        carol.predict("a photo", run_a, 1.0, 0, 2, api_name="/render")  # alice's run is not carol's

    assert _wait_for(alice, lambda s: s["status"] != "running" and s["status"] != "queued", "alice's run")["status"] == "completed"
    assert _wait_for(bob, lambda s: s["status"] not in ("running", "queued"), "bob's run")["status"] == "completed"
    assert alice.predict(api_name="/workspace_lists")["runs"] == [run_a]
    assert bob.predict(api_name="/workspace_lists")["runs"] == [run_b]

    alice.predict("bear", [run_a], 1, 2, api_name="/evaluate_runs")
    with pytest.raises(AppError, match="dataset"):
        carol.predict("bear", [], 1, 2, api_name="/evaluate_runs")  # carol has no dataset: one sentence
    image = carol.predict("a photo of a toy", "", 1.0, 5, 2, api_name="/render")  # while alice evaluates
    assert str(image).endswith(".png")
    final = _wait_for(alice, lambda s: s["kind"] == "evaluate" and s["status"] not in ("running", "queued"), "evaluation")
    assert final["status"] == "completed", final["message"]


def test_files_are_served_only_from_the_workspace(served):
    _, url = served
    for path in ("/etc/passwd", "../../etc/passwd"):
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/gradio_api/file={path}", timeout=10) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status in (403, 404), (path, status)
