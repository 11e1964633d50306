"""Custom Diffusion (Kumari et al. 2023): the UNet's cross-attention key/value weights and a new
modifier token per concept are all that train.

K and V of each `attn2` map the text features into the UNet; the paper finds these change most when
a model is fine-tuned on a concept (their Fig. 2), so training only them (~5% of the UNet) learns
the concept while the rest stays the base model. Each concept gets its own new token (the trigger
word of its dataset, its row started from its class word), trained with a gradient mask as in
textual inversion; several concepts train jointly in one run (setting `extra_datasets`), with prior
preservation on each concept's class for the paper's objective.

Files (adapter folder):
- `custom_kv.safetensors`: the trained `attn2.to_k/to_v` weights, keyed by their UNet module path;
  the tokens, in order, are in its metadata ("tokens": JSON list).
- `embeddings/<token>.safetensors`: one embedding file per token, in studio.adapters.embedding's
  format ({token: vector}; SDXL: {"clip_l", "clip_g"}), which diffusers, AUTOMATIC1111 and ComfyUI read.

Strength: `set_scale` interpolates the K/V weights in place, W = W0 + s (W1 - W0), so 0 gives the base
model's K/V exactly and 1 the trained ones; the Playground's slider calls it (no reload). The tokens stay
loaded while the adapter is; the Playground's side-by-side base image unloads everything.
"""

from __future__ import annotations

import json
from pathlib import Path

from studio.adapters import embedding
from studio.errors import StudioError
from studio.paths import staging, swap_into_place

KINDS = ("custom",)
HAS_SCALE = True  # through set_scale: W = W0 + s (W1 - W0), in place; the Playground calls it
TRAINS_TEXT = True  # the new rows learn: captions are encoded every step
# No weight decay: decoupled decay would move the frozen vocabulary rows (see embedding.py).
WEIGHT_DECAY = 0.0
WEIGHTS = "custom_kv.safetensors"
EMBEDDINGS = "embeddings"


def kv_weights(unet) -> dict:
    """{module path of the weight: parameter} of every cross-attention key and value projection."""
    return {f"{name}.{proj}.weight": getattr(module, proj).weight
            for name, module in unet.named_modules() if name.endswith("attn2") for proj in ("to_k", "to_v")}


def _concepts(cfg) -> list[tuple[str, str]]:
    """(token, initializer word) per concept: the dataset's, then each extra dataset's."""
    from studio.data.dataset import load_dataset

    specs = [load_dataset(Path(d)) for d in [cfg.dataset, *cfg.extra_datasets]]
    inits = [(cfg.initializer_token or specs[0].class_word.split()[-1]).strip()]
    inits += [s.class_word.split()[-1] for s in specs[1:]]
    return [(s.token, init) for s, init in zip(specs, inits)]


def attach(pipe, cfg) -> None:
    pipe.unet.requires_grad_(False)
    for weight in kv_weights(pipe.unet).values():
        weight.requires_grad_(True)
    concepts = _concepts(cfg)
    for tokenizer, encoder in embedding._pairs(pipe):
        encoder._studio_tokens = embedding.add_tokens(tokenizer, encoder, concepts)


def trainable_parameters(pipe) -> list:
    return list(kv_weights(pipe.unet).values()) + embedding.trainable_parameters(pipe)


def _embedding_file(pipe, index: int) -> tuple[str, dict]:
    """(token, contents of its embedding file) of the index-th new token, as embedding.file_contents writes."""
    pairs = embedding._pairs(pipe)
    rows = []
    for _, encoder in pairs:
        token, token_id = encoder._studio_tokens[index]
        rows.append(encoder.get_input_embeddings().weight[token_id].detach().float().cpu().clone())
    if len(pairs) == 1:
        return token, {token: rows[0]}
    return token, {key: row.unsqueeze(0) for key, row in zip(embedding.SDXL_KEYS, rows)}


def save(pipe, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    tmp = staging(Path(out_dir))
    (tmp / EMBEDDINGS).mkdir(parents=True)
    tokens = []
    for index in range(len(pipe.text_encoder._studio_tokens)):
        token, contents = _embedding_file(pipe, index)
        save_file(contents, str(tmp / EMBEDDINGS / f"{token}.safetensors"))
        tokens.append(token)
    kv = {key: w.detach().float().cpu().contiguous() for key, w in kv_weights(pipe.unet).items()}
    save_file(kv, str(tmp / WEIGHTS), metadata={"tokens": json.dumps(tokens)})
    return swap_into_place(tmp, Path(out_dir))


def tokens_of(adapter_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / WEIGHTS), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("tokens", "[]"))


# Loaded adapters live on the UNet: `_studio_kv_base` {key: W0} (the base weights, kept while any
# Custom Diffusion adapter is loaded) and `_studio_kv` {adapter folder: [{key: W1}, scale]}. The
# weights are recomputed from these, so adapters stack (W0 + sum of s_i (W_i - W0)) and unloading the
# last one restores W0 bit for bit.
def load_into(pipe, adapter_dir: Path, name: str) -> None:
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    tokens = tokens_of(adapter_dir)
    for token in tokens:
        if token in pipe.tokenizer.get_vocab():
            raise StudioError(f"Token '{token}' is already loaded in this model (from another adapter); "
                              "use one adapter per trigger word at a time.")
    state = load_file(str(adapter_dir / WEIGHTS))
    targets = kv_weights(pipe.unet)
    for key, value in state.items():
        if key not in targets or targets[key].shape != value.shape:
            raise ValueError(f"{key} has no matching weight in this UNet")
    for token in tokens:
        embedding.load_weights(pipe, adapter_dir / EMBEDDINGS / f"{token}.safetensors", token)
    unet = pipe.unet
    if not getattr(unet, "_studio_kv", None):
        unet._studio_kv_base, unet._studio_kv = {k: w.detach().clone() for k, w in targets.items()}, {}
    device, dtype = unet.device, unet.dtype
    unet._studio_kv[str(adapter_dir.resolve())] = [{k: v.to(device, dtype) for k, v in state.items()}, 1.0]
    _apply(unet)


def set_scale(pipe, adapter_dir: Path, scale: float) -> None:
    """Strength of a loaded adapter's K/V weights: 0 is the base model's, 1 the trained ones."""
    pipe.unet._studio_kv[str(Path(adapter_dir).resolve())][1] = float(scale)
    _apply(pipe.unet)


def _apply(unet) -> None:
    import torch

    targets, base = kv_weights(unet), unet._studio_kv_base
    loaded = [(state, scale) for state, scale in unet._studio_kv.values() if scale != 0]
    with torch.no_grad():
        for key, weight in targets.items():
            touching = [(state[key], scale) for state, scale in loaded if key in state]
            if len(touching) == 1 and touching[0][1] == 1.0:
                weight.copy_(touching[0][0])  # the trained weight exactly, not W0 + (W1 - W0)
                continue
            value = base[key].clone()
            for trained, scale in touching:
                value += scale * (trained - base[key])
            weight.copy_(value)


def unload(pipe, adapter_dir: Path) -> None:
    adapter_dir = Path(adapter_dir)
    unet = pipe.unet
    unet._studio_kv.pop(str(adapter_dir.resolve()), None)
    _apply(unet)
    if not unet._studio_kv:
        unet._studio_kv_base = None
    for token in tokens_of(adapter_dir):
        for tokenizer, encoder in embedding._pairs(pipe):
            pipe.unload_textual_inversion(token, tokenizer=tokenizer, text_encoder=encoder)


# diffusers' Custom Diffusion format (its train_custom_diffusion.py, `unet.load_attn_procs`): one entry
# per attention processor, "<module>.processor.to_k_custom_diffusion.weight" / "...to_v..." for the
# trained cross-attention layers, an empty tensor under "<module>.processor" for every other one.
DIFFUSERS_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
DIFFUSERS_LOADER = "diffusers load_attn_procs"


def diffusers_state_dict(unet) -> dict:
    import torch

    kv = kv_weights(unet)
    state = {}
    for processor in unet.attn_processors:  # "<module path>.processor"
        module = processor.removesuffix(".processor")
        if f"{module}.to_k.weight" in kv:
            for proj in ("to_k", "to_v"):
                state[f"{processor}.{proj}_custom_diffusion.weight"] = \
                    kv[f"{module}.{proj}.weight"].detach().to("cpu", torch.float32).contiguous()
        else:
            state[processor] = torch.zeros(0)
    return state


def export(adapter_dir: Path, pipe) -> list:
    """The diffusers-format file, read back by diffusers' loader into the base UNet and compared."""
    from safetensors.torch import save_file

    save_file(diffusers_state_dict(pipe.unet), str(Path(adapter_dir) / DIFFUSERS_WEIGHTS))
    return [check_diffusers_file(Path(adapter_dir) / DIFFUSERS_WEIGHTS, pipe)]


def check_diffusers_file(path: Path, pipe):
    """Load `path` into a fresh copy of the base UNet through diffusers; compare its output with ours."""
    import torch
    from diffusers import UNet2DConditionModel

    from studio.adapters.checks import ExportReport
    from studio.adapters.lora import _fixed_unet_input

    report = ExportReport(path.name, "diffusers-custom-diffusion", DIFFUSERS_LOADER)
    source = pipe.config._name_or_path
    try:
        fresh = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True)
    except OSError:
        report.note = f"the base model '{source}' could not be read again to compare with."
        return report
    fresh = fresh.to(pipe.unet.device, torch.float32).eval()
    try:  # `_pipeline`: without it this diffusers version loads the file but never installs the processors
        fresh.load_attn_procs(str(path.parent), weight_name=path.name, _pipeline=pipe)
    except (ValueError, KeyError, RuntimeError) as exc:
        report.note = f"the loader refused it ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]})."
        return report
    inputs = _fixed_unet_input(fresh)  # with SDXL's pooled text and size conditioning where it takes them
    if pipe.unet.dtype != torch.float32:
        report.note = "the trained UNet is not in full precision here, so outputs were not compared."
        return report
    was_training = pipe.unet.training
    pipe.unet.eval()
    with torch.no_grad():
        report.max_abs_diff = (fresh(**inputs).sample - pipe.unet(**inputs).sample).abs().max().item()
    pipe.unet.train(was_training)
    return report
