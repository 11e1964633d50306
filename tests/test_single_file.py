"""Single-file (.safetensors, original LDM layout) checkpoints as the base model, offline.

Tiny SD 1.x, SD 2.x and SDXL pipelines are written as one file by tests/ldm_files.py (diffusers' published
conversion rules, not the studio's writer), loaded through studio.models, and compared with the
pipeline they came from, output by output. Family detection and config derivation are checked on the
real SD 1.5, SD 2.1 and SDXL layouts: models built from the published configs on the meta device
(no weights), their names and shapes turned into a header.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio import models, single_file
from studio.errors import StudioError
from tests import ldm_files

CONFIGS = Path(single_file.__file__).resolve().parent.parent / "assets" / "single-file"
TOKEN_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # as in the published text encoder configs


# ---------------------------------------------------------------------------- tiny models, per family

def _text(hidden, cls=None, act="quick_gelu", proj=None):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, hidden_act=act,
                         projection_dim=proj or hidden, **TOKEN_IDS)
    return (cls or CLIPTextModel)(cfg)


def _vae(scaling=0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=64, scaling_factor=scaling)


def tiny_pipeline(family: str):
    """A tiny pipeline that follows its family's rules where a file stores none (heads, activations)."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(single_file.TOKENIZER_DIR)
    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=32, block_out_channels=(64, 128), layers_per_block=2, attention_head_dim=(1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 64, cross_attention_dim=64 + 128)
        return StableDiffusionXLPipeline(
            unet=unet, vae=_vae(0.13025), text_encoder=_text(64), tokenizer=tokenizer,
            text_encoder_2=_text(128, CLIPTextModelWithProjection, "gelu", proj=64),
            tokenizer_2=CLIPTokenizer.from_pretrained(single_file.TOKENIZER_DIR, pad_token="!"),
            scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
            add_watermarker=False)
    sd2 = family == "sd2"
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(64, 128) if sd2 else (32, 64), layers_per_block=2,
        attention_head_dim=(1, 2) if sd2 else 8, use_linear_projection=sd2, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return StableDiffusionPipeline(
        unet=unet, vae=_vae(), text_encoder=_text(64, act="gelu" if sd2 else "quick_gelu"), tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


RESOLUTION = {"modelspec.resolution": "64x64"}  # kohya's metadata; the tiny models draw 64 px


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (pipeline, its single file)."""
    out = {}
    for family in ("sd1", "sd2", "sdxl"):
        pipe = tiny_pipeline(family)
        path = tmp_path_factory.mktemp(family) / f"{family}-community.safetensors"
        ldm_files.write(pipe, family, path, metadata=RESOLUTION)
        out[family] = (pipe, path)
    return out


def _outputs(pipe) -> dict[str, torch.Tensor]:
    """UNet noise prediction, VAE decode and every text encoder's hidden states on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    ids[0, 0], ids[0, 20] = 49406, 49407
    out = {}
    with torch.no_grad():
        encoders = [("text_encoder", pipe.text_encoder)] + (
            [("text_encoder_2", pipe.text_encoder_2)] if getattr(pipe, "text_encoder_2", None) is not None else [])
        texts = []
        for name, encoder in encoders:
            result = encoder.eval()(ids, output_hidden_states=True)
            out[name] = torch.cat([h.flatten() for h in result.hidden_states] + [result[0].flatten()])
            texts.append(result.hidden_states[-2])
        context = torch.cat(texts, dim=-1)
        extra = {}
        if len(encoders) == 2:
            pooled = encoder(ids).text_embeds
            extra = dict(added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])})
        out["unet"] = pipe.unet.eval()(latents, torch.tensor([500]), encoder_hidden_states=context, **extra).sample
        out["vae"] = pipe.vae.eval().decode(latents).sample
    return out


def _max_diffs(a, b) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max()) for k in a}


# ---------------------------------------------------------------------------- loading through the studio

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_single_file_loads_offline_and_matches_the_model_it_came_from(tiny, family):
    pipe, path = tiny[family]
    ref = models.resolve(str(path))
    assert ref.is_file and ref.name == str(path.resolve())
    loaded = models.load_pipeline(ref)
    assert type(loaded).__name__ == type(pipe).__name__
    diffs = _max_diffs(_outputs(pipe), _outputs(loaded))
    assert set(diffs) >= {"unet", "vae", "text_encoder"}
    assert max(diffs.values()) < 1e-5, diffs
    assert loaded.unet.config.sample_size == 32  # from the file's modelspec.resolution (64 px / VAE factor 2)
    assert loaded.vae.config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    assert loaded.tokenizer_2.pad_token == "!" if family == "sdxl" else loaded.tokenizer.pad_token == (
        "!" if family == "sd2" else "<|endoftext|>")


def test_the_weights_come_from_the_file(tiny, tmp_path):
    """Two files of the same architecture with different weights load as different models."""
    pipe, _ = tiny["sd1"]
    other = tiny_pipeline("sd1")
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(0.01)
    path = tmp_path / "other.safetensors"
    ldm_files.write(other, "sd1", path, metadata=RESOLUTION)
    loaded = models.load_pipeline(models.resolve(str(path)))
    diffs = _max_diffs(_outputs(other), _outputs(loaded))
    assert diffs["unet"] < 1e-5
    assert _max_diffs(_outputs(pipe), _outputs(loaded))["unet"] > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load(tiny, tmp_path, dtype):
    pipe, _ = tiny["sdxl"]
    path = tmp_path / f"half-{str(dtype)[6:]}.safetensors"
    ldm_files.write(pipe, "sdxl", path, dtype=dtype, metadata=RESOLUTION)
    assert f"in {'fp16' if dtype == torch.float16 else 'bf16'} that predicts noise" in single_file.describe(
        single_file.read_header(path))
    loaded = models.load_pipeline(models.resolve(str(path)))
    assert next(loaded.unet.parameters()).dtype == torch.float32  # loaded in the precision asked for
    rounded = tiny_pipeline("sdxl")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # the same weights, rounded as the file holds them
        getattr(rounded, name).load_state_dict({k: v.to(dtype).float() for k, v in getattr(pipe, name).state_dict().items()})
    diffs = _max_diffs(_outputs(rounded), _outputs(loaded))
    assert max(diffs.values()) < 1e-5, diffs


def test_a_separate_vae_file_replaces_the_embedded_one(tiny, tmp_path):
    pipe, path = tiny["sd1"]
    torch.manual_seed(7)
    vae = _vae()
    vae_file = tmp_path / "vae-ft-mse.safetensors"
    from safetensors.torch import save_file

    # a standalone VAE file: the LDM VAE names without the first_stage_model. prefix
    state = {k.removeprefix("first_stage_model."): v for k, v in ldm_files.vae_state_dict(vae.state_dict(), vae.config).items()}
    save_file(state, str(vae_file))
    ref = models.resolve(str(path), vae=str(vae_file))
    assert ref.vae == str(vae_file.resolve())
    loaded = models.load_pipeline(ref)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((loaded.vae.decode(z).sample - vae.eval().decode(z).sample).abs().max()) < 1e-5
        assert float((loaded.vae.decode(z).sample - pipe.vae.eval().decode(z).sample).abs().max()) > 1e-3
    diffs = _max_diffs(_outputs(pipe), _outputs(loaded))  # the rest is the checkpoint's
    assert diffs["unet"] < 1e-5 and diffs["text_encoder"] < 1e-5


def test_a_vae_folder_works_for_a_diffusers_base_too(tiny_model, tmp_path):
    vae = _vae()
    vae.save_pretrained(tmp_path / "my-vae")
    loaded = models.load_pipeline(models.resolve(str(tiny_model), vae=str(tmp_path / "my-vae")))
    assert all(torch.equal(a, b) for a, b in zip(loaded.vae.state_dict().values(), vae.state_dict().values()))


def test_an_sd1_file_without_the_text_model_level_loads(tiny, tmp_path):
    """Some merging tools write `cond_stage_model.transformer.encoder...` (no `text_model.`)."""
    from safetensors.torch import save_file

    pipe, _ = tiny["sd1"]
    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
             for k, v in ldm_files.pipeline_state_dict(pipe, "sd1").items()}
    path = tmp_path / "flat-clip.safetensors"
    save_file(state, str(path), metadata=RESOLUTION)
    loaded = models.load_pipeline(models.resolve(str(path)))
    assert max(_max_diffs(_outputs(pipe), _outputs(loaded)).values()) < 1e-5


def test_a_file_without_a_vae_needs_one(tiny, tmp_path):
    pipe, _ = tiny["sd1"]
    path = tmp_path / "no-vae.safetensors"
    ldm_files.write(pipe, "sd1", path, metadata=RESOLUTION, drop=("first_stage_model.",))
    with pytest.raises(StudioError, match="has no VAE of its own.*--vae"):
        models.resolve(str(path))
    vae_file = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file

    save_file(ldm_files.vae_state_dict(pipe.vae.state_dict(), pipe.vae.config), str(vae_file))
    loaded = models.load_pipeline(models.resolve(str(path), vae=str(vae_file)))
    assert max(_max_diffs(_outputs(pipe), _outputs(loaded)).values()) < 1e-5


# ---------------------------------------------------------------------------- v-prediction

def _sd2_file(tiny, tmp_path, name, metadata=None, v_like=False):
    pipe, _ = tiny["sd2"]
    state = ldm_files.pipeline_state_dict(pipe, "sd2")
    key = single_file._last_norm1_bias(single_file.Header(Path(name), 0, 0, {k: tuple(v.shape) for k, v in state.items()},
                                                          {}, {}))
    if v_like:  # the spread ComfyUI's test looks for in v-prediction SD 2.x weights
        state[key] = torch.linspace(-0.5, 0.5, state[key].numel())
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file(state, str(path), metadata={**RESOLUTION, **(metadata or {})})
    return path


def test_sd2_v_prediction_is_read_from_the_weights_metadata_or_a_yaml_beside_the_file(tiny, tmp_path):
    def pred(path):
        return models.load_pipeline(models.resolve(str(path))).scheduler.config.prediction_type

    assert pred(_sd2_file(tiny, tmp_path, "plain.safetensors")) == "epsilon"
    assert pred(_sd2_file(tiny, tmp_path, "v-weights.safetensors", v_like=True)) == "v_prediction"
    assert pred(_sd2_file(tiny, tmp_path, "v-meta.safetensors", {"modelspec.prediction_type": "v"})) == "v_prediction"
    path = _sd2_file(tiny, tmp_path, "v-yaml.safetensors")
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert pred(path) == "v_prediction"
    header = single_file.read_header(path)
    assert single_file.prediction_type(header, "sd2")[1].startswith("v-yaml.yaml")


def test_sd2_without_a_resolution_is_768_for_v_and_512_for_epsilon():
    base = _real_header("sd2")
    header = single_file.Header(Path("x.safetensors"), 0, 0, base.shapes, base.dtypes, {})
    cfg = single_file.unet_config(header, "sd2")
    assert cfg["sample_size"] == 96  # the published 768-px v model
    v = single_file.Header(Path("v.safetensors"), 0, 0, {**base.shapes, "v_pred": ()}, {}, {})
    assert single_file.prediction_type(v, "sdxl")[0] == "v_prediction"


def test_an_sdxl_v_prediction_file_with_zero_terminal_snr_keys():
    """ComfyUI's marker keys (supported_models.py SDXL.model_type: `v_pred`; `ztsnr`), as v-prediction SDXL
    fine-tunes carry them."""
    base = _real_header("sdxl")
    marked = single_file.Header(Path("noob-vpred.safetensors"), 0, 0, {**base.shapes, "v_pred": (), "ztsnr": ()}, {}, {})
    scheduler = single_file.configs(marked)["scheduler"]
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    plain = single_file.configs(single_file.Header(Path("sdxl.safetensors"), 0, 0, base.shapes, {}, {}))["scheduler"]
    assert plain["prediction_type"] == "epsilon" and "rescale_betas_zero_snr" not in plain


# ---------------------------------------------------------------------------- the real layouts (meta device)

def _meta_pipeline(family: str):
    """The real model's components, built from the published configs with no weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(name):
        return json.loads((CONFIGS / family / name / "config.json").read_text())

    class Pipe:
        pass

    pipe = Pipe()
    with torch.device("meta"):
        pipe.unet = UNet2DConditionModel.from_config(cfg("unet"))
        pipe.vae = AutoencoderKL.from_config(cfg("vae"))
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
        pipe.text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))
                               if family == "sdxl" else None)
    return pipe


def _real_header(family: str) -> single_file.Header:
    state = ldm_files.pipeline_state_dict(_meta_pipeline(family), family)
    return single_file.Header(Path(f"real-{family}.safetensors"), 0, 0, {k: tuple(v.shape) for k, v in state.items()},
                              {k: "F16" for k in state}, {})


# Published sizes (the model cards and configs of SD 1.5, SD 2.1 768-v and SDXL base 1.0).
REAL = {
    "sd1": dict(unet=dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                          use_linear_projection=False), text=dict(hidden_size=768, num_hidden_layers=12)),
    "sd2": dict(unet=dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
                          attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
                text=dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16)),
    "sdxl": dict(unet=dict(block_out_channels=[320, 640, 1280], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                           transformer_layers_per_block=[1, 2, 10], addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=2816,
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
                 text=dict(hidden_size=768, num_hidden_layers=12)),
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_and_configs_from_the_real_layouts(family):
    header = _real_header(family)
    if family == "sd2":  # SD 2.x files carry the 24th OpenCLIP layer that diffusers' 23-layer encoder drops
        assert any(".resblocks.23." in k for k in header.shapes)
    assert single_file.family(header) == family
    unet = single_file.unet_config(header, family)
    for key, value in REAL[family]["unet"].items():
        assert unet[key] == value, key
    published = json.loads((CONFIGS / family / "unet" / "config.json").read_text())
    assert {k: unet[k] for k in published} == published  # every derived value agrees with the published config
    text = single_file.clip_config(header, family) if family != "sd2" else single_file.open_clip_config(header, family)
    for key, value in REAL[family]["text"].items():
        assert text[key] == value, key
    vae = single_file.vae_config(header, family)
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["latent_channels"] == 4
    if family == "sdxl":
        second = single_file.open_clip_config(header, family)
        assert (second["hidden_size"], second["num_hidden_layers"], second["projection_dim"]) == (1280, 32, 1280)


def test_an_sdxl_refiner_and_an_inpainting_model_are_refused():
    header = _real_header("sdxl")
    shapes = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in header.shapes.items()
              if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(StudioError, match="SDXL refiner"):
        single_file.family(single_file.Header(Path("refiner.safetensors"), 0, 0, shapes, {}, {}))
    shapes = dict(_real_header("sd1").shapes)
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    with pytest.raises(StudioError, match="inpainting.*9 input channels"):
        single_file.family(single_file.Header(Path("inpaint.safetensors"), 0, 0, shapes, {}, {}))


# ---------------------------------------------------------------------------- refusals, one sentence each

def _one_sentence(message: str, filename: str) -> None:
    assert filename in message
    assert not re.search(r"[.;:!?]\s+[A-Z]", message) and message.endswith("."), message  # one sentence


def test_a_pickle_is_never_opened(tmp_path, monkeypatch):
    path = tmp_path / "dreamshaper_8.ckpt"
    path.write_bytes(b"PK\x03\x04 not read")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(StudioError) as err:
        models.resolve(str(path))
    _one_sentence(str(err.value), "dreamshaper_8.ckpt")
    assert "safetensors" in str(err.value) and "convert" in str(err.value)
    disguised = tmp_path / "model.safetensors"  # a pickle renamed
    disguised.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(StudioError, match="pickle"):
        models.resolve(str(disguised))


def test_a_lora_or_an_embedding_as_base_model(tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "my_style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(lora))
    with pytest.raises(StudioError) as err:
        models.resolve(str(lora))
    _one_sentence(str(err.value), "my_style.safetensors")
    assert "LoRA" in str(err.value) and "Playground" in str(err.value)
    emb = tmp_path / "easynegative.safetensors"
    save_file({"emb_params": torch.zeros(8, 768)}, str(emb))
    with pytest.raises(StudioError) as err:
        models.resolve(str(emb))
    _one_sentence(str(err.value), "easynegative.safetensors")
    assert "embedding" in str(err.value)


def test_a_truncated_file(tiny, tmp_path):
    _, path = tiny["sd1"]
    cut = tmp_path / "half-downloaded.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StudioError) as err:
        models.resolve(str(cut))
    _one_sentence(str(err.value), "half-downloaded.safetensors")
    assert "truncated" in str(err.value) and "download it again" in str(err.value)
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(b"\x10\x00")
    with pytest.raises(StudioError, match="cut short"):
        models.resolve(str(stub))


def test_an_unknown_architecture(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "flux-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(StudioError) as err:
        models.resolve(str(path))
    _one_sentence(str(err.value), "flux-dev.safetensors")
    assert "SD 1.x, SD 2.x or SDXL" in str(err.value)
    with pytest.raises(StudioError, match="does not exist"):
        models.resolve(str(tmp_path / "missing.safetensors"))


# ---------------------------------------------------------------------------- the run remembers its file

def test_content_hash_is_cached_and_follows_the_file(tiny, tmp_path, monkeypatch):
    _, path = tiny["sd1"]
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    first = single_file.content_hash(copy)
    assert first == single_file.content_hash(copy) == single_file.content_hash(path)
    store = json.loads((models.cache_root() / "file-hashes.json").read_text())
    assert any(k.startswith(str(copy.resolve()) + "|") for k in store)
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF  # one byte of the last weights
    copy.write_bytes(bytes(data))
    assert single_file.content_hash(copy) != first
    monkeypatch.setattr(single_file, "HASH_WHOLE", 0)  # a multi-GB file: sampled blocks, the last one included
    data[-100] ^= 0xFF
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    sampled = single_file.content_hash(copy)
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert single_file.content_hash(copy) != sampled
    monkeypatch.undo()
    models.check_recorded(str(path), first, "run 'x'")  # unchanged: no sentence
    with pytest.raises(StudioError, match="has changed since run 'x' was trained on it"):
        models.check_recorded(str(copy), first, "run 'x'")
    copy.unlink()
    with pytest.raises(StudioError, match="is no longer there"):
        models.check_recorded(str(copy), first, "run 'x'")


# ---------------------------------------------------------------------------- the command line and the Playground

def _train(path, dataset_dir, out, *extra) -> int:
    from studio.__main__ import main

    return main(["train", "--model", str(path), "--dataset", str(dataset_dir), "--out", str(out), "--steps", "2",
                 "--set", "sample_every=0", "--set", "sample_steps=1", *extra])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_cli_trains_on_a_single_file_offline(tiny, dataset_dir, tmp_path, family, capsys):
    """`python -m studio train --model FILE.safetensors` (HF_HUB_OFFLINE=1 for the whole session)."""
    from studio import adapters
    from studio.config import load_run_config
    from studio.paths import RunPaths

    _, path = tiny[family]
    out = tmp_path / "run"
    assert _train(path, dataset_dir, out) == 0
    said = capsys.readouterr().out
    assert f"Base model {path.name}: an {single_file.FAMILY_NAMES[family]} checkpoint in fp32 that predicts noise" in said
    meta = adapters.read_meta(adapters.find_adapter_dir(out))
    assert meta.base_model == str(path.resolve())
    assert meta.base_hash == single_file.content_hash(path)
    assert load_run_config(RunPaths(out).config)["model"] == str(path.resolve())


def test_cli_names_a_bad_file_in_one_sentence(tmp_path, dataset_dir, capsys):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"PK\x03\x04")
    assert _train(path, dataset_dir, tmp_path / "run") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: File") and "model.ckpt" in lines[-1] and "pickle" in lines[-1]
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.fixture(scope="module")
def file_run(tiny, dataset_dir, tmp_path_factory):
    """A LoRA run trained on a copy of the tiny SD 1.x file with a separate VAE: (run, checkpoint file, vae file)."""
    from safetensors.torch import save_file

    pipe, original = tiny["sd1"]
    folder = tmp_path_factory.mktemp("file-run")
    path = folder / "my-model.safetensors"
    path.write_bytes(original.read_bytes())
    torch.manual_seed(3)
    vae = _vae()
    save_file(ldm_files.vae_state_dict(vae.state_dict(), vae.config), str(folder / "my-vae.safetensors"))
    assert _train(path, dataset_dir, folder / "run", "--vae", str(folder / "my-vae.safetensors")) == 0
    return folder / "run", path, folder / "my-vae.safetensors"


def test_playground_and_generate_reopen_the_run_base_and_vae(file_run, tmp_path):
    import numpy as np

    from studio.__main__ import main
    from studio.generate import AdapterChoice, GenerateRequest, Playground, recorded_base

    run, path, vae = file_run
    playground = Playground()
    implicit = playground.generate(GenerateRequest("a photo of sks stuffed animal", "", [AdapterChoice(str(run))],
                                                   steps=2))
    named = playground.generate(GenerateRequest("a photo of sks stuffed animal", str(path), [AdapterChoice(str(run))],
                                                steps=2, vae=str(vae)))
    assert np.array_equal(np.asarray(implicit), np.asarray(named))
    same_file = playground.generate(GenerateRequest("a photo of sks stuffed animal", str(path),
                                                    [AdapterChoice(str(run))], steps=2))
    assert np.array_equal(np.asarray(implicit), np.asarray(same_file))  # the run's own file brings its VAE
    torch.manual_seed(9)
    _vae().save_pretrained(tmp_path / "another-vae")
    other_vae = playground.generate(GenerateRequest("a photo of sks stuffed animal", str(path),
                                                    [AdapterChoice(str(run))], steps=2, vae=str(tmp_path / "another-vae")))
    assert not np.array_equal(np.asarray(implicit), np.asarray(other_vae))  # a VAE named wins
    assert recorded_base([str(run), ""]) == (str(path.resolve()), str(vae.resolve()))
    assert main(["generate", "--adapter", str(run), "--prompt", "a photo of sks stuffed animal", "--steps", "2",
                 "--out", str(tmp_path / "out.png")]) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), np.asarray(implicit))


def test_a_changed_or_missing_base_file_is_one_sentence(file_run, tmp_path):
    import shutil

    from studio.generate import AdapterChoice, GenerateRequest, Playground

    run, path, vae = file_run
    backup = tmp_path / "backup.safetensors"
    shutil.copy2(path, backup)
    request = GenerateRequest("a photo of sks", "", [AdapterChoice(str(run))], steps=1)
    try:
        pipe = tiny_pipeline("sd1")
        with torch.no_grad():
            next(pipe.unet.parameters()).add_(1.0)
        ldm_files.write(pipe, "sd1", path, metadata=RESOLUTION)  # another model under the same name
        with pytest.raises(StudioError) as err:
            Playground().generate(request)
        _one_sentence(str(err.value), "my-model.safetensors")
        assert "has changed since run 'run' was trained on it" in str(err.value)
        path.unlink()
        with pytest.raises(StudioError) as err:
            Playground().generate(request)
        _one_sentence(str(err.value), "my-model.safetensors")
        assert "is no longer there" in str(err.value)
    finally:
        shutil.copy2(backup, path)
