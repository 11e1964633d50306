"""Train tab: settings wired to TrainConfig fields by name, a background run, a live view from events."""

from __future__ import annotations

import gradio as gr

from studio.config import TrainConfig, field_help, list_presets
from studio.ui.context import Studio, friendly

# Settings shown in the form: TrainConfig field name -> label. Values reach the config by these names.
FORM = {
    "steps": "Steps", "learning_rate": "Learning rate", "rank": "LoRA rank", "alpha": "LoRA alpha",
    "batch_size": "Batch size", "seed": "Seed", "resolution": "Resolution (0: the dataset's)",
    "mixed_precision": "Mixed precision", "sample_every": "Sample every N steps",
    "checkpoint_every": "Checkpoint every N steps",
}
INT_FIELDS = {"steps", "rank", "batch_size", "seed", "resolution", "sample_every", "checkpoint_every"}


def build(studio: Studio, model_box: gr.Textbox) -> dict:
    defaults, help_ = TrainConfig(), field_help()
    with gr.Row():
        dataset = gr.Dropdown(studio.workspace.list_datasets(), label="Dataset", elem_id="train-dataset",
                              allow_custom_value=True)
        preset = gr.Dropdown(["(none)"] + list_presets(), value="(none)", label="Preset",
                             info="values in the preset win over the form's defaults but not over your edits")
        method = gr.Dropdown(["lora"], value="lora", label="Method")
        run_name = gr.Textbox(value="lora", label="Run name")
    fields = {}
    with gr.Row():
        for name, label in FORM.items():
            value = getattr(defaults, name)
            if name == "mixed_precision":
                fields[name] = gr.Dropdown(["auto", "no", "fp16", "bf16"], value=value, label=label, info=help_[name])
            else:
                fields[name] = gr.Number(value=value, label=label, info=help_[name],
                                         precision=None if isinstance(value, float) else 0, elem_id=f"train-{name}")
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
        runs = gr.Dropdown(studio.workspace.list_runs(), label="Run shown", elem_id="train-run",
                           allow_custom_value=True)
    status = gr.Markdown("No run yet.", elem_id="train-status")
    with gr.Row():
        loss = gr.Plot(label="Loss", elem_id="train-loss")
        samples = gr.Gallery(label="Samples", columns=4, height=320, elem_id="train-samples")
    timer = gr.Timer(1.0)

    form_inputs = {dataset, preset, method, model_box, *fields.values()}

    @friendly
    def on_start(data):
        run_id = _start(studio, data, dataset, preset, method, model_box, fields, data[run_name])
        return gr.update(choices=studio.workspace.list_runs(), value=run_id)

    start.click(on_start, inputs=form_inputs | {run_name}, outputs=[runs])
    cancel.click(friendly(lambda: _cancel(studio)), None, [status])
    timer.tick(lambda run_id: run_view(studio, run_id), [runs], [status, loss, samples])
    runs.change(lambda run_id: run_view(studio, run_id), [runs], [status, loss, samples])
    return {"dataset": dataset, "runs": runs}


def _start(studio: Studio, data, dataset, preset, method, model_box, fields, name) -> str:
    from studio.config import build_config
    from studio.train import prepare, run

    if not data[dataset]:
        raise gr.Error("Choose a dataset first (save one in the Dataset tab).", print_exception=False)
    values = {key: data[comp] for key, comp in fields.items()}
    for key in INT_FIELDS & values.keys():  # gr.Number gives floats
        values[key] = int(values[key])
    values.update(model=data[model_box] or studio.default_model, method=data[method],
                  dataset=str(_dataset_path(studio, data[dataset])))
    chosen = None if data[preset] in (None, "(none)") else data[preset]
    # A preset sets defaults; the form's values that differ from TrainConfig's defaults are the user's edits.
    edits = {k: v for k, v in values.items() if chosen is None or k in ("model", "dataset", "method")
             or v != getattr(TrainConfig(), k)}
    cfg = build_config(chosen, edits)
    run_paths = studio.workspace.run(studio.workspace.new_run_id(name or cfg.method))
    prepare(cfg, run_paths.root)  # bad input fails here, in the page, before a thread starts
    studio.jobs.start("train", run_paths.run_id, run_paths.root,
                      lambda should_stop: run(cfg, run_paths.root, should_stop=should_stop))
    return run_paths.run_id


def _dataset_path(studio: Studio, choice: str):
    from pathlib import Path

    path = Path(choice)
    return path if path.is_absolute() else studio.workspace.dataset(choice).root


def _cancel(studio: Studio) -> str:
    if studio.jobs.cancel():
        return "Cancelling after the current step; the adapter so far will be saved."
    return "No run is in progress."


def run_view(studio: Studio, run_id: str | None):
    """Status line, loss figure and samples of a run, drawn from its events.jsonl alone."""
    from studio import events as ev
    from studio import plots

    if not run_id:
        return "No run selected.", None, []
    paths = studio.workspace.run(run_id)
    history = ev.read_events(paths.events)
    steps = [e for e in history if isinstance(e, ev.Step)]
    finished = next((e for e in reversed(history) if isinstance(e, ev.Finished)), None)
    samples = [e for e in history if isinstance(e, ev.Sample)]
    gallery = [(str(paths.root / img), f"step {s.step}: {p}") for s in samples[-4:] for img, p in zip(s.images, s.prompts)]
    return _status_line(studio, run_id, steps, finished, history), plots.loss_figure(history), gallery


def _status_line(studio: Studio, run_id, steps, finished, history) -> str:
    from studio import events as ev

    job = studio.jobs.current()
    if finished is not None:
        return f"**{run_id}** — {finished.status}: {finished.message}"
    if not steps:
        notes = [e.message for e in history if isinstance(e, ev.Progress)]
        live = job is not None and job.label == run_id and job.running
        state = "loading the model and caching latents…" if live else "stopped before its first step."
        if job is not None and job.label == run_id and job.status == "failed":
            state = f"failed: {job.message}"
        return f"**{run_id}** — {state} " + " ".join(notes)
    last = steps[-1]
    rate = last.elapsed_s / last.step
    eta = rate * (last.total_steps - last.step)
    live = job is not None and job.label == run_id and job.running
    state = "running" if live else "interrupted (the process stopped before it finished)"
    return (f"**{run_id}** — {state} · step **{last.step}/{last.total_steps}** · loss {last.loss:.4f} · "
            f"{rate:.2f} s/step · ETA {eta:.0f} s")
