"""OFT: orthogonal fine-tuning (Qiu et al. 2023; Liu et al. 2024's block-diagonal form) through peft.

Each adapted linear layer keeps its weight W and learns a block-diagonal rotation R of its input,
R = Cayley(Q) with Q skew-symmetric per block (peft's OFTConfig, `oft_block_size` inputs per block):
the layer computes W R^T x. Rotations keep the angles between W's neurons, which the method's authors
found preserves what the model already draws better than an additive update. Q = 0 is R = I: the
adapter starts as an exact no-op.

The strength: peft gives OFT none (its set_scale is a no-op). Here scale s rotates by Cayley(s Q): 0 is
exactly the base (R = I), 1 the trained rotation, values between turn part of the way. The Playground's
scale reaches it through `scale_layer`, which studio.adapters.set_scales calls for OFT layers.

Files: the native copy is peft's (`adapter_model.safetensors` + `adapter_config.json`, as LoHa/LoKr).
For other clients: no community format shares peft's rotation (LyCORIS's and kohya's OFT rotate each
layer's output blocks, peft rotates its input, and neither is the other), so the trained layers are
written merged, `<kohya module name>.diff` = W R^T - W, which ComfyUI and AUTOMATIC1111 add to the
weight as it is (checked by their rules, studio.adapters.clients); exact at strength 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from studio.adapters.base import ATTENTION, Capabilities, Setup
from studio.fields import check, setting
from studio.paths import PEFT_WEIGHTS

log = logging.getLogger(__name__)


@dataclass
class Settings:
    oft_block_size: int = setting("OFT: inputs per rotation block (each layer's input width must be a multiple "
                                  "of it); larger blocks rotate more freely with more parameters.", 32,
                                  label="OFT block size", bounds=(2, 1024))
    target_modules: list[str] = setting("UNet linear layers that get a rotation (attention projections by default).",
                                        factory=lambda: list(ATTENTION), label="Target modules")

    def __post_init__(self) -> None:
        check(self)
        if not self.target_modules:
            from studio.errors import StudioError

            raise StudioError("Setting 'target_modules' must name at least one module, e.g. to_q, to_k, to_v, to_out.0.")


KINDS = ("oft",)
CAPABILITIES = {"oft": Capabilities("peft", weights_file=PEFT_WEIGHTS)}
SETTINGS = {"oft": Settings}
DIFF_WEIGHTS = "oft_diff.safetensors"  # the trained layers merged, for ComfyUI and AUTOMATIC1111


def attach(pipe, setup: Setup) -> None:
    """Freeze the whole model and add one trainable OFT adapter (name 'default') to the UNet."""
    from peft import OFTConfig

    from studio.adapters.lora import freeze

    freeze(pipe)
    s = setup.settings
    pipe.unet.add_adapter(OFTConfig(r=0, oft_block_size=s.oft_block_size, target_modules=list(s.target_modules)))
    _give_scaling(pipe.unet, "default")


def _give_scaling(unet, name: str) -> None:
    """peft's OFT layers have a set_scale that reads a `scaling` they never create, so diffusers' set_adapters
    (which calls it on every adapter layer) fails on them; with this entry it passes (peft's set_scale then
    does nothing, and `scale_layer` sets the strength)."""
    for _, layer in _layers(unet, name):
        if not isinstance(getattr(layer, "scaling", None), dict):
            layer.scaling = {}
        layer.scaling[name] = 1.0


def trainable_parameters(pipe) -> list:
    return [p for name, p in pipe.unet.named_parameters() if p.requires_grad and ".oft_R." in name]


def save(pipe, out_dir: Path) -> Path:
    from studio.adapters import lycoris

    return lycoris.save(pipe, out_dir)  # peft's own files, whatever the peft type


def load_into(pipe, adapter_dir: Path, name: str) -> None:
    """Add the saved adapter to `pipe.unet` under `name`, in eval mode, keeping each layer's trained Q for
    `scale_layer`."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from studio.adapters import lycoris

    adapter_dir = Path(adapter_dir)
    config = lycoris.read_config(adapter_dir)
    state = load_file(str(adapter_dir / PEFT_WEIGHTS))
    pipe.unet.add_adapter(config, adapter_name=name)
    result = set_peft_model_state_dict(pipe.unet, state, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}" in k and ".oft_R." in k]
    if missing or result.unexpected_keys:
        pipe.unet.delete_adapters(name)
        raise KeyError(f"{len(missing)} missing, {len(result.unexpected_keys)} unexpected adapter weights")
    _give_scaling(pipe.unet, name)
    pipe.unet.eval()


def _layers(unet, adapter: str):
    return [(path, m) for path, m in unet.named_modules() if adapter in getattr(m, "oft_R", {})]


def scale_layer(layer, name: str, scale: float) -> bool:
    """Rotate `layer` by Cayley(scale Q) for adapter `name` (Q its trained generator, kept on first use);
    False where the layer holds no OFT adapter of that name (the caller scales it otherwise)."""
    import torch

    rotation = getattr(layer, "oft_R", {})
    if name not in rotation:
        return False
    weight = rotation[name].weight
    kept = layer.__dict__.setdefault("_studio_oft_trained", {})
    if name not in kept:
        kept[name] = weight.detach().clone()
    with torch.no_grad():
        torch.mul(kept[name], float(scale), out=weight.data)
    return True


# ---------------------------------------------------------------------------- the merged layers, for clients

def merged_delta(layer, adapter: str = "default"):
    """W R^T - W of one peft OFT linear layer (what peft's merge writes, less the weight)."""
    import torch

    weight = layer.get_base_layer().weight.detach()
    rotation = layer.get_delta_weight(adapter).detach().to(weight.device, torch.float32)
    merged = (rotation @ weight.to(torch.float32).t()).t()
    return merged - weight.to(torch.float32)


def diff_state_dict(pipe, adapter: str = "default") -> dict:
    from studio.adapters.lora import kohya_module_name

    out = {}
    for path, layer in _layers(pipe.unet, adapter):
        dtype = layer.get_base_layer().weight.dtype
        delta = merged_delta(layer, adapter).to(dtype)
        out[f"{kohya_module_name(path, pipe.unet)}.diff"] = (delta if delta.is_meta else delta.to("cpu")).contiguous()
    return out


def export(adapter_dir: Path, pipe) -> list:
    """Write DIFF_WEIGHTS and check it with ComfyUI's and AUTOMATIC1111's rules on the live model."""
    from safetensors.torch import save_file

    from studio.adapters import clients
    from studio.adapters.checks import ExportReport

    path = Path(adapter_dir) / DIFF_WEIGHTS
    state = diff_state_dict(pipe)
    tmp = path.with_name(path.name + ".partial")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    report = ExportReport(file=path.name, format="full-diff", loader="ComfyUI and AUTOMATIC1111 rules (studio.adapters.clients)")
    report.clients = clients.client_checks(
        state, clients.Layout(pipe.unet, []), {clients.COMFYUI: True, clients.A1111: True, clients.KOHYA: False},
        {clients.KOHYA: "networks/lora.py reads lora_down/lora_up only; kohya's own OFT rotates a layer's "
                        "output, not its input as this adapter does, so no kohya file holds it"})
    comfy = report.clients[0]
    report.unexpected_keys = [] if comfy["matched"] == comfy["total"] else list(comfy["unmatched"])
    if comfy["max_abs_diff"] is not None:  # the clients' tolerance (1e-3 of the change) in absolute terms
        report.max_abs_diff = comfy["max_abs_diff"]
        report.tolerance = max(clients.TOLERANCE * comfy["change"], clients.ROUNDING * comfy["scale"])
    return [report]


# ---------------------------------------------------------------------------- taking a run home

def client_files(kind: str, folder: Path, name: str, token: str) -> list[tuple]:
    from studio.adapters.base import existing

    return existing([(Path(folder) / DIFF_WEIGHTS, f"{name}.safetensors", "lora")])


def diffusers_code(kind: str, folder: Path, token: str, base: str, scale: float, prompt: str) -> str:
    from studio.adapters import lycoris
    from studio.adapters.base import pipeline_code

    return pipeline_code(base, lycoris.peft_lines(folder), prompt)
