"""Kohya export of LoRA / DoRA / LoCon: key names, the self-check, and reading back in plain diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio import train
from studio.adapters import clients, lora
from studio.adapters.checks import read_reports
from studio.config import build_config
from studio.generate import AdapterChoice, GenerateRequest, Playground
from studio.paths import RunPaths
from tests.helpers import plain_pipeline, render

PROMPT = "a photo of sks stuffed animal"
GEN_STEPS = 3
METHODS = {"lora": {}, "dora": {"method": "dora"}, "lora-locon": {"locon": True}}


@pytest.fixture(scope="module", params=list(METHODS))
def run(request, tmp_path_factory, dataset_dir, tiny_model) -> Path:
    # alpha != rank, so a file that carried alpha = rank (diffusers' converter default) would differ.
    cfg = build_config(values=dict(model="tiny", dataset=str(dataset_dir), steps=5, learning_rate=1e-2,
                                   alpha=4.0, sample_every=0, sample_prompts=[], **METHODS[request.param]))
    result = train.run(cfg, tmp_path_factory.mktemp("kohya") / request.param)
    assert result.status == "completed", result.message
    return result.run_dir


def studio_adapted_unet(tiny_model: Path, adapter_dir: Path):
    """The run's adapter as the studio loads it (diffusers format), under the name 'default'."""
    pipe = plain_pipeline(tiny_model)
    lora.load_into(pipe, adapter_dir, "default")
    return pipe.unet


def test_training_writes_a_verified_kohya_file(run):
    adapter_dir = RunPaths(run).adapter
    reports = read_reports(adapter_dir)
    expected = [(lora.KOHYA_WEIGHTS, "kohya", lora.KOHYA_LOADER)]
    if run.name == "dora":  # DoRA merged, for the clients whose magnitude convention differs
        expected.append((lora.DORA_DIFF, "full-diff", lora.DIFF_LOADER))
    assert [(r.file, r.format, r.loader) for r in reports] == expected
    report = reports[0]
    assert all(r.ok for r in reports), [r.summary() for r in reports]
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert (adapter_dir / lora.KOHYA_WEIGHTS).is_file()


def test_the_report_lists_each_clients_check_of_each_file(run):
    """export_check.yaml: per community file, ComfyUI's, A1111's and kohya's rules with matched/total
    keys and the output against the studio's; the clients the studio points at a file apply it exactly."""
    reports = {r.file: r for r in read_reports(RunPaths(run).adapter)}
    for file, report in reports.items():
        checks = {c["client"]: c for c in report.clients}
        assert set(checks) == {clients.COMFYUI, clients.A1111, clients.KOHYA}
        total = len(load_file(str(RunPaths(run).adapter / file)))
        for check in checks.values():
            assert check["total"] == total and check["rule"]
            if check["recommended"]:
                assert check["exact"] and check["matched"] == total, check
        recommended = {c for c, check in checks.items() if check["recommended"]}
        if file == lora.KOHYA_WEIGHTS:
            assert recommended == (set() if run.name == "dora" else set(checks))
        else:  # the DoRA diff file: ComfyUI and A1111 apply it exactly; kohya's networks/lora.py reads no diff
            assert recommended == {clients.COMFYUI, clients.A1111} and checks[clients.KOHYA]["matched"] == 0
        assert "ComfyUI:" in report.summary() and "AUTOMATIC1111:" in report.summary()


def test_kohya_key_names(run):
    weights = load_file(str(RunPaths(run).adapter / lora.KOHYA_WEIGHTS))
    dora = "dora" in run.name
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha") + ((".dora_scale",) if dora else ())
    assert all(k.startswith("lora_unet_") and k.endswith(suffixes) for k in weights), sorted(weights)[:5]
    assert all("input_blocks" not in k and "output_blocks" not in k for k in weights)  # diffusers layout
    modules = {k.split(".")[0] for k in weights}
    for module in modules:
        assert weights[f"{module}.alpha"].item() == 4.0  # lora_alpha, not the rank
        up = weights[f"{module}.lora_up.weight"]
        if dora:  # (out, 1) / (out, 1, 1, 1): broadcasts against the weight's per-row norm
            scale = weights[f"{module}.dora_scale"]
            assert scale.shape == (up.shape[0],) + (1,) * (up.dim() - 1)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert any(m.endswith("_resnets_0_conv1") for m in modules) == ("locon" in run.name)


def test_plain_diffusers_renders_the_playground_image(run, tiny_model):
    file = RunPaths(run).adapter / lora.KOHYA_WEIGHTS
    pipe = plain_pipeline(tiny_model)
    base = render(pipe, GEN_STEPS)
    if "dora" in run.name:
        # load_lora_weights drops dora_scale keys (diffusers 0.42): use the converter it calls, directly.
        lora.load_kohya_into(pipe.unet, file, adapter_name="kohya")
    else:  # the public loader, as a user would call it
        pipe.load_lora_weights(str(file))
    plain = render(pipe, GEN_STEPS)
    studio = np.asarray(Playground().generate(GenerateRequest(
        PROMPT, "tiny", [AdapterChoice(str(run), 1.0)], seed=0, steps=GEN_STEPS, guidance=7.5)),
        dtype=np.int16)
    assert np.abs(plain - studio).max() <= 1  # same weights, same seed: at most rounding
    assert np.abs(plain - base).mean() > 0.5  # ... and the adapter really is in both


@pytest.mark.parametrize("drop", [".alpha", ".lora_up.weight"])
def test_tampered_file_fails_the_check_and_names_the_key(run, tiny_model, tmp_path, drop):
    if run.name != "lora":
        pytest.skip("one adapter kind is enough")
    adapter_dir = RunPaths(run).adapter
    weights = load_file(str(adapter_dir / lora.KOHYA_WEIGHTS))
    removed = sorted(k for k in weights if k.endswith(drop))[0]
    del weights[removed]
    tampered = tmp_path / lora.KOHYA_WEIGHTS
    save_file(weights, str(tampered))

    report = lora.check_kohya_file(tampered, studio_adapted_unet(tiny_model, adapter_dir))

    assert not report.ok
    assert removed in report.missing_keys
    assert report.unexpected_keys == []
    if drop == ".lora_up.weight":  # a lone lora_down: diffusers' converter refuses the file
        assert report.max_abs_diff is None and "refused" in report.note


# ----------------------------------------------------------------------------- SD 1.5 layout

def sd15_structured_unet():
    """SD 1.5's UNet block structure (4 down blocks, 3 with cross-attention, 2 layers each) with tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


# Names from the original SD 1.5 checkpoint (model.diffusion_model.*), per diffusers module.
SD15_NAMES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2": "input_blocks.8.1.transformer_blocks.0.ff.net.2",
    "down_blocks.3.resnets.1.conv1": "input_blocks.11.0.in_layers.2",
    "mid_block.resnets.0.conv2": "middle_block.0.out_layers.3",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0": "middle_block.1.transformer_blocks.0.attn2.to_out.0",
    "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
    "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.attentions.0.proj_out": "output_blocks.3.1.proj_out",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj": "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj",
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
}


def test_ldm_names_of_sd15_modules():
    unet = sd15_structured_unet()
    modules = dict(unet.named_modules())
    for path, ldm in SD15_NAMES.items():
        assert path in modules, path
        assert lora.ldm_module_name(path, unet.config) == ldm


def sd15_adapted_unet(use_dora: bool = False):
    from peft import LoraConfig

    from studio.adapters import LOCON_MODULES

    unet = sd15_structured_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian", use_dora=use_dora,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"] + LOCON_MODULES))
    return unet


def test_sd15_structure_maps_back_through_diffusers_converter():
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = sd15_adapted_unet()
    adapted = lora._adapted_modules(unet, "default")
    to_kohya = {m: lora._kohya_name("unet." + m) for m in adapted}
    assert len(set(to_kohya.values())) == len(adapted) > 100  # distinct: no two modules share a name
    weights = lora.kohya_state_dict(unet)
    assert {k.split(".")[0] for k in weights} == set(to_kohya.values())

    low = to_kohya  # every block, 10 and 11 included (the diffusers layout has no substring clash)
    state = _maybe_map_sgm_blocks_to_diffusers(dict(weights), unet.config)
    state, _ = _convert_non_diffusers_lora_to_diffusers(state)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert {k.split(".lora_")[0] for k in peft} == set(low)
    for module, name in low.items():  # same module, same matrices
        assert torch.equal(peft[f"{module}.lora_A.weight"], weights[f"{name}.lora_down.weight"])


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_sd15_structure_passes_the_check(tmp_path, use_dora):
    unet = sd15_adapted_unet(use_dora=use_dora)
    with torch.no_grad():  # B = 0 at init would make any file "match": give the adapter weight
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    file = tmp_path / lora.KOHYA_WEIGHTS
    save_file(lora.kohya_state_dict(unet), str(file))
    report = lora.check_kohya_file(file, unet)
    assert report.ok, report.summary()
