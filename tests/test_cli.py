"""The CLI over the core: each command works, and each mistake a user can make is one sentence, exit 2."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from studio.__main__ import main


def _one_sentence_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and err[0].endswith(".")
    assert "Traceback" not in err[0]
    return err[0]


def test_prep_keeps_good_files_and_names_bad_ones(photos_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(photos_dir, src)
    (src / "notes.png").write_text("this is not an image")
    out = tmp_path / "ds"
    assert main(["prep", str(src), "--out", str(out), "--token", "sks", "--class-word", "stuffed animal",
                 "--resolution", "64"]) == 0
    captured = capsys.readouterr()
    assert "notes.png" in captured.err
    good = len([p for p in photos_dir.iterdir() if p.suffix == ".jpg"])
    assert len(list((out / "images").glob("*.png"))) == good
    assert (out / "images" / "0001.txt").read_text() == "a photo of sks stuffed animal"
    assert (out / "dataset.yaml").exists()


def test_prep_of_a_folder_without_images_is_one_sentence(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["prep", str(tmp_path / "empty"), "--out", str(tmp_path / "ds"), "--token", "sks",
                 "--class-word", "dog"]) == 2
    assert "has no image files" in _one_sentence_error(capsys)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("args, phrase", [
    (["--model", "not-a-model"], "is not 'builtin', an existing folder, or a hub id"),
    (["--model", "tiny", "--set", "rnak=4"], "Unknown setting 'rnak'"),
    (["--model", "tiny", "--set", "learning_rate=fast"], "Setting 'learning_rate' must be"),
    (["--model", "tiny", "--steps", "-3"], "Setting 'steps' must be greater than 0"),
])
def test_train_bad_input_is_one_sentence_and_writes_no_run(dataset_dir, tmp_path, capsys, args, phrase):
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(dataset_dir), "--out", str(out), *args]) == 2
    assert phrase in _one_sentence_error(capsys)
    assert not out.exists()


def test_train_on_a_dataset_with_no_images(dataset_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(dataset_dir, broken)
    for f in (broken / "images").iterdir():
        f.unlink()
    assert main(["train", "--model", "tiny", "--dataset", str(broken), "--out", str(tmp_path / "r")]) == 2
    assert "has no images" in _one_sentence_error(capsys)


def test_train_generate_evaluate_round_trip(dataset_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--dataset", str(dataset_dir), "--method", "lora", "--steps", "6",
                 "--out", str(run), "--preset", "quick", "--set", "sample_every=3", "--set", "sample_steps=2",
                 "--set", "learning_rate=1e-2"]) == 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and "Adapter:" in out
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert len(list((run / "samples").glob("*.png"))) == 2  # at step 3 and at the end

    images = {}
    for name, adapter in (("base", []), ("adapted", ["--adapter", f"{run}:1.0"])):
        target = tmp_path / f"{name}.png"
        assert main(["generate", "--model", "tiny", *adapter, "--prompt", "a photo of sks stuffed animal",
                     "--seed", "3", "--steps", "3", "--out", str(target)]) == 0
        images[name] = np.asarray(Image.open(target), dtype=np.float32)
    assert np.abs(images["base"] - images["adapted"]).mean() > 0.5

    evals = tmp_path / "eval"
    assert main(["evaluate", "--model", "tiny", "--runs", str(run), "--dataset", str(dataset_dir),
                 "--out", str(evals), "--clip", "tiny", "--dino", "tiny", "--seeds", "1", "--steps", "2",
                 "--per-kind", "1", "--scales", "0.5,1", "--context", "in a forest"]) == 0
    printed = capsys.readouterr().out
    assert "Recommended:" in printed and "×0.5" in printed
    for name in ("results.csv", "summary.csv", "recommendation.json", "tradeoff.html", "prompts.html", "grid.png"):
        assert (evals / name).exists(), name
    assert (run / "eval" / "results.csv").exists()
    summary = (evals / "summary.csv").read_text()
    assert main(["evaluate", "--rescore", str(evals)]) == 0  # from saved embeddings
    assert (evals / "summary.csv").read_text() == summary
    assert main(["evaluate", "--dataset", str(dataset_dir), "--out", str(evals), "--scales", "half"]) == 2
    assert "--scales takes numbers" in _one_sentence_error(capsys)


def test_generate_with_unknown_hub_model_is_one_sentence(tmp_path, capsys):
    assert main(["generate", "--model", "nobody/no-such-model", "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    assert "is not in this machine's model cache and the model hub cannot be reached" in _one_sentence_error(capsys)


def test_generate_with_bad_adapter_argument(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--adapter", f"{tmp_path}:strong", "--prompt", "x",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "RUN_DIR:SCALE" in _one_sentence_error(capsys)


def test_builtin_model_command_writes_a_loadable_diffusers_folder(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "tiny"
    assert main(["builtin-model", str(out)]) == 0
    assert (out / "model_index.json").exists()
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_train_resume_extends_a_run(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["train", "--resume", str(run), "--steps", "32"]) == 0
    out = capsys.readouterr().out
    assert "Resumed from step 30 of 32" in out and "step 32/32" in out
    assert main(["train", "--resume", str(run)]) == 2
    assert "already reached step 32 of 32" in _one_sentence_error(capsys)


def test_train_without_dataset_or_resume_is_one_sentence(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r")]) == 2
    assert "--resume RUN_DIR" in _one_sentence_error(capsys)


def test_evaluate_help_has_every_evaluation_setting_s_help(capsys):
    from studio import fields
    from studio.evaluate.settings import EvalConfig

    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--help"])
    assert info.value.code == 0
    squeezed = "".join(capsys.readouterr().out.split())  # argparse wraps lines, and breaks them at hyphens
    for name, text in fields.help_of(EvalConfig).items():
        assert text and "".join(text.split()) in squeezed, name


def test_evaluate_flags_default_to_the_evaluation_settings():
    from studio import fields
    from studio.__main__ import _eval_config, _parser
    from studio.evaluate.settings import EvalConfig

    args = _parser().parse_args(["evaluate"])
    defaults = fields.defaults_of(EvalConfig)
    assert {name: getattr(args, name) for name in defaults} == defaults
    assert "dataset" not in defaults and args.dataset is None  # required: cmd_evaluate asks for it
    # Given flags replace the defaults (repeated ones too, not appended to them); lists are parsed as the tab does.
    args = _parser().parse_args(["evaluate", "--dataset", "d", "--context", "on a red background", "--context",
                                 "on a blue background", "--scales", "1, 0.5", "--kinds", "training,context",
                                 "--prompt", "a {token}, a {class}", "--runs", "r1", "r2", "--checkpoints", "all"])
    cfg = _eval_config(args)
    assert (cfg.contexts, cfg.scales, cfg.kinds, cfg.prompts, cfg.runs, cfg.checkpoints) == (
        ["on a red background", "on a blue background"], [0.5, 1.0], ["training", "context"], ["a {token}, a {class}"],
        ["r1", "r2"], "all")
    assert _eval_config(_parser().parse_args(["evaluate", "--dataset", "d"])).contexts == defaults["contexts"]


def test_a_bad_scale_is_the_same_sentence_in_the_cli_and_the_evaluate_tab(tmp_path, capsys):
    from studio.errors import StudioError
    from studio.paths import Workspace
    from studio.ui import evaluate_tab
    from studio.ui.context import Studio

    assert main(["evaluate", "--dataset", str(tmp_path / "d"), "--out", str(tmp_path / "e"), "--scales",
                 "0.5, half"]) == 2
    cli = _one_sentence_error(capsys).removeprefix("error: ")
    data = dict(runs=["r"], dataset="d", clip="tiny", dino="none", kinds=list(evaluate_tab.KIND_LABELS), per_kind=1,
                scales="0.5, half", checkpoints="final", seeds=1, steps=1, guidance=5.0, own="", contexts="")
    with pytest.raises(StudioError) as info:
        evaluate_tab._config(Studio(Workspace(tmp_path), "tiny"), "tiny", data)
    tab = str(info.value)
    said = " takes numbers separated by commas, such as 0, 0.5, 1; got '0.5, half'."
    assert cli == "--scales" + said and tab == "'Scales'" + said
    assert not (tmp_path / "e").exists()
