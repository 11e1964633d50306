"""Train tab: settings wired to TrainConfig fields by name, a background run, a live view from events."""

from __future__ import annotations

import gradio as gr

from studio.config import TrainConfig, field_help, field_kind, list_presets
from studio.ui.context import Studio, friendly

# Settings shown in the form: TrainConfig field name -> label. Values reach the config by these names,
# and each control's kind (number, checkbox, dropdown of allowed values) follows the field's type.
FORM = {
    "steps": "Steps", "learning_rate": "Learning rate", "rank": "Rank", "alpha": "Alpha",
    "batch_size": "Batch size", "seed": "Seed", "resolution": "Resolution (0: the dataset's)",
    "mixed_precision": "Mixed precision", "sample_every": "Sample every N steps",
    "checkpoint_every": "Checkpoint every N steps",
}
MORE = {
    "locon": "LoCon: adapt convolutions too", "train_text_encoder": "Train the text encoder too (LoRA/DoRA/full)", "lokr_factor": "LoKr factor", "lr_schedule": "LR schedule",
    "lr_warmup_steps": "Warm-up steps", "min_snr_gamma": "Min-SNR gamma", "noise_offset": "Noise offset",
    "gradient_accumulation_steps": "Gradient accumulation", "gradient_checkpointing": "Gradient checkpointing",
    "flip_p": "Horizontal flip probability", "repeats": "Repeats per image", "optimizer": "Optimizer",
    "max_grad_norm": "Gradient clip norm",
    "prior_preservation": "Prior preservation (DreamBooth)", "prior_loss_weight": "Prior loss weight",
    "class_prompt": "Class prompt", "num_class_images": "Class images", "class_data_dir": "Own class images folder",
    "class_image_steps": "Steps per class image", "fit_memory": "Fit GPU memory (probe two steps first)",
}
INT_FIELDS = {name for name in {**FORM, **MORE} if field_kind(name)[0] is int}


def _control(name: str, label: str, value, help_text: str):
    kind, choices = field_kind(name)
    if choices:
        return gr.Dropdown(list(choices), value=value, label=label, info=help_text, elem_id=f"train-{name}")
    if kind is bool:
        return gr.Checkbox(value=value, label=label, info=help_text, elem_id=f"train-{name}")
    if kind is str:
        return gr.Textbox(value=value, label=label, info=help_text, elem_id=f"train-{name}")
    return gr.Number(value=value, label=label, info=help_text, precision=0 if kind is int else None,
                     elem_id=f"train-{name}")


def build(studio: Studio, model_box: gr.Textbox) -> dict:
    defaults, help_ = TrainConfig(), field_help()
    with gr.Row():
        dataset = gr.Dropdown(studio.workspace.list_datasets(), label="Dataset", elem_id="train-dataset",
                              allow_custom_value=True)
        preset = gr.Dropdown(["(none)"] + list_presets(), value="(none)", label="Preset",
                             info="values in the preset win over the form's defaults but not over your edits")
        method = gr.Dropdown(list(field_kind("method")[1]), value=defaults.method, label="Method",
                             info=help_["method"], elem_id="train-method")
        run_name = gr.Textbox(value="lora", label="Run name")
    with gr.Row():
        fields = {name: _control(name, label, getattr(defaults, name), help_[name]) for name, label in FORM.items()}
    with gr.Accordion("More options", open=False):
        with gr.Row():
            fields |= {name: _control(name, label, getattr(defaults, name), help_[name]) for name, label in MORE.items()}
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
        resume = gr.Button("Resume shown run", elem_id="train-resume")
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
    resume.click(friendly(lambda run_id: _resume(studio, run_id)), [runs], [status])
    timer.tick(lambda run_id: run_view(studio, run_id), [runs], [status, loss, samples])
    runs.change(lambda run_id: run_view(studio, run_id), [runs], [status, loss, samples])
    return {"dataset": dataset, "runs": runs}


def _start(studio: Studio, data, dataset, preset, method, model_box, fields, name) -> str:
    from studio import hosting
    from studio.config import build_config
    from studio.train import prepare

    if not data[dataset]:
        raise gr.Error("Choose a dataset first (save one in the Dataset tab).", print_exception=False)
    values = {key: data[comp] for key, comp in fields.items()}
    empty = [key for key, value in values.items() if value is None]
    if empty:
        label = {**FORM, **MORE}.get(empty[0], empty[0])
        raise gr.Error(f"'{label}' is empty; enter a value.", print_exception=False)
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
    studio.jobs.start("train", run_paths.run_id, run_paths.root,  # in ZeroGPU-sized chunks on such a Space
                      lambda should_stop: hosting.train_job(cfg, run_paths.root, should_stop))
    return run_paths.run_id


def _dataset_path(studio: Studio, choice: str):
    from pathlib import Path

    path = Path(choice)
    return path if path.is_absolute() else studio.workspace.dataset(choice).root


def _resume(studio: Studio, run_id: str | None) -> str:
    from studio import checkpoints, hosting
    from studio.config import load_run_config

    if not run_id:
        raise gr.Error("Choose the run to resume in 'Run shown'.", print_exception=False)
    paths = studio.workspace.run(run_id)
    last = checkpoints.latest(paths)
    if last is None:
        raise gr.Error(f"Run '{run_id}' has no complete checkpoint to resume from; start a new run.",
                       print_exception=False)
    total = load_run_config(paths.config).get("steps", 0)
    if last.step >= total:
        raise gr.Error(f"Run '{run_id}' already finished its {total} steps; to train longer run "
                       f"`python -m studio train --resume {paths.root} --steps N`.", print_exception=False)
    studio.jobs.start("train", run_id, paths.root,
                      lambda should_stop: hosting.train_job(None, paths.root, should_stop, resume=True))
    return f"**{run_id}** — resuming from step {last.step}…"


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
    if job is not None and job.label == run_id and job.status == "queued":
        ahead = studio.jobs.position(job)
        return f"**{run_id}** — waiting for the accelerator: {ahead} job(s) ahead of it (other sessions' work)."
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
