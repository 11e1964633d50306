"""Evaluate tab: image similarity against prompt similarity for runs and baselines, as a background job."""

from __future__ import annotations

import time

import gradio as gr

from studio.ui.context import Studio, friendly


def build(studio: Studio, model_box: gr.Textbox, default_clip: str) -> dict:
    from studio.evaluate.prompts import DEFAULT_CONTEXTS

    gr.Markdown("**Image similarity**: how close images of *a photo of &lt;token&gt; &lt;class&gt;* are to your photos "
                "(CLIP cosine). **Prompt similarity**: how close *… in a forest* with your concept is to the same "
                "prompt without it. Upper right is best; the dashed line is your dataset against itself.")
    with gr.Row():
        runs = gr.Dropdown(studio.workspace.list_runs(), multiselect=True, label="Runs", elem_id="eval-runs",
                           allow_custom_value=True)
        dataset = gr.Dropdown(studio.workspace.list_datasets(), label="Dataset", elem_id="eval-dataset",
                              allow_custom_value=True)
        clip = gr.Textbox(value=default_clip, label="CLIP model", info="hub id, folder, or 'builtin'")
    with gr.Row():
        seeds = gr.Number(value=2, precision=0, label="Images per prompt")
        steps = gr.Number(value=20, precision=0, label="Denoising steps")
        scale = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Adapter scale")
        contexts = gr.Textbox(value="\n".join(DEFAULT_CONTEXTS), lines=3, label="Contexts (one per line)")
    with gr.Row():
        start = gr.Button("Run evaluation", variant="primary", elem_id="eval-start")
        cancel = gr.Button("Cancel", variant="stop")
        refresh = gr.Button("Refresh lists")
    status = gr.Markdown(elem_id="eval-status")
    scatter = gr.Plot(label="Fidelity vs editability", elem_id="eval-scatter")
    table = gr.Dataframe(label="Results", elem_id="eval-table")
    csv = gr.File(label="results.csv")
    folder = gr.State(None)
    timer = gr.Timer(1.0)

    @friendly
    def on_start(data):
        return _start(studio, data[model_box] or studio.default_model, data[runs], data[dataset], data[clip],
                      data[seeds], data[steps], data[scale], data[contexts])

    start.click(on_start, {model_box, runs, dataset, clip, seeds, steps, scale, contexts}, [folder, status])
    cancel.click(lambda: "Cancelling…" if studio.jobs.cancel() else "No evaluation is running.", None, [status])
    timer.tick(lambda f: _view(studio, f), [folder], [status, scatter, table, csv])
    refresh.click(lambda: (gr.update(choices=studio.workspace.list_runs()),
                           gr.update(choices=studio.workspace.list_datasets())), None, [runs, dataset])
    return {"runs": runs, "dataset": dataset, "folder": folder}


def latest_folder(studio: Studio) -> str | None:
    """The evaluation a fresh page shows: the running one, else the newest on disk."""
    job = studio.jobs.current()
    if job is not None and job.kind == "evaluate":
        return str(job.folder)
    folders = sorted(studio.workspace.evals.glob("*/events.jsonl")) if studio.workspace.evals.is_dir() else []
    return str(folders[-1].parent) if folders else None


def _start(studio: Studio, model, runs, dataset, clip, seeds, steps, scale, contexts):
    from studio.evaluate.protocol import EvalConfig, evaluate

    if not dataset:
        raise gr.Error("Choose the dataset the runs were trained on.", print_exception=False)
    run_dirs = [str(studio.workspace.run(r).root) for r in (runs or [])]
    out = studio.workspace.evals / time.strftime("%Y%m%d-%H%M%S")
    cfg = EvalConfig(dataset=str(studio.workspace.dataset(dataset).root), runs=run_dirs, model=model, clip=clip,
                     contexts=[c.strip() for c in (contexts or "").splitlines() if c.strip()],
                     seeds=int(seeds), steps=int(steps), scale=float(scale))
    studio.jobs.start("evaluate", out.name, out,
                      lambda should_stop: evaluate(cfg, out, should_stop=should_stop, playground=studio.playground))
    return str(out), "Evaluation started…"


def _view(studio: Studio, folder):
    from pathlib import Path

    from studio import events as ev
    from studio import plots

    if not folder:
        return gr.update(), gr.update(), gr.update(), gr.update()
    history = ev.read_events(Path(folder) / "events.jsonl")
    job = studio.jobs.current()
    finished = next((e for e in reversed(history) if isinstance(e, ev.Finished)), None)
    if finished is None:
        if job is not None and job.kind == "evaluate" and job.status == "failed":
            return f"Evaluation failed: {job.message}", gr.update(), gr.update(), gr.update()
        progress = next((e for e in reversed(history) if isinstance(e, ev.Progress) and e.total), None)
        text = f"Generating {progress.done + 1}/{progress.total}: {progress.message}" if progress else "Loading models…"
        return text, gr.update(), gr.update(), gr.update()
    csv = Path(folder) / "results.csv"
    if finished.status != "completed" or not csv.exists():
        return finished.message, gr.update(), gr.update(), gr.update()
    import pandas as pd

    results = pd.read_csv(csv)
    return finished.message, plots.eval_scatter(results), results.round(4), str(csv)
