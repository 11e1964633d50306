"""Playground inference: the adapter's effect, exact scale 0, in-place scale changes, clear refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest

from studio.adapters import lora
from studio.errors import StudioError
from studio.generate import AdapterChoice, GenerateRequest, Playground, parse_adapter_arg

PROMPT = "a photo of sks stuffed animal"
STEPS = 3


def request(*choices: AdapterChoice, prompt: str = PROMPT, model: str = "tiny") -> GenerateRequest:
    return GenerateRequest(prompt, model, list(choices), seed=0, steps=STEPS)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def base_image(tiny_model) -> np.ndarray:
    """The built-in model with no adapter ever loaded into its pipeline."""
    image = Playground().generate(request())
    assert image.size == (64, 64)  # the model's native size when size=0
    return pixels(image)


@pytest.fixture
def at_scale(trained_run):
    """One playground for the test: at_scale(s) generates with the trained adapter at scale s."""
    playground = Playground()

    def generate(scale: float) -> np.ndarray:
        return pixels(playground.generate(request(AdapterChoice(str(trained_run), scale))))

    generate.playground = playground
    return generate


def test_same_seed_same_image(base_image):
    assert np.array_equal(pixels(Playground().generate(request())), base_image)


def test_adapter_changes_the_output(base_image, at_scale):
    assert mean_diff(at_scale(1.0), base_image) > 2.0  # measured ~7 of 255 on the trained fixture


def test_scale_zero_equals_the_base_exactly(base_image, at_scale):
    assert np.array_equal(at_scale(0.0), base_image)


def test_half_scale_differs_from_zero_and_one(at_scale):
    zero, half, one = at_scale(0.0), at_scale(0.5), at_scale(1.0)
    assert mean_diff(half, zero) > 1.0
    assert mean_diff(half, one) > 1.0


def test_changing_the_scale_does_not_reload_weights(at_scale, trained_run, monkeypatch):
    calls = []
    real = lora.load_into

    def spy(pipe, adapter_dir, name):
        calls.append(adapter_dir)
        real(pipe, adapter_dir, name)

    monkeypatch.setattr(lora, "load_into", spy)

    images = [at_scale(s) for s in (1.0, 0.5, 0.0, 1.0)]

    assert len(calls) == 1 and calls[0] == trained_run / "adapter"
    assert np.array_equal(images[0], images[3])  # back to 1 after 0.5 and 0: the same image
    assert mean_diff(images[0], images[1]) > 1.0  # and the scale did act each time
    pipe, _ = at_scale.playground.pipeline("tiny")
    assert sum(len(v) for v in pipe.get_list_adapters().values()) == 1


def test_no_adapter_after_an_adapter_equals_the_base(base_image, at_scale):
    at_scale(1.0)
    assert np.array_equal(pixels(at_scale.playground.generate(request())), base_image)


def test_generate_pair_gives_base_and_adapted(base_image, at_scale, trained_run):
    base, adapted = at_scale.playground.generate_pair(request(AdapterChoice(str(trained_run), 1.0)))
    assert np.array_equal(pixels(base), base_image)
    assert np.array_equal(pixels(adapted), at_scale(1.0))


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_refused(prompt):
    with pytest.raises(StudioError, match="prompt is empty"):
        Playground().generate(request(prompt=prompt))


def one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and message.endswith(".")
    assert not re.search(r"[.!?]\s+[A-Z]", message), message


@pytest.mark.parametrize("model", ["nobody/no-such-model",  # hub id, hub offline in tests
                                   "not-a-model-id"])         # neither hub id, folder nor 'builtin'
def test_unknown_model_is_one_sentence(model):
    with pytest.raises(StudioError) as err:
        Playground().generate(request(model=model))
    one_sentence(str(err.value))
    assert f"'{model}'" in str(err.value)


def test_folder_that_is_not_a_model_is_one_sentence(tmp_path):
    with pytest.raises(StudioError, match="model_index.json") as err:
        Playground().generate(request(model=str(tmp_path)))
    one_sentence(str(err.value))


def test_run_without_adapter_is_refused(tmp_path, tiny_model):
    with pytest.raises(StudioError, match="No trained adapter"):
        Playground().generate(request(AdapterChoice(str(tmp_path), 1.0)))


@pytest.mark.parametrize("text, expected", [("runs/a", AdapterChoice("runs/a", 1.0)),
                                            ("runs/a:0.5", AdapterChoice("runs/a", 0.5)),
                                            ("runs/a:-1", AdapterChoice("runs/a", -1.0))])
def test_parse_adapter_arg(text, expected):
    assert parse_adapter_arg(text) == expected


def test_parse_adapter_arg_with_bad_scale():
    with pytest.raises(StudioError, match="RUN_DIR:SCALE"):
        parse_adapter_arg("runs/a:strong")


def test_adapter_argument_with_a_colon_in_the_folder_name(tmp_path):
    from studio.generate import parse_adapter_arg

    folder = tmp_path / "run:v2"
    folder.mkdir()
    assert parse_adapter_arg(str(folder)).path == str(folder)
    assert parse_adapter_arg(f"{folder}:0.25").scale == 0.25


def test_a_resaved_adapter_replaces_its_old_copy(trained_run, tmp_path):
    import os
    import shutil

    from studio.generate import AdapterChoice, Playground

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    playground = Playground()
    playground.set_scales("tiny", [AdapterChoice(str(run), 1.0)])
    pipe, _ = playground.pipeline("tiny")
    weights = run / "adapter" / "pytorch_lora_weights.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "saved again"
    playground.set_scales("tiny", [AdapterChoice(str(run), 1.0)])
    assert len(pipe.get_list_adapters()["unet"]) == 1
