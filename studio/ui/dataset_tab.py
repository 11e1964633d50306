"""Dataset tab: upload photos, orient and crop them, caption, audit, save a dataset folder.

Thin handlers: each turns component values into the core's options (studio.data.prep), calls one core
function and formats its result.

Wired by name (`_on`): `build` keeps its components in one dict keyed by name; a handler's parameters are
names of that dict, and it returns a NamedTuple whose fields are names of it too. No list of components
has to line up with an argument list, and a misspelt name fails when the page is built.
"""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from studio.data.captioners import CAPTIONER_KINDS, DEFAULT_CAPTIONER
from studio.data.captions import DEFAULT_TEMPLATE
from studio.data.crops import CROP_MODES
from studio.ui.context import Studio, friendly

HEADERS = ["image", "caption", "repeats", "trains at", "crop box (in the original)"]
CAPTION, REPEATS = 1, 2  # columns of the captions table
SHOWN_SIDE = 640  # the original is shown at most this large; clicks are scaled back
FEWEST, MOST = 3, 20  # photos the tab asks for
# The built-in pocket model knows shapes on plain backgrounds: its concept's class word is "shape".
POCKET_CLASS, DEFAULT_CLASS = "shape", "stuffed animal"


def build(studio: Studio, default_resolution: int) -> dict:
    pocket = studio.default_model in ("builtin", "tiny")
    gr.Markdown(f"Upload {FEWEST}–{MOST} photos of your concept (add kohya `.txt` captions or a `metadata.jsonl` to keep "
                "their captions). They are turned upright from their EXIF orientation and cropped so the subject "
                "stays in frame; check each crop below, which is exactly what will train.")
    with gr.Row():
        files = gr.File(label="Photos", file_count="multiple", file_types=["image", ".txt", ".jsonl", ".heic", ".heif"],
                        elem_id="dataset-upload")
        with gr.Column():
            token = gr.Textbox(value="sks", label="Trigger word", info="a rare word that will name your concept",
                               elem_id="dataset-token")
            class_word = gr.Textbox(value=POCKET_CLASS if pocket else DEFAULT_CLASS, label="Class word",
                                    info="what it is: dog, mug, plushie… (the built-in model knows 'shape')",
                                    elem_id="dataset-class-word")
            template = gr.Textbox(value=DEFAULT_TEMPLATE, label="Caption template")
            resolution = gr.Number(value=default_resolution, precision=0, label="Resolution (px)",
                                   info="64 for the built-in model, 512 for Stable Diffusion 1.5")
    with gr.Accordion("Cropping and import", open=False):
        with gr.Row():
            crop = gr.Radio([(label, key) for key, label in CROP_MODES.items()], value="subject", label="Crop",
                            elem_id="dataset-crop")
            buckets = gr.Checkbox(False, label="Aspect-ratio buckets", elem_id="dataset-buckets",
                                  info="keep each photo's shape (about the same pixel count) instead of a square")
        with gr.Row():
            background = gr.ColorPicker("#ffffff", label="Background behind transparent pixels")
            border = gr.ColorPicker("#ffffff", label="Border colour (pad to square)")
            detector = gr.Textbox("", label="Detection model (optional)", info="a transformers object-detection id "
                                  "such as facebook/detr-resnet-50 to place subject crops; empty: built-in saliency")
            audit_model = gr.Textbox("", label="Outlier check model", info="CLIP id or folder; empty: the default "
                                     "CLIP when the hub is reachable; 'off' to skip")
    prepare = gr.Button("Prepare photos", variant="primary", elem_id="dataset-prepare")
    problems = gr.Markdown(elem_id="dataset-problems")
    warnings = gr.CheckboxGroup([], label="Warnings: tick one to dismiss it", visible=False, elem_id="dataset-warnings")
    gallery = gr.Gallery(label="What will train", columns=6, height=220, elem_id="dataset-gallery")
    captions = gr.Dataframe(headers=HEADERS, datatype=["str", "str", "number", "str", "str"], interactive=True,
                            label="Captions and repeats (edit any cell)", elem_id="dataset-captions")
    with gr.Accordion("Captions for the whole set", open=False):
        with gr.Row():
            prefix = gr.Textbox("", label="Prefix")
            suffix = gr.Textbox("", label="Suffix")
            find = gr.Textbox("", label="Find")
            replace = gr.Textbox("", label="Replace with")
        apply_text = gr.Button("Apply to all captions", elem_id="dataset-apply-text")
        with gr.Row():
            captioner = gr.Textbox(DEFAULT_CAPTIONER, label="Captioner model", elem_id="dataset-captioner",
                                   info="hub id or local folder; loaded on first use")
            kind = gr.Radio([(label, key) for key, label in CAPTIONER_KINDS.items()], value="caption", label="Kind")
            remove = gr.Textbox("", label="Tags inherent to the concept", info="removed from tagger captions, "
                                "comma-separated (the trigger word stands for them)")
        run_captioner = gr.Button("Caption with the model", elem_id="dataset-run-captioner")
    with gr.Accordion("Crop one image by hand", open=False):
        with gr.Row():
            crop_image = gr.Dropdown([], label="Image", elem_id="dataset-crop-image")
            box = {side: gr.Number(label=side, precision=0, elem_id=f"dataset-box-{side}") for side in Box._fields}
        with gr.Row():
            original = gr.Image(label="Original (click to centre the box there)", interactive=False, height=320,
                                elem_id="dataset-crop-original")
            preview = gr.Image(label="Exactly what will train", interactive=False, height=320,
                               elem_id="dataset-crop-preview")
        set_box = gr.Button("Use this box", elem_id="dataset-set-box")
    with gr.Row():
        name = gr.Textbox(value="my-concept", label="Dataset name", elem_id="dataset-name")
        save = gr.Button("Save dataset", elem_id="dataset-save")
    saved = gr.Markdown(elem_id="dataset-saved")
    prepared = gr.State([])
    findings = gr.State([])

    # Every component a handler reads or writes, by the name handlers use for it (see `_on`).
    controls = dict(files=files, token=token, class_word=class_word, template=template, resolution=resolution,
                    crop=crop, buckets=buckets, background=background, border=border, detector=detector,
                    audit_model=audit_model, problems=problems, warnings=warnings, gallery=gallery,
                    captions=captions, prefix=prefix, suffix=suffix, find=find, replace=replace,
                    captioner=captioner, kind=kind, remove=remove, crop_image=crop_image, **box,
                    original=original, preview=preview, name=name, saved=saved, prepared=prepared,
                    findings=findings)
    # A shared studio loads detector, captioner and CLIP only by hub id, 'builtin' or the host's list.
    _on(prepare.click, friendly(_for(studio, _prepare)), controls)
    _on(warnings.change, _dismiss, controls, show_progress="hidden")
    _on(apply_text.click, friendly(_apply_text), controls)
    _on(run_captioner.click, friendly(_for(studio, _run_captioner)), controls)
    _on(crop_image.change, friendly(_show_crop), controls, show_progress="hidden")
    _on(original.select, friendly(_centre_box), controls)
    _on(set_box.click, friendly(_set_box), controls)
    _on(save.click, friendly(_for(studio, _save_or_say)), controls, output="saved")
    return {"saved": saved}


def _on(event, handler, controls: dict[str, Any], output: str | None = None, **options) -> None:
    """Wire `handler` to `event` by name.

    Each parameter of the handler takes the value of the component of that name in `controls`, except those
    Gradio fills itself (a `gr.Progress()` default, a `gr.SelectData` annotation). The handler returns a
    NamedTuple whose fields name the components to update, or, with `output`, one value for that component.
    Gradio's set-style inputs hand the wire one dict {component: value}; a returned dict {component: value}
    updates those components. Unknown names raise here, when the page is built.
    """
    hints = typing.get_type_hints(handler)
    params = inspect.signature(handler).parameters.values()
    special = [p for p in params if isinstance(p.default, gr.Progress)
               or (inspect.isclass(hints.get(p.name)) and issubclass(hints[p.name], gr.EventData))]
    inputs = {p.name: controls.get(p.name) for p in params if p not in special}
    missing = [n for n, c in inputs.items() if c is None]
    returns = hints.get("return")
    names = [output] if output else list(getattr(returns, "_fields", ()))
    unknown = [n for n in names if n not in controls]
    if missing or unknown:
        raise TypeError(f"{handler.__name__}: no component named {', '.join(missing + unknown)}")
    if not names:
        raise TypeError(f"{handler.__name__} returns no NamedTuple, and no output is named")
    outputs = {n: controls[n] for n in names}

    def call(values, *filled):
        result = handler(**{n: values[c] for n, c in inputs.items()}, **{p.name: v for p, v in zip(special, filled)})
        if output:
            return {outputs[output]: result}
        return {c: getattr(result, n) for n, c in outputs.items()}

    call.__name__ = handler.__name__
    call.__signature__ = inspect.Signature(
        [inspect.Parameter("values", inspect.Parameter.POSITIONAL_ONLY)]
        + [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in special])
    call.__annotations__ = {p.name: hints[p.name] for p in special if p.name in hints}
    event(call, inputs=set(inputs.values()), outputs=list(outputs.values()), **options)


def _for(studio: Studio, handler):
    """`handler` with the studio passed in, keeping its name and its signature without `studio` (Gradio reads
    both: it passes its gr.Progress by position, so a `studio` left in the signature took a second value)."""

    @functools.wraps(handler)
    def bound(*args, **kwargs):
        return handler(*args, studio=studio, **kwargs)

    signature = inspect.signature(handler)
    bound.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values()
                                                        if p.name != "studio"])
    return bound


def _options(crop="subject", buckets=False, background="#ffffff", border="#ffffff", detector=""):
    from studio.data.prep import PrepOptions

    return PrepOptions(crop or "subject", bool(buckets), background or "#ffffff", border or "#ffffff", detector or "")


def _upload_paths(files) -> list[tuple[Path, str]]:
    """(path on disk, the name the user knows); gradio keeps the upload's own name as the file name."""
    paths = [Path(f if isinstance(f, str) else f.name) for f in files]
    return [(p, p.name) for p in paths]


class PhotosPrepared(NamedTuple):
    prepared: list  # studio.data.prep.Prepared, one per kept photo
    gallery: list
    captions: list[list]
    problems: str
    findings: list  # studio.data.audit.Finding
    warnings: Any  # gr.update of the warnings' choices
    crop_image: Any  # gr.update of the dropdown of images to crop


def _prepare(files, token, class_word, template, resolution, crop="subject", buckets=False, background="#ffffff",
             border="#ffffff", detector="", audit_model="", progress=gr.Progress(),
             studio: Studio | None = None) -> PhotosPrepared:
    from studio import limits
    from studio.data import prep
    from studio.data.formats import pair_uploads

    if not files:
        raise gr.Error("No photos were uploaded; add some images first.", print_exception=False)
    options = _options(crop, buckets, background, border, detector)
    sources = pair_uploads(_upload_paths(files))
    limits.check_import_count(len(sources))  # hundreds of photos held in the page at once: refused in one sentence
    if studio is not None:
        detector = studio.user_model(detector, "the detection model")
        audit_model = studio.user_model(audit_model, "the outlier check model", ("off",))
    items, problems = prep.prepare_photos([(s.path, s.name) for s in sources], int(resolution), options,
                                          lambda i, n: progress((i, n), desc="Preparing photos"))
    given = {s.name: s.caption for s in sources}
    for item in items:
        item.caption = given.get(item.source)
    texts = prep.caption_all(items, token, class_word, prep.CaptionOptions(template=template))
    found, note = prep.audit_prepared(items, audit_model)
    lines = [f"- {p}" for p in problems] + [f"- {i.note}" for i in items if i.note] + ([f"- {note}"] if note else [])
    header = f"**{len(problems)} file(s) skipped, {len(items)} kept:**\n" if problems else ""
    return PhotosPrepared(items, _gallery(items), _rows(items, texts), header + "\n".join(lines), found,
                          _warnings_update(found), gr.update(choices=[i.source for i in items], value=None))


def _gallery(items) -> list:
    return [(item.image, f"{item.source} · {item.size[0]}×{item.size[1]}") for item in items]


def _rows(items, texts) -> list[list]:
    return [[item.source, text, item.repeats, f"{item.size[0]}×{item.size[1]}", _box_text(item)]
            for item, text in zip(items, texts)]


def _box_text(item) -> str:
    return f"{item.mode}: {', '.join(str(v) for v in item.crop)}"


def _warnings_update(found):
    return gr.update(choices=[(f.message, f.key) for f in found], value=[], visible=bool(found))


class Dismissed(NamedTuple):
    findings: Any
    warnings: Any


def _dismiss(findings, warnings) -> Dismissed:
    """`warnings`: the keys of the findings just ticked, which are dismissed."""
    if not warnings:
        return Dismissed(gr.update(), gr.update())
    left = [f for f in findings if f.key not in set(warnings)]
    return Dismissed(left, _warnings_update(left))


def _table(captions) -> list[list]:
    if captions is None:
        return []
    if hasattr(captions, "values"):  # a pandas DataFrame
        return captions.values.tolist()
    return [list(r) for r in captions]


class Captioned(NamedTuple):
    captions: list[list]
    problems: str


def _apply_text(captions, prefix, suffix, find, replace) -> Captioned:
    from studio.data.captions import affix, find_replace

    rows = _table(captions)
    if not rows:
        raise gr.Error("There are no captions yet; prepare photos first.", print_exception=False)
    texts = [affix(str(r[CAPTION] or ""), prefix, suffix) for r in rows]
    changed = ""
    if find:
        texts, count = find_replace(texts, find, replace or "")
        changed = f" '{find}' was replaced in {count} caption(s)."
    for row, text in zip(rows, texts):
        row[CAPTION] = text
    return Captioned(rows, f"Updated {len(rows)} caption(s).{changed}")


def _run_captioner(prepared, captions, captioner, kind, remove, token, class_word, progress=gr.Progress(),
                   studio: Studio | None = None) -> Captioned:
    from studio.data.prep import CaptionOptions, caption_all

    if not prepared:
        raise gr.Error("There are no prepared photos to caption; press Prepare first.", print_exception=False)
    if studio is not None:
        captioner = studio.user_model(captioner, "the captioner model")
    opts = CaptionOptions(captioner=captioner or "", captioner_kind=kind or "caption", remove_tags=remove or "")
    texts = caption_all(prepared, token, class_word, opts, lambda i, n: progress((i, n), desc="Captioning"))
    rows = _table(captions) or _rows(prepared, texts)
    for row, text in zip(rows, texts):
        row[CAPTION] = text
    return Captioned(rows, f"Captioned {len(texts)} image(s) with '{captioner}'.")


def _find(prepared, source):
    item = next((p for p in prepared or [] if p.source == source), None)
    if item is None:
        raise gr.Error("Choose an image to crop first.", print_exception=False)
    return item


class Box(NamedTuple):
    left: Any
    top: Any
    right: Any
    bottom: Any


class CropShown(NamedTuple):
    original: Any
    preview: Any
    left: Any
    top: Any
    right: Any
    bottom: Any


def _show_crop(prepared, crop_image) -> CropShown:
    """`crop_image`: the source name of the image picked to crop."""
    if not crop_image:
        return CropShown(None, None, *[gr.update()] * 4)
    item = _find(prepared, crop_image)
    return CropShown(_outline(item, item.crop), item.image, *item.crop)


def _outline(item, box):
    from studio.data.prep import crop_outline

    return crop_outline(item, box, SHOWN_SIDE)


def _centre_box(prepared, crop_image, left, top, right, bottom, evt: gr.SelectData) -> Box:
    """A click on the shown original moves the box's centre there, keeping its size."""
    item = _find(prepared, crop_image)
    scale = min(1.0, SHOWN_SIDE / max(item.original_size))
    x, y = evt.index[0] / scale, evt.index[1] / scale
    w, h = (right or 0) - (left or 0), (bottom or 0) - (top or 0)
    return Box(round(x - w / 2), round(y - h / 2), round(x + w / 2), round(y + h / 2))


class Recropped(NamedTuple):
    prepared: list
    gallery: list
    captions: list[list]
    original: Any
    preview: Any


def _set_box(prepared, crop_image, left, top, right, bottom, resolution, crop, buckets, background, border, detector,
             captions) -> Recropped:
    from studio.data.prep import recrop

    item = _find(prepared, crop_image)
    options = _options(crop, buckets, background, border, detector)
    new = recrop(item, int(resolution), options, "manual", (left, top, right, bottom))
    items = [new if p is item else p for p in prepared]
    rows = _table(captions)
    texts = [r[CAPTION] for r in rows] if len(rows) == len(items) else [""] * len(items)
    table = _rows(items, texts)
    for row, old in zip(table, rows):
        row[REPEATS] = old[REPEATS]
    return Recropped(items, _gallery(items), table, _outline(new, new.crop), new.image)


def _said(save):
    """`save`, with a refusal kept beside the Save button (and shown as a toast), not only in a fading toast."""
    from studio.errors import StudioError

    @functools.wraps(save)
    def said(*args, **kwargs) -> str:
        try:
            return save(*args, **kwargs)
        except (gr.Error, StudioError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            gr.Warning(message)
            return f"**Not saved:** {message}"

    return said


def _save(studio: Studio, prepared, captions, name, token, class_word, resolution, template, crop="subject",
          buckets=False, background="#ffffff", border="#ffffff", detector=""):
    from studio.data.prep import save

    if not prepared:
        raise gr.Error("There are no prepared photos to save; upload photos and press Prepare first.", print_exception=False)
    rows = _table(captions)
    texts = [str(r[CAPTION]) if len(r) > CAPTION and str(r[CAPTION]).strip() else "" for r in rows][: len(prepared)]
    texts += [""] * (len(prepared) - len(texts))
    if not all(texts):
        raise gr.Error("Every image needs a caption; fill the empty cells.", print_exception=False)
    repeats = [_whole(r[REPEATS]) if len(r) > REPEATS else p.repeats for r, p in zip(rows, prepared)]
    repeats += [p.repeats for p in prepared[len(repeats):]]
    paths = studio.workspace.dataset(name)
    spec = save(paths.root, prepared, texts, token, class_word, int(resolution), template,
                _options(crop, buckets, background, border, detector), repeats)
    where = paths.root.relative_to(studio.workspace.root) if paths.root.is_relative_to(studio.workspace.root) else paths.root
    line = f"Saved **{len(spec.items)}** images to `{where}` as dataset **{paths.root.name}**."
    if len(spec.items) < FEWEST:
        line += (f"\n\n**Warning:** {len(spec.items)} image(s) is fewer than the {FEWEST}–{MOST} this tab asks "
                 "for; a concept learnt from so few copies its photos. Add more and save again.")
    elif len(spec.items) > MOST:
        line += (f"\n\n**Note:** {len(spec.items)} images is more than the {FEWEST}–{MOST} this tab asks for; "
                 "training takes longer to see each one.")
    return line


_save_or_say = _said(_save)


def _whole(value) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise gr.Error(f"Repeats must be a whole number, got '{value}'; fix the cell.", print_exception=False) from None
