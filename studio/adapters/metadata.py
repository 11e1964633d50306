"""Where a file came from, in the header fields other tools show: kohya's `ss_*` and Stability's `modelspec.*`.

AUTOMATIC1111's Lora tab, ComfyUI's LoRA managers, kohya's tools and model sites read a safetensors
file's `__metadata__` for the base model, trigger word, resolution, steps and network dim/alpha. The
names and values follow the code that writes them:

- kohya sd-scripts train_network.py (its training metadata) and train_util.build_minimum_network_metadata:
  ss_output_name, ss_sd_model_name, ss_base_model_version ("sd_v1", "sd_v2", "sd_v2_v": model_util
  .get_model_version_str_for_sd1_sd2; "sdxl_base_v1-0": sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0),
  ss_v2, ss_network_module ("networks.lora"; LyCORIS files "lycoris.kohya"), ss_network_dim,
  ss_network_alpha, ss_network_args (JSON), ss_resolution, ss_max_train_steps, ss_steps,
  ss_learning_rate, ss_lr_scheduler, ss_lr_warmup_steps, ss_batch_size_per_device, ss_seed,
  ss_mixed_precision, ss_noise_offset, ss_min_snr_gamma, ss_num_train_images, ss_training_started_at,
  ss_tag_frequency (JSON {dataset folder: {tag: count}}, the comma-separated parts of the captions; model
  sites take trigger words from it) - every value a string (kohya writes str(v)).
- kohya sd-scripts library/sai_model_spec.py (Stability's ModelSpec 1.0.1): modelspec.sai_model_spec
  "1.0.1", modelspec.architecture ("stable-diffusion-v1", "stable-diffusion-v2-512", "stable-diffusion-
  v2-768-v", "stable-diffusion-xl-v1-base", + "/lora" or "/textual-inversion"), modelspec.implementation
  (the Stability repository URL for SDXL LoRAs, textual inversions and checkpoints, "diffusers" for SD 1.x/2.x
  LoRAs: determine_implementation), modelspec.title, modelspec.date (ISO 8601), modelspec.resolution
  ("512x512"), modelspec.prediction_type ("epsilon" or "v"), modelspec.trigger_phrase, usage_hint.

The fields are added to a file already written (`stamp`): only the header is rewritten, the tensor
bytes are copied as they are, so even a multi-GB checkpoint costs no memory.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SPEC_VERSION = "1.0.1"
IMPL_STABILITY = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
SOFTWARE = "Concept Studio"

# ExportReport.format -> what the file is to the clients: a network file (LoRA-like), an embedding, a model.
_EMBEDDING_FORMATS = ("a1111-embedding", "sdxl-embedding")
_MODEL_FORMATS = ("sd-single-file",)
_LYCORIS_FORMATS = ("lycoris",)
_NOT_COMMUNITY = ("diffusers-",)  # diffusers' own formats: the native files, read by diffusers


@dataclass(frozen=True)
class Family:
    sdxl: bool = False
    v2: bool = False
    v_prediction: bool = False

    @property
    def base_model_version(self) -> str:
        if self.sdxl:
            return "sdxl_base_v1-0"
        return "sd_v2" + ("_v" if self.v_prediction else "") if self.v2 else "sd_v1" + ("_v" if self.v_prediction else "")

    @property
    def architecture(self) -> str:
        if self.sdxl:
            return "stable-diffusion-xl-v1-base"
        if self.v2:
            return "stable-diffusion-v2-768-v" if self.v_prediction else "stable-diffusion-v2-512"
        return "stable-diffusion-v1"


def family_of(pipe) -> Family:
    """SD 1.x, SD 2.x (OpenCLIP's 1024-wide text features) or SDXL, and the prediction type."""
    scheduler = getattr(pipe, "scheduler", None)
    return family_from(pipe.unet.config, (getattr(scheduler, "config", None) or {}).get("prediction_type", "epsilon"))


def family_from(unet_config, prediction_type: str = "epsilon") -> Family:
    sdxl = getattr(unet_config, "addition_embed_type", None) == "text_time"
    v2 = not sdxl and unet_config.cross_attention_dim == 1024
    return Family(sdxl=sdxl, v2=v2, v_prediction=prediction_type == "v_prediction")


def role_of(fmt: str) -> str | None:
    """'network', 'embedding' or 'model' for a community format; None for diffusers' own files."""
    if fmt.startswith(_NOT_COMMUNITY):
        return None
    if fmt in _EMBEDDING_FORMATS:
        return "embedding"
    if fmt in _MODEL_FORMATS:
        return "model"
    return "network"


def fields(role: str, fmt: str, family: Family, run: dict, meta, file: str, token: str | None = None) -> dict[str, str]:
    """The ss_* and modelspec.* fields of one file.

    Args:
        role: "network" (LoRA, LyCORIS, .diff files), "embedding" or "model" (role_of).
        fmt: the ExportReport format (kohya, lycoris, kohya-extracted, lora-diff, ...).
        run: the run's config.yaml values ({} when there is none).
        meta: the adapter's AdapterMeta (kind, base model, token, class word, step, rank, alpha).
        file: the file's name inside the adapter folder.
        token: the trigger word the file is for, when not the adapter's own (one of several concepts).
    """
    token = token or meta.token
    resolution = int(run.get("resolution") or 0) or (1024 if family.sdxl else 512)
    title = run.get("_run_id") or Path(file).stem
    trigger = f"{token} {meta.class_word}".strip() if token == meta.token else token
    suffix = {"network": "/lora", "embedding": "/textual-inversion", "model": ""}[role]
    implementation = IMPL_DIFFUSERS if role == "network" and not family.sdxl else IMPL_STABILITY
    spec = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": family.architecture + suffix,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": run.get("_date") or datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if family.v_prediction else "epsilon",
        "modelspec.trigger_phrase": token,
        "modelspec.usage_hint": f"Put '{token}' in the prompt, e.g. 'a photo of {trigger}'.",
        "modelspec.description": f"{meta.kind} trained on '{meta.base_model}' with {SOFTWARE} ({meta.step} steps).",
    }
    ss = {
        "ss_output_name": title,
        "ss_sd_model_name": str(meta.base_model),
        "ss_base_model_version": family.base_model_version,
        "ss_v2": str(family.v2),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_max_train_steps": str(run.get("steps", meta.step)),
        "ss_steps": str(meta.step),
        "ss_training_comment": f"{meta.kind} by {SOFTWARE}; trigger word '{token}'",
        "ss_tag_frequency": json.dumps(run.get("_tag_frequency") or {title: {token: 1}}),
        "ss_num_train_images": str(run.get("_num_images", "")),
    }
    for key, name in (("learning_rate", "ss_learning_rate"), ("lr_schedule", "ss_lr_scheduler"),
                      ("lr_warmup_steps", "ss_lr_warmup_steps"), ("batch_size", "ss_batch_size_per_device"),
                      ("seed", "ss_seed"), ("mixed_precision", "ss_mixed_precision"),
                      ("noise_offset", "ss_noise_offset"), ("min_snr_gamma", "ss_min_snr_gamma"),
                      ("gradient_accumulation_steps", "ss_gradient_accumulation_steps"),
                      ("max_grad_norm", "ss_max_grad_norm"), ("optimizer", "ss_optimizer")):
        if key in run:
            ss[name] = str(run[key])
    if role == "network":
        ss.update(_network_fields(fmt, run, meta))
    return {k: v for k, v in {**ss, **spec}.items() if v != ""}


def _network_fields(fmt: str, run: dict, meta) -> dict[str, str]:
    """ss_network_module / dim / alpha / args: what kohya's and LyCORIS's loaders and the A1111 Lora tab read."""
    if fmt == "kohya-extracted":  # kohya's extract_lora_from_models.py: dim = alpha = the extraction rank
        rank = _rank_of(run, meta)
        return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(float(rank)), "ss_network_args": json.dumps({})}
    if fmt in ("lora-diff", "full-diff"):  # full weight differences (Custom Diffusion K/V, merged DoRA): no rank
        return {"ss_network_module": "networks.lora", "ss_network_args": json.dumps({"algo": "full"})}
    args = {}
    if fmt in _LYCORIS_FORMATS:
        args["algo"] = meta.kind  # loha / lokr, as LyCORIS records it
        if meta.kind == "lokr" and "lokr_factor" in run:
            args["factor"] = str(run["lokr_factor"])
    if meta.kind == "dora":
        args["dora_wd"] = "True"  # LyCORIS's name for weight decomposition
    if run.get("locon"):
        args["conv_dim"], args["conv_alpha"] = str(meta.rank), str(meta.alpha)
    module = "lycoris.kohya" if fmt in _LYCORIS_FORMATS or meta.kind == "dora" else "networks.lora"
    return {"ss_network_module": module, "ss_network_dim": str(meta.rank), "ss_network_alpha": str(meta.alpha),
            "ss_network_args": json.dumps(args)}


def _rank_of(run: dict, meta) -> int:
    return int(run.get("_extract_rank") or run.get("extract_rank") or meta.rank or 0)


def tag_frequency(datasets: list[Path]) -> tuple[dict, int]:
    """kohya's ss_tag_frequency ({dataset folder name: {tag: count}}, tags being the comma-separated parts
    of each caption, stripped) and the number of images, from the datasets' caption files."""
    from studio.data.dataset import load_dataset

    out, images = {}, 0
    for folder in datasets:
        try:
            spec = load_dataset(Path(folder))
        except Exception:  # a dataset moved or deleted since: the file still gets its other fields
            continue
        counts = Counter()
        for item in spec.items:
            caption = getattr(item, "caption", "") or ""
            counts.update(t.strip() for t in caption.split(",") if t.strip())
            images += 1
        out[Path(folder).name] = dict(counts)
    return out, images


def run_values(adapter_dir: Path) -> dict:
    """The run's config.yaml values, with the run id, its date and the datasets' tag frequency added
    under `_` keys; {} when the adapter folder has no run around it."""
    from studio.config import load_run_config
    from studio.paths import RunPaths

    paths = RunPaths(Path(adapter_dir).parent)
    if not paths.config.exists():
        return {}
    run = dict(load_run_config(paths.config))
    run["_run_id"] = paths.run_id
    run["_date"] = datetime.datetime.fromtimestamp(paths.config.stat().st_mtime).replace(microsecond=0).isoformat()
    datasets = [d for d in [run.get("dataset"), *(run.get("extra_datasets") or [])] if d]
    run["_tag_frequency"], run["_num_images"] = tag_frequency([Path(d) for d in datasets])
    return run


def stamp_reports(adapter_dir: Path, reports: list, family: Family) -> list[str]:
    """Write the fields into every community file the reports name (once per file). Returns the files."""
    from studio.adapters import read_meta

    adapter_dir = Path(adapter_dir)
    meta, run = read_meta(adapter_dir), run_values(adapter_dir)
    done = []
    for report in reports:
        role = role_of(report.format)
        path = adapter_dir / report.file
        if role is None or report.file in done or not path.is_file():
            continue
        values = dict(run)
        if report.approximation:
            values["_extract_rank"] = report.approximation.get("rank")
        # one embedding file per concept, named by its token (Custom Diffusion's embeddings_a1111/<token>)
        token = Path(report.file).stem if role == "embedding" and Path(report.file).parent.name else None
        stamp(path, fields(role, report.format, family, values, meta, report.file, token))
        done.append(report.file)
    return done


def read(path: Path) -> dict[str, str]:
    """A safetensors file's __metadata__ (empty if it has none)."""
    header = _header(Path(path))[0]
    return dict(header.get("__metadata__") or {})


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def stamp(path: Path, values: dict[str, str]) -> None:
    """Merge `values` into the file's __metadata__ (existing fields are kept unless named), atomically.

    Only the header changes: safetensors stores tensor offsets relative to the end of the header, so the
    data bytes are streamed over unchanged. The header is padded with spaces to a multiple of 8 bytes, as
    the safetensors writer does, so the data keeps its alignment.
    """
    path = Path(path)
    header, data_start = _header(path)
    header["__metadata__"] = {**(header.get("__metadata__") or {}), **{str(k): str(v) for k, v in values.items()}}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".meta-partial")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(raw)))
        dst.write(raw)
        src.seek(data_start)
        shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
    os.replace(tmp, path)
