"""Every community file the studio writes carries kohya's ss_* and Stability's modelspec.* fields, read
back here from the safetensors header, and stamping them leaves the tensors as they were."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio import train
from studio.adapters import checks, metadata
from studio.config import build_config
from studio.paths import RunPaths

RUNS = {  # method -> extra settings; every run: 2 steps on the tiny model at 64 px
    "loha": {},
    "embedding": {},
    "custom": {},
    "full": {"extract_rank": 2},
}


@pytest.fixture(scope="module", params=["lora", *RUNS])
def run(request, trained_run, dataset_dir, tiny_model, tmp_path_factory):
    if request.param == "lora":
        return request.param, trained_run, 30
    cfg = build_config(values=dict(model="tiny", dataset=str(dataset_dir), method=request.param, steps=2,
                                   learning_rate=1e-3, sample_every=0, sample_prompts=[], **RUNS[request.param]))
    result = train.run(cfg, tmp_path_factory.mktemp("meta") / request.param)
    assert result.status == "completed", result.message
    return request.param, result.run_dir, 2


def community_files(adapter_dir):
    return sorted({r.file: r.format for r in checks.read_reports(adapter_dir)
                   if metadata.role_of(r.format) is not None}.items())


def test_every_community_file_says_where_it_came_from(run):
    method, run_dir, steps = run
    adapter = RunPaths(run_dir).adapter
    files = community_files(adapter)
    assert files, "the run wrote no community file"
    for file, fmt in files:
        meta = metadata.read(adapter / file)
        role = metadata.role_of(fmt)
        suffix = {"network": "/lora", "embedding": "/textual-inversion", "model": ""}[role]
        assert meta["modelspec.sai_model_spec"] == "1.0.1"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1" + suffix, (file, meta)
        assert meta["modelspec.resolution"] == "64x64" and meta["ss_resolution"] == "(64, 64)"
        assert meta["modelspec.prediction_type"] == "epsilon"
        assert meta["modelspec.title"] == meta["ss_output_name"] == RunPaths(run_dir).run_id
        assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
        assert meta["ss_sd_model_name"] == "tiny"
        assert meta["ss_max_train_steps"] == meta["ss_steps"] == str(steps)
        assert meta["modelspec.trigger_phrase"] == "sks" and "sks" in meta["modelspec.usage_hint"]
        tags = json.loads(meta["ss_tag_frequency"])
        assert tags == {"bear_plushie": {"a photo of sks stuffed animal": 5}}, tags  # 5 captions, one tag each
        assert meta["ss_num_train_images"] == "5"
        if role == "network":
            assert meta["ss_network_module"] in ("networks.lora", "lycoris.kohya")
        impl = "diffusers" if role == "network" else metadata.IMPL_STABILITY
        assert meta["modelspec.implementation"] == impl


def test_network_dim_and_alpha_are_the_files_own(run):
    method, run_dir, _ = run
    adapter = RunPaths(run_dir).adapter
    for file, fmt in community_files(adapter):
        meta = metadata.read(adapter / file)
        if fmt in ("kohya", "lycoris"):
            assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8.0")  # the defaults
            if fmt == "lycoris":
                assert meta["ss_network_module"] == "lycoris.kohya"
                assert json.loads(meta["ss_network_args"])["algo"] == method
        if fmt == "kohya-extracted":  # kohya's extraction: dim = alpha = the rank
            assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "2.0")
            with safe_open(str(adapter / file), "pt") as f:
                downs = [f.get_slice(k).get_shape() for k in f.keys() if k.endswith("lora_down.weight")]
            assert downs and all(s[0] <= 2 for s in downs)
        if fmt == "lora-diff":
            assert "ss_network_dim" not in meta


def test_custom_embeddings_name_their_own_token(run):
    method, run_dir, _ = run
    if method != "custom":
        pytest.skip("Custom Diffusion only")
    file = RunPaths(run_dir).adapter / "embeddings_a1111" / "sks.safetensors"
    assert metadata.read(file)["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"


def test_stamping_keeps_tensors_and_earlier_fields(tmp_path):
    path = tmp_path / "f.safetensors"
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).half()}
    save_file(tensors, str(path), metadata={"format": "pt", "keep": "me"})
    metadata.stamp(path, {"ss_output_name": "x", "modelspec.title": "é ü"})
    metadata.stamp(path, {"ss_output_name": "y"})
    assert metadata.read(path) == {"format": "pt", "keep": "me", "ss_output_name": "y", "modelspec.title": "é ü"}
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_output_name"] == "y"
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with open(path, "rb") as f:  # the header is padded so the data stays 8-byte aligned
        assert int.from_bytes(f.read(8), "little") % 8 == 0


def test_sdxl_and_sd2_fields():
    from studio.adapters import AdapterMeta

    meta = AdapterMeta(kind="lora", base_model="x", token="sks", class_word="dog", step=10, rank=16, alpha=8.0)
    xl = metadata.fields("network", "kohya", metadata.Family(sdxl=True), {}, meta, "f.safetensors")
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert xl["ss_base_model_version"] == "sdxl_base_v1-0" and xl["modelspec.resolution"] == "1024x1024"
    assert xl["modelspec.implementation"] == metadata.IMPL_STABILITY  # kohya: SDXL LoRAs are sgm-layout
    assert (xl["ss_network_dim"], xl["ss_network_alpha"]) == ("16", "8.0")
    v = metadata.fields("embedding", "a1111-embedding", metadata.Family(v2=True, v_prediction=True), {}, meta, "e.safetensors")
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/textual-inversion"
    assert v["ss_base_model_version"] == "sd_v2_v" and v["modelspec.prediction_type"] == "v"
