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

Written by `export` for other tools (none of them reads diffusers' Custom Diffusion file):
- `custom_diffusion_diff.safetensors`: each trained K/V weight as a full weight difference W1 - W0
  under `lora_unet_<module>.diff`, which ComfyUI (comfy/lora.py `load_lora`: a "diff" patch, weight +=
  strength * diff) and AUTOMATIC1111 (extensions-builtin/Lora/network_full.py) load as a LoRA file;
  its strength there is the studio's scale (W0 + s (W1 - W0)).
- `embeddings_a1111/<token>.safetensors`: the modifier token as an AUTOMATIC1111 embedding
  ({"emb_params": (1, dim)}; SDXL {"clip_l", "clip_g"}), the file name being the word to type.

Strength: `set_scale` interpolates the K/V weights in place, W = W0 + s (W1 - W0), so 0 gives the base
model's K/V exactly and 1 the trained ones; the Playground's slider calls it (no reload). The tokens stay
loaded while the adapter is; the Playground's side-by-side base image unloads everything.
"""

from __future__ import annotations

import json
from pathlib import Path

from studio.adapters import embedding
from studio.adapters.base import Capabilities, Setup
from studio.errors import StudioError
from studio.paths import staging, swap_into_place

KINDS = ("custom",)
WEIGHTS = "custom_kv.safetensors"
# Scaled by its own set_scale: W = W0 + s (W1 - W0), in place; the new rows learn, so captions are encoded
# every step; no weight decay, which would move the frozen vocabulary rows (see embedding.py).
CAPABILITIES = {"custom": Capabilities("own", trains_text=True, adds_tokens=True, weights_file=WEIGHTS,
                                       weight_decay=0.0)}
SETTINGS = {"custom": embedding.Settings}  # the first concept's initializer word
EMBEDDINGS = "embeddings"


def kv_weights(unet) -> dict:
    """{module path of the weight: parameter} of every cross-attention key and value projection."""
    return {f"{name}.{proj}.weight": getattr(module, proj).weight
            for name, module in unet.named_modules() if name.endswith("attn2") for proj in ("to_k", "to_v")}


def _concepts(setup: Setup) -> list[tuple[str, str]]:
    """(token, initializer word) per concept: the dataset's (its initializer word as set), then each extra
    dataset's (its class word's last word)."""
    first, *rest = setup.concepts
    return [(first.token, setup.settings.initializer(first.class_word))] + \
        [(c.token, c.class_word.split()[-1]) for c in rest]


def attach(pipe, setup: Setup) -> None:
    from studio.adapters.lora import freeze

    freeze(pipe)  # then only K/V and the new rows train
    keep_base_kv(pipe.unet)
    for weight in kv_weights(pipe.unet).values():
        weight.requires_grad_(True)
    concepts = _concepts(setup)
    for tokenizer, encoder in embedding._pairs(pipe):
        encoder._studio_tokens = embedding.add_tokens(tokenizer, encoder, concepts)


def keep_base_kv(unet) -> None:
    """Keep the base K/V as loaded (a resumed run attaches before restoring): the export writes W1 - W0.
    On SD 1.5 ~19 M values, 77 MB in float32, kept on the CPU (a model on the meta device: there)."""
    unet._studio_kv_init = {k: (w.detach() if w.is_meta else w.detach().to("cpu")).float().clone()
                            for k, w in kv_weights(unet).items()}


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


DIFF_WEIGHTS = "custom_diffusion_diff.safetensors"
DIFF_LOADER = "ComfyUI / A1111 full-weight diff rule (W + strength x diff)"
A1111_EMBEDDINGS = "embeddings_a1111"


def export(adapter_dir: Path, pipe) -> list:
    """The diffusers-format file, the `.diff` LoRA file and the A1111 embeddings, each read back and
    compared with the studio's trained model (none of the checks copies the UNet)."""
    from safetensors.torch import save_file

    adapter_dir = Path(adapter_dir)
    save_file(diffusers_state_dict(pipe.unet), str(adapter_dir / DIFFUSERS_WEIGHTS))
    reports = [check_diffusers_file(adapter_dir / DIFFUSERS_WEIGHTS, pipe)]
    diff = diff_state_dict(pipe.unet)
    save_file(diff, str(adapter_dir / DIFF_WEIGHTS))
    reports.append(check_diff_file(adapter_dir / DIFF_WEIGHTS, pipe))
    reports[-1].clients = diff_client_checks(diff, pipe)
    (adapter_dir / A1111_EMBEDDINGS).mkdir(exist_ok=True)
    for index in range(len(pipe.text_encoder._studio_tokens)):
        token, contents = _embedding_file(pipe, index)
        if len(contents) == 1:  # SD 1.x/2.x: {token: vector} -> A1111's {"emb_params": (vectors, dim)}
            contents = {"emb_params": contents[token].unsqueeze(0)}
        file = adapter_dir / A1111_EMBEDDINGS / f"{token}.safetensors"
        save_file(contents, str(file))
        reports.append(check_a1111_embedding(file, pipe, index))
    return reports


def base_kv(unet) -> dict:
    """The base model's K/V weights {key: W0}, as loaded before training (kept by attach)."""
    base = getattr(unet, "_studio_kv_init", None)
    if base is None:
        raise StudioError("The base model's K/V weights were not kept, so no .diff file can be written; "
                          "export from the training run that attached the adapter.")
    return base


def diff_state_dict(unet) -> dict:
    """{"lora_unet_<module>.diff": W1 - W0} for every cross-attention K and V (float32, CPU). Module
    names as the studio's kohya LoRA files use (lora.kohya_module_name: diffusers layout on SD 1.x/2.x,
    LDM layout on SDXL)."""
    from studio.adapters.lora import kohya_module_name

    base = base_kv(unet)
    out = {}
    for key, weight in kv_weights(unet).items():
        module = key.removesuffix(".weight")
        weight = weight.detach() if weight.is_meta else weight.detach().to("cpu")
        out[f"{kohya_module_name(module, unet)}.diff"] = (weight.float() - base[key]).contiguous()
    return out


def diff_client_checks(state: dict, pipe) -> list[dict]:
    """The `.diff` file through ComfyUI's and AUTOMATIC1111's own rules (studio.adapters.clients): keys
    read onto a weight of the right shape, and the UNet's output with each client's weights (base K/V +
    diff, strength 1) against the trained model's, relative to what training changed in it. kohya's
    networks/lora.py reads lora_down/lora_up only, so its check shows what it would skip.

    The base K/V are in place while the clients' weights are made (a client patches the base model) and
    the trained ones come back afterwards, bit for bit."""
    import torch

    from studio.adapters import clients
    from studio.adapters.lora import client_layout

    layout = client_layout(pipe)
    run = clients._runner("unet", pipe.unet)
    kv, base = kv_weights(pipe.unet), base_kv(pipe.unet)
    trained = {key: weight.data for key, weight in kv.items()}
    with torch.no_grad():
        studio = run()
        try:
            for key, weight in kv.items():
                weight.data = base[key].to(weight.device, weight.dtype)
            layout.reference["unet"] = (studio, run())  # (the trained model's output, the base model's)
            note = {clients.KOHYA: "networks/lora.py reads lora_down/lora_up only; kohya's tools have no "
                                   "reader for full weight differences (use the diffusers files there)"}
            return clients.client_checks(state, layout, {clients.COMFYUI: True, clients.A1111: True,
                                                         clients.KOHYA: False}, note)
        finally:
            for key, weight in kv.items():
                weight.data = trained[key]


def client_module_names(unet) -> dict[str, str]:
    """{kohya module name: UNet module path} for every Linear/Conv2d of the UNet, by the clients' rule:
    ComfyUI's comfy/lora.py `model_lora_keys_unet` names each weight "lora_unet_" + its diffusers path
    with '.' -> '_' (SD 1.x/2.x; comfy/utils.py `unet_to_diffusers` gives the path) or its LDM path
    (SDXL, `input_blocks_4_1_...`); AUTOMATIC1111's Lora extension (networks.py
    `convert_diffusers_name_to_compvis`) reads the same diffusers names."""
    import torch

    from studio.adapters.lora import ldm_module_name

    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    names = {}
    for path, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            try:
                name = ldm_module_name(path, unet.config) if sdxl else path
            except ValueError:
                continue
            names["lora_unet_" + name.replace(".", "_")] = path
    return names


def check_diff_file(path: Path, pipe):
    """Apply the `.diff` file by the clients' rule to the base K/V (strength 1) and compare each patched
    layer's output with the studio's trained layer on a random input (float32).

    Keys: each must name a real UNet weight of the same shape (ComfyUI skips a diff whose shape differs
    from the weight's; A1111 fails); every trained K/V needs one.
    """
    import torch
    from safetensors.torch import load_file

    from studio.adapters import probe
    from studio.adapters.checks import ExportReport

    report = ExportReport(Path(path).name, "lora-diff", DIFF_LOADER)
    unet = pipe.unet
    file = load_file(str(path))
    names, layers, base = client_module_names(unet), dict(unet.named_modules()), base_kv(unet)
    trained = {key.removesuffix(".weight") for key in kv_weights(unet)}
    placed, pairs = set(), []
    for key, diff in file.items():
        stem, _, part = key.partition(".")
        module = names.get(stem)
        layer = layers.get(module) if module else None
        if part != "diff" or layer is None or tuple(layer.weight.shape) != tuple(diff.shape):
            report.unexpected_keys.append(key)
            continue
        if module not in trained:  # a diff for a layer Custom Diffusion never trains
            report.unexpected_keys.append(key)
            continue
        placed.add(module)
        patched = base[f"{module}.weight"] + 1.0 * diff.float()  # W0 + strength * diff, strength 1
        bias = layer.bias
        pairs.append((stem, layer, lambda x, w=patched, b=bias: torch.nn.functional.linear(
            x, w.to(x.device), None if b is None else b.float()), [layer]))
    report.missing_keys = sorted(f"{_client_name(m, names)}.diff" for m in trained - placed)
    report.max_abs_diff, _ = probe.max_output_diff(pairs) if pairs else (None, {})
    return report


def _client_name(module: str, names: dict[str, str]) -> str:
    return next((n for n, m in names.items() if m == module), module)


def check_a1111_embedding(path: Path, pipe, index: int):
    """The A1111 file read by A1111's rule (textual_inversion.py: a one-tensor dict is the embedding,
    SDXL's holds clip_l and clip_g) against the trained row(s) of the index-th token."""
    from safetensors.torch import load_file

    from studio.adapters.checks import ExportReport

    report = ExportReport(f"{A1111_EMBEDDINGS}/{Path(path).name}", "a1111-embedding",
                          "A1111 textual_inversion rule (one-tensor dict; SDXL clip_l / clip_g)")
    data = load_file(str(path))
    token, want = _embedding_file(pipe, index)
    if Path(path).stem != token:
        report.note = f"the file name must be the token '{token}' (A1111 takes the word from it)."
        return report
    if len(want) == 1:
        if len(data) != 1:
            report.unexpected_keys = sorted(data)
            return report
        (vectors,) = data.values()
        report.max_abs_diff = float((vectors.reshape(-1) - want[token]).abs().max())
        return report
    report.missing_keys = sorted(set(want) - set(data))
    report.unexpected_keys = sorted(set(data) - set(want))
    if not report.missing_keys and not report.unexpected_keys:
        report.max_abs_diff = max(float((data[k] - want[k]).abs().max()) for k in want)
    return report


def check_diffusers_file(path: Path, pipe):
    """Load `path` with diffusers' own loader onto the studio's UNet and compare every cross-attention
    layer's output under the loaded processor with its output under the studio's, on random inputs.

    No copy of the UNet: diffusers' Custom Diffusion processors hold their own K/V layers (to_k/
    to_v_custom_diffusion, read from the file), and the UNet's processors are restored afterwards.
    """
    import torch

    from studio.adapters import probe
    from studio.adapters.checks import ExportReport

    report = ExportReport(path.name, "diffusers-custom-diffusion", DIFFUSERS_LOADER)
    unet = pipe.unet
    saved = unet.attn_processors
    try:  # `_pipeline`: without it this diffusers version loads the file but never installs the processors
        unet.load_attn_procs(str(path.parent), weight_name=path.name, _pipeline=pipe)
        loaded = unet.attn_processors
    except (ValueError, KeyError, RuntimeError) as exc:
        report.note = f"the loader refused it ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]})."
        unet.set_attn_processor(dict(saved))  # it pops what it sets
        return report
    unet.set_attn_processor(dict(saved))  # it pops what it sets
    layers = dict(unet.named_modules())
    pairs = []
    for key in kv_weights(unet):
        if not key.endswith("to_k.weight"):
            continue
        module = key.removesuffix(".to_k.weight")
        attn, processor = layers[module], loaded.get(f"{module}.processor")
        if not hasattr(processor, "to_k_custom_diffusion"):
            report.missing_keys.append(f"{module}.processor.to_k_custom_diffusion.weight")
            continue
        pairs.append((module, _attention_with(attn, saved[f"{module}.processor"]), _attention_with(attn, processor),
                      [attn, processor], _attention_input(attn)))
    report.max_abs_diff, _ = probe.max_output_diff(pairs) if pairs else (None, {})
    return report


def _attention_with(attn, processor):
    """attn(hidden states, text states) computed with `processor`, the attention's own put back after."""
    def forward(inputs):
        own = attn.processor
        attn.set_processor(processor)  # set_processor: a Module processor is a registered child
        try:
            return attn(inputs[0], encoder_hidden_states=inputs[1])
        finally:
            attn.set_processor(own)
    return forward


def _attention_input(attn):
    """Random (hidden states (1, 6, query dim), text states (1, 5, cross-attention dim)) for `attn`."""
    import torch

    def make(g):
        device = attn.to_q.weight.device
        return (torch.randn(1, 6, attn.to_q.in_features, generator=g).to(device),
                torch.randn(1, 5, attn.to_k.in_features, generator=g).to(device))
    return make


# ---------------------------------------------------------------------------- taking a run home

def client_files(kind: str, folder: Path, name: str, token: str) -> list[tuple]:
    """The K/V difference (a LoRA-folder file) and the trained token's embedding, named after it."""
    from studio.adapters.base import existing

    folder = Path(folder)
    return existing([(folder / DIFF_WEIGHTS, f"{name}.safetensors", "lora"),
                     (folder / A1111_EMBEDDINGS / f"{token}.safetensors", f"{token}.safetensors", "embedding")])


def diffusers_code(kind: str, folder: Path, token: str, base: str, scale: float, prompt: str) -> str:
    from studio.adapters.base import pipeline_code

    return pipeline_code(base, f"# the run's files are in {folder}", prompt)
