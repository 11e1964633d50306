"""LoRAs and embeddings written by other tools, added to the Playground by file.

The files are built here from the key rules those tools publish, not with the studio's own mapping:
- kohya-ss/sd-scripts `networks/lora.py`: `lora_unet_` + the UNet module path with '.' -> '_' (its SD 1.x
  UNet uses diffusers' module names), `lora_te_text_model_...` for the text encoder; `lora_down` (rank x in),
  `lora_up` (out x rank), `alpha`; update = up @ down * alpha / rank.
- the original LDM layout (ComfyUI `comfy/utils.py` `unet_to_diffusers`): `input_blocks.4.1` is
  `down_blocks.1.attentions.0` when there are 2 layers per block, `middle_block.1` the middle attention,
  `output_blocks.1.1` `up_blocks.0.attentions.1`.
- KohakuBlueleaf/LyCORIS `lycoris/modules/loha.py` / `lokr.py`: `hada_w1_a` (out x r), `hada_w1_b`
  (r x in), `hada_w2_a`, `hada_w2_b`, update = (w1_a w1_b) * (w2_a w2_b) * alpha / r; `lokr_w1` and
  `lokr_w2_a` @ `lokr_w2_b`, update = kron(w1, w2) * alpha / r; `dora_scale` (out x 1): W' = m (W + dW) / ||W + dW||.
- AUTOMATIC1111 `modules/textual_inversion/textual_inversion.py`: `emb_params` (vectors x width), the file
  name is the prompt word.
The expected model is the base with each update merged into its weights by hand, compared with what
the studio loaded on a fixed UNet input.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.adapters import community
from studio.adapters.lora import _fixed_unet_input
from studio.errors import StudioError
from studio.generate import AdapterChoice, GenerateRequest, Playground

STEPS = 3
ATTN = ("attn1.to_q", "attn1.to_k", "attn2.to_k", "attn2.to_v", "attn1.to_out.0")
LDM = {"down_blocks.1.attentions.0": "input_blocks.4.1", "mid_block.attentions.0": "middle_block.1",
       "up_blocks.0.attentions.1": "output_blocks.1.1"}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and message.endswith(".")
    assert not re.search(r"[.!?]\s+[A-Z]", message), message


@pytest.fixture(scope="module")
def base_pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None).to(torch.float32)


def targets(pipe):
    """(path, layer) of the attention projections and the first ResNet convolution of each block."""
    return [(n, m) for n, m in pipe.unet.named_modules()
            if n.endswith(ATTN) or re.fullmatch(r"(down|up)_blocks\.\d\.resnets\.0\.conv1", n)]


def kohya_name(path: str, ldm: bool = False) -> str:
    if ldm:
        for diffusers, original in LDM.items():
            path = path.replace(diffusers + ".", original + ".")
    return "lora_unet_" + path.replace(".", "_")


def randn(*shape, g, std=0.3):
    return torch.randn(*shape, generator=g) * std


def kohya_lora(pipe, ldm: bool = False, dora: bool = False, seed: int = 0):
    """A kohya LoRA/LoCon: {key: tensor} and {module path: dW} (and DoRA magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    state, deltas, mags = {}, {}, {}
    rank, alpha = 4, 2.0
    for path, layer in targets(pipe):
        if ldm and not any(path.startswith(k + ".") for k in LDM):
            continue
        key = kohya_name(path, ldm)
        if isinstance(layer, torch.nn.Conv2d):  # LoCon: a 3x3 down, a 1x1 up
            down, up = randn(rank, layer.in_channels, 3, 3, g=g), randn(layer.out_channels, rank, 1, 1, g=g)
        else:
            down, up = randn(rank, layer.in_features, g=g), randn(layer.out_features, rank, g=g)
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
        deltas[path] = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape) * alpha / rank
        if dora:
            mags[path] = (layer.weight + deltas[path]).flatten(1).norm(dim=1) * (1 + torch.rand(layer.weight.shape[0], generator=g))
            state[f"{key}.dora_scale"] = mags[path].reshape(-1, *[1] * (layer.weight.dim() - 1))
    return state, deltas, mags


def loha(pipe, seed: int = 1, dora: bool = False):
    g = torch.Generator().manual_seed(seed)
    state, deltas, mags = {}, {}, {}
    rank, alpha = 3, 1.5
    for path, layer in targets(pipe):
        key = kohya_name(path)
        out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
        w = [randn(out, rank, g=g, std=0.5), randn(rank, fan_in, g=g, std=0.5),
             randn(out, rank, g=g, std=0.5), randn(rank, fan_in, g=g, std=0.5)]
        state.update({f"{key}.hada_{n}": t for n, t in zip(("w1_a", "w1_b", "w2_a", "w2_b"), w)})
        state[f"{key}.alpha"] = torch.tensor(alpha)
        deltas[path] = ((w[0] @ w[1]) * (w[2] @ w[3])).reshape(layer.weight.shape) * alpha / rank
        if dora:
            mags[path] = (layer.weight + deltas[path]).flatten(1).norm(dim=1) * 1.5
            state[f"{key}.dora_scale"] = mags[path].reshape(-1, *[1] * (layer.weight.dim() - 1))
    return state, deltas, mags


def lokr(pipe, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    rank, alpha = 2, 1.0
    for path, layer in targets(pipe):
        if isinstance(layer, torch.nn.Conv2d):
            continue
        out, fan_in = layer.weight.shape
        w1 = randn(4, 4, g=g, std=0.5)
        w2a, w2b = randn(out // 4, rank, g=g, std=0.5), randn(rank, fan_in // 4, g=g, std=0.5)
        key = kohya_name(path)
        state.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b,
                      f"{key}.alpha": torch.tensor(alpha)})
        deltas[path] = torch.kron(w1, w2a @ w2b) * alpha / rank
    return state, deltas


def merged_unet(tiny_model, deltas: dict, mags: dict | None = None):
    """The base UNet with each update merged into its weight by hand (DoRA: rescaled per output row)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet").eval()
    layers = dict(unet.named_modules())
    with torch.no_grad():
        for path, delta in deltas.items():
            weight = layers[path].weight
            new = weight + delta
            if mags and path in mags:
                new = new * (mags[path] / new.flatten(1).norm(dim=1)).reshape(-1, *[1] * (new.dim() - 1))
            weight.copy_(new)
    return unet


def unet_output(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet.eval()(**_fixed_unet_input(unet)).sample


@pytest.fixture
def loaded(tiny_model, tmp_path):
    """loaded(state, name) -> (pipeline with the file loaded, report); a fresh pipeline each time."""
    from diffusers import StableDiffusionPipeline

    def load(state: dict, name: str = "community.safetensors"):
        path = tmp_path / name
        save_file(state, str(path))
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
        module = community.load(pipe, path, "file")
        pipe.set_adapters(["file"], adapter_weights=[1.0]) if module.HAS_SCALE else None
        return pipe, module.report

    return load


@pytest.mark.parametrize("ldm", [False, True], ids=["diffusers-names", "ldm-names"])
def test_kohya_lora_and_locon_load_exactly(loaded, base_pipe, tiny_model, ldm):
    state, deltas, _ = kohya_lora(base_pipe, ldm=ldm)
    pipe, report = loaded(state)
    assert report.format == "kohya LoRA" and report.kind == "lora"
    assert report.layers == {"unet": len(deltas)} and not report.skipped
    assert any(".conv1" in p for p in deltas) == (not ldm)  # LoCon convolutions in the first file
    expected = unet_output(merged_unet(tiny_model, deltas))
    assert (unet_output(pipe.unet) - expected).abs().max() < 1e-4
    assert (unet_output(base_pipe.unet) - expected).abs().max() > 1e-2  # the update is not negligible


@pytest.mark.parametrize("dora", [False, True], ids=["loha", "loha-dora"])
def test_lycoris_loha_loads_exactly(loaded, base_pipe, tiny_model, dora):
    state, deltas, mags = loha(base_pipe, dora=dora)
    pipe, report = loaded(state)
    assert report.format == "LyCORIS LoHa" and report.kind == ("dora" if dora else "lora")
    assert not report.skipped
    expected = unet_output(merged_unet(tiny_model, deltas, mags))
    assert (unet_output(pipe.unet) - expected).abs().max() < 1e-4


def test_kohya_dora_loads_exactly(loaded, base_pipe, tiny_model):
    state, deltas, mags = kohya_lora(base_pipe, dora=True)
    pipe, report = loaded(state)
    assert report.kind == "dora"
    expected = unet_output(merged_unet(tiny_model, deltas, mags))
    assert (unet_output(pipe.unet) - expected).abs().max() < 1e-4


def test_lycoris_lokr_loads_exactly(loaded, base_pipe, tiny_model):
    state, deltas = lokr(base_pipe)
    pipe, report = loaded(state)
    assert report.format == "LyCORIS LoKr" and not report.skipped
    expected = unet_output(merged_unet(tiny_model, deltas))
    assert (unet_output(pipe.unet) - expected).abs().max() < 1e-4


def test_text_encoder_keys_reach_the_text_encoder(loaded, base_pipe):
    g = torch.Generator().manual_seed(3)
    q = base_pipe.text_encoder.encoder.layers[0].self_attn.q_proj  # transformers 5: no .text_model
    down, up = randn(2, q.in_features, g=g, std=1.0), randn(q.out_features, 2, g=g, std=1.0)
    state = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0)}
    pipe, report = loaded(state)
    assert report.layers == {"text_encoder": 1}
    ids = base_pipe.tokenizer("a photo", return_tensors="pt").input_ids
    x = base_pipe.text_encoder.embeddings(ids)
    layer = pipe.text_encoder.encoder.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert torch.allclose(layer(x), q(x) + x @ (up @ down).T, atol=1e-5)


def test_unmatched_keys_are_counted_with_examples(loaded, base_pipe):
    state, _, _ = kohya_lora(base_pipe)
    stray = {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
             "lora_unet_hypernetwork_extra.weight": torch.zeros(3)}
    first = next(k for k in state if k.endswith("attn1_to_q.lora_down.weight"))
    bad_shape = {first: torch.zeros(4, 5)}  # a layer of the model, but not its width
    _, report = loaded({**state, **stray, **bad_shape})
    assert sorted(report.unmatched) == sorted(stray)
    assert first in report.unfit and len(report.unfit) == 3  # its up and alpha go with it
    summary = report.summary()
    assert "3 key(s) match no layer of this base model and were not applied, e.g. " in summary
    assert "3 key(s) have shapes that differ" in summary
    assert "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight" in summary


def test_a_file_of_another_family_is_one_sentence(base_pipe, tmp_path):
    sdxl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048)}
    save_file(sdxl, str(tmp_path / "xl-style.safetensors"))
    with pytest.raises(StudioError) as err:
        community.load(base_pipe, tmp_path / "xl-style.safetensors", "x")
    one_sentence(str(err.value))
    assert "'xl-style.safetensors' is a LoRA for SDXL and the base model is SD 1.x/2.x" in str(err.value)
    assert not base_pipe.unet.peft_config if hasattr(base_pipe.unet, "peft_config") else True


def test_an_sd15_lora_on_sdxl_is_one_sentence(tmp_path):
    from studio.models import resolve

    pipe, _ = Playground().pipeline("builtin-sdxl")
    assert resolve("builtin-sdxl")
    sd15 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768)}
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(StudioError) as err:
        community.load(pipe, tmp_path / "sd15.safetensors", "x")
    one_sentence(str(err.value))
    assert "is a LoRA for SD 1.x and the base model is SDXL" in str(err.value)


def test_pickles_are_refused_unopened(tmp_path, base_pipe, monkeypatch):
    import pickle

    opened = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: opened.append(a))
    for name in ("old.pt", "renamed.safetensors"):
        torch.save({"emb_params": torch.zeros(1, 32)}, str(tmp_path / name))
        with pytest.raises(StudioError, match="pickle") as err:
            community.load(base_pipe, tmp_path / name, "x")
        one_sentence(str(err.value))
    assert not opened


def test_a_truncated_file_is_one_sentence(tmp_path, base_pipe):
    state, _, _ = kohya_lora(base_pipe)
    save_file(state, str(tmp_path / "full.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:2000])
    with pytest.raises(StudioError, match="truncated") as err:
        community.load(base_pipe, tmp_path / "cut.safetensors", "x")
    one_sentence(str(err.value))


# ------------------------------------------------------------------------------------ in the Playground

def request(*choices, prompt="a photo of sks stuffed animal"):
    return GenerateRequest(prompt, "tiny", list(choices), seed=0, steps=STEPS)


@pytest.fixture(scope="module")
def files(base_pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("community")
    kohya, _, _ = kohya_lora(base_pipe)
    save_file(kohya, str(out / "kohya-style.safetensors"))
    lyco, _, _ = loha(base_pipe)
    save_file(lyco, str(out / "lycoris-style.safetensors"))
    g = torch.Generator().manual_seed(5)
    save_file({"emb_params": torch.randn(2, 32, generator=g) * 3}, str(out / "shinyword.safetensors"))
    return {"kohya": out / "kohya-style.safetensors", "lycoris": out / "lycoris-style.safetensors",
            "embedding": out / "shinyword.safetensors"}


@pytest.fixture(scope="module")
def playground_base(tiny_model):
    return pixels(Playground().generate(request()))


@pytest.mark.parametrize("which", ["kohya", "lycoris"])
def test_file_changes_the_image_and_its_scale_moves_in_place(files, playground_base, which, monkeypatch):
    playground = Playground()
    calls = []
    real = community.load
    monkeypatch.setattr(community, "load", lambda *a: calls.append(a[1]) or real(*a))
    at = lambda s: pixels(playground.generate(request(AdapterChoice(str(files[which]), s))))  # noqa: E731
    one, half, zero, again = at(1.0), at(0.5), at(0.0), at(1.0)
    assert np.abs(one - playground_base).mean() > 2.0
    assert np.abs(half - one).mean() > 0.5 and np.abs(half - zero).mean() > 0.5
    assert np.array_equal(zero, playground_base)  # scale 0 is the base, exactly
    assert np.array_equal(again, one)
    assert len(calls) == 1  # loaded once: every scale change after it was in place
    seconds = playground.set_scales("tiny", [AdapterChoice(str(files[which]), 0.3)])
    assert seconds < 0.5


def test_files_stack_with_the_studios_own_run(files, trained_run, playground_base):
    playground = Playground()
    run = AdapterChoice(str(trained_run), 1.0)
    run_only = pixels(playground.generate(request(run)))
    both = pixels(playground.generate(request(run, AdapterChoice(str(files["kohya"]), 1.0))))
    pipe, _ = playground.pipeline("tiny")
    assert len(pipe.unet.active_adapters()) == 2  # the run's LoRA and the file's, both on
    assert np.abs(both - run_only).mean() > 1.0
    file_at_zero = pixels(playground.generate(request(run, AdapterChoice(str(files["kohya"]), 0.0))))
    assert np.array_equal(file_at_zero, run_only)
    assert np.array_equal(pixels(playground.generate(request())), playground_base)


def test_an_embedding_file_adds_its_word(files, playground_base):
    playground = Playground()
    choice = AdapterChoice(str(files["embedding"]), 1.0)
    assert playground.file_report("tiny", str(files["embedding"])).tokens == ["shinyword", "shinyword_1"]
    with_word = pixels(playground.generate(request(choice, prompt="a photo of shinyword")))
    plain = pixels(playground.generate(request(prompt="a photo of shinyword")))
    assert np.abs(with_word - plain).mean() > 1.0
    off = pixels(playground.generate(request(AdapterChoice(str(files["embedding"]), 0.0),
                                             prompt="a photo of shinyword")))
    assert np.array_equal(off, plain)  # switched off: the word is no token any more


def test_unmatched_keys_reach_the_image_notice(files, tmp_path):
    from safetensors.torch import load_file

    from studio.generate import NOTICE

    state = load_file(str(files["kohya"]))
    state["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "extra.safetensors"))
    image = Playground().generate(request(AdapterChoice(str(tmp_path / "extra.safetensors"), 1.0)))
    assert "extra.safetensors: 1 key(s) match no layer" in image.info[NOTICE]
    assert "lora_unet_not_a_layer.lora_down.weight" in image.info[NOTICE]


def test_a_diffusers_file_draws_what_its_run_draws(trained_run, playground_base):
    """The run's own diffusers-format file (alpha in its `lora_adapter_metadata`), added as a file."""
    from studio.paths import LORA_WEIGHTS

    playground = Playground()
    run = pixels(playground.generate(request(AdapterChoice(str(trained_run), 0.7))))
    report = playground.file_report("tiny", str(trained_run / "adapter" / LORA_WEIGHTS))
    assert report.format == "diffusers LoRA" and not report.skipped and report.layers["unet"] > 0
    as_file = pixels(playground.generate(request(AdapterChoice(str(trained_run / "adapter" / LORA_WEIGHTS), 0.7))))
    assert np.abs(as_file.astype(float) - run).max() <= 1  # the same image, to rounding
    assert np.abs(run - playground_base).mean() > 1.0
