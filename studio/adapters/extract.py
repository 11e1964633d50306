"""A LoRA extracted from a full fine-tune (DreamBooth): the difference to the base model, truncated SVD.

kohya's sd-scripts do this in networks/extract_lora_from_models.py: for every layer their LoRA network
adapts (the Linear and Conv2d layers inside the UNet's transformer, ResNet, down- and upsampling
blocks), dW = W_tuned - W_base is factorised by SVD, dW ~ (U_r S_r) Vh_r, written as
`lora_up.weight` = U_r S_r (out x r), `lora_down.weight` = Vh_r (r x in, or r x in x kh x kw for a
convolution, whose up is out x r x 1 x 1) and `alpha` = r, so a client applies W + up @ down x alpha / r.
Unlike kohya's script no value is clamped (their default clips U S and Vh at the 0.99 quantile), so at
full rank the file holds dW exactly.

What a LoRA cannot hold is reported, not hidden: biases and normalisation weights also change in a full
fine-tune, and the trained text encoder (with `train_text_encoder`) is not extracted. The cost is measured
on the UNet's output: the base with the file applied, against the fine-tuned UNet, on one fixed input at
the training resolution, next to how far the fine-tune moved from the base on the same input.

Memory: one base UNet is read for the differences (from the base model, float32); the fine-tuned UNet is
the one already in memory, never copied.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from studio.adapters.checks import ExportReport
from studio.adapters.lora import kohya_module_name

log = logging.getLogger(__name__)

LOADER = "kohya LoRA rule (W + up @ down x alpha / rank), keys by ComfyUI model_lora_keys_unet"
FORMAT = "kohya-extracted"
# The blocks kohya's networks/lora.py adapts (UNET_TARGET_REPLACE_MODULE and its conv variant):
# Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D; in diffusers paths, these parts.
_BLOCK_PARTS = ("attentions", "resnets", "downsamplers", "upsamplers")


def file_name(rank: int) -> str:
    return f"lora_extracted_rank{rank}.safetensors"


def target_layers(unet) -> dict[str, torch.nn.Module]:
    """{diffusers module path: Linear/Conv2d} of every layer kohya's LoRA network adapts."""
    out = {}
    for path, module in unet.named_modules():
        parts = path.split(".")
        if (isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and parts[0] in ("down_blocks", "mid_block", "up_blocks")
                and any(p in parts for p in _BLOCK_PARTS)):
            out[path] = module
    return out


@torch.no_grad()
def extract(tuned, base, rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """kohya LoRA weights approximating `tuned` - `base` at `rank` (per layer at most min(out, in)).

    Returns:
        (state dict under kohya key names, share of the squared Frobenius norm of all differences that
        the kept singular values hold: 1.0 at full rank; NaN for models on the meta device, whose
        files have the real names and shapes but no values).
    """
    bases = target_layers(base)
    state, kept, total = {}, 0.0, 0.0
    for path, layer in target_layers(tuned).items():
        diff = _host(layer.weight.detach().float()) - _host(bases[path].weight.detach().float())
        matrix = diff.reshape(diff.shape[0], -1)  # a convolution: (out, in x kh x kw)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(rank, *matrix.shape)
        if not diff.is_meta:
            kept, total = kept + float((s[:r] ** 2).sum()), total + float((s ** 2).sum())
        up, down = u[:, :r] * s[:r], vh[:r]
        if diff.dim() == 4:
            up, down = up.reshape(diff.shape[0], r, 1, 1), down.reshape(r, *diff.shape[1:])
        name = kohya_module_name(path, tuned)
        state[f"{name}.lora_up.weight"] = up.contiguous()
        state[f"{name}.lora_down.weight"] = down.contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(r))  # alpha = rank: scale 1, as kohya writes it
    if any(v.is_meta for v in state.values()):
        return state, float("nan")
    return state, (kept / total if total else 1.0)


def _host(t: torch.Tensor) -> torch.Tensor:
    """On the CPU; a tensor on the meta device (a model built from a real config: names and shapes
    only) stays there."""
    return t if t.is_meta else t.cpu()


@torch.no_grad()
def apply_file(unet, state: dict[str, torch.Tensor], strength: float = 1.0, expected: dict | None = None):
    """Add the file's LoRA to `unet`'s weights in place, by the clients' rule: every key stem names a
    weight ("lora_unet_" + its path with '.' -> '_': diffusers paths on SD 1.x/2.x, LDM paths on SDXL,
    as ComfyUI's comfy/lora.py `model_lora_keys_unet` maps them) and W += strength x up @ down x
    alpha / rank.

    Args:
        expected: the factors as computed (writer's names); each patched layer is then compared with
            W + up @ down from them, one layer at a time.
    Returns:
        (keys that name no weight of the right shape, left unapplied; the largest difference between a
        patched layer and its expected value, 0.0 without `expected`).
    """
    from studio.adapters.custom import client_module_names

    names, layers = client_module_names(unet), dict(unet.named_modules())
    stems = sorted({k.split(".", 1)[0] for k in state})
    bad, worst = [], 0.0
    for stem in stems:
        path = names.get(stem)
        layer = layers.get(path) if path else None  # ("" would be the UNet itself)
        up, down = state.get(f"{stem}.lora_up.weight"), state.get(f"{stem}.lora_down.weight")
        keys = sorted(k for k in state if k.split(".", 1)[0] == stem)
        if layer is None or up is None or down is None:
            bad += keys
            continue
        delta = _delta(state, stem)
        if delta.numel() != layer.weight.numel() or delta.shape[0] != layer.weight.shape[0]:
            bad += keys
            continue
        name = kohya_module_name(path, unet)
        if expected is not None and f"{name}.lora_up.weight" not in expected:
            bad += keys  # a real layer, but not one the extraction wrote for
            continue
        old = layer.weight.detach().float().cpu().clone() if expected is not None else None
        layer.weight += strength * delta.reshape(layer.weight.shape).to(layer.weight.device, layer.weight.dtype)
        if expected is not None:
            e_up, e_down = expected[f"{name}.lora_up.weight"], expected[f"{name}.lora_down.weight"]
            want = old + (e_up.reshape(e_up.shape[0], -1) @ e_down.reshape(e_down.shape[0], -1)).reshape(old.shape)
            worst = max(worst, float((layer.weight.detach().float().cpu() - want).abs().max()))
    return bad, worst


def _delta(state: dict, stem: str) -> torch.Tensor:
    """up @ down x alpha / rank of one module (alpha defaults to the rank), as a (out, in...) matrix."""
    up, down = state[f"{stem}.lora_up.weight"], state[f"{stem}.lora_down.weight"]
    alpha = float(state.get(f"{stem}.alpha", torch.tensor(float(down.shape[0]))))
    return (up.reshape(up.shape[0], -1).float() @ down.reshape(down.shape[0], -1).float()) * (alpha / down.shape[0])


def client_checks(state: dict, base) -> list[dict]:
    """The file through ComfyUI's, AUTOMATIC1111's and kohya's own rules (studio.adapters.clients) on the
    base UNet: keys each client reads onto a weight of the right shape, and each weight it makes
    against the studio's own reading of the same file (W + up @ down x alpha / rank), one layer at a
    time, so that no copy of a model this size is held. Run before the file is applied to `base`."""
    from studio.adapters import clients

    def expected(target, weight):
        delta = _delta(state, kohya_module_name(target.module, base))
        return weight.float() + delta.to(weight.device).reshape(weight.shape)

    recommended, notes = {c: True for c in clients.CLIENTS}, {}
    sdxl = getattr(base.config, "addition_embed_type", None) == "text_time"
    if not sdxl and base.config.up_block_types[0].startswith("CrossAttn"):
        # networks.py `convert_diffusers_name_to_compvis` puts up_blocks.0's upsampler in slot 1 of its
        # output block, as in SD 1.x/2.x, whose first up block has no attention; here it has (SDXL's
        # files carry the original names and are not converted).
        recommended[clients.A1111] = False
        notes[clients.A1111] = ("AUTOMATIC1111's name rule assumes SD 1.x/2.x's block layout, which this model "
                                "does not have, so it misses the first up block's upsampler")
    return clients.client_checks(state, clients.Layout(base), recommended, notes, expected=expected)


def unet_input(unet, resolution: int) -> dict:
    """One fixed UNet input at the training resolution (latent resolution / 8), with SDXL's pooled text
    and size conditioning where the UNet takes them."""
    g = torch.Generator().manual_seed(0)
    c, size = unet.config, max(1, resolution // 8)
    device = next(unet.parameters()).device
    inputs = dict(sample=torch.randn(1, c.in_channels, size, size, generator=g).to(device),
                  timestep=torch.tensor([500], device=device),
                  encoder_hidden_states=torch.randn(1, 77, c.cross_attention_dim, generator=g).to(device))
    if getattr(c, "addition_embed_type", None) == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        px = float(size * 8)
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(1, pooled, generator=g).to(device),
                                           time_ids=torch.tensor([[px, px, 0, 0, px, px]], device=device))
    return inputs


@torch.no_grad()
def _output(unet, inputs) -> torch.Tensor:
    from studio.adapters import probe

    device = next(unet.parameters()).device
    move = lambda v: v.to(device) if torch.is_tensor(v) else {k: move(x) for k, x in v.items()}  # noqa: E731
    was_training = unet.training
    unet.eval()
    with probe.float32([unet]):
        out = unet(**{k: move(v) for k, v in inputs.items()}).sample.float().cpu()
    unet.train(was_training)
    return out


def extract_and_check(out_dir: Path, tuned, base, rank: int, resolution: int, text_trained: bool = False,
                      metadata: dict | None = None) -> ExportReport:
    """Write `file_name(rank)` into `out_dir` from `tuned` - `base`, and report what it costs.

    `base` is changed in place (the file is applied to it); the caller discards it afterwards.
    The report: keys that no client could place (missing / unexpected); max_abs_diff: each patched
    layer of base + file against base + the truncated SVD computed here (the file's correctness); and
    `approximation`: the UNet output of base + file against the fine-tune (max and mean abs difference),
    relative to how far the fine-tune's output moved from the base's, and the share of the weight
    differences' energy the rank keeps.
    """
    from safetensors.torch import load_file, save_file

    state, energy = extract(tuned, base, rank)
    path = Path(out_dir) / file_name(rank)
    tmp = path.with_name(path.name + ".partial")
    save_file(state, str(tmp), metadata=metadata or {"format": "pt"})
    tmp.replace(path)
    report = ExportReport(path.name, FORMAT, LOADER)
    inputs = unet_input(tuned, resolution)
    tuned_out, base_out = _output(tuned, inputs), _output(base, inputs)
    written = load_file(str(path))
    report.missing_keys = sorted(set(state) - set(written))
    report.clients = client_checks(written, base)
    report.unexpected_keys, report.max_abs_diff = apply_file(base, written, expected=state)
    lora_out = _output(base, inputs)
    moved = float((tuned_out - base_out).abs().mean())
    report.approximation = {
        "rank": rank,
        "unet_output_max_abs_diff": float((lora_out - tuned_out).abs().max()),
        "unet_output_mean_abs_diff": float((lora_out - tuned_out).abs().mean()),
        "fine_tune_moved_output_by": moved,  # mean |tuned - base| on the same input
        "relative_output_diff": float((lora_out - tuned_out).abs().mean()) / moved if moved else 0.0,
        "weight_energy_kept": energy,
        "resolution": resolution,
        "not_in_the_lora": "biases, normalisation layers, conv_in/conv_out, time embedding"
                           + (", the fine-tuned text encoder" if text_trained else ""),
    }
    return report


def load_base_unet(model: str):
    """The base model's UNet alone, in float32 on the CPU (a single-file checkpoint loads whole, then
    only its UNet is kept)."""
    from diffusers import UNet2DConditionModel

    from studio import models

    ref = models.resolve(model)
    if ref.is_file:
        return models.load_pipeline(ref, "cpu", torch.float32).unet.eval()
    return UNet2DConditionModel.from_pretrained(ref.source, subfolder="unet", torch_dtype=torch.float32).eval()


def extract_from_run(run_dir: Path, rank: int) -> ExportReport:
    """Extract a LoRA at `rank` from a finished full fine-tune's folder (the CLI's `extract-lora`): the
    fine-tuned UNet from its adapter folder, the base named in its config.yaml. The file goes beside the
    model; its report joins export_check.yaml (replacing an earlier one for the same rank)."""
    from diffusers import UNet2DConditionModel

    from studio.adapters import checks, find_adapter_dir, metadata, read_meta
    from studio.config import load_run_config
    from studio.errors import StudioError
    from studio.paths import RunPaths

    adapter_dir = find_adapter_dir(Path(run_dir))
    if read_meta(adapter_dir).kind != "full":
        raise StudioError(f"'{run_dir}' holds a {read_meta(adapter_dir).kind} adapter, not a full fine-tune; "
                          "a LoRA is extracted from a DreamBooth (method 'full') run.")
    if not 1 <= rank <= 1024:
        raise StudioError(f"The rank must be from 1 to 1,024, got {rank}.")
    config = RunPaths(adapter_dir.parent).config
    values = load_run_config(config) if config.exists() else {}
    base_model = values.get("model") or read_meta(adapter_dir).base_model
    tuned = UNet2DConditionModel.from_pretrained(str(adapter_dir), subfolder="unet", torch_dtype=torch.float32).eval()
    base = load_base_unet(base_model)
    report = extract_and_check(adapter_dir, tuned, base, rank, int(values.get("resolution") or 512),
                               bool(values.get("train_text_encoder")))
    scheduler = adapter_dir / "scheduler" / "scheduler_config.json"
    prediction = json.loads(scheduler.read_text(encoding="utf-8")).get("prediction_type", "epsilon") \
        if scheduler.exists() else "epsilon"
    metadata.stamp_reports(adapter_dir, [report], metadata.family_from(tuned.config, prediction))
    reports = [r for r in checks.read_reports(adapter_dir) if r.file != report.file] + [report]
    checks.write_reports(adapter_dir, reports)
    return report
