"""Caption templates with a trigger word and a class word."""

from __future__ import annotations

DEFAULT_TEMPLATE = "a photo of {token} {class}"


def render(template: str, token: str, class_word: str) -> str:
    """Fill {token} and {class}; plain str.format would choke on the keyword 'class'."""
    return " ".join(template.replace("{token}", token).replace("{class}", class_word).split())


def concept_phrase(token: str, class_word: str) -> str:
    return " ".join(f"{token} {class_word}".split())
