"""Evaluate tab: concept fidelity against prompt fidelity for runs, checkpoints and scales, against the
baselines; a recommendation with one click to open it in the Playground. Runs as a background job."""

from __future__ import annotations

import shutil
import time

import gradio as gr

from studio import fields
from studio.errors import StudioError
from studio.evaluate.settings import EvalConfig, parse_list, text_of
from studio.ui import forms
from studio.ui.context import Studio, friendly

# The form's words for EvalConfig's prompt kinds (the keys of its Literal); the one place they are mapped.
KIND_LABELS = {"training captions": "training", "DreamBench + your prompts": "generalization",
               "without the trigger (leak)": "agnostic", "context pairs": "context"}
DEFAULTS = fields.defaults_of(EvalConfig)
# The built-in pocket model knows plain backgrounds, not forests or beaches: its contexts are the walkthrough's,
# two backgrounds its concept never appears on; and it is drawn at guidance 5, as its model card measures it
# (assets/pocket-sd/README.md).
POCKET_CONTEXTS = ["on a red background", "on a blue background"]
POCKET_GUIDANCE = 5.0
# The form starts with a sweep of two scales, so its first plot already shows a trade-off; the CLI keeps
# EvalConfig's single scale (the README's walkthrough figures are at scale 1).
FORM_SCALES = [0.5, 1.0]
_CANCELLING: set[str] = set()  # ids of evaluation jobs asked to stop that have not stopped yet
_FIRST_IMAGE: dict[str, tuple[float, int]] = {}  # evaluation folder -> (time, count) when images began


def _control(kind, name: str, **kw):
    """A form control for EvalConfig's field `name`: its label and help come from the dataclass."""
    return kind(label=fields.label_of(EvalConfig, name), info=fields.help_of(EvalConfig)[name], **kw)


def build(studio: Studio, model_box: gr.Textbox, default_clip: str) -> dict:
    pocket = bool(default_clip)  # the built-in model (or the tiny test model) and its own CLIP
    gr.Markdown("Does the model reproduce **your concept** (CLIP-I, DINO: generated images against your photos) "
                "and still **follow prompts** (CLIP-T: image against its prompt)? Each run is swept over "
                "checkpoints and scales; upper right is best, the dashed line is your photos against each other.")
    with gr.Row():
        runs = _control(gr.Dropdown, "runs", choices=studio.workspace.list_runs(), multiselect=True,
                        elem_id="eval-runs", allow_custom_value=True)
        dataset = _control(gr.Dropdown, "dataset", choices=studio.workspace.list_datasets(), elem_id="eval-dataset",
                           allow_custom_value=True)
        clip = _control(gr.Textbox, "clip", value=default_clip or DEFAULTS["clip"])
        dino = _control(gr.Textbox, "dino", value="none" if pocket else DEFAULTS["dino"])
    with gr.Row():
        kinds = _control(gr.CheckboxGroup, "kinds", choices=list(KIND_LABELS), elem_id="eval-kinds",
                         value=[label for label, key in KIND_LABELS.items() if key in DEFAULTS["kinds"]])
        per_kind = _control(gr.Number, "per_kind", value=DEFAULTS["per_kind"], precision=0)
        scales = _control(gr.Textbox, "scales", value=text_of(FORM_SCALES), elem_id="eval-scales")
        checkpoints = _control(gr.Radio, "checkpoints", value=DEFAULTS["checkpoints"],
                               choices=list(fields.kind(fields.types_of(EvalConfig)["checkpoints"])[1]))
    with gr.Row():
        seeds = _control(gr.Number, "seeds", value=DEFAULTS["seeds"], precision=0, elem_id="eval-seeds")
        steps = _control(gr.Number, "steps", value=DEFAULTS["steps"], precision=0, elem_id="eval-steps")
        guidance = _control(gr.Number, "guidance", value=POCKET_GUIDANCE if pocket else DEFAULTS["guidance"],
                            elem_id="eval-guidance")
        own = _control(gr.Textbox, "prompts", value="\n".join(DEFAULTS["prompts"]), lines=2)
        contexts = _control(gr.Textbox, "contexts", lines=3, elem_id="eval-contexts",
                            value="\n".join(POCKET_CONTEXTS if pocket else DEFAULTS["contexts"]))
    with gr.Row():
        start = gr.Button("Run evaluation", variant="primary", elem_id="eval-start")
        cancel = gr.Button("Cancel", variant="stop")
        refresh = gr.Button("Refresh lists")
    plan = gr.Markdown(elem_id="eval-plan")  # the images Start would draw and their time, from earlier probes
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
    timer = gr.Timer(1.0, active=False)  # ticks while an evaluation goes, and once to draw one on load

    form = dict(runs=runs, dataset=dataset, clip=clip, dino=dino, kinds=kinds, per_kind=per_kind, scales=scales,
                checkpoints=checkpoints, seeds=seeds, steps=steps, guidance=guidance, own=own, contexts=contexts)
    done = gr.State(False)  # this page has its form: restored from the browser, or edited
    saved = forms.remember("eval-form", form, edited=done)

    @friendly
    def on_start(data):
        try:
            return (*_start(studio, studio.user_model(data[model_box] or studio.default_model),
                            {k: data[c] for k, c in form.items()}), gr.Timer(active=True))
        except (gr.Error, StudioError) as exc:  # one sentence where the eye is, and a toast
            message = getattr(exc, "message", None) or str(exc)
            gr.Warning(message)
            return gr.update(), f"**Not started:** {message}", gr.update()

    start.click(on_start, {model_box, *form.values()}, [folder, status, timer]).then(
        forms.saver(form, edited=done), list(form.values()), [saved, done], show_progress="hidden")
    cancel.click(lambda: _cancel(studio), None, [status])
    drawn = gr.State(None)  # the finished evaluation on the page: redrawn only when it changes
    view = [status, scatter, heatmap, grid, table, files, advice, open_best, best, references, drawn]
    timer.tick(lambda f, d: _tick(studio, f, d), [folder, drawn], [*view, timer], show_progress="hidden")
    plan_inputs = [model_box, *form.values()]

    def on_plan(model, *values):
        return forecast(studio, model, dict(zip(form, values)))

    for control in plan_inputs:
        control.change(on_plan, plan_inputs, [plan], show_progress="hidden")
    drawn.change(on_plan, plan_inputs, [plan], show_progress="hidden")  # a finished evaluation timed its images
    refresh.click(lambda: (gr.update(choices=studio.workspace.list_runs()),
                           gr.update(choices=studio.workspace.list_datasets())), None, [runs, dataset])
    # A run trained on a checkpoint file reopens on it: picking one shows that file as the base model.
    runs.change(lambda picked, current: _recorded_base(studio, picked, current), [runs, model_box], [model_box],
                show_progress="hidden")

    def restore(values, shown):
        values = values or _settings_form(shown)
        allowed = {"runs": lambda v: isinstance(v, list) and set(v) <= set(studio.workspace.list_runs()),
                   "dataset": lambda v: v in studio.workspace.list_datasets(),
                   "kinds": lambda v: isinstance(v, list) and set(v) <= set(KIND_LABELS)}
        return [*forms.restored(values, list(form), allowed), gr.Timer(active=True)]  # one tick draws `shown`

    outputs = [*form.values(), timer]
    once = forms.restore_once(saved, done, restore, [folder], outputs)
    return {"runs": runs, "dataset": dataset, "folder": folder, "open": open_best, "best": best,
            "restore": dict(fn=once, inputs=[saved, done, folder], outputs=[*outputs, done],
                            show_progress="hidden")}


def _settings_form(folder: str | None) -> dict:
    """The form an evaluation on display was run with (a fresh browser shows it beside its results)."""
    from pathlib import Path

    import yaml

    from studio.evaluate.settings import read_settings

    try:
        cfg = read_settings(Path(folder))["config"] if folder else None
    except (OSError, KeyError, TypeError, yaml.YAMLError):  # none written yet (still drawing), or damaged
        return {}
    if not isinstance(cfg, dict):
        return {}
    labels = {key: label for label, key in KIND_LABELS.items()}
    return dict(runs=[Path(r).name for r in cfg.get("runs", [])], dataset=Path(cfg.get("dataset", "")).name,
                kinds=[labels[k] for k in cfg.get("kinds", []) if k in labels], per_kind=cfg.get("per_kind"),
                scales=text_of(cfg.get("scales", [])), checkpoints=cfg.get("checkpoints"),
                seeds=cfg.get("seeds"), steps=cfg.get("steps"), guidance=cfg.get("guidance"),
                own="\n".join(cfg.get("prompts", [])), contexts="\n".join(cfg.get("contexts", [])))


def _cancel(studio: Studio) -> str:
    job = studio.jobs.current()
    if job is not None and job.kind == "evaluate" and studio.jobs.cancel():
        _CANCELLING.add(job.job_id)
        return "Cancelling after the current image; the images drawn so far will be deleted."
    gr.Info("No evaluation is running.")
    return gr.update()  # the status line keeps what it shows


def _tick(studio: Studio, folder, drawn):
    job = studio.jobs.current()
    live = job is not None and job.kind == "evaluate" and job.active
    return [*_view(studio, folder, drawn), gr.Timer(active=live)]


def latest_folder(studio: Studio) -> str | None:
    """The evaluation a fresh page shows: the running one, else the newest on disk."""
    job = studio.jobs.current()
    if job is not None and job.kind == "evaluate":
        return str(job.folder)
    folders = sorted(studio.workspace.evals.glob("*/events.jsonl")) if studio.workspace.evals.is_dir() else []
    return str(folders[-1].parent) if folders else None


def _recorded_base(studio: Studio, picked, current: str):
    """The model box set to the checkpoint file the first picked run was trained on (unchanged otherwise)."""
    from studio.generate import recorded_base

    known = set(studio.workspace.list_runs())
    found = recorded_base([str(studio.workspace.run(r).root) for r in picked or [] if r in known])
    return gr.update(value=found[0]) if found and found[0] != current else gr.update()


def _config(studio: Studio, model, data: dict):
    """The EvalConfig of the form, every choice checked (one sentence for the first wrong one)."""
    from pathlib import Path

    if not data["runs"]:
        raise gr.Error("Choose at least one run to evaluate in 'Runs'; the base model alone has nothing to "
                       "compare against.", print_exception=False)
    if not data["dataset"]:
        raise gr.Error("Choose the dataset the runs were trained on.", print_exception=False)
    scales = parse_list("scales", data["scales"], f"'{fields.label_of(EvalConfig, 'scales')}'")
    from studio.adapters import find_adapter_dir
    from studio.data.dataset import load_dataset

    load_dataset(studio.workspace.dataset(data["dataset"]).root)  # bad choices: one sentence now, no job
    run_dirs = [str(studio.workspace.run(r).root) for r in (data["runs"] or [])]
    for run in run_dirs:
        find_adapter_dir(Path(run))
    return EvalConfig(dataset=str(studio.workspace.dataset(data["dataset"]).root), runs=run_dirs, model=model,
                      clip=studio.user_model(data["clip"], "the CLIP model"),
                      dino=studio.user_model(data["dino"], "the DINO model", ("none",)),
                      kinds=[KIND_LABELS[k] for k in data["kinds"] or []], prompts=_lines(data["own"]),
                      contexts=_lines(data["contexts"]), scales=scales, checkpoints=data["checkpoints"],
                      **{name: _number(data[name], name) for name in ("per_kind", "seeds", "steps", "guidance")})


def _number(value, name: str):
    """A number box's value for EvalConfig's field `name`: an emptied box is the field's default, a whole
    float (as a browser may send 2.0) an int where the field is one; anything else EvalConfig judges."""
    if value is None or value == "":
        return DEFAULTS[name]
    if fields.types_of(EvalConfig)[name] is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def forecast(studio: Studio, model, data: dict) -> str:
    """The line under Run evaluation: how many images the form's settings draw and, from the newest earlier
    evaluation at the same settings, how long they take here ('' while the form cannot start one)."""
    from studio.evaluate.protocol import count_images
    from studio.timings import eval_forecast

    try:
        cfg = _config(studio, studio.user_model(model or studio.default_model), data)
        images, points, prompts = count_images(cfg)
    except (gr.Error, StudioError, OSError, ValueError, TypeError):
        return ""
    return (f"{images} images ({points} points × {prompts} prompts × {cfg.seeds} seeds). "
            + eval_forecast(studio.workspace.evals, vars(cfg), images).message)


def _start(studio: Studio, model, data: dict):
    from studio import hosting
    from studio.evaluate.protocol import evaluate

    cfg = _config(studio, model, data)
    out = studio.workspace.evals / time.strftime("%Y%m%d-%H%M%S")

    def work(should_stop):  # the report is written by evaluate, before its last event
        result = evaluate(cfg, out, should_stop=should_stop, playground=hosting.GpuPlayground(studio.playground))
        if getattr(result, "status", "") == "cancelled":  # no half evaluation is left behind
            shutil.rmtree(out, ignore_errors=True)
        return result

    told = _size(cfg)
    studio.jobs.start("evaluate", out.name, out, work)
    return str(out), f"Evaluation started{told}: loading the models; the time per image is measured on the first ones…"


def _size(cfg) -> str:
    """' — 108 images (3 points × 18 prompts × 2 seeds)', said before anything loads."""
    from studio.evaluate import protocol

    count = getattr(protocol, "count_images", None)
    if count is None:
        return ""
    images, points, prompts = count(cfg)
    return f" — {images} images ({points} points × {prompts} prompts × {cfg.seeds} seeds)"


def _running_line(folder: str, history) -> str:
    """Where a running evaluation is: its newest phase (loading, embedding, scoring, the report) or image
    count with an ETA, and the estimate it was given."""
    now = None
    for event in reversed(history):
        if event.kind == "phase" or (event.kind == "progress" and event.total):
            now = event
            break
    estimate = next((e for e in reversed(history) if e.kind == "estimate"), None)
    if now is None:
        text = "Loading models…"
    elif now.kind == "phase":
        text = now.message
    else:
        text = _progress_line(folder, now)
    return text + (f"\n\n{estimate.message}" if estimate is not None else "")


def _progress_line(folder: str, progress) -> str:
    """'Generating 12/108: prompt · ETA 2 min', the rate measured from the first image on (model loading
    is not counted); after the last image, the phase that follows."""
    if progress.done >= progress.total:
        return f"{progress.message or 'Embedding and scoring'} ({progress.total} images drawn)"
    now = time.monotonic()
    first = _FIRST_IMAGE.setdefault(folder, (now, progress.done))
    line = f"Generating {progress.done + 1}/{progress.total}: {progress.message}"
    if getattr(progress, "eta_s", None) is not None:  # the evaluation's own clock
        line += f" · ETA {_duration(progress.eta_s)}"
    elif progress.done > first[1]:
        rate = (now - first[0]) / (progress.done - first[1])
        line += f" · {rate:.1f} s/image · ETA {_duration(rate * (progress.total - progress.done))}"
    return line


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


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
    mine = job is not None and job.kind == "evaluate" and Path(folder) == Path(job.folder)
    if mine and job.job_id in _CANCELLING:
        if job.active:
            return ["Cancelling after the current image…"] + keep[1:]
        if not Path(folder).exists():
            return ["Evaluation cancelled; the images it had drawn were deleted and nothing was kept."] + keep[1:]
    finished = next((e for e in reversed(history) if isinstance(e, ev.Finished)), None)
    if finished is None:
        if job is not None and job.kind == "evaluate" and job.status == "failed":
            return [f"Evaluation failed: {job.message}"] + keep[1:]
        if job is not None and job.kind == "evaluate" and job.status == "queued":
            return [f"Waiting for the accelerator: {studio.jobs.position(job)} job(s) ahead (other sessions' work)."] \
                + keep[1:]
        return [_running_line(str(folder), history)] + keep[1:]
    from studio.evaluate.protocol import RECOMMENDATION, SUMMARY_CSV, read_results
    from studio.evaluate.settings import read_settings
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
    return [status, plots.tradeoff(summary, rec, refs), plots.prompt_heatmap(images), studio.servable(grid) if grid.exists() else None,
            shown, [studio.servable(root / f) for f in ("results.csv", SUMMARY_CSV, RECOMMENDATION)], advice,
            gr.update(visible=rec is not None), rec,
            gr.update(value=pd.DataFrame(refs), visible=bool(refs)), key]


def playground_value(rec: dict | None) -> str | None:
    """The Playground picker's value for a recommended point: 'run' or 'run@step-000015' (a checkpoint)."""
    if not rec:
        return None
    from pathlib import Path

    adapter = Path(rec["adapter"])
    return rec["run"] if adapter.name == "adapter" else f"{rec['run']}@{adapter.name}"
