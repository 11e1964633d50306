"""Training objectives: what the UNet's output is compared against, and how."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target for the scheduler's parametrisation (epsilon or v; Salimans & Ho 2022)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction type {kind!r}")


def instance_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32, whatever dtype the UNet ran in."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
