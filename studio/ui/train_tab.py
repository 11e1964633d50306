"""Train tab: settings wired to TrainConfig fields by name, a background run, a live view from events."""

from __future__ import annotations

import gradio as gr

from studio.config import all_field_help, applies, field_kind, label, list_presets, method_setting_names
from studio.errors import StudioError
from studio.ui import forms
from studio.ui.context import Studio, friendly

# Settings shown in the form: TrainConfig field name -> label. Values reach the config by these names,
# and each control's kind (number, checkbox, dropdown of allowed values) follows the field's type.
FORM = {
    "steps": "Steps", "learning_rate": "Learning rate",
    "batch_size": "Batch size", "seed": "Seed", "resolution": "Resolution (0: the dataset's)",
    "mixed_precision": "Mixed precision", "sample_every": "Sample every N steps",
    "checkpoint_every": "Checkpoint every N steps",
}
MORE = {
    "lr_schedule": "LR schedule",
    "lr_warmup_steps": "Warm-up steps", "min_snr_gamma": "Min-SNR gamma", "noise_offset": "Noise offset",
    "gradient_accumulation_steps": "Gradient accumulation", "gradient_checkpointing": "Gradient checkpointing",
    "flip_p": "Horizontal flip probability", "repeats": "Repeats per image", "optimizer": "Optimizer",
    "max_grad_norm": "Gradient clip norm",
    "prior_preservation": "Prior preservation (DreamBooth)", "prior_loss_weight": "Prior loss weight",
    "class_prompt": "Class prompt", "num_class_images": "Class images", "class_data_dir": "Own class images folder",
    "vae": "VAE instead of the model's own (.safetensors file or diffusers folder)",
    "class_image_steps": "Steps per class image", "fit_memory": "Fit GPU memory (probe two steps first)",
}
# The methods' own settings (studio.adapters: each method's SETTINGS), labelled where they are declared; a
# control shows only while the chosen method has that setting. Lists (target modules) stay in presets.
METHOD = [name for name in method_setting_names() if field_kind(name)[0] is not list]
INT_FIELDS = {name for name in [*FORM, *MORE, *METHOD] if field_kind(name)[0] is int}


def _label(name: str) -> str:
    return {**FORM, **MORE}.get(name) or label(name)


def _control(name: str, label: str, value, help_text: str, min_width: int = 160, visible: bool = True):
    kind, choices = field_kind(name)
    common = dict(value=value, label=label, info=help_text, elem_id=f"train-{name}", min_width=min_width,
                  visible=visible)
    if choices:
        return gr.Dropdown(list(choices), **common)
    if kind is bool:
        return gr.Checkbox(**common)
    if kind is str:
        return gr.Textbox(**common)
    return gr.Number(precision=0 if kind is int else None, **common)


NO_PRESET = "(none)"
DEMO_PRESET = "demo"  # the walkthrough's recipe for the built-in pocket model
_CANCELLING: set[str] = set()  # ids of train jobs asked to stop that have not stopped yet


def preset_values(preset: str | None) -> dict:
    """The values a form shows for a preset: the defaults, then the preset's own values over them (the
    settings of the preset's method; other methods' controls keep their values)."""
    from studio.config import build_config

    return build_config(None if preset in (None, NO_PRESET) else preset).to_dict()


def _start_values(preset: str | None) -> dict:
    """What the form starts with: the preset's values, and every other method's settings at their defaults."""
    from studio.config import method_defaults

    return {**method_defaults(), **preset_values(preset)}


def method_visibility(method: str | None) -> list:
    """One update per METHOD control: shown while `method` has that setting."""
    return [gr.update(visible=bool(method) and applies(name, method)) for name in METHOD]


def default_preset(studio: Studio) -> str:
    """The built-in pocket model starts from the walkthrough's recipe; any other model from the defaults."""
    return DEMO_PRESET if studio.default_model == "builtin" and DEMO_PRESET in list_presets() else NO_PRESET


def build(studio: Studio, model_box: gr.Textbox) -> dict:
    help_ = all_field_help()
    first = default_preset(studio)
    start_values = _start_values(first)
    with gr.Row():
        dataset = gr.Dropdown(studio.workspace.list_datasets(), label="Dataset", elem_id="train-dataset",
                              allow_custom_value=True)
        preset = gr.Dropdown([NO_PRESET] + list_presets(), value=first, label="Preset", elem_id="train-preset",
                             info="fills the form with the preset's values; what you change after that wins")
        method = gr.Dropdown(list(field_kind("method")[1]), value=start_values["method"], label="Method",
                             info=help_["method"], elem_id="train-method")
        run_name = gr.Textbox(value="", label="Run name", placeholder="empty: the method's name",
                              elem_id="train-run-name")
    with gr.Row(elem_id="train-method-settings"):  # the chosen method's own settings, and no others
        own = {name: _control(name, _label(name), start_values[name], help_[name], min_width=220,
                              visible=applies(name, start_values["method"])) for name in METHOD}
    with gr.Row():
        fields = {name: _control(name, label, start_values[name], help_[name]) for name, label in FORM.items()}
    fields |= own
    with gr.Accordion("More options", open=False):
        with gr.Row():  # checkboxes in a row of their own, wide enough for their labels
            fields |= {name: _control(name, label, start_values[name], help_[name], min_width=300)
                       for name, label in MORE.items() if field_kind(name)[0] is bool}
        with gr.Row():
            fields |= {name: _control(name, label, start_values[name], help_[name], min_width=220)
                       for name, label in MORE.items() if field_kind(name)[0] is not bool}
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
        resume = gr.Button("Resume shown run", elem_id="train-resume")
        runs = gr.Dropdown(studio.workspace.list_runs(), label="Run shown", elem_id="train-run",
                           allow_custom_value=True)
    plan = gr.Markdown(elem_id="train-plan")  # how long Start would take, from earlier runs' probes
    status = gr.Markdown("No run yet.", elem_id="train-status")
    with gr.Row():
        loss = gr.Plot(label="Loss", elem_id="train-loss")
        samples = gr.Gallery(label="Samples", columns=4, height=320, elem_id="train-samples")
    timer = gr.Timer(1.0, active=False)  # ticks only while a run is going

    form = {"dataset": dataset, "preset": preset, "method": method, "run_name": run_name, "model": model_box,
            **fields}
    done = gr.State(False)  # this page has its form: restored from the browser, or edited
    saved = forms.remember("train-form", form, edited=done)
    save_all = forms.saver(form, edited=done)
    shown = [method, *fields.values()]

    def on_preset(choice):
        values = preset_values(choice)
        model = gr.update(value=values["model"]) if values["model"] else gr.update()  # else the box's stays
        return [gr.update(value=values["method"]),
                *[gr.update(value=values[k]) if k in values else gr.update() for k in fields], model]

    method.change(method_visibility, [method], [own[name] for name in METHOD], show_progress="hidden")

    preset.input(on_preset, [preset], [*shown, model_box], show_progress="hidden").then(
        save_all, list(form.values()), [saved, done], show_progress="hidden")

    @friendly  # anything but a user's mistake: logged, and its gist shown
    def on_start(data):
        try:
            run_id = _start(studio, data, dataset, preset, method, model_box, fields, data[run_name])
        except (gr.Error, StudioError) as exc:
            return _refused(exc)
        return (gr.update(choices=studio.workspace.list_runs(), value=run_id),
                f"**{run_id}** — starting…", gr.Timer(active=True))

    start.click(on_start, inputs=set(form.values()), outputs=[runs, status, timer]).then(
        save_all, list(form.values()), [saved, done], show_progress="hidden")
    # Each handler that writes the status line keeps the timer going while the run is live: an answer that
    # arrives after the tick that drew the run's end would otherwise leave its older line standing.
    cancel.click(friendly(lambda: _cancel(studio)), None, [status, timer])
    resume.click(lambda run_id: _on_resume(studio, run_id), [runs], [status, timer])
    ended = gr.State(None)  # the run the page last saw end: its timing may change the forecast
    timer.tick(lambda run_id: _tick(studio, run_id), [runs], [status, loss, samples, timer, ended],
               show_progress="hidden")
    plan_inputs = [dataset, method, model_box, *fields.values()]

    def on_plan(*values):
        return forecast(studio, dict(zip(["dataset", "method", "model", *fields], values)))

    for control in plan_inputs:
        control.change(on_plan, plan_inputs, [plan], show_progress="hidden")
    ended.change(on_plan, plan_inputs, [plan], show_progress="hidden")
    runs.change(lambda run_id: _shown(studio, run_id), [runs], [status, loss, samples, timer])

    def restore(values):
        allowed = {"dataset": lambda v: v in studio.workspace.list_datasets(),
                   "preset": lambda v: v in [NO_PRESET] + list_presets(),
                   "method": lambda v: v in field_kind("method")[1]}
        job = studio.jobs.current()
        live = job is not None and job.kind == "train" and job.active
        return [*forms.restored(values, list(form), allowed), gr.Timer(active=live) if live else gr.update()]

    outputs = [*form.values(), timer]
    once = forms.restore_once(saved, done, restore, [], outputs)
    return {"dataset": dataset, "runs": runs, "saved": saved,
            "restore": dict(fn=once, inputs=[saved, done], outputs=[*outputs, done], show_progress="hidden")}


def _refused(exc: Exception):
    """An error on Start: one sentence in the status line (and a toast), the run shown as it was."""
    message = getattr(exc, "message", None) or str(exc)
    gr.Warning(message)
    return gr.update(), f"**Not started:** {message}", gr.update()


def _on_resume(studio: Studio, run_id: str | None):
    try:
        return _resume(studio, run_id), gr.Timer(active=True)
    except (gr.Error, StudioError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        gr.Warning(message)
        return f"**Not resumed:** {message}", gr.update()


def _live(studio: Studio) -> bool:
    job = studio.jobs.current()
    return job is not None and job.kind == "train" and job.active


def _tick(studio: Studio, run_id: str | None):
    """The live view while a run goes; the timer stops after drawing the run's end. Whether the run is
    live is read before its events, so a view drawn before the end keeps the timer for one more tick."""
    live = _live(studio)
    return (*run_view(studio, run_id), gr.Timer(active=live), gr.update() if live else run_id)


def _shown(studio: Studio, run_id: str | None):
    """The view of a run just picked (or just started), with the timer on while a run is live."""
    live = _live(studio)
    return (*run_view(studio, run_id), gr.Timer(active=True) if live else gr.update())


def forecast(studio: Studio, values: dict) -> str:
    """The line under Start: how long a run of the form's settings should take on this machine, from the
    newest earlier run at the same settings ('' while the form cannot make a run)."""
    from studio.data.dataset import load_dataset
    from studio.timings import train_forecast

    if not values.get("dataset") or any(v is None for v in values.values() if not isinstance(v, str)):
        return ""
    try:
        method = values.get("method")
        settings = {k: int(v) if k in INT_FIELDS else v for k, v in values.items()
                    if k in ("dataset", "model") or (method and applies(k, method))}
        settings["model"] = settings.get("model") or studio.default_model
        if not settings.get("resolution"):
            settings["resolution"] = load_dataset(_dataset_path(studio, values["dataset"])).resolution
        return train_forecast(studio.workspace.runs, settings).message
    except (StudioError, gr.Error, OSError, ValueError, TypeError):  # no dataset yet, a half-typed number...
        return ""


def _start(studio: Studio, data, dataset, preset, method, model_box, fields, name) -> str:
    from studio import launch
    from studio.config import build_config, load_preset

    if not data[dataset]:
        raise gr.Error("Choose a dataset first (save one in the Dataset tab).", print_exception=False)
    if not data[method]:
        raise gr.Error("Choose a method first.", print_exception=False)
    values = {key: data[comp] for key, comp in fields.items() if applies(key, data[method])}  # the method's own
    empty = [key for key, value in values.items() if value is None]
    if empty:
        raise gr.Error(f"'{_label(empty[0])}' is empty; enter a value.", print_exception=False)
    for key in INT_FIELDS & values.keys():  # gr.Number gives floats
        values[key] = int(values[key])
    values.update(model=data[model_box] or studio.default_model, method=data[method],
                  dataset=str(_dataset_path(studio, data[dataset])))
    chosen = None if data[preset] in (None, NO_PRESET) else data[preset]
    # Picking a preset put its values into the form, so the form is what trains; the preset still
    # supplies the settings the form does not show (sample prompts, target modules...) that the chosen
    # method takes (a LoHa preset's rank is no setting of an embedding run).
    from_preset = {k: v for k, v in load_preset(chosen).items() if k != "method" and applies(k, data[method])} \
        if chosen else {}
    cfg = build_config(None, studio.confine({**from_preset, **values}))  # shared: paths and models stay the session's own
    run_paths = studio.workspace.run(studio.workspace.new_run_id(name or cfg.method))
    launch.check(cfg, run_paths.root)  # bad input fails here, in the page, before a thread starts
    studio.jobs.start("train", run_paths.run_id, run_paths.root,
                      lambda should_stop: launch.start(cfg, run_paths.root, should_stop=should_stop))
    return run_paths.run_id


def _dataset_path(studio: Studio, choice: str):
    return studio.dataset_folder(choice)  # a name in the workspace, or a folder (inside it, when shared)


def _resume(studio: Studio, run_id: str | None) -> str:
    from studio import launch

    if not run_id:
        raise gr.Error("Choose the run to resume in 'Run shown'.", print_exception=False)
    paths = studio.workspace.run(run_id)
    try:
        step = launch.check_resume(paths.root)  # the checks the resume itself makes, said in the page now
    except StudioError as exc:
        raise gr.Error(exc.message if hasattr(exc, "message") else str(exc), print_exception=False) from None
    studio.jobs.start("train", run_id, paths.root,
                      lambda should_stop: launch.start(None, paths.root, should_stop=should_stop, resume=True))
    return f"**{run_id}** — resuming from step {step}…"


def _cancel(studio: Studio):
    """(status line, timer): the timer is on until the tick that draws how the run ended."""
    job = studio.jobs.current()
    if studio.jobs.cancel():
        if job is not None:
            _CANCELLING.add(job.job_id)
        return "Cancelling after the current step; the adapter so far will be saved.", gr.Timer(active=True)
    gr.Info("No run is in progress.")
    return gr.update(), gr.update()  # the status line keeps saying how the shown run ended


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
    gallery = [(studio.servable(paths.root / img), f"step {s.step}: {p}") for s in samples[-4:] for img, p in zip(s.images, s.prompts)]
    return _status_line(studio, run_id, steps, finished, history), plots.loss_figure(history), gallery


def _status_line(studio: Studio, run_id, steps, finished, history) -> str:
    job = studio.jobs.current()
    if finished is not None:
        return f"**{run_id}** — {finished.status}: {finished.message}"
    if job is not None and job.label == run_id and job.status == "queued":
        ahead = studio.jobs.position(job)
        return f"**{run_id}** — waiting for the accelerator: {ahead} job(s) ahead of it (other sessions' work)."
    live = job is not None and job.label == run_id and job.running
    if not steps:
        if live and job.job_id in _CANCELLING:
            return f"**{run_id}** — cancelling: it stops before its first step, with nothing trained to save…"
        state = "loading the model and caching latents…" if live else "stopped before its first step."
        if job is not None and job.label == run_id and job.status == "failed":
            state = f"failed: {job.message}"
        now = _newest_note(history) if live else ""
        return f"**{run_id}** — " + (now or state)
    last = steps[-1]
    rate = last.elapsed_s / last.step
    eta = rate * (last.total_steps - last.step)
    state = "running" if live else "interrupted (the process stopped before it finished)"
    line = (f"**{run_id}** — {state} · step **{last.step}/{last.total_steps}** · loss {last.loss:.4f} · "
            f"{rate:.2f} s/step · ETA {_duration(eta)}")
    if not live:
        return line
    if job.job_id in _CANCELLING:
        return line + " · cancelling after this step, then saving the adapter so far…"
    estimate = _newest(history, "estimate")
    if last.step < last.total_steps:
        now = _newest_note(history, after=last)
        return line + (f" · {now}" if now else "") + (f"\n\n{estimate.message}" if estimate else "")
    return line + f" · {_newest_note(history, after=last) or _AFTER_LOOP}"


# Said after the loop's last step until the run names its phase (saving, exporting, a final sample).
_AFTER_LOOP = "saving the adapter, exporting and checking its files, drawing the final sample…"


def _newest(history, kind: str, after=None):
    """The newest event of a kind (after the event `after`, when given)."""
    for event in reversed(history):
        if event is after:
            return None
        if event.kind == kind:
            return event
    return None


def _newest_note(history, after=None) -> str:
    """What the run does now, in words: its newest phase or progress note (after `after`, when given)."""
    from studio import events as ev

    describe = getattr(ev, "describe", None)
    for event in reversed(history):
        if event is after:
            return ""
        if event.kind in ("phase", "progress") and event.message:
            return describe(event) if describe else event.message
    return ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
