"""Evaluate tab: concept fidelity against prompt fidelity for runs, checkpoints and scales, against the
baselines; a recommendation with one click to open it in the Playground. Runs as a background job."""

from __future__ import annotations

import time

import gradio as gr

from studio.ui.context import Studio, friendly

KIND_LABELS = {"training captions": "training", "DreamBench + your prompts": "generalization",
               "without the trigger (leak)": "agnostic", "context pairs": "context"}


def build(studio: Studio, model_box: gr.Textbox, default_clip: str) -> dict:
    from studio.evaluate.prompts import DEFAULT_CONTEXTS

    gr.Markdown("Does the model reproduce **your concept** (CLIP-I, DINO: generated images against your photos) "
                "and still **follow prompts** (CLIP-T: image against its prompt)? Each run is swept over "
                "checkpoints and scales; upper right is best, the dashed line is your photos against each other.")
    with gr.Row():
        runs = gr.Dropdown(studio.workspace.list_runs(), multiselect=True, label="Runs", elem_id="eval-runs",
                           allow_custom_value=True)
        dataset = gr.Dropdown(studio.workspace.list_datasets(), label="Dataset", elem_id="eval-dataset",
                              allow_custom_value=True)
        clip = gr.Textbox(value=default_clip, label="CLIP model", info="hub id, folder, or 'builtin'")
        dino = gr.Textbox(value="none" if default_clip else "", label="DINO model",
                          info="facebook/dino-vits16 (default online), DINOv2, a folder, or 'none'")
    with gr.Row():
        kinds = gr.CheckboxGroup(list(KIND_LABELS), value=list(KIND_LABELS), label="Prompt kinds", elem_id="eval-kinds")
        per_kind = gr.Number(value=4, precision=0, label="Prompts per kind (0: all)")
        scales = gr.Textbox(value="0.5, 1.0", label="Scales", info="comma-separated, e.g. 0, 0.5, 1, 1.5",
                            elem_id="eval-scales")
        checkpoints = gr.Radio(["final", "all"], value="final", label="Checkpoints")
    with gr.Row():
        seeds = gr.Number(value=2, precision=0, label="Images per prompt")
        steps = gr.Number(value=20, precision=0, label="Denoising steps")
        own = gr.Textbox(value="", lines=2, label="Your prompts (one per line, with {token} and {class})")
        contexts = gr.Textbox(value="\n".join(DEFAULT_CONTEXTS), lines=3, label="Contexts (one per line)")
    with gr.Row():
        start = gr.Button("Run evaluation", variant="primary", elem_id="eval-start")
        cancel = gr.Button("Cancel", variant="stop")
        refresh = gr.Button("Refresh lists")
    status = gr.Markdown(elem_id="eval-status")
    with gr.Row():
        advice = gr.Markdown(elem_id="eval-recommendation")
        open_best = gr.Button("Open in Playground", visible=False, elem_id="eval-open")
    scatter = gr.Plot(label="Fidelity vs editability", elem_id="eval-scatter")
    with gr.Row():
        heatmap = gr.Plot(label="Per prompt", elem_id="eval-heatmap")
        grid = gr.Image(label="The sweep (first seed)", type="filepath", elem_id="eval-grid")
    table = gr.Dataframe(label="Summary", elem_id="eval-table")
    references = gr.Dataframe(label="Reference: DreamBooth paper, Table 1 (shown when real CLIP and DINO are used)",
                              visible=False)
    files = gr.File(label="results.csv (one row per image), summary.csv", file_count="multiple")
    folder = gr.State(None)
    best = gr.State(None)
    timer = gr.Timer(1.0)

    form = dict(runs=runs, dataset=dataset, clip=clip, dino=dino, kinds=kinds, per_kind=per_kind, scales=scales,
                checkpoints=checkpoints, seeds=seeds, steps=steps, own=own, contexts=contexts)

    @friendly
    def on_start(data):
        return _start(studio, data[model_box] or studio.default_model, {k: data[c] for k, c in form.items()})

    start.click(on_start, {model_box, *form.values()}, [folder, status])
    cancel.click(lambda: "Cancelling…" if studio.jobs.cancel() else "No evaluation is running.", None, [status])
    drawn = gr.State(None)  # the finished evaluation on the page: redrawn only when it changes
    timer.tick(lambda f, d: _view(studio, f, d), [folder, drawn],
               [status, scatter, heatmap, grid, table, files, advice, open_best, best, references, drawn])
    refresh.click(lambda: (gr.update(choices=studio.workspace.list_runs()),
                           gr.update(choices=studio.workspace.list_datasets())), None, [runs, dataset])
    return {"runs": runs, "dataset": dataset, "folder": folder, "open": open_best, "best": best}


def latest_folder(studio: Studio) -> str | None:
    """The evaluation a fresh page shows: the running one, else the newest on disk."""
    job = studio.jobs.current()
    if job is not None and job.kind == "evaluate":
        return str(job.folder)
    folders = sorted(studio.workspace.evals.glob("*/events.jsonl")) if studio.workspace.evals.is_dir() else []
    return str(folders[-1].parent) if folders else None


def _start(studio: Studio, model, data: dict):
    from pathlib import Path

    from studio import hosting
    from studio.evaluate.protocol import EvalConfig, evaluate

    if not data["dataset"]:
        raise gr.Error("Choose the dataset the runs were trained on.", print_exception=False)
    try:
        scales = [float(v) for v in str(data["scales"]).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise gr.Error(f"Scales take numbers separated by commas, such as 0, 0.5, 1; got '{data['scales']}'.",
                       print_exception=False) from None
    from studio.adapters import find_adapter_dir
    from studio.data.dataset import load_dataset

    load_dataset(studio.workspace.dataset(data["dataset"]).root)  # bad choices: one sentence now, no job
    run_dirs = [str(studio.workspace.run(r).root) for r in (data["runs"] or [])]
    for run in run_dirs:
        find_adapter_dir(Path(run))
    out = studio.workspace.evals / time.strftime("%Y%m%d-%H%M%S")
    cfg = EvalConfig(dataset=str(studio.workspace.dataset(data["dataset"]).root), runs=run_dirs, model=model,
                     clip=data["clip"], dino=data["dino"], kinds=[KIND_LABELS[k] for k in data["kinds"] or []],
                     prompts=_lines(data["own"]), contexts=_lines(data["contexts"]), per_kind=int(data["per_kind"] or 0),
                     seeds=int(data["seeds"] or 1), steps=int(data["steps"] or 1), scales=scales or [1.0],
                     checkpoints=data["checkpoints"])

    def work(should_stop):  # the report is written by evaluate, before its last event
        return evaluate(cfg, out, should_stop=should_stop, playground=hosting.GpuPlayground(studio.playground))

    studio.jobs.start("evaluate", out.name, out, work)
    return str(out), "Evaluation started…"


def _lines(text) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _view(studio: Studio, folder, drawn=None):
    """What the timer shows: progress while the job runs; the results once, when it has finished
    (each tick after that changes nothing and reads only the event log)."""
    from pathlib import Path

    from studio import events as ev
    from studio import plots

    keep = [gr.update()] * 10 + [drawn]
    if not folder:
        return keep
    history = ev.read_events(Path(folder) / "events.jsonl")
    job = studio.jobs.current()
    finished = next((e for e in reversed(history) if isinstance(e, ev.Finished)), None)
    if finished is None:
        if job is not None and job.kind == "evaluate" and job.status == "failed":
            return [f"Evaluation failed: {job.message}"] + keep[1:]
        if job is not None and job.kind == "evaluate" and job.status == "queued":
            return [f"Waiting for the accelerator: {studio.jobs.position(job)} job(s) ahead (other sessions' work)."] \
                + keep[1:]
        progress = next((e for e in reversed(history) if isinstance(e, ev.Progress) and e.total), None)
        text = f"Generating {progress.done + 1}/{progress.total}: {progress.message}" if progress else "Loading models…"
        return [text] + keep[1:]
    from studio.evaluate.protocol import RECOMMENDATION, SUMMARY_CSV, read_results, read_settings
    from studio.evaluate.report import GRID_PNG, references_for

    root = Path(folder)
    if finished.status != "completed" or not (root / SUMMARY_CSV).exists():
        return [finished.message] + keep[1:]
    key = f"{root}:{(root / SUMMARY_CSV).stat().st_mtime_ns}"
    if key == drawn:
        return keep
    summary, images, rec = read_results(root)
    settings = read_settings(root)
    refs = references_for(settings.get("clip"), settings.get("dino"))
    notes = sorted({w for w in summary["warning"].fillna("") if w})
    status = finished.message + "".join(f"\n\n*Note: {w}*" for w in notes[:1])
    advice = f"**Recommended:** {rec['reason']}" if rec else "No run point to recommend: choose runs to evaluate."
    shown = summary.drop(columns=["adapter"]).round(4)
    import pandas as pd

    grid = root / GRID_PNG
    return [status, plots.tradeoff(summary, rec, refs), plots.prompt_heatmap(images), str(grid) if grid.exists() else None,
            shown, [str(root / "results.csv"), str(root / SUMMARY_CSV), str(root / RECOMMENDATION)], advice,
            gr.update(visible=rec is not None), rec,
            gr.update(value=pd.DataFrame(refs), visible=bool(refs)), key]


def playground_value(rec: dict | None) -> str | None:
    """The Playground picker's value for a recommended point: 'run' or 'run@step-000015' (a checkpoint)."""
    if not rec:
        return None
    from pathlib import Path

    adapter = Path(rec["adapter"])
    return rec["run"] if adapter.name == "adapter" else f"{rec['run']}@{adapter.name}"
