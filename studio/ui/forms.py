"""Forms that come back after a page reload: a tab's settings are kept in the browser's local storage.

Each tab names its controls; every edit a person makes (an `.input` event, never a value the page sets
itself) stores all of them under one key, and the page's load restores them. Values the page sets on
load (the dataset list, the run shown) therefore never overwrite what the person typed.
"""

from __future__ import annotations

from typing import Any, Callable

import gradio as gr

# The stored settings are a person's form values, not secrets; a fixed key lets them survive a restart
# of the app too (gradio's default key changes with every launch).
_SECRET = "concept-studio-form-values"


def remember(key: str, controls: dict[str, Any], edited: gr.State | None = None) -> gr.BrowserState:
    """A browser-stored dict {name: value} of `controls`, saved whenever a person edits one of them.
    `edited` (a per-page flag, see `restore_once`) turns True with the first edit."""
    state = gr.BrowserState({}, storage_key=f"concept-studio-{key}", secret=_SECRET)
    gr.on([c.input for c in controls.values()], saver(controls, edited), inputs=list(controls.values()),
          outputs=[state] + ([edited] if edited is not None else []), show_progress="hidden",
          trigger_mode="always_last", api_visibility="private")
    return state


def saver(controls: dict[str, Any], edited: gr.State | None = None) -> Callable:
    """fn(*values) -> the dict `remember` stores (and True for `edited`, when given), for handlers that
    change the form themselves."""
    names = list(controls)
    if edited is None:
        return lambda *values: dict(zip(names, values))
    return lambda *values: (dict(zip(names, values)), True)


def restored(saved: dict | None, names: list[str], allowed: dict[str, Callable[[Any], bool]] | None = None) -> list:
    """gr.update for each name: the saved value where there is one (and `allowed[name](value)` holds)."""
    saved = saved if isinstance(saved, dict) else {}
    allowed = allowed or {}
    out = []
    for name in names:
        ok = name in saved and allowed.get(name, lambda v: True)(saved[name])
        out.append(gr.update(value=saved[name]) if ok else gr.update())
    return out


def known(values) -> bool:
    """A stored form (a dict) or list of rows (a list) that holds something."""
    return isinstance(values, (dict, list)) and bool(values)


def restore_once(state: gr.BrowserState, done: gr.State, restore: Callable, inputs: list,
                 outputs: list) -> Callable:
    """Apply a stored form once per page, whenever it becomes known, and never over the person's edits.

    Gradio's BrowserState reads local storage when its component mounts, which can come after the page's
    load event has already read the state (then still empty); the stored value then arrives as a change of
    the state. `restore(values, *inputs) -> updates of outputs` runs on whichever comes first with a stored
    form; `done` (a gr.State(False), also set by the first edit: `remember(..., edited=done)`) stops it after
    that, so a late read never undoes what the person has changed meanwhile.

    Returns fn for the page's load event: fn(values, done, *inputs) -> (*updates, done).
    """
    def on_load(values, already, *rest):
        stored = known(values) and not already
        return [*restore(values if stored else None, *rest), already or stored]

    def on_read(values, already, *rest):
        if already or not known(values):
            return [*[gr.update() for _ in outputs], already]
        return [*restore(values, *rest), True]

    state.change(on_read, [state, done, *inputs], [*outputs, done], show_progress="hidden",
                 api_visibility="private")
    return on_load
