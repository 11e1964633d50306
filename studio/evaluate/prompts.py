"""Prompt sets of the evaluation, in the LyCORIS paper's three kinds (Yeh et al. 2024), plus the
context pairs of Guralnick et al. No heavy imports: the UI reads the defaults at start-up.

- training: the dataset's own captions (does the model reproduce what it was shown?);
- generalization: the DreamBench prompts for the subject's kind (objects, or live subjects for the
  dataset's dog and cat classes) plus the user's own (the concept in new contexts);
- agnostic: prompts without the trigger (the class alone, and unrelated scenes), compared between
  the base model and the fine-tuned one at the same seed: does the concept leak, does the class drift?
- context: "a photo of <token> <class> in a forest" against "a photo in a forest" (Guralnick et al.).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from studio.data.captions import concept_phrase, render

# Places to put the concept in; each gives a "with concept" and a "without concept" prompt.
DEFAULT_CONTEXTS = ["in a forest", "on a beach", "in the snow", "on a city street at night", "on a kitchen table"]
KINDS = ("training", "generalization", "agnostic", "context")
DEFAULT_KINDS = list(KINDS)
DREAMBENCH = Path(__file__).resolve().parents[2] / "assets" / "dreambench-prompts.yaml"
# Without the trigger: the class itself (language drift, Ruiz et al.) and scenes unrelated to it (leak).
AGNOSTIC = ["a photo of a {class}", "a {class} in the snow", "a photo of a city street",
            "a bowl of fruit on a table", "a mountain lake at sunrise", "a portrait of a person"]


@dataclass(frozen=True)
class Prompt:
    kind: str  # training, generalization, agnostic; the context kind gives "concept" (a photo of <token>
    # <class>), "context" (the concept in a context) and "context-without" (the context alone)
    text: str  # what the model is given
    clip_text: str  # what CLIP-T compares the image with: the trigger replaced by the class word
    pair: int = -1  # context prompts: the index of the pair


def prompts_for(token: str, class_word: str, contexts: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """The concept prompt and (with concept, without concept) pairs for each context."""
    concept = f"a photo of {concept_phrase(token, class_word)}"
    pairs = [(f"{concept} {c}".strip(), f"a photo {c}".strip()) for c in contexts]
    return concept, pairs


@lru_cache(maxsize=1)
def dreambench() -> dict:
    import yaml

    return yaml.safe_load(DREAMBENCH.read_text(encoding="utf-8"))


def subject_kind(class_word: str) -> str:
    """'live' for the classes DreamBench evaluates with live-subject prompts (dogs, cats), else 'object'."""
    words = class_word.lower().split()
    return "live" if any(w in dreambench()["live_classes"] for w in words[-1:]) else "object"


def _limit(items: list, n: int) -> list:
    """The first n, spread over the list rather than its head (0 keeps all)."""
    if n <= 0 or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def build_prompts(token: str, class_word: str, captions: list[str], kinds: list[str], own: list[str] = (),
                  contexts: list[str] = (), per_kind: int = 0, replace=None) -> list[Prompt]:
    """Every prompt of the chosen kinds, at most `per_kind` of each (0: all; own prompts always kept).

    Args:
        replace: prompt -> CLIP-T text (studio.evaluate.metrics.replace_trigger bound to the concept).
    """
    replace = replace or (lambda text: text)
    out: list[Prompt] = []
    if "training" in kinds:
        for text in _limit(list(dict.fromkeys(c.strip() for c in captions if c.strip())), per_kind):
            out.append(Prompt("training", text, replace(text)))
    if "generalization" in kinds:
        listed = [render(t, token, class_word) for t in dreambench()[subject_kind(class_word)]]
        mine = [render(t.replace("{0}", "{token}").replace("{1}", "{class}"), token, class_word) for t in own if t.strip()]
        for text in _limit(listed, per_kind) + mine:
            out.append(Prompt("generalization", text, replace(text)))
    if "agnostic" in kinds:
        for text in _limit([render(t, token, class_word) for t in AGNOSTIC], per_kind):
            out.append(Prompt("agnostic", text, text))
    if "context" in kinds:  # Guralnick et al.: the concept prompt, then each context with and without it
        concept, pairs = prompts_for(token, class_word, list(contexts))
        out.append(Prompt("concept", concept, replace(concept)))
        for i, (with_concept, without) in enumerate(_limit(pairs, per_kind)):
            out.append(Prompt("context", with_concept, replace(with_concept), i))
            out.append(Prompt("context-without", without, without, i))
    return out
