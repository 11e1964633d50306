"""Playground tab: base model plus trained adapters, a scale slider per adapter, base vs adapted."""

from __future__ import annotations

import time

import gradio as gr

from studio import hosting
from studio.ui.context import Studio, friendly

SLOTS = 3  # adapters stacked at once; each has its own scale slider
DISPLAY_MIN = 256  # small models draw 64 px images; show them enlarged with sharp pixels


def for_display(image):
    """Enlarge a small image by a whole factor, nearest neighbour, so its pixels stay honest."""
    factor = DISPLAY_MIN // max(image.size)
    if factor < 2:
        return image
    return image.resize((image.width * factor, image.height * factor), resample=0)


def choice_path(studio: Studio, value: str):
    """A picker's value as a folder: 'run' is the run's final adapter, 'run@step-000015' that checkpoint."""
    run_id, _, checkpoint = str(value).partition("@")
    root = studio.workspace.run(run_id).root
    if not checkpoint:
        return root
    folder = root / "checkpoints" / checkpoint
    if folder.parent != root / "checkpoints" or not folder.is_dir():
        from studio.errors import StudioError

        raise StudioError(f"Run '{run_id}' has no checkpoint '{checkpoint}'; pick the run, or one of its checkpoints.")
    return folder


def has_scale(studio: Studio, run_id: str | None) -> bool:
    """Whether the run's adapter kind has a strength; unknown or unfinished runs keep the slider."""
    from studio.adapters import find_adapter_dir, read_meta
    from studio.errors import StudioError

    if not run_id:
        return True
    try:
        return read_meta(find_adapter_dir(choice_path(studio, run_id))).has_scale
    except StudioError:
        return True


def build(studio: Studio, model_box: gr.Textbox) -> dict:
    runs = studio.workspace.list_runs()
    pickers, sliders = [], []
    for i in range(SLOTS):
        with gr.Row():
            pickers.append(gr.Dropdown(runs, value=None, label=f"Adapter {i + 1}", allow_custom_value=True,
                                       elem_id=f"play-adapter-{i}"))
            sliders.append(gr.Slider(-0.5, 1.5, value=1.0, step=0.05, label="Scale", elem_id=f"play-scale-{i}"))
    with gr.Row():
        prompt = gr.Textbox(value="a photo of sks stuffed animal", label="Prompt", scale=3, elem_id="play-prompt")
        negative = gr.Textbox(value="", label="Negative prompt", scale=2)
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed")
        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
        guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Guidance")
        generate = gr.Button("Generate", variant="primary", elem_id="play-generate")
        refresh = gr.Button("Refresh runs")
    with gr.Row():
        base_image = gr.Image(label="Base (scale 0)", type="pil", height=320, elem_id="play-base")
        adapted_image = gr.Image(label="With adapters", type="pil", height=320, elem_id="play-adapted")
    timing = gr.Markdown(elem_id="play-timing")

    inputs = {model_box, prompt, negative, seed, steps, guidance, *pickers, *sliders}

    def request(data):
        from studio.generate import AdapterChoice, GenerateRequest

        choices = [AdapterChoice(str(choice_path(studio, p)), float(data[s]))
                   for p, s in ((data[pk], sl) for pk, sl in zip(pickers, sliders)) if p]
        model = studio.user_model(data[model_box] or studio.default_model)  # shared: builtin, hub ids, the host's list
        return GenerateRequest(data[prompt], model, choices, data[negative],
                               int(data[seed] or 0), int(data[steps]), float(data[guidance]))

    @friendly
    def on_generate(data):
        req = request(data)
        start = time.perf_counter()
        base, adapted = hosting.gpu(studio.playground.generate_pair, 60)(req)  # one GPU call on ZeroGPU
        from studio.generate import NOTICE

        note = adapted.info.get(NOTICE)
        return for_display(base), for_display(adapted), (f"Base and adapted rendered in {time.perf_counter() - start:.2f} s."
                                                         + (f" {note}" if note else ""))

    @friendly
    def on_scale(data):
        """Only the adapted image changes: scales are set in place, no weights reload."""
        req = request(data)
        set_s = studio.playground.set_scales(req.model, req.adapters)
        start = time.perf_counter()
        adapted = hosting.gpu(studio.playground.generate, 60)(req)
        from studio.generate import NOTICE

        note = adapted.info.get(NOTICE)
        return for_display(adapted), (f"Scale applied in {set_s * 1000:.1f} ms (no reload); image in "
                         f"{time.perf_counter() - start:.2f} s." + (f" {note}" if note else ""))

    generate.click(on_generate, inputs, [base_image, adapted_image, timing], concurrency_id="gpu")
    for picker, slider in zip(pickers, sliders):  # an embedding or a full model has no strength to set
        picker.change(lambda run_id: gr.update(visible=has_scale(studio, run_id)), [picker], [slider],
                      show_progress="hidden")
    for slider in sliders:
        slider.release(on_scale, inputs, [adapted_image, timing], concurrency_id="gpu", trigger_mode="always_last")
    refresh.click(lambda: [gr.update(choices=studio.workspace.list_runs()) for _ in pickers], None, pickers)
    return {"pickers": pickers, "sliders": sliders, "prompt": prompt, "generate": generate}
