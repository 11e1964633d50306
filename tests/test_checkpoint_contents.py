"""What a checkpoint holds: exactly the weights that train, for every adapter method; the frozen base
model (text encoder included) is never trainable and never written."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from studio import checkpoints, train
from studio.config import build_config
from studio.paths import RunPaths
from tests.helpers import loaded_pipeline

# method -> what each key of trainable.safetensors must look like
ADAPTER_KEYS = {
    "lora": lambda k: k.startswith("unet.") and ".lora_" in k,
    "dora": lambda k: k.startswith("unet.") and ".lora_" in k,
    "loha": lambda k: k.startswith("unet.") and ".hada_" in k,
    "lokr": lambda k: k.startswith("unet.") and ".lokr_" in k,
    "embedding": lambda k: k.endswith("token_embedding.weight"),
    "pivotal": lambda k: (k.startswith("unet.") and ".lora_" in k) or k.endswith("token_embedding.weight"),
    "custom": lambda k: (k.startswith("unet.") and ".attn2.to_" in k) or k.endswith("token_embedding.weight"),
}


@pytest.mark.parametrize("method", list(ADAPTER_KEYS))
def test_checkpoint_holds_only_adapter_tensors(method, dataset_dir, tiny_model, tmp_path):
    cfg = build_config(values=dict(model="tiny", dataset=str(dataset_dir), method=method, steps=2,
                                   learning_rate=1e-2, sample_every=0, sample_prompts=[], checkpoint_every=1))
    with loaded_pipeline() as seen:
        result = train.run(cfg, tmp_path / "run")
    assert result.status == "completed", result.message
    pipe = seen["pipe"]
    for component in ("vae", "text_encoder"):  # nothing of the base model may require grad
        frozen = [n for n, p in getattr(pipe, component).named_parameters()
                  if p.requires_grad and not n.endswith("token_embedding.weight")]
        assert frozen == [], f"{component} weights left trainable: {frozen[:3]}"

    with safe_open(str(RunPaths(result.run_dir).checkpoint(1) / checkpoints.TRAINABLE), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes and all(ADAPTER_KEYS[method](k) for k in shapes), sorted(shapes)[:5]
    rows = {k: s for k, s in shapes.items() if k.endswith("token_embedding.weight")}
    if method in ("embedding", "pivotal", "custom"):  # the new token rows only, not the vocabulary
        dim = pipe.text_encoder.config.hidden_size
        assert list(rows.values()) == [(1, dim)] and next(iter(rows)).startswith("text_encoder."), rows
    else:
        assert rows == {}
    unet_trainable = {f"unet.{n}" for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert unet_trainable == {k for k in shapes if k.startswith("unet.")}
    size = sum(torch.Size(s).numel() for s in shapes.values())
    text = sum(p.numel() for p in pipe.text_encoder.parameters())
    assert size < text / 4  # far below one text encoder: the bug wrote the whole encoder beside the LoRA
