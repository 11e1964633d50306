"""Textual inversion (Gal et al. 2022): a new pseudo-token whose embedding row is all that trains.

The trigger word becomes a token of its own (added to the tokenizer), its row starts from a chosen
word's embedding, and a gradient mask keeps every other row of the vocabulary, and every other
weight, bit-identical (with no weight decay, Adam's update is exactly zero where the gradient is).

Files: `learned_embeds.safetensors` ({token: vector}, diffusers' format) and
`learned_embeds_a1111.safetensors` (`emb_params`: (vectors, dim)), which AUTOMATIC1111 and ComfyUI read.
"""

from __future__ import annotations

from pathlib import Path

from studio.errors import StudioError
from studio.paths import staging, swap_into_place

KINDS = ("embedding",)
HAS_SCALE = False
TRAINS_TEXT = True  # the text encoder's input changes during training: no cached text embeddings
WEIGHT_DECAY = 0.0  # decay would move the frozen rows too
WEIGHTS = "learned_embeds.safetensors"
A1111 = "learned_embeds_a1111.safetensors"


def attach(pipe, cfg) -> None:
    import torch

    from studio.data.dataset import load_dataset

    spec = load_dataset(Path(cfg.dataset))
    token, tokenizer, encoder = spec.token, pipe.tokenizer, pipe.text_encoder
    init = (cfg.initializer_token or spec.class_word.split()[-1]).strip()
    init_ids = tokenizer.encode(init, add_special_tokens=False)
    if len(init_ids) != 1:
        raise StudioError(f"The initializer word '{init}' is {len(init_ids)} tokens; choose a word that is one "
                          "token, e.g. 'toy' or 'dog' (setting 'initializer_token').")
    # A word the tokenizer already has (a special token, or a piece such as 'photo') would take over
    # every caption that uses it; 'sks' is only known as 'sks</w>', so it is free.
    if token in tokenizer.get_vocab() or token in tokenizer.all_special_tokens or not tokenizer.add_tokens(token):
        raise StudioError(f"The trigger word '{token}' is already a token of this model; choose a rare "
                          "made-up word such as 'sks'.")
    token_id = tokenizer.convert_tokens_to_ids(token)
    encoder.resize_token_embeddings(len(tokenizer))
    pipe.unet.requires_grad_(False)
    encoder.requires_grad_(False)
    weight = encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = weight[init_ids[0]].clone()
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[token_id] = 1
    weight.register_hook(lambda grad: grad * mask.to(grad.dtype))
    encoder._studio_token = (token, token_id)


def trainable_parameters(pipe) -> list:
    return [pipe.text_encoder.get_input_embeddings().weight]


def learned(pipe):
    token, token_id = pipe.text_encoder._studio_token
    return token, pipe.text_encoder.get_input_embeddings().weight[token_id].detach().float().cpu().clone()


def save(pipe, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    token, vector = learned(pipe)
    tmp = staging(Path(out_dir))
    tmp.mkdir(parents=True)
    save_file({token: vector}, str(tmp / WEIGHTS))
    return swap_into_place(tmp, Path(out_dir))


def load_into(pipe, adapter_dir: Path, name: str) -> None:
    from studio.adapters import read_meta

    token = read_meta(adapter_dir).token
    if token in pipe.tokenizer.get_vocab():
        raise StudioError(f"Token '{token}' is already loaded in this model (from another embedding); "
                          "use one embedding per trigger word at a time.")
    pipe.load_textual_inversion(str(Path(adapter_dir) / WEIGHTS), token=token)


def unload(pipe, adapter_dir: Path) -> None:
    from studio.adapters import read_meta

    pipe.unload_textual_inversion(read_meta(adapter_dir).token)


def export(adapter_dir: Path, pipe) -> list:
    """The A1111 file, then both files read back by diffusers' own loader and compared."""
    from safetensors.torch import save_file

    token, vector = learned(pipe)
    save_file({"emb_params": vector.unsqueeze(0)}, str(Path(adapter_dir) / A1111))
    return [_check(adapter_dir, name, fmt, pipe) for name, fmt in ((WEIGHTS, "diffusers-embedding"),
                                                                   (A1111, "a1111-embedding"))]


def _check(adapter_dir: Path, file: str, fmt: str, pipe):
    """Load the file into the base model's own tokenizer and text encoder, read fresh from where the
    model came from, through diffusers' loader; compare the encodings of a prompt with the token."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from studio.adapters.checks import ExportReport

    token, _ = learned(pipe)
    report = ExportReport(file, fmt, "diffusers load_textual_inversion")
    source = pipe.config._name_or_path
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=True)
    except OSError:
        report.note = f"the base model '{source}' could not be read again to compare with."
        return report
    encoder = encoder.to(pipe.text_encoder.device, pipe.text_encoder.dtype)
    probe = StableDiffusionPipeline(vae=pipe.vae, text_encoder=encoder, tokenizer=tokenizer, unet=pipe.unet,
                                    scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    try:
        probe.load_textual_inversion(str(Path(adapter_dir) / file), token=token)
    except (ValueError, KeyError, RuntimeError) as exc:
        report.note = f"the loader refused it ({exc.__class__.__name__}: {str(exc)[:120]})."
        return report
    if token not in tokenizer.get_vocab():
        report.missing_keys = [token]
        return report
    prompt = f"a photo of {token}"
    with torch.no_grad():
        ours = _encode(pipe.tokenizer, pipe.text_encoder, prompt)
        theirs = _encode(tokenizer, encoder, prompt)
    report.max_abs_diff = (ours - theirs).abs().max().item()
    return report


def _encode(tokenizer, encoder, prompt: str):
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(encoder.device)
    return encoder(ids)[0].float()
