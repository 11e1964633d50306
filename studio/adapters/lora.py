"""LoRA on the UNet's attention projections, through peft; saved in diffusers' LoRA format.

Same small interface as every adapter module: attach, trainable_parameters, save, load_into,
set_scales.
"""

from __future__ import annotations

from pathlib import Path

from studio.paths import LORA_WEIGHTS, staging, swap_into_place

KIND = "lora"


def attach(unet, rank: int, alpha: float, target_modules: list[str]) -> None:
    """Freeze the UNet and add one trainable LoRA (adapter name 'default') to the target modules."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    # Gaussian init of A with B = 0 (Hu et al. 2021): the adapter starts as an exact no-op.
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    unet.add_adapter(config)


def trainable_parameters(unet) -> list:
    return [p for name, p in unet.named_parameters() if "lora_" in name and p.requires_grad]


def state_dict(unet) -> dict:
    """The UNet's LoRA weights with diffusers' key names (what save_lora_weights expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save(unet, out_dir: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` in diffusers format, atomically (temp folder, rename)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    tmp = staging(out_dir)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=weights, weight_name=LORA_WEIGHTS,
                                              safe_serialization=True)
    return swap_into_place(tmp, out_dir)


def load_into(pipe, adapter_dir: Path, name: str) -> None:
    pipe.load_lora_weights(str(adapter_dir), weight_name=LORA_WEIGHTS, adapter_name=name)


def set_scales(pipe, names: list[str], scales: list[float]) -> None:
    """Set adapter strengths in place: no weights are reloaded."""
    pipe.enable_lora()
    pipe.set_adapters(names, adapter_weights=scales)
