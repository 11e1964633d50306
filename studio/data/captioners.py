"""Model captioners through transformers, chosen by hub id or local folder and loaded on first use.

- "caption": an image-to-text model (BLIP class, e.g. Salesforce/blip-image-captioning-base) writes a
  sentence per image.
- "tags": a multi-label image classifier (a tagger) gives the labels scoring above a threshold; the
  caption becomes "[V], tag1, ..., tagk" with the tags inherent to the concept removed (LyCORIS paper,
  Yeh et al. 2024), so the trigger word absorbs them.

Models load with safetensors weights only and never with trust_remote_code. Anything that stops a model
from loading (offline, unknown id, missing package) is one sentence, never a traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from studio.errors import StudioError

log = logging.getLogger(__name__)

CaptionerKind = Literal["caption", "tags"]
CAPTIONER_KINDS: dict[str, str] = {"caption": "Sentence (BLIP-class captioner)",
                                   "tags": "Tags (multi-label tagger)"}
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
_TASKS = {"caption": "AutoModelForImageTextToText", "tags": "AutoModelForImageClassification",
          "object-detection": "AutoModelForObjectDetection"}
_PROCESSORS = {"caption": "AutoProcessor", "tags": "AutoImageProcessor", "object-detection": "AutoImageProcessor"}
_cache: dict[tuple[str, str], "Captioner"] = {}


def load_parts(model_id: str, task: str):
    """(model in eval mode, processor) for `task`, from a hub id or folder; one sentence if it cannot load."""
    model_id = (model_id or "").strip()
    what = "detection model" if task == "object-detection" else "captioner"
    if not model_id:
        raise StudioError(f"No {what} was named; give a hub id such as '{DEFAULT_CAPTIONER}' or a local folder.")
    try:
        import transformers
    except ImportError:
        raise StudioError(f"The {what} needs the transformers package; `pip install -r requirements.txt`.") from None
    try:
        model_cls = getattr(transformers, _TASKS[task])
        processor_cls = getattr(transformers, _PROCESSORS[task])
        from studio.models import CONSTRUCTION_LOCK

        with CONSTRUCTION_LOCK:  # never while a training job or the Playground builds layers
            model = model_cls.from_pretrained(model_id, use_safetensors=True).eval()
        processor = processor_cls.from_pretrained(model_id)
    except ImportError as exc:
        log.warning("Loading %s failed: %s", model_id, exc)
        raise StudioError(f"The {what} '{model_id}' needs a package that is not installed ({_first_line(exc)}); "
                          "install it, or choose another model.") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        log.warning("Loading %s failed: %s", model_id, exc)
        raise StudioError(f"The {what} '{model_id}' could not be loaded (offline, an unknown id, no safetensors "
                          f"weights, or not a {task.replace('-', ' ')} model); check the id or choose another.") from None
    return model, processor


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text.rstrip(".")[:120]


@dataclass
class Captioner:
    model_id: str
    kind: CaptionerKind = "caption"
    threshold: float = 0.35  # tags: sigmoid score above which a label counts
    max_tags: int = 20
    max_new_tokens: int = 30
    model: object = field(default=None, repr=False)
    processor: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in CAPTIONER_KINDS:
            raise StudioError(f"Captioner kind '{self.kind}' is unknown; choose one of {', '.join(CAPTIONER_KINDS)}.")
        self.model, self.processor = load_parts(self.model_id, self.kind)

    def caption(self, image: Image.Image) -> str:
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return " ".join(self.processor.batch_decode(ids, skip_special_tokens=True)[0].split())

    def tags(self, image: Image.Image) -> list[str]:
        """Labels whose sigmoid score passes the threshold, most confident first (multi-label)."""
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            scores = torch.sigmoid(self.model(**inputs).logits[0].float())
        labels = self.model.config.id2label
        order = torch.argsort(scores, descending=True).tolist()
        return [str(labels[i]).replace("_", " ") for i in order if scores[i] >= self.threshold][: self.max_tags]


def get_captioner(model_id: str, kind: CaptionerKind = "caption", threshold: float = 0.35) -> Captioner:
    """A loaded captioner, cached per (id, kind) so a second use costs nothing."""
    key = (model_id.strip(), kind)
    if key not in _cache:
        _cache[key] = Captioner(model_id.strip(), kind)
    _cache[key].threshold = threshold
    return _cache[key]


def caption_images(images: list[Image.Image], model_id: str, kind: CaptionerKind, token: str, class_word: str,
                   inherent: list[str] = (), threshold: float = 0.35, on_progress=None) -> list[str]:
    """One caption per image: a sentence with the class word turned into '<token> <class>', or tags."""
    from studio.data.captions import concept_phrase, tag_caption

    captioner = get_captioner(model_id, kind, threshold)
    out = []
    for i, image in enumerate(images):
        if kind == "tags":
            out.append(tag_caption(token, captioner.tags(image), [class_word, *inherent]))
        else:
            out.append(insert_token(captioner.caption(image), token, class_word) or concept_phrase(token, class_word))
        if on_progress:
            on_progress(i + 1, len(images))
    return out


def insert_token(sentence: str, token: str, class_word: str) -> str:
    """'a teddy bear on a bed' with class 'teddy bear' -> 'a sks teddy bear on a bed'; when the captioner
    did not name the class, the concept phrase leads: 'sks teddy bear, a toy on a bed'."""
    import re

    text = " ".join(sentence.split())
    if not token.strip():
        return text
    word = class_word.strip()
    if word:
        pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
        if pattern.search(text):
            return pattern.sub(lambda m: f"{token} {m.group(0)}", text, count=1)
    lead = " ".join(f"{token} {word}".split())
    return f"{lead}, {text}" if text else lead
