"""How the clients artists use read a community file: each client's key rule and weight rule.

Written from the clients' own code (read, never copied), one function per rule, each naming its source:

- ComfyUI: `comfy/utils.py` `unet_to_diffusers` (the diffusers <-> original-checkpoint names),
  `comfy/lora.py` `model_lora_keys_unet`, `model_lora_keys_clip` (which file key lands on which weight)
  and `load_lora`, `comfy/weight_adapter/{lora,loha,lokr,base}.py` `calculate_weight` / `weight_decompose`.
- AUTOMATIC1111 (and Forge, which keeps the extension): `extensions-builtin/Lora/networks.py`
  `convert_diffusers_name_to_compvis`, `assign_network_names_to_compvis_modules`, `load_network`,
  `network.py` `finalize_updown` / `apply_weight_decompose`, `network_lora.py`, `network_hada.py`,
  `network_lokr.py`, `network_full.py` `calc_updown`.
- kohya sd-scripts: `networks/lora.py` `LoRANetwork.create_modules` (names), `create_network_from_weights`
  (what it reads) and `LoRAInfModule.merge_to` (the weight it makes).

A `Layout` is a model as those clients see it: every weight of the UNet under its original (LDM)
checkpoint name and every text-encoder weight under CLIP's names, each tied to the diffusers parameter
that holds it. Built from a live model (the training pipeline: outputs can be compared) or from one on
the meta device (real SD 1.5 / SDXL sizes: names and shapes only).

`check_file` applies one client's rules to a file: how many of its keys the client reads and lands on
a weight of the right shape, and, on a live model, the output the client would compute against the
studio's own, relative to what the adapter changes (so 1.0 means "as far off as no adapter at all").
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

COMFYUI, A1111, KOHYA = "ComfyUI", "AUTOMATIC1111", "kohya sd-scripts"
TOLERANCE = 1e-3  # output difference / adapter's change, at strength 1
# Below this fraction of the output itself a difference is float32 rounding (a weight merged into W
# against the adapter run beside it measured ~3e-6); a barely trained adapter changes the output by
# little more, so such a difference counts as exact whatever its ratio to the change.
ROUNDING = 1e-5
_ADAPTER_PARAMS = ("lora_", "hada_", "lokr_")


@dataclass(frozen=True)
class Target:
    """One weight of the model: component ('unet', 'text_encoder', 'text_encoder_2') and the diffusers
    module path inside it (its `.weight` is the weight)."""
    component: str
    module: str


@dataclass
class ClientCheck:
    client: str
    rule: str  # the source files whose rules were applied
    matched: int  # file keys the client reads and lands on a weight of the right shape
    total: int  # keys in the file
    unmatched: list[str] = field(default_factory=list)  # examples (at most 8)
    max_rel_diff: float | None = None  # output vs the studio's, relative to the adapter's change
    max_abs_diff: float | None = None  # the same difference, absolute
    change: float | None = None  # max |studio - base|: what the adapter changes in that output
    scale: float | None = None  # max |studio|: the output itself
    exact: bool = False  # every key matched and the output within TOLERANCE (live models only)
    recommended: bool = True  # the studio tells users to load this file in this client
    note: str = ""


# ============================================================================ the model as clients see it

class Layout:
    """Names and weights of a model in the clients' terms.

    Args:
        unet: a diffusers UNet2DConditionModel (adapters may be attached: their wrappers are looked
            through), on any device, the meta device included.
        text_encoders: (component name, CLIPTextModel[WithProjection]) pairs, first encoder first.
    """

    def __init__(self, unet, text_encoders: list[tuple[str, object]] = ()):
        self.models = {"unet": unet, **dict(text_encoders)}
        self.sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        # SD 2.x: its text encoder is OpenCLIP ViT-H, which AUTOMATIC1111 keeps in OpenCLIP's own layout
        # (the studio's family rule, metadata.family_from: cross-attention width 1024 without SDXL's extras).
        self.v2 = not self.sdxl and getattr(unet.config, "cross_attention_dim", None) == 1024
        self.unet_shapes = _base_shapes(unet)
        mapping = comfyui_unet_to_diffusers(comfyui_unet_config(unet.config))
        self.ldm = {k: v for k, v in mapping.items() if k in self.unet_shapes}  # diffusers -> LDM param
        self.text = {name: {_clip_path(k): (k, s) for k, s in _base_shapes(enc).items()}
                     for name, enc in text_encoders}  # CLIP path -> (param name, shape)
        self._modules = {}
        self.reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # component -> (studio, base) output

    def shape(self, target: Target) -> tuple:
        if target.component == "unet":
            return self.unet_shapes[target.module + ".weight"]
        return next(s for p, s in self.text[target.component].values() if p == target.module + ".weight")

    def module(self, target: Target):
        """The torch module holding the base weight (peft's base_layer where an adapter wraps it)."""
        model = self.models[target.component]
        if id(model) not in self._modules:
            self._modules[id(model)] = dict(model.named_modules())
        module = self._modules[id(model)][target.module]
        return module.get_base_layer() if hasattr(module, "get_base_layer") else module

    def weight(self, target: Target) -> torch.Tensor:
        return self.module(target).weight


def _base_shapes(model) -> dict[str, tuple]:
    return {n.replace(".base_layer", ""): tuple(p.shape) for n, p in model.named_parameters()
            if not any(f".{a}" in n for a in _ADAPTER_PARAMS)}


def _clip_path(param: str) -> str:
    """CLIP parameter path as the clients name it; transformers 5 drops `text_model.` on CLIPTextModel."""
    return param if param.startswith("text_model.") else "text_model." + param


def comfyui_unet_config(config) -> dict:
    """The LDM UNet description ComfyUI's `unet_to_diffusers` takes (comfy/model_detection.py builds
    it from a checkpoint; here from the diffusers config): res blocks per level, transformer depth per
    input block, per output block (popped from the end, deepest first) and in the middle."""
    levels = len(config.block_out_channels)
    lpb = config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError(f"per-block layers_per_block {lpb!r} has no single LDM numbering")
    depth = config.transformer_layers_per_block
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    down = [depth[x] if "CrossAttn" in config.down_block_types[x] else 0 for x in range(levels) for _ in range(lpb)]
    up_depth = list(reversed(depth))
    up = [up_depth[x] if "CrossAttn" in config.up_block_types[x] else 0 for x in range(levels) for _ in range(lpb + 1)]
    mid = depth[-1] if "CrossAttn" in (config.mid_block_type or "") else 0
    return {"num_res_blocks": [lpb] * levels, "channel_mult": [1] * levels, "transformer_depth": down,
            "transformer_depth_output": list(reversed(up)), "transformer_depth_middle": mid}


_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
           "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_ATTENTION = ("proj_in", "proj_out", "norm")
_TRANSFORMER = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_BASIC = {"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
          "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}


def comfyui_unet_to_diffusers(cfg: dict) -> dict[str, str]:
    """diffusers parameter name -> LDM parameter name, by the rule of ComfyUI's comfy/utils.py
    `unet_to_diffusers`: input block n = 1 + (res + 1) * level + i (slot 0 the ResBlock, slot 1 the
    SpatialTransformer), its downsampler the block after; middle block 0/2 ResBlocks, 1 the transformer;
    output block n = (res + 1) * level + i, the upsampler in the slot after the block's last layer."""
    out: dict[str, str] = {}

    def module(diffusers: str, ldm: str, names) -> None:
        for name in names:
            d, l = (name if isinstance(name, tuple) else (name, name))
            for p in ("weight", "bias"):
                out[f"{diffusers}.{d}.{p}"] = f"{ldm}.{l}.{p}"

    def attention(diffusers: str, ldm: str, depth: int) -> None:
        module(diffusers, ldm, _ATTENTION)
        for t in range(depth):
            module(f"{diffusers}.transformer_blocks.{t}", f"{ldm}.transformer_blocks.{t}", _TRANSFORMER)

    resnet = [(d, l) for l, d in _RESNET.items()]
    res, down, up = cfg["num_res_blocks"], list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    for x in range(len(res)):
        n = 1 + (res[x] + 1) * x
        for i in range(res[x]):
            module(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0", resnet)
            depth = down.pop(0)
            if depth:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depth)
            n += 1
        module(f"down_blocks.{x}.downsamplers.0", f"input_blocks.{n}.0", [("conv", "op")])
    attention("mid_block.attentions.0", "middle_block.1", cfg["transformer_depth_middle"])
    for i, n in enumerate((0, 2)):
        module(f"mid_block.resnets.{i}", f"middle_block.{n}", resnet)
    for x, blocks in enumerate(reversed(res)):
        n = (blocks + 1) * x
        for i in range(blocks + 1):
            module(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0", resnet)
            slot = 1
            depth = up.pop()
            if depth:
                slot += 1
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth)
            if i == blocks:
                module(f"up_blocks.{x}.upsamplers.0", f"output_blocks.{n}.{slot}", ["conv"])
            n += 1
    for d, l in _BASIC.items():
        module(d, l, [("", "")])
    return {k.replace("..", "."): v.replace("..", ".") for k, v in out.items()}


# ============================================================================ key rules

_CLIP_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


def _weights(shapes) -> list[str]:
    return [k[: -len(".weight")] for k in shapes if k.endswith(".weight")]


def comfyui_key_map(layout: Layout) -> dict[str, Target]:
    """File module name -> weight, by comfy/lora.py `model_lora_keys_unet` (`lora_unet_` + the LDM
    name with '.' -> '_', and `lora_unet_` + the diffusers name through `unet_to_diffusers`) and
    `model_lora_keys_clip` (`lora_te_` / `lora_te1_` for CLIP-L, `lora_te2_` for SDXL's CLIP-G, over
    LORA_CLIP_MAP: the attention projections and the MLP)."""
    keys = {}
    for diffusers, ldm in layout.ldm.items():
        if ldm.endswith(".weight"):
            target = Target("unet", diffusers[: -len(".weight")])
            keys["lora_unet_" + ldm[: -len(".weight")].replace(".", "_")] = target
            keys["lora_unet_" + target.module.replace(".", "_")] = target
    for index, (component, params) in enumerate(layout.text.items()):
        prefixes = ("lora_te2_",) if index == 1 else ("lora_te_", "lora_te1_")
        for clip, (param, _) in params.items():
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.weight", clip)
            if m and m.group(2) in _CLIP_MODULES:
                for prefix in prefixes:
                    keys[f"{prefix}text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"] = \
                        Target(component, param[: -len(".weight")])
    return keys


def a1111_layer_mapping(layout: Layout) -> dict[str, Target | tuple]:
    """AUTOMATIC1111's `network_layer_mapping` (networks.py `assign_network_names_to_compvis_modules`):
    every module of the original checkpoint's model, '.' -> '_': `diffusion_model_input_blocks_1_1_...`,
    CLIP-L `transformer_text_model_...` (SD 1.x) or `0_transformer_text_model_...` (SDXL); OpenCLIP
    text towers in OpenCLIP's layout, SD 2.x's ViT-H as `model_transformer_resblocks_N_...` (the
    cond_stage_model's wrapped module) and SDXL's ViT-G as `1_model_transformer_resblocks_N_...` (the
    second embedder), each `{attn, attn_out_proj, mlp_c_fc, mlp_c_proj}`, whose q/k/v live in one
    MultiheadAttention (value: ('mha', component, layer))."""
    mapping: dict[str, Target | tuple] = {}
    for diffusers, ldm in layout.ldm.items():
        if ldm.endswith(".weight"):
            mapping["diffusion_model_" + ldm[: -len(".weight")].replace(".", "_")] = Target("unet", diffusers[:-7])
    for index, (component, params) in enumerate(layout.text.items()):
        for clip, (param, _) in params.items():
            if not clip.endswith(".weight"):
                continue
            target = Target(component, param[:-7])
            if index == 0 and not layout.v2:
                prefix = "0_transformer_" if layout.sdxl else "transformer_"
                mapping[prefix + clip[:-7].replace(".", "_")] = target
                continue
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.weight", clip)
            if not m:
                continue
            root = "1_model_transformer_resblocks" if index == 1 else "model_transformer_resblocks"
            open_clip = {"self_attn.out_proj": "attn_out_proj", "mlp.fc1": "mlp_c_fc", "mlp.fc2": "mlp_c_proj"}
            if m.group(2) in open_clip:
                mapping[f"{root}_{m.group(1)}_{open_clip[m.group(2)]}"] = target
            elif m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                mapping[f"{root}_{m.group(1)}_attn"] = ("mha", component, m.group(1))
    return mapping


_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _open_clip_part(part: str) -> str:
    return part.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")


def a1111_convert_name(key: str, is_sd2: bool = False) -> str:
    """networks.py `convert_diffusers_name_to_compvis(key, is_sd2)` (SD 1.x numbering, two layers per
    block): a diffusers-layout kohya name -> the original model's module name; other names pass
    unchanged. With `is_sd2` (load_network: the model's mapping has `model_transformer_resblocks`, an
    OpenCLIP text tower), `lora_te_` names go to OpenCLIP's layout as SDXL's `lora_te2_` ones do."""
    if is_sd2:
        m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
        if m:
            return f"model_transformer_resblocks_{m[1]}_{_open_clip_part(m[2])}"
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[0]) * 2 - 2}{m[1]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: (
            f"diffusion_model_input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_"
            f"{_A1111_RESNET.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}")),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m: (
            f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_"
            f"{_A1111_RESNET.get(m[2], m[2]) if m[0] == 'resnets' else m[2]}")),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: (
            f"diffusion_model_output_blocks_{int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_"
            f"{_A1111_RESNET.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}")),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[0]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"1_model_transformer_resblocks_{m[0]}_{_open_clip_part(m[1])}"),
    ]
    for pattern, convert in rules:
        m = re.match(pattern, key)
        if m:
            return convert(m.groups())
    return key


def a1111_is_sd2(mapping: dict) -> bool:
    """load_network's `is_sd2`: the model's mapping names OpenCLIP's `model_transformer_resblocks` (its
    own entry for the ModuleList; here, where only weights are mapped, any name under it)."""
    return any(k.startswith("model_transformer_resblocks") for k in mapping)


def a1111_lookup(key: str, mapping: dict, is_sd2: bool | None = None) -> tuple[str, object | None]:
    """networks.py `load_network`'s search for a file module name: the converted name, then without a
    trailing `_q_proj`/`_k_proj`/`_v_proj` (re_x_proj), then `lora_unet` -> `diffusion_model` (SDXL files
    already carry original names), `lora_te1_text_model` -> `0_transformer_text_model` /
    `transformer_text_model`. Returns (module key, mapping value or None)."""
    name = a1111_convert_name(key, a1111_is_sd2(mapping) if is_sd2 is None else is_sd2)
    hit = mapping.get(name)
    if hit is None:
        m = re.match(r"(.*)_([qkv]_proj)$", name)
        if m and isinstance(mapping.get(m.group(1)), tuple):
            return name, mapping[m.group(1)] + (m.group(2)[0],)
    if hit is None and "lora_unet" in key:
        name = key.replace("lora_unet", "diffusion_model")
        hit = mapping.get(name)
    elif hit is None and "lora_te1_text_model" in key:
        name = key.replace("lora_te1_text_model", "0_transformer_text_model")
        hit = mapping.get(name)
        if hit is None:
            name = key.replace("lora_te1_text_model", "transformer_text_model")
            hit = mapping.get(name)
    return name, hit


_KOHYA_UNET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
# kohya lists CLIPAttention and CLIPMLP; transformers' SDPA attention class is the same layer.
_KOHYA_TEXT_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_module_names(layout: Layout) -> dict[str, Target]:
    """networks/lora.py `LoRANetwork.create_modules`: `lora_unet` / `lora_te` (SDXL: `lora_te1`,
    `lora_te2`) + '.' + the path of a Linear or Conv2d inside a Transformer2DModel (and, for LoCon,
    ResnetBlock2D / Downsample2D / Upsample2D), '.' -> '_'. kohya's SD 1.x UNet uses diffusers' module
    paths; its SDXL UNet (library/sdxl_original_unet.py) the original ones."""
    names = {}
    unet = layout.models["unet"]
    for name, module in unet.named_modules():
        if type(module).__name__ not in _KOHYA_UNET_CLASSES:
            continue
        for child, layer in module.named_modules():
            path = f"{name}.{child}".replace(".base_layer", "")  # through peft's wrapper, if any
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and path + ".weight" in layout.ldm:
                kohya = layout.ldm[path + ".weight"][:-7] if layout.sdxl else path
                names["lora_unet_" + kohya.replace(".", "_")] = Target("unet", path)
    for index, component in enumerate(layout.text, start=1):
        prefix = f"lora_te{index}_" if layout.sdxl else "lora_te_"
        for name, module in layout.models[component].named_modules():
            if type(module).__name__ not in _KOHYA_TEXT_CLASSES:
                continue
            for child, layer in module.named_modules():
                path = f"{name}.{child}".replace(".base_layer", "")
                if isinstance(layer, torch.nn.Linear) and path + ".weight" in {p for p, _ in layout.text[component].values()}:
                    names[prefix + _clip_path(path).replace(".", "_")] = Target(component, path)
    return names


# ============================================================================ weight rules
# Each rule: (module params from the file, base weight W, strength) -> the weight the client uses.

def _group(state: dict, names) -> dict[str, dict[str, torch.Tensor]]:
    """File keys per module name (the part before the first '.'), for module names the client knows."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        if name in names:
            groups.setdefault(name, {})[part] = value
    return groups


def comfyui_weight(params: dict, weight: torch.Tensor, strength: float = 1.0) -> tuple[torch.Tensor, set[str]]:
    """comfy/lora.py `load_lora` + weight_adapter `calculate_weight`: LoRA `up @ down * alpha / rank`
    (rank = lora_down's rows), LoHa `(w1_a w1_b) * (w2_a w2_b) * alpha / rank`, LoKr `kron(w1, w2)`
    scaled by alpha / rank only where a factor is low-rank, `.diff` added as it is; with `dora_scale`,
    base.py `weight_decompose`. Returns the new weight and the parameter names it read."""
    alpha = float(params["alpha"]) if "alpha" in params else None  # read before any move to the meta device
    p = {k: v.to(weight.device, torch.float32) for k, v in params.items()}
    dora = p.get("dora_scale")
    W = weight.to(torch.float32)
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        diff = (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
        scale, used = (alpha / down.shape[0] if alpha is not None else 1.0), {"lora_up.weight", "lora_down.weight"}
    elif "hada_w1_a" in p:
        diff = ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(W.shape)
        scale, used = (alpha / p["hada_w1_b"].shape[0] if alpha is not None else 1.0), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    elif any(k.startswith("lokr_") for k in p):
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else (p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1, w2).reshape(W.shape)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        used = {k for k in p if k.startswith("lokr_")}
    elif "diff" in p:
        if p["diff"].shape != W.shape:
            raise ValueError(f"diff {tuple(p['diff'].shape)} for weight {tuple(W.shape)}")
        return (W + strength * p["diff"]).to(weight.dtype), {"diff"}
    else:
        raise KeyError("no LoRA, LoHa, LoKr or diff weights")
    used |= {k for k in ("alpha", "dora_scale") if k in p}
    if dora is None:
        return (W + strength * scale * diff).to(weight.dtype), used
    return comfyui_weight_decompose(dora, W, diff * scale, strength).to(weight.dtype), used


def comfyui_weight_decompose(dora_scale, W, diff, strength: float = 1.0) -> torch.Tensor:
    """comfy/weight_adapter/base.py `weight_decompose` (current): W' = (W + ΔW) * dora_scale / norm,
    where a dora_scale of the output's length is divided by the per-output-row norm of W (the base
    weight, not W + ΔW), and any other by the per-input-column norm of W + ΔW (the form before the
    axis was detected); eps added; strength interpolates between W and W'."""
    merged = W + diff
    if dora_scale.shape[0] == W.shape[0]:
        norm = W.reshape(W.shape[0], -1).norm(dim=1, keepdim=True).reshape(W.shape[0], *[1] * (W.dim() - 1))
    else:
        norm = _column_norm(merged)
    merged = merged * (dora_scale / (norm + torch.finfo(W.dtype).eps))
    return W + strength * (merged - W)


def _column_norm(w: torch.Tensor) -> torch.Tensor:
    """Norm of each input column over outputs (and kernel positions): shape (1, in, 1, ...)."""
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True) \
        .reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)


def a1111_weight(params: dict, weight: torch.Tensor, multiplier: float = 1.0,
                 orig: torch.Tensor | None = None) -> tuple[torch.Tensor, set[str]]:
    """The module types of networks.py `load_network`, tried in order (lora, hada, lokr, full), and
    `calc_updown` -> network.py `finalize_updown`: updown reshaped to the weight, DoRA by
    `apply_weight_decompose` (the unscaled up @ down added to W, each input column set to dora_scale,
    minus W), then times `calc_scale()` (alpha / dim, 1 without) and the multiplier.

    `orig` is the weight A1111 passes as the layer's own: for SDXL's OpenCLIP q/k/v, the stacked
    MultiheadAttention in_proj_weight."""
    scalars = {k: float(params[k]) for k in ("alpha", "scale") if k in params}
    p = {k: v.to(weight.device, torch.float32) for k, v in params.items()}
    orig = (weight if orig is None else orig).to(torch.float32)
    dim = None
    if "lora_up.weight" in p and "lora_down.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        shape = [up.shape[0], down.shape[1], *down.shape[2:]]
        updown, dim, used = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape), \
            down.shape[0], {"lora_up.weight", "lora_down.weight"}
    elif all(k in p for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        shape = [p["hada_w1_a"].shape[0], p["hada_w1_b"].shape[1], *p["hada_w1_b"].shape[2:]]
        updown = (p["hada_w1_a"] @ p["hada_w1_b"]).reshape(shape) * (p["hada_w2_a"] @ p["hada_w2_b"]).reshape(shape)
        dim, used = p["hada_w1_b"].shape[0], {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    elif ("lokr_w1" in p or "lokr_w1_a" in p) and ("lokr_w2" in p or "lokr_w2_a" in p):
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else (p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None)
        shape = list(weight.shape) if weight.dim() == 4 else [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        updown = torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2).reshape(shape)
        used = {k for k in p if k.startswith("lokr_")}
    elif "diff" in p:
        updown, shape, used = p["diff"], list(p["diff"].shape), {"diff"}
    else:
        raise KeyError("no module type accepts these keys")
    if len(shape) == 4:
        updown = updown.reshape(shape)
    if orig.numel() == updown.numel():
        updown = updown.reshape(orig.shape)
    if "dora_scale" in p:
        merged = updown + orig
        updown = merged * (p["dora_scale"] / _column_norm(merged)) - orig
        used.add("dora_scale")
    scale = scalars["scale"] if "scale" in scalars else (scalars["alpha"] / dim if dim and "alpha" in scalars else 1.0)
    used |= {k for k in ("alpha", "scale") if k in p}
    new = weight.to(torch.float32) + updown * scale * multiplier  # `self.weight += updown`: shapes must agree
    return new.to(weight.dtype), used


def kohya_weight(params: dict, weight: torch.Tensor, multiplier: float = 1.0) -> tuple[torch.Tensor, set[str]]:
    """networks/lora.py `LoRAInfModule.merge_to`: W + multiplier * up @ down * alpha / dim (a 3x3
    convolution through conv2d of the two factors, the same product); alpha defaults to dim. Only
    lora_down / lora_up / alpha are parameters of its modules: anything else is left unread."""
    up, down = (params[k].to(weight.device, torch.float32) for k in ("lora_up.weight", "lora_down.weight"))
    dim = down.shape[0]
    alpha = float(params["alpha"]) if "alpha" in params else dim
    alpha = dim if alpha == 0 else alpha
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    used = {"lora_up.weight", "lora_down.weight"} | ({"alpha"} if "alpha" in params else set())
    return (weight.float() + multiplier * delta * alpha / dim).to(weight.dtype), used


# ============================================================================ applying a client to a file

@dataclass
class _Applied:
    weights: dict[Target, torch.Tensor]  # new weights
    read: set[str]  # file keys used for a weight of the right shape
    unread: list[str]  # with why


def apply_comfyui(state: dict, layout: Layout, sink: Callable | None = None) -> _Applied:
    keys = comfyui_key_map(layout)
    return _apply(state, layout, _group(state, keys),
                  lambda name, params: [(keys[name], comfyui_weight(params, layout.weight(keys[name])))], sink)


def apply_kohya(state: dict, layout: Layout, sink: Callable | None = None) -> _Applied:
    names = kohya_module_names(layout)
    groups = {n: g for n, g in _group(state, names).items() if "lora_down.weight" in g}  # modules_dim
    return _apply(state, layout, groups,
                  lambda name, params: [(names[name], kohya_weight(params, layout.weight(names[name])))], sink)


def apply_a1111(state: dict, layout: Layout, sink: Callable | None = None) -> _Applied:
    mapping = a1111_layer_mapping(layout)
    is_sd2 = a1111_is_sd2(mapping)
    hits = {name: a1111_lookup(name, mapping, is_sd2) for name in {k.partition(".")[0] for k in state}}
    groups = _group(state, {n for n, (_, hit) in hits.items() if hit is not None})
    # networks.py `network_apply_weights`: a MultiheadAttention (an OpenCLIP tower) takes its q/k/v and
    # out_proj updates together, only when the file has all four; out_proj alone is never applied there.
    attn = {}
    for name, (key, hit) in hits.items():
        layer = re.match(r"((?:1_)?model_transformer_resblocks_\d+_attn)(_[qkv]_proj|_out_proj)$", key) if hit else None
        if layer:
            attn.setdefault(layer.group(1), set()).add(layer.group(2))
    complete = {layer for layer, parts in attn.items() if len(parts) == 4}

    def rule(name, params):
        key, hit = hits[name]
        layer = re.match(r"((?:1_)?model_transformer_resblocks_\d+_attn)(_[qkv]_proj|_out_proj)$", key)
        if layer and layer.group(1) not in complete:
            raise KeyError("a MultiheadAttention needs q, k, v and out_proj updates together")
        if isinstance(hit, Target):
            return [(hit, a1111_weight(params, layout.weight(hit)))]
        _, component, layer, which = hit  # OpenCLIP MultiheadAttention: the updown of one of q/k/v
        parts = [Target(component, f"{_text_root(layout, component)}encoder.layers.{layer}.self_attn.{c}_proj") for c in "qkv"]
        stacked = torch.cat([layout.weight(t) for t in parts])
        target = parts["qkv".index(which)]
        return [(target, a1111_weight(params, layout.weight(target), orig=stacked))]
    return _apply(state, layout, groups, rule, sink)


def _text_root(layout: Layout, component: str) -> str:
    first = next(iter(layout.text[component].values()))[0]
    return "text_model." if first.startswith("text_model.") else ""


def _apply(state: dict, layout: Layout, groups: dict, rule: Callable, sink: Callable | None = None) -> _Applied:
    """Run a client's weight rule on each module it found; a module whose weights fail (a shape the
    client cannot put on that layer) has all its keys counted as not read, as the client skips it.
    With `sink`, each new weight goes to sink(target, weight) as it is made instead of being kept (a
    file that patches most of the model, checked one layer at a time)."""
    applied = _Applied({}, set(), [])
    for name, params in groups.items():
        try:
            for target, (new, used) in rule(name, params):
                if tuple(new.shape) != tuple(layout.weight(target).shape):  # a broadcast, not the layer's shape
                    raise ValueError(f"made {tuple(new.shape)} for a {tuple(layout.weight(target).shape)} weight")
                if sink is not None:
                    sink(target, new)
                else:
                    applied.weights[target] = new if new.is_meta else new.to("cpu")  # off the GPU until swapped in
                applied.read |= {f"{name}.{u}" for u in used}
        except (RuntimeError, ValueError, KeyError, IndexError) as exc:  # the client would log and skip it
            applied.unread.append(f"{name} ({exc.__class__.__name__}: {str(exc).splitlines()[0][:80]})")
    applied.unread += sorted(k for k in state if k not in applied.read and k.partition(".")[0] not in
                             {u.split(" ")[0] for u in applied.unread})
    return applied


CLIENTS = {
    COMFYUI: (apply_comfyui, "comfy/utils.py unet_to_diffusers; comfy/lora.py model_lora_keys_unet, "
                             "model_lora_keys_clip, load_lora; comfy/weight_adapter calculate_weight, weight_decompose"),
    A1111: (apply_a1111, "extensions-builtin/Lora networks.py convert_diffusers_name_to_compvis, load_network; "
                         "network.py finalize_updown, apply_weight_decompose; network_lora/hada/lokr/full.py"),
    KOHYA: (apply_kohya, "networks/lora.py LoRANetwork.create_modules, create_network_from_weights, LoRAInfModule.merge_to"),
}


def check_file(state: dict, layout: Layout, client: str, compare: bool = True, recommended: bool = True,
               note: str = "", expected: Callable[[Target, torch.Tensor], torch.Tensor] | None = None) -> ClientCheck:
    """One client's rules applied to a file's tensors: keys read and landing on a weight of the right
    shape; with `compare` (a live model), the UNet's (and text encoders') output with the client's
    weights against the studio's adapted model, relative to the adapter's change.

    With `expected(target, base_weight)` (the weight the studio makes of that layer), the comparison is
    per layer instead, one at a time (no copy of the model is held): each weight the client makes
    against the studio's, relative to what the file changes in that layer; equal weights give equal
    outputs. For files that patch most of the model, such as a LoRA extracted from a full fine-tune."""
    apply, rule = CLIENTS[client]
    worst = [0.0, 0.0, 0.0, 0.0]  # relative, absolute, change, scale

    def against_expected(target: Target, new: torch.Tensor) -> None:
        base = layout.weight(target).detach()
        want = expected(target, base).float()
        diff = float((new.detach().float().to(want.device) - want).abs().max())
        change = float((want - base.float().to(want.device)).abs().max())
        relative = diff / change if change > 0 else (0.0 if diff == 0 else float("inf"))
        worst[:] = max(worst, [relative, diff, change, float(want.abs().max())])

    applied = apply(state, layout, against_expected if expected is not None else None)
    check = ClientCheck(client, rule, matched=len(applied.read), total=len(state), unmatched=applied.unread[:8],
                        recommended=recommended, note=note)
    if expected is not None and applied.read:
        check.max_rel_diff, check.max_abs_diff, check.change, check.scale = worst
    elif compare and applied.weights:
        check.max_rel_diff, check.max_abs_diff, check.change, check.scale = compare_outputs(layout, applied.weights)
    check.exact = (check.matched == check.total and check.max_rel_diff is not None
                   and (check.max_rel_diff <= TOLERANCE or check.max_abs_diff <= ROUNDING * check.scale))
    return check


# ============================================================================ outputs

@torch.no_grad()
def compare_outputs(layout: Layout, weights: dict[Target, torch.Tensor]) -> tuple[float, float, float, float]:
    """(relative, absolute difference, change, output size) of the worst part, relative = max |client - studio| /
    max |studio - base|, over the UNet's output on one fixed input and each
    text encoder's output on one prompt's token ids, worst part first. The studio's output is the
    model with its adapters on; the client's and the base's with them off, the client's with its
    weights put in place of the base ones (and put back after)."""
    worst = (0.0, 0.0, 0.0, 0.0)
    for component, model in layout.models.items():
        if not any(t.component == component for t in weights) and component != "unet":
            continue
        run = _runner(component, model)
        if component not in layout.reference:  # the studio's and the base's outputs, once per layout
            with _adapters_off(model):
                base = run()
            layout.reference[component] = (run(), base)
        studio, base = layout.reference[component]
        with _adapters_off(model):
            with _swapped(layout, {t: w for t, w in weights.items() if t.component == component}):
                client = run()
        change = (studio - base).abs().max().item()
        diff = (client - studio).abs().max().item()
        relative = diff / change if change > 0 else (0.0 if diff == 0 else float("inf"))
        worst = max(worst, (relative, diff, change, studio.abs().max().item()))
    return worst


def _runner(component: str, model) -> Callable[[], torch.Tensor]:
    from studio.adapters.lora import _fixed_unet_input

    device = next(model.parameters()).device
    if component == "unet":
        inputs = _fixed_unet_input(model)
        dtype = model.dtype
        cast = lambda v: v.to(device, dtype) if v.is_floating_point() else v  # noqa: E731
        inputs = {k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v)) for k, v in inputs.items()}
        return lambda: _eval(model, **inputs).sample.float()
    ids = torch.arange(1, 17, device=device).clamp(max=model.config.vocab_size - 1)[None]
    return lambda: _eval(model, ids)[0].float()


def _eval(model, *args, **kwargs):
    was = model.training
    model.eval()
    try:
        return model(*args, **kwargs)
    finally:
        model.train(was)


@contextmanager
def _adapters_off(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, off in zip(layers, before):
            m.enable_adapters(not off)


@contextmanager
def _swapped(layout: Layout, weights: dict[Target, torch.Tensor]):
    """The client's weights in place of the base ones for the duration; the base ones wait on the CPU
    (a GPU holds one set at a time) and come back bit-identical."""
    kept = {}
    try:
        for target, new in weights.items():
            param = layout.weight(target)
            kept[target] = (param.data.to("cpu"), param.device)
            param.data = new.to(param.device, param.dtype)
        yield
    finally:
        for target, (data, device) in kept.items():
            layout.weight(target).data = data.to(device)


def meta_layout(unet_config: dict, text_configs: list[tuple[str, object]] = ()) -> Layout:
    """A Layout of a model built on the meta device from configs (names and shapes only, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        encoders = [(name, build()) for name, build in text_configs]
    return Layout(unet, encoders)


def client_checks(state: dict, layout: Layout, recommended: dict[str, bool], notes: dict[str, str] | None = None,
                  compare: bool = True, expected: Callable | None = None) -> list[dict]:
    """Every client's check of one file, as the dicts `export_check.yaml` stores.

    Args:
        recommended: client -> whether the studio tells users to load this file there; a client
            missing from it is not checked.
        notes: client -> one sentence shown with its check (why not recommended, what to use instead).
        expected: check_file's per-layer comparison.
    """
    from dataclasses import asdict

    notes = notes or {}
    return [asdict(check_file(state, layout, client, compare=compare, recommended=recommended[client],
                              note=notes.get(client, ""), expected=expected))
            for client in CLIENTS if client in recommended]


def summary(check: dict) -> str:
    """One line per client check, e.g. 'ComfyUI: 333/333 keys, output as the studio's (rel. diff 2.5e-06)'."""
    line = f"{check['client']}: {check['matched']}/{check['total']} keys"
    if check["max_rel_diff"] is not None:
        state = "as the studio's" if check["exact"] else "differs"
        line += f", output {state} (rel. diff {check['max_rel_diff']:.1e})"
    if not check["recommended"]:
        line += " (not the file for this client)"
    return line + (f"; {check['note']}" if check["note"] else "")


# ============================================================================ embeddings

def embedding_checks(state: dict, file_name: str, token: str, rows: dict[str, torch.Tensor]) -> list[dict]:
    """How AUTOMATIC1111 and ComfyUI read a textual-inversion file.

    AUTOMATIC1111 (modules/textual_inversion/textual_inversion.py `create_embedding_from_data`): the
    trigger word is the file name without its extension; the vectors are `string_to_param['*']`,
    `emb_params`, or for SDXL `clip_l` and `clip_g`. ComfyUI (comfy/sd1_clip.py `load_embed`): the
    prompt says `embedding:NAME`, NAME being the file name in models/embeddings; it reads the same
    keys (SDXL: the encoder's own `clip_l` / `clip_g`). Both put the vectors in place of the token.

    Args:
        rows: encoder key ('clip_l', 'clip_g', or '' for an SD 1.x file) -> the studio's trained row(s).
    """
    from dataclasses import asdict

    stem = file_name.rsplit(".", 1)[0]
    checks = []
    for client, rule, trigger in ((A1111, "modules/textual_inversion/textual_inversion.py create_embedding_from_data",
                                   stem), (COMFYUI, "comfy/sd1_clip.py load_embed", f"embedding:{stem}")):
        found = {}
        for key, row in rows.items():
            vector = state.get(key) if key else (state.get("emb_params") if "emb_params" in state
                                                else state.get("string_to_param.*"))
            found[key] = vector is not None and tuple(vector.reshape(-1, row.shape[-1]).shape) == \
                tuple(row.reshape(-1, row.shape[-1]).shape) and torch.equal(vector.reshape(-1).float(), row.reshape(-1).float())
        matched = sum(found.values())
        check = ClientCheck(client, rule, matched=matched, total=len(rows), recommended=True,
                            note=f"trigger: '{trigger}'" + ("" if stem == token else f", not the trained token '{token}'"))
        check.unmatched = [k or "emb_params" for k, ok in found.items() if not ok]
        check.max_rel_diff = 0.0 if matched == len(rows) else None
        check.exact = matched == len(rows) and stem == token
        checks.append(asdict(check))
    return checks
