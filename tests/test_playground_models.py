"""A fully fine-tuned model (DreamBooth) chosen in the Playground: it draws the adapted image, the base
model draws the base image, adapters stack on it, and neither pipeline reloads between pictures."""

from __future__ import annotations

import numpy as np
import pytest

from studio import models, train
from studio.config import build_config
from studio.errors import StudioError
from studio.generate import AdapterChoice, GenerateRequest, Playground, split_choices

PROMPT = "a photo of sks stuffed animal"


def request(*choices: AdapterChoice, model: str = "tiny") -> GenerateRequest:
    return GenerateRequest(PROMPT, model, list(choices), seed=0, steps=3)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def dreambooth_runs(dataset_dir, tiny_model, tmp_path_factory) -> list:
    """Two 2-step full fine-tunes of the tiny model with different seeds."""
    runs = []
    for seed in (0, 1):
        cfg = build_config(values=dict(model="tiny", dataset=str(dataset_dir), method="full", steps=2, seed=seed,
                                       learning_rate=1e-3, sample_every=0, sample_prompts=[], checkpoint_every=0))
        result = train.run(cfg, tmp_path_factory.mktemp("db") / "run")
        assert result.status == "completed", result.message
        runs.append(result.run_dir)
    return runs


def test_the_fine_tuned_model_draws_the_adapted_image_and_the_base_the_base(dreambooth_runs):
    run = dreambooth_runs[0]
    playground = Playground()
    base, adapted = playground.generate_pair(request(AdapterChoice(str(run))))
    assert np.array_equal(pixels(base), pixels(Playground().generate(request())))
    as_model = Playground().generate(request(model=str(run / "adapter")))  # named as the base model
    assert np.array_equal(pixels(adapted), pixels(as_model))
    assert np.abs(pixels(adapted) - pixels(base)).mean() > 1


def test_scale_zero_switches_it_off(dreambooth_runs):
    playground = Playground()
    base = pixels(playground.generate(request()))
    assert np.array_equal(pixels(playground.generate(request(AdapterChoice(str(dreambooth_runs[0]), 0.0)))), base)


def test_an_adapter_stacks_on_the_fine_tuned_model(dreambooth_runs, trained_run):
    playground = Playground()
    model_only = pixels(playground.generate(request(AdapterChoice(str(dreambooth_runs[0])))))
    stacked = pixels(playground.generate(request(AdapterChoice(str(dreambooth_runs[0])),
                                                 AdapterChoice(str(trained_run), 1.0))))
    off = pixels(playground.generate(request(AdapterChoice(str(dreambooth_runs[0])),
                                             AdapterChoice(str(trained_run), 0.0))))
    assert np.abs(stacked - model_only).mean() > 1
    assert np.array_equal(off, model_only)


def test_pairs_do_not_reload_either_model(dreambooth_runs, monkeypatch):
    playground = Playground()
    playground.generate_pair(request(AdapterChoice(str(dreambooth_runs[0]))))
    loads = []
    real = models.load_pipeline
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: loads.append(a[0].name) or real(*a, **k))
    for _ in range(2):
        playground.generate_pair(request(AdapterChoice(str(dreambooth_runs[0]))))
    assert loads == []


def test_two_fine_tuned_models_at_once_is_one_sentence(dreambooth_runs):
    both = [AdapterChoice(str(r)) for r in dreambooth_runs]
    with pytest.raises(StudioError, match="Two fully fine-tuned models") as info:
        Playground().generate(request(*both))
    assert str(info.value).count(". ") == 0 and "\n" not in str(info.value)
    model, rest = split_choices("tiny", [both[0], AdapterChoice(str(dreambooth_runs[1]), 0.0)])
    assert model == str(dreambooth_runs[0] / "adapter") and rest == []
