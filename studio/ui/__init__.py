"""The Gradio app: one module per tab, combined here. No ML logic lives in studio.ui."""

from __future__ import annotations

import logging
import os

import gradio as gr

from studio import limits
from studio.paths import Workspace
from studio.ui import api, dataset_tab, evaluate_tab, playground_tab, train_tab
from studio.ui.context import Studio

TITLE = "Concept Studio"


def make_studio(workspace: Workspace | None = None, shared: bool | None = None) -> Studio:
    """The studio of this process. Shared (one workspace per browser) when asked, when the app is
    shared with a public link, on a Hugging Face Space (SPACE_ID is set), or with STUDIO_SESSIONS=1."""
    from studio import models

    ref_name, notice = os.environ.get("STUDIO_MODEL", ""), None
    if not ref_name:
        ref_name = models.DEFAULT_HUB_MODEL if models.hub_reachable() else models.BUILTIN
        if ref_name == models.BUILTIN:
            notice = "The model hub cannot be reached, so the studio uses the built-in model."
    if shared is None:
        shared = bool(os.environ.get("SPACE_ID")) or os.environ.get("STUDIO_SESSIONS", "") not in ("", "0")
    return Studio(workspace or Workspace.default(), ref_name, notice, shared=shared)


def build_app(studio: Studio | None = None) -> gr.Blocks:
    studio = studio or make_studio()
    # The built-in pocket model and the tiny test model draw 64-px images and have a CLIP of the same name.
    builtin = studio.default_model in ("builtin", "tiny")
    # Gradio's temporary files (uploads, images shown) are deleted once they are a few hours old.
    with gr.Blocks(title=TITLE, delete_cache=(limits.CLEAN_EVERY_S, limits.UPLOAD_KEEP_S)) as app:
        gr.Markdown(f"# {TITLE}\nTeach Stable Diffusion your concept from a few photos, then see how well it worked.")
        with gr.Row():
            model_box = gr.Textbox(value=studio.default_model, label="Base model", scale=3, elem_id="model-box",
                                   info="a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, "
                                        "a local diffusers folder, a .safetensors checkpoint file (SD 1.x, 2.x "
                                        "or SDXL), or 'builtin' (the pocket model: 64-px shapes)")
            gr.Markdown(studio.model_notice or "")
        with gr.Tabs() as tabs:
            with gr.Tab("Dataset", id="dataset"):
                dataset_tab.build(studio, 64 if builtin else 512)
            with gr.Tab("Train", id="train") as train_page:
                train = train_tab.build(studio, model_box)
            with gr.Tab("Playground", id="playground") as play_page:
                play = playground_tab.build(studio, model_box)
            with gr.Tab("Evaluate", id="evaluate") as eval_page:
                ev = evaluate_tab.build(studio, model_box, studio.default_model if builtin else "")
        # Opening a tab lists what is on disk now: a dataset saved or a run started a moment ago is offered.
        train_page.select(lambda cur, stored: _datasets_update(studio, cur, stored), [train["dataset"], train["saved"]],
                          [train["dataset"]], show_progress="hidden")
        play_page.select(lambda rows: playground_tab.adapter_options(studio, [r["value"] for r in rows]),
                         [play["rows"]], [play["options"]], show_progress="hidden")
        eval_page.select(lambda cur: (gr.update(choices=studio.workspace.list_runs()), _datasets_update(studio, cur)),
                         [ev["dataset"]], [ev["runs"], ev["dataset"]], show_progress="hidden")
        # The evaluation's recommendation, one click away: its run (or checkpoint) and scale as the adapter,
        # and the prompt in the run's own words.
        ev["open"].click(lambda rec, text, auto: _open_recommendation(studio, rec, text, auto),
                         [ev["best"], play["prompt"], play["auto"]],
                         [tabs, play["rows"], play["options"], play["prompt"], play["auto"], play["saved_rows"]],
                         show_progress="hidden")
        api.register(studio)  # named endpoints for scripts (gradio_client), per session like a browser
        # Each browser keeps a random token in its local storage; a shared studio maps it to a workspace.
        token = gr.BrowserState(None, storage_key="concept-studio-session")
        loaded = app.load(lambda saved: (studio.bind(saved), *_on_load(studio)), [token],
                          [token, train["dataset"], train["runs"], play["options"], ev["runs"], ev["dataset"],
                           ev["folder"]])
        # Then each form as the person left it (kept in the browser), over the lists just loaded.
        for tab in (train, play, ev):
            if "restore" in tab:
                loaded.then(**tab["restore"])
    return app


def _on_load(studio: Studio):
    """A fresh page (or a refresh) sees every dataset and run on disk, and the running job's run."""
    datasets, runs = studio.workspace.list_datasets(), studio.workspace.list_runs()
    job = studio.jobs.current()
    shown = job.label if job is not None and job.kind == "train" else (runs[0] if runs else None)
    return (gr.update(choices=datasets, value=datasets[0] if datasets else None),
            gr.update(choices=runs, value=shown),
            playground_tab.adapter_options(studio),
            gr.update(choices=runs), gr.update(choices=datasets, value=datasets[0] if datasets else None),
            evaluate_tab.latest_folder(studio))


def _open_recommendation(studio: Studio, rec: dict | None, prompt: str, auto: str):
    if not rec:
        return (gr.update(),) * 6
    value = evaluate_tab.playground_value(rec)
    rows, _, prompt, auto, saved = playground_tab.open_run(studio, value, rec["scale"], prompt, auto)
    return gr.Tabs(selected="playground"), rows, playground_tab.adapter_options(studio, [value]), prompt, auto, saved


def _datasets_update(studio: Studio, current: str | None, stored: dict | None = None):
    """The dataset choices on disk; an empty choice becomes the form's stored dataset, else the first one.
    A chosen dataset is left as it is: this runs when a tab opens, and writing back the value it read
    would undo a form restored from the browser (or a pick made) in the meantime."""
    datasets = studio.workspace.list_datasets()
    if current:
        return gr.update(choices=datasets)
    kept = stored.get("dataset") if isinstance(stored, dict) else None
    return gr.update(choices=datasets, value=kept if kept in datasets else (datasets[0] if datasets else None))


def launch(host: str | None = None, port: int | None = None, share: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    studio = make_studio(shared=True if share else None)
    if studio.shared:
        print("Each browser session gets its own workspace (under "
              f"{studio.home.root / 'sessions'}); jobs from several sessions wait their turn.", flush=True)
    if studio.model_notice:
        print(studio.model_notice, flush=True)
    app = build_app(studio)
    app.queue(default_concurrency_limit=4)
    _checkpoint_on_sigterm(studio)
    app.launch(server_name=host, server_port=port, share=share, **launch_options(studio))


def launch_options(studio: Studio) -> dict:
    """What `launch` passes to Gradio besides the address.

    A single-user studio lets Gradio serve its workspace folder (the samples and plots it shows). A
    shared one does not: a file a handler returns is copied into Gradio's cache under a hash of its
    content and that one file is served (Studio.servable), so a link names no workspace, session or
    token and opens nothing else. Uploads are limited per file.
    """
    allowed = [] if studio.shared else [str(studio.home.root)]
    return dict(allowed_paths=allowed, max_file_size=f"{limits.MAX_UPLOAD_MB}mb")


def _checkpoint_on_sigterm(studio: Studio) -> None:
    """SIGTERM (a Space restarting, `docker stop`): the training job checkpoints after its current
    step and the studio then exits, instead of losing the steps since the last checkpoint."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # Python lets only the main thread set signal handlers (a studio launched from a thread)

    def stop(signum, frame):
        train = sys.modules.get("studio.train")  # not imported: nothing has trained in this process
        if train is not None:
            train.TERMINATE.set()
            studio.manager.wait(timeout=120)  # one step and a checkpoint
        raise KeyboardInterrupt  # Gradio's main loop closes the server on it

    signal.signal(signal.SIGTERM, stop)
