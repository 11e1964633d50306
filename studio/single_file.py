"""Single-file checkpoints: one `.safetensors` file in the original (LDM) layout, as model sites share
community fine-tunes of SD 1.x, SD 2.x and SDXL.

Reading happens in three steps, none of which reaches a model hub:

1. `read_header` reads only the safetensors header (names, shapes, dtypes, offsets, metadata), so a
   pickle, a truncated download or a file of another kind is refused before any weight is read.
2. `family` tells SD 1.x, SD 2.x and SDXL apart from key names and shapes (never the file name), and
   `unet_config` / `vae_config` / `text_config` derive each component's config: the published values
   of the family (assets/single-file/<family>/, the files diffusers would fetch from the hub) with every
   size the file's shapes determine read from the file. Head counts are not stored in a file; they
   follow the family's rule as the original code and ComfyUI apply it (comfy/supported_models.py:
   SD15 `num_heads: 8`; SD 2.x and SDXL 64 channels per head).
3. `load` hands the file and a folder of those configs to diffusers' `from_single_file`, which maps the
   weights; the tokenizers are built from assets/clip-tokenizer (SD 2.x's and SDXL's second tokenizer
   is the same BPE vocabulary with "!" as padding, as in their published tokenizer files).

Which objective an SD 2.x or SDXL file was trained with cannot always be read from its shapes. In order:
a `NAME.yaml` beside the file with `model.params.parameterization: "v"` (AUTOMATIC1111's
modules/sd_models_config.py `find_checkpoint_config_near_filename`), the `modelspec.prediction_type`
metadata kohya's tools write (library/sai_model_spec.py: "epsilon" or "v"), a `v_pred` key
(ComfyUI's comfy/supported_models.py SDXL.model_type), and for SD 2.x ComfyUI's test of the last
output block's norm1 bias (SD20.model_type: standard deviation above 0.09 is v-prediction).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CONFIGS = ASSETS / "single-file"
TOKENIZER_DIR = ASSETS / "clip-tokenizer"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)  # what is taken for a file rather than a hub id
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# Second tokenizer padding per family (SD 2.x has one tokenizer; SDXL's second pads with "!").
PAD_TOKENS = {"sd1": ("<|endoftext|>",), "sd2": ("!",), "sdxl": ("<|endoftext|>", "!")}

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_PREFIXES = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIXES = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
HEAD_CHANNELS = 64  # SD 2.x, SDXL and every CLIP text tower here: 64 channels per attention head
SD1_HEADS = 8
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header size


@dataclass(frozen=True)
class Header:
    """What a safetensors file's header says, read without touching the weights."""

    path: Path
    size: int
    mtime_ns: int
    shapes: dict  # key -> tuple of ints
    dtypes: dict  # key -> safetensors dtype name ("F16", "BF16", "F32", ...)
    metadata: dict

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.shapes)


def _sentence_name(path: Path) -> str:
    return f"'{path.name}'" if path.parent == Path(".") else f"'{path}'"


# ---------------------------------------------------------------------------- the header

_HEADERS: dict[str, tuple[tuple[int, int], Header]] = {}
_HEADERS_LOCK = threading.Lock()


def read_header(path: Path) -> Header:
    """The file's header, or one sentence: a pickle, a damaged or truncated file. Cached per version."""
    path = Path(path)
    name = _sentence_name(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise StudioError(pickle_sentence(path))
    stat = path.stat()
    version = (stat.st_size, stat.st_mtime_ns)
    with _HEADERS_LOCK:
        known = _HEADERS.get(str(path))
    if known is not None and known[0] == version:
        return known[1]
    with open(path, "rb") as handle:
        start = handle.read(8)
        if start[:2] == b"PK" or start[:1] == b"\x80":  # a torch zip archive or a raw pickle stream
            raise StudioError(pickle_sentence(path))
        if len(start) < 8:
            raise StudioError(f"File {name} is empty or cut short ({stat.st_size} bytes); download it again.")
        (length,) = struct.unpack("<Q", start)
        if length > MAX_HEADER:
            raise StudioError(f"File {name} is not a safetensors file (its first bytes are no safetensors header); "
                              "give the .safetensors checkpoint from the model page.")
        raw = handle.read(length)
    if len(raw) < length:
        raise StudioError(_truncated(path, stat.st_size, 8 + length))
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StudioError(f"File {name} is damaged (its safetensors header is not readable); "
                          "download it again.") from None
    metadata = table.pop("__metadata__", None) or {}
    end = max((entry["data_offsets"][1] for entry in table.values()), default=0)
    if 8 + length + end > stat.st_size:
        raise StudioError(_truncated(path, stat.st_size, 8 + length + end))
    header = Header(path, stat.st_size, stat.st_mtime_ns,
                    {k: tuple(v["shape"]) for k, v in table.items()}, {k: v["dtype"] for k, v in table.items()},
                    {str(k): str(v) for k, v in metadata.items()})
    with _HEADERS_LOCK:
        _HEADERS[str(path)] = (version, header)
    return header


def _truncated(path: Path, size: int, expected: int) -> str:
    return (f"File {_sentence_name(path)} is truncated: it has {size / 2**20:.1f} MB of the {expected / 2**20:.1f} MB "
            "its header lists, so the download stopped early; download it again.")


def pickle_sentence(path: Path) -> str:
    return (f"File {_sentence_name(path)} is a pickle checkpoint, which can run code when it is opened, so the studio "
            "never opens it; download the .safetensors version from the model page, or convert it on a machine you "
            "trust (AUTOMATIC1111's Checkpoint Merger with format 'safetensors', or torch's load with "
            "weights_only=True followed by safetensors' save_file).")


# ---------------------------------------------------------------------------- what the file is

_LORA = re.compile(r"(^lora_(unet|te\d?)_)|(\.(lora_down|lora_up|lora_A|lora_B|hada_w\d_[ab]|lokr_w\d(_[ab])?)\.?)")
_EMBEDDING_KEYS = ("emb_params", "string_to_param", "string_to_token", "clip_l", "clip_g", "name", "step")


_FAMILIES: dict[int, tuple[Header, str]] = {}  # id(header) -> (header, family): asked on every Playground change


def family(header: Header) -> str:
    """'sd1', 'sd2' or 'sdxl' from the keys and shapes; one sentence naming the file for anything else."""
    known = _FAMILIES.get(id(header))
    if known is not None and known[0] is header:
        return known[1]
    found = _family(header)
    if len(_FAMILIES) > 64:
        _FAMILIES.clear()
    _FAMILIES[id(header)] = (header, found)
    return found


def _family(header: Header) -> str:
    name = _sentence_name(header.path)
    keys = header.shapes
    if not header.has(UNET) and any(_LORA.search(k) for k in keys):
        raise StudioError(f"File {name} is a LoRA, not a base model; choose a checkpoint as the base model "
                          "and add the LoRA in the Playground.")
    if keys and all(k.split(".")[0] in _EMBEDDING_KEYS for k in keys):
        raise StudioError(f"File {name} is a textual-inversion embedding, not a base model; choose a checkpoint as "
                          "the base model and add the embedding in the Playground.")
    if not header.has(UNET):
        if "encoder.conv_in.weight" in keys or f"{VAE}encoder.conv_in.weight" in keys:
            raise StudioError(f"File {name} is a VAE, not a base model; give it as the VAE (--vae) next to a "
                              "checkpoint.")
        raise _unknown(header)
    conv_in = keys.get(f"{UNET}input_blocks.0.0.weight")
    if conv_in is None:
        raise _unknown(header)
    if conv_in[1] != 4:
        raise StudioError(f"File {name} is an inpainting or image-editing model ({conv_in[1]} input channels, "
                          "not 4); the studio trains text-to-image models, so choose the plain version of it.")
    if f"{OPEN_CLIP_PREFIXES['sdxl']}ln_final.weight" in keys and header.has(CLIP_PREFIXES["sdxl"]):
        return "sdxl"
    if "conditioner.embedders.0.model.ln_final.weight" in keys:
        raise StudioError(f"File {name} is an SDXL refiner, which only finishes images the base model drew; choose "
                          "an SDXL base checkpoint.")
    if f"{OPEN_CLIP_PREFIXES['sd2']}ln_final.weight" in keys:
        return "sd2"
    if header.has(CLIP_PREFIXES["sd1"]):
        return "sd1"
    if not header.has("cond_stage_model.") and not header.has("conditioner."):
        raise StudioError(f"File {name} holds a UNet but no text encoder; choose a complete checkpoint (UNet, "
                          "text encoder and VAE in one file).")
    raise _unknown(header)


def _unknown(header: Header) -> StudioError:
    first = ", ".join(sorted(header.shapes)[:3]) or "no tensors"
    return StudioError(f"File {_sentence_name(header.path)} is not a Stable Diffusion checkpoint the studio knows "
                       f"(keys such as {first}); choose an SD 1.x, SD 2.x or SDXL checkpoint in the original "
                       "single-file layout.")


def has_vae(header: Header) -> bool:
    return f"{VAE}encoder.conv_in.weight" in header.shapes


def describe(header: Header) -> str:
    """What the studio read from the file, e.g. "an SD 1.x checkpoint in fp16 that predicts noise
    (epsilon: the family's default)"."""
    fam = family(header)
    dtypes = sorted({d for k, d in header.dtypes.items() if k.startswith(UNET)})
    precision = "/".join({"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(d, d.lower()) for d in dtypes)
    pred, source = prediction_type(header, fam)
    what = "velocity (v-prediction" if pred == "v_prediction" else "noise (epsilon"
    return f"an {FAMILY_NAMES[fam]} checkpoint in {precision} that predicts {what}: {source})"


# ---------------------------------------------------------------------------- prediction type

def prediction_type(header: Header, fam: str) -> tuple[str, str]:
    """('epsilon' | 'v_prediction', what decided it)."""
    sidecar = header.path.with_suffix(".yaml")
    if sidecar.exists():
        import yaml

        try:
            params = ((yaml.safe_load(sidecar.read_text(encoding="utf-8")) or {}).get("model") or {}).get("params") or {}
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
            raise StudioError(f"The config '{sidecar}' beside the checkpoint is not readable YAML; fix or remove "
                              "it.") from None
        if isinstance(params, dict) and "parameterization" in params:
            pred = "v_prediction" if params["parameterization"] == "v" else "epsilon"
            return pred, f"{sidecar.name} beside the file"
        return "epsilon", f"{sidecar.name} beside the file, which sets no parameterization"
    spec = header.metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction", "epsilon", "eps"):
        return ("v_prediction" if spec.startswith("v") else "epsilon"), "modelspec.prediction_type"
    if "v_pred" in header.shapes:
        return "v_prediction", "the file's v_pred key"
    if fam == "sd2":
        key = _last_norm1_bias(header)
        if key is not None:
            from safetensors import safe_open

            with safe_open(str(header.path), "pt") as handle:
                bias = handle.get_tensor(key).float()
            if float(bias.std(unbiased=False)) > 0.09:
                return "v_prediction", "ComfyUI's SD 2.x test of the last attention block's weights"
            return "epsilon", "ComfyUI's SD 2.x test of the last attention block's weights"
    return "epsilon", "the family's default"


def _last_norm1_bias(header: Header) -> str | None:
    pattern = re.compile(re.escape(UNET) + r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias$")
    found = [(int(m.group(1)), k) for k in header.shapes for m in [pattern.match(k)] if m]
    return max(found)[1] if found else None


# ---------------------------------------------------------------------------- configs from shapes

def _indices(header: Header, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in header.shapes for m in [rx.match(k)] if m})


def _published(fam: str, component: str) -> dict:
    name = "scheduler/scheduler_config.json" if component == "scheduler" else f"{component}/config.json"
    return json.loads((CONFIGS / fam / name).read_text())


def unet_config(header: Header, fam: str, sample_size: int | None = None) -> dict:
    """UNet2DConditionModel config: the family's, with every size the LDM weights fix read from them."""
    s = header.shapes
    cfg = _published(fam, "unet")
    blocks = _indices(header, re.escape(UNET) + r"input_blocks\.(\d+)\.")
    levels: list[list[int]] = [[]]
    for i in blocks[1:]:
        if f"{UNET}input_blocks.{i}.0.op.weight" in s:
            levels.append([])
        else:
            levels[-1].append(i)
    depth = []
    for level in levels:
        attn = [_indices(header, re.escape(f"{UNET}input_blocks.{i}.1.transformer_blocks.") + r"(\d+)\.")
                for i in level]
        depth.append(len(attn[0]) if attn and attn[0] else 0)
    channels = [s[f"{UNET}input_blocks.{level[0]}.0.in_layers.2.weight"][0] for level in levels]
    first_attn = next(k for k in s if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in s if k.startswith(UNET) and k.endswith(".proj_in.weight"))
    cfg.update(
        in_channels=s[f"{UNET}input_blocks.0.0.weight"][1], out_channels=s[f"{UNET}out.2.weight"][0],
        block_out_channels=channels, layers_per_block=len(levels[0]),
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
        cross_attention_dim=s[first_attn][1], use_linear_projection=len(s[proj_in]) == 2)
    cfg["attention_head_dim"] = (SD1_HEADS if fam == "sd1" else [max(1, c // HEAD_CHANNELS) for c in channels])
    if fam == "sdxl" or any(d > 1 for d in depth):
        cfg["transformer_layers_per_block"] = [max(1, d) for d in depth]
    if fam == "sdxl":
        adm = s[f"{UNET}label_emb.0.0.weight"][1]
        pooled = s[f"{OPEN_CLIP_PREFIXES['sdxl']}text_projection"][1]
        cfg.update(projection_class_embeddings_input_dim=adm, addition_time_embed_dim=(adm - pooled) // 6)
    if sample_size:
        cfg["sample_size"] = sample_size
    return cfg


def vae_config(header: Header, fam: str, prefix: str = VAE, sample_size: int | None = None) -> dict:
    """AutoencoderKL config from the LDM VAE weights (`prefix` '' for a VAE file of its own)."""
    s = header.shapes
    cfg = _published(fam, "vae")
    levels = _indices(header, re.escape(f"{prefix}encoder.down.") + r"(\d+)\.")
    channels = [s[f"{prefix}encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    cfg.update(
        in_channels=s[f"{prefix}encoder.conv_in.weight"][1], out_channels=s[f"{prefix}decoder.conv_out.weight"][0],
        latent_channels=s[f"{prefix}post_quant_conv.weight"][0], block_out_channels=channels,
        layers_per_block=len(_indices(header, re.escape(f"{prefix}encoder.down.0.block.") + r"(\d+)\.")),
        down_block_types=["DownEncoderBlock2D"] * len(channels), up_block_types=["UpDecoderBlock2D"] * len(channels))
    if sample_size:
        cfg["sample_size"] = sample_size
    return cfg


def clip_config(header: Header, fam: str) -> dict:
    """CLIPTextModel config of the OpenAI CLIP text tower (SD 1.x; SDXL's first encoder)."""
    s = header.shapes
    p = CLIP_PREFIXES[fam]
    p = p + "text_model." if f"{p}text_model.embeddings.token_embedding.weight" in s else p
    vocab, hidden = s[f"{p}embeddings.token_embedding.weight"]
    cfg = _published(fam, "text_encoder")
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // HEAD_CHANNELS),
               max_position_embeddings=s[f"{p}embeddings.position_embedding.weight"][0],
               num_hidden_layers=len(_indices(header, re.escape(f"{p}encoder.layers.") + r"(\d+)\.")),
               intermediate_size=s[f"{p}encoder.layers.0.mlp.fc1.weight"][0])
    return cfg


def open_clip_config(header: Header, fam: str) -> dict:
    """CLIPTextModel(WithProjection) config of an OpenCLIP text tower (SD 2.x; SDXL's second encoder).
    SD 2.x reads the penultimate layer's output, which diffusers models as one layer fewer."""
    s = header.shapes
    p = OPEN_CLIP_PREFIXES[fam]
    vocab, hidden = s[f"{p}token_embedding.weight"]
    layers = len(_indices(header, re.escape(f"{p}transformer.resblocks.") + r"(\d+)\."))
    cfg = _published(fam, "text_encoder" if fam == "sd2" else "text_encoder_2")
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // HEAD_CHANNELS),
               max_position_embeddings=s[f"{p}positional_embedding"][0],
               num_hidden_layers=layers - 1 if fam == "sd2" else layers,
               intermediate_size=s[f"{p}transformer.resblocks.0.mlp.c_fc.weight"][0])
    if fam == "sdxl":
        cfg["projection_dim"] = s[f"{p}text_projection"][1]
    return cfg


def resolution(header: Header) -> int | None:
    """The training resolution kohya's tools record (modelspec.resolution '1024x1024'), if any."""
    found = re.match(r"\s*(\d+)\s*x\s*(\d+)", header.metadata.get("modelspec.resolution", ""))
    return int(found.group(1)) if found else None


def configs(header: Header) -> dict:
    """Every component's config for the file: {'unet': {...}, 'vae': {...} (None when the file has no VAE),
    'text_encoder': {...}, ...}."""
    fam = family(header)
    pred, _ = prediction_type(header, fam)
    pixels = resolution(header)
    out = {"model_index": json.loads((CONFIGS / fam / "model_index.json").read_text())}
    out["vae"] = vae_config(header, fam, sample_size=pixels) if has_vae(header) else None
    scale = 2 ** (len(out["vae"]["block_out_channels"]) - 1) if out["vae"] else 8
    latent = pixels // scale if pixels else None
    if latent is None and fam == "sd2" and pred == "epsilon":
        latent = 64  # SD 2.x epsilon models are the 512-px base; the 768-px ones are v-prediction
    out["unet"] = unet_config(header, fam, sample_size=latent)
    if fam == "sd1":
        out["text_encoder"] = clip_config(header, fam)
    elif fam == "sd2":
        out["text_encoder"] = open_clip_config(header, fam)
    else:
        out["text_encoder"], out["text_encoder_2"] = clip_config(header, fam), open_clip_config(header, fam)
    out["scheduler"] = {**_published(fam, "scheduler"), "prediction_type": pred}
    if "ztsnr" in header.shapes and fam != "sd1":  # zero terminal SNR (ComfyUI's marker key, e.g. NoobAI v-pred)
        out["scheduler"]["rescale_betas_zero_snr"] = True
    return out


def _vae_prefix(header: Header) -> str:
    return VAE if f"{VAE}encoder.conv_in.weight" in header.shapes else ""


# ---------------------------------------------------------------------------- content hash

HASH_BLOCKS, HASH_BLOCK = 64, 2**16  # 4 MiB read per large file, whatever its size
HASH_WHOLE = 64 * 2**20  # files up to this size are hashed whole
_HASHES: dict[str, str] = {}  # "path|size|mtime" -> hash, this process's copy of file-hashes.json


def content_hash(path: Path) -> str:
    """A cheap content hash: SHA-256 over the size, the whole header (every name, shape, dtype and offset)
    and the weights: whole up to 64 MiB, else 64 blocks of 64 KiB spread evenly from the first byte to
    the last. A re-save, merge or fine-tune changes every tensor and so the hash; it is cached per
    (path, size, mtime), so a multi-GB file is read once."""
    from studio.models import cache_root

    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    if key in _HASHES:
        return _HASHES[key]
    store = cache_root() / "file-hashes.json"
    known = _read_json(store)
    if key in known:
        _HASHES[key] = known[key]
        return known[key]
    digest = hashlib.sha256(str(stat.st_size).encode())
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        digest.update(handle.read(length))
        start, span = 8 + length, max(0, stat.st_size - 8 - length)
        if span <= HASH_WHOLE:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        else:
            for i in range(HASH_BLOCKS):
                handle.seek(start + (span - HASH_BLOCK) * i // (HASH_BLOCKS - 1))
                digest.update(handle.read(HASH_BLOCK))
    value = "sha256s:" + digest.hexdigest()[:16]
    known = {k: v for k, v in _read_json(store).items() if k.split("|")[0] != str(path)}  # one entry per path
    known[key] = value
    _write_json(store, known)
    _HASHES[key] = value
    return value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    from studio.paths import write_text_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(data, indent=1))


# ---------------------------------------------------------------------------- loading

def config_dir(header: Header) -> Path:
    """A diffusers config folder (no weights) for the file, written once per distinct set of configs."""
    from studio.models import cache_lock, cache_root
    from studio.paths import staging, swap_into_place

    found = configs(header)
    text = json.dumps(found, sort_keys=True)
    folder = cache_root() / "single-file-configs" / hashlib.sha256(text.encode()).hexdigest()[:16]
    with cache_lock(folder):
        if (folder / "model_index.json").exists():
            return folder
        tmp = staging(folder)
        for component, cfg in found.items():
            if cfg is None:
                continue
            name = {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json"}.get(
                component, f"{component}/config.json")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(cfg, indent=2))
        return swap_into_place(tmp, folder)


def tokenizers(fam: str) -> dict:
    from transformers import CLIPTokenizer

    names = ("tokenizer", "tokenizer_2")
    return {n: CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad) for n, pad in zip(names, PAD_TOKENS[fam])}


def vae_header(source: str) -> Header | None:
    """The header of a separate VAE file (LDM layout, with or without `first_stage_model.`), or None for
    a diffusers folder; one sentence for anything else."""
    path = Path(source)
    if path.is_dir():
        return None
    header = read_header(path)
    if "encoder.conv_in.weight" in header.shapes or f"{VAE}encoder.conv_in.weight" in header.shapes:
        if f"{_vae_prefix(header)}encoder.down.0.block.0.conv1.weight" in header.shapes:
            return header
        raise StudioError(f"VAE file {_sentence_name(path)} is in the diffusers layout; give its folder (with "
                          "config.json) instead, or the original-layout .safetensors VAE.")
    raise StudioError(f"File {_sentence_name(path)} is not a VAE (it holds no VAE encoder); give a VAE .safetensors "
                      "file or a diffusers VAE folder.")


def load_vae(source: str, dtype, fam: str = "sd1"):
    """A separate VAE: an original-layout .safetensors file, or a diffusers folder (its own config.json,
    or a model folder's vae/). Its scaling factor is the base family's (SDXL 0.13025, else 0.18215)."""
    from diffusers import AutoencoderKL

    path = Path(source)
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").exists() else None
        if sub is None and not (path / "config.json").exists():
            raise StudioError(f"VAE folder '{path}' has no config.json (nor vae/config.json); give a diffusers VAE "
                              "folder or an original-layout .safetensors VAE file.")
        try:
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise StudioError(f"VAE folder '{path}' could not be loaded ({_first_line(exc)}); check that it holds "
                              "safetensors weights.") from None
    header = vae_header(source)
    cfg = vae_config(header, fam, _vae_prefix(header))
    from studio.models import cache_lock, cache_root
    from studio.paths import staging, swap_into_place

    text = json.dumps(cfg, sort_keys=True)
    folder = cache_root() / "single-file-configs" / ("vae-" + hashlib.sha256(text.encode()).hexdigest()[:16])
    with cache_lock(folder):
        if not (folder / "vae" / "config.json").exists():
            tmp = staging(folder)
            (tmp / "vae").mkdir(parents=True)
            (tmp / "vae" / "config.json").write_text(text)
            swap_into_place(tmp, folder)
    vae = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae", local_files_only=True,
                                         torch_dtype=dtype)
    _check_filled(vae, path, "VAE")
    return vae


def load(path: Path, dtype, vae: str = ""):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline from a single-file checkpoint, offline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    header = read_header(path)
    fam = family(header)
    if not vae and not has_vae(header):
        raise StudioError(f"File {_sentence_name(Path(path))} has no VAE of its own; name the VAE its model page "
                          "recommends (--vae FILE, or the VAE field).")
    folder = config_dir(header)
    extra = dict(add_watermarker=False) if fam == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    if vae:
        extra["vae"] = load_vae(vae, dtype, fam)
    if fam == "sd1" and f"{CLIP_PREFIXES['sd1']}text_model.embeddings.token_embedding.weight" not in header.shapes:
        extra["text_encoder"] = _flat_clip(header, folder, dtype)
    cls = StableDiffusionXLPipeline if fam == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=dtype,
                                **tokenizers(fam), **extra)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is not None:
            _check_filled(module, Path(path), component)
    return pipe


def _flat_clip(header: Header, folder: Path, dtype):
    """SD 1.x text encoder of a file that names it `cond_stage_model.transformer.<name>` without the
    `text_model.` level (written by some merging tools; ComfyUI's SD15.process_clip_state_dict adds the
    level back), which diffusers' reader does not find: read here, with the same config."""
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    prefix = CLIP_PREFIXES["sd1"]
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    with safe_open(str(header.path), "pt") as handle:
        state = {k[len(prefix):]: handle.get_tensor(k) for k in handle.keys()
                 if k.startswith(prefix) and not k.endswith("position_ids")}
    own = model.state_dict()
    if not set(own) <= set(state) and all(k.startswith("text_model.") for k in own):
        state = {"text_model." + k: v for k, v in state.items()}
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise StudioError(f"File {_sentence_name(header.path)} lacks {len(missing)} weights of the text encoder (such "
                          f"as {missing[0]}); it is incomplete, so download it again or choose another.")
    return model.to(dtype).eval()


def _check_filled(module, path: Path, component: str) -> None:
    """Parameters the file did not supply stay on the meta device: the file lacks part of the model."""
    empty = [n for n, p in module.named_parameters() if p.is_meta]
    if empty:
        raise StudioError(f"File {_sentence_name(path)} lacks {len(empty)} weights of the {component} (such as {empty[0]}); "
                          "it is incomplete or of another architecture, so download it again or choose another.")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
