"""Pivotal tuning: the new token's row and the LoRA train together, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio import train
from studio.adapters import checks, embedding, lora
from studio.config import build_config
from studio.generate import AdapterChoice, GenerateRequest, Playground
from studio.paths import LORA_WEIGHTS
from tests.helpers import loaded_pipeline

PROMPT = "a photo of sks stuffed animal"


def config(dataset_dir, **values):
    base = dict(model="tiny", dataset=str(dataset_dir), method="pivotal", steps=6, learning_rate=2e-2,
                sample_every=0, sample_prompts=[])
    return build_config(values={**base, **values})


@pytest.fixture(scope="module")
def pivotal_run(dataset_dir, tiny_model, tmp_path_factory):
    with loaded_pipeline() as seen:
        result = train.run(config(dataset_dir), tmp_path_factory.mktemp("pivotal") / "run")
    assert result.status == "completed", result.message
    return result.run_dir, seen


def test_only_the_new_row_and_the_lora_train(pivotal_run):
    _, seen = pivotal_run
    pipe, before = seen["pipe"], seen["before"]
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in before["vae"].items())
    unet = pipe.unet.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in unet.items() if "lora_" not in k}
    assert base.keys() == before["unet"].keys()
    assert all(torch.equal(base[k], v) for k, v in before["unet"].items())  # frozen base, bit-identical
    lora_b = [k for k in unet if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(unet[k]) > 0 for k in lora_b)  # B left zero: it trained
    text = pipe.text_encoder.state_dict()
    key = next(k for k in text if k.endswith("token_embedding.weight"))
    old = before["text_encoder"][key]
    assert torch.equal(text[key][: old.shape[0]], old) and text[key].shape[0] == old.shape[0] + 1


def test_both_parts_are_saved_and_verified(pivotal_run):
    run, _ = pivotal_run
    folder = run / "adapter"
    assert (folder / LORA_WEIGHTS).exists() and (folder / lora.KOHYA_WEIGHTS).exists()
    assert (folder / embedding.WEIGHTS).exists() and (folder / embedding.a1111_file("sks")).exists()
    reports = checks.read_reports(folder)
    assert {r.format for r in reports} == {"kohya", "diffusers-embedding", "a1111-embedding"}
    assert all(r.ok for r in reports), [r.summary() for r in reports if not r.ok]


def test_playground_scale_moves_the_lora_with_the_token_loaded(pivotal_run):
    run, _ = pivotal_run
    playground = Playground()
    images = {s: np.asarray(playground.generate(GenerateRequest(PROMPT, "tiny", [AdapterChoice(str(run), s)],
                                                               seed=1, steps=3)), dtype=float)
              for s in (0.0, 0.5, 1.0)}
    pure = np.asarray(Playground().generate(GenerateRequest(PROMPT, "tiny", [], seed=1, steps=3)), dtype=float)
    assert np.abs(images[1.0] - images[0.0]).mean() > 0.5  # the LoRA part scales
    assert np.abs(images[0.5] - images[0.0]).mean() > 0.1 and np.abs(images[0.5] - images[1.0]).mean() > 0.1
    assert np.abs(images[0.0] - pure).mean() > 0.5  # at scale 0 the learned token still speaks


def test_resume_a_pivotal_run(pivotal_run, tmp_path):
    import shutil

    run, _ = pivotal_run
    shutil.copytree(run, tmp_path / "run")
    assert train.resume(tmp_path / "run", steps=7).step == 7
