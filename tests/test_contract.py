"""The adapter contract and the config in sections: every method keeps the contract, each setting belongs to
one place, a setting of another method is refused by name, config.yaml is written in sections, and runs
saved with the flat config of earlier versions still resume and draw."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import yaml

from studio import adapters, config, train
from studio.adapters import base
from studio.config import TrainConfig, build_config, load_run_config
from studio.errors import StudioError
from studio.generate import AdapterChoice, GenerateRequest, Playground
from tests.test_training_options import config as small_config
from tests.test_training_options import losses, same_curve, straight_run  # noqa: F401 (fixture)


def test_every_registered_method_keeps_the_contract():
    for kind, method in adapters.REGISTRY.items():
        assert kind in method.module.KINDS and isinstance(method.caps, base.Capabilities)
        assert dataclasses.is_dataclass(method.settings)
        method.settings()  # its defaults are valid
        if method.caps.scaling == "own":
            assert hasattr(method.module, "set_scale"), kind


def test_a_module_missing_part_of_the_contract_fails_at_registration():
    import types

    module = types.ModuleType("half_adapter")
    module.KINDS, module.CAPABILITIES, module.SETTINGS = ("half",), {"half": base.Capabilities("own")}, {}
    module.attach = module.trainable_parameters = module.save = lambda *a: None
    with pytest.raises(TypeError, match="lacks load_into"):
        base.methods_of(module)
    module.load_into = lambda *a: None
    with pytest.raises(TypeError, match="scales itself but half_adapter has no set_scale"):
        base.methods_of(module)


def test_each_setting_name_belongs_to_one_place():
    top = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("adapter", *config.SECTIONS)]
    sections = [f.name for cls in config.SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(top + sections) == len(set(top + sections))
    for method in adapters.REGISTRY.values():  # a method's settings never shadow a common one
        assert not set(method.setting_names()) & set(top + sections), method.kind


def test_the_method_choices_are_the_registry():
    assert config.field_kind("method")[1] == tuple(adapters.REGISTRY)


@pytest.mark.parametrize("method,setting,value", [("embedding", "rank", 4), ("lora", "lokr_factor", 2),
                                                  ("loha", "train_text_encoder", True), ("lora", "extract_rank", 4),
                                                  ("full", "initializer_token", "toy")])
def test_a_setting_of_another_method_is_refused_by_name(method, setting, value):
    with pytest.raises(StudioError, match=f"Setting '{setting}' works with the .*, not '{method}'; remove it"):
        build_config(values={"method": method, setting: value})
    with pytest.raises(StudioError, match=f"Setting '{setting}'"):
        build_config(overrides=[f"method={method}", f"{setting}={value}"])


def test_reads_by_flat_name_go_to_their_section():
    cfg = build_config(values=dict(method="lokr", lokr_factor=4, steps=7, min_snr_gamma=5.0))
    assert (cfg.lokr_factor, cfg.adapter.lokr_factor) == (4, 4)
    assert (cfg.steps, cfg.loop.steps) == (7, 7) and cfg.objective.min_snr_gamma == 5.0
    cfg.steps = 9  # a write by flat name lands in the section too
    assert cfg.loop.steps == 9 and "steps" not in vars(cfg)
    with pytest.raises(AttributeError, match="no setting 'rank' for method 'embedding'"):
        build_config(values=dict(method="embedding")).rank
    replaced = dataclasses.replace(cfg, steps=2)
    assert replaced.steps == 2 and replaced.lokr_factor == 4 and cfg.steps == 9


def test_config_yaml_is_written_in_sections(straight_run):  # noqa: F811
    raw = yaml.safe_load((straight_run / "config.yaml").read_text())
    assert set(raw) == {"model", "vae", "dataset", "method", "extra_datasets", "adapter", "objective", "loop"}
    assert set(raw["adapter"]) == set(adapters.get("lora").setting_names())
    assert raw["loop"]["steps"] == 8 and "prior_preservation" in raw["objective"]
    assert load_run_config(straight_run / "config.yaml") == build_config(values=load_run_config(
        straight_run / "config.yaml")).to_dict()


def _as_flat_file(run_dir) -> tuple[dict, dict]:
    """Rewrite the run's config.yaml as earlier versions wrote it: one flat mapping holding every setting
    of every method (those of other methods at their defaults). Returns (that mapping, the run's own
    settings as they were)."""
    own = load_run_config(run_dir / "config.yaml")
    flat = {**config.method_defaults(), **own}
    assert {"lokr_factor", "initializer_token", "extract_rank", "train_text_encoder", "oft_block_size"} <= set(flat)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(flat, sort_keys=False))
    return flat, own


def test_a_run_saved_with_the_flat_config_resumes(straight_run, dataset_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "old-run"
    seen = []
    first = train.run(small_config(dataset_dir), run_dir, on_event=seen.append, should_stop=lambda: len(
        [e for e in seen if e.kind == "step"]) >= 5)
    assert first.status == "cancelled"
    flat, own = _as_flat_file(run_dir)
    with pytest.raises(StudioError, match="'lokr_factor' works with the lokr method"):
        build_config(values=flat)  # as a new config it would be refused: loading a saved one is another path
    assert config.from_saved(flat).to_dict() == own  # the other methods' settings dropped, nothing else
    second = train.resume(run_dir)
    assert second.status == "completed" and second.step == 8
    assert same_curve(losses(run_dir), losses(straight_run))
    assert "adapter" in yaml.safe_load((run_dir / "config.yaml").read_text())  # rewritten in sections


def test_a_run_saved_with_the_flat_config_draws_in_the_playground(straight_run, tmp_path):  # noqa: F811
    run_dir = tmp_path / "old-finished"
    shutil.copytree(straight_run, run_dir)
    _as_flat_file(run_dir)
    req = lambda path: GenerateRequest(model="tiny", prompt="a photo of sks stuffed animal", steps=2, seed=0,  # noqa: E731
                                       adapters=[AdapterChoice(str(path), 1.0)])
    playground = Playground()
    assert np.array_equal(np.asarray(playground.generate(req(run_dir))), np.asarray(playground.generate(req(straight_run))))
    assert config.from_saved(load_run_config(run_dir / "config.yaml")).method == "lora"
