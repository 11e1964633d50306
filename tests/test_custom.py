"""Custom Diffusion: cross-attention K/V and one new token per concept train, two concepts jointly,
with prior preservation; files reload; the Playground turns it on and off; the scale interpolates."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from studio import models, train
from studio.adapters import checks, clients, custom
from studio.config import build_config
from studio.errors import StudioError
from studio.generate import AdapterChoice, GenerateRequest, Playground
from tests.helpers import loaded_pipeline

PROMPT = "a photo of sks stuffed animal and zwx toy duck"


@pytest.fixture(scope="module")
def duck_dir(dreambench_photos, tmp_path_factory):
    from studio.data.dataset import prep_folder

    src = tmp_path_factory.mktemp("duck_photos")
    for i, im in enumerate(dreambench_photos("duck_toy")[:3]):
        im.save(src / f"{i:02d}.jpg", quality=92)
    out = tmp_path_factory.mktemp("duck") / "ds"
    spec, problems = prep_folder(src, out, "zwx", "toy duck", 64)
    assert problems == [] and len(spec.items) == 3
    return out


def config(dataset_dir, duck_dir, **values):
    base = dict(model="tiny", dataset=str(dataset_dir), extra_datasets=[str(duck_dir)], method="custom",
                steps=6, learning_rate=5e-2, sample_every=0, sample_prompts=[], checkpoint_every=3,
                prior_preservation=True, num_class_images=2, class_image_steps=2)
    return build_config(values={**base, **values})


@pytest.fixture(scope="module")
def custom_run(dataset_dir, duck_dir, tiny_model, tmp_path_factory):
    with loaded_pipeline() as seen:
        result = train.run(config(dataset_dir, duck_dir), tmp_path_factory.mktemp("custom") / "run")
    assert result.status == "completed", result.message
    return result.run_dir, seen


def _image(pipe, prompt=PROMPT, seed=1) -> np.ndarray:
    with torch.no_grad():
        image = pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                     height=64, width=64).images[0]
    return np.asarray(image, dtype=float)


def test_only_kv_and_the_new_rows_train(custom_run):
    _, seen = custom_run
    pipe, before = seen["pipe"], seen["before"]
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in before["vae"].items())
    kv = set(custom.kv_weights(pipe.unet))
    assert kv and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in kv)
    unet = pipe.unet.state_dict()
    assert unet.keys() == before["unet"].keys()
    for key, old in before["unet"].items():
        if key in kv:
            assert not torch.equal(unet[key], old), key  # every cross-attention K/V weight trained
        else:
            assert torch.equal(unet[key], old), key  # the rest, bit-identical
    text = pipe.text_encoder.state_dict()
    emb = next(k for k in text if k.endswith("token_embedding.weight"))
    assert all(torch.equal(text[k], v) for k, v in before["text_encoder"].items() if k != emb)
    old, new = before["text_encoder"][emb], text[emb]
    assert new.shape[0] == old.shape[0] + 2 and torch.equal(new[: old.shape[0]], old)
    for token, init in (("sks", "animal"), ("zwx", "duck")):  # both concepts' tokens trained
        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        init_id = pipe.tokenizer.encode(init, add_special_tokens=False)[0]
        assert token_id >= old.shape[0] and not torch.equal(new[token_id], old[init_id]), token


def test_prior_preservation_draws_each_concepts_class(custom_run):
    from studio import prior
    from studio.config import load_run_config

    run, _ = custom_run
    cfg = load_run_config(run / "config.yaml")
    assert cfg["extra_datasets"] and cfg["extra_datasets"][0].endswith("ds")  # resolved, saved for resume
    for word in ("stuffed animal", "toy duck"):
        folder = prior.cache_dir(cfg["model"], f"a photo of {word}", 64, 2)
        assert len(list(folder.glob("*.png"))) == 2, word


def test_the_files_hold_kv_and_one_embedding_per_token(custom_run):
    run, seen = custom_run
    folder = run / "adapter"
    assert custom.tokens_of(folder) == ["sks", "zwx"]
    kv = load_file(str(folder / custom.WEIGHTS))
    assert kv.keys() == custom.kv_weights(seen["pipe"].unet).keys()
    for token in ("sks", "zwx"):
        assert list(load_file(str(folder / custom.EMBEDDINGS / f"{token}.safetensors"))) == [token]
    assert (run / "checkpoints").is_dir() and custom.tokens_of(next((run / "checkpoints").iterdir())) == ["sks", "zwx"]


def test_files_reload_into_a_fresh_pipeline_and_reproduce_the_trained_output(custom_run, tiny_model):
    run, seen = custom_run
    trained = seen["pipe"]
    trained.unet.eval()
    expected = _image(trained)
    fresh = models.load_pipeline(models.resolve("tiny"))
    base_state = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    vocab = len(fresh.tokenizer)
    base = _image(fresh)
    custom.load_into(fresh, run / "adapter", "a")
    assert np.abs(_image(fresh) - expected).max() <= 1.0
    assert np.abs(expected - base).mean() > 0.5
    custom.set_scale(fresh, run / "adapter", 0.0)  # the K/V weights back to the base model's, exactly
    kv = custom.kv_weights(fresh.unet)
    assert all(torch.equal(w, base_state[k]) for k, w in kv.items())
    half_way = (custom.set_scale(fresh, run / "adapter", 0.5), _image(fresh))[1]
    custom.set_scale(fresh, run / "adapter", 1.0)
    assert np.abs(half_way - expected).mean() > 0.1
    custom.unload(fresh, run / "adapter")
    assert all(torch.equal(v, base_state[k]) for k, v in fresh.unet.state_dict().items())
    assert len(fresh.tokenizer) == vocab and "zwx" not in fresh.tokenizer.get_vocab()
    assert np.array_equal(_image(fresh), base)


def test_playground_custom_is_on_or_off(custom_run, tiny_model):
    run, _ = custom_run
    playground = Playground()
    req = GenerateRequest(PROMPT, "tiny", [AdapterChoice(str(run), 1.0)], seed=2, steps=3)
    base, adapted = playground.generate_pair(req)
    pure = Playground().generate(GenerateRequest(PROMPT, "tiny", [], seed=2, steps=3))
    assert np.array_equal(np.asarray(base), np.asarray(pure))  # scale 0: K/V and tokens unloaded
    assert np.abs(np.asarray(adapted, float) - np.asarray(base, float)).mean() > 0.5
    assert np.array_equal(np.asarray(playground.generate(req)), np.asarray(adapted))


def test_resume_a_custom_run(custom_run, tmp_path):
    run, _ = custom_run
    shutil.copytree(run, tmp_path / "run")
    result = train.resume(tmp_path / "run", steps=7)
    assert result.status == "completed" and result.step == 7, result.message


def test_extra_datasets_join_the_images_for_any_method(dataset_dir, duck_dir, tiny_model):
    from studio.data.dataset import ConceptDataset

    pipe = models.load_pipeline(models.resolve("tiny"))
    data = [ConceptDataset(dataset_dir, 64), ConceptDataset(duck_dir, 64)]
    frozen = train._cache_frozen(pipe, data, "cpu", torch.float32, flips=False)
    assert frozen.n_images == 8 and frozen.latent_mean.shape[1] == 8
    assert frozen.captions[-1] == data[1].captions[-1] and "zwx" in frozen.captions[-1]


def test_a_bad_extra_dataset_is_one_sentence(dataset_dir, duck_dir, tiny_model, tmp_path):
    with pytest.raises(StudioError) as missing:
        train.run(config(dataset_dir, duck_dir, extra_datasets=[str(tmp_path / "nope")]), tmp_path / "run")
    assert "does not exist" in str(missing.value) and str(missing.value).count(". ") == 0
    with pytest.raises(StudioError, match="trigger word 'sks'"):
        train.run(config(dataset_dir, duck_dir, extra_datasets=[str(dataset_dir)]), tmp_path / "run2")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_the_diffusers_format_reloads_through_diffusers_and_matches(custom_run):
    from studio.adapters import checks

    run, seen = custom_run
    reports = checks.read_reports(run / "adapter")
    assert [(r.file, r.format) for r in reports] == [
        (custom.DIFFUSERS_WEIGHTS, "diffusers-custom-diffusion"), (custom.DIFF_WEIGHTS, "lora-diff"),
        (f"{custom.A1111_EMBEDDINGS}/sks.safetensors", "a1111-embedding"),
        (f"{custom.A1111_EMBEDDINGS}/zwx.safetensors", "a1111-embedding")]
    assert all(r.ok for r in reports), [r.summary() for r in reports]
    state = load_file(str(run / "adapter" / custom.DIFFUSERS_WEIGHTS))
    assert sum(k.endswith("to_k_custom_diffusion.weight") for k in state) == len(custom.kv_weights(seen["pipe"].unet)) // 2


def test_a_wrong_diffusers_file_fails_the_check(custom_run, tmp_path):
    from safetensors.torch import save_file

    _, seen = custom_run
    pipe = seen["pipe"]
    state = custom.diffusers_state_dict(pipe.unet)
    key = next(k for k in state if k.endswith("to_v_custom_diffusion.weight"))
    state[key] = state[key] + 0.5  # a wrong value
    save_file(state, str(tmp_path / custom.DIFFUSERS_WEIGHTS))
    report = custom.check_diffusers_file(tmp_path / custom.DIFFUSERS_WEIGHTS, pipe)
    assert not report.ok and report.max_abs_diff > 1e-3


def test_playground_slider_interpolates_without_reloading(custom_run, monkeypatch):
    run, _ = custom_run
    loads = []
    real = custom.load_into
    monkeypatch.setattr(custom, "load_into", lambda *a: (loads.append(a), real(*a)))
    playground = Playground()
    images = {}
    for scale in (1.0, 0.5, 0.0, 1.0):
        playground.set_scales("tiny", [AdapterChoice(str(run), scale)])
        images.setdefault(scale, np.asarray(playground.generate(GenerateRequest(
            PROMPT, "tiny", [AdapterChoice(str(run), scale)], seed=2, steps=3)), dtype=float))
    assert len(loads) == 1  # loaded once; every scale after that was set in place
    assert np.abs(images[1.0] - images[0.5]).mean() > 0.1 and np.abs(images[0.5] - images[0.0]).mean() > 0.1


# ----------------------------------------------------------------------------- files for ComfyUI / A1111

def _clients_unet(model_dir, diff_file, strength=1.0):
    """The base UNet read fresh from disk with the .diff file applied as ComfyUI and A1111 apply it: each
    key "lora_unet_<module path, '.' -> '_'>.diff" names a weight (comfy/lora.py model_lora_keys_unet),
    and the weight becomes W + strength * diff (a "diff" patch; A1111 network_full.py, scale 1)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet").eval()
    weights = {"lora_unet_" + name.removesuffix(".weight").replace(".", "_"): p
               for name, p in unet.named_parameters() if name.endswith(".weight")}
    with torch.no_grad():
        for key, diff in load_file(str(diff_file)).items():
            stem, part = key.split(".")
            assert part == "diff" and weights[stem].shape == diff.shape, key
            weights[stem] += strength * diff
    return unet


def _unet_output(unet):
    g = torch.Generator().manual_seed(3)
    c = unet.config
    with torch.no_grad():
        return unet(torch.randn(1, c.in_channels, 8, 8, generator=g), torch.tensor([400]),
                    encoder_hidden_states=torch.randn(1, 77, c.cross_attention_dim, generator=g)).sample


def test_the_diff_file_applied_by_the_clients_rule_is_the_trained_unet(custom_run, tiny_model):
    run, seen = custom_run
    diff_file = run / "adapter" / custom.DIFF_WEIGHTS
    keys = load_file(str(diff_file)).keys()
    assert len(keys) == len(custom.kv_weights(seen["pipe"].unet)) and all(
        k.endswith(("_attn2_to_k.diff", "_attn2_to_v.diff")) and k.startswith("lora_unet_") for k in keys)
    trained = seen["pipe"].unet.eval()
    theirs = _unet_output(_clients_unet(tiny_model, diff_file))
    base = _unet_output(_clients_unet(tiny_model, diff_file, strength=0.0))
    assert (theirs - _unet_output(trained)).abs().max() < 1e-5
    assert (theirs - base).abs().max() > 1e-3  # the diff does something: the check could fail


def test_export_check_lists_each_client_for_the_diff_file(custom_run):
    """export_check.yaml: the .diff file through ComfyUI's and A1111's own rules, every key read and the
    UNet's output as the trained model's; kohya's LoRA reader is listed as not the file's client."""
    run, _ = custom_run
    report = next(r for r in checks.read_reports(run / "adapter") if r.file == custom.DIFF_WEIGHTS)
    assert report.ok, report.summary()
    by_client = {c["client"]: c for c in report.clients}
    for client in (clients.COMFYUI, clients.A1111):
        check = by_client[client]
        assert check["recommended"] and check["exact"] and check["matched"] == check["total"] > 0, check
        assert check["change"] > 1e-4  # training moved the output: a wrong weight would show
    assert not by_client[clients.KOHYA]["recommended"] and by_client[clients.KOHYA]["matched"] == 0


def test_a_wrong_diff_value_is_not_exact_for_the_clients(custom_run):
    _, seen = custom_run
    pipe = seen["pipe"]
    state = custom.diff_state_dict(pipe.unet)
    key = sorted(state)[0]
    state[key] = state[key] * 3
    before = {k: w.detach().clone() for k, w in custom.kv_weights(pipe.unet).items()}
    report = {c["client"]: c for c in custom.diff_client_checks(state, pipe)}
    assert not report[clients.COMFYUI]["exact"] and not report[clients.A1111]["exact"]
    assert report[clients.COMFYUI]["matched"] == report[clients.COMFYUI]["total"]  # the keys are right
    # the trained K/V are back in place, bit for bit
    assert all(torch.equal(before[k], w) for k, w in custom.kv_weights(pipe.unet).items())


def test_the_studio_scale_is_the_clients_strength(custom_run, tiny_model):
    """Half strength in ComfyUI/A1111 draws what the Playground draws at scale 0.5 (W0 + 0.5 (W1 - W0))."""
    run, _ = custom_run
    pipe = models.load_pipeline(models.resolve("tiny"), "cpu", torch.float32)
    custom.load_into(pipe, run / "adapter", "custom")
    custom.set_scale(pipe, run / "adapter", 0.5)
    half = _unet_output(_clients_unet(tiny_model, run / "adapter" / custom.DIFF_WEIGHTS, strength=0.5))
    assert (half - _unet_output(pipe.unet.eval())).abs().max() < 1e-5


@pytest.mark.parametrize("tamper", ["value", "name"])
def test_a_wrong_diff_file_fails_the_check(custom_run, tmp_path, tamper):
    from safetensors.torch import save_file

    _, seen = custom_run
    pipe = seen["pipe"]
    state = custom.diff_state_dict(pipe.unet)
    key = sorted(state)[0]
    if tamper == "value":
        state[key] = state[key] + 0.5
    else:  # a module name no client finds
        state[key.replace("attn2", "attn9")] = state.pop(key)
    save_file(state, str(tmp_path / custom.DIFF_WEIGHTS))
    report = custom.check_diff_file(tmp_path / custom.DIFF_WEIGHTS, pipe)
    assert not report.ok
    if tamper == "value":
        assert report.max_abs_diff > 1e-3
    else:
        assert report.unexpected_keys == [key.replace("attn2", "attn9")] and report.missing_keys == [key]


def test_a1111_embeddings_hold_each_trained_token(custom_run):
    run, seen = custom_run
    encoder = seen["pipe"].text_encoder
    rows = encoder.get_input_embeddings().weight
    for token, token_id in encoder._studio_tokens:
        data = load_file(str(run / "adapter" / custom.A1111_EMBEDDINGS / f"{token}.safetensors"))
        assert list(data) == ["emb_params"] and data["emb_params"].shape == (1, rows.shape[1])
        assert torch.equal(data["emb_params"][0], rows[token_id].detach().float())
