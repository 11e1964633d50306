"""Full fine-tuning (DreamBooth, Ruiz et al. 2023): every UNet weight trains, and with `train_text_encoder`
every weight of the text encoder(s) too; the VAE stays frozen.

The result is a model, not an adapter: `save` writes a complete diffusers folder, which is used by
naming it as the base model (`--model RUN/adapter`). `export` adds `model.safetensors`, the same model
as one file in the original layout that AUTOMATIC1111 and ComfyUI load. SD 1.x:

    model.diffusion_model.<LDM UNet name>             UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.<LDM VAE name>                  VAE (encoder.down.<i>.block.<j>, mid.attn_1.q, ...)
    cond_stage_model.transformer.text_model.<name>    CLIP text encoder, transformers' own names

SDXL (Stability's "sgm" layout): the same UNet and VAE names (plus `label_emb` for the pooled-text and
size embedding), and the two text encoders as

    conditioner.embedders.0.transformer.text_model.<name>   CLIP ViT-L, transformers' own names
    conditioner.embedders.1.model.<OpenCLIP name>           OpenCLIP ViT-bigG: resblocks.<i>.attn.in_proj_*
                                                            (q, k, v stacked), mlp.c_fc / c_proj, ln_1 / ln_2,
                                                            positional_embedding, text_projection (transposed)

The file is read back by diffusers' single-file converters (what `from_single_file` runs), an
independent implementation of the same layout, and every weight they produce is compared with the
studio's, one component at a time on the CPU, without building a second model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from studio.adapters.base import Capabilities, Setup
from studio.adapters.lora import ldm_module_name, text_encoders
from studio.errors import StudioError
from studio.fields import check, setting
from studio.paths import staging, swap_into_place

log = logging.getLogger(__name__)

@dataclass
class Settings:
    train_text_encoder: bool = setting("Fine-tune the whole text encoder(s) too (DreamBooth's variant that learns how "
                                       "the trigger word is read), at more memory per step.", False,
                                       label="Train the text encoder too")
    extract_rank: int = setting("Also write a kohya LoRA of this rank extracted from the difference to the base model "
                                "(truncated SVD, as kohya's extract_lora_from_models.py does), a small file to share, "
                                "with how much its output differs from the fine-tune in the export report; 0 writes "
                                "none. 32-128 is common.", 0, label="Extract a LoRA of rank", bounds=(0, 1024))

    def __post_init__(self) -> None:
        check(self)


KINDS = ("full",)
# A whole model, on or off: checkpoints keep trainable.safetensors (the whole UNet) and no second model copy.
CAPABILITIES = {"full": Capabilities("none", text_encoder_option=True, saves_model=True)}
SETTINGS = {"full": Settings}
SINGLE_FILE = "model.safetensors"
SINGLE_FILE_LOADER = "diffusers single-file converters (from_single_file's convert_ldm_*)"
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
SDXL_TEXT_PREFIX, SDXL_TEXT_2_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


def attach(pipe, setup: Setup) -> None:
    """Make the whole UNet trainable, and the text encoder(s) when `train_text_encoder` is set (their
    outputs are then computed every step); the VAE is frozen (its posteriors are cached)."""
    settings = setup.settings
    pipe.vae.requires_grad_(False)
    for _, encoder in text_encoders(pipe):
        encoder.requires_grad_(bool(settings.train_text_encoder))
    pipe.unet.requires_grad_(True)
    # What export needs to extract a LoRA from the fine-tune (setting extract_rank; 0: none).
    pipe._studio_extract = dict(rank=int(settings.extract_rank), model=setup.model, resolution=setup.resolution,
                                text=bool(settings.train_text_encoder))


def trainable_parameters(pipe) -> list:
    modules = [pipe.unet] + [encoder for _, encoder in text_encoders(pipe)]
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def save(pipe, out_dir: Path) -> Path:
    """The fine-tuned model as a complete diffusers folder (safetensors), written atomically."""
    out_dir = Path(out_dir)
    tmp = staging(out_dir)
    pipe.save_pretrained(tmp, safe_serialization=True)
    return swap_into_place(tmp, out_dir)


def load_into(pipe, adapter_dir: Path, name: str) -> None:
    raise StudioError(f"'{adapter_dir}' is a fully fine-tuned model, not an adapter to add to another model; "
                      "use it by naming its folder as the base model (e.g. --model RUN/adapter).")


# ---------------------------------------------------------------------------- single-file (LDM) layout

# diffusers VAE ResNet / attention layer -> the LDM (taming) layer with the same weights.
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}


def vae_ldm_name(key: str, config) -> str:
    """The LDM name of a diffusers AutoencoderKL parameter, e.g.
    "decoder.up_blocks.0.resnets.1.conv1.weight" -> "decoder.up.1.block.1.conv1.weight" (the LDM decoder
    numbers its levels from the lowest resolution up, diffusers from the first block run)."""
    module, _, param = key.rpartition(".")
    parts = module.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, rest = parts[0], parts[1:]  # encoder | decoder
    head = ".".join(rest)
    if head in _VAE_TOP:
        return f"{side}.{_VAE_TOP[head]}.{param}"
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "mid_block":
        kind, i, tail = rest[1], int(rest[2]), ".".join(rest[3:])
        if kind == "resnets":
            return f"{side}.mid.block_{i + 1}.{_VAE_RESNET.get(tail, tail)}.{param}"
        return f"{side}.mid.attn_1.{_VAE_ATTN[tail]}.{param}"
    if rest[0] in ("down_blocks", "up_blocks"):
        block, kind, tail = int(rest[1]), rest[2], ".".join(rest[4:])
        level, name = (block, "down") if rest[0] == "down_blocks" else (len(config.up_block_types) - 1 - block, "up")
        if kind == "resnets":
            return f"{side}.{name}.{level}.block.{rest[3]}.{_VAE_RESNET.get(tail, tail)}.{param}"
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return f"{side}.{name}.{level}.{sampler}.{tail}.{param}"
    raise ValueError(f"VAE parameter '{key}' has no LDM counterpart")


def single_file_state_dict(pipe, to_cpu: bool = True) -> dict:
    """UNet, VAE and text encoder(s) of `pipe` under single-file key names (SD 1.x or SDXL), on the CPU
    (`to_cpu=False`: where they are, for the key names alone)."""
    out = {}
    for key, value in pipe.unet.state_dict().items():
        module, _, param = key.rpartition(".")
        out[f"{UNET_PREFIX}{ldm_module_name(module, pipe.unet.config)}.{param}"] = value
    for key, value in pipe.vae.state_dict().items():
        name = vae_ldm_name(key, pipe.vae.config)
        if ".mid.attn_1." in name and name.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[VAE_PREFIX + name] = value
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the LDM file keeps the old names.
        prefix = SDXL_TEXT_PREFIX if sdxl else TEXT_PREFIX
        out[prefix + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    if sdxl:
        out.update({SDXL_TEXT_2_PREFIX + k: v for k, v in open_clip_state_dict(pipe.text_encoder_2).items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()} if to_cpu else out


# transformers CLIP text layer -> OpenCLIP layer with the same weights (inside resblocks.<i>)
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def open_clip_state_dict(encoder) -> dict:
    """A transformers CLIPTextModelWithProjection's weights under OpenCLIP names (SDXL's second encoder).

    q, k and v projections are stacked into one `in_proj_weight` / `in_proj_bias` (q first), and the
    projection is stored as OpenCLIP's `text_projection` matrix (width x dim), the transpose of the
    Linear weight. Raises ValueError for a weight this mapping does not place.
    """
    import torch

    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out, placed = {}, set()
    for key, name in _OPEN_CLIP_TOP.items():
        out[name] = state[key]
        placed.add(key)
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T
        placed.add("text_projection.weight")
    for i in range(encoder.config.num_hidden_layers):
        layer = f"encoder.layers.{i}."
        block = f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [f"{layer}self_attn.{p}_proj.{param}" for p in ("q", "k", "v")]
            out[f"{block}attn.in_proj_{param}"] = torch.cat([state[k] for k in qkv])
            placed.update(qkv)
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                out[f"{block}{theirs}.{param}"] = state[f"{layer}{ours}.{param}"]
                placed.add(f"{layer}{ours}.{param}")
    left = sorted(set(state) - placed)
    if left:
        raise ValueError(f"text encoder weights with no OpenCLIP name: {', '.join(left[:5])}")
    return out


def export(adapter_dir: Path, pipe) -> list:
    """Write SINGLE_FILE into `adapter_dir`, then read it back with diffusers and compare."""
    from safetensors.torch import save_file

    from studio.adapters.checks import ExportReport

    reason = _no_layout(pipe)
    if reason:  # no file rather than a file in a layout no tool expects
        return [ExportReport(SINGLE_FILE, "sd-single-file", SINGLE_FILE_LOADER,
                             note=f"not written: {reason}; the diffusers folder is the model.")] + extract_lora(adapter_dir, pipe)
    path = Path(adapter_dir) / SINGLE_FILE
    tmp = path.with_name(path.name + ".partial")
    save_file(single_file_state_dict(pipe), str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return [check_single_file(path, pipe, config_dir=adapter_dir)] + extract_lora(adapter_dir, pipe)


def extract_lora(adapter_dir: Path, pipe, rank: int | None = None) -> list:
    """The LoRA extracted from this fine-tune (studio.adapters.extract) at `rank` (default: the run's
    setting extract_rank; 0 or unset: none), with its report."""
    from studio.adapters import extract

    wanted = getattr(pipe, "_studio_extract", None) or {}
    rank = wanted.get("rank", 0) if rank is None else rank
    if not rank:
        return []
    base = extract.load_base_unet(wanted["model"])  # the base alone; the fine-tune is not copied
    try:
        return [extract.extract_and_check(adapter_dir, pipe.unet, base, rank, wanted["resolution"], wanted["text"])]
    finally:
        del base


def _no_layout(pipe) -> str | None:
    """Why this model has no single-file layout here, or None. SD 2.x files hold OpenCLIP under
    `cond_stage_model.model.` with a 24th layer and a projection that diffusers' SD 2.x text encoder
    drops, so a faithful file cannot be written from the diffusers folder."""
    if getattr(pipe, "text_encoder_2", None) is None and pipe.unet.config.cross_attention_dim == 1024:
        return "SD 2.x single files (OpenCLIP text encoder layout) are not written yet"
    return None


def check_single_file(path: Path, pipe, config_dir: Path | None = None):
    """Read a single file (SD 1.x or SDXL) with diffusers' own single-file converters and compare each
    weight they produce with the studio's.

    Keys: the file's against those the studio writes for `pipe`, and every weight of the studio's
    components against what the converters made of the file. Weights: `convert_ldm_unet_checkpoint`,
    `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and (SDXL) `convert_open_clip_checkpoint`
    are what `from_single_file` runs before it fills a model; their output is compared tensor by tensor
    (max abs difference), so equal weights mean equal outputs. No model is built and nothing runs:
    one component's tensors at a time are read from the file, on the CPU. `config_dir` is no longer
    needed (the studio's own component configs are used) and is accepted for callers that pass it.
    """
    from safetensors import safe_open

    from studio.adapters.checks import ExportReport

    report = ExportReport(file=Path(path).name, format="sd-single-file", loader=SINGLE_FILE_LOADER, tolerance=1e-4)
    with safe_open(str(path), "pt") as handle:
        found = set(handle.keys())
        expected = set(single_file_state_dict(pipe, to_cpu=False))
        report.missing_keys, report.unexpected_keys = sorted(expected - found), sorted(found - expected)
        worst = 0.0
        try:
            for component, converted in _converted(_LazyFile(handle), pipe):
                missing, diff = _compare_weights(getattr(pipe, component), converted)
                report.missing_keys += [f"{component}.{k}" for k in missing]
                worst = max(worst, diff)
                del converted
        except Exception as exc:  # any refusal is the finding: logged in full, reported in one sentence
            log.warning("diffusers could not convert %s", path, exc_info=True)
            report.note = f"diffusers' single-file converters refused the file ({exc.__class__.__name__}: {_first_line(exc)})."
            return report
    report.max_abs_diff = worst
    return report


class _LazyFile(dict):
    """The file's tensors as a mapping that reads each one when asked (what the converters index)."""

    def __init__(self, handle):
        super().__init__()
        self._handle, self._keys = handle, list(handle.keys())
        self._set = set(self._keys)

    def keys(self):
        return list(self._keys)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._set

    def __getitem__(self, key):
        if key not in self._set:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def get(self, key, default=None):
        return self[key] if key in self._set else default


def _converted(checkpoint, pipe):
    """(component, its diffusers state dict as diffusers' converters read it from `checkpoint`), one at a time."""
    from diffusers.loaders import single_file_utils as sfu

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    yield "unet", sfu.convert_ldm_unet_checkpoint(checkpoint, dict(pipe.unet.config))
    yield "vae", sfu.convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config))
    yield "text_encoder", sfu.convert_ldm_clip_checkpoint(checkpoint, SDXL_TEXT_PREFIX if sdxl else None)
    if sdxl:
        yield "text_encoder_2", sfu.convert_open_clip_checkpoint(pipe.text_encoder_2, checkpoint, prefix=SDXL_TEXT_2_PREFIX)


def _compare_weights(module, converted: dict) -> tuple[list[str], float]:
    """(the module's weights the converted dict lacks, largest |theirs - ours| over the rest).
    transformers 5 names CLIP's weights without `text_model.`; both sides are compared without it."""
    import torch

    plain = lambda k: k.removeprefix("text_model.")  # noqa: E731
    theirs = {plain(k): v for k, v in converted.items()}
    missing, worst = [], 0.0
    with torch.no_grad():
        for key, ours in module.state_dict().items():
            other = theirs.get(plain(key))
            if other is None:
                missing.append(key)
                continue
            if tuple(other.shape) != tuple(ours.shape):
                other = other.reshape(ours.shape) if other.numel() == ours.numel() else None
                if other is None:
                    missing.append(f"{key} (shape)")
                    continue
            worst = max(worst, float((other.float() - ours.detach().to("cpu").float()).abs().max()))
    return missing, worst


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


# ---------------------------------------------------------------------------- taking a run home

def client_files(kind: str, folder: Path, name: str, token: str) -> list[tuple]:
    from studio.adapters.base import existing

    return existing([(Path(folder) / SINGLE_FILE, f"{name}.safetensors", "checkpoint")])


def diffusers_code(kind: str, folder: Path, token: str, base: str, scale: float, prompt: str) -> str:
    return f'pipe = StableDiffusionPipeline.from_single_file("{folder}/{SINGLE_FILE}")\nimage = pipe("{prompt}").images[0]'
