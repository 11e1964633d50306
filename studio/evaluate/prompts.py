"""Prompt sets of the evaluation (no heavy imports: the UI reads the defaults at start-up)."""

from __future__ import annotations

from studio.data.captions import concept_phrase

# Places to put the concept in; each gives a "with concept" and a "without concept" prompt.
DEFAULT_CONTEXTS = ["in a forest", "on a beach", "in the snow", "on a city street at night", "on a kitchen table"]


def prompts_for(token: str, class_word: str, contexts: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """The concept prompt and (with concept, without concept) pairs for each context."""
    concept = f"a photo of {concept_phrase(token, class_word)}"
    pairs = [(f"{concept} {c}".strip(), f"a photo {c}".strip()) for c in contexts]
    return concept, pairs
