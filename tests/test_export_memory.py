"""The export checks after training work on the trained model itself: no copy of the UNet is made
(no copy.deepcopy of a module, no UNet built) while the community files are written and checked."""

from __future__ import annotations

import copy

import pytest
import torch

from studio import train
from studio.config import build_config


@pytest.fixture
def export_spy(monkeypatch):
    """Counts, while train._export runs only: UNets constructed, modules deep-copied, and the export's
    reports (so a test knows the checks ran)."""
    from diffusers import UNet2DConditionModel

    seen = {"unets": 0, "deepcopies": [], "inside": False, "reports": []}
    real_init, real_deepcopy, real_export = torch.nn.Module.__init__, copy.deepcopy, train._export

    def init(self, *args, **kwargs):  # every module's construction passes here (diffusers' own __init__
        seen["unets"] += seen["inside"] and isinstance(self, UNet2DConditionModel)  # is left untouched)
        real_init(self, *args, **kwargs)

    def deepcopy(obj, *args, **kwargs):
        if seen["inside"] and isinstance(obj, torch.nn.Module):
            seen["deepcopies"].append(type(obj).__name__)
        return real_deepcopy(obj, *args, **kwargs)

    def export(adapter, pipe, paths, emit, step, *args):
        seen["inside"] = True
        try:
            real_export(adapter, pipe, paths, emit, step, *args)
        finally:
            seen["inside"] = False
        from studio.adapters.checks import read_reports

        seen["reports"] = read_reports(paths.adapter)

    monkeypatch.setattr(torch.nn.Module, "__init__", init)
    monkeypatch.setattr(copy, "deepcopy", deepcopy)
    monkeypatch.setattr(train, "_export", export)
    return seen


@pytest.mark.parametrize("method,extra", [("lora", {}), ("dora", {"locon": True}), ("lora", {"train_text_encoder": True}),
                                          ("loha", {}), ("lokr", {}), ("custom", {}), ("pivotal", {}),
                                          ("embedding", {}), ("full", {"train_text_encoder": True})],
                         ids=["lora", "dora-locon", "lora-text", "loha", "lokr", "custom", "pivotal", "embedding",
                              "full"])
def test_export_checks_copy_no_unet(method, extra, export_spy, dataset_dir, tiny_model, tmp_path):
    cfg = build_config(values=dict(model="tiny", dataset=str(dataset_dir), method=method, steps=2,
                                   learning_rate=1e-3 if method == "full" else 1e-2, sample_every=0,
                                   sample_prompts=[], **extra))
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "completed", result.message
    reports = export_spy["reports"]
    assert reports and all(r.ok for r in reports), [r.summary() for r in reports]
    assert all(r.max_abs_diff is not None for r in reports)  # every check compared outputs
    assert export_spy["deepcopies"] == [] and export_spy["unets"] == 0


@pytest.mark.parametrize("method", ["lora", "lokr"])
def test_whole_unet_checks_run_at_the_training_resolution(method, export_spy, dataset_dir, tiny_model, tmp_path,
                                                          monkeypatch):
    """The clients' output comparison (and LyCORIS's) runs the UNet at the size the run trained at, not the
    model's native size (SD 1.5: 512 px, four times the pixels of a 256 px run)."""
    from diffusers import UNet2DConditionModel

    sizes = []
    real_forward = UNet2DConditionModel.forward

    def forward(self, sample, *args, **kwargs):
        if export_spy["inside"]:
            sizes.append(tuple(sample.shape[-2:]))
        return real_forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    cfg = build_config(values=dict(model="tiny", dataset=str(dataset_dir), method=method, steps=2, resolution=32,
                                   learning_rate=1e-2, sample_every=0, sample_prompts=[]))
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "completed", result.message
    assert all(r.ok for r in export_spy["reports"]), [r.summary() for r in export_spy["reports"]]
    native = UNet2DConditionModel.load_config(tiny_model / "unet")["sample_size"]
    assert sizes and set(sizes) == {(16, 16)} and native == 32  # 32 px through the tiny VAE's factor 2


def test_the_check_leaves_the_trained_unet_as_it_was(dataset_dir, tiny_model, tmp_path):
    """The file's adapter is loaded beside the studio's and removed again: same weights, same active
    adapter, same trainable parameters afterwards."""
    from studio.adapters import lora
    from tests.helpers import loaded_pipeline

    cfg = build_config(values=dict(model="tiny", dataset=str(dataset_dir), steps=2, learning_rate=1e-2,
                                   sample_every=0, sample_prompts=[]))
    with loaded_pipeline() as seen:
        result = train.run(cfg, tmp_path / "run")
    assert result.status == "completed", result.message
    unet = seen["pipe"].unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    report = lora.check_kohya_file(result.run_dir / "adapter" / lora.KOHYA_WEIGHTS, unet)
    assert report.ok, report.summary()
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == grads
    assert list(unet.peft_config) == ["default"] and unet.active_adapters() == ["default"]


def test_an_extraction_reads_the_base_unet_once(export_spy, dataset_dir, tiny_model, tmp_path):
    """A LoRA extracted from a DreamBooth run needs the base model's weights: one base UNet is read, the
    fine-tuned one is never copied."""
    cfg = build_config(values=dict(model="tiny", dataset=str(dataset_dir), method="full", steps=2,
                                   learning_rate=1e-3, sample_every=0, sample_prompts=[], extract_rank=2))
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "completed", result.message
    assert [r.format for r in export_spy["reports"]] == ["sd-single-file", "kohya-extracted"]
    assert export_spy["deepcopies"] == [] and export_spy["unets"] == 1


def test_the_latent_cache_encodes_in_batches(tiny_model):
    """The dataset (and the class images) go through the VAE a few images at a time, with the same
    posteriors as one call over all of them."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tiny_model), subfolder="vae").eval()
    pixels = torch.rand(19, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sizes, real = [], vae.encode
    vae.encode = lambda x: (sizes.append(len(x)), real(x))[1]
    mean, std = train.encode_latents(vae, pixels, "cpu", torch.float32, batch=8)
    assert sizes == [8, 8, 3]
    with torch.no_grad():
        whole = real(pixels).latent_dist
    assert torch.allclose(mean, whole.mean, atol=1e-5) and torch.allclose(std, whole.std, atol=1e-5)
    assert train.ENCODE_BATCH <= 16
