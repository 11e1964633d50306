"""Training objectives: what the UNet's output is compared against, and how it is weighted."""

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


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, eq. 9 and its v-prediction form).

    Args:
        gamma: the clamp; 5 in the paper. Low-noise steps (high SNR) are down-weighted to gamma / SNR.
    Returns:
        A (batch,) tensor: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v.
    """
    ratio = snr(scheduler, timesteps)
    clamped = torch.clamp(ratio, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clamped / (ratio + 1.0)
    return clamped / ratio


def prior_preservation_loss(prediction: torch.Tensor, target: torch.Tensor, n_instance: int,
                            prior_weight: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """DreamBooth's objective (Ruiz et al. 2023, eq. 2) on one batch whose first n_instance rows are
    instance images and the rest class images: MSE(instance) + prior_weight * MSE(class)."""
    w_instance = None if weights is None else weights[:n_instance]
    w_class = None if weights is None else weights[n_instance:]
    return (instance_loss(prediction[:n_instance], target[:n_instance], w_instance)
            + prior_weight * instance_loss(prediction[n_instance:], target[n_instance:], w_class))


def instance_loss(prediction: torch.Tensor, target: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32, whatever dtype the UNet ran in; optional per-sample weights."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights.float()).mean()
