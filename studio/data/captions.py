"""Caption text: templates with a trigger word and a class word, prefix/suffix, find/replace, tag lists."""

from __future__ import annotations

import re

from studio.errors import StudioError

DEFAULT_TEMPLATE = "a photo of {token} {class}"


def render(template: str, token: str, class_word: str) -> str:
    """Fill {token} and {class}; plain str.format would choke on the keyword 'class'."""
    return " ".join(template.replace("{token}", token).replace("{class}", class_word).split())


def concept_phrase(token: str, class_word: str) -> str:
    return " ".join(f"{token} {class_word}".split())


def affix(caption: str, prefix: str = "", suffix: str = "") -> str:
    """prefix + caption + suffix, with the joins kept readable and nothing doubled if already there."""
    text = caption.strip()
    prefix, suffix = (prefix or "").strip(), (suffix or "").strip()
    if prefix and not text.startswith(prefix):
        text = f"{prefix} {text}"
    if suffix and not text.endswith(suffix):
        text = f"{text}{suffix}" if suffix[0] in ",;:." else f"{text} {suffix}"
    return " ".join(text.split())


def find_replace(captions: list[str], find: str, replace: str, regex: bool = False) -> tuple[list[str], int]:
    """Every caption with `find` replaced; returns the new captions and how many captions changed."""
    if not find:
        raise StudioError("Find/replace needs some text to find; type it in the Find box.")
    if regex:
        try:
            pattern = re.compile(find)
        except re.error as exc:
            raise StudioError(f"'{find}' is not a valid regular expression ({exc.msg}); fix it or untick regex.") from None
        new = [" ".join(pattern.sub(replace, c).split()) for c in captions]
    else:
        new = [" ".join(c.replace(find, replace).split()) for c in captions]
    return new, sum(a != b for a, b in zip(captions, new))


def split_tags(text: str) -> list[str]:
    """'a, b ,c' -> ['a', 'b', 'c'] (empty items dropped, case and order kept)."""
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def tag_caption(token: str, tags: list[str], inherent: list[str] = ()) -> str:
    """The LyCORIS paper's '[V], tag1, ..., tagk' caption: the trigger word first, then the tags that are
    not inherent to the concept (those the trigger word should absorb), each once."""
    drop = {_norm(t) for t in inherent}
    seen, kept = set(), []
    for tag in tags:
        key = _norm(tag)
        if key and key not in drop and key not in seen and key != _norm(token):
            seen.add(key)
            kept.append(tag.strip())
    return ", ".join([token.strip(), *kept]) if token.strip() else ", ".join(kept)


def _norm(tag: str) -> str:
    return " ".join(tag.replace("_", " ").lower().split())
