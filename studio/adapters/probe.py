"""Export checks without a second model: the layers a file patches, compared one at a time.

A check used to read a community file into a full float32 copy of the UNet and run both UNets; on
SD 1.5 that held two extra copies (~3.4 GB each) after training and ran them at 512 px whatever the
training size. Here the loader under test puts what it read from the file onto the live model (as a
second peft adapter, or as LyCORIS modules around the same base layers), and each patched layer
computes its output twice on one random input: with the studio's own adapter, and with what the
loader built. Only the layers themselves are cast to float32 for the comparison, one at a time, and
every parameter gets its own dtype back bit for bit (float16 -> float32 -> float16 is exact).

What this checks: that every adapted layer of the studio's model gets, from the file, the same
function of its input. A layer the loader put nothing on (or something on that the studio's model
does not adapt) is reported by the caller as a missing (or unexpected) key.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable

import torch


@contextmanager
def float32(modules: Iterable[torch.nn.Module]):
    """The modules' parameters and buffers in float32 for the block; each gets its dtype back after."""
    saved = []
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                saved.append((tensor, tensor.dtype))
                tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in saved:
            tensor.data = tensor.data.to(dtype)


# The latent size a whole-UNet check runs at (studio.adapters.clients, the LyCORIS reference): the
# training resolution's, set by the run around its export; the UNet's own sample_size (SD 1.5: 512 px,
# four times the pixels of a 256 px run) where none is set, as in a check run by hand.
_LATENT: ContextVar[int | None] = ContextVar("studio_check_latent", default=None)


@contextmanager
def at_resolution(pixels: int, vae_scale_factor: int):
    """Whole-UNet checks inside the block run at `pixels` (the training resolution)."""
    token = _LATENT.set(max(8, int(pixels) // int(vae_scale_factor)))
    try:
        yield
    finally:
        _LATENT.reset(token)


def latent_size(unet) -> int:
    return _LATENT.get() or int(unet.config.sample_size)


def layer_input(layer: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
    """A random input for a Linear (2 x 3 tokens) or a Conv2d (one 8 x 8 map) base layer."""
    weight = layer.weight
    if isinstance(layer, torch.nn.Conv2d):
        x = torch.randn(1, layer.in_channels, 8, 8, generator=generator)
    elif isinstance(layer, torch.nn.Linear):
        x = torch.randn(2, 3, layer.in_features, generator=generator)
    else:
        raise TypeError(f"no random input for a {type(layer).__name__}")
    return x.to(weight.device, torch.float32)


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The plain Linear/Conv2d of a peft-wrapped layer (the module itself if it is not wrapped)."""
    return getattr(module, "base_layer", module)


@torch.no_grad()
def max_output_diff(pairs: list[tuple], seed: int = 0) -> tuple[float, dict]:
    """Largest |ours(x) - theirs(x)| over the layers, and the worst few by name.

    Args:
        pairs: (name, ours, theirs, modules[, make_input]): two functions of one input to compare;
            `modules` are those both functions run through (cast to float32 while this layer is
            compared). The input is `make_input(generator)`, or else a random input for the first
            module's base layer.
    Returns:
        (max abs difference over all layers, {name: difference} of the five largest).
    """
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for name, ours, theirs, modules, *make in pairs:
        with float32(modules):
            x = make[0](g) if make else layer_input(base_layer(modules[0]), g)
            diffs[name] = float((ours(x).float() - theirs(x).float()).abs().max())
    worst = dict(sorted(diffs.items(), key=lambda kv: -kv[1])[:5])
    return max(diffs.values(), default=0.0), worst


@contextmanager
def only_adapter(layer, name: str):
    """A peft layer with only adapter `name` active for the block; its active adapters and every
    parameter's requires_grad as they were after (peft's set_adapter changes both)."""
    grads = [(p, p.requires_grad) for p in layer.parameters()]
    active = list(layer.active_adapters)
    disabled = layer.disable_adapters
    layer.set_adapter(name)
    layer._disable_adapters = False
    try:
        yield layer
    finally:
        layer.set_adapter(active)
        layer._disable_adapters = disabled
        for p, flag in grads:
            p.requires_grad_(flag)


def adapter_pairs(unet, ours: str, theirs: str, modules: Iterable[str]) -> list:
    """(name, ours, theirs, modules) for each named peft layer holding both adapters."""
    table = dict(unet.named_modules())

    def run(layer, adapter):
        def forward(x):
            with only_adapter(layer, adapter):
                return layer(x)
        return forward

    return [(name, run(table[name], ours), run(table[name], theirs), [table[name]]) for name in sorted(modules)]
