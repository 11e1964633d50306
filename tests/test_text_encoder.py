"""LoRA/DoRA on the text encoder too: what trains, the files, the kohya keys and their check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio import models, train
from studio.adapters import checks, lora
from studio.config import build_config
from studio.errors import StudioError
from studio.generate import AdapterChoice, GenerateRequest, Playground
from studio.paths import LORA_WEIGHTS
from tests.helpers import PROMPT, loaded_pipeline, mean_diff, plain_pipeline, render


def config(dataset_dir, model="tiny", **values):
    base = dict(model=model, dataset=str(dataset_dir), steps=4, learning_rate=1e-2, sample_every=0,
                sample_prompts=[], train_text_encoder=True)
    return build_config(values={**base, **values})


@pytest.fixture(scope="module")
def te_run(dataset_dir, tiny_model, tmp_path_factory):
    with loaded_pipeline() as seen:
        result = train.run(config(dataset_dir), tmp_path_factory.mktemp("te") / "run")
    assert result.status == "completed", result.message
    return result.run_dir, seen


def test_text_encoder_lora_trains_and_its_base_stays(te_run):
    _, seen = te_run
    te = seen["pipe"].text_encoder.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in te.items() if "lora_" not in k}
    assert base.keys() == seen["before"]["text_encoder"].keys()
    assert all(torch.equal(base[k], v) for k, v in seen["before"]["text_encoder"].items())  # frozen weights, bit-identical
    lora_b = [k for k in te if "lora_B" in k]
    assert len(lora_b) == 8 and all(torch.count_nonzero(te[k]) > 0 for k in lora_b)  # 2 layers x q,k,v,out


def test_native_file_holds_both_and_plain_diffusers_matches_the_playground(te_run, tiny_model):
    run, _ = te_run
    keys = load_file(str(run / "adapter" / LORA_WEIGHTS))
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    pipe = plain_pipeline(tiny_model)
    base = render(pipe, 3)
    pipe.load_lora_weights(str(run / "adapter"))
    plain = render(pipe, 3)
    playground = Playground()
    studio = np.asarray(playground.generate(GenerateRequest(PROMPT, "tiny", [AdapterChoice(str(run), 1.0)],
                                                            seed=0, steps=3)), dtype=np.int16)
    assert np.abs(plain - studio).max() <= 1 and mean_diff(plain, base) > 0.5
    zero = np.asarray(playground.generate(GenerateRequest(PROMPT, "tiny", [AdapterChoice(str(run), 0.0)],
                                                          seed=0, steps=3)), dtype=np.int16)
    assert np.array_equal(zero, base)  # scale 0: the text encoder's adapter is off too


def test_kohya_file_has_text_encoder_keys_and_both_checks_pass(te_run):
    run, seen = te_run
    reports = checks.read_reports(run / "adapter")
    assert [r.format for r in reports] == ["kohya", "kohya-text-encoder"]
    assert all(r.ok for r in reports), [r.summary() for r in reports]
    keys = load_file(str(run / "adapter" / lora.KOHYA_WEIGHTS))
    te_keys = [k for k in keys if k.startswith("lora_te_")]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in te_keys
    assert len(te_keys) == 8 * 3  # down, up, alpha per adapted module


def test_a_missing_text_encoder_key_fails_the_check(te_run, tmp_path):
    run, seen = te_run
    weights = load_file(str(run / "adapter" / lora.KOHYA_WEIGHTS))
    removed = "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight"
    del weights[removed]
    save_file(weights, str(tmp_path / lora.KOHYA_WEIGHTS))
    report = lora.check_kohya_text(tmp_path / lora.KOHYA_WEIGHTS, seen["pipe"])
    assert not report.ok and removed in report.missing_keys


def test_sdxl_uses_te1_and_te2_keys(dataset_dir, tmp_path):
    result = train.run(config(dataset_dir, model=models.BUILTIN_SDXL, steps=3), tmp_path / "run")
    assert result.status == "completed", result.message
    keys = load_file(str(result.run_dir / "adapter" / lora.KOHYA_WEIGHTS))
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert all(r.ok for r in checks.read_reports(result.run_dir / "adapter"))


def test_other_methods_refuse_the_option(dataset_dir, tmp_path):
    with pytest.raises(StudioError, match="'train_text_encoder' works with the lora, dora and full methods"):
        train.prepare(config(dataset_dir, method="loha"), tmp_path / "run")
