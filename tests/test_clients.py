"""The studio's community files read by the clients' own rules (studio.adapters.clients): ComfyUI,
AUTOMATIC1111 and kohya sd-scripts, each encoded from their code.

- Outputs, on the tiny SD 1.x and SDXL models: for every method, each client's rule applied to the
  exported file gives the studio's own UNet and text-encoder outputs within 1e-3 of what the adapter
  changes; where a client's rule is known not to apply a file exactly (DoRA's magnitude), the check
  says so, and the studio's other file for that client is exact.
- Keys, on the real SD 1.5 and SDXL layouts (meta-device models built from the published configs):
  every key of every community file lands on a real weight of the right shape.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from safetensors.torch import load_file

from studio import models
from studio.adapters import LOCON_MODULES, clients, embedding, lora, lycoris
from studio.paths import LYCORIS_EXPORT

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
METHODS = ("lora", "dora", "loha", "lokr")
FAMILIES = {"sd1": "tiny", "sdxl": "builtin-sdxl"}


def adapter_config(method: str, rank: int = 4, alpha: float = 2.0, text: bool = False):
    targets = lora.TEXT_TARGETS if text else ATTENTION + LOCON_MODULES  # LoCon: every layer kind
    if method == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if method == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets,
                      use_dora=method == "dora")


def give_weight(model, generator: torch.Generator) -> None:
    """Random adapter weights (at init B = 0 / w2 = 0 would make any file match), magnitudes moved.
    LoHa's and LoKr's updates are products of two factors: larger factors give them a change of the
    output well above float32 rounding, as training does."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if ("hada_" in name or "lokr_" in name) else 0.05
            if "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            elif any(a in name for a in ("lora_B", "lora_A", "hada_", "lokr_")):
                p.copy_(std * torch.randn(p.shape, generator=generator))


def adapted_pipeline(family: str, method: str):
    """The tiny model of `family` with a `method` adapter (LoCon targets) on the UNet and, for LoRA and
    DoRA, on the text encoder(s), as training leaves it (adapter 'default' at scale 1)."""
    pipe = models.load_pipeline(models.resolve(FAMILIES[family]))
    pipe.unet.add_adapter(adapter_config(method))
    if method in ("lora", "dora"):
        for _, encoder in lora.text_encoders(pipe):
            encoder.add_adapter(adapter_config(method, text=True))
    generator = torch.Generator().manual_seed(0)
    for part in [pipe.unet] + [e for _, e in lora.text_encoders(pipe)]:
        give_weight(part, generator)
    return pipe


@pytest.fixture(scope="module", params=[(f, m) for f in FAMILIES for m in METHODS], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory, tiny_model):
    family, method = request.param
    pipe = adapted_pipeline(family, method)
    folder = tmp_path_factory.mktemp(f"{family}-{method}")
    module = lycoris if method in ("loha", "lokr") else lora
    return family, method, pipe, folder, module.export(folder, pipe)


def by_client(report) -> dict[str, dict]:
    return {c["client"]: c for c in report.clients}


def test_each_recommended_client_reproduces_the_studio(exported):
    family, method, pipe, folder, reports = exported
    files = {r.file for r in reports}
    expected = {"lora": {lora.KOHYA_WEIGHTS}, "dora": {lora.KOHYA_WEIGHTS, lora.DORA_DIFF},
                "loha": {LYCORIS_EXPORT}, "lokr": {LYCORIS_EXPORT}}[method]
    assert files == expected
    checked = [r for r in reports if r.clients]
    assert {r.file for r in checked} == expected  # every community file has its client checks
    for report in checked:
        assert report.ok, report.summary()
        state = load_file(str(folder / report.file))
        for check in report.clients:
            assert check["total"] == len(state)
            if check["recommended"]:
                assert check["exact"] and check["matched"] == check["total"], check
                assert check["max_rel_diff"] <= clients.TOLERANCE
                assert check["change"] > 1e-3  # the adapter does move the output: the check can see it


def test_clients_that_do_not_apply_a_file_exactly_are_told_apart(exported):
    family, method, pipe, folder, reports = exported
    main = by_client(reports[0])
    if method == "dora":
        # kohya-file DoRA (per-output dora_scale): A1111 normalises per input column, ComfyUI divides by
        # the norm of W; both measurably off, and the .diff file is what they get pointed to.
        for client in (clients.COMFYUI, clients.A1111):
            assert not main[client]["recommended"] and not main[client]["exact"]
            assert main[client]["max_rel_diff"] is None or main[client]["max_rel_diff"] > 10 * clients.TOLERANCE
            assert lora.DORA_DIFF in main[client]["note"]
        diff = by_client(next(r for r in reports if r.file == lora.DORA_DIFF))
        assert diff[clients.COMFYUI]["exact"] and diff[clients.A1111]["exact"]
        assert diff[clients.KOHYA]["matched"] == 0 and not diff[clients.KOHYA]["recommended"]
    if method in ("loha", "lokr"):  # kohya's networks/lora.py reads LoRA only; its tools use LyCORIS
        assert main[clients.KOHYA]["matched"] == 0 and not main[clients.KOHYA]["recommended"]
        assert reports[0].loader.startswith("lycoris-lora")  # ... which read every module (report ok)


def test_lycoris_reads_the_dora_kohya_file_as_the_studio_applies_it(exported):
    """kohya's tools take DoRA through LyCORIS (network_module lycoris.kohya): lycoris-lora builds a
    weight-decomposed LoCon module for every layer of the kohya file, each giving the studio's output."""
    from lycoris.kohya import create_network_from_weights

    family, method, pipe, folder, reports = exported
    if method != "dora":
        pytest.skip("DoRA only")
    weights = {k: v for k, v in load_file(str(folder / lora.KOHYA_WEIGHTS)).items() if k.startswith("lora_unet_")}
    named, paths = lycoris._layer_view(pipe.unet)
    with lycoris._no_timestep_embedding_target():
        network, _ = create_network_from_weights(1.0, None, None, None, named, weights_sd=weights)
    assert {m.lora_name for m in network.unet_loras} == {k.split(".")[0] for k in weights}
    assert all(m.wd for m in network.unet_loras)  # dora_scale read: weight decomposition on
    assert lycoris._compare_layers(pipe.unet, network, paths) < 1e-5


def test_lokr_with_locon_loads_in_lycoris_for_every_layer_kind(exported):
    family, method, pipe, folder, reports = exported
    if method != "lokr":
        pytest.skip("LoKr only")
    report = reports[0]
    assert report.ok and not report.missing_keys, report.summary()
    modules = {k.split(".")[0] for k in load_file(str(folder / LYCORIS_EXPORT))}
    for kind in ("attn1_to_q", "attn2_to_k", "proj_in", "ff_net_0_proj", "ff_net_2"):
        assert any(m.endswith(kind) for m in modules), kind
    convs = ("in_layers_2", "out_layers_3", "skip_connection") if family == "sdxl" else ("conv1", "conv2", "conv_shortcut")
    for kind in convs:
        assert any(m.endswith(kind) for m in modules), kind


def test_a_wrong_weight_fails_the_client_check(exported):
    family, method, pipe, folder, reports = exported
    if method != "lora":
        pytest.skip("one method is enough")
    state = load_file(str(folder / lora.KOHYA_WEIGHTS))
    key = sorted(k for k in state if k.endswith(".alpha"))[0]
    state[key] = state[key] * 2  # twice the strength on one layer
    layout = lora.client_layout(pipe)
    for client in clients.CLIENTS:
        check = clients.check_file(state, layout, client)
        assert check.matched == check.total and not check.exact
        assert check.max_rel_diff > 10 * clients.TOLERANCE
    if family == "sdxl":  # A1111 applies OpenCLIP-G's q/k/v/out_proj together or not at all
        layer = "lora_te2_text_model_encoder_layers_0_self_attn_"
        del state[layer + "q_proj.lora_up.weight"], state[layer + "q_proj.lora_down.weight"], state[layer + "q_proj.alpha"]
        check = clients.check_file(state, layout, clients.A1111, compare=False)
        assert any(u.startswith(layer + "k_proj") for u in check.unmatched)
        assert check.total - check.matched == 9  # k, v, out_proj: down, up, alpha each


# ----------------------------------------------------------------------------- embeddings

@pytest.mark.parametrize("family", list(FAMILIES))
def test_embedding_file_is_named_after_its_token_for_a1111_and_comfyui(family, tmp_path, tiny_model):
    pipe = models.load_pipeline(models.resolve(FAMILIES[family]))
    for tokenizer, encoder in embedding._pairs(pipe):
        (encoder._studio_token,) = embedding.add_tokens(tokenizer, encoder, [("sks", "toy")])
        with torch.no_grad():
            encoder.get_input_embeddings().weight[encoder._studio_token[1]] += 0.1
    embedding.save(pipe, tmp_path)  # the native file, which export checks too
    reports = embedding.export(tmp_path, pipe)
    a1111 = next(r for r in reports if r.format == "a1111-embedding")
    assert a1111.file == "embeddings_a1111/sks.safetensors" and (tmp_path / a1111.file).is_file()
    assert all(r.ok for r in reports), [r.summary() for r in reports]
    checks = by_client(a1111)
    assert set(checks) == {clients.A1111, clients.COMFYUI}
    assert all(c["exact"] and c["matched"] == c["total"] for c in checks.values())
    assert "'sks'" in checks[clients.A1111]["note"] and "embedding:sks" in checks[clients.COMFYUI]["note"]
    keys = set(load_file(str(tmp_path / a1111.file)))
    assert keys == ({"clip_l", "clip_g"} if family == "sdxl" else {"emb_params"})


# ----------------------------------------------------------------------------- real layouts, keys only

# Published configs of the real models (diffusers' unet/config.json, transformers' CLIP configs).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# SD 2.1 (stabilityai/stable-diffusion-2-1: unet/config.json, text_encoder/config.json: OpenCLIP ViT-H's
# text tower converted to CLIP's names, its last layer dropped, so 23 layers).
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)
CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
              num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def real_layout_pipe(family: str, method: str | None):
    """A stand-in pipeline on the meta device with the real model's UNet and text encoders, and a
    `method` adapter (None: none) whose own (small) weights are real tensors, so the studio's export
    code runs."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{"sdxl": SDXL_UNET, "sd21": SD21_UNET}.get(family, SD15_UNET))
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(**(CLIP_H if family == "sd21" else CLIP_L)))}
        if family == "sdxl":
            encoders["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    if method is None:
        return SimpleNamespace(unet=unet, **encoders)
    with torch.device("meta"):
        unet.add_adapter(adapter_config(method))
        if method in ("lora", "dora"):
            for encoder in encoders.values():
                encoder.add_adapter(adapter_config(method, text=True))
    for part in [unet, *encoders.values()]:
        _materialise_adapter(part)
    return SimpleNamespace(unet=unet, **encoders)


def _materialise_adapter(model) -> None:
    """Real tensors for the adapter's parameters (kilobytes to megabytes); the model's stay on meta."""
    generator = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        if not any(a in name for a in ("lora_", "hada_", "lokr_")):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        value = 0.05 * torch.randn(p.shape, generator=generator) + (1.0 if "magnitude" in name else 0.0)
        param = torch.nn.Parameter(value, requires_grad=False)
        if isinstance(owner, torch.nn.ParameterDict):
            owner[attr] = param
        else:
            setattr(owner, attr, param)


# SDXL's real layout on the meta device is slow to adapt and compute on (minutes for DoRA): there the
# LoRA file (whose module names the DoRA .diff file shares) and LoKr (the LyCORIS names LoHa shares).
REAL_LAYOUTS = [("sd15", m) for m in METHODS] + [("sd21", "lora"), ("sdxl", "lora"), ("sdxl", "lokr")]


@pytest.mark.parametrize("family,method", REAL_LAYOUTS, ids=[f"{f}-{m}" for f, m in REAL_LAYOUTS])
def test_every_key_lands_on_a_real_weight_of_the_real_layout(family, method):
    pipe = real_layout_pipe(family, method)
    layout = lora.client_layout(pipe)
    files = {}
    if method in ("loha", "lokr"):
        files[LYCORIS_EXPORT] = (lycoris.kohya_state_dict(pipe.unet), {clients.COMFYUI, clients.A1111})
    elif method == "lora":
        kohya = {**lora.kohya_state_dict(pipe.unet), **lora.kohya_text_state_dict(pipe)}
        files[lora.KOHYA_WEIGHTS] = (kohya, set(clients.CLIENTS))
    else:  # DoRA's kohya file has LoRA's names (plus dora_scale): its file for ComfyUI and A1111 is the .diff
        files[lora.DORA_DIFF] = (lora.dora_diff_state_dict(pipe), {clients.COMFYUI, clients.A1111})
    for file, (state, readers) in files.items():
        assert any(k.startswith("lora_unet_") for k in state)
        assert any(k.startswith("lora_te") for k in state) == (method in ("lora", "dora"))
        for client in readers:
            check = clients.check_file(state, layout, client, compare=False)
            assert check.matched == check.total, (file, client, check.unmatched)


def test_sd2_text_encoder_keys_take_a1111s_open_clip_names():
    """SD 2.x in AUTOMATIC1111 (networks.py `convert_diffusers_name_to_compvis(key, is_sd2)`, is_sd2 when
    the model's mapping has `model_transformer_resblocks`): `lora_te_` keys go to OpenCLIP ViT-H's own
    layout, q/k/v into the layer's MultiheadAttention, the MLP as c_fc / c_proj."""
    layout = lora.client_layout(real_layout_pipe("sd21", None))
    mapping = clients.a1111_layer_mapping(layout)
    assert clients.a1111_is_sd2(mapping) and not clients.a1111_is_sd2(
        clients.a1111_layer_mapping(lora.client_layout(real_layout_pipe("sd15", None))))
    name, hit = clients.a1111_lookup("lora_te_text_model_encoder_layers_3_mlp_fc1", mapping)
    assert name == "model_transformer_resblocks_3_mlp_c_fc"
    assert hit.component == "text_encoder" and hit.module.endswith("encoder.layers.3.mlp.fc1")
    name, hit = clients.a1111_lookup("lora_te_text_model_encoder_layers_3_self_attn_k_proj", mapping)
    assert name == "model_transformer_resblocks_3_attn_k_proj" and hit == ("mha", "text_encoder", "3", "k")
    # SD 1.x's CLIP-L keeps transformers' names there
    assert clients.a1111_convert_name("lora_te_text_model_encoder_layers_3_mlp_fc1") == \
        "transformer_text_model_encoder_layers_3_mlp_fc1"


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_extracted_lora_and_custom_diffusion_diff_keys_land_on_the_real_layout(family):
    """The two files built from whole weights, on the real layouts: the LoRA extracted from a full
    fine-tune (its SVD runs on the meta device: real names and shapes) for all three clients, and
    Custom Diffusion's `.diff` file for ComfyUI and AUTOMATIC1111."""
    from studio.adapters import custom, extract

    pipe = real_layout_pipe(family, None)
    layout = lora.client_layout(pipe)
    extracted, _ = extract.extract(pipe.unet, pipe.unet, rank=4)
    custom.keep_base_kv(pipe.unet)
    diff = custom.diff_state_dict(pipe.unet)
    assert len(diff) == 2 * sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("attn2"))
    for state, readers in ((extracted, clients.CLIENTS), (diff, (clients.COMFYUI, clients.A1111))):
        for client in readers:
            check = clients.check_file(state, layout, client, compare=False)
            assert check.total == len(state) and check.matched == check.total, (client, check.unmatched)
    # kohya's networks/lora.py has no reader for a weight difference: the check must not pretend it has
    assert clients.check_file(diff, layout, clients.KOHYA, compare=False).matched == 0
