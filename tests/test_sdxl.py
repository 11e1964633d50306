"""SDXL on the built-in tiny SDXL model ('builtin-sdxl', random weights): every adapter kind trains
through the one loop (two text encoders, pooled text, time ids), saves, reloads in plain diffusers
and in the playground; scale 0 is the base; prior preservation, textual inversion and resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from studio import adapters, events, models, train
from studio.adapters import checks, embedding, lycoris
from studio.config import build_config
from studio.generate import AdapterChoice, GenerateRequest, Playground
from studio.paths import RunPaths
from tests.helpers import loaded_pipeline

PROMPT = "a photo of sks stuffed animal"
GEN_STEPS = 2
KINDS = ("lora", "dora", "loha", "lokr")
ADAPTER_MARKS = {"lora": "lora_", "dora": "lora_", "loha": ".hada_", "lokr": ".lokr_"}
FROZEN = ("vae", "text_encoder", "text_encoder_2")


def config(dataset_dir: Path, **values):
    base = dict(model=models.BUILTIN_SDXL, dataset=str(dataset_dir), steps=4, learning_rate=1e-2,
                sample_every=0, sample_prompts=[], sample_steps=2, checkpoint_every=2)
    return build_config(values={**base, **values})


def plain_pipeline(model_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: str = PROMPT) -> np.ndarray:
    image = pipe(prompt, num_inference_steps=GEN_STEPS, height=64, width=64, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(image, dtype=np.int16)


def studio_render(playground: Playground, *choices: AdapterChoice, prompt: str = PROMPT) -> np.ndarray:
    image = playground.generate(GenerateRequest(prompt, models.BUILTIN_SDXL, list(choices), seed=0,
                                                steps=GEN_STEPS, guidance=5.0))
    return np.asarray(image, dtype=np.int16)


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def losses(run_dir) -> list[tuple[int, float]]:
    return [(e.step, e.loss) for e in events.read_events(RunPaths(run_dir).events) if isinstance(e, events.Step)]


@pytest.fixture(scope="module")
def sdxl_model() -> Path:
    return models.ensure_builtin_sdxl(models.builtin_sdxl_dir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_dir, sdxl_model):
    """kind -> (run folder, training pipeline with adapter 'default' attached, weights before training)."""
    runs = {}
    for kind in KINDS:
        with loaded_pipeline(("unet",) + FROZEN) as seen:
            result = train.run(config(dataset_dir, method=kind), tmp_path_factory.mktemp(f"xl-{kind}") / "run")
        assert result.status == "completed", result.message
        runs[kind] = (result.run_dir, seen["pipe"], seen["before"])
    return runs


@pytest.fixture(scope="module")
def base_image(sdxl_model) -> np.ndarray:
    return render(plain_pipeline(sdxl_model))


# ----------------------------------------------------------------------------- the model

def test_builtin_sdxl_loads_as_an_sdxl_pipeline(sdxl_model):
    pipe = models.load_pipeline(models.resolve(models.BUILTIN_SDXL))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and models.is_sdxl(pipe)
    assert type(models.load_pipeline(models.resolve(models.BUILTIN))).__name__ == "StableDiffusionPipeline"
    # cross-attention reads both encoders' hidden states side by side; the added embedding reads
    # 6 time ids x 8 + text_encoder_2's pooled projection
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == hidden
    assert pipe.unet.add_embedding.linear_1.in_features == 6 * 8 + pipe.text_encoder_2.config.projection_dim


def test_training_encoding_matches_the_pipelines_own(sdxl_model):
    pipe = models.load_pipeline(models.resolve(models.BUILTIN_SDXL))
    with torch.no_grad():
        text, pooled = train.encode_text(pipe, train.tokenize_all(pipe, [PROMPT], "cpu"))
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(text, theirs) and torch.equal(pooled, theirs_pooled)


def test_a_pipeline_the_studio_does_not_know_is_one_sentence(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    from studio.errors import StudioError

    with pytest.raises(StudioError, match="FluxPipeline, which the studio does not"):
        models.load_pipeline(models.resolve(str(tmp_path)))


# ----------------------------------------------------------------------------- what trains

@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_weights_change(trained, kind):
    _, pipe, before = trained[kind]
    mark = ADAPTER_MARKS[kind]
    for name in FROZEN:
        after = snapshot(getattr(pipe, name))
        assert [k for k in after if not torch.equal(after[k], before[name][k])] == [], name
    unet = snapshot(pipe.unet)
    base = {k.replace(".base_layer", ""): v for k, v in unet.items() if mark not in k}
    assert base.keys() == before["unet"].keys()
    assert [k for k in base if not torch.equal(base[k], before["unet"][k])] == []
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all(mark in n for n in trainable)
    zero_init = [k for k in unet if any(f in k for f in ("lora_B.", "hada_w2_a.", "lokr_w2."))]
    assert zero_init and all(torch.count_nonzero(unet[k]) > 0 for k in zero_init)  # the zero-initialised factors trained


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_reloads_in_plain_diffusers_and_matches_the_playground(trained, sdxl_model, base_image, kind):
    run_dir = trained[kind][0]
    pipe = plain_pipeline(sdxl_model)
    if kind in ("lora", "dora"):
        pipe.load_lora_weights(str(run_dir / "adapter"))
    else:  # LoHa/LoKr: diffusers' LoRA loader refuses them; peft's own loading (see lycoris.py)
        lycoris.load_into(pipe, run_dir / "adapter", "x")
    plain = render(pipe)
    studio = studio_render(Playground(), AdapterChoice(str(run_dir), 1.0))
    assert np.abs(plain - studio).max() <= 1
    assert mean_diff(plain, base_image) > 1.0  # the adapter really is in both (measured 3-10 of 255)


@pytest.mark.parametrize("kind", KINDS)
def test_playground_scales_zero_half_one(trained, base_image, kind):
    playground = Playground()
    run = str(trained[kind][0])
    images = {s: studio_render(playground, AdapterChoice(run, s)) for s in (0.0, 0.5, 1.0)}
    assert np.array_equal(images[0.0], base_image)  # scale 0 is the base exactly
    assert not np.array_equal(images[0.5], images[0.0]) and not np.array_equal(images[0.5], images[1.0])


def test_playground_stacks_a_lora_and_a_loha(trained, base_image):
    lora_run, loha_run = str(trained["lora"][0]), str(trained["loha"][0])
    playground = Playground()
    both = studio_render(playground, AdapterChoice(lora_run, 1.0), AdapterChoice(loha_run, 1.0))
    lora_only = studio_render(playground, AdapterChoice(lora_run, 1.0), AdapterChoice(loha_run, 0.0))
    loha_only = studio_render(playground, AdapterChoice(lora_run, 0.0), AdapterChoice(loha_run, 1.0))
    none = studio_render(playground, AdapterChoice(lora_run, 0.0), AdapterChoice(loha_run, 0.0))
    assert np.array_equal(none, base_image)
    assert not np.array_equal(both, lora_only) and not np.array_equal(both, loha_only)
    assert len(playground._loaded) == 2


def test_default_size_is_the_models_native_size(trained):
    image = Playground().generate(GenerateRequest(PROMPT, models.BUILTIN_SDXL, [], steps=1))
    assert image.size == (64, 64)  # UNet sample size 32 x VAE scale factor 2


# ----------------------------------------------------------------------------- objective and resume

def test_prior_preservation_and_samples_run_on_sdxl(dataset_dir, sdxl_model, tmp_path):
    seen = []
    result = train.run(config(dataset_dir, steps=2, checkpoint_every=0, prior_preservation=True,
                              num_class_images=2, class_image_steps=2, sample_prompts=["a photo of {token} {class}"]),
                       tmp_path / "run", on_event=seen.append)
    assert result.status == "completed", result.message
    assert any(isinstance(e, events.Progress) and "class image" in e.message for e in seen)
    assert all(np.isfinite(loss) for _, loss in losses(result.run_dir))
    samples = [e for e in seen if isinstance(e, events.Sample)]
    assert len(samples) == 1 and (result.run_dir / samples[0].images[0]).is_file()  # rendered by the SDXL pipeline


def test_resume_continues_the_exact_loss_series(trained, dataset_dir, tmp_path):
    straight = trained["lora"][0]
    run_dir, seen = tmp_path / "run", []
    first = train.run(config(dataset_dir, method="lora"), run_dir, on_event=seen.append,
                      should_stop=lambda: len([e for e in seen if isinstance(e, events.Step)]) >= 2)
    assert first.status == "cancelled" and first.step == 2
    second = train.resume(run_dir)
    assert second.status == "completed" and second.step == 4
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4]
    assert [v for _, v in losses(run_dir)] == pytest.approx([v for _, v in losses(straight)], rel=1e-5)
    ours, theirs = (load_file(str(d / "adapter" / "pytorch_lora_weights.safetensors")) for d in (run_dir, straight))
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- textual inversion

@pytest.fixture(scope="module")
def ti(dataset_dir, sdxl_model, tmp_path_factory):
    with loaded_pipeline(("unet",) + FROZEN) as seen:
        result = train.run(config(dataset_dir, method="embedding", learning_rate=5e-2),
                           tmp_path_factory.mktemp("xl-ti") / "run")
    assert result.status == "completed", result.message
    return result.run_dir, seen["pipe"], seen["before"]


def test_embedding_trains_only_the_new_row_of_both_encoders(ti):
    _, pipe, before = ti
    for name in ("unet", "vae"):
        after = snapshot(getattr(pipe, name))
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
    for name, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
        after = snapshot(getattr(pipe, name))
        key = next(k for k in after if k.endswith("token_embedding.weight"))
        assert all(torch.equal(after[k], v) for k, v in before[name].items() if k != key), name
        old, new = before[name][key], after[key]
        token_id = tokenizer.convert_tokens_to_ids("sks")
        assert new.shape[0] == old.shape[0] + 1 and token_id == old.shape[0]
        assert torch.equal(new[: old.shape[0]], old)
        init_id = tokenizer.encode("animal", add_special_tokens=False)[0]
        assert not torch.equal(new[token_id], old[init_id]), f"{name}'s new row did not train"


def test_embedding_file_is_sdxl_format_and_reloads_through_diffusers(ti, sdxl_model):
    run_dir, pipe, _ = ti
    state = load_file(str(run_dir / "adapter" / embedding.WEIGHTS))
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    reports = checks.read_reports(run_dir / "adapter")
    assert [r.format for r in reports] == ["sdxl-embedding", "a1111-embedding"] and all(r.ok for r in reports)
    assert reports[1].file == embedding.a1111_file("sks")  # the same contents, named after the trigger word
    plain = plain_pipeline(sdxl_model)  # as diffusers' docs load SDXL embeddings: once per encoder
    plain.load_textual_inversion(state["clip_l"], token="sks", text_encoder=plain.text_encoder,
                                 tokenizer=plain.tokenizer)
    plain.load_textual_inversion(state["clip_g"], token="sks", text_encoder=plain.text_encoder_2,
                                 tokenizer=plain.tokenizer_2)
    studio = studio_render(Playground(), AdapterChoice(str(run_dir), 1.0))
    assert np.abs(render(plain) - studio).max() <= 1


def test_playground_embedding_on_and_off(ti, base_image):
    playground = Playground()
    on = studio_render(playground, AdapterChoice(str(ti[0]), 1.0))
    off = studio_render(playground, AdapterChoice(str(ti[0]), 0.0))
    assert np.array_equal(off, base_image)  # unloaded from both tokenizers and encoders
    assert mean_diff(on, off) > 1.0  # measured ~5 of 255
    assert "sks" not in playground.pipeline(models.BUILTIN_SDXL)[0].tokenizer_2.get_vocab()


def test_resume_an_sdxl_embedding_run(ti, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ti[0], run)
    result = train.resume(run, steps=6)
    assert result.status == "completed" and result.step == 6
    assert adapters.read_meta(run / "adapter").kind == "embedding"


# ----------------------------------------------------------------------------- pivotal and full on SDXL

def test_pivotal_on_sdxl_trains_both_rows_and_the_lora(dataset_dir, tmp_path):
    from safetensors.torch import load_file

    from studio.adapters import embedding

    result = train.run(config(dataset_dir, method="pivotal", learning_rate=2e-2), tmp_path / "run")
    assert result.status == "completed", result.message
    rows = load_file(str(result.run_dir / "adapter" / embedding.WEIGHTS))
    assert set(rows) == {"clip_l", "clip_g"}  # one learned row per text encoder
    base = studio_render(Playground())
    playground = Playground()
    on = studio_render(playground, AdapterChoice(str(result.run_dir), 1.0))
    half = studio_render(playground, AdapterChoice(str(result.run_dir), 0.5))
    assert mean_diff(on, base) > 1 and mean_diff(on, half) > 0.1


def test_full_fine_tune_on_sdxl_is_a_loadable_model(dataset_dir, tmp_path):
    result = train.run(config(dataset_dir, method="full", learning_rate=1e-3, steps=2), tmp_path / "run")
    assert result.status == "completed", result.message
    folder = result.run_dir / "adapter"
    tuned = np.asarray(Playground().generate(GenerateRequest(PROMPT, str(folder), [], seed=0, steps=GEN_STEPS,
                                                             guidance=5.0)), dtype=np.int16)
    assert mean_diff(tuned, studio_render(Playground())) > 1
    assert mean_diff(render(plain_pipeline(folder)), tuned) < 0.5  # plain diffusers draws the same model
    # checkpoints of a full fine-tune hold what resume needs, not a second copy of the model
    checkpoint = result.run_dir / "checkpoints" / "step-000002"
    assert (checkpoint / "trainable.safetensors").exists() and not (checkpoint / "unet").exists()


def test_sdxl_dreambooth_with_both_text_encoders_writes_a_verified_single_file(dataset_dir, tmp_path):
    from safetensors.torch import save_file

    from studio.adapters import full

    with loaded_pipeline(("unet", "vae", "text_encoder", "text_encoder_2")) as seen:
        result = train.run(config(dataset_dir, method="full", learning_rate=1e-3, steps=2, checkpoint_every=0,
                                  train_text_encoder=True), tmp_path / "run")
    assert result.status == "completed", result.message
    pipe, before = seen["pipe"], seen["before"]
    for name in ("text_encoder", "text_encoder_2"):  # both encoders trained
        after = getattr(pipe, name).state_dict()
        assert not all(torch.equal(after[k], v) for k, v in before[name].items()), name
    [report] = checks.read_reports(result.adapter_dir)
    assert report.format == "sd-single-file" and report.ok, report.summary()
    sd = load_file(str(result.adapter_dir / full.SINGLE_FILE))
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "conditioner"}
    te2 = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder_2.state_dict().items()}
    qkv = sd["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(qkv, torch.cat([te2[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(sd["conditioner.embedders.1.model.text_projection"], te2["text_projection.weight"].T)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd
    assert torch.equal(sd["model.diffusion_model.label_emb.0.0.weight"], pipe.unet.add_embedding.linear_1.weight)
    # a wrong OpenCLIP weight is caught by comparing outputs: swap k and v in one layer
    swapped = qkv.clone()
    third = qkv.shape[0] // 3
    swapped[third:2 * third], swapped[2 * third:] = qkv[2 * third:], qkv[third:2 * third]
    sd["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"] = swapped
    save_file(sd, str(tmp_path / "swapped.safetensors"))
    bad = full.check_single_file(tmp_path / "swapped.safetensors", pipe, config_dir=result.adapter_dir)
    assert not bad.ok and bad.max_abs_diff > bad.tolerance


# ----------------------------------------------------------------------------- kohya export on SDXL

@pytest.mark.parametrize("method, extra", [("lora", {"locon": True}), ("dora", {})], ids=["lora-locon", "dora"])
def test_sdxl_kohya_export_uses_ldm_names_and_verifies(dataset_dir, tmp_path, method, extra):
    from safetensors.torch import load_file

    from studio.adapters import checks, lora

    result = train.run(config(dataset_dir, method=method, steps=3, **extra), tmp_path / "run")
    assert result.status == "completed", result.message
    reports = checks.read_reports(result.run_dir / "adapter")
    formats = ["kohya", "full-diff"] if method == "dora" else ["kohya"]  # DoRA merged, for ComfyUI and A1111
    assert [r.format for r in reports] == formats and all(r.ok for r in reports), [r.summary() for r in reports]
    keys = load_file(str(result.run_dir / "adapter" / lora.KOHYA_WEIGHTS))
    assert all(k.startswith("lora_unet_") for k in keys)
    assert all("down_blocks" not in k and "up_blocks" not in k for k in keys)  # SDXL files: LDM layout
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.") for k in keys)


@pytest.mark.parametrize("method, extra", [("loha", {"locon": True}), ("lokr", {})], ids=["loha-locon", "lokr"])
def test_sdxl_lycoris_export_uses_ldm_names_and_the_lycoris_loader_reproduces_it(dataset_dir, tmp_path, method, extra):
    result = train.run(config(dataset_dir, method=method, steps=3, **extra), tmp_path / "run")
    assert result.status == "completed", result.message
    reports = checks.read_reports(result.run_dir / "adapter")
    assert [r.format for r in reports] == ["lycoris"] and reports[0].ok, reports[0].summary()
    assert reports[0].max_abs_diff is not None and reports[0].max_abs_diff < 1e-4
    keys = load_file(str(result.run_dir / "adapter" / "lycoris.safetensors"))
    assert all(k.startswith("lora_unet_") for k in keys)
    assert all("down_blocks" not in k and "up_blocks" not in k for k in keys)  # SDXL files: LDM layout
    mark = ADAPTER_MARKS[method].strip(".")
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k." + mark) for k in keys)
    if extra.get("locon"):  # ResNet convolutions under their LDM names
        assert any("_in_layers_2." in k for k in keys) and any("_out_layers_3." in k for k in keys)


def test_sdxl_lycoris_check_catches_a_wrong_weight(dataset_dir, tmp_path):
    from safetensors.torch import save_file

    with loaded_pipeline() as seen:
        result = train.run(config(dataset_dir, method="loha", steps=3), tmp_path / "run")
    sd = load_file(str(result.run_dir / "adapter" / "lycoris.safetensors"))
    key = next(k for k in sorted(sd) if k.endswith("hada_w2_a") and "input_blocks_4_1" in k)
    sd[key] = sd[key] + 0.5
    save_file(sd, str(tmp_path / "tampered.safetensors"))
    report = lycoris.check_export(tmp_path / "tampered.safetensors", seen["pipe"])
    assert not report.ok and report.max_abs_diff > report.tolerance, report.summary()
    del sd[key]
    save_file(sd, str(tmp_path / "missing.safetensors"))
    report = lycoris.check_export(tmp_path / "missing.safetensors", seen["pipe"])
    assert not report.ok and key in report.missing_keys


def test_sdxl_kohya_file_loads_with_the_public_loader(dataset_dir, tmp_path):
    from studio.adapters import lora

    result = train.run(config(dataset_dir, method="lora", steps=3), tmp_path / "run")
    pipe = plain_pipeline(models.resolve(models.BUILTIN_SDXL).source)
    base = render(pipe)
    pipe.load_lora_weights(str(result.run_dir / "adapter" / lora.KOHYA_WEIGHTS))  # as a user would
    plain = render(pipe)
    studio = studio_render(Playground(), AdapterChoice(str(result.run_dir), 1.0))
    assert np.abs(plain - studio).max() <= 1 and mean_diff(plain, base) > 1


def test_custom_diffusion_on_sdxl(dataset_dir, tmp_path):
    from safetensors.torch import load_file

    result = train.run(config(dataset_dir, method="custom", learning_rate=1e-3, steps=3), tmp_path / "run")
    assert result.status == "completed", result.message
    kv = load_file(str(result.run_dir / "adapter" / "custom_kv.safetensors"))
    assert kv and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in kv)
    reports = checks.read_reports(result.run_dir / "adapter")  # diffusers' load_attn_procs reads the export
    assert [r.format for r in reports] == ["diffusers-custom-diffusion", "lora-diff", "a1111-embedding"]
    assert all(r.ok and r.max_abs_diff is not None for r in reports), [r.summary() for r in reports]
    diff = load_file(str(result.run_dir / "adapter" / "custom_diffusion_diff.safetensors"))
    assert diff and all(k.startswith("lora_unet_") and "_blocks_" in k and k.endswith(("attn2_to_k.diff", "attn2_to_v.diff"))
                        for k in diff)  # LDM names (input_blocks / middle_block / output_blocks), as SDXL LoRAs use
    assert not any("down_blocks" in k or "up_blocks" in k for k in diff)
    a1111 = load_file(str(result.run_dir / "adapter" / "embeddings_a1111" / "sks.safetensors"))
    assert set(a1111) == {"clip_l", "clip_g"}
    from studio.adapters import metadata

    meta = metadata.read(result.run_dir / "adapter" / "custom_diffusion_diff.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    rows = load_file(str(result.run_dir / "adapter" / "embeddings" / "sks.safetensors"))
    assert set(rows) == {"clip_l", "clip_g"}  # the token's row in both text encoders
    playground = Playground()
    on = studio_render(playground, AdapterChoice(str(result.run_dir), 1.0))
    assert mean_diff(on, studio_render(Playground())) > 1
    off = studio_render(playground, AdapterChoice(str(result.run_dir), 0.0))
    assert mean_diff(off, on) > 0.1
