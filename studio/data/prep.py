"""The whole preparation in one place, for the CLI's `prep` and the Dataset tab alike:
import → crop → caption → audit → save."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from studio.data.audit import Finding, audit, clip_embedder
from studio.data.captions import DEFAULT_TEMPLATE, affix, find_replace, render, split_tags
from studio.data.dataset import (DatasetSpec, Prepared, PrepOptions, prepare_photos, recrop, reexport,  # noqa: F401
                                 save_dataset)
from studio.errors import StudioError
from studio.paths import DatasetPaths

__all__ = ["CaptionOptions", "PrepOptions", "Prepared", "caption_all", "audit_prepared", "prep_folder", "reexport",
           "recrop", "outlier_model", "crop_outline", "PrepResult", "save"]


@dataclass
class CaptionOptions:
    template: str = DEFAULT_TEMPLATE
    prefix: str = ""
    suffix: str = ""
    find: str = ""
    replace: str = ""
    captioner: str = ""  # model id or folder; empty: the template (or the captions found beside the images)
    captioner_kind: str = "caption"
    remove_tags: str = ""  # comma-separated tags inherent to the concept
    threshold: float = 0.35


def caption_all(prepared: list[Prepared], token: str, class_word: str, opts: CaptionOptions,
                on_progress=None) -> list[str]:
    """Each image's caption: imported text, else the model's, else the template; then prefix/suffix and
    find/replace across the set."""
    if opts.captioner.strip():
        from studio.data.captioners import caption_images

        texts = caption_images([p.image for p in prepared], opts.captioner, opts.captioner_kind, token, class_word,
                               split_tags(opts.remove_tags), opts.threshold, on_progress)
    else:
        texts = [p.caption or render(opts.template, token, class_word) for p in prepared]
    texts = [affix(t, opts.prefix, opts.suffix) for t in texts]
    if opts.find:
        texts, _ = find_replace(texts, opts.find, opts.replace)
    return texts


def outlier_model(name: str | None) -> tuple[str | None, str]:
    """(CLIP to embed with or None, note). '' or None: the default CLIP when the hub is reachable, else no
    outlier check (the built-in CLIP's random weights would flag noise); 'off' turns it off."""
    name = (name or "").strip()
    if name.lower() in ("off", "none"):
        return None, ""
    if name:
        return name, ""
    from studio import models
    from studio.data.clip import DEFAULT_CLIP

    if models.hub_reachable():
        return DEFAULT_CLIP, ""
    return None, "The outlier check was skipped: the model hub cannot be reached for a CLIP model (name a local one to run it)."


def audit_prepared(prepared: list[Prepared], model: str | None = None) -> tuple[list[Finding], str]:
    """Duplicates (always) and outliers (with an image embedder) among the prepared photos, plus a note."""
    clip, note = outlier_model(model)
    embed = clip_embedder(clip) if clip else None
    try:
        return audit([p.source for p in prepared], [p.image for p in prepared], [p.digest for p in prepared], embed), note
    except StudioError as exc:  # the embedder could not load: the duplicates check still stands
        found = audit([p.source for p in prepared], [p.image for p in prepared], [p.digest for p in prepared])
        return found, f"The outlier check was skipped: {exc}"


@dataclass
class PrepResult:
    spec: DatasetSpec
    problems: list[str]  # one sentence per file left out
    findings: list[Finding]  # duplicates and outliers, for the user to act on or dismiss
    note: str = ""  # e.g. that the outlier check could not run


def prep_folder(src: Path, out: Path, token: str, class_word: str, resolution: int,
                options: PrepOptions | None = None, captions: CaptionOptions | None = None,
                audit_model: str | None = "off") -> PrepResult:
    """A folder of photos (or kohya pairs, or an imagefolder) → a dataset at out."""
    from studio.data.dataset import prep_folder as import_folder

    captions = captions or CaptionOptions()
    kept: list[Prepared] = []

    def caption_fn(prepared: list[Prepared]) -> list[str]:
        kept.extend(prepared)
        return caption_all(prepared, token, class_word, captions)

    spec, problems = import_folder(src, out, token, class_word, resolution, captions.template, options, caption_fn)
    findings, note = audit_prepared(kept, audit_model)
    return PrepResult(spec, problems, findings, note)


def save(root: Path, prepared: list[Prepared], captions: list[str], token: str, class_word: str, resolution: int,
         template: str, options: PrepOptions, repeats: list[int] | None = None) -> DatasetSpec:
    return save_dataset(DatasetPaths(Path(root)), prepared, captions, token, class_word, resolution, template,
                        options, repeats)


def crop_outline(item: Prepared, box, max_side: int = 640, colour=(255, 40, 40)):
    """The upright original, downscaled to max_side, with `box` drawn on it: for checking a crop by eye."""
    from PIL import ImageDraw

    from studio.data.images import open_photo

    if item.path is None:
        raise StudioError(f"The original of '{item.source}' is no longer available; import the photo again.")
    photo = open_photo(item.path, item.source, 1)
    scale = min(1.0, max_side / max(photo.size))
    shown = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))))
    ImageDraw.Draw(shown).rectangle([round(v * scale) for v in box], outline=colour, width=3)
    return shown
