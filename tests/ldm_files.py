"""Write a diffusers pipeline as one original-layout (LDM) `.safetensors` checkpoint, independently of the
studio's own writer (studio/adapters/full.py), for tests that load such files through the studio.

The rules are those of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
scripts/convert_diffusers_to_original_sdxl.py: `unet_conversion_map` (top-level layers),
`unet_conversion_map_resnet` (ResNet layer names), `unet_conversion_map_layer` (block numbering:
input block 3*i+j+1 for down block i's j-th layer, output block 3*i+j, the downsampler at input block 3*(i+1),
the upsampler at output block 3*i+2 in slot 1 when that up block has no attention, else slot 2),
`vae_conversion_map` / `vae_conversion_map_attn` (the decoder's levels numbered from the bottom, attention
projections as 1x1 convolutions) and `textenc_conversion_lst` with q/k/v stacked into `in_proj_*` for
OpenCLIP. The scripts hard-code 4 (SD) or 3 (SDXL) levels of 2 layers; here the same rules take the
tiny models' level and layer counts (3 becomes layers+1). The OpenCLIP `text_projection` is stored
transposed, as in Stability's SDXL and SD 2.x files, and an SD 2.x file carries one more OpenCLIP layer
than diffusers' text encoder uses (SD 2.x reads the penultimate layer), as the real files do.
"""

from __future__ import annotations

import re

import torch

UNET_TOP = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
            ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
               ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
TEXTENC = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
           (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"),
           ("ln_final.", "text_model.final_layer_norm."),
           ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
           ("positional_embedding", "text_model.embeddings.position_embedding.weight")]


def _unet_layers(config) -> list[tuple[str, str]]:
    levels, n = len(config.block_out_channels), config.layers_per_block
    down_attn = [t.startswith("CrossAttn") for t in config.down_block_types]
    up_attn = [t.startswith("CrossAttn") for t in config.up_block_types]
    out = []
    for i in range(levels):
        for j in range(n):
            out.append((f"input_blocks.{(n + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                out.append((f"input_blocks.{(n + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(n + 1):
            out.append((f"output_blocks.{(n + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                out.append((f"output_blocks.{(n + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            out.append((f"input_blocks.{(n + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            out.append((f"output_blocks.{(n + 1) * i + n}.{2 if up_attn[i] else 1}.", f"up_blocks.{i}.upsamplers.0."))
    out.append(("middle_block.1.", "mid_block.attentions.0."))
    out += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return out


def _swap_prefix(key: str, table) -> str:
    for ldm, hf in sorted(table, key=lambda pair: -len(pair[1])):  # the longest diffusers prefix wins
        if key.startswith(hf):
            return ldm + key[len(hf):]
    return key


def unet_state_dict(unet_state: dict, config) -> dict:
    out = {}
    layers = _unet_layers(config)
    for key, value in unet_state.items():
        name = _swap_prefix(key, UNET_TOP)
        if name == key:
            name = _swap_prefix(key, layers)
            if "resnets" in key:
                for ldm, hf in UNET_RESNET:
                    name = name.replace(hf, ldm)
        out["model.diffusion_model." + name] = value
    return out


def vae_state_dict(vae_state: dict, config) -> dict:
    levels, n = len(config.block_out_channels), config.layers_per_block
    table = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(levels):
        table += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(n)]
        table += [(f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(n + 1)]
        if i < levels - 1:
            table += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                      (f"up.{levels - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
    for i in range(2):
        table.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    out = {}
    for key, value in vae_state.items():
        name = key
        for ldm, hf in table:  # in the scripts' order: plain substring replacement
            name = name.replace(hf, ldm)
        if "attentions" in key:
            for ldm, hf in VAE_ATTN:
                name = name.replace(hf, ldm)
            if value.dim() == 2:
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + name] = value
    return out


def _with_text_model(state: dict) -> dict:
    """transformers >= 5.6 dropped the `text_model.` level of CLIPTextModel; the files keep it."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def clip_state_dict(encoder, prefix: str) -> dict:
    return {prefix + k: v for k, v in _with_text_model(encoder.state_dict()).items()}


def open_clip_state_dict(encoder, prefix: str, extra_layer: bool = False) -> dict:
    state = _with_text_model(encoder.state_dict())
    pattern = re.compile("|".join(re.escape(hf) for _, hf in TEXTENC))
    names = {hf: ldm for ldm, hf in TEXTENC}
    out, qkv = {}, {}
    for key, value in state.items():
        found = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if found:
            qkv.setdefault((found.group(1), found.group(3)), {})[found.group(2)] = value
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        out[prefix + pattern.sub(lambda m: names[m.group(0)], key)] = value
    for (layer, param), parts in qkv.items():
        name = pattern.sub(lambda m: names[m.group(0)], layer)
        out[f"{prefix}{name}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if extra_layer:  # the real SD 2.x files hold the last OpenCLIP layer too, which SD 2.x does not read
        last = encoder.config.num_hidden_layers - 1
        for key in [k for k in out if f"resblocks.{last}." in k]:
            out[key.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.")] = torch.randn_like(out[key])
        hidden = encoder.config.hidden_size
        out[prefix + "text_projection"] = torch.randn(hidden, hidden)
    return out


def pipeline_state_dict(pipe, family: str) -> dict:
    """The whole pipeline under single-file names: family 'sd1', 'sd2' or 'sdxl'."""
    out = {**unet_state_dict(pipe.unet.state_dict(), pipe.unet.config),
           **vae_state_dict(pipe.vae.state_dict(), pipe.vae.config)}
    if family == "sd1":
        out.update(clip_state_dict(pipe.text_encoder, "cond_stage_model.transformer."))
    elif family == "sd2":
        out.update(open_clip_state_dict(pipe.text_encoder, "cond_stage_model.model.", extra_layer=True))
    else:
        out.update(clip_state_dict(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        out.update(open_clip_state_dict(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    return {k: v.detach().contiguous() for k, v in out.items()}


def write(pipe, family: str, path, dtype=torch.float32, metadata: dict | None = None, drop: tuple = ()) -> dict:
    """Write `pipe` as a single file; `drop`: key prefixes to leave out (e.g. the VAE)."""
    from safetensors.torch import save_file

    state = {k: v.to(dtype) for k, v in pipeline_state_dict(pipe, family).items() if not k.startswith(drop)}
    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    return state
