"""Textual inversion (Gal et al. 2022): a new pseudo-token whose embedding row is all that trains.

The trigger word becomes a token of its own (added to the tokenizer), its row starts from a chosen
word's embedding, and a gradient mask keeps every other row of the vocabulary, and every other
weight, bit-identical (with no weight decay, Adam's update is exactly zero where the gradient is).

Files: `learned_embeds.safetensors` ({token: vector}, diffusers' format) and
`embeddings_a1111/<token>.safetensors` (`emb_params`: (vectors, dim)), which AUTOMATIC1111 and ComfyUI
read. Both take the trigger word from the file name (A1111: the word itself; ComfyUI: `embedding:<token>`),
so that file is named after the trained token.

SDXL: the token is added to both tokenizers and both text encoders, and both rows train. The files are
then SDXL's embedding format, {"clip_l": (1, dim_1), "clip_g": (1, dim_2)}, which AUTOMATIC1111 and
ComfyUI read as it is and diffusers loads with one `load_textual_inversion` call per encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from studio.adapters.base import Capabilities, Setup
from studio.errors import StudioError
from studio.fields import check, setting
from studio.paths import staging, swap_into_place


@dataclass
class Settings:
    initializer_token: str = setting("Textual inversion: the word the new token's embedding starts from; empty takes "
                                     "the class word's last word.", "", label="Initializer word")

    def __post_init__(self) -> None:
        check(self)

    def initializer(self, class_word: str) -> str:
        return (self.initializer_token or class_word.split()[-1]).strip()


KINDS = ("embedding",)
WEIGHTS = "learned_embeds.safetensors"
# On or off (no strength); the text encoder's input changes during training: no cached text embeddings;
# no weight decay, which would move the frozen rows too.
CAPABILITIES = {"embedding": Capabilities("none", trains_text=True, adds_tokens=True, weights_file=WEIGHTS,
                                          weight_decay=0.0)}
SETTINGS = {"embedding": Settings}
A1111_DIR = "embeddings_a1111"  # <token>.safetensors: the file AUTOMATIC1111 and ComfyUI read


def a1111_file(token: str) -> str:
    """The A1111/ComfyUI file's path inside the adapter folder: named after the trigger word."""
    return f"{A1111_DIR}/{token}.safetensors"


SDXL_KEYS = ("clip_l", "clip_g")  # text_encoder, text_encoder_2


def _pairs(pipe) -> list:
    """(tokenizer, text encoder) pairs that get the token: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def attach(pipe, setup: Setup) -> None:
    from studio.adapters.lora import freeze

    concept = setup.concepts[0]
    init = setup.settings.initializer(concept.class_word)
    freeze(pipe)
    for tokenizer, encoder in _pairs(pipe):
        (encoder._studio_token,) = add_tokens(tokenizer, encoder, [(concept.token, init)])


def add_tokens(tokenizer, encoder, concepts: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """Add each (token, initializer word) as a new row of `encoder`, started from the word's row.

    One gradient mask covers every new row, so only they train (one hook per token would multiply
    the masks to a zero gradient). Returns (token, token id) in the order given.
    """
    import torch

    ids = []
    for token, init in concepts:
        init_ids = tokenizer.encode(init, add_special_tokens=False)
        if len(init_ids) != 1:
            raise StudioError(f"The initializer word '{init}' of '{token}' is {len(init_ids)} tokens; choose a word "
                              "that is one token, e.g. 'toy' or 'dog' (setting 'initializer_token', or the class "
                              "word's last word).")
        # A word the tokenizer already has (a special token, or a piece such as 'photo') would take over
        # every caption that uses it; 'sks' is only known as 'sks</w>', so it is free.
        if token in tokenizer.get_vocab() or token in tokenizer.all_special_tokens or not tokenizer.add_tokens(token):
            raise StudioError(f"The trigger word '{token}' is already a token of this model; choose a rare "
                              "made-up word such as 'sks'.")
        ids.append((token, tokenizer.convert_tokens_to_ids(token), init_ids[0]))
    encoder.resize_token_embeddings(len(tokenizer))
    encoder.requires_grad_(False)
    weight = encoder.get_input_embeddings().weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        for _, token_id, init_id in ids:
            weight[token_id] = weight[init_id].clone()
            mask[token_id] = 1
    weight.requires_grad_(True)
    weight._studio_rows = torch.tensor([token_id for _, token_id, _ in ids])  # what checkpoints keep
    weight.register_hook(lambda grad: grad * mask.to(grad.dtype))
    return [(token, token_id) for token, token_id, _ in ids]


def trainable_parameters(pipe) -> list:
    return [encoder.get_input_embeddings().weight for _, encoder in _pairs(pipe)]


def learned(pipe, encoder=None):
    """(token, its trained row) of `encoder` (default: the first text encoder)."""
    encoder = encoder or pipe.text_encoder
    token, token_id = encoder._studio_token
    return token, encoder.get_input_embeddings().weight[token_id].detach().float().cpu().clone()


def file_contents(pipe) -> dict:
    """What WEIGHTS holds: {token: vector} (SD 1.x/2.x) or {"clip_l": (1, d1), "clip_g": (1, d2)} (SDXL)."""
    pairs = _pairs(pipe)
    if len(pairs) == 1:
        return dict([learned(pipe)])
    return {key: learned(pipe, encoder)[1].unsqueeze(0) for key, (_, encoder) in zip(SDXL_KEYS, pairs)}


def save(pipe, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    tmp = staging(Path(out_dir))
    tmp.mkdir(parents=True)
    save_file(file_contents(pipe), str(tmp / WEIGHTS))
    return swap_into_place(tmp, Path(out_dir))


def load_weights(pipe, path: Path, token: str) -> None:
    """diffusers' loader; an SDXL file ({"clip_l", "clip_g"}) is loaded once per encoder, as diffusers documents."""
    from safetensors.torch import load_file

    pairs = _pairs(pipe)
    if len(pairs) == 1:
        pipe.load_textual_inversion(str(path), token=token)
        return
    state = load_file(str(path))
    if set(state) != set(SDXL_KEYS):
        raise ValueError(f"an SDXL embedding file holds {', '.join(SDXL_KEYS)}; this one holds {', '.join(state)}")
    for key, (tokenizer, encoder) in zip(SDXL_KEYS, pairs):
        pipe.load_textual_inversion(state[key], token=token, tokenizer=tokenizer, text_encoder=encoder)


def load_into(pipe, adapter_dir: Path, name: str) -> None:
    from studio.adapters import read_meta

    token = read_meta(adapter_dir).token
    if token in pipe.tokenizer.get_vocab():
        raise StudioError(f"Token '{token}' is already loaded in this model (from another embedding); "
                          "use one embedding per trigger word at a time.")
    load_weights(pipe, Path(adapter_dir) / WEIGHTS, token)


def unload(pipe, adapter_dir: Path) -> None:
    from studio.adapters import read_meta

    token = read_meta(adapter_dir).token
    for tokenizer, encoder in _pairs(pipe):
        pipe.unload_textual_inversion(token, tokenizer=tokenizer, text_encoder=encoder)


def export(adapter_dir: Path, pipe) -> list:
    """The A1111/ComfyUI file (`a1111_file(token)`), then both files read back by diffusers' own loader
    and compared, and the A1111 file read by A1111's and ComfyUI's embedding rules (studio.adapters.clients).

    SDXL: the same {"clip_l", "clip_g"} contents as the native file, under the token's name.
    """
    from safetensors.torch import save_file

    from studio.adapters import clients

    sdxl = len(_pairs(pipe)) > 1
    token, vector = learned(pipe)
    contents = file_contents(pipe) if sdxl else {"emb_params": vector.unsqueeze(0)}
    name = a1111_file(token)
    (Path(adapter_dir) / A1111_DIR).mkdir(exist_ok=True)
    save_file(contents, str(Path(adapter_dir) / name))
    native = _check(adapter_dir, WEIGHTS, "sdxl-embedding" if sdxl else "diffusers-embedding", pipe)
    a1111 = _check(adapter_dir, name, "a1111-embedding", pipe)
    rows = ({key: learned(pipe, encoder)[1] for key, (_, encoder) in zip(SDXL_KEYS, _pairs(pipe))} if sdxl
            else {"": vector})
    a1111.clients = clients.embedding_checks(contents, Path(name).name, token, rows)
    return [native, a1111]


def _check(adapter_dir: Path, file: str, fmt: str, pipe):
    """Load the file into the base model's own tokenizer and text encoder, read fresh from where the
    model came from, through diffusers' loader; compare the encodings of a prompt with the token."""
    import torch

    from studio.adapters.checks import ExportReport

    token, _ = learned(pipe)
    report = ExportReport(file, fmt, "diffusers load_textual_inversion")
    source = pipe.config._name_or_path
    try:
        fresh = _fresh_text_models(source, len(_pairs(pipe)))
    except OSError:
        report.note = f"the base model '{source}' could not be read again to compare with."
        return report
    fresh = [(t, e.to(pipe.text_encoder.device, pipe.text_encoder.dtype)) for t, e in fresh]
    probe = _probe(pipe, fresh)
    try:
        load_weights(probe, Path(adapter_dir) / file, token)
    except (ValueError, KeyError, RuntimeError) as exc:
        report.note = f"the loader refused it ({exc.__class__.__name__}: {str(exc)[:120]})."
        return report
    if any(token not in tokenizer.get_vocab() for tokenizer, _ in fresh):
        report.missing_keys = [token]
        return report
    prompt = f"a photo of {token}"
    with torch.no_grad():
        diffs = [(_encode(*ours, prompt) - _encode(*theirs, prompt)).abs().max().item()
                 for ours, theirs in zip(_pairs(pipe), fresh)]
    report.max_abs_diff = max(diffs)
    return report


def _fresh_text_models(source: str, count: int) -> list:
    """The base model's tokenizer(s) and text encoder(s), read again from where the model came from."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = [("tokenizer", "text_encoder", CLIPTextModel),
             ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection)][:count]
    return [(CLIPTokenizer.from_pretrained(source, subfolder=t),
             cls.from_pretrained(source, subfolder=e, use_safetensors=True)) for t, e, cls in parts]


def _probe(pipe, fresh: list):
    """A pipeline of the same family as `pipe` around fresh text models (for diffusers' loader)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(vae=pipe.vae, unet=pipe.unet, scheduler=pipe.scheduler)
    if len(fresh) == 1:
        return StableDiffusionPipeline(**common, tokenizer=fresh[0][0], text_encoder=fresh[0][1], safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(**common, tokenizer=fresh[0][0], text_encoder=fresh[0][1], tokenizer_2=fresh[1][0],
                                     text_encoder_2=fresh[1][1], add_watermarker=False)


def _encode(tokenizer, encoder, prompt: str):
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(encoder.device)
    return encoder(ids)[0].float()


# ---------------------------------------------------------------------------- taking a run home

def client_files(kind: str, folder: Path, name: str, token: str) -> list[tuple]:
    """The file named after the token (A1111's and ComfyUI's trigger word), else the diffusers one."""
    from studio.adapters.base import existing

    folder = Path(folder)
    a1111 = folder / a1111_file(token)
    return existing([(a1111 if a1111.is_file() else folder / WEIGHTS, f"{token}.safetensors", "embedding")])


def diffusers_code(kind: str, folder: Path, token: str, base: str, scale: float, prompt: str) -> str:
    from studio.adapters.base import pipeline_code

    return pipeline_code(base, load_lines(folder, token), prompt)


def load_lines(folder: Path, token: str) -> str:
    return f'pipe.load_textual_inversion("{folder}/{WEIGHTS}", token="{token}")'
