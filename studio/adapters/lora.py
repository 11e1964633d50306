"""LoRA and DoRA on the UNet through peft; saved in diffusers' LoRA format.

The adapter contract (studio.adapters.base): KINDS, CAPABILITIES, SETTINGS, attach, trainable_parameters,
save, load_into, export. Scales are set for all peft kinds alike by `studio.adapters.set_scales`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from studio.adapters.base import Capabilities, LowRank, Setup
from studio.fields import setting
from studio.paths import LORA_WEIGHTS, staging, swap_into_place

log = logging.getLogger(__name__)


@dataclass
class Settings(LowRank):
    train_text_encoder: bool = setting("Also adapt the text encoder's attention (q, k, v, out) with the same rank: "
                                       "learns how the trigger word is read, at more memory per step.", False,
                                       label="Train the text encoder too")


KINDS = ("lora", "dora")
# DoRA's learned magnitude rescales the base weight whatever the scale: at 0 it is switched off instead.
CAPABILITIES = {"lora": Capabilities("peft", text_encoder_option=True),
                "dora": Capabilities("peft", zero_is_base=False, text_encoder_option=True)}
SETTINGS = {"lora": Settings, "dora": Settings}


def attach(pipe, setup: Setup) -> None:
    """Freeze the whole model and add one trainable adapter (name 'default') to the configured modules,
    and to the text encoder(s) with `train_text_encoder`; nothing else trains or is checkpointed."""
    freeze(pipe)
    add_adapters(pipe, setup.settings, dora=setup.kind == "dora")


def add_adapters(pipe, settings: LowRank, dora: bool = False) -> None:
    """The trainable LoRA/DoRA layers alone, on a model whose other weights are frozen already."""
    from peft import LoraConfig

    # Gaussian init of A with B = 0 (Hu et al. 2021): the adapter starts as an exact no-op. DoRA
    # (Liu et al. 2024) adds a per-output-channel magnitude, initialised to the weight's norm.
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, init_lora_weights="gaussian",
                        target_modules=settings.modules(), use_dora=dora)
    pipe.unet.add_adapter(config)
    if getattr(settings, "train_text_encoder", False):
        for _, encoder in text_encoders(pipe):
            encoder.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha, init_lora_weights="gaussian",
                                           target_modules=TEXT_TARGETS, use_dora=dora))


def freeze(pipe) -> None:
    """No weight of the UNet, VAE or text encoder(s) trains: an adapter's attach turns on only its own.
    (A loaded model requires grad everywhere; a checkpoint saves every weight that does.)"""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        component = getattr(pipe, name, None)
        if component is not None:
            component.requires_grad_(False)


# The text encoder's attention projections (CLIP); kohya's and diffusers' text-encoder LoRAs adapt these.
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def text_encoders(pipe) -> list[tuple[str, object]]:
    """(component name, encoder) for each text encoder of the pipeline: one for SD, two for SDXL."""
    names = ("text_encoder", "text_encoder_2")
    return [(n, getattr(pipe, n)) for n in names if getattr(pipe, n, None) is not None]


def adapted_text_encoders(pipe) -> list[tuple[str, object]]:
    return [(n, e) for n, e in text_encoders(pipe) if "default" in (getattr(e, "peft_config", None) or {})]


def trainable_parameters(pipe) -> list:
    modules = [pipe.unet] + [e for _, e in adapted_text_encoders(pipe)]
    return [p for m in modules for name, p in m.named_parameters() if "lora_" in name and p.requires_grad]


def state_dict(unet) -> dict:
    """The UNet's LoRA/DoRA weights with peft's key names (module.lora_A.weight), which
    `load_lora_weights` reads as they are.

    Not `convert_state_dict_to_diffusers`: it renames attention keys to the old `.lora.down` form but
    leaves convolution keys as `lora_A`, and the loader, seeing `lora_A`, then skips every attention
    key of a LoCon adapter.
    """
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save(pipe, out_dir: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` in diffusers format, atomically (temp folder, rename).

    Through the pipeline family's own `save_lora_weights` (SD or SDXL), so its `load_lora_weights` reads it.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    writer = StableDiffusionXLPipeline if getattr(pipe, "text_encoder_2", None) is not None else StableDiffusionPipeline
    out_dir = Path(out_dir)
    tmp = staging(out_dir)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict(pipe.unet).items()}
    # The LoraConfig goes into the file's metadata: without it load_lora_weights assumes alpha = rank,
    # and an adapter trained with alpha != rank reloads at the wrong strength (rank/alpha times too strong).
    extra = {}
    for name, encoder in adapted_text_encoders(pipe):  # text_encoder_lora_layers, text_encoder_2_...
        extra[f"{name}_lora_layers"] = {k: v.detach().to("cpu").contiguous() for k, v in state_dict(encoder).items()}
        extra[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    writer.save_lora_weights(tmp, unet_lora_layers=weights, weight_name=LORA_WEIGHTS, safe_serialization=True,
                             unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(), **extra)
    return swap_into_place(tmp, out_dir)


def load_into(pipe, adapter_dir: Path, name: str) -> None:
    pipe.load_lora_weights(str(adapter_dir), weight_name=LORA_WEIGHTS, adapter_name=name)


# ---------------------------------------------------------------------------- community export (kohya)
#
# AUTOMATIC1111, ComfyUI and kohya's tools read "kohya" LoRA files: one flat safetensors dict whose
# keys name UNet modules with '.' replaced by '_'. For SD 1.x/2.x kohya's sd-scripts write the
# diffusers module layout (lora_unet_down_blocks_0_attentions_0_..., as LyCORIS does), and that is what
# is written here; SDXL files use the original LDM layout (input_blocks_4_1_...), which
# `ldm_module_name` maps to for when SDXL is exported. With LDM names on SD 1.5, diffusers' converter
# cannot tell output_blocks_1 from output_blocks_10 (it matches by substring) and refuses the file.
#
#   lora_unet_<module>.lora_down.weight   A (rank x in), peft's lora_A
#   lora_unet_<module>.lora_up.weight     B (out x rank), peft's lora_B
#   lora_unet_<module>.alpha              scalar lora_alpha; the update is up @ down * alpha / rank
#   lora_unet_<module>.dora_scale         DoRA magnitude, (out, 1) for linear, (out, 1, 1, 1) for
#                                             conv: ComfyUI's weight_decompose divides it by the per-
#                                             output-row norm of shape (out, 1, ...), so it must broadcast.
#
# The file sits beside the diffusers-format weights, so the studio's own loading is unchanged.

KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
KOHYA_LOADER = "diffusers kohya converter"

# diffusers ResNet block layer -> the LDM ResBlock layer with the same weights.
_LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
               "time_emb_proj": "emb_layers.1", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_LDM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
            "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            # SDXL: the embedding of pooled text + size conditioning
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def ldm_module_name(path: str, config) -> str:
    """The LDM (original SD) name of a diffusers UNet2DConditionModel module path.

    Args:
        path: e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".
        config: the UNet's config (layers_per_block, up_block_types).
    Returns:
        e.g. "input_blocks.1.1.transformer_blocks.0.attn1.to_q". Attention internals keep their names
        (the LDM SpatialTransformer uses the same ones); ResNet layers are renamed (_LDM_RESNET).
    Raises:
        ValueError for a module that has no LDM counterpart this mapping knows.
    """
    for name, ldm in _LDM_TOP.items():
        if path == name or path.startswith(name + "."):
            return ldm + path[len(name):]
    lpb = config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError(f"per-block layers_per_block {lpb!r} has no single LDM numbering")
    parts = path.split(".")
    if parts[0] == "mid_block":  # middle_block: resnet 0, attention, resnet 1
        kind, i, rest = parts[1], int(parts[2]), parts[3:]
        slot = {"resnets": 2 * i, "attentions": 1}[kind]
        return _join("middle_block", slot, kind, rest)
    if parts[0] not in ("down_blocks", "up_blocks"):
        raise ValueError(f"'{path}' is outside the UNet blocks")
    block, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":  # input_blocks: conv_in, then per block lpb x (resnet, attn) + downsampler
        if kind == "downsamplers":
            return _join(f"input_blocks.{(block + 1) * (lpb + 1)}", 0, "op", rest[1:], raw=True)
        return _join(f"input_blocks.{1 + block * (lpb + 1) + i}", {"resnets": 0, "attentions": 1}[kind], kind, rest)
    # output_blocks: per block (lpb + 1) x (resnet, attn); the upsampler follows the last layer's
    # resnet (slot 1) or its attention (slot 2).
    if kind == "upsamplers":
        slot = 2 if "CrossAttn" in config.up_block_types[block] else 1
        return _join(f"output_blocks.{block * (lpb + 1) + lpb}", slot, "conv", rest[1:], raw=True)
    return _join(f"output_blocks.{block * (lpb + 1) + i}", {"resnets": 0, "attentions": 1}[kind], kind, rest)


def _join(prefix: str, slot: int, kind: str, rest: list[str], raw: bool = False) -> str:
    if raw:  # down/upsampler: its single conv is the named LDM layer itself
        return ".".join([prefix, str(slot), kind, *rest])
    if kind == "resnets":
        head = ".".join(rest)
        for name, ldm in _LDM_RESNET.items():
            if head == name or head.startswith(name + "."):
                return f"{prefix}.{slot}.{ldm}{head[len(name):]}"
        raise ValueError(f"ResNet layer '{head}' has no LDM counterpart")
    return ".".join([prefix, str(slot), *rest])


def _kohya_path(path: str, unet) -> str:
    """The dotted module path a kohya key is made from: diffusers layout for SD 1.x/2.x, LDM for SDXL."""
    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    return "unet." + (ldm_module_name(path, unet.config) if sdxl else path)


def kohya_module_name(path: str, unet) -> str:
    """The module part of a kohya key, e.g. lora_unet_down_blocks_1_attentions_0_proj_in."""
    return _kohya_name(_kohya_path(path, unet))


def kohya_state_dict(unet, adapter: str = "default") -> dict:
    """The UNet's LoRA/DoRA weights under kohya key names (see the comment above KOHYA_WEIGHTS).

    diffusers' `convert_state_dict_to_kohya` does the lora_A/B -> lora_down/up renaming and the '.' -> '_'
    flattening. It is not enough alone: it writes alpha = rank rather than lora_alpha, and leaves
    DoRA's magnitude under a name and shape no kohya reader knows. Those two are done here.
    """
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_sd = get_peft_model_state_dict(unet, adapter_name=adapter)
    lora_config = unet.peft_config[adapter]
    ab, magnitudes = {}, {}
    for key, value in peft_sd.items():
        module, _, param = key.partition(".lora_")
        ldm = _kohya_path(module, unet)
        value = value.detach().to("cpu", torch.float32).contiguous()
        if param == "magnitude_vector":
            # peft: (out,) linear, (1, out, 1, ...) conv -> kohya/LyCORIS: (out, 1, ...).
            shape = (value.numel(),) + (1,) * (value.dim() - 1 if value.dim() > 1 else 1)
            magnitudes[_kohya_name(ldm)] = value.reshape(shape)
        else:
            ab[f"{ldm}.lora_{param}"] = value
    out = convert_state_dict_to_kohya(ab)
    for key in [k for k in out if k.endswith(".alpha")]:
        out[key] = torch.tensor(float(lora_config.lora_alpha))  # not the converter's alpha = rank
    out.update({f"{name}.dora_scale": m for name, m in magnitudes.items()})
    return out


def _kohya_name(path: str) -> str:
    return "lora_" + path.replace(".", "_")  # "unet.down_blocks.1..." -> "lora_unet_down_blocks_1..."


def export(adapter_dir: Path, pipe) -> list:
    """Write KOHYA_WEIGHTS into `adapter_dir` and read it back with diffusers' kohya converter.

    Returns one ExportReport: the file's keys against the studio's, which adapted modules the loader
    rebuilt, and the UNet output of the loader's copy against the studio's on one fixed input.
    """
    from safetensors.torch import save_file

    path = Path(adapter_dir) / KOHYA_WEIGHTS
    tmp = path.with_name(path.name + ".partial")
    state = {**kohya_state_dict(pipe.unet), **kohya_text_state_dict(pipe)}
    save_file(state, str(tmp), metadata={"format": "pt", "ss_network_module": "networks.lora"})
    tmp.replace(path)
    reports = [check_kohya_file(path, pipe.unet)]
    if adapted_text_encoders(pipe):
        reports.append(check_kohya_text(path, pipe))
    layout = client_layout(pipe)  # ComfyUI's, A1111's and kohya's own rules, outputs on the live model
    reports[0].clients = kohya_client_checks(state, pipe, layout)
    if is_dora(pipe):
        reports.append(export_dora_diff(adapter_dir, pipe, layout))
    return reports


def kohya_text_state_dict(pipe) -> dict:
    """Text-encoder LoRA/DoRA under kohya names: lora_te_ (SD), lora_te1_ / lora_te2_ (SDXL), then the
    module path of CLIP's text model (text_model_encoder_layers_0_self_attn_q_proj)."""
    import torch
    from peft.utils import get_peft_model_state_dict

    sdxl = len(text_encoders(pipe)) > 1
    out = {}
    for index, (name, encoder) in enumerate(text_encoders(pipe), start=1):
        if (name, encoder) not in adapted_text_encoders(pipe):
            continue
        prefix = f"lora_te{index}_" if sdxl else "lora_te_"
        alpha = float(encoder.peft_config["default"].lora_alpha)
        for key, value in get_peft_model_state_dict(encoder).items():
            module, _, param = key.partition(".lora_")
            # transformers 5 names CLIPTextModel's modules without the "text_model." that kohya keys keep
            path = module if module.startswith("text_model.") else "text_model." + module
            stem = prefix + path.replace(".", "_")
            value = value.detach().to("cpu", torch.float32).contiguous()
            if param == "magnitude_vector":
                out[f"{stem}.dora_scale"] = value.reshape(-1, 1)  # peft (out,) -> kohya (out, 1)
            else:
                out[f"{stem}.lora_{'down' if param.startswith('A') else 'up'}.weight"] = value
            out[f"{stem}.alpha"] = torch.tensor(alpha)  # one tensor per key: safetensors refuses shared memory
    return out


def check_kohya_text(path: Path, pipe):
    """The file's text-encoder part read by diffusers' kohya converter into the base model's own text
    encoder(s), fresh from disk; encodings of one prompt compared with the studio's adapted encoders."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from studio.adapters.checks import ExportReport

    report = ExportReport(file=Path(path).name, format="kohya-text-encoder", loader=KOHYA_LOADER)
    file = {k: v for k, v in load_file(str(path)).items() if k.startswith("lora_te")}
    expected = set(kohya_text_state_dict(pipe))
    report.missing_keys, report.unexpected_keys = sorted(expected - set(file)), sorted(set(file) - expected)
    try:
        state, alphas = _convert_non_diffusers_lora_to_diffusers(dict(file))
    except Exception as exc:  # a refusal is the finding
        report.note = f"diffusers' kohya converter refused the text-encoder keys ({exc.__class__.__name__}: {_first_line(exc)})."
        return report
    ids = pipe.tokenizer("a photo of a dog", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    worst = 0.0
    for name, encoder in adapted_text_encoders(pipe):
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        fresh = cls.from_pretrained(pipe.config._name_or_path, subfolder=name).to(encoder.device).eval()
        part = {k: (v.reshape(-1) if "lora_magnitude_vector" in k else v)
                for k, v in state.items() if k.startswith(name + ".")}
        StableDiffusionPipeline.load_lora_into_text_encoder(part, network_alphas=alphas, text_encoder=fresh,
                                                            prefix=name, adapter_name="kohya")
        if not any("kohya" in getattr(m, "lora_A", {}) for m in fresh.modules()):
            report.note = f"no adapter from the file landed on {name}."
            return report
        with torch.no_grad():
            ours = encoder.eval()(ids.to(encoder.device))[0].float()
            theirs = fresh(ids.to(encoder.device))[0].float()
        worst = max(worst, (ours - theirs).abs().max().item())
    report.max_abs_diff = worst
    return report


def check_kohya_file(path: Path, unet, adapter: str = "default"):
    """Read a kohya file back with diffusers' converter onto the studio's own UNet and compare.

    Keys: the file's against those the studio writes for `unet`. Modules: which ones got an adapter
    from the file, against those adapted in `unet`. Output: the file's adapter is loaded beside the
    studio's as a second peft adapter (no copy of the UNet: studio.adapters.probe), and each adapted
    layer's output with either adapter, in float32 on a random input, is compared; the second
    adapter is removed again afterwards.
    """
    from safetensors.torch import load_file

    from studio.adapters import probe
    from studio.adapters.checks import ExportReport

    report = ExportReport(file=Path(path).name, format="kohya", loader=KOHYA_LOADER, tolerance=1e-4)
    expected = set(kohya_state_dict(unet, adapter))
    found = {k for k in load_file(str(path)) if not k.startswith("lora_te")}  # checked by check_kohya_text
    report.missing_keys, report.unexpected_keys = sorted(expected - found), sorted(found - expected)
    loaded = _CHECK_ADAPTER
    grads = {p: p.requires_grad for p in unet.parameters()}
    try:
        load_kohya_into(unet, path, adapter_name=loaded)
    except Exception as exc:  # any refusal is the finding: logged in full, reported in one sentence
        log.warning("diffusers could not load %s", path, exc_info=True)
        report.note = f"diffusers' kohya converter refused the file ({exc.__class__.__name__}: {_first_line(exc)})."
        _drop_adapter(unet, loaded, adapter, grads)
        return report
    try:
        want, got = _adapted_modules(unet, adapter), _adapted_modules(unet, loaded)
        name = lambda m: kohya_module_name(m, unet)  # noqa: E731
        report.missing_keys += sorted(name(m) for m in want - got)
        report.unexpected_keys += sorted(name(m) for m in got - want)
        report.max_abs_diff, worst = probe.max_output_diff(probe.adapter_pairs(unet, adapter, loaded, want & got))
        log.info("kohya check of %s: largest layer differences %s", path, worst)
    finally:
        _drop_adapter(unet, loaded, adapter, grads)
    return report


_CHECK_ADAPTER = "studio_export_check"  # the file's adapter, beside the studio's, while it is checked


def _drop_adapter(unet, name: str, keep: str, grads: dict) -> None:
    """Remove the checked file's adapter (if it got loaded) and leave `keep` active as it was."""
    loaded = getattr(unet, "peft_config", None) or {}
    if keep in loaded:
        unet.set_adapters([keep], weights=[1.0])
    if name in loaded:
        unet.delete_adapters(name)
    for p, flag in grads.items():
        p.requires_grad_(flag)


def load_kohya_into(unet, path: Path, adapter_name: str) -> None:
    """diffusers' own kohya reading, as `StableDiffusionPipeline.load_lora_weights` does it, with two
    helps it needs for these files (both measured with diffusers 0.42):

    - the SD 1.x pipeline does not pass `unet_config` to `lora_state_dict`, so LDM block numbers
      (input_blocks_4_1_...) are not remapped and land on the wrong modules; it is passed here;
    - `lora_state_dict` drops `dora_scale` keys with a warning, so DoRA would silently load as LoRA;
      the converter it calls afterwards does map them, so it is called directly. Its magnitude is
      reshaped from kohya's (out, 1, ...) to peft's layout, which the converter leaves as it is.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers)
    from safetensors.torch import load_file

    state = _maybe_map_sgm_blocks_to_diffusers(load_file(str(path)), unet.config)
    state, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    modules = dict(unet.named_modules())
    for key in [k for k in state if "lora_magnitude_vector" in k]:
        module = key.removeprefix("unet.").replace(".processor.", ".").split(".lora_magnitude_vector")[0]
        module += ".0" if module.endswith(".to_out") else ""  # the converter drops to_out's index
        weight = getattr(modules.get(module), "weight", None)
        if weight is not None:  # linear (out,); conv (1, out, 1, ...) as peft stores it
            state[key] = state[key].reshape(-1) if weight.dim() == 2 else state[key].reshape(1, -1, *[1] * (weight.dim() - 2))
    StableDiffusionPipeline.load_lora_into_unet(state, network_alphas=alphas, unet=unet, adapter_name=adapter_name)


def _adapted_modules(unet, adapter: str) -> set[str]:
    return {name for name, m in unet.named_modules() if adapter in getattr(m, "lora_A", {})}


def _fixed_unet_input(unet) -> dict:
    import torch

    from studio.adapters import probe

    g = torch.Generator().manual_seed(0)
    c, size = unet.config, probe.latent_size(unet)
    device = next(unet.parameters()).device
    inputs = dict(sample=torch.randn(1, c.in_channels, size, size, generator=g).to(device),
                  timestep=torch.tensor([500], device=device),
                  encoder_hidden_states=torch.randn(1, 77, c.cross_attention_dim, generator=g).to(device))
    if getattr(c, "addition_embed_type", None) == "text_time":  # SDXL: pooled text and size conditioning
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(1, pooled, generator=g).to(device),
                                           time_ids=torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]],
                                                                 device=device))
    return inputs


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


# ---------------------------------------------------------------------------- DoRA as weight differences
#
# DoRA's magnitude has no convention every client shares. peft, diffusers and LyCORIS scale each output
# row of W + ΔW to dora_scale (out, 1); AUTOMATIC1111's `apply_weight_decompose` and ComfyUI's older
# `weight_decompose` scale each input column (1, in), and newer ComfyUI divides an (out, 1) scale by the
# norm of W rather than of W + ΔW (studio.adapters.clients has each rule). No per-column magnitude
# reproduces a per-row one, so for those clients the trained layers are written merged: each layer's
# `W' - W` under `<kohya module name>.diff`, which both add to the weight as it is (comfy/lora.py
# `load_lora` "diff", A1111 network_full.py). Exact at strength 1 (and 0); in between a client moves
# linearly from W to W', while DoRA itself rescales W + s·ΔW.

DORA_DIFF = "pytorch_lora_weights_diff.safetensors"
DIFF_LOADER = "ComfyUI and AUTOMATIC1111 rules (studio.adapters.clients)"


def is_dora(pipe) -> bool:
    config = getattr(pipe.unet, "peft_config", {}).get("default")
    return bool(getattr(config, "use_dora", False))


def dora_merged_delta(layer, adapter: str = "default"):
    """W' - W of one peft DoRA layer: W' = m * (W + ΔW) / ||W + ΔW|| per output row (peft's
    DoraLinearLayer / DoraConv2dLayer), ΔW = B A * alpha / r at the adapter's scale."""
    import torch

    weight = layer.get_base_layer().weight.detach()
    merged = weight.to(torch.float32) + layer.get_delta_weight(adapter).detach().to(weight.device, torch.float32)
    magnitude = layer.lora_magnitude_vector[adapter].weight.detach().to(weight.device, torch.float32).reshape(-1)
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return merged * (magnitude / norm).reshape(shape) - weight.to(torch.float32)


def dora_diff_state_dict(pipe, adapter: str = "default") -> dict:
    """`<kohya module name>.diff` (W' - W, in the base weight's dtype) for every DoRA layer of the UNet
    and the adapted text encoder(s), named as in KOHYA_WEIGHTS."""
    sdxl = len(text_encoders(pipe)) > 1
    parts = [(pipe.unet, lambda path: kohya_module_name(path, pipe.unet))]
    for index, (name, encoder) in enumerate(text_encoders(pipe), start=1):
        if (name, encoder) in adapted_text_encoders(pipe):
            prefix = f"lora_te{index}_" if sdxl else "lora_te_"
            parts.append((encoder, lambda path, prefix=prefix: prefix + (
                path if path.startswith("text_model.") else "text_model." + path).replace(".", "_")))
    out = {}
    for model, name_of in parts:
        for path, layer in model.named_modules():
            if adapter in getattr(layer, "lora_magnitude_vector", {}):
                dtype = layer.get_base_layer().weight.dtype
                delta = dora_merged_delta(layer, adapter).to(dtype)
                out[f"{name_of(path)}.diff"] = (delta if delta.is_meta else delta.to("cpu")).contiguous()
    return out


def export_dora_diff(adapter_dir: Path, pipe, layout):
    """Write DORA_DIFF and check it with ComfyUI's and AUTOMATIC1111's rules on the live model."""
    from safetensors.torch import save_file

    from studio.adapters import clients
    from studio.adapters.checks import ExportReport

    path = Path(adapter_dir) / DORA_DIFF
    state = dora_diff_state_dict(pipe)
    tmp = path.with_name(path.name + ".partial")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    report = ExportReport(file=path.name, format="full-diff", loader=DIFF_LOADER)
    report.clients = clients.client_checks(
        state, layout, {clients.COMFYUI: True, clients.A1111: True, clients.KOHYA: False},
        {clients.KOHYA: "networks/lora.py reads lora_down/lora_up only; kohya's tools apply DoRA through "
                        f"LyCORIS (network_module lycoris.kohya) from {KOHYA_WEIGHTS}"})
    comfy = report.clients[0]
    report.unexpected_keys = [] if comfy["matched"] == comfy["total"] else list(comfy["unmatched"])
    if comfy["max_abs_diff"] is not None:  # the clients' tolerance (1e-3 of the change) in absolute terms
        report.max_abs_diff = comfy["max_abs_diff"]
        report.tolerance = max(clients.TOLERANCE * comfy["change"], clients.ROUNDING * comfy["scale"])
    return report


def client_layout(pipe):
    from studio.adapters import clients

    return clients.Layout(pipe.unet, text_encoders(pipe))


def kohya_client_checks(state: dict, pipe, layout) -> list[dict]:
    """ComfyUI's, AUTOMATIC1111's and kohya's rules on KOHYA_WEIGHTS. For DoRA none of them applies
    dora_scale as peft does (diffusers and LyCORIS do), so DORA_DIFF is the file for ComfyUI and A1111."""
    from studio.adapters import clients

    dora = is_dora(pipe)
    use = f"use {DORA_DIFF}, the same layers merged" if dora else ""
    notes = {clients.COMFYUI: use, clients.A1111: use,
             clients.KOHYA: "networks/lora.py ignores dora_scale; kohya's tools read DoRA through LyCORIS "
                            "(network_module lycoris.kohya)" if dora else ""}
    return clients.client_checks(state, layout, {c: not dora for c in clients.CLIENTS}, notes)


# ---------------------------------------------------------------------------- taking a run home

def client_files(kind: str, folder: Path, name: str, token: str) -> list[tuple]:
    """(file, name to give it, role) for ComfyUI and AUTOMATIC1111. DoRA: the layers merged (`.diff`), which
    they apply exactly (their dora_scale rules differ from DoRA's own, studio.adapters.clients); a folder
    without it: the kohya file."""
    from studio.adapters.base import existing

    folder = Path(folder)
    file = DORA_DIFF if kind == "dora" and (folder / DORA_DIFF).is_file() else KOHYA_WEIGHTS
    return existing([(folder / file, f"{name}.safetensors", "lora")])


def diffusers_code(kind: str, folder: Path, token: str, base: str, scale: float, prompt: str) -> str:
    from studio.adapters.base import pipeline_code

    return pipeline_code(base, load_lines(folder, scale), prompt)


def load_lines(folder: Path, scale: float) -> str:
    return (f'pipe.load_lora_weights("{folder}", weight_name="{LORA_WEIGHTS}", adapter_name="concept")\n'
            f'pipe.set_adapters(["concept"], adapter_weights=[{scale:g}])')
