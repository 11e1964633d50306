"""Full fine-tuning (DreamBooth): the whole UNet trains, the result is a base model, and its SD 1.x
single file reads back through diffusers' from_single_file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio import adapters, models, prior, train
from studio.adapters import checks, full
from studio.config import build_config
from studio.errors import StudioError
from studio.paths import RunPaths
from tests.helpers import loaded_pipeline

PROMPT = "a photo of sks stuffed animal"
STEPS = 3


def config(dataset_dir, **values):
    base = dict(model="tiny", dataset=str(dataset_dir), method="full", steps=STEPS, learning_rate=1e-3,
                sample_every=0, sample_prompts=[], checkpoint_every=2)
    return build_config(values={**base, **values})


@pytest.fixture(scope="module")
def full_run(dataset_dir, tiny_model, tmp_path_factory):
    """A 3-step full fine-tune (checkpoint at step 2); the trained in-memory pipeline and the weights before."""
    with loaded_pipeline() as seen:
        result = train.run(config(dataset_dir), tmp_path_factory.mktemp("full") / "run")
    assert result.status == "completed", result.message
    return result.run_dir, seen["pipe"], seen["before"]


def render(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval()
    image = pipe(PROMPT, num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(image, dtype=np.int16)


def plain_pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)


# ----------------------------------------------------------------------------- what trains

def test_every_unet_weight_trains_and_nothing_else(full_run):
    _, pipe, before = full_run
    assert adapters.module_for("full") is full
    unet = dict(pipe.unet.named_parameters())
    assert all(p.requires_grad for p in unet.values())
    after = pipe.unet.state_dict()
    changed = [k for k, v in before["unet"].items() if not torch.equal(after[k], v)]
    assert len(changed) == len(before["unet"]), sorted(set(before["unet"]) - set(changed))[:5]
    for name in ("vae", "text_encoder"):
        assert not any(p.requires_grad for p in getattr(pipe, name).parameters()), name
        after = getattr(pipe, name).state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name


def test_dreambooth_is_full_plus_prior_preservation(dataset_dir, tiny_model, tmp_path, monkeypatch):
    drawn, real = [], prior.class_images
    monkeypatch.setattr(prior, "class_images", lambda *a, **k: drawn.extend(real(*a, **k)) or list(drawn))
    result = train.run(config(dataset_dir, steps=2, checkpoint_every=0, prior_preservation=True,
                              num_class_images=2, class_image_steps=2), tmp_path / "run")
    assert result.status == "completed", result.message
    meta = adapters.read_meta(result.adapter_dir)
    assert (meta.kind, meta.has_scale, meta.step) == ("full", False, 2)
    assert (result.adapter_dir / "model_index.json").exists()
    assert len(drawn) == 2  # the class images the prior-preservation loss trained on


# ----------------------------------------------------------------------------- the result is a model

def test_saved_folder_is_a_diffusers_model_that_draws_the_same_image(full_run):
    run_dir, pipe, _ = full_run
    adapter_dir = RunPaths(run_dir).adapter
    assert adapters.read_meta(adapter_dir).kind == "full"
    reloaded = plain_pipeline(adapter_dir)
    ours, theirs = render(pipe), render(reloaded)
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - render(plain_pipeline(models.resolve("tiny").source))).max() > 1  # it did train


def test_studio_accepts_it_as_a_base_model(full_run):
    run_dir, pipe, _ = full_run
    ref = models.resolve(str(RunPaths(run_dir).adapter))
    loaded = models.load_pipeline(ref)
    assert ref.source == str(RunPaths(run_dir).adapter.resolve())
    a, b = loaded.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_loading_it_as_an_adapter_explains_what_to_do(full_run, tiny_model):
    with pytest.raises(StudioError, match="base model"):
        full.load_into(plain_pipeline(tiny_model), RunPaths(full_run[0]).adapter, "x")


# ----------------------------------------------------------------------------- single-file export

def test_single_file_has_the_original_sd_layout(full_run):
    run_dir, pipe, _ = full_run
    sd = load_file(str(RunPaths(run_dir).adapter / full.SINGLE_FILE))
    n = sum(len(getattr(pipe, c).state_dict()) for c in ("unet", "vae", "text_encoder"))
    assert len(sd) == n  # every parameter, each under one name
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    unet, vae = pipe.unet.state_dict(), pipe.vae.state_dict()
    same = {  # LDM name -> the studio's tensor, one of each kind of layer
        "model.diffusion_model.input_blocks.0.0.weight": unet["conv_in.weight"],
        "model.diffusion_model.input_blocks.3.0.op.weight": unet["down_blocks.0.downsamplers.0.conv.weight"],
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight":
            unet["down_blocks.1.resnets.0.conv_shortcut.weight"],
        "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight":
            unet["down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight"],
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": unet["mid_block.resnets.1.time_emb_proj.weight"],
        "model.diffusion_model.output_blocks.2.2.conv.weight": unet["up_blocks.0.upsamplers.0.conv.weight"],
        "model.diffusion_model.output_blocks.5.0.out_layers.3.weight": unet["up_blocks.1.resnets.2.conv2.weight"],
        "model.diffusion_model.out.2.weight": unet["conv_out.weight"],
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight":
            vae["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"],
        "first_stage_model.decoder.up.1.block.0.conv1.weight": vae["decoder.up_blocks.0.resnets.0.conv1.weight"],
        "first_stage_model.decoder.up.1.upsample.conv.weight": vae["decoder.up_blocks.0.upsamplers.0.conv.weight"],
        "first_stage_model.decoder.norm_out.bias": vae["decoder.conv_norm_out.bias"],
        "first_stage_model.encoder.mid.block_2.conv1.weight": vae["encoder.mid_block.resnets.1.conv1.weight"],
    }
    for key, value in same.items():
        assert torch.equal(sd[key], value), key
    q = sd["first_stage_model.decoder.mid.attn_1.q.weight"]  # a 1x1 convolution in LDM
    assert q.shape == (64, 64, 1, 1) and torch.equal(q[:, :, 0, 0], vae["decoder.mid_block.attentions.0.to_q.weight"])
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in sd


def test_single_file_reads_back_through_from_single_file(full_run):
    adapter_dir = RunPaths(full_run[0]).adapter
    reports = checks.read_reports(adapter_dir)
    assert [(r.file, r.format, r.loader) for r in reports] == [
        (full.SINGLE_FILE, "sd-single-file", full.SINGLE_FILE_LOADER)]
    assert reports[0].ok, reports[0].summary()


def test_the_loader_takes_weights_from_the_file_not_the_config_folder(full_run, tiny_model, tmp_path):
    """With the untrained base model as config folder the check still passes: the weights came from the file."""
    run_dir, pipe, _ = full_run
    path = RunPaths(run_dir).adapter / full.SINGLE_FILE
    assert full.check_single_file(path, pipe, config_dir=tiny_model).ok
    sd = load_file(str(path))
    sd["model.diffusion_model.out.2.bias"] = sd["model.diffusion_model.out.2.bias"] + 0.1
    save_file(sd, str(tmp_path / "shifted.safetensors"))
    report = full.check_single_file(tmp_path / "shifted.safetensors", pipe, config_dir=tiny_model)
    assert not report.ok and report.max_abs_diff == pytest.approx(0.1, abs=1e-3)


def test_a_file_missing_a_key_fails_the_check_naming_it(full_run, tmp_path):
    run_dir, pipe, _ = full_run
    adapter_dir = RunPaths(run_dir).adapter
    sd = load_file(str(adapter_dir / full.SINGLE_FILE))
    key = "model.diffusion_model.output_blocks.1.1.proj_out.weight"
    del sd[key]
    save_file(sd, str(tmp_path / "tampered.safetensors"))
    report = full.check_single_file(tmp_path / "tampered.safetensors", pipe, config_dir=adapter_dir)
    assert not report.ok and key in report.missing_keys


# ----------------------------------------------------------------------------- resume

def test_resume_replays_the_uninterrupted_run(full_run, tmp_path):
    run_dir, pipe, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "adapter")
    shutil.rmtree(RunPaths(copy).checkpoint(STEPS))  # as if stopped after the step-2 checkpoint
    result = train.resume(copy)
    assert result.status == "completed" and result.step == STEPS, result.message
    resumed = plain_pipeline(result.adapter_dir).unet.state_dict()
    trained = pipe.unet.state_dict()
    assert max(float((resumed[k] - trained[k]).abs().max()) for k in trained) < 1e-6


def test_no_single_file_for_a_layout_it_does_not_know(tmp_path):
    """SD 2.x (OpenCLIP, cross-attention 1024): no file in a layout no tool expects, and a note saying so."""
    from types import SimpleNamespace

    config = SimpleNamespace(addition_embed_type=None, cross_attention_dim=1024)
    [report] = full.export(tmp_path, SimpleNamespace(unet=SimpleNamespace(config=config), text_encoder_2=None))
    assert not report.ok and "SD 2.x" in report.note
    assert not (tmp_path / full.SINGLE_FILE).exists()


# ----------------------------------------------------------------------------- text encoder (DreamBooth option)

@pytest.fixture(scope="module")
def te_run(dataset_dir, tiny_model, tmp_path_factory):
    """DreamBooth with the text encoder: full UNet + text encoder, prior preservation, 3 steps."""
    with loaded_pipeline() as seen:
        result = train.run(config(dataset_dir, train_text_encoder=True, prior_preservation=True,
                                  num_class_images=2, class_image_steps=2), tmp_path_factory.mktemp("te") / "run")
    assert result.status == "completed", result.message
    return result.run_dir, seen["pipe"], seen["before"]


def test_text_encoder_trains_with_the_unet_and_the_vae_stays(te_run):
    _, pipe, before = te_run
    for name in ("unet", "text_encoder"):
        assert all(p.requires_grad for p in getattr(pipe, name).parameters()), name
        after = getattr(pipe, name).state_dict()
        changed = {k for k, v in before[name].items() if not torch.equal(after[k], v)}
        assert changed == set(before[name]), (name, sorted(set(before[name]) - changed)[:5])
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    after = pipe.vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before["vae"].items())


def test_trained_text_encoder_is_in_the_folder_and_the_single_file(te_run):
    run_dir, pipe, before = te_run
    adapter_dir = RunPaths(run_dir).adapter
    saved = plain_pipeline(adapter_dir).text_encoder.state_dict()
    trained = pipe.text_encoder.state_dict()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    sd = load_file(str(adapter_dir / full.SINGLE_FILE))
    key = "embeddings.token_embedding.weight"
    stored = sd[full.TEXT_PREFIX + "text_model." + key] if full.TEXT_PREFIX + "text_model." + key in sd else None
    trained_rows = trained.get(key, trained.get("text_model." + key))
    assert stored is not None and torch.equal(stored, trained_rows)
    assert not torch.equal(stored, before["text_encoder"].get(key, before["text_encoder"].get("text_model." + key)))
    [report] = checks.read_reports(adapter_dir)
    assert report.ok, report.summary()


def test_resume_restores_the_text_encoder_too(te_run, tmp_path):
    run_dir, pipe, _ = te_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "adapter")
    shutil.rmtree(RunPaths(copy).checkpoint(STEPS))
    assert any(k.startswith("text_encoder.") for k in load_file(str(RunPaths(copy).checkpoint(2) / "trainable.safetensors")))
    result = train.resume(copy)
    assert result.status == "completed" and result.step == STEPS, result.message
    resumed = plain_pipeline(result.adapter_dir)
    for name in ("unet", "text_encoder"):
        a, b = getattr(resumed, name).state_dict(), getattr(pipe, name).state_dict()
        assert max(float((a[k] - b[k]).abs().max()) for k in b) < 1e-6, name


def test_prior_term_reaches_a_trained_text_encoder(dataset_dir, tiny_model, tmp_path):
    """With the text encoder training, class prompts are encoded by it every step, so the prior-preservation
    term has a gradient on the encoder; with a frozen encoder there is nothing for it to reach."""
    cfg, spec, ref = train.prepare(config(dataset_dir, train_text_encoder=True, prior_preservation=True,
                                          num_class_images=2, class_image_steps=2), tmp_path / "run")
    pipe = models.load_pipeline(ref)
    data = [train.ConceptDataset(dataset_dir, cfg.resolution)]
    frozen = train._cache_frozen(pipe, data, "cpu", torch.float32, False)
    train._cache_class(pipe, frozen, cfg, [spec], "cpu", torch.float32, lambda e: None, lambda: False)
    full.attach(pipe, adapters.setup_for(cfg))
    frozen.text, frozen.pooled = None, None
    frozen.token_ids = train.tokenize_all(pipe, frozen.captions, "cpu")
    frozen.class_ids = train.tokenize_all(pipe, frozen.class_prompts, "cpu")
    encoder = list(pipe.text_encoder.parameters())

    def encoder_grad(prior_weight: float) -> torch.Tensor:
        stepper = train._Stepper(pipe, frozen, build_config(values={**cfg.to_dict(), "prior_loss_weight": prior_weight}),
                                 "cpu", torch.float32, None, None, [])
        loss = stepper._loss(torch.tensor([0, 1]), torch.Generator().manual_seed(3))
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, encoder, allow_unused=True) if g is not None])

    class_term = encoder_grad(1.0) - encoder_grad(0.0)
    assert float(class_term.abs().max()) > 0
