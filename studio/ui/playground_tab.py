"""Playground tab: base model plus any number of adapters (the studio's runs, or LoRA and embedding files
from other tools), a scale slider per adapter, base vs adapted, and the files to take home."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr

from studio import hosting
from studio.errors import StudioError
from studio.ui import forms
from studio.ui.context import Studio, friendly

DISPLAY_MIN = 256  # small models draw 64 px images; show them enlarged with sharp pixels
FILE_PREFIX = "file:"  # picker value of a file kept in the workspace's adapter-files folder
DEFAULT_PROMPT = "a photo of sks stuffed animal"


def for_display(image):
    """Enlarge a small image by a whole factor, nearest neighbour, so its pixels stay honest."""
    factor = DISPLAY_MIN // max(image.size)
    if factor < 2:
        return image
    return image.resize((image.width * factor, image.height * factor), resample=0)


def choice_path(studio: Studio, value: str):
    """A picker's value as a path: 'run' is the run's final adapter, 'run@step-000015' that checkpoint,
    'file:NAME.safetensors' a file added to the workspace, and a path ending in .safetensors that file."""
    value = str(value)
    if value.startswith(FILE_PREFIX):
        return studio.workspace.adapter_files / Path(value[len(FILE_PREFIX):]).name
    weights = value.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin"))
    if weights or ("/" in value and "@" not in value):  # 'run@checkpoint' names a checkpoint, never a path
        return studio.user_folder(value, "an adapter file")  # run ids hold no '/'; shared: inside the workspace
    run_id, _, checkpoint = value.partition("@")
    root = studio.workspace.run(run_id).root
    if not checkpoint:
        return root
    folder = root / "checkpoints" / checkpoint
    if folder.parent != root / "checkpoints" or not folder.is_dir():
        raise StudioError(f"Run '{run_id}' has no checkpoint '{checkpoint}'; pick the run, or one of its checkpoints.")
    return folder


def has_scale(studio: Studio, value: str | None) -> bool:
    """Whether the chosen adapter has a strength; unknown or unfinished runs keep the slider."""
    if not value:
        return True  # before importing the adapters (and torch): an empty row is drawn on every page load
    from studio.adapters import community, find_adapter_dir, read_meta

    try:
        path = choice_path(studio, value)
        if Path(path).is_file():
            return community.embedding_word(Path(path)) is None
        return read_meta(find_adapter_dir(path)).has_scale
    except StudioError:
        return True


def adapter_options(studio: Studio, extra: list[str] = ()) -> list:
    """Picker choices: the runs (newest first), then the files added in the Playground, then `extra`."""
    files = [(f"file: {n}", FILE_PREFIX + n) for n in studio.workspace.list_adapter_files()]
    known = {v for _, v in files} | set(studio.workspace.list_runs())
    return [(r, r) for r in studio.workspace.list_runs()] + files + [(e, e) for e in extra if e and e not in known]


def new_row(rows: list[dict], value: str | None = None, scale: float = 1.0, note: str = "") -> dict:
    return {"key": max([r["key"] for r in rows], default=-1) + 1, "value": value, "scale": scale, "note": note}


def follow(prompt: str, auto: str, studio: Studio, value: str | None):
    """Updates of (prompt, auto prompt) after choosing `value`: the prompt becomes the adapter's own words
    unless the person has written a prompt of their own (one that differs from the last suggestion).
    Unchanged values are no updates, so an event that read the form before a previous one changed it
    does not write the old prompt back."""
    suggestion = suggestion_for(studio, value)
    if suggestion is None or (prompt or "").strip() != (auto or "").strip():
        return gr.update(), gr.update()
    return suggestion, suggestion


def suggestion_for(studio: Studio, value: str | None) -> str | None:
    """The prompt the studio suggests for an adapter choice (its run's trigger and class words), if any."""
    from studio.generate import suggested_prompt

    try:
        return suggested_prompt(str(choice_path(studio, value))) if value else None
    except StudioError:
        return None


def open_run(studio: Studio, value: str, scale: float, prompt: str, auto: str):
    """rows, options, prompt, auto for opening one run (or checkpoint) at a scale, as the Evaluate tab does."""
    rows = [new_row([], value, float(scale))]
    prompt, auto = follow(prompt, auto, studio, value)
    return rows, adapter_options(studio, [value]), prompt, auto, rows


def add_file(studio: Studio, model: str, source: str, rows: list[dict], keep: bool) -> tuple[list[dict], str]:
    """Load a file onto the base model and add it as a row; (rows, sentence). `keep`: copy an upload into
    the workspace (its temporary copy goes away) and pick it by name."""
    source = Path(source)
    target = studio.workspace.adapter_files / source.name if keep else source
    if keep:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    try:
        report = hosting.gpu(studio.playground.file_report, 60)(model, str(target))
    except StudioError:
        if keep:
            target.unlink(missing_ok=True)  # a refused upload is not kept
        raise
    value = FILE_PREFIX + target.name if keep else str(target)
    rows = [r for r in rows if r["value"] != value]
    empty = next((r for r in rows if not r["value"]), None)
    if empty is not None:
        empty.update(value=value, note=report.summary())
    else:
        rows = rows + [new_row(rows, value, 1.0, report.summary())]
    return rows, report.summary()


def build(studio: Studio, model_box: gr.Textbox) -> dict:
    rows = gr.State([new_row([])])  # one empty adapter row to start with
    options = gr.State(adapter_options(studio))
    auto = gr.State(DEFAULT_PROMPT)  # the last prompt the studio suggested
    with gr.Row():
        add = gr.Button("Add adapter", elem_id="play-add", scale=0)
        upload = gr.UploadButton("Add a LoRA or embedding file (.safetensors)", file_types=[".safetensors"],
                                 file_count="single", elem_id="play-upload", scale=1)
        path_box = gr.Textbox(label="…or the path of one on this machine", elem_id="play-path", scale=2,
                              placeholder="/home/me/loras/style.safetensors", visible=not studio.shared)
        add_path = gr.Button("Add path", elem_id="play-add-path", scale=0, visible=not studio.shared)
    file_note = gr.Markdown(elem_id="play-file-note")

    # The adapter rows are drawn here, below the buttons that add them; the controls further down (declared
    # after this function, which first runs when the page loads) are wired to them on every redraw.
    @gr.render(inputs=[rows, options])
    def adapter_rows(row_list, opts):
        pickers, sliders, removes = [], [], []
        for i, row in enumerate(row_list):
            with gr.Row(key=f"row-{row['key']}"):
                pickers.append(gr.Dropdown(opts, value=row["value"], label=f"Adapter {i + 1}", allow_custom_value=True,
                                           key=f"pick-{row['key']}", elem_id=f"play-adapter-{i}", scale=3,
                                       interactive=True))
                sliders.append(gr.Slider(-0.5, 1.5, value=row["scale"], step=0.05, label="Scale",
                                         key=f"scale-{row['key']}", elem_id=f"play-scale-{i}", scale=3,
                                         visible=has_scale(studio, row["value"]), interactive=True))
                remove = gr.Button("Remove", key=f"remove-{row['key']}", elem_id=f"play-remove-{i}", scale=0,
                                   min_width=80)
            removes.append(remove)
            if row.get("note"):
                gr.Markdown(row["note"], key=f"note-{row['key']}", elem_id=f"play-note-{i}")
        n = len(row_list)
        for i, remove in enumerate(removes):
            remove.click(lambda rl, *v, i=i: _without(kept(rl, *_split(v)), i), [rows, *pickers, *sliders],
                         [rows, saved_rows], show_progress="hidden")
        for i, picker in enumerate(pickers):
            picker.input(lambda rl, text, au, box, *v, i=i: _picked(studio, kept(rl, *_split(v)), i, text, au, box),
                         [rows, prompt, auto, model_box, *pickers, *sliders], [rows, prompt, auto, saved_rows, model_box],
                         show_progress="hidden")
        add.click(lambda rl, *v: _added(kept(rl, *_split(v))), [rows, *pickers, *sliders], [rows, saved_rows],
                  show_progress="hidden")

        @friendly
        def on_generate(row_list, *values):
            fixed_v, picks, scales = values[:6], values[6:6 + n], values[6 + n:]
            req = request(fixed_v, picks, scales)
            start = time.perf_counter()
            base, adapted = hosting.gpu(studio.playground.generate_pair, 60)(req)  # one GPU call on ZeroGPU
            from studio.generate import NOTICE

            note = adapted.info.get(NOTICE)
            return (for_display(base), for_display(adapted),
                    f"Base and adapted rendered in {time.perf_counter() - start:.2f} s." + (f" {note}" if note else ""),
                    kept(row_list, picks, scales))

        @friendly
        def on_scale(row_list, *values):
            """Only the adapted image changes: scales are set in place, no weights reload."""
            fixed_v, picks, scales = values[:6], values[6:6 + n], values[6 + n:]
            req = request(fixed_v, picks, scales)
            set_s = studio.playground.set_scales(req.model, req.adapters)
            start = time.perf_counter()
            adapted = hosting.gpu(studio.playground.generate, 60)(req)
            from studio.generate import NOTICE

            note = adapted.info.get(NOTICE)
            return (for_display(adapted), f"Scale applied in {set_s * 1000:.1f} ms (no reload); image in "
                    f"{time.perf_counter() - start:.2f} s." + (f" {note}" if note else ""), kept(row_list, picks, scales))

        @friendly
        def on_upload(row_list, file, model_text, *values):
            if file is None:
                return gr.update(), gr.update(), gr.update(), gr.update()
            model = studio.user_model(model_text or studio.default_model)
            new_rows, sentence = add_file(studio, model, file if isinstance(file, str) else file.name,
                                          kept(row_list, *_split(values)), keep=True)
            return new_rows, adapter_options(studio), sentence, new_rows

        @friendly
        def on_path(row_list, text, model_text, *values):
            if not (text or "").strip():
                raise StudioError("Type the path of a .safetensors LoRA or embedding file first.")
            path = choice_path(studio, text.strip())
            model = studio.user_model(model_text or studio.default_model)
            new_rows, sentence = add_file(studio, model, str(path), kept(row_list, *_split(values)), keep=False)
            return new_rows, adapter_options(studio, [r["value"] for r in new_rows if r["value"]]), sentence, new_rows

        @friendly
        def on_home(*values):
            fixed_v, picks, scales = values[:6], values[6:6 + n], values[6 + n:]
            return take_home(studio, fixed_v, picks, scales)

        generate.click(on_generate, [rows, *fixed, *pickers, *sliders], [base_image, adapted_image, timing, saved_rows],
                       concurrency_id="gpu")
        for slider in sliders:  # dragging (release) and typing a number (input) both re-render
            gr.on([slider.release, slider.input], on_scale, [rows, *fixed, *pickers, *sliders],
                  [adapted_image, timing, saved_rows], concurrency_id="gpu", trigger_mode="always_last")
        upload.upload(on_upload, [rows, upload, model_box, *pickers, *sliders], [rows, options, file_note, saved_rows],
                      concurrency_id="gpu")
        add_path.click(on_path, [rows, path_box, model_box, *pickers, *sliders], [rows, options, file_note, saved_rows],
                       concurrency_id="gpu")
        home_button.click(on_home, [*fixed, *pickers, *sliders], [home_text, home_files])

    with gr.Row():
        prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Prompt", scale=3, elem_id="play-prompt")
        negative = gr.Textbox(value="", label="Negative prompt", scale=2)
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed")
        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
        # The pocket model's card measures it at guidance 5 (assets/pocket-sd/README.md); SD's usual 7.5 otherwise.
        pocket = studio.default_model in ("builtin", "tiny")
        guidance = gr.Slider(1.0, 15.0, value=5.0 if pocket else 7.5, step=0.5, label="Guidance",
                             elem_id="play-guidance")
        generate = gr.Button("Generate", variant="primary", elem_id="play-generate")
        refresh = gr.Button("Refresh runs")
    with gr.Row():
        base_image = gr.Image(label="Base (scale 0)", type="pil", height=320, elem_id="play-base")
        adapted_image = gr.Image(label="With adapters", type="pil", height=320, elem_id="play-adapted")
    timing = gr.Markdown(elem_id="play-timing")
    with gr.Accordion("Take it home: ComfyUI, AUTOMATIC1111/Forge, diffusers", open=False):
        home_button = gr.Button("Prepare files for the first run above", elem_id="play-home")
        home_text = gr.Markdown(elem_id="play-home-text")
        home_files = gr.File(label="Files to download", file_count="multiple", elem_id="play-home-files")

    form = {"prompt": prompt, "negative": negative, "seed": seed, "steps": steps, "guidance": guidance}
    done = gr.State(False)  # this page has its form and rows: restored from the browser, or edited
    saved = forms.remember("playground-form", form, edited=done)
    saved_rows = gr.BrowserState([], storage_key="concept-studio-playground-adapters", secret=forms._SECRET)
    fixed = [model_box, prompt, negative, seed, steps, guidance]

    def request(values, picks, scales):
        from studio.generate import AdapterChoice, GenerateRequest

        model_text, text, neg, seed_v, steps_v, guidance_v = values
        choices = [AdapterChoice(str(choice_path(studio, p)), float(s)) for p, s in zip(picks, scales) if p]
        model = studio.user_model(model_text or studio.default_model)  # shared: builtin, hub ids, the host's list
        return GenerateRequest(text, model, choices, neg, int(seed_v or 0), int(steps_v), float(guidance_v))

    def kept(row_list, picks, scales):
        """The rows as shown now (what a reload brings back)."""
        return [{**r, "value": p, "scale": float(s)} for r, p, s in zip(row_list, picks, scales)]

    refresh.click(lambda rl: adapter_options(studio, [r["value"] for r in rl]), [rows], [options])

    def restore(values, adapters):
        """The form and the adapters as the person left them; runs and files that are gone are left out."""
        known = {v for _, v in adapter_options(studio)}
        back = [r for r in (adapters or []) if isinstance(r, dict) and "key" in r
                and (not r.get("value") or r["value"] in known or Path(str(r["value"])).is_file())]
        extra = [r["value"] for r in back if r.get("value") and r["value"] not in known]
        updates = forms.restored(values, list(form))
        text = (values or {}).get("prompt")
        first = next((r["value"] for r in back if r.get("value")), None)
        # A stored prompt the studio had suggested stays a suggestion (a later pick may replace it); one the
        # person wrote stays theirs, so that no adapter row drawn after the reload writes over it.
        auto_update = text if text and text.strip() in (DEFAULT_PROMPT, suggestion_for(studio, first)) else gr.update()
        # A stored form without a prompt of the person's: the restored run's words are suggested again. Not
        # before the stored form is known: a read of the rows alone must not write over a prompt it holds.
        if forms.known(values) and not text and first:
            updates[0], auto_update = follow(DEFAULT_PROMPT, DEFAULT_PROMPT, studio, first)
        return [*updates, back or gr.update(), adapter_options(studio, extra), auto_update]

    outputs = [*form.values(), rows, options, auto]

    def once(values, adapters, already):
        """Apply the stored form and rows once per page, whenever either becomes known: each BrowserState
        may be read after the page's load event, and then arrives as a change of that state. An edit of
        the form, or a first restore, ends it, so a late read never undoes what the person did."""
        if already or not (forms.known(values) or forms.known(adapters)):
            return [*[gr.update() for _ in outputs], already]
        return [*restore(values, adapters), True]

    for state in (saved, saved_rows):
        state.change(once, [saved, saved_rows, done], [*outputs, done], show_progress="hidden",
                     api_visibility="private")
    return {"rows": rows, "options": options, "prompt": prompt, "auto": auto, "generate": generate,
            "saved_rows": saved_rows,
            "restore": dict(fn=once, inputs=[saved, saved_rows, done], outputs=[*outputs, done],
                            show_progress="hidden")}


def _split(values: tuple) -> tuple[list, list]:
    """(picker values, slider values) from the flat inputs [*pickers, *sliders]."""
    half = len(values) // 2
    return list(values[:half]), list(values[half:])


def _without(rows: list[dict], index: int):
    rest = [r for i, r in enumerate(rows) if i != index] or [new_row(rows)]
    return rest, rest


def _added(rows: list[dict]):
    rows = rows + [new_row(rows)]
    return rows, rows


def _picked(studio: Studio, rows: list[dict], index: int, prompt: str, auto: str, model: str):
    rows[index]["note"] = ""
    prompt, auto = follow(prompt, auto, studio, rows[index]["value"])
    return rows, prompt, auto, rows, _recorded_base(studio, rows[index]["value"], model)


def _recorded_base(studio: Studio, value: str | None, current: str):
    """The model box set to the checkpoint file a picked run was trained on (unchanged otherwise)."""
    from studio.generate import recorded_base

    try:
        found = recorded_base([str(choice_path(studio, value))]) if value else None
    except StudioError:
        found = None
    return gr.update(value=found[0]) if found and found[0] != current else gr.update()


def take_home(studio: Studio, fixed: tuple, picks: list, scales: list):
    """The take-home panel for the first chosen run: its text, and the files under their clients' names."""
    from studio import takehome

    model_text, text, neg, seed, steps, guidance = fixed
    runs = [(p, s) for p, s in zip(picks, scales) if p and not Path(str(choice_path(studio, p))).is_file()]
    if not runs:
        raise StudioError("Choose one of your runs above first; the take-home files are those of a run.")
    value, scale = runs[0]
    playground = studio.playground
    settings = takehome.Settings(text, neg or "", float(scale), int(seed or 0), int(steps), float(guidance),
                                 playground.native_size(), model_text or "", playground.scheduler_name())
    plan = takehome.plan(choice_path(studio, value), str(value).replace("@", "-"), settings)
    out = Path(tempfile.mkdtemp(prefix="concept-studio-home-"))
    files = plan.write(out)
    return plan.markdown(), [studio.servable(f) for f in files]
