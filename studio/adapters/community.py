"""LoRAs and embeddings from other tools, read from one `.safetensors` file and put on a loaded pipeline.

Formats read (the key rules each follows, and where they are written down):

- kohya LoRA / LoCon (kohya-ss/sd-scripts `networks/lora.py`): `lora_unet_<module>` and
  `lora_te_<module>` (SD 1.x/2.x) or `lora_te1_` / `lora_te2_` (SDXL), the module path with '.' -> '_',
  then `.lora_down.weight` (rank x in [x kh x kw]), `.lora_up.weight` (out x rank [x 1 x 1]) and `.alpha`;
  the update is up @ down * alpha / rank. UNet module paths are diffusers' (kohya's SD 1.x UNet) or the
  original LDM ones (`input_blocks_4_1_...`, SDXL and most other trainers); both are looked up, as
  ComfyUI's `comfy/lora.py` `model_lora_keys_unet` does.
- LyCORIS LoHa / LoKr (KohakuBlueleaf/LyCORIS `lycoris/modules/loha.py`, `lokr.py`): the same module
  names with `hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b` (dW = (w1_a w1_b) * (w2_a w2_b) * alpha / rank)
  or `lokr_w1 | lokr_w1_a, lokr_w1_b` and `lokr_w2 | lokr_w2_a, lokr_w2_b` (dW = kron(W1, W2) * alpha / rank,
  scale 1 when neither factor is low-rank). `dora_scale` (out x 1 ...) is DoRA's magnitude on any of them.
- diffusers (`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`, the older
  `.lora.down.weight` / `_lora.up.weight`, `.alpha`) and peft (`base_model.model.<module>.lora_A.weight`,
  bare `<module>.hada_w1_a` as the studio's own LoHa files).
- AUTOMATIC1111 embeddings (`modules/textual_inversion/textual_inversion.py`): `emb_params` (vectors x dim)
  or `string_to_param` (`*`), SDXL's `clip_l` + `clip_g`, diffusers' `{token: vector}`. The prompt word is
  the file's name, as in AUTOMATIC1111.

Every module's update, whatever its algorithm, is rewritten exactly as a product B @ A (LoHa: a
Khatri-Rao product of its factors; LoKr: the Kronecker product of each factor's own factorisation), so one
peft LoRA adapter carries the whole file. Its strength then changes in place like the studio's own LoRAs
(`studio.adapters.set_scales`), and it stacks with them. Keys that match no layer of the base model, or whose
shapes differ from it, are counted and reported, never dropped in silence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from studio.adapters.base import Capabilities
from studio.errors import StudioError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
EXAMPLES = 3  # keys named in a report
# UNet / text-encoder prefixes of kohya names -> the pipeline component.
KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
               "lora_te2_": "text_encoder_2"}
DIFFUSERS_PARTS = ("unet", "text_encoder", "text_encoder_2")
# A parameter suffix -> the name used below. Longest first, so '.lora_down.weight' wins over '.weight'.
PARAMS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
          ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
          "_lora.down.weight": "down", "_lora.up.weight": "up", ".lora_magnitude_vector": "dora",
          ".lora_magnitude_vector.weight": "dora", ".dora_scale": "dora", ".alpha": "alpha",
          **{f".{p}": p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                  "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                  "lokr_t2", "diff", "diff_b", "on_input", "scale")}}
_SUFFIXES = sorted(PARAMS, key=len, reverse=True)
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sd": "SD 1.x/2.x", "sdxl": "SDXL"}
CROSS_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # text width the UNet's cross-attention reads


@dataclass
class FileReport:
    """What was read from a file and what of it reached the model."""

    file: str
    format: str  # "kohya LoRA", "LyCORIS LoHa", "AUTOMATIC1111 embedding", ...
    kind: str  # "lora", "dora" or "embedding"
    layers: dict[str, int] = field(default_factory=dict)  # component -> adapted layers
    unmatched: list[str] = field(default_factory=list)  # keys that name no layer of the base model
    unfit: list[str] = field(default_factory=list)  # keys of a known layer whose shapes differ from it
    unsupported: list[str] = field(default_factory=list)  # keys of a form the studio does not apply
    tokens: list[str] = field(default_factory=list)  # embeddings: the prompt word (and its extra vectors)

    @property
    def skipped(self) -> list[str]:
        return self.unmatched + self.unfit + self.unsupported

    def summary(self) -> str:
        """One line for the Playground: what loaded, and every key that did not, counted with examples."""
        if self.kind == "embedding":
            text = (f"{self.file}: {self.format}, {len(self.tokens)} vector(s); write '{self.tokens[0]}' "
                    "in the prompt.")
        else:
            parts = ", ".join(f"{n} layers of the {PART_LABELS.get(p, p)}" for p, n in self.layers.items())
            text = f"{self.file}: {self.format}{' with DoRA magnitudes' if self.kind == 'dora' else ''}, {parts}."
        return " ".join([text, *self.problems()])

    def problems(self) -> list[str]:
        out = []
        for keys, what in ((self.unmatched, "match no layer of this base model"),
                           (self.unfit, "have shapes that differ from this base model's layers"),
                           (self.unsupported, "are of a kind the studio does not apply (Tucker/CP factors, "
                                              "full weight or bias differences)")):
            if keys:
                out.append(f"{len(keys)} key(s) {what} and were not applied, e.g. {', '.join(keys[:EXAMPLES])}.")
        return out


PART_LABELS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


# ------------------------------------------------------------------------------------------- reading

def read_file(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a `.safetensors` file; a pickle or a damaged file is one sentence."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise StudioError(f"'{path}' is not a file; give the path of a .safetensors LoRA or embedding.")
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(path):
        raise StudioError(f"'{path.name}' is a pickle file, which the studio never opens because loading it can "
                          "run any code; use the .safetensors version of it (model sites offer one for most files).")
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            metadata = json.loads(handle.read(size)).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StudioError(f"'{path.name}' is not a readable .safetensors file ({str(exc)[:80]}); download it "
                          "again, it may be truncated.") from None
    if not tensors:
        raise StudioError(f"'{path.name}' holds no tensors; it is not a LoRA or an embedding.")
    return tensors, metadata


def _looks_like_pickle(path: Path) -> bool:
    """Torch pickles are zip files (PK) or start with the pickle protocol byte 0x80."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def is_embedding(tensors: dict) -> bool:
    keys = set(tensors)
    if keys & {"emb_params", "clip_l", "clip_g"} or any(k.startswith("string_to_param") for k in keys):
        return True
    # diffusers' format: one {token: vector(s)} entry whose name is not a module path
    return len(keys) == 1 and "." not in next(iter(keys)) and next(iter(tensors.values())).dim() <= 2


# ------------------------------------------------------------------------------------------- layers

def layer_index(pipe) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, str], object]]:
    """Every Linear/Conv2d layer of the pipeline's UNet and text encoders, by the names files use.

    Returns (flat, layers): `flat` maps kohya-style names (`lora_unet_down_blocks_0_..._to_q`, the LDM
    `lora_unet_input_blocks_1_1_..._to_q`, `lora_te_text_model_encoder_layers_0_self_attn_q_proj`) to
    (component, module path); `layers` maps (component, module path) to the layer (its base layer where
    an adapter already wraps it).
    """
    from studio.adapters.lora import ldm_module_name

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    flat, layers = {}, {}
    for part in DIFFUSERS_PARTS:
        model = getattr(pipe, part, None)
        if model is None:
            continue
        for path, layer in _plain_layers(model):
            layers[(part, path)] = layer
            if part == "unet":
                names = [path]
                try:
                    names.append(ldm_module_name(path, model.config))
                except (ValueError, KeyError, IndexError):
                    pass
                prefixes = ["lora_unet_"]
            else:
                names = [path if path.startswith("text_model.") else "text_model." + path]
                prefixes = ["lora_te2_"] if part == "text_encoder_2" else (["lora_te1_"] if sdxl else ["lora_te_"])
            for prefix in prefixes:
                for name in names:
                    flat.setdefault(prefix + name.replace(".", "_"), (part, path))
    return flat, layers


def _plain_layers(model):
    """(path, layer) of each Linear/Conv2d, seen through any adapter wrapper already on it."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    inside = None
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside):
            continue
        inside = None
        if isinstance(module, BaseTunerLayer):
            inside = path + "."
            module = module.get_base_layer()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            yield path, module


def _split(key: str) -> tuple[str, str | None]:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], PARAMS[suffix]
    return key, None


def _locate(stem: str, flat: dict, layers: dict) -> tuple[str, str] | None:
    """(component, module path) of one key's module part, in any of the naming rules above."""
    if stem.startswith("lora_"):
        return flat.get(stem)
    stem = stem.replace(".processor.", ".").removeprefix("base_model.model.")
    for part in DIFFUSERS_PARTS:
        if stem.startswith(part + "."):
            path = stem[len(part) + 1:]
            if part != "unet" and (part, path) not in layers:
                path = path.removeprefix("text_model.")
            path = re.sub(r"\.to_out$", ".to_out.0", path)  # the old attention-processor names
            return (part, path) if (part, path) in layers else None
    for part in DIFFUSERS_PARTS:  # peft: a bare module path of one model
        for path in (stem, stem.removeprefix("text_model.")):
            if (part, path) in layers:
                return part, path
    return None


# --------------------------------------------------------------------------------------- conversion

def _factors(params: dict, layer, default_scale: float = 1.0):
    """(B, A) with B @ A = the module's weight update, flattened to (out, in * kh * kw); None if the
    parameters are of a form not handled (Tucker/CP cores, full differences). `default_scale` is
    alpha / rank for a LoRA module that stores no alpha (diffusers and peft keep it in metadata)."""
    import torch

    p = {k: v.float() for k, v in params.items() if k not in ("alpha", "dora")}
    alpha = params.get("alpha")
    out = layer.weight.shape[0]
    flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
    if set(p) == {"down", "up"}:
        rank = p["down"].shape[0]
        scale = float(alpha) / rank if alpha is not None else default_scale
        return flat(p["up"]) * scale, flat(p["down"])
    if set(p) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        w1a, w1b, w2a, w2b = p["hada_w1_a"], flat(p["hada_w1_b"]), p["hada_w2_a"], flat(p["hada_w2_b"])
        scale = float(alpha) / w1b.shape[0] if alpha is not None else 1.0
        # (w1a w1b) * (w2a w2b) = (row-wise Kronecker of w1a, w2a) @ (column-wise Kronecker of w1b, w2b)
        b = (w1a[:, :, None] * w2a[:, None, :]).reshape(out, -1)
        a = (w1b[:, None, :] * w2b[None, :, :]).reshape(b.shape[1], -1)
        return b * scale, a
    if {k for k in p if k.startswith("lokr_")} == set(p) and "lokr_t2" not in p:
        factors = []
        for i in (1, 2):
            if f"lokr_w{i}" in p:
                w = flat(p[f"lokr_w{i}"])  # full factor: W = W @ I or I @ W, whichever rank is smaller
                eye = torch.eye(min(w.shape))
                factors.append((w, torch.eye(w.shape[1])) if w.shape[0] >= w.shape[1] else (eye, w))
            elif f"lokr_w{i}_a" in p and f"lokr_w{i}_b" in p:
                factors.append((p[f"lokr_w{i}_a"], flat(p[f"lokr_w{i}_b"])))
            else:
                return None
        low_rank = [p[f"lokr_w{i}_b"].shape[0] for i in (1, 2) if f"lokr_w{i}_b" in p]
        scale = float(alpha) / low_rank[0] if alpha is not None and low_rank else 1.0
        (u1, v1), (u2, v2) = factors
        return torch.kron(u1, u2) * scale, torch.kron(v1, v2)
    return None


def _magnitude(dora, layer):
    """DoRA's magnitude (one value per output channel, kohya/LyCORIS shape (out, 1, ...)), or None."""
    if dora is not None and dora.numel() == layer.weight.shape[0]:
        return dora.float().reshape(-1)
    return None


@dataclass
class _Update:
    part: str
    path: str
    b: object
    a: object
    magnitude: object = None


def plan(tensors: dict, pipe, file: str, configs: dict | None = None) -> tuple[list[_Update], FileReport]:
    """The updates a LoRA/LyCORIS file makes to `pipe`'s layers, and its report (nothing loaded yet).

    `configs`: component -> peft LoraConfig fields (r, lora_alpha, rank_pattern, alpha_pattern) for files
    that keep alpha outside their tensors (see `stored_configs`)."""
    flat, layers = layer_index(pipe)
    groups: dict[tuple[str, str], dict] = {}
    keys_of: dict[tuple[str, str], list[str]] = {}
    report = FileReport(file, _format_name(tensors), "lora")
    for key, value in tensors.items():
        stem, param = _split(key)
        where = _locate(stem, flat, layers) if param else None
        if where is None:
            report.unmatched.append(key)
            continue
        groups.setdefault(where, {})[param] = value
        keys_of.setdefault(where, []).append(key)
    updates = []
    for where, params in groups.items():
        layer = layers[where]
        factors = _factors(params, layer, _stored_scale((configs or {}).get(where[0]), where[1]))
        if factors is None:
            report.unsupported += keys_of[where]
            continue
        b, a = factors
        if b.shape[0] != layer.weight.shape[0] or a.shape[1] != layer.weight[0].numel():
            report.unfit += keys_of[where]
            continue
        magnitude = _magnitude(params.get("dora"), layer)
        if params.get("dora") is not None and magnitude is None:
            report.unfit += [k for k in keys_of[where] if _split(k)[1] == "dora"]
        updates.append(_Update(*where, b, a, magnitude))
        report.layers[where[0]] = report.layers.get(where[0], 0) + 1
    if any(u.magnitude is not None for u in updates):
        report.kind = "dora"
    return updates, report


def stored_configs(metadata: dict, path: Path) -> dict:
    """LoRA settings kept beside the tensors: diffusers' `lora_adapter_metadata` (keys `unet.r`,
    `unet.lora_alpha`, ...; written by `save_lora_weights`) or peft's `adapter_config.json` next to the file."""
    configs: dict[str, dict] = {}
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        packed = {}
    for key, value in packed.items():
        part, _, name = key.partition(".")
        configs.setdefault(part, {})[name] = value
    beside = Path(path).with_name("adapter_config.json")
    if not configs and beside.is_file():
        try:
            configs["unet"] = json.loads(beside.read_text(encoding="utf-8"))
        except ValueError:
            pass
    return configs


def _stored_scale(config: dict | None, path: str) -> float:
    if not config or "r" not in config:
        return 1.0
    rank = next((r for k, r in (config.get("rank_pattern") or {}).items() if path.endswith(k)), config["r"])
    alpha = next((a for k, a in (config.get("alpha_pattern") or {}).items() if path.endswith(k)),
                 config.get("lora_alpha", rank))
    return float(alpha) / float(rank)


def _format_name(tensors: dict) -> str:
    keys = list(tensors)
    if any(".hada_" in k for k in keys):
        algo = "LyCORIS LoHa"
    elif any(".lokr_" in k for k in keys):
        algo = "LyCORIS LoKr"
    else:
        algo = "LoRA"
    if any(k.startswith("lora_") for k in keys):
        return f"kohya {algo}" if algo == "LoRA" else algo
    if any(k.startswith("base_model.model.") for k in keys):
        return f"peft {algo}"
    return f"diffusers {algo}"


# ---------------------------------------------------------------------------------------- families

def file_family(tensors: dict) -> str | None:
    """'sdxl', 'sd1', 'sd2', 'sd' (1.x or 2.x) or None (cannot tell), from the file's keys and shapes."""
    keys = list(tensors)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    for key, value in tensors.items():  # what the cross-attention's key projection reads
        stem, param = _split(key)
        if re.search(r"attn2[._]to_k$", stem) and param in ("down", "hada_w1_b") and value.dim() == 2:
            if value.shape[1] in CROSS_DIMS:
                return CROSS_DIMS[value.shape[1]]
    if any(k.startswith("lora_te_") for k in keys):
        return "sd"
    return None


def embedding_family(tensors: dict) -> str | None:
    if {"clip_l", "clip_g"} <= set(tensors):
        return "sdxl"
    dims = {v.shape[-1] for v in tensors.values()}
    return {768: "sd1", 1024: "sd2"}.get(dims.pop()) if len(dims) == 1 else None


def base_family(pipe) -> str | None:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return CROSS_DIMS.get(getattr(pipe.unet.config, "cross_attention_dim", None), "sd")


def check_family(name: str, what: str, file: str | None, base: str | None) -> None:
    """One sentence when the file is made for another model family than the base model."""
    if file is None or base is None:
        return
    coarse = lambda f: "sdxl" if f == "sdxl" else "sd"  # noqa: E731
    if coarse(file) == coarse(base) and (file == "sd" or base == "sd" or file == base):
        return
    raise StudioError(f"'{name}' is {'an' if what[0] in 'aeiouAEIOU' else 'a'} {what} for "
                      f"{FAMILY_LABELS[file]} and the base model is {FAMILY_LABELS[base]}; choose a "
                      f"{FAMILY_LABELS[file]} base model, or a {what} made for {FAMILY_LABELS[base]}.")


# ------------------------------------------------------------------------------------------- loading

class LoadedLora:
    """What the Playground keeps for a loaded LoRA/LyCORIS file: a peft LoRA adapter, scaled by peft."""

    HAS_SCALE = True
    # A file's DoRA magnitude does not scale either: such a file is switched off at 0, as a run's DoRA is.
    caps = Capabilities("peft")

    def __init__(self, report: FileReport):
        self.report = report
        if report.kind == "dora":
            self.caps = Capabilities("peft", zero_is_base=False)

    def unload(self, pipe, _path) -> None:
        """Nothing beyond peft's delete_adapters, which the Playground calls for every peft adapter."""

    def set_scale(self, pipe, _path, scale: float) -> None:
        """Scaled by peft (studio.adapters.set_scales), not here."""


class LoadedEmbedding:
    """A loaded embedding: on or off (no strength), unloaded by its tokens."""

    HAS_SCALE = False
    caps = Capabilities("none")

    def __init__(self, report: FileReport):
        self.report = report

    def set_scale(self, pipe, _path, scale: float) -> None:
        """No strength: on at any scale but 0 (the Playground unloads it at 0)."""

    def unload(self, pipe, _path) -> None:
        for tokenizer, encoder in _text_pairs(pipe):
            present = [t for t in self.report.tokens if t in tokenizer.get_vocab()]
            if present:
                pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)


def load(pipe, path: Path, name: str):
    """Load the file at `path` into `pipe` under adapter `name`; returns LoadedLora or LoadedEmbedding.

    Raises StudioError (one sentence) for a pickle, a damaged file, a file for another model family, or
    a file none of whose keys fits the base model.
    """
    path = Path(path)
    tensors, metadata = read_file(path)
    if is_embedding(tensors):
        return LoadedEmbedding(load_embedding(pipe, path.name, tensors))
    check_family(path.name, "LoRA", file_family(tensors), base_family(pipe))
    updates, report = plan(tensors, pipe, path.name, stored_configs(metadata, path))
    if not updates:
        problems = " ".join(report.problems()).rstrip(".")
        raise StudioError(f"No key of '{path.name}' fits a layer of this base model ({problems}); it is not a LoRA, "
                          "LyCORIS or embedding file for this model.")
    inject(pipe, updates, name)
    return LoadedLora(report)


def inject(pipe, updates: list[_Update], name: str) -> None:
    """One peft LoRA adapter per component holding these exact updates (alpha = rank: scale 1 is the file's)."""
    import torch
    from peft import LoraConfig

    dora = any(u.magnitude is not None for u in updates)
    for part in DIFFUSERS_PARTS:
        mine = [u for u in updates if u.part == part]
        if not mine:
            continue
        model = getattr(pipe, part)
        ranks = [u.a.shape[0] for u in mine]
        common = max(set(ranks), key=ranks.count)
        # rank_pattern keys are regular expressions matched against module paths: only the exceptions.
        pattern = {re.escape(u.path): u.a.shape[0] for u in mine if u.a.shape[0] != common}
        config = LoraConfig(r=common, lora_alpha=common, target_modules=[u.path for u in mine],
                            rank_pattern=pattern, alpha_pattern=dict(pattern), use_dora=dora, lora_dropout=0.0,
                            init_lora_weights=False)
        model.add_adapter(config, adapter_name=name)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for u in mine:
                layer = modules[u.path]
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                a.copy_(u.a.reshape(a.shape).to(a))
                b.copy_(u.b.reshape(b.shape).to(b))
                if dora:
                    _set_magnitude(layer, name, u)
        model.eval()


def _set_magnitude(layer, name: str, update: _Update) -> None:
    """The file's DoRA magnitude; a layer of a DoRA file that has none keeps ||W + dW|| per output row,
    which gives its plain update at scale 1."""
    import torch

    vector = layer.lora_magnitude_vector[name].weight
    magnitude = update.magnitude
    if magnitude is None:
        weight = layer.get_base_layer().weight.float()
        delta = (update.b @ update.a).reshape(weight.shape).to(weight)
        magnitude = (weight + delta).reshape(weight.shape[0], -1).norm(dim=1)
    vector.copy_(magnitude.reshape(vector.shape).to(vector))


def _text_pairs(pipe) -> list:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def embedding_token(file: str) -> str:
    """The prompt word of an embedding file: its name without the extension, as AUTOMATIC1111 uses it."""
    return re.sub(r"\s+", "-", Path(file).stem.strip()) or "embedding"


def embedding_word(path: Path) -> str | None:
    """The prompt word of an embedding file, read from its key names alone; None for any other file."""
    from safetensors import SafetensorError, safe_open

    try:
        if _looks_like_pickle(Path(path)):
            return None
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError):
        return None
    embedding = set(keys) & {"emb_params", "clip_l", "clip_g"} or any(k.startswith("string_to_param") for k in keys) \
        or (len(keys) == 1 and "." not in keys[0])
    return embedding_token(Path(path).name) if embedding else None


def load_embedding(pipe, file: str, tensors: dict) -> FileReport:
    """Add the file's vector(s) as new tokens of the text encoder(s), through diffusers' loader."""
    check_family(file, "embedding", embedding_family(tensors), base_family(pipe))
    token = embedding_token(file)
    pairs = _text_pairs(pipe)
    if len(pairs) == 2:
        vectors = [tensors["clip_l"], tensors["clip_g"]]
    else:
        vectors = [next(v for k, v in tensors.items() if k == "emb_params" or k.startswith("string_to_param")
                        or len(tensors) == 1)]
    report = FileReport(file, "AUTOMATIC1111 embedding" if set(tensors) != {token} else "diffusers embedding",
                        "embedding")
    for (tokenizer, encoder), vector in zip(pairs, vectors):
        vector = vector.reshape(-1, vector.shape[-1])
        width = encoder.get_input_embeddings().weight.shape[1]
        if vector.shape[1] != width:
            raise StudioError(f"'{file}' holds vectors of width {vector.shape[1]} and this base model's text encoder "
                              f"reads {width}; choose the base model the embedding was made for.")
        if token in tokenizer.get_vocab():
            raise StudioError(f"The word '{token}' is already a token of this model (another embedding, or a word "
                              "it knows); rename the file to load it under another word.")
        pipe.load_textual_inversion(vector.to(encoder.dtype), token=token, tokenizer=tokenizer, text_encoder=encoder)
        report.tokens = [token] + [f"{token}_{i}" for i in range(1, vector.shape[0])]
    return report


