"""Dataset tab: upload photos, orient and crop them, caption, save a dataset folder."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.data.captions import DEFAULT_TEMPLATE
from studio.ui.context import Studio, friendly


def build(studio: Studio, default_resolution: int) -> dict:
    gr.Markdown("Upload 3–20 photos of your concept. They are turned upright from their EXIF orientation, "
                "cropped to a centred square and resized to the training resolution.")
    with gr.Row():
        files = gr.File(label="Photos", file_count="multiple", file_types=["image"], elem_id="dataset-upload")
        with gr.Column():
            token = gr.Textbox(value="sks", label="Trigger word", info="a rare word that will name your concept")
            class_word = gr.Textbox(value="stuffed animal", label="Class word", info="what it is: dog, mug, plushie…")
            template = gr.Textbox(value=DEFAULT_TEMPLATE, label="Caption template")
            resolution = gr.Number(value=default_resolution, precision=0, label="Resolution (px)",
                                   info="64 for the built-in model, 512 for Stable Diffusion 1.5")
    prepare = gr.Button("Prepare photos", variant="primary", elem_id="dataset-prepare")
    problems = gr.Markdown(elem_id="dataset-problems")
    gallery = gr.Gallery(label="What will train", columns=6, height=220, elem_id="dataset-gallery")
    captions = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], interactive=True,
                            label="Captions (edit any cell)", elem_id="dataset-captions")
    with gr.Row():
        name = gr.Textbox(value="my-concept", label="Dataset name", elem_id="dataset-name")
        save = gr.Button("Save dataset", elem_id="dataset-save")
    saved = gr.Markdown(elem_id="dataset-saved")
    prepared = gr.State([])

    prepare.click(friendly(_prepare), [files, token, class_word, template, resolution],
                  [prepared, gallery, captions, problems])
    save.click(friendly(lambda *a: _save(studio, *a)), [prepared, captions, name, token, class_word, resolution, template],
               [saved])
    return {"saved": saved}


def _prepare(files, token, class_word, template, resolution):
    from studio.data.captions import render
    from studio.data.dataset import prepare_photos

    if not files:
        raise gr.Error("No photos were uploaded; add some images first.", print_exception=False)
    paths = [Path(f if isinstance(f, str) else f.name) for f in files]
    prepared, problems = prepare_photos([(p, p.name) for p in paths], int(resolution))
    caption = render(template, token, class_word)
    rows = [[item.source, caption] for item in prepared]
    note = "\n".join(f"- {p}" for p in problems)
    if problems:
        note = f"**{len(problems)} file(s) skipped, {len(prepared)} kept:**\n{note}"
    return prepared, [(item.image, item.source) for item in prepared], rows, note


def _rows(captions) -> list[list[str]]:
    if captions is None:
        return []
    if hasattr(captions, "values"):  # a pandas DataFrame
        return captions.values.tolist()
    return list(captions)


def _save(studio: Studio, prepared, captions, name, token, class_word, resolution, template):
    from studio.data.dataset import save_dataset

    if not prepared:
        raise gr.Error("There are no prepared photos to save; upload photos and press Prepare first.", print_exception=False)
    rows = _rows(captions)
    texts = [str(r[1]) if len(r) > 1 and str(r[1]).strip() else "" for r in rows][: len(prepared)]
    texts += [""] * (len(prepared) - len(texts))
    if not all(texts):
        raise gr.Error("Every image needs a caption; fill the empty cells.", print_exception=False)
    paths = studio.workspace.dataset(name)
    spec = save_dataset(paths, prepared, texts, token, class_word, int(resolution), template)
    where = paths.root.relative_to(studio.workspace.root) if paths.root.is_relative_to(studio.workspace.root) else paths.root
    return f"Saved **{len(spec.items)}** images to `{where}` as dataset **{paths.root.name}**."
