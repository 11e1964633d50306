"""LoHa and LoKr on the built-in model, on CPU: what trains, native save/load, scales, the playground,
and the LyCORIS export read back by the independent `lycoris-lora` loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from studio import adapters, models, train
from studio.adapters import lycoris
from studio.adapters.checks import read_reports
from studio.config import build_config
from studio.generate import AdapterChoice, GenerateRequest, Playground
from studio.paths import LYCORIS_EXPORT, PEFT_CONFIG, PEFT_WEIGHTS
from tests.helpers import loaded_pipeline, mean_diff, plain_pipeline, render, snapshot

PROMPT = "a photo of sks stuffed animal"
GEN_STEPS = 2
KINDS = ("loha", "lokr")


def small_config(dataset_dir: Path, method: str, **values):
    base = dict(model="tiny", dataset=str(dataset_dir), steps=15, learning_rate=1e-2, method=method,
                sample_every=0, sample_steps=2, sample_prompts=[])
    return build_config(values={**base, **values})


def is_adapter_key(key: str) -> bool:
    return ".hada_" in key or ".lokr_" in key


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_dir, tiny_model):
    """kind -> (run folder, the training pipeline with its adapter 'default' still attached)."""
    seen, runs = {}, {}
    real_load = models.load_pipeline

    def load_spy(*args, **kwargs):
        seen["pipe"] = real_load(*args, **kwargs)
        return seen["pipe"]

    models.load_pipeline = load_spy
    try:
        for kind in KINDS:
            result = train.run(small_config(dataset_dir, kind), tmp_path_factory.mktemp(kind) / "run")
            assert result.status == "completed", result.message
            runs[kind] = (result.run_dir, seen.pop("pipe"))
    finally:
        models.load_pipeline = real_load
    return runs


@pytest.fixture(scope="module")
def base_image(tiny_model) -> np.ndarray:
    return render(plain_pipeline(tiny_model), GEN_STEPS)


# ----------------------------------------------------------------------------- what trains

@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_weights_change(tmp_path, dataset_dir, tiny_model, monkeypatch, kind):
    real_attach = lycoris.attach
    with loaded_pipeline() as seen:
        def attach_spy(pipe, cfg):
            real_attach(pipe, cfg)
            seen["init"] = {k: v for k, v in snapshot(pipe.unet).items() if is_adapter_key(k)}

        monkeypatch.setattr(lycoris, "attach", attach_spy)
        result = train.run(small_config(dataset_dir, kind, steps=4), tmp_path / "run")

    assert result.status == "completed", result.message
    pipe, before = seen["pipe"], seen["before"]
    for name in ("vae", "text_encoder"):
        after = snapshot(getattr(pipe, name))
        changed = [k for k in after if not torch.equal(after[k], before[name][k])]
        assert after.keys() == before[name].keys() and changed == [], f"{name} changed: {changed[:3]}"

    unet_after = snapshot(pipe.unet)
    adapter_after = {k: v for k, v in unet_after.items() if is_adapter_key(k)}
    base_after = {k.replace(".base_layer", ""): v for k, v in unet_after.items() if not is_adapter_key(k)}
    assert base_after.keys() == before["unet"].keys()
    changed = [k for k in base_after if not torch.equal(base_after[k], before["unet"][k])]
    assert changed == [], f"frozen UNet weights changed: {changed[:3]}"

    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_key(n) for n in trainable)
    prefix = "hada_" if kind == "loha" else "lokr_"
    assert adapter_after and all(prefix in k for k in adapter_after)
    assert adapter_after.keys() == seen["init"].keys()
    moved = [k for k in adapter_after if not torch.equal(adapter_after[k], seen["init"][k])]
    assert len(moved) >= len(adapter_after) // 2, "most adapter tensors should have trained"


# ----------------------------------------------------------------------------- native save and load

@pytest.mark.parametrize("kind", KINDS)
def test_native_file_reproduces_the_trained_pipeline(trained, tiny_model, kind):
    run_dir, trained_pipe = trained[kind]
    folder = run_dir / "adapter"
    assert (folder / PEFT_WEIGHTS).is_file() and (folder / PEFT_CONFIG).is_file()
    assert adapters.read_meta(folder).kind == kind

    trained_pipe.unet.eval()
    expected = render(trained_pipe, GEN_STEPS)
    pipe = plain_pipeline(tiny_model)
    lycoris.load_into(pipe, folder, "x")
    assert np.array_equal(render(pipe, GEN_STEPS), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_scales_zero_half_one(trained, tiny_model, base_image, kind):
    pipe = plain_pipeline(tiny_model)
    lycoris.load_into(pipe, trained[kind][0] / "adapter", "x")
    images = {}
    for scale in (0.0, 0.5, 1.0):
        adapters.set_scales(pipe, ["x"], [scale])
        images[scale] = render(pipe, GEN_STEPS)
    assert np.array_equal(images[0.0], base_image)  # scale 0 is the base exactly
    assert mean_diff(images[1.0], base_image) > 1.0
    assert mean_diff(images[0.5], images[0.0]) > 0.5
    assert mean_diff(images[0.5], images[1.0]) > 0.5


# ----------------------------------------------------------------------------- playground

def test_playground_renders_loha_and_stacks_it_with_a_lora(trained, trained_run, base_image):
    loha_run = trained["loha"][0]
    playground = Playground()

    def generate(*choices: AdapterChoice) -> np.ndarray:
        image = playground.generate(GenerateRequest(PROMPT, "tiny", list(choices), seed=0, steps=GEN_STEPS))
        return np.asarray(image, dtype=np.int16)

    loha_only = generate(AdapterChoice(str(loha_run), 1.0))
    assert loha_only.shape == (64, 64, 3)
    lora_only = generate(AdapterChoice(str(trained_run), 1.0), AdapterChoice(str(loha_run), 0.0))
    both = generate(AdapterChoice(str(trained_run), 1.0), AdapterChoice(str(loha_run), 1.0))
    none = generate(AdapterChoice(str(trained_run), 0.0), AdapterChoice(str(loha_run), 0.0))

    assert np.array_equal(none, base_image)
    # the LoHa at 0 stays loaded and active at scale 0, and adds exactly nothing
    assert np.array_equal(lora_only, np.asarray(Playground().generate(GenerateRequest(
        PROMPT, "tiny", [AdapterChoice(str(trained_run), 1.0)], seed=0, steps=GEN_STEPS)), dtype=np.int16))
    assert mean_diff(loha_only, base_image) > 1.0
    # the LoHa acts on top of the LoRA (weaker after 15 steps: measured ~0.06 of 255 mean)
    assert not np.array_equal(both, lora_only) and mean_diff(both, lora_only) > 0.02
    assert mean_diff(both, loha_only) > 1.0  # ... and the LoRA on top of the LoHa
    assert len(playground._loaded) == 2  # each loaded once, scales changed in place


def test_rescaling_a_stack_in_place_draws_what_a_fresh_load_draws(trained, trained_run):
    """Scale changes with the same adapters active only rescale the kept adapter layers; the image at
    (0.5, 1.5) after a walk through other scales equals a fresh playground's first image at (0.5, 1.5)."""
    loha_run = trained["loha"][0]

    def choices(a: float, b: float) -> list[AdapterChoice]:
        return [AdapterChoice(str(trained_run), a), AdapterChoice(str(loha_run), b)]

    def generate(playground: Playground, a: float, b: float) -> np.ndarray:
        image = playground.generate(GenerateRequest(PROMPT, "tiny", choices(a, b), seed=0, steps=GEN_STEPS))
        return np.asarray(image, dtype=np.int16)

    walked = Playground()
    first = generate(walked, 1.0, 1.0)
    pipe, _ = walked.pipeline("tiny")
    kept = pipe._studio_scale_entries[1]
    assert kept and all(entry[0] is not None for entry in kept)  # peft's formula reproduced for every layer
    for a, b in ((0.25, 1.25), (1.5, 0.5)):
        walked.set_scales("tiny", choices(a, b))
    assert pipe._studio_scale_entries[1] is kept  # the in-place path ran: no new walk over the modules
    rescaled = generate(walked, 0.5, 1.5)
    fresh = generate(Playground(), 0.5, 1.5)
    assert np.array_equal(rescaled, fresh)
    assert mean_diff(rescaled, first) > 0.5  # and the scales did act


# ----------------------------------------------------------------------------- community export

@pytest.mark.parametrize("kind", KINDS)
def test_export_reloads_through_lycoris(trained, kind):
    run_dir, training_pipe = trained[kind]
    unet = training_pipe.unet
    reports = read_reports(run_dir / "adapter")
    assert [r.file for r in reports] == [LYCORIS_EXPORT]
    report = reports[0]
    assert report.ok, report.summary()
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    # ... and the check can see a wrong file: the adapter moves the same output far more than that.
    effect = lycoris._compare(unet, lycoris._base_unet_copy(unet))
    print(f"{kind}: adapter effect {effect:.2e}, export diff {report.max_abs_diff:.2e}")
    assert effect > 1e-3 and effect > 100 * report.max_abs_diff

    from safetensors.torch import load_file

    keys = load_file(str(run_dir / "adapter" / LYCORIS_EXPORT)).keys()
    assert all(k.startswith("lora_unet_") for k in keys)
    suffixes = {k.split(".", 1)[1] for k in keys}
    expected = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} if kind == "loha" else None
    if expected:
        assert suffixes == expected
    else:
        assert "alpha" in suffixes and suffixes - {"alpha"} <= {
            "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in keys


def test_tampered_export_fails_and_names_the_key(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir, pipe = trained["loha"]
    weights = load_file(str(run_dir / "adapter" / LYCORIS_EXPORT))
    removed = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_b"
    del weights[removed]
    path = tmp_path / LYCORIS_EXPORT
    save_file(weights, str(path))

    report = lycoris.check_export(path, pipe)

    assert not report.ok
    assert any(removed.split(".")[0] in k for k in report.missing_keys), report.missing_keys


# ----------------------------------------------------------------------------- LoKr + LoCon on real layouts

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lycoris_rebuilds_every_lokr_layer_of_the_real_layout(family):
    """LyCORIS's loader infers each LoKr layer's split from the file's shapes and builds its own module:
    on the real SD 1.5 / SDXL layouts (meta device) with LoCon, every layer of the studio's file is
    rebuilt by lycoris-lora's own `make_module` with the same shapes (the convolutions whose input and
    output widths differ, e.g. SD 1.5 up_blocks.2.resnets.0.conv1, included), and every layer kind is there."""
    from lycoris.modules import get_module, make_module

    from studio.adapters import lora
    from tests.test_clients import real_layout_pipe

    pipe = real_layout_pipe(family, "lokr")
    state = lycoris.kohya_state_dict(pipe.unet)
    paths = {lora.kohya_module_name(k.rsplit(".", 1)[0], pipe.unet): k.rsplit(".", 1)[0]
             for k in lycoris.state_dict(pipe.unet)}
    modules = dict(pipe.unet.named_modules())
    names = {k.split(".")[0] for k in state}
    assert names == set(paths)
    for name in names:
        lyco_type, params = get_module(state, name)
        assert lyco_type is not None and lyco_type.__name__ == "LokrModule", name
        built = make_module(lyco_type, params, name, modules[paths[name]].get_base_layer())  # raises on a mismatch
        ours = {k.split(".", 1)[1]: tuple(v.shape) for k, v in state.items() if k.startswith(name + ".lokr_")}
        assert {k: tuple(getattr(built, k).shape) for k in ours} == ours, name
    kinds = ("in_layers_2", "skip_connection", "proj_in", "ff_net_2", "attn2_to_k") if family == "sdxl" else (
        "up_blocks_2_resnets_0_conv1", "conv_shortcut", "proj_in", "ff_net_2", "attn2_to_k")
    for kind in kinds:
        assert any(kind in n for n in names), kind
