"""LoRA and DoRA on the UNet through peft; saved in diffusers' LoRA format.

The interface every adapter module shares: KINDS, HAS_SCALE, attach, trainable_parameters, save,
load_into. Scales are set for all peft kinds alike by `studio.adapters.set_scales`.
"""

from __future__ import annotations

from pathlib import Path

from studio.paths import LORA_WEIGHTS, staging, swap_into_place

KINDS = ("lora", "dora")
HAS_SCALE = True


def attach(pipe, cfg) -> None:
    """Freeze the UNet and add one trainable adapter (name 'default') to the configured modules."""
    from peft import LoraConfig

    from studio.adapters import target_modules

    pipe.unet.requires_grad_(False)
    # Gaussian init of A with B = 0 (Hu et al. 2021): the adapter starts as an exact no-op. DoRA
    # (Liu et al. 2024) adds a per-output-channel magnitude, initialised to the weight's norm.
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                        target_modules=target_modules(cfg), use_dora=cfg.method == "dora")
    pipe.unet.add_adapter(config)


def trainable_parameters(pipe) -> list:
    return [p for name, p in pipe.unet.named_parameters() if "lora_" in name and p.requires_grad]


def state_dict(unet) -> dict:
    """The UNet's LoRA/DoRA weights with diffusers' key names (what save_lora_weights expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save(pipe, out_dir: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` in diffusers format, atomically (temp folder, rename)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    tmp = staging(out_dir)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict(pipe.unet).items()}
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=weights, weight_name=LORA_WEIGHTS,
                                              safe_serialization=True)
    return swap_into_place(tmp, out_dir)


def load_into(pipe, adapter_dir: Path, name: str) -> None:
    pipe.load_lora_weights(str(adapter_dir), weight_name=LORA_WEIGHTS, adapter_name=name)
