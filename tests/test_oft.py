"""OFT (orthogonal fine-tuning), the method added through the adapter contract alone: what trains, the
native file reloading exactly, the strength (0 is the base), the Playground stacking it with a LoRA, the
merged file for ComfyUI and AUTOMATIC1111 checked by their rules, the preset and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from studio import adapters, train
from studio.__main__ import main
from studio.adapters import clients, oft
from studio.adapters.checks import read_reports
from studio.config import build_config, load_run_config
from studio.errors import StudioError
from studio.generate import AdapterChoice, GenerateRequest, Playground
from studio.paths import PEFT_CONFIG, PEFT_WEIGHTS
from tests.helpers import loaded_pipeline, mean_diff, plain_pipeline, render

GEN_STEPS = 2


def small_config(dataset_dir, **values):
    base = dict(model="tiny", dataset=str(dataset_dir), method="oft", steps=12, learning_rate=3e-2,
                sample_every=0, sample_prompts=[])
    return build_config(values={**base, **values})


@pytest.fixture(scope="module")
def oft_run(dataset_dir, tiny_model, tmp_path_factory):
    with loaded_pipeline() as seen:
        result = train.run(small_config(dataset_dir), tmp_path_factory.mktemp("oft") / "run")
    assert result.status == "completed", result.message
    return result.run_dir, seen


@pytest.fixture(scope="module")
def base_image(tiny_model) -> np.ndarray:
    return render(plain_pipeline(tiny_model), GEN_STEPS)


def test_the_registry_has_it_from_one_line():
    method = adapters.get("oft")
    assert method.module is oft and method.caps.scaling == "peft" and method.setting_names() == \
        ["oft_block_size", "target_modules"]


def test_only_the_rotations_train(oft_run):
    run_dir, seen = oft_run
    pipe, before = seen["pipe"], seen["before"]
    changed = {k for k, v in pipe.unet.state_dict().items()
               if ".oft_R." not in k and not torch.equal(v, before["unet"][k.replace(".base_layer", "")])}
    assert changed == set()  # every base weight of the UNet bit-identical
    for name in ("vae", "text_encoder"):
        assert all(torch.equal(v, before[name][k]) for k, v in getattr(pipe, name).state_dict().items())
    rotations = {k: v for k, v in pipe.unet.state_dict().items() if ".oft_R." in k}
    assert rotations and any(v.abs().max() > 0 for v in rotations.values())  # Q = 0 at the start: it moved
    saved = load_run_config(run_dir / "config.yaml")
    assert saved["method"] == "oft" and saved["oft_block_size"] == 32 and "rank" not in saved


def test_native_file_reloads_exactly(oft_run, tiny_model):
    run_dir, seen = oft_run
    folder = run_dir / "adapter"
    assert (folder / PEFT_WEIGHTS).is_file() and (folder / PEFT_CONFIG).is_file()
    assert adapters.read_meta(folder).kind == "oft" and adapters.read_meta(folder).has_scale
    seen["pipe"].unet.eval()
    expected = render(seen["pipe"], GEN_STEPS)
    pipe = plain_pipeline(tiny_model)
    oft.load_into(pipe, folder, "x")
    assert np.array_equal(render(pipe, GEN_STEPS), expected)


def test_scale_zero_is_the_base_and_half_is_between(oft_run, tiny_model, base_image):
    pipe = plain_pipeline(tiny_model)
    oft.load_into(pipe, oft_run[0] / "adapter", "x")
    images = {}
    for scale in (0.0, 0.5, 1.0, 0.0):
        adapters.set_scales(pipe, ["x"], [scale])
        images[scale] = render(pipe, GEN_STEPS)
    assert np.array_equal(images[0.0], base_image)
    assert mean_diff(images[1.0], base_image) > 1.0
    assert mean_diff(images[0.5], images[0.0]) > 0.3 and mean_diff(images[0.5], images[1.0]) > 0.3


def test_playground_slider_and_a_stacked_lora(oft_run, trained_run, base_image):
    playground = Playground()

    def draw(*choices):
        req = GenerateRequest(model="tiny", prompt="a photo of sks stuffed animal", steps=GEN_STEPS, seed=0,
                              adapters=list(choices))
        return np.asarray(playground.generate(req), dtype=float)

    on = draw(AdapterChoice(str(oft_run[0]), 1.0))
    assert mean_diff(on, base_image) > 1.0
    assert np.array_equal(draw(AdapterChoice(str(oft_run[0]), 0.0)), base_image)
    both = draw(AdapterChoice(str(oft_run[0]), 1.0), AdapterChoice(str(trained_run), 1.0))
    lora_only = draw(AdapterChoice(str(oft_run[0]), 0.0), AdapterChoice(str(trained_run), 1.0))
    assert mean_diff(both, lora_only) > 1.0 and mean_diff(both, on) > 1.0  # both adapters draw
    assert np.array_equal(draw(AdapterChoice(str(oft_run[0]), 1.0)), on)  # the LoRA off again: as before


def test_the_merged_file_is_exact_for_comfyui_and_a1111(oft_run):
    run_dir, seen = oft_run
    reports = read_reports(run_dir / "adapter")
    assert [r.file for r in reports] == [oft.DIFF_WEIGHTS]
    report = reports[0]
    assert report.ok, report.summary()
    by = {c["client"]: c for c in report.clients}
    for client in (clients.COMFYUI, clients.A1111):
        assert by[client]["exact"] and by[client]["matched"] == by[client]["total"] > 0
        assert by[client]["change"] > 1e-4  # the rotation moves the output: the check can see a wrong file
    assert not by[clients.KOHYA]["recommended"] and by[clients.KOHYA]["matched"] == 0
    state = load_file(str(run_dir / "adapter" / oft.DIFF_WEIGHTS))
    key = next(iter(state))
    state[key] = state[key] * 3  # one layer turned three times as far
    check = clients.check_file(state, clients.Layout(seen["pipe"].unet, []), clients.COMFYUI)
    assert check.matched == check.total and not check.exact


def test_settings_of_other_methods_are_refused_by_name(dataset_dir):
    with pytest.raises(StudioError, match="Setting 'rank' works with the .* methods, not 'oft'"):
        small_config(dataset_dir, rank=4)
    with pytest.raises(StudioError, match="'oft_block_size' works with the oft method, not 'lora'"):
        small_config(dataset_dir, method="lora", oft_block_size=8)
    with pytest.raises(StudioError, match="'oft_block_size' must be from 2 to 1,024"):
        small_config(dataset_dir, oft_block_size=1)


def test_the_preset_and_the_cli(dataset_dir, tiny_model, tmp_path, capsys):
    cfg = build_config("oft")
    assert cfg.method == "oft" and cfg.adapter == oft.Settings(**{k: getattr(cfg, k) for k in ("oft_block_size", "target_modules")})
    out = tmp_path / "cli-run"
    code = main(["train", "--model", "tiny", "--dataset", str(dataset_dir), "--method", "oft", "--steps", "2",
                 "--out", str(out), "--set", "sample_every=0", "--set", "sample_prompts=[]",
                 "--set", "oft_block_size=16"])
    assert code == 0, capsys.readouterr().err
    saved = load_run_config(out / "config.yaml")
    assert saved["method"] == "oft" and saved["oft_block_size"] == 16
    assert (out / "adapter" / oft.DIFF_WEIGHTS).is_file()


def test_take_home_points_comfyui_and_a1111_at_the_merged_file(oft_run):
    from studio import takehome

    plan = takehome.plan(oft_run[0], "oft-run", takehome.Settings(prompt="a photo of sks stuffed animal"))
    assert [(f.source.name, f.name, f.role) for f in plan.files] == [(oft.DIFF_WEIGHTS, "oft-run.safetensors", "lora")]
    assert plan.a1111_prompt.endswith("<lora:oft-run:1>")
    assert "PeftModel.from_pretrained" in plan.diffusers_code
