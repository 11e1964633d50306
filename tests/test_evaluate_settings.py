"""EvalConfig's fields carry the evaluation's settings once: the CLI's flags and the Evaluate tab's controls
take their defaults, choices, labels and help from it, and read typed lists with one parser."""

from __future__ import annotations

import typing

import gradio as gr
import pytest

from studio import fields
from studio.errors import StudioError
from studio.evaluate import prompts
from studio.evaluate.settings import EvalConfig, Kind, parse_list, text_of


def test_every_field_has_help_and_a_label():
    for name, text in fields.help_of(EvalConfig).items():
        assert text.endswith("."), name
        assert fields.label_of(EvalConfig, name), name
    assert typing.get_args(Kind) == prompts.KINDS
    assert fields.kind(fields.types_of(EvalConfig)["checkpoints"]) == (str, ("final", "all"))


@pytest.mark.parametrize("text, value", [("0, 0.5, 1.5", [0.0, 0.5, 1.5]), ("1;0.5", [1.0, 0.5]), ("[0, 2]", [0.0, 2.0]),
                                         ("1", [1.0]), ("", [1.0])])
def test_scales_as_typed(text, value):
    assert parse_list("scales", text) == value
    assert parse_list("scales", text_of(value)) == value  # what the form shows reads back the same


@pytest.mark.parametrize("text", ["half", "0.5, x", "[0, 1"])
def test_a_bad_scale_is_one_sentence_naming_the_setting(text):
    with pytest.raises(StudioError, match="^Evaluation setting 'scales' takes numbers") as info:
        parse_list("scales", text)
    assert "\n" not in str(info.value) and str(info.value).endswith(f"got {text!r}.")


@pytest.mark.parametrize("values, words", [
    (dict(seeds="x"), "'seeds' must be int"), (dict(steps=0), "'steps' must be a whole number of at least 1"),
    (dict(kinds="training"), "'kinds' must be a list"), (dict(checkpoints="some"), "'checkpoints' must be one of"),
    (dict(scales=["a"]), "'scales' needs numbers between -2 and 3"), (dict(guidance=float("nan")), "'guidance'")])
def test_types_and_ranges_are_checked(values, words):
    with pytest.raises(StudioError, match=words):
        EvalConfig(dataset="x", **values)


def test_numbers_typed_as_text_and_whole_guidance_are_converted():
    cfg = EvalConfig(dataset="x", seeds="3", guidance=5, scales=[1, 0.5, 1])
    assert (cfg.seeds, cfg.guidance, cfg.scales) == (3, 5.0, [0.5, 1.0])
    assert isinstance(cfg.guidance, float)


def _evaluate_tab(tmp_path, default_clip: str) -> dict:
    from studio.paths import Workspace
    from studio.ui import evaluate_tab
    from studio.ui.context import Studio

    with gr.Blocks() as app:
        evaluate_tab.build(Studio(Workspace(tmp_path), "some/model"), gr.Textbox(), default_clip)
    return {b.label: b for b in app.blocks.values() if getattr(b, "label", None)}


def test_the_evaluate_tab_takes_its_controls_from_eval_config(tmp_path):
    from studio.ui import evaluate_tab

    shown = _evaluate_tab(tmp_path, "")
    defaults, helps = fields.defaults_of(EvalConfig), fields.help_of(EvalConfig)
    on_form = [name for name in fields.types_of(EvalConfig) if name not in ("model", "vae")]  # the page's own box
    for name in on_form:
        assert shown[fields.label_of(EvalConfig, name)].info == helps[name], name
    values = {name: shown[fields.label_of(EvalConfig, name)].value for name in on_form}
    assert {k: values[k] for k in ("clip", "dino", "per_kind", "seeds", "steps", "guidance", "checkpoints")} == {
        k: defaults[k] for k in ("clip", "dino", "per_kind", "seeds", "steps", "guidance", "checkpoints")}
    assert values["contexts"].splitlines() == defaults["contexts"]
    assert [evaluate_tab.KIND_LABELS[k] for k in values["kinds"]] == defaults["kinds"]
    assert shown["Checkpoints"].choices == [("final", "final"), ("all", "all")]
    assert parse_list("scales", values["scales"]) == evaluate_tab.FORM_SCALES  # the form's own sweep, parsed alike
    # the built-in pocket model: its own contexts, guidance and CLIP, no DINO
    pocket = _evaluate_tab(tmp_path, "builtin")
    assert pocket["CLIP model"].value == "builtin" and pocket["DINO model"].value == "none"
    assert pocket["Guidance"].value == evaluate_tab.POCKET_GUIDANCE
    assert pocket["Contexts (one per line)"].value.splitlines() == evaluate_tab.POCKET_CONTEXTS


def test_an_emptied_number_box_is_the_setting_s_default(workspace, dataset_dir, trained_run):
    from studio.ui import evaluate_tab
    from studio.ui.context import Studio

    data = dict(runs=[trained_run.name], dataset=dataset_dir.name, clip="tiny", dino="none",
                kinds=["context pairs"], per_kind=None, scales="", checkpoints="final", seeds=None, steps=3.0,
                guidance=None, own="", contexts="in a forest")
    cfg = evaluate_tab._config(Studio(workspace, "tiny"), "tiny", data)
    defaults = fields.defaults_of(EvalConfig)
    assert (cfg.per_kind, cfg.seeds, cfg.guidance, cfg.scales) == (defaults["per_kind"], defaults["seeds"],
                                                                   defaults["guidance"], defaults["scales"])
    assert cfg.steps == 3 and isinstance(cfg.steps, int)
    with pytest.raises(StudioError, match="'seeds' must be a whole number of at least 1, got 0"):
        evaluate_tab._config(Studio(workspace, "tiny"), "tiny", {**data, "seeds": 0})
