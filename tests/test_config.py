"""TrainConfig: unknown keys, wrong types and out-of-range values are refused by name; presets and
`--set` overrides layer over the defaults with the right types."""

from __future__ import annotations

import pytest
import yaml

from studio.config import (TrainConfig, build_config, coerce, field_help, list_presets, load_preset,
                           PRESETS_DIR)
from studio.errors import StudioError


def test_defaults_build():
    cfg = build_config()
    assert cfg == TrainConfig()
    assert cfg.method == "lora" and cfg.rank == 8 and isinstance(cfg.learning_rate, float)
    assert set(field_help()) == set(cfg.to_dict()) and all(field_help().values())


@pytest.mark.parametrize("values, field", [
    ({"stpes": 10}, "stpes"),
    ({"steps": 10, "learnign_rate": 1e-3}, "learnign_rate"),
])
def test_unknown_key_is_refused_by_name(values, field):
    with pytest.raises(StudioError, match=f"'{field}'"):
        build_config(values=values)


def test_unknown_key_in_preset_file_is_refused(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("steps: 10\nwarmup: 5\n")
    with pytest.raises(StudioError, match="'warmup'") as err:
        build_config(preset=str(preset))
    assert "preset" in str(err.value)


def test_unknown_key_in_override_is_refused():
    with pytest.raises(StudioError, match="'rnak'"):
        build_config(overrides=["rnak=4"])


@pytest.mark.parametrize("field, value", [
    ("steps", "ten"),
    ("steps", 2.5),
    ("steps", True),  # bool is an int subclass; it must not pass as a step count
    ("learning_rate", "fast"),
    ("lr_schedule", "linear"),
    ("mixed_precision", "fp8"),
    ("method", "dreambooth-xl"),
    ("target_modules", "to_q"),
    ("target_modules", ["to_q", 3]),
    ("sample_prompts", None),
])
def test_wrong_type_is_refused_by_name(field, value):
    with pytest.raises(StudioError, match=f"'{field}'") as err:
        build_config(values={field: value})
    assert repr(value) in str(err.value)


@pytest.mark.parametrize("field, value", [
    ("rank", 0),
    ("alpha", -1.0),
    ("learning_rate", 0.0),
    ("steps", -5),
    ("batch_size", 0),
    ("sample_steps", 0),
    ("lr_warmup_steps", -1),
    ("checkpoint_every", -10),
    ("max_grad_norm", -0.5),
    ("seed", -1),
    ("resolution", 24),   # below 32
    ("resolution", 100),  # not a multiple of 8
])
def test_out_of_range_is_refused_by_name(field, value):
    with pytest.raises(StudioError, match=f"'{field}'") as err:
        build_config(values={field: value})
    assert str(value) in str(err.value)


def test_edge_values_are_accepted():
    cfg = build_config(values=dict(resolution=32, seed=0, sample_every=0, checkpoint_every=0,
                                   max_grad_norm=0, lr_warmup_steps=0))
    assert cfg.resolution == 32 and cfg.max_grad_norm == 0.0


def test_int_for_float_field_becomes_float():
    cfg = build_config(values={"alpha": 16, "learning_rate": 1})
    assert cfg.alpha == 16.0 and type(cfg.alpha) is float
    assert type(cfg.learning_rate) is float


def test_presets_exist():
    assert {"quick", "sd15-object", "style"} <= set(list_presets())


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_preset_builds_with_its_values(name):
    raw = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    assert raw, f"preset {name} is empty"
    cfg = build_config(preset=name)
    assert isinstance(cfg, TrainConfig)
    for key, value in raw.items():
        assert getattr(cfg, key) == value, key
    untouched = set(cfg.to_dict()) - set(raw)
    defaults = TrainConfig(method=cfg.method)  # the defaults of the preset's own method
    assert all(getattr(cfg, k) == getattr(defaults, k) for k in untouched)


def test_missing_preset_names_the_available_ones():
    with pytest.raises(StudioError, match="'nope'") as err:
        load_preset("nope")
    assert "quick" in str(err.value)


def test_preset_with_bad_yaml_is_one_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(StudioError, match="not valid YAML"):
        build_config(preset=str(bad))


def test_overrides_coerce_types():
    cfg = build_config(overrides=[
        "steps=50", "learning_rate=1e-3", "alpha=4", "lr_schedule=cosine",
        "target_modules=to_q, to_v", 'sample_prompts=["a {token}", "b {class}"]', "model=builtin"])
    assert cfg.steps == 50 and type(cfg.steps) is int
    assert cfg.learning_rate == pytest.approx(1e-3) and type(cfg.learning_rate) is float
    assert cfg.alpha == 4.0 and type(cfg.alpha) is float
    assert cfg.lr_schedule == "cosine"
    assert cfg.target_modules == ["to_q", "to_v"]
    assert cfg.sample_prompts == ["a {token}", "b {class}"]
    assert cfg.model == "builtin"


@pytest.mark.parametrize("text, expected", [
    ("{token} on a beach", ["{token} on a beach"]),  # braces first: not YAML, still a prompt
    ("{token} {class}, {token} in snow", ["{token} {class}", "{token} in snow"]),
    ("a photo of {token} {class}", ["a photo of {token} {class}"]),
    ("[to_q, to_k]", ["to_q", "to_k"]),
])
def test_list_override_reads_prompts_with_braces(text, expected):
    assert build_config(overrides=[f"sample_prompts={text}"]).sample_prompts == expected


def test_list_override_with_broken_brackets_names_the_field():
    with pytest.raises(StudioError, match="'sample_prompts'"):
        coerce("sample_prompts", "[a {token}, b]")


def test_override_text_that_is_not_the_type_names_the_field():
    with pytest.raises(StudioError, match="'steps'") as err:
        coerce("steps", "many")
    assert "'many'" in str(err.value)
    with pytest.raises(StudioError, match="'lr_schedule'"):
        build_config(overrides=["lr_schedule=linear"])


def test_override_without_equals_is_refused():
    with pytest.raises(StudioError, match="key=value"):
        build_config(overrides=["steps"])


def test_layers_apply_in_order_preset_values_overrides():
    cfg = build_config(preset="quick", values={"steps": 7, "rank": 4}, overrides=["steps=9"])
    assert cfg.steps == 9  # override beats value beats preset
    assert cfg.rank == 4
    assert cfg.learning_rate == pytest.approx(load_preset("quick")["learning_rate"])


def test_yaml_exponent_without_a_dot_is_read_as_a_number(tmp_path):
    from studio.config import build_config

    preset = tmp_path / "mine.yaml"
    preset.write_text("learning_rate: 1e-4\nsteps: 50\n")  # PyYAML leaves `1e-4` a string
    cfg = build_config(str(preset))
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)


def test_empty_target_modules_is_refused_naming_the_field():
    import pytest

    from studio.config import build_config
    from studio.errors import StudioError

    with pytest.raises(StudioError, match="'target_modules'"):
        build_config(values={"target_modules": []})
