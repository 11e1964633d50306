"""Textual inversion: one new token's row trains; files load through diffusers; playground on/off."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio import adapters, models, train
from studio.adapters import checks, embedding
from studio.config import build_config
from studio.generate import AdapterChoice, GenerateRequest, Playground
from tests.helpers import loaded_pipeline

PROMPT = "a photo of sks stuffed animal"


def config(dataset_dir, **values):
    base = dict(model="tiny", dataset=str(dataset_dir), method="embedding", steps=6, learning_rate=5e-2,
                sample_every=0, sample_prompts=[], checkpoint_every=3)
    return build_config(values={**base, **values})


@pytest.fixture(scope="module")
def ti_run(dataset_dir, tiny_model, tmp_path_factory):
    result = train.run(config(dataset_dir), tmp_path_factory.mktemp("ti") / "run")
    assert result.status == "completed", result.message
    return result.run_dir


def test_only_the_new_row_trains(dataset_dir, tiny_model, tmp_path):
    with loaded_pipeline() as seen:
        assert train.run(config(dataset_dir, steps=3), tmp_path / "run").status == "completed"
    pipe, before = seen["pipe"], seen["before"]
    for name in ("unet", "vae"):
        after = getattr(pipe, name).state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
    after = pipe.text_encoder.state_dict()
    key = next(k for k in after if k.endswith("token_embedding.weight"))
    for k, v in before["text_encoder"].items():
        if k != key:
            assert torch.equal(after[k], v), k
    old, new = before["text_encoder"][key], after[key]
    assert new.shape[0] == old.shape[0] + 1  # one new token
    assert torch.equal(new[: old.shape[0]], old)  # the whole old vocabulary, bit-identical
    token_id = pipe.tokenizer.convert_tokens_to_ids("sks")
    assert token_id == old.shape[0]
    init_id = pipe.tokenizer.encode("animal", add_special_tokens=False)[0]
    assert not torch.equal(new[token_id], old[init_id])  # it trained away from its starting word


def test_the_new_row_starts_from_the_initializer_word(dataset_dir, tiny_model):
    pipe = models.load_pipeline(models.resolve("tiny"))
    weight = pipe.text_encoder.get_input_embeddings().weight
    toy = weight[pipe.tokenizer.encode("toy", add_special_tokens=False)[0]].detach().clone()
    embedding.attach(pipe, adapters.setup_for(config(dataset_dir, initializer_token="toy")))
    token_id = pipe.tokenizer.convert_tokens_to_ids("sks")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id].detach(), toy)
    assert pipe.tokenizer("sks").input_ids == [49406, token_id, 49407]  # one token, not BPE pieces


def test_files_reload_through_diffusers_and_match(ti_run):
    reports = checks.read_reports(ti_run / "adapter")
    a1111_file = embedding.a1111_file("sks")  # A1111 and ComfyUI take the trigger word from the file name
    assert a1111_file == "embeddings_a1111/sks.safetensors"
    assert [(r.file, r.format) for r in reports] == [(embedding.WEIGHTS, "diffusers-embedding"),
                                                      (a1111_file, "a1111-embedding")]
    assert all(r.ok and r.max_abs_diff == 0.0 for r in reports)
    a1111 = load_file(str(ti_run / "adapter" / a1111_file))
    assert list(a1111) == ["emb_params"] and a1111["emb_params"].shape == (1, 32)


def test_a_broken_file_fails_the_check(ti_run, tiny_model, tmp_path):
    pipe = models.load_pipeline(models.resolve("tiny"))
    pipe.load_textual_inversion(str(ti_run / "adapter" / embedding.WEIGHTS), token="sks")
    pipe.text_encoder._studio_token = ("sks", pipe.tokenizer.convert_tokens_to_ids("sks"))
    save_file({"emb_params": torch.zeros(1, 32)}, str(tmp_path / "sks.safetensors"))  # wrong vector
    report = embedding._check(tmp_path, "sks.safetensors", "a1111-embedding", pipe)
    assert not report.ok and report.max_abs_diff > 1e-3


def test_playground_embedding_is_on_or_off(ti_run, tiny_model):
    playground = Playground()
    req = GenerateRequest(PROMPT, "tiny", [AdapterChoice(str(ti_run), 1.0)], seed=2, steps=3)
    base, adapted = playground.generate_pair(req)
    pure = Playground().generate(GenerateRequest(PROMPT, "tiny", [], seed=2, steps=3))
    assert np.array_equal(np.asarray(base), np.asarray(pure))  # scale 0: the token is unloaded
    assert np.abs(np.asarray(adapted, float) - np.asarray(base, float)).mean() > 0.5
    again = playground.generate(req)
    assert np.array_equal(np.asarray(again), np.asarray(adapted))


def test_resume_an_embedding_run(ti_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ti_run, run)
    result = train.resume(run, steps=8)
    assert result.status == "completed" and result.step == 8


@pytest.mark.parametrize("values, phrase", [
    (dict(initializer_token="stuffed animal"), "is 2 tokens"),
])
def test_bad_initializer_is_one_sentence(dataset_dir, tiny_model, tmp_path, values, phrase):
    result = train.run(config(dataset_dir, **values), tmp_path / "run")
    assert result.status == "failed" and phrase in result.message and "internal" not in result.message


@pytest.mark.parametrize("trigger", ["photo", "<|endoftext|>"])
def test_a_trigger_word_that_is_already_a_token(dataset_dir, tiny_model, tmp_path, trigger):
    from studio.data.dataset import prep_folder

    src = tmp_path / "src"
    src.mkdir()
    for p in sorted((dataset_dir / "images").glob("*.png"))[:2]:
        shutil.copy(p, src / p.name)
    prep_folder(src, tmp_path / "ds", trigger, "toy", 64)
    result = train.run(config(tmp_path / "ds"), tmp_path / "run")
    assert result.status == "failed" and "already a token" in result.message
