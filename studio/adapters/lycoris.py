"""LoHa and LoKr (LyCORIS, Yeh et al. 2024) on the UNet through peft; saved in peft's own format.

The adapter contract of studio.adapters.base, as `lora.py`. diffusers' `load_lora_weights` refuses these files (it wants 'lora' in
every key), so the native copy is peft's: `adapter_model.safetensors` (get_peft_model_state_dict)
plus `adapter_config.json`, loaded back with add_adapter + set_peft_model_state_dict. The adapter
lives in the UNet's peft_config like a LoRA, so `studio.adapters.set_scales` works for it unchanged.

`export` also writes `lycoris.safetensors` with the kohya/LyCORIS key names AUTOMATIC1111 and
ComfyUI read, and checks it by loading it with the `lycoris-lora` package onto a fresh UNet. Module
names follow `lora.kohya_module_name`: diffusers' layout for SD 1.x/2.x, the LDM layout
(`lora_unet_input_blocks_4_1_...`) for SDXL, as kohya's and LyCORIS's SDXL trainers write them.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from studio.adapters.base import Capabilities, LowRank, Setup
from studio.adapters.checks import ExportReport
from studio.adapters.lora import _fixed_unet_input, kohya_module_name, ldm_module_name
from studio.errors import StudioError
from studio.fields import setting
from studio.paths import LYCORIS_EXPORT, PEFT_CONFIG, PEFT_WEIGHTS, staging, swap_into_place

log = logging.getLogger(__name__)


@dataclass
class LokrSettings(LowRank):
    lokr_factor: int = setting("LoKr: factor of the Kronecker decomposition; -1 picks the most square split.", -1,
                               label="LoKr factor", bounds=(-1, 1024))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lokr_factor == 0:
            raise StudioError("Setting 'lokr_factor' must be -1 (the most square split) or a factor of 1 or more, got 0.")


KINDS = ("loha", "lokr")
WEIGHTS = PEFT_WEIGHTS  # the file whose version the playground watches
CAPABILITIES = {kind: Capabilities("peft", weights_file=WEIGHTS) for kind in KINDS}
SETTINGS = {"loha": LowRank, "lokr": LokrSettings}
PARAM_PREFIXES = ("hada_", "lokr_")


def _config(setup: Setup):
    from peft import LoHaConfig, LoKrConfig

    s = setup.settings
    # peft's default init: LoHa w2_a = 0 and LoKr w2 = 0, so the adapter starts as an exact no-op.
    if setup.kind == "loha":
        return LoHaConfig(r=s.rank, alpha=s.alpha, target_modules=s.modules())
    return LoKrConfig(r=s.rank, alpha=s.alpha, target_modules=s.modules(), decompose_factor=s.lokr_factor)


def attach(pipe, setup: Setup) -> None:
    """Freeze the whole model and add one trainable LoHa/LoKr adapter (name 'default') to the UNet."""
    from studio.adapters.lora import freeze

    freeze(pipe)
    pipe.unet.add_adapter(_config(setup))


def trainable_parameters(pipe) -> list:
    return [p for name, p in pipe.unet.named_parameters()
            if p.requires_grad and any(f".{prefix}" in name for prefix in PARAM_PREFIXES)]


def state_dict(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft's keys without the adapter name, e.g. `down_blocks.0...attn1.to_q.hada_w1_a`."""
    import torch
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save(pipe, out_dir: Path) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json`, atomically (temp folder, rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = staging(out_dir)
    tmp.mkdir(parents=True)
    save_file(state_dict(pipe.unet), str(tmp / PEFT_WEIGHTS))
    config = pipe.unet.peft_config["default"]
    # to_dict holds a set (target_modules) and an enum (peft_type): json needs lists and strings.
    (tmp / PEFT_CONFIG).write_text(json.dumps(config.to_dict(), indent=2, default=_jsonable), encoding="utf-8")
    return swap_into_place(tmp, out_dir)


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):  # enum
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def read_config(adapter_dir: Path):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    data = json.loads((Path(adapter_dir) / PEFT_CONFIG).read_text(encoding="utf-8"))
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[data["peft_type"]]
    known = cls.__dataclass_fields__
    return cls(**{k: v for k, v in data.items() if k in known and k != "peft_type"})


def load_into(pipe, adapter_dir: Path, name: str) -> None:
    """Add the saved adapter to `pipe.unet` under `name`, in eval mode (dropout never runs)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = read_config(adapter_dir)
    state = load_file(str(adapter_dir / PEFT_WEIGHTS))
    pipe.unet.add_adapter(config, adapter_name=name)
    result = set_peft_model_state_dict(pipe.unet, state, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}" in k and any(p in k for p in PARAM_PREFIXES)]
    if missing or result.unexpected_keys:
        pipe.unet.delete_adapters(name)
        raise KeyError(f"{len(missing)} missing, {len(result.unexpected_keys)} unexpected adapter weights")
    for module in pipe.unet.modules():
        if any(hasattr(module, f"{p}w1") or hasattr(module, f"{p}w1_a") for p in PARAM_PREFIXES):
            module.eval()
    pipe.unet.eval()


# ----------------------------------------------------------------------------- community format

def kohya_state_dict(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft LoHa/LoKr weights under LyCORIS/kohya names, with the `.alpha` each module needs.

    Names: `lora_unet_` + the module path with '.' -> '_'. For SD 1.x/2.x the path is diffusers' module
    path, which is what kohya's sd-scripts and LyCORIS write (their SD 1.x UNet uses diffusers' names)
    and what A1111 (`convert_diffusers_name_to_compvis`) and ComfyUI map onto the LDM checkpoint; for
    SDXL it is the LDM path, because their SDXL UNet is the LDM one. Parameter names
    are the same in peft and LyCORIS (hada_w1_a ... , lokr_w1 / lokr_w1_a ...), and so are the
    products: LoHa dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r; LoKr dW = kron(w1, w2) * alpha / r.
    """
    import torch

    config = unet.peft_config[adapter_name]
    state = state_dict(unet, adapter_name)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        path, param = key.rsplit(".", 1)
        modules.setdefault(path, {})[param] = value
    out = {}
    for path, params in modules.items():
        name = kohya_module_name(path, unet)
        rank, alpha = _rank_alpha(config, path)
        params = _rebuildable_lokr(params, unet.get_submodule(path).get_base_layer().weight.shape)
        if "lokr_w1" in params and "lokr_w2" in params:
            # LyCORIS ignores alpha when neither factor is low-rank (scale 1): fold peft's alpha / r in.
            params = {**params, "lokr_w2": params["lokr_w2"] * (alpha / rank)}
            alpha = float(rank)
        out.update({f"{name}.{param}": value for param, value in params.items()})
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def _rebuildable_lokr(params: dict, weight_shape) -> dict:
    """LoKr factors as written, or, where the LyCORIS loader would rebuild other shapes from them,
    the same Kronecker product with the second factor written whole (`lokr_w2`, no low-rank pair).

    LyCORIS's loader (lycoris/modules/lokr.py `make_module_from_state_dict`) does not read the split
    from the file: it infers a `factor` from the tensors' shapes and factorises the layer afresh. For a
    3x3 convolution with a low-rank w2 it counts the kernel into the input width (w2_b is
    (r, in_n * 9)), so on layers whose input and output widths differ (SD 1.5's up_blocks.2.resnets.0.conv1,
    1920 -> 640) it infers another factor and refuses the file. With w2 whole its input width is right,
    and peft's split (`factorization`, the same as LyCORIS's) is found again. LoHa needs nothing of this."""
    if not any(k.startswith("lokr_") for k in params) or "lokr_w2_a" not in params:
        return params
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    if lycoris_lokr_shapes(shapes, tuple(weight_shape)) == shapes:
        return params
    w2 = params["lokr_w2_a"] @ params["lokr_w2_b"]
    out_k = w2.shape[0]
    w1 = params["lokr_w1"] if "lokr_w1" in params else params["lokr_w1_a"] @ params["lokr_w1_b"]
    w2 = w2.reshape(out_k, weight_shape[1] // w1.shape[1], *weight_shape[2:])
    return {"lokr_w1": w1, "lokr_w2": w2}


def lycoris_lokr_shapes(shapes: dict[str, tuple], weight_shape: tuple) -> dict[str, tuple]:
    """The LoKr tensor shapes lycoris-lora's loader builds for a file module with these `shapes`
    (lycoris/modules/lokr.py `make_module_from_state_dict`, then `LokrModule.__init__`): the factor it
    infers, and the layer factorised with it by `factorization` (lycoris/functional/general.py)."""
    w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
    w2 = shapes.get("lokr_w2") or (shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1])
    full = "lokr_w1_a" not in shapes and "lokr_w2_a" not in shapes
    rank = 1 if full else (shapes.get("lokr_w1_a") or shapes["lokr_w2_a"])[1]
    out_dim, in_dim = w1[0] * w2[0], w1[1] * w2[1]  # w2_b's width counts the kernel for convolutions
    if (w1[0], w1[1]) == (_lycoris_factorization(out_dim)[0], _lycoris_factorization(in_dim)[0]):
        factor = -1
    else:
        f1 = max(shapes["lokr_w1"]) if "lokr_w1" in shapes else max(w1)
        f2 = max(shapes["lokr_w2"]) if "lokr_w2" in shapes else max(w2)
        fits = lambda f: out_dim % f == 0 and in_dim % f == 0 and f in (w1[0], w2[0]) and f in (w1[1], w2[1])  # noqa: E731
        factor = f1 if fits(f1) else f2 if fits(f2) else min(f1, f2)
    out_l, out_k = _lycoris_factorization(weight_shape[0], factor)
    in_m, in_n = _lycoris_factorization(weight_shape[1], factor)
    kernel = tuple(weight_shape[2:])
    both = "lokr_w1" not in shapes and "lokr_w2" not in shapes
    built = {}
    if both and rank < max(out_l, in_m) / 2 and not full:
        built.update(lokr_w1_a=(out_l, rank), lokr_w1_b=(rank, in_m))
    else:
        built["lokr_w1"] = (out_l, in_m)
    if rank >= max(out_k, in_n) / 2 or full:
        built["lokr_w2"] = (out_k, in_n, *kernel)
    else:
        k = 1
        for size in kernel:
            k *= size
        built.update(lokr_w2_a=(out_k, rank), lokr_w2_b=(rank, in_n * k))
    return built


def _lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """lycoris/functional/general.py `factorization`: two factors of `dimension`, the smaller first:
    with factor > 0 dividing it, (factor, dimension / factor); otherwise the divisor pair nearest the
    square root whose smaller part is at most `factor` (any, for -1)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _rank_alpha(config, path: str) -> tuple[int, float]:
    """Rank and alpha of one module (peft's rank_pattern / alpha_pattern override by name suffix)."""
    rank = next((r for k, r in config.rank_pattern.items() if path.endswith(k)), config.r)
    alpha = next((a for k, a in config.alpha_pattern.items() if path.endswith(k)), config.alpha)
    return int(rank), float(alpha)


def export(adapter_dir: Path, pipe) -> list[ExportReport]:
    """Write `lycoris.safetensors` beside the native copy and check it with the LyCORIS loader."""
    from safetensors.torch import save_file

    path = Path(adapter_dir) / LYCORIS_EXPORT
    tmp = path.with_name(path.name + ".partial")
    state = kohya_state_dict(pipe.unet)
    save_file(state, str(tmp), metadata={"ss_network_module": "lycoris.kohya"})
    tmp.replace(path)
    report = check_export(path, pipe)
    report.clients = client_checks(state, pipe)
    return [report]


def client_checks(state: dict, pipe) -> list[dict]:
    """ComfyUI's and AUTOMATIC1111's own LoHa/LoKr rules on the file, outputs on the live model; kohya's
    networks/lora.py reads LoRA only (its tools take LyCORIS files through lycoris.kohya, checked above)."""
    from studio.adapters import clients
    from studio.adapters.lora import client_layout

    note = {clients.KOHYA: "networks/lora.py reads lora_down/lora_up only; kohya's tools load this file "
                           "through LyCORIS (network_module lycoris.kohya), which the lycoris-lora check reads"}
    return clients.client_checks(state, client_layout(pipe),
                                 {clients.COMFYUI: True, clients.A1111: True, clients.KOHYA: False}, note)


def check_export(path: Path, pipe) -> ExportReport:
    """Load `path` with lycoris-lora's kohya loader onto a fresh copy of the base UNet and compare
    its output with the studio's adapted UNet (adapter 'default' at scale 1) on a fixed input."""
    report = ExportReport(file=Path(path).name, format="lycoris",
                          loader="lycoris-lora kohya.create_network_from_weights")
    try:
        from lycoris.kohya import create_network_from_weights
    except ImportError:
        report.note = "the lycoris-lora package is not installed (pip install lycoris-lora)."
        return report
    from safetensors.torch import load_file

    weights = load_file(str(path))
    ours = set(kohya_state_dict(pipe.unet))  # what the studio's adapter needs the file to hold
    report.missing_keys = sorted(ours - set(weights))
    report.unexpected_keys = sorted(set(weights) - ours)
    # The loader finds modules by the names the file uses. It is given a view of the studio's own base
    # layers (the Linear/Conv2d inside each peft layer, nothing copied) under those names: diffusers'
    # paths for SD 1.x/2.x, LDM paths for SDXL. It wraps them in LyCORIS modules without hooking them
    # (no apply_to), so the UNet itself runs as before.
    named, paths = _layer_view(pipe.unet)
    try:
        with _no_timestep_embedding_target():
            network, _ = create_network_from_weights(1.0, str(path), None, None, named, weights_sd=weights)
    except (TypeError, KeyError, ValueError, RuntimeError, AssertionError) as exc:
        report.note = f"the LyCORIS loader could not read the file ({exc.__class__.__name__}: {exc})."
        return report
    for module in network.unet_loras:  # what apply_to does, but for hooking the layers' forward
        network.add_module(module.lora_name, module)
    loaded = network.load_state_dict(weights, strict=False)
    built = {f"{lora.lora_name}.{k}" for lora in network.unet_loras for k in lora.state_dict()}
    report.missing_keys = sorted(set(report.missing_keys) | (built - set(weights))
                                 | set(_unloaded_modules(pipe.unet, network)))
    report.unexpected_keys = sorted(set(report.unexpected_keys) | set(loaded.unexpected_keys))
    if not network.unet_loras:
        report.note = "the LyCORIS loader recognised no module in the file."
        return report
    report.max_abs_diff = _compare_layers(pipe.unet, network, paths)
    return report


def _compare_layers(unet, network, paths: dict[str, str]) -> float:
    """Each LyCORIS module the loader built (base layer + its update, multiplier 1) against the studio's
    peft layer with adapter 'default', on one random input per layer (studio.adapters.probe)."""
    from studio.adapters import probe

    layers = dict(unet.named_modules())
    pairs = []
    for module in network.unet_loras:
        module.eval()  # no module dropout
        if module.lora_name not in paths:
            continue  # reported as unexpected: no layer of the studio's UNet has that name
        ours = layers[paths[module.lora_name]]

        def studio(x, layer=ours):
            with probe.only_adapter(layer, "default"):
                return layer(x)
        pairs.append((module.lora_name, studio, module.forward, [ours, module]))
    diff, worst = probe.max_output_diff(pairs)
    log.info("LyCORIS check: largest layer differences %s", worst)
    return diff


def _layer_view(unet) -> tuple[torch.nn.Module, dict[str, str]]:
    """A module tree holding the UNet's own base Linear/Conv2d layers (the same objects, nothing
    copied) at the paths a kohya/LyCORIS file names them by, e.g. `down_blocks.0...attn1.to_q` (SD 1.x)
    or `input_blocks.4.1.transformer_blocks.0.attn1.to_q` (SDXL); and {kohya module name: the UNet's
    path of the (peft) layer}."""
    import torch

    from studio.adapters import probe

    sdxl, root, paths = _is_sdxl(unet), torch.nn.Module(), {}
    for path, module in unet.named_modules():
        path = path.removesuffix(".base_layer")
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or _inside_adapter(path):
            continue
        try:
            name = ldm_module_name(path, unet.config) if sdxl else path
        except ValueError:  # a layer with no LDM name carries no weights in an SDXL file
            continue
        *parents, leaf = name.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.add_module(leaf, probe.base_layer(module))
        paths[kohya_module_name(path, unet)] = path
    return root, paths


def _inside_adapter(path: str) -> bool:
    """A layer that belongs to a peft adapter (lora_A.default, ...), not to the model."""
    return any(part.startswith(("lora_", "hada_", "lokr_")) for part in path.split("."))


@contextmanager
def _no_timestep_embedding_target():
    """lycoris-lora 4.1.3 lists both the class 'TimestepEmbedding' (for Anima) and the name
    'time_embedding.linear_1' as UNet targets, so on a diffusers UNet2DConditionModel the network
    its loader builds first (and then discards) asserts "duplicated lora name". Dropping the class
    for the call avoids that; which weights load where is decided afterwards, from the file alone."""
    from lycoris.kohya import LycorisNetworkKohya

    saved = LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE
    LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = [m for m in saved if m != "TimestepEmbedding"]
    try:
        yield
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = saved


def _unloaded_modules(unet, network) -> list[str]:
    """Adapted modules of the studio's UNet that the loader built no LyCORIS module for."""
    built = {lora.lora_name for lora in network.unet_loras}
    wanted = {kohya_module_name(k.rsplit(".", 1)[0], unet) for k in state_dict(unet)}
    return sorted(f"{name} (module)" for name in wanted - built)


def _is_sdxl(unet) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def _base_unet_copy(unet):
    """A fresh UNet with the base weights only: the adapter's wrappers taken off, nothing shared.
    (Tests measure an adapter's whole effect with it; the export check never copies the UNet.)"""
    import torch
    from diffusers import UNet2DConditionModel

    fresh = UNet2DConditionModel.from_config(unet.config)
    base = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items()
            if not any(f".{p}" in k for p in PARAM_PREFIXES)}
    fresh.load_state_dict(base, strict=True)
    return fresh.to(torch.float32).eval()


def _compare(unet, reference) -> float:
    """The studio's UNet (adapter 'default', the only one, at its trained scale 1) against the loader's
    on one fixed input (with SDXL's pooled text and size conditioning where the UNet takes them)."""
    import torch

    with torch.no_grad():
        return _compare_outputs(unet, reference)


def _compare_outputs(unet, reference) -> float:
    inputs = _fixed_unet_input(reference)
    was_training = unet.training
    unet.eval()
    dtype = unet.dtype
    cast = lambda v: v.to(unet.device, dtype if v.is_floating_point() else v.dtype)  # noqa: E731
    studio_inputs = {k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v))
                     for k, v in inputs.items()}
    studio = unet(**studio_inputs).sample
    unet.train(was_training)
    theirs = reference(**inputs).sample
    return float((studio.float().cpu() - theirs).abs().max())


# ---------------------------------------------------------------------------- taking a run home

def client_files(kind: str, folder: Path, name: str, token: str) -> list[tuple]:
    from studio.adapters.base import existing

    return existing([(Path(folder) / LYCORIS_EXPORT, f"{name}.safetensors", "lora")])


def diffusers_code(kind: str, folder: Path, token: str, base: str, scale: float, prompt: str) -> str:
    from studio.adapters.base import pipeline_code

    return pipeline_code(base, peft_lines(folder), prompt)


def peft_lines(folder: Path) -> str:
    return (f'from peft import PeftModel\npipe.unet = PeftModel.from_pretrained(pipe.unet, "{folder}")  '
            f'# {PEFT_WEIGHTS} + adapter_config.json')
